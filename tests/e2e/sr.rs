//! Result SRs (`oxbox predict --sr`): real radiographs through the whole
//! pipeline with the embedded demo model, the SR checked by independent
//! tools: dicom3tools' `dciodvfy` (IOD conformance), dcmtk's `dcmdump` (the
//! values) and `dsrdump` (the content tree).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{corpus_file, oxbox_command, repo_root, stderr};

const RECORD: &str = r#"{"age_years": 64, "spo2_pct": 92, "sex": 1}"#;

struct Case {
    tmp: tempfile::TempDir,
    config: PathBuf,
    record: PathBuf,
}

impl Case {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = tmp.path().join("oxbox.toml");
        std::fs::write(
            &config,
            format!(
                "[site]\nid = \"sr-test\"\nname = \"test\"\n[storage]\ndata_dir = \"{}\"\n",
                tmp.path().join("data").display()
            ),
        )
        .expect("config");
        let record = tmp.path().join("record.json");
        std::fs::write(&record, RECORD).expect("record");
        Self {
            tmp,
            config,
            record,
        }
    }

    /// `oxbox predict --sr`: the report (JSON) and the SR's path.
    fn predict(&self, dicom: &Path, name: &str) -> (serde_json::Value, PathBuf) {
        let sr = self.tmp.path().join(name);
        let out = oxbox_command()
            .arg("--config")
            .arg(&self.config)
            .args(["predict", "--emr"])
            .arg(&self.record)
            .arg("--dicom")
            .arg(dicom)
            .arg("--sr")
            .arg(&sr)
            .output()
            .expect("run oxbox");
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            !stderr(&out).contains("OXBOX^SAMPLE"),
            "no patient name in the log"
        );
        let report = serde_json::from_slice(&out.stdout).expect("JSON report");
        (report, sr)
    }
}

