//! The command line itself: help, version, config check, dicom info,
//! preprocess outputs.

use crate::util::{corpus_file, read_npy, run, stderr};
use dicom_dictionary_std::tags;

#[test]
fn help_and_version() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("oxbox "));
    for cmd in [
        vec!["preprocess", "--help"],
        vec!["dicom", "info", "--help"],
        vec!["config", "check", "--help"],
        vec!["bench", "--help"],
        vec!["predict", "--help"],
        vec!["model", "info", "--help"],
        vec!["model", "init", "--help"],
        vec!["plugin", "check", "--help"],
        vec!["plugin", "run", "--help"],
        vec!["plugin", "pack", "--help"],
        vec!["plugin", "sign", "--help"],
        vec!["plugin", "bench", "--help"],
        vec!["keys", "generate", "--help"],
        vec!["audit", "tail", "--help"],
    ] {
        let out = run(&cmd);
        assert!(out.status.success(), "{cmd:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{cmd:?} help has no example:\n{text}"
        );
    }
    let out = run(&["preprocess", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn config_check_prints_the_effective_default() {
    let out = run(&["config", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:8480\""), "{text}");
    assert!(text.contains("max_image_megapixels = 100"), "{text}");
    assert!(text.contains("embedded default"), "{text}");
}

#[test]
fn commands_without_config_keep_state_in_the_user_data_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cwd, home, xdg) = (
        tmp.path().join("cwd"),
        tmp.path().join("home"),
        tmp.path().join("xdg-data"),
    );
    for dir in [&cwd, &home] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let record = cwd.join("record.json");
    std::fs::write(&record, r#"{"age_years": 64, "spo2_pct": 92, "sex": 1}"#).expect("record");
    let dicom = crate::util::repo_root().join("samples/chest-cr-sample.dcm");
    let oxbox = |args: &[&std::ffi::OsStr], xdg_data: Option<&std::path::Path>| {
        let mut command = crate::util::oxbox_command();
        command
            .args(args)
            .current_dir(&cwd)
            .env("HOME", &home)
            .env_remove("XDG_DATA_HOME");
        if let Some(dir) = xdg_data {
            command.env("XDG_DATA_HOME", dir);
        }
        command.output().expect("run oxbox")
    };
    // predict with the embedded default: the demo model and the audit log
    // go to $XDG_DATA_HOME/oxbox.
    let out = oxbox(
        &[
            "predict".as_ref(),
            "--dicom".as_ref(),
            dicom.as_os_str(),
            "--emr".as_ref(),
            record.as_os_str(),
        ],
        Some(&xdg),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(xdg.join("oxbox/audit.sqlite3").is_file());
    assert!(xdg.join("oxbox/models").is_dir());
    let out = oxbox(&["audit".as_ref(), "tail".as_ref()], Some(&xdg));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    // Without XDG_DATA_HOME: ~/.local/share/oxbox.
    let out = oxbox(&["audit".as_ref(), "tail".as_ref()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(home.join(".local/share/oxbox/audit.sqlite3").is_file());
    let out = oxbox(&["config".as_ref(), "check".as_ref()], None);
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "data_dir = \"{}\"",
        home.join(".local/share/oxbox").display()
    );
    assert!(text.contains(&want), "{text}");
    // Nothing in the working directory, ever.
    let entries: Vec<_> = std::fs::read_dir(&cwd)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(entries, ["record.json"]);
    // Neither variable: a clear refusal asking for --config.
    let mut command = crate::util::oxbox_command();
    let out = command
        .args(["audit", "tail"])
        .current_dir(&cwd)
        .env_remove("HOME")
        .env_remove("XDG_DATA_HOME")
        .output()
        .expect("run oxbox");
    let line = crate::util::assert_clean_refusal(&out, "no HOME");
    assert!(
        line.contains("no per-user data directory") && line.contains("--config"),
        "{line}"
    );
    assert!(!cwd.join("oxbox-data").exists());
}

#[test]
fn config_errors_name_file_line_and_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bad.toml");
    // `oxbox config check` on `text`: the one error line it must print.
    let refuse = |text: &str, what: &str| {
        std::fs::write(&path, text).expect("write");
        let out = run(&[
            "config".as_ref(),
            "check".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ]);
        crate::util::assert_clean_refusal(&out, what)
    };
    let line = refuse(
        "[site]\nid = \"a\"\nname = \"b\"\n\n[server]\nlisen = \"0.0.0.0:1\"\n",
        "bad config",
    );
    assert!(line.contains("bad.toml:6:"), "{line}");
    assert!(line.contains("lisen"), "{line}");

    let line = refuse(
        "[site]\nid = \"a\"\nname = \"b\"\n[limits]\nmax_image_megapixels = -3\n",
        "bad value",
    );
    assert!(
        line.contains(":5:") && line.contains("max_image_megapixels"),
        "{line}"
    );
}

#[test]
fn dicom_info_reports_attributes_and_no_identifiers() {
    let file = corpus_file("RG1_UNCR.dcm");
    let out = run(&["dicom".as_ref(), "info".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(info["modality"], "CR");
    assert_eq!(info["photometric_interpretation"], "MONOCHROME1");
    assert_eq!(info["rows"], 1955);
    assert_eq!(info["columns"], 1841);
    assert_eq!(info["bits_stored"], 15);
    assert_eq!(info["transfer_syntax"], "1.2.840.10008.1.2.1");
    assert_eq!(info["window_center"][0], 15000.0);
    assert_eq!(info["view_position"], "PA");

    let ct = corpus_file("CT_small.dcm");
    let obj = dicom_object::open_file(&ct).expect("open");
    let out = run(&["dicom".as_ref(), "info".as_ref(), ct.as_os_str()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for tag in [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
    ] {
        if let Ok(e) = obj.element(tag) {
            let value = e.to_str().expect("text").trim().to_owned();
            if !value.is_empty() {
                assert!(!text.contains(&value), "info leaks {tag}: {value}");
            }
        }
    }
    assert!(!text.to_lowercase().contains("patient"), "{text}");
}

#[test]
fn preprocess_writes_npy_and_png() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let npy = tmp.path().join("chest.npy");
    let png = tmp.path().join("chest.png");
    let file = corpus_file("RG1_J2KR.dcm");
    let out = run(&[
        "preprocess".as_ref(),
        "--dicom".as_ref(),
        file.as_os_str(),
        "--out".as_ref(),
        npy.as_os_str(),
        "--size".as_ref(),
        "64".as_ref(),
        "--png".as_ref(),
        png.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, data) = read_npy(&npy);
    assert_eq!(shape, vec![1, 64, 64]);
    assert!(data.iter().all(|v| (0.0..=1.0).contains(v)));
    // MONOCHROME1 is inverted: lungs (air) dark, so the centre is darker
    // than the bottom corners where the abdomen/bone is.
    let centre_lung = data[20 * 64 + 16];
    assert!(
        centre_lung < 0.6,
        "lung field should be dark, got {centre_lung}"
    );
    let png_bytes = std::fs::read(&png).expect("png");
    assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["shape"], serde_json::json!([1, 64, 64]));
}

/// `model.device` reaches the device choice of inference (`predict`) and
/// training (`train`, `bench --train`; `bench --device` overrides it): a
/// build without the `cuda` feature asked for `cuda:0` refuses, naming the
/// device and why (scripts/gpu-check.sh runs a `cuda` build on a GPU), and
/// `cpu` trains.
#[cfg(not(feature = "cuda"))]
#[test]
fn the_configured_device_reaches_inference_and_training() {
    use std::ffi::OsStr;
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("oxbox.toml");
    std::fs::write(
        &config,
        "[site]\nid = \"gpu\"\nname = \"gpu\"\n[storage]\ndata_dir = \"data\"\n\
         [model]\ndevice = \"cuda:0\"\n",
    )
    .expect("config");
    let root = crate::util::repo_root();
    let (dicom, record) = (
        root.join("samples/chest-cr-sample.dcm"),
        root.join("samples/canonical-record.json"),
    );
    let with_config = |args: &[&OsStr]| {
        let mut all: Vec<&OsStr> = vec!["--config".as_ref(), config.as_os_str()];
        all.extend_from_slice(args);
        run(&all)
    };
    let why = "device cuda:0: this oxbox was built without the `cuda` feature";
    for (what, out) in [
        (
            "predict",
            with_config(&[
                "predict".as_ref(),
                "--dicom".as_ref(),
                dicom.as_os_str(),
                "--emr".as_ref(),
                record.as_os_str(),
            ]),
        ),
        (
            "train",
            with_config(&[
                "train".as_ref(),
                "--data".as_ref(),
                tmp.path().join("site-1").as_os_str(),
                "--out".as_ref(),
                tmp.path().join("model").as_os_str(),
            ]),
        ),
        (
            "bench --train",
            with_config(&[
                "bench".as_ref(),
                "--train".as_ref(),
                "tiny".as_ref(),
                "--size".as_ref(),
                "32".as_ref(),
                "--steps".as_ref(),
                "1".as_ref(),
            ]),
        ),
    ] {
        assert!(!out.status.success(), "{what} ran on cuda:0 without CUDA");
        assert!(stderr(&out).contains(why), "{what}: {}", stderr(&out));
        assert!(!tmp.path().join("model").exists(), "{what} wrote a model");
    }
    // --device overrides the configured one.
    let out = with_config(&[
        "bench".as_ref(),
        "--train".as_ref(),
        "tiny".as_ref(),
        "--size".as_ref(),
        "32".as_ref(),
        "--batch".as_ref(),
        "2".as_ref(),
        "--steps".as_ref(),
        "1".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    assert_eq!(report["device"], "cpu", "{report}");
    assert!(
        report["cases_per_second"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    let out = with_config(&[
        "bench".as_ref(),
        "--train".as_ref(),
        "tiny".as_ref(),
        "--device".as_ref(),
        "gpu".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("device \"gpu\""), "{}", stderr(&out));
}
