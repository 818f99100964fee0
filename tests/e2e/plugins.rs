//! Site plugins: the two real plugins through the CLI, signing and trust,
//! and every hostile plugin contained (in-process, so the host's memory can
//! be measured).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oxbox::plugins::PluginSet;

use crate::util::{assert_clean_refusal, corpus_file, repo_root, run, stderr};

/// A built plugin folder (scripts/build-plugins.sh).
fn dist(name: &str) -> PathBuf {
    let manifest = repo_root()
        .join("plugins/dist")
        .join(name)
        .join("plugin.toml");
    assert!(
        manifest.is_file(),
        "{} missing: run scripts/build-plugins.sh (scripts/test.sh does)",
        manifest.display()
    );
    manifest
}

fn sample(name: &str) -> PathBuf {
    repo_root().join("samples").join(name)
}

/// A config whose data dir is `dir`, with extra TOML appended.
fn config_in(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("oxbox.toml");
    std::fs::write(
        &path,
        format!(
            "[site]\nid = \"test\"\nname = \"test site\"\n[storage]\ndata_dir = \"{}\"\n{extra}",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

fn plugin_run(
    manifest: &Path,
    record: &Path,
    config: &Path,
    extra: &[&std::ffi::OsStr],
) -> std::process::Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--config".as_ref(),
        config.as_os_str(),
        "plugin".as_ref(),
        "run".as_ref(),
        manifest.as_os_str(),
        "--emr".as_ref(),
        record.as_os_str(),
    ];
    args.extend_from_slice(extra);
    std::process::Command::new(crate::util::oxbox())
        .args(&args)
        .env_remove("OXBOX_CONFIG")
        .output()
        .expect("run oxbox")
}

/// Asserts that canonical feature `name` in a `plugin run` report is `want`.
fn assert_feature(report: &serde_json::Value, name: &str, want: f64) {
    let got = report["features"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{name} missing in {report}"));
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{name}: {got} != {want}"
    );
}

#[test]
fn example_site_record_becomes_canonical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let out = plugin_run(
        &dist("example-site"),
        &sample("example-site-record.json"),
        &config,
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let close = |name: &str, want: f64| assert_feature(&report, name, want);
    close("age_years", 59.0);
    close("sex", 0.0);
    close("temperature_c", (100.9 - 32.0) * 5.0 / 9.0);
    close("systolic_bp_mmhg", 128.0);
    close("diastolic_bp_mmhg", 76.0);
    close("spo2_pct", 91.0);
    close("o2_device_at_triage", 1.0);
    close("crp_mg_l", 87.0);
    close("d_dimer_ng_ml_feu", 1240.0);
    close("troponin_t_ng_l", 12.0);
    close("lymphocytes_e9_l", 0.12 * 6.8);
    close("neutrophils_e9_l", 0.79 * 6.8);
    close("creatinine_mg_dl", 97.0 / 88.42);
    close("glucose_mg_dl", 7.4 * 18.016);
    close("sodium_mmol_l", 136.0);
    assert_eq!(report["features"].as_object().expect("object").len(), 21);
    // The export's identifiers never come out.
    for identifier in ["FAKE-000123", "DOE", "1961-04-02", "E-55501"] {
        assert!(!text.contains(identifier), "{identifier} leaked: {text}");
        assert!(
            !stderr(&out).contains(identifier),
            "{identifier} leaked to stderr"
        );
    }
}

#[test]
fn canonical_plugin_normalises_units_and_rejects_impossible_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let out = plugin_run(
        &dist("canonical"),
        &sample("canonical-record.json"),
        &config,
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let close = |name: &str, want: f64| assert_feature(&report, name, want);
    close("temperature_c", (101.3 - 32.0) * 5.0 / 9.0);
    close("crp_mg_l", 142.0);
    close("d_dimer_ng_ml_feu", 1800.0);
    close("lymphocytes_e9_l", 0.08 * 9.1);
    close("creatinine_mg_dl", 132.0 / 88.42);
    close("glucose_mg_dl", 8.1 * 18.016);
    close("spo2_pct", 88.0);

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"spo2_pct": 150, "age_years": 40}"#).expect("write");
    let out = plugin_run(&dist("canonical"), &bad, &config, &[]);
    let line = assert_clean_refusal(&out, "impossible SpO2");
    assert!(line.contains("spo2_pct") && line.contains("150"), "{line}");
    assert!(line.contains("rejected"), "{line}");
}

