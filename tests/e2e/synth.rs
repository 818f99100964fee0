//! `oxbox synth`: deterministic, every image ingestible, every site's export
//! readable by its plugin, labels consistent, truth written, fake
//! identifiers present (for privacy tests), refusals clean.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{assert_clean_refusal, csv_rows, repo_root, run, site_identifiers, stderr};

fn synth(out: &Path, seed: &str) -> Value {
    let result = run(&[
        "synth".as_ref(),
        "--sites".as_ref(),
        "3".as_ref(),
        "--cases-per-site".as_ref(),
        "5".as_ref(),
        "--seed".as_ref(),
        seed.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    serde_json::from_slice(&result.stdout).expect("summary JSON")
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("prefix").to_path_buf();
                out.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

/// The CSV's rows as (header → value) maps.
#[test]
fn a_small_cohort_is_deterministic_ingestible_and_readable_by_its_plugins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let summary = synth(&a, "5");
    synth(&b, "5");
    let (fa, fb) = (files(&a), files(&b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (path, bytes) in &fa {
        assert!(
            fb[path] == *bytes,
            "{} differs between two runs",
            path.display()
        );
    }
    let other = tmp.path().join("c");
    synth(&other, "6");
    assert_ne!(
        std::fs::read(a.join("site-1/labels.csv")).expect("labels"),
        std::fs::read(other.join("site-1/labels.csv")).expect("labels"),
        "another seed, another cohort"
    );

    let truth: Value =
        serde_json::from_slice(&std::fs::read(a.join("truth.json")).expect("truth")).expect("json");
    assert_eq!(truth["sites"].as_array().map(Vec::len), Some(3));
    let pooled = truth["pooled_bayes_auc"]["24h"]["p_o2_any"]
        .as_f64()
        .expect("pooled AUC");
    assert!((0.7..1.0).contains(&pooled), "pooled Bayes AUC {pooled}");
    assert_eq!(
        summary["cases"],
        truth["sites"].as_array().map_or(0, |s| s
            .iter()
            .map(|x| x["cases"].as_u64().unwrap_or(0))
            .sum::<u64>())
    );

    let mut syntaxes = std::collections::BTreeSet::new();
    let mut photometric = std::collections::BTreeSet::new();
    let mut modalities = std::collections::BTreeSet::new();
    for site in ["site-1", "site-2", "site-3"] {
        let dir = a.join(site);
        let (identifiers, plugin) = site_identifiers(&dir).expect("site.toml");
        let cases = csv_rows(&dir.join("cases.csv"));
        let labels = csv_rows(&dir.join("labels.csv"));
        assert_eq!(cases.len(), labels.len());
        for (case, label) in cases.iter().zip(&labels) {
            assert_eq!(case["case_id"], label["case_id"]);
            let (l24, l72): (u8, u8) = (
                label["o2_level_24h"].parse().expect("level"),
                label["o2_level_72h"].parse().expect("level"),
            );
            assert!(l24 <= 4 && l72 <= 4 && l72 >= l24, "{label:?}");
            // Fake identifiers are there, for privacy tests to look for.
            assert!(
                identifiers.iter().any(|c| case[c].contains("FAKE")),
                "{case:?}"
            );

            // The image is real DICOM the ingest accepts.
            let image = dir.join(&case["image_file"]);
            let info = run(&["dicom".as_ref(), "info".as_ref(), image.as_os_str()]);
            assert!(
                info.status.success(),
                "{}: {}",
                image.display(),
                stderr(&info)
            );
            let info: Value = serde_json::from_slice(&info.stdout).expect("info JSON");
            syntaxes.insert(info["transfer_syntax"].as_str().unwrap_or("").to_owned());
            photometric.insert(
                info["photometric_interpretation"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            );
            modalities.insert(info["modality"].as_str().unwrap_or("").to_owned());
            let side = info["rows"]
                .as_u64()
                .unwrap_or(0)
                .max(info["columns"].as_u64().unwrap_or(0));
            assert!((1024..=3000).contains(&side), "{side}");
            let npy = tmp.path().join("x.npy");
            let pre = run(&[
                "preprocess".as_ref(),
                "--dicom".as_ref(),
                image.as_os_str(),
                "--out".as_ref(),
                npy.as_os_str(),
            ]);
            assert!(
                pre.status.success(),
                "{}: {}",
                image.display(),
                stderr(&pre)
            );

            // The EMR export maps through the site's plugin.
            let mut record = serde_json::Map::new();
            for (column, value) in case {
                if column == "case_id" || column == "image_file" || identifiers.contains(column) {
                    continue;
                }
                let entry = match column.split_once(" [") {
                    Some((name, unit)) => (
                        name.to_owned(),
                        serde_json::json!({"value": value, "unit": unit.trim_end_matches(']')}),
                    ),
                    None => (column.clone(), Value::from(value.clone())),
                };
                record.insert(entry.0, entry.1);
            }
            let record_path = tmp.path().join("record.json");
            std::fs::write(&record_path, Value::Object(record).to_string()).expect("record");
            let manifest = repo_root().join(format!("plugins/dist/{plugin}/plugin.toml"));
            let mapped = run(&[
                "plugin".as_ref(),
                "run".as_ref(),
                manifest.as_os_str(),
                "--emr".as_ref(),
                record_path.as_os_str(),
            ]);
            assert!(
                mapped.status.success(),
                "{site} {}: {}",
                case["case_id"],
                stderr(&mapped)
            );
        }
    }
    for expected in [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.5",
    ] {
        assert!(syntaxes.contains(expected), "{syntaxes:?}");
    }
    assert_eq!(photometric.len(), 2, "{photometric:?}");
    assert_eq!(modalities.len(), 2, "{modalities:?}");

    // An existing, non-empty output folder is refused, not mixed.
    let again = run(&[
        "synth".as_ref(),
        "--sites".as_ref(),
        "1".as_ref(),
        "--cases-per-site".as_ref(),
        "1".as_ref(),
        "--out".as_ref(),
        a.as_os_str(),
    ]);
    let line = assert_clean_refusal(&again, "synth into a used folder");
    assert!(line.contains("not empty"), "{line}");
}

#[test]
fn site_mixes_give_each_site_its_case_mix_under_the_same_label_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let synth_mixed = |out: &Path, mixes: &str| {
        run(&[
            "synth".as_ref(),
            "--site-sizes".as_ref(),
            "200,200,200".as_ref(),
            "--site-mixes".as_ref(),
            mixes.as_ref(),
            "--no-images".as_ref(),
            "--seed".as_ref(),
            "3".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
    };
    let out = tmp.path().join("mixed");
    let result = synth_mixed(&out, "referral,community,vitals-only");
    assert!(result.status.success(), "{}", stderr(&result));
    let truth: Value =
        serde_json::from_slice(&std::fs::read(out.join("truth.json")).expect("truth"))
            .expect("JSON");
    let sites = truth["sites"].as_array().expect("sites");
    let mixes: Vec<&str> = sites
        .iter()
        .filter_map(|s| s["case_mix"].as_str())
        .collect();
    assert_eq!(mixes, ["referral", "community", "vitals-only"]);
    let prevalence = |i: usize| {
        sites[i]["prevalence_o2_any_24h"]
            .as_f64()
            .expect("prevalence")
    };
    assert!(
        prevalence(0) > prevalence(1) + 0.3,
        "the referral centre's patients are sicker: {} vs {}",
        prevalence(0),
        prevalence(1)
    );
    assert!(
        truth["label_model"]
            .as_str()
            .expect("label model")
            .contains("z = s + e")
    );
    // The vitals-only site's export has no lab value, its vitals are there.
    let cases = csv_rows(&out.join("site-3").join("cases.csv"));
    let column = |name: &str| {
        cases
            .iter()
            .filter(|c| c.iter().any(|(k, v)| k.starts_with(name) && !v.is_empty()))
            .count()
    };
    assert_eq!(
        column("crp_mg_l") + column("ldh_u_l") + column("ferritin_ng_ml"),
        0
    );
    assert!(column("spo2_pct") > 150);
    // One mix per site, and only known mixes (the latter refused by the
    // argument parser, with its usage lines).
    let refused = synth_mixed(&tmp.path().join("two"), "referral,community");
    let line = assert_clean_refusal(&refused, "two mixes for three sites");
    assert!(line.contains("one per site"), "{line}");
    let refused = synth_mixed(&tmp.path().join("unknown"), "referral,tertiary,general");
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("one of general, community"),
        "{}",
        stderr(&refused)
    );
    assert!(
        !tmp.path().join("two").join("site-1").exists(),
        "nothing written"
    );
}

#[test]
fn max_image_side_caps_the_radiographs_and_changes_nothing_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let synth_capped = |out: &Path, cap: Option<&str>| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "synth".as_ref(),
            "--sites".as_ref(),
            "2".as_ref(),
            "--cases-per-site".as_ref(),
            "3".as_ref(),
            "--seed".as_ref(),
            "8".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        if let Some(cap) = cap {
            args.push("--max-image-side".as_ref());
            args.push(cap.as_ref());
        }
        run(&args)
    };
    let (full, small) = (tmp.path().join("full"), tmp.path().join("small"));
    let result = synth_capped(&full, None);
    assert!(result.status.success(), "{}", stderr(&result));
    let result = synth_capped(&small, Some("160"));
    assert!(result.status.success(), "{}", stderr(&result));
    let (full_files, small_files) = (files(&full), files(&small));
    assert_eq!(
        full_files.keys().collect::<Vec<_>>(),
        small_files.keys().collect::<Vec<_>>()
    );
    let info = |path: &Path| -> Value {
        let out = run(&["dicom".as_ref(), "info".as_ref(), path.as_os_str()]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("info JSON")
    };
    let mut images = 0;
    for (path, bytes) in &full_files {
        if path.extension().is_some_and(|e| e == "dcm") {
            let (big, capped) = (info(&full.join(path)), info(&small.join(path)));
            let side = |i: &Value, k: &str| -> u64 { i[k].as_u64().expect("rows/columns") };
            let long = side(&capped, "rows").max(side(&capped, "columns"));
            assert_eq!(long, 160, "{}: {capped}", path.display());
            assert!(side(&big, "rows").max(side(&big, "columns")) >= 1024);
            for same in [
                "transfer_syntax",
                "photometric_interpretation",
                "bits_stored",
            ] {
                assert_eq!(big[same], capped[same], "{}: {same}", path.display());
            }
            images += 1;
        } else {
            // The EMR export, the labels, the sites and the truth: the same.
            assert!(small_files[path] == *bytes, "{} differs", path.display());
        }
    }
    assert_eq!(images, 6);
    let refused = synth_capped(&tmp.path().join("tiny"), Some("16"));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--max-image-side"),
        "{}",
        stderr(&refused)
    );
    assert!(!tmp.path().join("tiny").exists(), "nothing written");
}
