//! The server's dynamic batching, from outside: concurrent predictions that
//! share a forward pass (ResNet-18, different radiographs and records) get
//! the predictions each gets alone from a server that does not batch; and
//! the opt-in `Server-Timing` header that `oxbox bench --url` breaks its
//! latency down by; `oxbox bench`'s cost per image by batch size.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::serve::{
    Reply, ServerProcess, assert_conforms, multipart, multipart_type, openapi, request,
};
use crate::util::{corpus_file, init_model, repo_root};

/// The stages of `Server-Timing`, in the order the server sends them.
const STAGES: [&str; 9] = [
    "receive",
    "parse",
    "decode",
    "preprocess",
    "plugins",
    "queue",
    "inference",
    "audit",
    "total",
];

/// A config serving `model` with the example site's plugin and `server`
/// lines, its data under `dir`.
fn config(dir: &Path, model: &Path, server: &str) -> PathBuf {
    let plugin = repo_root().join("plugins/dist/example-site/plugin.toml");
    let config = dir.join("oxbox.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"batching\"\nname = \"test\"\n[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\
             [storage]\ndata_dir = \"{}\"\n[model]\npackage = \"{}\"\nthreads = 2\n[[plugins]]\npath = \"{}\"\n",
            dir.join("data").display(),
            model.display(),
            plugin.display()
        ),
    )
    .expect("config");
    config
}

/// Eight different cases: four radiographs (two modalities, three sizes)
/// with records that differ in age and oxygen saturation.
fn cases() -> Vec<Vec<u8>> {
    let record: Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("samples/example-site-record.json")).expect("record"),
    )
    .expect("record JSON");
    let images = [
        repo_root().join("samples/chest-cr-sample.dcm"),
        corpus_file("RG1_UNCR.dcm"),
        corpus_file("RG3_UNCR.dcm"),
        corpus_file("CT_small.dcm"),
    ];
    (0..8)
        .map(|i| {
            let mut emr = record.clone();
            emr["AGE"] = (30 + 7 * i).into();
            emr["O2SAT"] = (84 + i).into();
            let dicom = std::fs::read(&images[i % images.len()]).expect("image");
            let emr = serde_json::to_vec(&emr).expect("emr");
            multipart(&[
                ("dicom", "application/dicom", &dicom),
                ("emr", "application/json", &emr),
            ])
        })
        .collect()
}

fn predict(server: &ServerProcess, body: &[u8]) -> Reply {
    let content_type = multipart_type();
    request(
        server.addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", content_type.as_str())],
        body,
    )
}

/// The eight probabilities of a prediction (two horizons × four outputs).
fn probabilities(reply: &Reply) -> Vec<f64> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    ["24h", "72h"]
        .iter()
        .flat_map(|h| {
            let horizon = body["horizons"][h].clone();
            [
                "p_o2_any",
                "p_o2_high_flow_or_niv",
                "p_ventilation_or_death",
                "exam_score",
            ]
            .map(|k| {
                horizon[k]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{h}.{k}: {body}"))
            })
        })
        .collect()
}