#[test]
fn example_site_fixes_mislabelled_monochrome1() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let source = corpus_file("RG1_UNCR.dcm");
    // The same film, relabelled MONOCHROME2 as the site's reader does.
    let mut obj = dicom_object::open_file(&source).expect("open");
    obj.put_element(dicom_object::mem::InMemElement::new(
        dicom_dictionary_std::tags::PHOTOMETRIC_INTERPRETATION,
        dicom_core::VR::CS,
        dicom_core::PrimitiveValue::from("MONOCHROME2"),
    ));
    let relabelled = tmp.path().join("mislabelled.dcm");
    obj.write_to_file(&relabelled).expect("write");
    // Runs the example site's plugin on `film`; returns its image decision.
    let decide = |film: &Path, out: &Path| -> String {
        let result = plugin_run(
            &dist("example-site"),
            &sample("example-site-record.json"),
            &config,
            &[
                "--dicom".as_ref(),
                film.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ],
        );
        assert!(result.status.success(), "{}", stderr(&result));
        let report: serde_json::Value = serde_json::from_slice(&result.stdout).expect("JSON");
        report["image"]["decision"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (fixed, kept) = (tmp.path().join("fixed.npy"), tmp.path().join("kept.npy"));
    assert_eq!(decide(&relabelled, &fixed), "replace");
    // The correctly labelled film is left alone, and both give the same image.
    assert_eq!(decide(&source, &kept), "keep-canonical");
    let (_, a) = crate::util::read_npy(&fixed);
    let (_, b) = crate::util::read_npy(&kept);
    assert!(crate::util::max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn check_reports_interface_hooks_imports_and_digest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let manifest = dist("example-site");
    let out = run(&[
        "--config".as_ref(),
        config.as_os_str(),
        "plugin".as_ref(),
        "check".as_ref(),
        manifest.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["name"], "example-site");
    assert_eq!(report["interface_version"], "0.1.0");
    assert_eq!(
        report["hooks"],
        serde_json::json!(["map-emr", "preprocess-image"])
    );
    assert_eq!(report["signature"]["status"], "unsigned");
    let wasm = std::fs::read(manifest.with_file_name("example-site.wasm")).expect("wasm");
    assert_eq!(
        report["sha256"],
        oxbox::plugins::manifest::sha256_hex(&wasm)
    );
    let imports: Vec<String> = serde_json::from_value(report["imports"].clone()).expect("imports");
    assert!(
        imports.iter().any(|i| i == "oxbox:plugin/host@0.1.0"),
        "{imports:?}"
    );
    assert!(
        imports
            .iter()
            .all(|i| !i.starts_with("wasi:filesystem") && !i.starts_with("wasi:sockets"))
    );
    // Second load comes from the authenticated cache.
    let out = run(&[
        "--config".as_ref(),
        config.as_os_str(),
        "plugin".as_ref(),
        "check".as_ref(),
        manifest.as_os_str(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["compiled"], "from cache");
}

#[test]
fn tampered_cache_artifacts_are_never_loaded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let manifest = dist("canonical");
    let check = || {
        run(&[
            "--config".as_ref(),
            config.as_os_str(),
            "plugin".as_ref(),
            "check".as_ref(),
            manifest.as_os_str(),
        ])
    };
    assert!(check().status.success());
    let cache = tmp.path().join("data/plugin-cache");
    let artifact = std::fs::read_dir(&cache)
        .expect("cache dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a compiled artifact");
    let mut bytes = std::fs::read(&artifact).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&artifact, bytes).expect("tamper");
    let out = check();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        report["compiled"], "now",
        "a tampered artifact must be recompiled, not loaded"
    );
}

#[test]
fn signed_plugins_and_trust() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    let out = run(&[
        "keys".as_ref(),
        "generate".as_ref(),
        "--out".as_ref(),
        keys.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let public = generated["public_key"]
        .as_str()
        .expect("public key")
        .to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("signing-key.pk8"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A private copy of the plugin folder to sign and tamper with.
    let folder = tmp.path().join("example-site");
    std::fs::create_dir_all(&folder).expect("mkdir");
    for name in ["plugin.toml", "example-site.wasm"] {
        std::fs::copy(dist("example-site").with_file_name(name), folder.join(name)).expect("copy");
    }
    let manifest = folder.join("plugin.toml");
    let strict = config_in(
        tmp.path(),
        &format!(
            "[sandbox]\nrequire_signed_plugins = true\ntrusted_plugin_keys = [\"{public}\"]\n"
        ),
    );
    let check = |config: &Path| {
        run(&[
            "--config".as_ref(),
            config.as_os_str(),
            "plugin".as_ref(),
            "check".as_ref(),
            manifest.as_os_str(),
        ])
    };
    let line = assert_clean_refusal(&check(&strict), "unsigned under require_signed_plugins");
    assert!(line.contains("require_signed_plugins"), "{line}");

    let key = keys.join("signing-key.pk8");
    let out = run(&[
        "plugin".as_ref(),
        "sign".as_ref(),
        manifest.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = check(&strict);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["signature"]["status"], "verified");
    assert_eq!(report["signature"]["key"], public);

    // A signed manifest whose component was swapped: the digest check fails.
    let original = std::fs::read(folder.join("example-site.wasm")).expect("wasm");
    std::fs::copy(
        dist("canonical").with_file_name("canonical.wasm"),
        folder.join("example-site.wasm"),
    )
    .expect("swap");
    let line = assert_clean_refusal(&check(&strict), "swapped component");
    assert!(line.contains("sha256"), "{line}");
    std::fs::write(folder.join("example-site.wasm"), original).expect("restore");
    // An edited manifest: the signature fails.
    let text = std::fs::read_to_string(&manifest)
        .expect("read")
        .replace("0.1.0\"\ninterface", "0.1.1\"\ninterface");
    std::fs::write(&manifest, text).expect("edit");
    let line = assert_clean_refusal(&check(&strict), "edited manifest");
    assert!(line.contains("signature"), "{line}");
    // Signed by a key the box does not trust.
    let other = config_in(
        tmp.path(),
        "[sandbox]\ntrusted_plugin_keys = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\n",
    );
    let out = run(&[
        "plugin".as_ref(),
        "sign".as_ref(),
        manifest.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ]);
    assert!(out.status.success());
    let line = assert_clean_refusal(&check(&other), "untrusted key");
    assert!(line.contains("trusted key"), "{line}");
}

#[test]
fn plugin_sets_chain_and_reload_atomically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let one = format!(
        "[[plugins]]\npath = \"{}\"\n",
        dist("example-site").display()
    );
    let two = format!(
        "{one}[[plugins]]\npath = \"{}\"\n",
        dist("canonical").display()
    );
    let config_path = config_in(tmp.path(), &one);
    let loaded = oxbox::config::LoadedConfig::load(Some(&config_path)).expect("config");
    let registry = Arc::new(oxbox::plugins::PluginRegistry::new(&loaded).expect("registry"));
    let fields = oxbox::plugins::record::raw_fields_from_json(
        &serde_json::from_str(
            &std::fs::read_to_string(sample("example-site-record.json")).expect("record"),
        )
        .expect("json"),
    )
    .expect("fields");
    let before: Arc<PluginSet> = registry.current();
    assert_eq!(before.plugins().len(), 1);
    let single = before.map_emr(fields.clone()).expect("map");

    // example-site → canonical: the second plugin re-checks the first's output.
    std::fs::write(
        &config_path,
        std::fs::read_to_string(&config_path)
            .expect("read")
            .replace(&one, &two),
    )
    .expect("write");
    assert_eq!(registry.reload().expect("reload"), 2);
    let chained = registry.current().map_emr(fields.clone()).expect("chain");
    assert_eq!(chained.len(), single.len());
    for (a, b) in single.iter().zip(&chained) {
        assert_eq!(a.name, b.name);
        match (a.value, b.value) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9 * x.abs().max(1.0), "{}", a.name),
            (x, y) => assert_eq!(x, y, "{}", a.name),
        }
    }
    // The request that took the old set finishes on it.
    assert_eq!(before.plugins().len(), 1);
    assert!(before.map_emr(fields.clone()).is_ok());

    // A broken set leaves the running one in place.
    std::fs::write(
        &config_path,
        std::fs::read_to_string(&config_path)
            .expect("read")
            .replace("canonical/plugin.toml", "missing/plugin.toml"),
    )
    .expect("write");
    assert!(registry.reload().is_err());
    assert_eq!(registry.current().plugins().len(), 2);
}
