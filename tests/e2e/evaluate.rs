//! `oxbox evaluate` on a synthetic cohort: the report's AUCs agree with
//! scikit-learn's `roc_auc_score` computed on the same scores, in a
//! separate process; the charts are real PNG and SVG files.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::{QUICK_IMAGE_SIDE, repo_root, run, stderr};

/// The Python with scikit-learn (`scripts/setup.sh --tests` makes it).
fn python() -> PathBuf {
    let path = std::env::var_os("OXBOX_EVAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/py-eval/bin/python"));
    assert!(
        path.is_file(),
        "{} missing: run scripts/setup.sh --tests (scripts/test.sh does)",
        path.display()
    );
    path
}

const CHECK: &str = r#"
import csv, json, sys
from sklearn.metrics import roc_auc_score
report = json.load(open(sys.argv[1] + "/report.json"))
rows = list(csv.DictReader(open(sys.argv[1] + "/scores.csv")))
outputs = [("24h", "p_o2_any", 1), ("24h", "p_o2_high_flow_or_niv", 2), ("24h", "p_ventilation_or_death", 3),
           ("72h", "p_o2_any", 1), ("72h", "p_o2_high_flow_or_niv", 2), ("72h", "p_ventilation_or_death", 3)]
checked = 0
for group in report["groups"]:
    cases = rows if group["group"] == "pooled" else [r for r in rows if r["site"] == group["group"]]
    assert len(cases) == group["cases"], (group["group"], len(cases), group["cases"])
    for (h, name, k), ours in zip(outputs, group["outputs"]):
        assert (ours["horizon"], ours["output"]) == (h, name)
        y = [int(r["level_" + h]) >= k for r in cases]
        s = [float(r[name + "_" + h]) for r in cases]
        if len(set(y)) < 2:
            assert ours["auc"] is None, (group["group"], h, name)
            continue
        theirs = roc_auc_score(y, s)
        assert abs(theirs - ours["auc"]["auc"]) < 1e-9, (group["group"], h, name, theirs, ours["auc"]["auc"])
        assert ours["auc"]["ci_low"] <= ours["auc"]["auc"] <= ours["auc"]["ci_high"]
        checked += 1
print(checked)
"#;

/// `oxbox synth` of two sites into `dir/cohort`; the cohort's folder.
fn synth_two_sites(dir: &Path, cases_per_site: &str, seed: &str) -> PathBuf {
    let cohort = dir.join("cohort");
    let synth = run(&[
        "synth".as_ref(),
        "--sites".as_ref(),
        "2".as_ref(),
        "--cases-per-site".as_ref(),
        cases_per_site.as_ref(),
        "--seed".as_ref(),
        seed.as_ref(),
        "--max-image-side".as_ref(),
        QUICK_IMAGE_SIDE.as_ref(),
        "--out".as_ref(),
        cohort.as_os_str(),
    ]);
    assert!(synth.status.success(), "{}", stderr(&synth));
    cohort
}

/// An untrained `tiny` model package of input side `size` in `dir/model`.
fn init_tiny_model(dir: &Path, size: &str) -> PathBuf {
    let model = dir.join("model");
    let init = run(&[
        "model".as_ref(),
        "init".as_ref(),
        "--out".as_ref(),
        model.as_os_str(),
        "--backbone".as_ref(),
        "tiny".as_ref(),
        "--input-size".as_ref(),
        size.as_ref(),
    ]);
    assert!(init.status.success(), "{}", stderr(&init));
    model
}

/// `oxbox evaluate` of `model` on both sites of `cohort` into `dir/report`,
/// through the packed plugins; the command's output and the report folder.
fn evaluate(dir: &Path, model: &Path, cohort: &Path) -> (std::process::Output, PathBuf) {
    let report_dir = dir.join("report");
    let data = format!(
        "{},{}",
        cohort.join("site-1").display(),
        cohort.join("site-2").display()
    );
    let plugins = repo_root().join("plugins/dist");
    let out = run(&[
        "evaluate".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--data".as_ref(),
        data.as_ref(),
        "--plugins-dir".as_ref(),
        plugins.as_os_str(),
        "--out".as_ref(),
        report_dir.as_os_str(),
    ]);
    (out, report_dir)
}

