//! The host checks what site plugins return against EMR schema v1, on the
//! real binary: a feature the schema does not know is a plugin fault naming
//! it (with the nearest schema name for a typo; HTTP 500, CLI exit 1), a
//! value outside the schema's range — or outside the model's own narrower
//! range — refuses the case naming the feature and never the value (HTTP
//! 422, CLI exit 2, the audit record's reason), and `plugin run` marks which
//! features the model uses. The plugin is the test guest `feature-echo`
//! (tests/guests/), which returns whatever features its record names.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::serve::{ServerProcess, assert_conforms, openapi, request};
use crate::util::{assert_clean_refusal, init_model, oxbox, pack_plugin, repo_root, run, stderr};

/// An EMR-only model, the `feature-echo` plugin and a config using both.
struct Site {
    dir: tempfile::TempDir,
    model: PathBuf,
    plugin: PathBuf,
    config: PathBuf,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model");
        init_model(&model, &["--emr-only", "--seed", "5"]);
        let wasm =
            repo_root().join("tests/guests/target/wasm32-wasip2/release/hostile_feature_echo.wasm");
        assert!(
            wasm.is_file(),
            "{}: run scripts/build-plugins.sh --guests",
            wasm.display()
        );
        let out = dir.path().join("feature-echo");
        let plugin = pack_plugin(&wasm, &out);
        let config = dir.path().join("oxbox.toml");
        std::fs::write(
            &config,
            format!(
                "[site]\nid = \"echo\"\nname = \"schema checks\"\n[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n[model]\npackage = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
                dir.path().join("data").display(),
                model.display(),
                plugin.display()
            ),
        )
        .expect("config");
        Self {
            dir,
            model,
            plugin,
            config,
        }
    }

    /// Writes `record` as `name.json` and returns its path.
    fn record(&self, name: &str, record: Value) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, record.to_string()).expect("record");
        path
    }

    /// `oxbox --config <site> <args>`.
    fn oxbox(&self, args: &[&OsStr]) -> Output {
        let mut all: Vec<&OsStr> = vec!["--config".as_ref(), self.config.as_os_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    fn predict(&self, record: Value) -> Output {
        let path = self.record("predict", record);
        self.oxbox(&["predict".as_ref(), "--emr".as_ref(), path.as_os_str()])
    }

    fn plugin_run(&self, record: Value, extra: &[&OsStr]) -> Output {
        let path = self.record("run", record);
        let mut args: Vec<&OsStr> = vec![
            "plugin".as_ref(),
            "run".as_ref(),
            self.plugin.as_os_str(),
            "--emr".as_ref(),
            path.as_os_str(),
        ];
        args.extend_from_slice(extra);
        self.oxbox(&args)
    }

    /// Rewrites the model's manifest: `edit` gets and returns its `[[emr]]`
    /// blocks (the text before the first one stays).
    fn edit_model(&self, edit: impl FnOnce(Vec<String>) -> Vec<String>) {
        let path = self.model.join("model.toml");
        let text = std::fs::read_to_string(&path).expect("model.toml");
        let mut parts = text.split("\n[[emr]]\n");
        let head = parts.next().expect("head").to_owned();
        let blocks = edit(parts.map(str::to_owned).collect());
        let mut out = head;
        for block in blocks {
            out.push_str("\n[[emr]]\n");
            out.push_str(&block);
        }
        std::fs::write(&path, out).expect("model.toml");
    }

    /// The audit records, as `oxbox audit tail` prints them.
    fn audit(&self) -> (String, Vec<Value>) {
        let out = self.oxbox(&[
            "audit".as_ref(),
            "tail".as_ref(),
            "-n".as_ref(),
            "50".as_ref(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let records = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit JSON line"))
            .collect();
        (text, records)
    }
}

/// The one `error:` line of a command that failed with exit 1.
fn failure_line(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{what}: no error line: {err}"));
    line.to_owned()
}

#[test]
fn features_outside_the_schema_are_plugin_faults_and_implausible_values_are_refused() {
    let site = Site::new();

    // A lab the schema lacks: a fault naming it, in predict and plugin run.
    let il6 = json!({"spo2_pct": 95, "il6_pg_ml": 12});
    for (what, out) in [
        ("predict", site.predict(il6.clone())),
        ("plugin run", site.plugin_run(il6.clone(), &[])),
    ] {
        let line = failure_line(&out, what);
        assert!(
            line.contains(
                "returned malformed output: feature \"il6_pg_ml\" is not in EMR schema v1"
            ),
            "{what}: {line}"
        );
        assert!(!line.contains("did you mean"), "{what}: {line}");
    }
    // A misspelt feature: the schema name it is nearest to.
    let line = failure_line(&site.predict(json!({"spo2_pc": 95})), "typo");
    assert!(
        line.contains("feature \"spo2_pc\" is not in EMR schema v1 (did you mean \"spo2_pct\"?)"),
        "{line}"
    );

    // Outside the schema's range: bad input (exit 2), naming the feature and
    // the range, never the value.
    for (what, out) in [
        ("predict", site.predict(json!({"spo2_pct": 917.25}))),
        (
            "plugin run",
            site.plugin_run(json!({"spo2_pct": 917.25}), &[]),
        ),
    ] {
        let line = assert_clean_refusal(&out, what);
        assert!(line.contains("feature-echo 0.0.1"), "{what}: {line}");
        assert!(line.contains("implausible spo2_pct"), "{what}: {line}");
        assert!(line.contains("30..=100"), "{what}: {line}");
        assert!(!line.contains("917"), "{what}: the value leaked: {line}");
    }

    // The model's own range, narrower than the schema's (30..=100): a value
    // inside the schema's but outside the model's is refused, not clamped.
    site.edit_model(|blocks| {
        blocks
            .into_iter()
            .map(|b| {
                if b.starts_with("name = \"spo2_pct\"") {
                    b.replace("min = 30.0", "min = 50.0")
                } else {
                    b
                }
            })
            .collect()
    });
    let line = assert_clean_refusal(&site.predict(json!({"spo2_pct": 45.5})), "model range");
    assert!(
        line.contains("spo2_pct is outside the range model exam-demo 0.1.0 takes (50..=100 %)"),
        "{line}"
    );
    assert!(!line.contains("45.5"), "the value leaked: {line}");
    let ok = site.predict(json!({"spo2_pct": 95, "age_years": 70}));
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Every refusal is audited with its redacted reason.
    let (text, records) = site.audit();
    // The values must not appear in any reason (the one free-text field;
    // request ids, digests, timings and probabilities are other numbers
    // that may contain "917" by chance).
    for record in &records {
        let reason = record["reason"].as_str().unwrap_or_default();
        assert!(
            !reason.contains("917") && !reason.contains("45.5"),
            "{text}"
        );
    }
    let reasons: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(s, r)| *s == "failed"
                && r.contains("feature \"il6_pg_ml\" is not in EMR schema v1")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(s, r)| *s == "rejected"
            && *r
                == "plugin feature-echo 0.0.1 gave an implausible spo2_pct (outside the plausible range 30..=100 % of EMR schema v1)"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(s, r)| *s == "rejected" && r.contains("spo2_pct is outside the range model")),
        "{reasons:?}"
    );
    let last = records.last().expect("records");
    assert_eq!(last["status"], "ok");
    assert_eq!(last["reason"], Value::Null);
}

#[test]
fn the_server_answers_500_for_an_unknown_feature_and_422_for_an_implausible_value() {
    let doc = openapi();
    let site = Site::new();
    let server = ServerProcess::start(&site.config);
    let predict = |emr: Value| {
        let body = json!({ "emr": emr }).to_string();
        let reply = request(
            server.addr,
            "POST",
            "/v1/predict",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_conforms(&doc, "POST", "/v1/predict", &reply);
        reply
    };
    let reply = predict(json!({"spo2_pc": 95}));
    assert_eq!(reply.status, 500);
    let problem = reply.json();
    assert_eq!(problem["type"], "urn:oxbox:problem:plugin-fault");
    let detail = problem["detail"].as_str().expect("detail");
    assert!(detail.contains("(did you mean \"spo2_pct\"?)"), "{detail}");

    let reply = predict(json!({"spo2_pct": 917.25, "age_years": 70}));
    assert_eq!(reply.status, 422);
    let problem = reply.json();
    assert_eq!(problem["type"], "urn:oxbox:problem:plugin-rejected");
    let detail = problem["detail"].as_str().expect("detail");
    assert!(detail.contains("implausible spo2_pct"), "{detail}");
    assert!(!detail.contains("917"), "the value leaked: {detail}");

    // Hostile input cannot quarantine a healthy plugin: refusals are not
    // faults.
    for _ in 0..5 {
        assert_eq!(predict(json!({"spo2_pct": 917.25})).status, 422);
    }
    let reply = predict(json!({"spo2_pct": 95, "age_years": 70}));
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["warnings"], json!([]));
}

#[test]
fn plugin_run_marks_the_features_the_model_uses() {
    let site = Site::new();
    // A model that does not use ferritin.
    site.edit_model(|blocks| {
        blocks
            .into_iter()
            .filter(|b| !b.starts_with("name = \"ferritin_ng_ml\""))
            .collect()
    });
    let record = json!({"spo2_pct": 95, "ferritin_ng_ml": 300, "age_years": 70, "crp_mg_l": ""});
    let out = site.plugin_run(record.clone(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // The features as before, every one the plugin emitted.
    assert_eq!(report["features"]["ferritin_ng_ml"], 300.0);
    assert_eq!(report["features"]["crp_mg_l"], Value::Null);
    let model = &report["model"];
    assert_eq!(model["source"], "[model] package");
    assert_eq!(model["name"], "exam-demo");
    assert_eq!(model["uses"], json!(["spo2_pct", "age_years", "crp_mg_l"]));
    assert_eq!(model["ignores"], json!(["ferritin_ng_ml"]));
    let not_emitted = model["not_emitted"].as_array().expect("not_emitted");
    assert_eq!(not_emitted.len(), 20 - 3, "{model}");
    assert!(not_emitted.contains(&json!("sex")));
    assert!(!not_emitted.contains(&json!("ferritin_ng_ml")));

    // --model names another model: the full schema, nothing ignored.
    let full = site.dir.path().join("full-model");
    init_model(&full, &["--emr-only", "--name", "full"]);
    let out = site.plugin_run(record.clone(), &["--model".as_ref(), full.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["model"]["source"], "--model");
    assert_eq!(report["model"]["name"], "full");
    assert_eq!(report["model"]["ignores"], json!([]));
    // A --model that is not there is an error …
    let missing = site.dir.path().join("no-such-model");
    let out = site.plugin_run(record.clone(), &["--model".as_ref(), missing.as_os_str()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-model"), "{}", stderr(&out));

    // … a configured model that cannot be loaded is said, not fatal.
    std::fs::remove_file(site.model.join("model.toml")).expect("break the model");
    let out = site.plugin_run(record.clone(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["features"]["spo2_pct"], 95.0);
    let error = report["model"]["error"].as_str().expect("error");
    assert!(error.contains("model.toml"), "{error}");

    // Without a config: the embedded demo model, as predict would use.
    let home = site.dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let path = site.record("demo", record);
    let out = Command::new(oxbox())
        .args([
            "plugin".as_ref(),
            "run".as_ref(),
            site.plugin.as_os_str(),
            "--emr".as_ref(),
            path.as_os_str(),
        ])
        .env_remove("OXBOX_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", &home)
        .current_dir(site.dir.path())
        .output()
        .expect("run oxbox");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["model"]["source"], "embedded demo model");
    let marked = report["model"]["uses"].as_array().expect("uses").len()
        + report["model"]["ignores"]
            .as_array()
            .expect("ignores")
            .len();
    assert_eq!(marked, 4, "{report}");
    assert!(!site.dir.path().join("oxbox-data").exists());
}