fn tool(name: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} (scripts/setup.sh --tests installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One attribute's value as dcmdump prints it (its first occurrence, UIDs
/// as numbers).
fn dump_value(file: &Path, keyword: &str) -> String {
    let (ok, text) = tool(
        "dcmdump",
        &[
            "-q".as_ref(),
            "-Un".as_ref(),
            "+P".as_ref(),
            keyword.as_ref(),
            file.as_os_str(),
        ],
    );
    assert!(ok, "dcmdump {keyword}: {text}");
    text.lines()
        .next()
        .and_then(|l| l.split_once('[').and_then(|(_, r)| r.split_once(']')))
        .map(|(v, _)| v.to_owned())
        .unwrap_or_default()
}

/// A copy of RG1 relabelled as another SOP class (the SR only reads its
/// identity, patient and study).
fn relabelled(dir: &Path, sop_class: &str, modality: &str, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(corpus_file("RG1_UNCR.dcm"), &path).expect("copy");
    let (ok, text) = tool(
        "dcmodify",
        &[
            "-nb".as_ref(),
            "-m".as_ref(),
            format!("(0008,0016)={sop_class}").as_ref(),
            "-m".as_ref(),
            format!("(0008,0060)={modality}").as_ref(),
            path.as_os_str(),
        ],
    );
    assert!(ok, "dcmodify: {text}");
    path
}

#[test]
fn predict_writes_a_result_sr_that_dciodvfy_dcmdump_and_dsrdump_accept() {
    let case = Case::new();
    let sources = [
        ("cr", corpus_file("RG1_UNCR.dcm")),
        ("cr-j2k", repo_root().join("samples/chest-cr-sample.dcm")),
        (
            "dx",
            relabelled(
                case.tmp.path(),
                "1.2.840.10008.5.1.4.1.1.1.1",
                "DX",
                "rg1-dx.dcm",
            ),
        ),
        (
            "sc",
            relabelled(
                case.tmp.path(),
                "1.2.840.10008.5.1.4.1.1.7",
                "OT",
                "rg1-sc.dcm",
            ),
        ),
    ];
    for (label, source) in &sources {
        let (report, sr) = case.predict(source, &format!("{label}-sr.dcm"));

        // dciodvfy: no error. Warnings are printed for the record.
        let (_, verdict) = tool("dciodvfy", &[sr.as_os_str()]);
        let errors: Vec<&str> = verdict.lines().filter(|l| l.starts_with("Error")).collect();
        assert!(errors.is_empty(), "{label}: dciodvfy errors:\n{verdict}");
        assert!(
            verdict.lines().any(|l| l == "ComprehensiveSR"),
            "{label}: dciodvfy recognised the IOD:\n{verdict}"
        );
        for warning in verdict.lines().filter(|l| l.starts_with("Warning")) {
            eprintln!("{label}: dciodvfy {warning}");
        }

        // dcmdump: the header values.
        assert_eq!(
            dump_value(&sr, "SOPClassUID"),
            "1.2.840.10008.5.1.4.1.1.88.33"
        );
        assert_eq!(dump_value(&sr, "Modality"), "SR");
        assert_eq!(dump_value(&sr, "VerificationFlag"), "UNVERIFIED");
        assert_eq!(dump_value(&sr, "CompletionFlag"), "COMPLETE");
        assert!(dump_value(&sr, "SeriesDescription").contains("NOT FOR DIAGNOSTIC USE"));
        for keyword in [
            "PatientName",
            "PatientID",
            "StudyInstanceUID",
            "AccessionNumber",
        ] {
            assert_eq!(
                dump_value(&sr, keyword),
                dump_value(source, keyword),
                "{label}: {keyword} copied"
            );
        }
        assert_ne!(
            dump_value(&sr, "SeriesInstanceUID"),
            dump_value(source, "SeriesInstanceUID")
        );
        assert_eq!(
            dump_value(&sr, "ReferencedSOPInstanceUID"),
            dump_value(source, "SOPInstanceUID"),
            "{label}: the evidence references the source"
        );
        assert_eq!(
            dump_value(&sr, "ReferencedSOPClassUID"),
            dump_value(source, "SOPClassUID")
        );
        let digest = report["model"]["digest"].as_str().expect("digest");
        let (ok, dump) = tool("dcmdump", &["-q".as_ref(), "+L".as_ref(), sr.as_os_str()]);
        assert!(ok, "{dump}");
        assert!(
            dump.contains(digest),
            "{label}: the model digest is in the SR"
        );
        assert!(dump.contains("99OXBOX"));
        assert!(dump.contains("Processing Equipment"));
        // Pixel Data, Rows, View Position: nothing but patient and study.
        for absent in ["(7fe0,0010)", "(0028,0010)", "(0018,5101)"] {
            assert!(!dump.contains(absent), "{label}: {absent} not copied");
        }

        // dsrdump: the content tree, with the report's values.
        // +Pc: concept name codes; +Pu: referenced instance UIDs. Without
        // -Ee, dsrdump refuses a tree with an invalid content item.
        let (ok, tree) = tool("dsrdump", &["+Pc".as_ref(), "+Pu".as_ref(), sr.as_os_str()]);
        assert!(ok, "{label}: dsrdump: {tree}");
        assert!(tree.contains("Imaging Measurement Report"), "{tree}");
        assert!(tree.contains("Comprehensive SR"), "{tree}");
        let mut nums = 0;
        for (horizon, suffix) in [("24h", "24H"), ("72h", "72H")] {
            for (field, code) in [
                ("p_o2_any", "P-O2-ANY"),
                ("p_o2_high_flow_or_niv", "P-HFNIV"),
                ("p_ventilation_or_death", "P-VENTDEATH"),
                ("exam_score", "EXAM-SCORE"),
            ] {
                let value = report["horizons"][horizon][field].as_f64().expect("value") as f32;
                let code = format!("({code}-{suffix},99OXBOX,");
                let shown = format!("\"{value:.6}\"");
                assert!(
                    tree.lines()
                        .any(|l| l.contains("NUM:") && l.contains(&code) && l.contains(&shown)),
                    "{label}: {code} = {shown} in\n{tree}"
                );
                nums += 1;
            }
        }
        assert_eq!(nums, 8);
        let source_uid = dump_value(source, "SOPInstanceUID");
        assert_eq!(
            tree.lines()
                .filter(
                    |l| l.contains("inferred from IMAGE:(121112,DCM,") && l.contains(&source_uid)
                )
                .count(),
            8,
            "{label}: each value references the image:\n{tree}"
        );
    }
}

#[test]
fn the_same_image_and_model_give_the_same_sr_identity() {
    let case = Case::new();
    let source = corpus_file("RG1_UNCR.dcm");
    let (_, first) = case.predict(&source, "first.dcm");
    let (_, second) = case.predict(&source, "second.dcm");
    for keyword in ["SOPInstanceUID", "SeriesInstanceUID"] {
        let a = dump_value(&first, keyword);
        assert!(a.starts_with("2.25."), "{a}");
        assert_eq!(a, dump_value(&second, keyword), "{keyword}");
    }
    // Another image: another identity.
    let (_, other) = case.predict(
        &repo_root().join("samples/chest-cr-sample.dcm"),
        "other.dcm",
    );
    assert_ne!(
        dump_value(&first, "SOPInstanceUID"),
        dump_value(&other, "SOPInstanceUID")
    );
}

#[test]
fn an_image_without_its_identity_gets_no_sr_and_a_named_cause() {
    let case = Case::new();
    let source = case.tmp.path().join("no-uid.dcm");
    std::fs::copy(corpus_file("RG1_UNCR.dcm"), &source).expect("copy");
    let (ok, text) = tool(
        "dcmodify",
        &[
            "-nb".as_ref(),
            "-ea".as_ref(),
            "(0020,000e)".as_ref(),
            source.as_os_str(),
        ],
    );
    assert!(ok, "dcmodify: {text}");
    let sr = case.tmp.path().join("never.dcm");
    let out = oxbox_command()
        .arg("--config")
        .arg(&case.config)
        .args(["predict", "--emr"])
        .arg(&case.record)
        .arg("--dicom")
        .arg(&source)
        .arg("--sr")
        .arg(&sr)
        .output()
        .expect("run oxbox");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("SeriesInstanceUID (0020,000E)"), "{err}");
    assert!(!sr.exists(), "no SR file");
    let leftovers: Vec<_> = std::fs::read_dir(case.tmp.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
