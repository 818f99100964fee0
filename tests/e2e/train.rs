//! `oxbox train` on a small synthetic cohort, through the sites' plugins:
//! it learns (the trained model ranks its cases far better than chance),
//! it is deterministic for a seed, `--resume` after an interruption gives
//! exactly the weights of an uninterrupted run, and it refuses what it
//! cannot do with a clear message.

use std::ffi::OsStr;
use std::path::Path;

use serde_json::Value;

use crate::util::{QUICK_IMAGE_SIDE, repo_root, run, stderr};

fn train(cohort: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let data = format!(
        "{},{}",
        cohort.join("site-1").display(),
        cohort.join("site-2").display()
    );
    let plugins = repo_root().join("plugins/dist");
    let mut args: Vec<&OsStr> = vec![
        "train".as_ref(),
        "--data".as_ref(),
        data.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--plugins-dir".as_ref(),
        plugins.as_os_str(),
        "--backbone".as_ref(),
        "tiny".as_ref(),
        "--input-size".as_ref(),
        "48".as_ref(),
        "--batch-size".as_ref(),
        "16".as_ref(),
        "--learning-rate".as_ref(),
        "0.01".as_ref(),
        "--patience".as_ref(),
        "20".as_ref(),
        "--seed".as_ref(),
        "11".as_ref(),
    ];
    args.extend(extra.iter().map(|a| OsStr::new(*a)));
    run(&args)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

/// AUC of `scores` for `labels` (Mann–Whitney, ties half).
fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (i, &p) in scores.iter().enumerate() {
        for (j, &n) in scores.iter().enumerate() {
            if labels[i] && !labels[j] {
                pairs += 1.0;
                wins += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    wins / pairs
}

#[test]
fn train_learns_is_deterministic_and_resumes_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cohort = tmp.path().join("cohort");
    let synth = run(&[
        "synth".as_ref(),
        "--sites".as_ref(),
        "2".as_ref(),
        "--cases-per-site".as_ref(),
        "60".as_ref(),
        "--seed".as_ref(),
        "9".as_ref(),
        "--max-image-side".as_ref(),
        QUICK_IMAGE_SIDE.as_ref(),
        "--out".as_ref(),
        cohort.as_os_str(),
    ]);
    assert!(synth.status.success(), "{}", stderr(&synth));

    // A straight run of 4 epochs.
    let straight = tmp.path().join("straight");
    let out = train(&cohort, &straight, &["--epochs", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let summary = json(&straight.join("training.json"));
    assert_eq!(summary["epochs"], 4);
    assert_eq!(summary["history"].as_array().map(Vec::len), Some(4));
    let cases = &summary["cases"];
    assert_eq!(cases["refused"], 0, "{summary}");
    let (train_n, validation_n) = (
        cases["train"].as_u64().expect("train"),
        cases["validation"].as_u64().expect("validation"),
    );
    let site_rows: u64 = ["site-1", "site-2"]
        .iter()
        .map(|s| {
            std::fs::read_to_string(cohort.join(s).join("labels.csv"))
                .expect("labels")
                .lines()
                .count() as u64
                - 1
        })
        .sum();
    assert_eq!(train_n + validation_n, site_rows, "every case in one split");
    assert!(validation_n >= 5, "{summary}");
    assert_eq!(printed["digest"], summary["digest"]);
    let manifest = std::fs::read_to_string(straight.join("model.toml")).expect("model.toml");
    assert!(manifest.contains("trained = true"), "{manifest}");
    assert!(manifest.contains("input_size = 48"), "{manifest}");
    // Normalisation came from the data: CRP is right-skewed, so log.
    assert!(manifest.contains("log = true"), "{manifest}");
    for (h, horizon) in summary["thresholds"]
        .as_array()
        .expect("thresholds")
        .iter()
        .enumerate()
    {
        let t: Vec<f64> = horizon
            .as_array()
            .expect("row")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        assert!(t.windows(2).all(|w| w[0] < w[1]), "horizon {h}: {t:?}");
    }
    // Checkpoints: the initial package, the latest and the best epoch only.
    let checkpoints: Vec<String> = std::fs::read_dir(straight.join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(checkpoints.contains(&"init".to_owned()), "{checkpoints:?}");
    assert!(
        checkpoints.contains(&"epoch-004".to_owned()),
        "{checkpoints:?}"
    );
    assert!(checkpoints.len() <= 3, "{checkpoints:?}");

    // It learned: the trained model, through the same plugins, ranks the
    // training cohort's P(level >= 1 at 24 h) far better than chance.
    let report = tmp.path().join("report");
    let evaluate = run(&[
        "evaluate".as_ref(),
        "--model".as_ref(),
        straight.as_os_str(),
        "--data".as_ref(),
        format!(
            "{},{}",
            cohort.join("site-1").display(),
            cohort.join("site-2").display()
        )
        .as_ref(),
        "--plugins-dir".as_ref(),
        repo_root().join("plugins/dist").as_os_str(),
        "--out".as_ref(),
        report.as_os_str(),
    ]);
    assert!(evaluate.status.success(), "{}", stderr(&evaluate));
    let scores = std::fs::read_to_string(report.join("scores.csv")).expect("scores");
    let mut header = scores.lines().next().expect("header").split(',');
    let column = header
        .position(|c| c == "p_o2_any_24h")
        .expect("p_o2_any_24h column");
    let (mut s, mut y) = (Vec::new(), Vec::new());
    for line in scores.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        s.push(fields[column].parse::<f64>().expect("score"));
        y.push(fields[2].parse::<u8>().expect("level") >= 1);
    }
    let trained_auc = auc(&s, &y);
    assert!(trained_auc > 0.8, "AUC {trained_auc}");

    // Same seed, same weights.
    let again = tmp.path().join("again");
    let out = train(&cohort, &again, &["--epochs", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&again.join("training.json"))["digest"],
        summary["digest"]
    );

    // Interrupted after 2 epochs, resumed to 4: the same weights.
    let resumed = tmp.path().join("resumed");
    let out = train(&cohort, &resumed, &["--epochs", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = train(&cohort, &resumed, &["--epochs", "4", "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let resumed_summary = json(&resumed.join("training.json"));
    let losses = |s: &Value| -> Vec<(Value, Value)> {
        s["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|e| (e["train_loss"].clone(), e["validation_loss"].clone()))
            .collect()
    };
    assert_eq!(losses(&resumed_summary), losses(&summary));
    assert_eq!(resumed_summary["digest"], summary["digest"]);

    // Refusals, each with its reason and exit status 2.
    let refused = train(&cohort, &straight, &["--epochs", "1"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--resume"),
        "{}",
        stderr(&refused)
    );
    let other = train(
        &cohort,
        &resumed,
        &["--epochs", "5", "--resume", "--class-weighting", "balanced"],
    );
    assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
    assert!(
        stderr(&other).contains("cannot resume"),
        "{}",
        stderr(&other)
    );
    let nothing = train(&cohort, &tmp.path().join("none"), &["--resume"]);
    assert_eq!(nothing.status.code(), Some(2), "{}", stderr(&nothing));

    // No identifier from the exports in anything training wrote.
    let cases_csv = std::fs::read_to_string(cohort.join("site-2/cases.csv")).expect("cases");
    let name = cases_csv
        .lines()
        .nth(1)
        .and_then(|l| l.split(',').find(|f| f.starts_with("FAKE^")))
        .expect("a fake name")
        .to_owned();
    for file in ["training.json", "train-state.json", "model.toml"] {
        let text = std::fs::read_to_string(straight.join(file)).expect("read");
        assert!(!text.contains(&name), "identifier in {file}");
    }
}

/// `oxbox train --emr-only` trains on cases without a radiograph (an empty
/// `image_file`, the images deleted: none is read) and writes an EMR-only
/// package; an image model on the same folders refuses exactly those cases,
/// each by case id, for the missing radiograph.
#[test]
fn emr_only_models_train_on_cases_without_images() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cohort = tmp.path().join("cohort");
    let synth = run(&[
        "synth".as_ref(),
        "--sites".as_ref(),
        "2".as_ref(),
        "--cases-per-site".as_ref(),
        "40".as_ref(),
        "--seed".as_ref(),
        "12".as_ref(),
        "--max-image-side".as_ref(),
        QUICK_IMAGE_SIDE.as_ref(),
        "--out".as_ref(),
        cohort.as_os_str(),
    ]);
    assert!(synth.status.success(), "{}", stderr(&synth));
    // Site 1 without radiographs.
    let csv_path = cohort.join("site-1/cases.csv");
    let csv = std::fs::read_to_string(&csv_path).expect("cases.csv");
    let mut lines: Vec<String> = csv.lines().map(str::to_owned).collect();
    assert!(lines[0].starts_with("case_id,image_file,"), "{}", lines[0]);
    for line in lines.iter_mut().skip(1) {
        let mut cells: Vec<&str> = line.split(',').collect();
        cells[1] = "";
        *line = cells.join(",");
    }
    let imageless = lines.len() - 1;
    std::fs::write(&csv_path, lines.join("\n") + "\n").expect("write cases.csv");
    std::fs::remove_dir_all(cohort.join("site-1/images")).expect("remove images");
    let total = imageless
        + std::fs::read_to_string(cohort.join("site-2/cases.csv"))
            .expect("cases.csv")
            .lines()
            .count()
        - 1;

    let emr_only = tmp.path().join("emr-only");
    let out = train(&cohort, &emr_only, &["--emr-only", "--epochs", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = json(&emr_only.join("training.json"));
    let cases = &summary["cases"];
    assert_eq!(cases["refused"], 0, "{summary}");
    assert_eq!(
        cases["train"].as_u64().unwrap_or(0) + cases["validation"].as_u64().unwrap_or(0),
        total as u64,
        "{summary}"
    );
    assert_eq!(summary["history"].as_array().map(Vec::len), Some(2));
    let manifest: toml::Table = std::fs::read_to_string(emr_only.join("model.toml"))
        .expect("model.toml")
        .parse()
        .expect("TOML");
    assert_eq!(
        manifest["architecture"]["emr_only"].as_bool(),
        Some(true),
        "{manifest}"
    );
    let weights = std::fs::read(emr_only.join("weights.safetensors")).expect("weights");
    assert!(
        !String::from_utf8_lossy(&weights[..weights.len().min(64 * 1024)]).contains("image."),
        "an EMR-only package has no image branch"
    );

    let with_images = tmp.path().join("with-images");
    let out = train(&cohort, &with_images, &["--epochs", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = json(&with_images.join("training.json"));
    assert_eq!(summary["cases"]["refused"], imageless as u64, "{summary}");
    let first = summary["refused_examples"][0].as_str().unwrap_or("");
    assert!(first.contains("needs a radiograph"), "{first}");
}