#[test]
fn report_aucs_match_scikit_learn_and_charts_are_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cohort = synth_two_sites(tmp.path(), "30", "3");
    let model = init_tiny_model(tmp.path(), "64");
    let (out, report_dir) = evaluate(tmp.path(), &model, &cohort);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(
        &std::fs::read(report_dir.join("report.json")).expect("report.json"),
    )
    .expect("JSON");
    let groups = report["groups"].as_array().expect("groups");
    assert_eq!(
        groups
            .iter()
            .map(|g| g["group"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["site-1", "site-2", "pooled"]
    );
    for g in groups {
        assert_eq!(g["refused"].as_array().map(Vec::len), Some(0), "{g}");
    }

    let check = Command::new(python())
        .args(["-c", CHECK, report_dir.to_str().expect("utf-8 path")])
        .output()
        .expect("run python");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let checked: usize = String::from_utf8_lossy(&check.stdout)
        .trim()
        .parse()
        .expect("count");
    assert!(checked >= 6, "only {checked} AUCs could be compared");

    for group in ["site-1", "site-2", "pooled"] {
        for chart in ["roc", "reliability"] {
            for horizon in ["24h", "72h"] {
                let png = std::fs::read(report_dir.join(format!("{chart}-{group}-{horizon}.png")))
                    .expect("png");
                assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
                let svg = std::fs::read_to_string(
                    report_dir.join(format!("{chart}-{group}-{horizon}.svg")),
                )
                .expect("svg");
                assert!(
                    svg.contains("<svg") && svg.contains("AUC") == (chart == "roc"),
                    "{chart}"
                );
            }
        }
    }
    let md = std::fs::read_to_string(report_dir.join("report.md")).expect("report.md");
    assert!(md.contains("| 24h | p_o2_any |"), "{md}");
    // No identifier from the cohort's exports in any report file.
    let cases = std::fs::read_to_string(cohort.join("site-2/cases.csv")).expect("cases");
    let name = cases
        .lines()
        .nth(1)
        .and_then(|l| l.split(',').find(|f| f.starts_with("FAKE^")))
        .expect("a fake name")
        .to_owned();
    for entry in std::fs::read_dir(&report_dir).expect("dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&name),
            "identifier in the report"
        );
    }
}

/// A refused case is reported by case id, category and field: the value
/// that made a site plugin refuse it (quoted in the plugin's own message)
/// appears in no report or training summary.
#[test]
fn refusals_in_reports_name_the_field_never_the_value() {
    const LEAK: &str = "PHI-LEAK-4711";
    let tmp = tempfile::tempdir().expect("tempdir");
    let cohort = synth_two_sites(tmp.path(), "24", "5");
    // Site 2 exports in the example site's convention: put a value its
    // plugin refuses, and quotes, into the first case's temperature.
    let csv_path = cohort.join("site-2/cases.csv");
    let csv = std::fs::read_to_string(&csv_path).expect("cases.csv");
    let mut lines: Vec<String> = csv.lines().map(str::to_owned).collect();
    let column = lines[0]
        .split(',')
        .position(|c| c == "TEMP_F")
        .expect("TEMP_F column");
    let mut cells: Vec<String> = lines[1].split(',').map(str::to_owned).collect();
    cells[column] = LEAK.to_owned();
    lines[1] = cells.join(",");
    std::fs::write(&csv_path, lines.join("\n") + "\n").expect("write cases.csv");

    let model = init_tiny_model(tmp.path(), "48");
    let (out, report_dir) = evaluate(tmp.path(), &model, &cohort);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(
        &std::fs::read(report_dir.join("report.json")).expect("report.json"),
    )
    .expect("JSON");
    let site2 = report["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == "site-2"))
        .expect("site-2 group");
    let refused = site2["refused"].as_array().expect("refused list");
    assert_eq!(refused.len(), 1, "{site2}");
    let reason = refused[0].as_str().expect("text");
    assert!(reason.contains("(field TEMP_F)"), "{reason}");

    let data = format!(
        "{},{}",
        cohort.join("site-1").display(),
        cohort.join("site-2").display()
    );
    let plugins = repo_root().join("plugins/dist");
    let trained = tmp.path().join("trained");
    let train = run(&[
        "train".as_ref(),
        "--data".as_ref(),
        data.as_ref(),
        "--out".as_ref(),
        trained.as_os_str(),
        "--plugins-dir".as_ref(),
        plugins.as_os_str(),
        "--backbone".as_ref(),
        "tiny".as_ref(),
        "--input-size".as_ref(),
        "48".as_ref(),
        "--epochs".as_ref(),
        "1".as_ref(),
    ]);
    assert!(train.status.success(), "{}", stderr(&train));
    let summary = std::fs::read_to_string(trained.join("training.json")).expect("training.json");
    assert!(summary.contains("(field TEMP_F)"), "{summary}");

    for dir in [&report_dir, &trained] {
        for entry in std::fs::read_dir(dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                let bytes = std::fs::read(&path).expect("read");
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(LEAK),
                    "the refused value is in {}",
                    path.display()
                );
            }
        }
    }
    for output in [&out, &train] {
        assert!(!stderr(output).contains(LEAK), "{}", stderr(output));
    }
}

