//! Every OpenAPI document the repository ships (any `*openapi*.json` under
//! `host/`: the endpoint's today, the aggregator's when it comes) passes an
//! independent validator, `openapi-spec-validator`, the way client
//! generators read it; our own tests only check replies against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::repo_root;

/// The Python with openapi-spec-validator (`scripts/setup.sh --tests` makes
/// it; `OXBOX_OPENAPI_PYTHON` overrides).
fn python() -> PathBuf {
    let path = std::env::var_os("OXBOX_OPENAPI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/py-openapi/bin/python"));
    assert!(
        path.is_file(),
        "{} missing: run scripts/setup.sh --tests (scripts/test.sh does) to install openapi-spec-validator",
        path.display()
    );
    path
}

/// Runs the validator on `files` (it checks each and fails if any fails).
fn validate(files: &[PathBuf]) -> Output {
    let output = Command::new(python())
        .args(["-m", "openapi_spec_validator", "--validation-errors", "all"])
        .args(files)
        .output()
        .expect("running openapi-spec-validator");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named openapi_spec_validator"),
        "openapi-spec-validator is not installed in {}: run scripts/setup.sh --tests\n{stderr}",
        python().display()
    );
    output
}

/// Every file under `dir` whose name contains `openapi` and ends in
/// `.json`, skipping build directories.
fn documents(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                documents(&path, found);
            }
        } else if name.contains("openapi") && name.ends_with(".json") {
            found.push(path);
        }
    }
}

#[test]
fn every_shipped_openapi_document_passes_openapi_spec_validator() {
    let mut found = Vec::new();
    documents(&repo_root().join("host"), &mut found);
    found.sort();
    assert!(
        found.contains(&repo_root().join("host/api/openapi.json")),
        "the endpoint's document was not found: {found:?}"
    );
    let output = validate(&found);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "openapi-spec-validator refused a document:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in &found {
        assert!(
            stdout.contains(&format!("{}: OK", file.display())),
            "{} not reported OK:\n{stdout}",
            file.display()
        );
    }
}

/// The validator is not a no-op: the defect it found in the endpoint's
/// document (a `description` on a media type object, which OpenAPI 3.1
/// does not allow there) is refused.
#[test]
fn openapi_spec_validator_refuses_a_description_on_a_media_type() {
    let text = std::fs::read_to_string(repo_root().join("host/api/openapi.json"))
        .expect("host/api/openapi.json");
    let mut doc: serde_json::Value = serde_json::from_str(&text).expect("OpenAPI JSON");
    let media =
        &mut doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"];
    assert!(media.is_object(), "no application/json request body");
    media["description"] = "EMR-only models".into();
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("openapi.json");
    std::fs::write(&broken, serde_json::to_vec(&doc).expect("json")).expect("write");
    let output = validate(&[broken]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "accepted:\n{stdout}");
    assert!(
        stdout.contains("'description' was unexpected"),
        "refused for another reason:\n{stdout}"
    );
}
