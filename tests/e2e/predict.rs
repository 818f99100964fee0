//! `oxbox model` and `oxbox predict`: a deterministic untrained package, the
//! example site's plugin, the bundled radiograph, end to end.

use std::path::Path;

use crate::util::{assert_clean_refusal, repo_root, run, stderr};

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn predict_runs_plugins_and_model_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("model");
    let init = json(&run(&[
        "model".as_ref(),
        "init".as_ref(),
        "--out".as_ref(),
        model.as_os_str(),
        "--backbone".as_ref(),
        "tiny".as_ref(),
        "--seed".as_ref(),
        "5".as_ref(),
    ]));
    let info = json(&run(&[
        "model".as_ref(),
        "info".as_ref(),
        model.as_os_str(),
    ]));
    assert_eq!(info["digest"], init["digest"]);
    assert_eq!(info["trained"], false);
    assert_eq!(info["emr_features"].as_array().map(Vec::len), Some(21));

    let plugin = repo_root().join("plugins/dist/example-site/plugin.toml");
    let config = tmp.path().join("oxbox.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"st-elsewhere\"\nname = \"test\"\n[storage]\ndata_dir = \"{}\"\n[model]\npackage = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
            tmp.path().join("data").display(),
            model.display(),
            plugin.display()
        ),
    )
    .expect("config");
    let dicom = repo_root().join("samples/chest-cr-sample.dcm");
    let record = repo_root().join("samples/example-site-record.json");
    let predict = |dicom: Option<&Path>| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--config".as_ref(),
            config.as_os_str(),
            "predict".as_ref(),
            "--emr".as_ref(),
            record.as_os_str(),
        ];
        if let Some(d) = dicom {
            args.push("--dicom".as_ref());
            args.push(d.as_os_str());
        }
        run(&args)
    };
    let out = predict(Some(&dicom));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = json(&out);
    assert_eq!(report["model"]["digest"], init["digest"]);
    assert_eq!(report["model"]["trained"], false);
    assert_eq!(report["site"], "st-elsewhere");
    assert_eq!(report["plugins"][0]["name"], "example-site");
    for horizon in ["24h", "72h"] {
        let h = &report["horizons"][horizon];
        let p = |k: &str| h[k].as_f64().unwrap_or(-1.0);
        let (any, high, vent) = (
            p("p_o2_any"),
            p("p_o2_high_flow_or_niv"),
            p("p_ventilation_or_death"),
        );
        assert!(
            (0.0..=1.0).contains(&any) && any >= high && high >= vent && vent >= 0.0,
            "{h}"
        );
        assert!((0.0..=1.0).contains(&p("exam_score")), "{h}");
    }
    // Deterministic: the same case gives the same probabilities.
    let again = json(&predict(Some(&dicom)));
    assert_eq!(again["horizons"], report["horizons"]);
    // No identifier from the EMR export or the DICOM file leaves the box.
    for identifier in [
        "FAKE-000123",
        "DOE",
        "OXBOX^SAMPLE",
        "OXBOX-FAKE-0001",
        "19700101",
        "1961-04-02",
    ] {
        assert!(!text.contains(identifier), "{identifier} in {text}");
    }
    // An image model without a radiograph: bad input.
    let line = assert_clean_refusal(&predict(None), "no radiograph");
    assert!(line.contains("needs a radiograph"), "{line}");

    // Every prediction is audited, the refused one too; no identifiers.
    let out = run(&[
        "--config".as_ref(),
        config.as_os_str(),
        "audit".as_ref(),
        "tail".as_ref(),
        "-n".as_ref(),
        "10".as_ref(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(records.len(), 3, "{text}");
    assert_eq!(records[0]["request_id"], report["request_id"]);
    assert_eq!(records[0]["model_digest"], init["digest"]);
    assert_eq!(records[0]["status"], "ok");
    assert_eq!(records[0]["outputs"], report["horizons"]);
    assert_eq!(
        records[0]["plugins"],
        serde_json::json!(["example-site 0.1.0"])
    );
    assert_eq!(records[2]["status"], "rejected");
    assert_ne!(records[0]["request_id"], records[1]["request_id"]);
    for identifier in [
        "FAKE-000123",
        "DOE",
        "OXBOX^SAMPLE",
        "OXBOX-FAKE-0001",
        "19700101",
        "1961-04-02",
    ] {
        assert!(!text.contains(identifier), "{identifier} in the audit log");
    }
}