/// `oxbox synth` then `oxbox evaluate` run from a working directory outside
/// the repository, with relative paths and no `--plugins-dir`: each site's
/// plugin is found by name (here in the checkout's `plugins/dist`, above the
/// executable), never relative to the working directory. A configured
/// `[[plugins]]` entry of that name comes first: a broken copy of it under
/// another folder name is the one loaded, and named in the error.
#[test]
fn synth_then_evaluate_run_from_any_working_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&work).expect("mkdir");
    let in_work = |args: &[&str]| {
        let out = crate::util::oxbox_command()
            .current_dir(&work)
            .args(args)
            .output()
            .expect("run oxbox");
        (out.status.success(), stderr(&out))
    };
    let synth = in_work(&[
        "synth",
        "--sites",
        "2",
        "--cases-per-site",
        "6",
        "--seed",
        "4",
        "--max-image-side",
        QUICK_IMAGE_SIDE,
        "--out",
        "cohort",
    ]);
    assert!(synth.0, "{}", synth.1);
    let init = in_work(&[
        "model",
        "init",
        "--out",
        "model",
        "--backbone",
        "tiny",
        "--input-size",
        "32",
    ]);
    assert!(init.0, "{}", init.1);
    let evaluate = |extra: &[&str], out: &str| {
        let mut args = vec![
            "evaluate",
            "--model",
            "model",
            "--data",
            "cohort/site-1,cohort/site-2",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        in_work(&args)
    };
    let (ok, err) = evaluate(&[], "report");
    assert!(ok, "{err}");
    let report: Value = serde_json::from_slice(
        &std::fs::read(work.join("report/report.json")).expect("report.json"),
    )
    .expect("JSON");
    let cases: Vec<u64> = report["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g["cases"].as_u64().unwrap_or(0))
        .collect();
    assert!(cases.len() == 3 && cases[2] > 0, "{report}");

    // The box's configured plugin of that name wins over the installation's.
    let copy = tmp.path().join("conf/renamed");
    std::fs::create_dir_all(&copy).expect("mkdir");
    let dist = repo_root().join("plugins/dist/example-site");
    std::fs::copy(
        dist.join("example-site.wasm"),
        copy.join("example-site.wasm"),
    )
    .expect("copy");
    let manifest = std::fs::read_to_string(dist.join("plugin.toml")).expect("plugin.toml");
    let broken: String = manifest
        .lines()
        .map(|l| {
            if l.starts_with("sha256") {
                format!("sha256 = \"{}\"", "0".repeat(64))
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(copy.join("plugin.toml"), broken + "\n").expect("write");
    std::fs::write(
        tmp.path().join("conf/box.toml"),
        "[site]\nid = \"box\"\nname = \"box\"\n[storage]\ndata_dir = \"data\"\n\
         [[plugins]]\npath = \"renamed/plugin.toml\"\n",
    )
    .expect("config");
    let config = tmp.path().join("conf/box.toml");
    let (ok, err) = evaluate(
        &["--config", config.to_str().expect("utf-8")],
        "report-configured",
    );
    assert!(!ok, "a broken configured plugin must be the one loaded");
    assert!(
        err.contains("renamed/plugin.toml") && err.contains("site-2"),
        "{err}"
    );
}
