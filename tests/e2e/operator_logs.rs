//! What the operator of a running box sees, on the real server: a refused
//! prediction in the server log with its request id, plugin and field and
//! never the value; the same reason in the audit record (`oxbox audit
//! tail`); a reload logged one line per plugin, old -> new with version and
//! sha256, and "nothing changed" when nothing did; the example plugin's
//! unknown columns not logged at the default level.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::serve::{
    ServerProcess, Setup, multipart, multipart_type, pack_guest, request, sample_case,
    wait_for_admin_events,
};
use crate::util::{manifest_sha256, pack_plugin, repo_root, run, stderr};

/// The log once it holds a line containing `needle` (within 20 s).
fn wait_for_log(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).expect("log");
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The example plugin's component with a custom section appended: the same
/// plugin, name and version, different bytes — a rebuild, as a site's
/// engineer ships one — packed under `dir`.
fn rebuilt_example_site(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(repo_root().join("plugins/dist/example-site/example-site.wasm"))
        .expect("example-site component");
    let name = b"oxbox-test-rebuild";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(b"2");
    bytes.push(0); // custom section
    bytes.push(body.len() as u8);
    bytes.extend_from_slice(&body);
    let wasm = dir.join("example-site-rebuilt.wasm");
    std::fs::write(&wasm, bytes).expect("component");
    let out = dir.join("example-site-rebuilt");
    pack_plugin(&wasm, &out)
}

#[test]
fn refusals_and_reloads_are_in_the_server_log_and_the_audit_without_values() {
    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    let log = setup.dir.path().join("server.log");
    let server = ServerProcess::start_logged(&setup.config, &log);
    let (dicom, record) = sample_case();
    let mut record: Value = serde_json::from_slice(&record).expect("record");
    // A column the example plugin does not know: debug only.
    record["EXTRA_EXPORT_COLUMN"] = "x".into();
    let ct = multipart_type();
    let predict = |record: &Value| {
        let emr = record.to_string();
        let body = multipart(&[
            ("dicom", "application/dicom", &dicom),
            ("emr", "application/json", emr.as_bytes()),
        ]);
        let reply = request(
            server.addr,
            "POST",
            "/v1/predict",
            &[("Content-Type", &ct)],
            &body,
        );
        let problem = reply.json();
        (reply.status, problem)
    };

    // Two refusals whose plugin messages quote the value.
    let mut bad_temperature = record.clone();
    bad_temperature["TEMP_F"] = "DOE^JANE".into();
    let (status, temperature) = predict(&bad_temperature);
    assert_eq!(status, 422, "{temperature}");
    let mut bad_saturation = record.clone();
    bad_saturation["O2SAT"] = "917.25".into();
    let (status, saturation) = predict(&bad_saturation);
    assert_eq!(status, 422, "{saturation}");
    // The client gets the plugin's message (its own input); the log does
    // not.
    assert!(
        temperature["detail"]
            .as_str()
            .is_some_and(|d| d.contains("DOE^JANE")),
        "{temperature}"
    );
    let (status, ok) = predict(&record);
    assert_eq!(status, 200, "{ok}");

    for (problem, field) in [(&temperature, "TEMP_F"), (&saturation, "O2SAT")] {
        let id = problem["request_id"].as_str().expect("request id");
        let text = wait_for_log(&log, id);
        let line = text
            .lines()
            .find(|l| l.contains(id))
            .expect("the request's line");
        assert!(line.contains("INFO"), "{line}");
        assert!(
            line.contains(&format!(
                "prediction refused (plugin rejection): plugin example-site 0.1.0 rejected the input (field {field})"
            )),
            "{line}"
        );
    }
    let text = std::fs::read_to_string(&log).expect("log");
    for value in ["DOE^JANE", "917.25", "FAKE-000123"] {
        assert!(!text.contains(value), "{value} in the server log:\n{text}");
    }
    assert!(
        !text.contains("EXTRA_EXPORT_COLUMN"),
        "an unknown column is logged at the default level:\n{text}"
    );

    // The audit records carry the same reasons.
    let audit = run(&[
        "--config".as_ref(),
        setup.config.as_os_str(),
        "audit".as_ref(),
        "tail".as_ref(),
    ]);
    assert!(audit.status.success(), "{}", stderr(&audit));
    let audit_text = String::from_utf8_lossy(&audit.stdout).into_owned();
    for value in ["DOE^JANE", "917.25", "FAKE-000123"] {
        assert!(
            !audit_text.contains(value),
            "{value} in the audit:\n{audit_text}"
        );
    }
    let records: Vec<Value> = audit_text
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit JSON"))
        .collect();
    for (problem, field) in [(&temperature, "TEMP_F"), (&saturation, "O2SAT")] {
        let ours = records
            .iter()
            .find(|r| r["request_id"] == problem["request_id"])
            .unwrap_or_else(|| panic!("no audit record: {audit_text}"));
        assert_eq!(ours["status"], "rejected");
        assert_eq!(
            ours["reason"],
            format!("plugin example-site 0.1.0 rejected the input (field {field})")
        );
    }

    // A reload that changes the set: the example plugin rebuilt (same name
    // and version, new sha256) and a second plugin added.
    let old_manifest = repo_root().join("plugins/dist/example-site/plugin.toml");
    let old_sha = manifest_sha256(&old_manifest);
    let new_manifest = rebuilt_example_site(setup.dir.path());
    let new_sha = manifest_sha256(&new_manifest);
    assert_ne!(old_sha, new_sha);
    let echo = pack_guest(&setup, "feature_echo").join("plugin.toml");
    let echo_sha = manifest_sha256(&echo);
    let config = std::fs::read_to_string(&setup.config).expect("config");
    let config = config.replace(
        &old_manifest.display().to_string(),
        &new_manifest.display().to_string(),
    ) + &format!("[[plugins]]\npath = \"{}\"\n", echo.display());
    std::fs::write(&setup.config, config).expect("config");
    let hup = || {
        let sent = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(sent.success());
    };
    hup();
    let events = wait_for_admin_events(&setup, 1);
    let text = wait_for_log(&log, "SIGHUP: reloaded 2 plugin(s)");
    for expected in [
        format!(
            "SIGHUP: reload: plugin example-site: 0.1.0 (sha256 {old_sha}) -> 0.1.0 (sha256 {new_sha})"
        ),
        format!("SIGHUP: reload: plugin feature-echo: added, 0.0.1 (sha256 {echo_sha})"),
    ] {
        assert!(text.contains(&expected), "{expected:?} not in:\n{text}");
    }
    assert!(!text.contains("nothing changed"), "{text}");
    // The admin event holds the same identities.
    assert_eq!(events[0].before[0]["sha256"], old_sha.as_str());
    assert_eq!(events[0].after[0]["sha256"], new_sha.as_str());
    assert_eq!(events[0].after[1]["name"], "feature-echo");
    assert_eq!(events[0].after[1]["sha256"], echo_sha.as_str());

    // Again, unchanged: said so.
    hup();
    wait_for_admin_events(&setup, 2);
    let text = wait_for_log(&log, "SIGHUP: reloaded 2 plugin(s): nothing changed");
    assert!(
        text.contains(&format!(
            "SIGHUP: reload: plugin example-site: unchanged, 0.1.0 (sha256 {new_sha})"
        )),
        "{text}"
    );
}