/// A metric's value from the OpenMetrics text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn batched_predictions_equal_unbatched_ones_and_server_timing_is_opt_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    init_model(
        &model,
        &[
            "--backbone",
            "resnet18",
            "--input-size",
            "96",
            "--seed",
            "5",
        ],
    );
    let cases = cases();

    // Not batching, no Server-Timing: each case alone, in turn.
    let alone_dir = dir.path().join("alone");
    std::fs::create_dir(&alone_dir).expect("dir");
    let server = ServerProcess::start(&config(&alone_dir, &model, "batch_max = 1"));
    let alone: Vec<Vec<f64>> = cases
        .iter()
        .map(|body| {
            let reply = predict(&server, body);
            assert_eq!(
                reply.header("server-timing"),
                None,
                "Server-Timing is opt-in"
            );
            probabilities(&reply)
        })
        .collect();
    drop(server);

    // Batching whatever it costs (no calibration): the eight sent at once,
    // a batch waiting up to 1 s (the most the config allows) for more.
    let batched_dir = dir.path().join("batched");
    std::fs::create_dir(&batched_dir).expect("dir");
    let server = ServerProcess::start(&config(
        &batched_dir,
        &model,
        "batch_max = 8\nbatch_max_wait_ms = 1000\nbatch_calibrate = false\nserver_timing = true",
    ));
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|body| scope.spawn(|| predict(&server, body)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let text = String::from_utf8_lossy(&request(server.addr, "GET", "/metrics", &[], b"").body)
        .into_owned();
    let passes = metric(&text, "oxbox_inference_batch_size_count");
    let cases_run = metric(&text, "oxbox_inference_batch_size_sum");
    assert_eq!(cases_run, 8.0, "{text}");
    assert!(
        passes < 8.0,
        "the eight cases ran in {passes} forward passes: no batch formed\n{text}"
    );

    let doc = openapi();
    for (i, (reply, alone)) in replies.iter().zip(&alone).enumerate() {
        assert_conforms(&doc, "POST", "/v1/predict", reply);
        let batched = probabilities(reply);
        for (b, a) in batched.iter().zip(alone) {
            assert!(
                (b - a).abs() <= 1e-5,
                "case {i}: batched {batched:?} vs alone {alone:?}"
            );
        }
        // Server-Timing: every stage, durations only, adding up to at most
        // the total.
        let header = reply.header("server-timing").expect("Server-Timing");
        let stages: Vec<(&str, f64)> = header
            .split(", ")
            .map(|m| {
                let (name, dur) = m.split_once(";dur=").unwrap_or_else(|| panic!("{header}"));
                (name, dur.parse().unwrap_or_else(|_| panic!("{header}")))
            })
            .collect();
        assert_eq!(
            stages.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            STAGES,
            "{header}"
        );
        assert!(stages.iter().all(|(_, ms)| *ms >= 0.0), "{header}");
        let total = stages[8].1;
        let parts: f64 = stages[..8].iter().map(|(_, ms)| ms).sum();
        assert!(parts <= total + 0.01, "{header}");
        assert!(stages[6].1 > 0.0, "inference took no time: {header}");
        let body = reply.json();
        let timings = &body["timings_ms"];
        for (stage, ms) in &stages[1..7] {
            // The header carries 3 decimals, the body the rounded value.
            let in_body = timings[stage].as_f64().unwrap_or(f64::NAN);
            assert!((in_body - ms).abs() <= 0.0005, "{stage}: {body}");
        }
    }
    // In a batch, a case queues while others' forward pass runs, or while
    // the batch waits for more: some case waited.
    assert!(
        replies
            .iter()
            .any(|r| r.json()["timings_ms"]["queue"].as_f64() > Some(0.0)),
        "no case queued"
    );
}

#[test]
fn bench_reports_the_servers_stage_breakdown_and_the_cost_per_image_by_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    init_model(
        &model,
        &["--backbone", "tiny", "--input-size", "64", "--seed", "2"],
    );
    let server = ServerProcess::start(&config(dir.path(), &model, "server_timing = true"));
    let sample = repo_root().join("samples/chest-cr-sample.dcm");
    let record = repo_root().join("samples/example-site-record.json");
    let url = format!("http://{}", server.addr);
    let out = crate::util::run(&[
        "bench".as_ref(),
        "--url".as_ref(),
        url.as_ref(),
        "--dicom".as_ref(),
        sample.as_os_str(),
        "--emr".as_ref(),
        record.as_os_str(),
        "--requests".as_ref(),
        "12".as_ref(),
        "--concurrency".as_ref(),
        "3".as_ref(),
    ]);
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    assert_eq!(report["requests"], 12, "{report}");
    assert_eq!(report["non_200"], 0, "{report}");
    let stages = report["stages"].as_object().expect("stages");
    assert_eq!(
        stages.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut sorted = STAGES.to_vec();
            sorted.sort_unstable();
            sorted
        },
        "{report}"
    );
    for (stage, s) in stages {
        let (p50, p99) = (s["p50_ms"].as_f64(), s["p99_ms"].as_f64());
        assert!(
            p50.is_some_and(|v| v >= 0.0) && p99 >= p50,
            "{stage}: {report}"
        );
    }
    // The server's total is within what the client waited.
    assert!(
        stages["total"]["p50_ms"].as_f64() <= report["p50_ms"].as_f64(),
        "{report}"
    );
    drop(server);

    // The forward pass per image at each batch size.
    let out = crate::util::run(&[
        "bench".as_ref(),
        "--dicom".as_ref(),
        sample.as_os_str(),
        "--model".as_ref(),
        model.as_os_str(),
        "--threads".as_ref(),
        "1".as_ref(),
        "--runs".as_ref(),
        "2".as_ref(),
        "--batch".as_ref(),
        "1,2,4".as_ref(),
    ]);
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    for batch in [1, 2, 4] {
        let key = format!("candle_tiny_b{batch}_threads1_per_case");
        assert!(
            report[&key]["median_ms"].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {report}"
        );
    }
}
