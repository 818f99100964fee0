//! `oxbox federate` against the real `oxbox aggregator serve` on loopback
//! (and, for what a real aggregator never sends, a small fake one): a
//! two-site job to the end, global models whose signature or digest do
//! not check out, a site killed mid-training and one killed mid-upload.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use oxbox::federation::client::AggregatorClient;
use oxbox::federation::protocol::{FORMAT, GlobalModelRecord, Phase, RoundTask, TrainingSettings};
use oxbox::federation::signed::SignedDocument;
use oxbox::model::package::PackageBytes;
use oxbox::signing::SigningKey;

use crate::util::{KillOnDrop, QUICK_IMAGE_SIDE, oxbox_command, run, stderr};

/// `oxbox keys generate --out DIR`: (private key file, public key hex).
fn keys(dir: &Path) -> (PathBuf, String) {
    let out = run(&[
        "keys".as_ref(),
        "generate".as_ref(),
        "--out".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("keys JSON");
    (
        PathBuf::from(json["private_key"].as_str().expect("private_key")),
        json["public_key"].as_str().expect("public_key").to_owned(),
    )
}

/// `oxbox synth` of `sites` × `cases` into DIR.
fn cohort(dir: &Path, sites: u32, cases: u32) {
    let out = run(&[
        "synth".as_ref(),
        "--sites".as_ref(),
        sites.to_string().as_ref(),
        "--cases-per-site".as_ref(),
        cases.to_string().as_ref(),
        "--seed".as_ref(),
        "5".as_ref(),
        "--max-image-side".as_ref(),
        QUICK_IMAGE_SIDE.as_ref(),
        "--out".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `oxbox model init` of the tiny backbone at 32 × 32 (~110 k parameters).
fn start_model(dir: &Path) {
    let out = run(&[
        "model".as_ref(),
        "init".as_ref(),
        "--backbone".as_ref(),
        "tiny".as_ref(),
        "--input-size".as_ref(),
        "32".as_ref(),
        "--seed".as_ref(),
        "3".as_ref(),
        "--out".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A job: the aggregator's folder, keys and config, and each site's.
struct Job {
    dir: PathBuf,
    port: u16,
    aggregator_public: String,
    aggregator_key: PathBuf,
    sites: Vec<(String, PathBuf, String)>,
}

impl Job {
    /// Keys for the aggregator and `sites` sites under `dir`.
    fn new(dir: &Path, sites: usize) -> Self {
        let (aggregator_key, aggregator_public) = keys(&dir.join("aggregator-key"));
        let sites = (1..=sites)
            .map(|i| {
                let id = format!("site-{i}");
                let (key, public) = keys(&dir.join(format!("{id}-key")));
                (id, key, public)
            })
            .collect();
        Self {
            dir: dir.to_path_buf(),
            port: free_port(),
            aggregator_public,
            aggregator_key,
            sites,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes the aggregator's config and starts it; waits for /healthz.
    fn start_aggregator(
        &self,
        job: &str,
        rounds: u64,
        statistics: bool,
        epochs: usize,
    ) -> KillOnDrop {
        let mut text = format!(
            "[aggregator]\nlisten = \"127.0.0.1:{}\"\ndata_dir = {:?}\nkey_file = {:?}\n\n\
             [job]\nid = \"{job}\"\nstart_model = {:?}\nrounds = {rounds}\nmin_sites = {}\n\
             max_wait_s = 600\nstatistics = {statistics}\nmin_count = 10\n\n[job.training]\n\
             epochs = {epochs}\nbatch_size = 8\nlearning_rate = 0.001\nproximal_mu = 0.0\n",
            self.port,
            self.dir.join("aggregator").display().to_string(),
            self.aggregator_key.display().to_string(),
            self.dir.join("start").display().to_string(),
            self.sites.len(),
        );
        for (id, _, public) in &self.sites {
            text.push_str(&format!(
                "\n[[sites]]\nid = \"{id}\"\npublic_key = \"{public}\"\n"
            ));
        }
        let config = self.dir.join("aggregator.toml");
        std::fs::write(&config, text).expect("aggregator.toml");
        let child = oxbox_command()
            .args(["aggregator", "serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the aggregator");
        let running = KillOnDrop(child);
        let client =
            AggregatorClient::new(&self.url(), None, Duration::from_secs(5)).expect("client");
        let started = Instant::now();
        while client
            .send(hyper::Method::GET, "/healthz", None, None, 4096)
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the aggregator did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        running
    }

    /// Writes site `i`'s box config (`extra` appended to `[federation]`).
    fn site_config(&self, i: usize, cohort: &Path, extra: &str) -> PathBuf {
        let (id, key, _) = &self.sites[i];
        let dir = self.dir.join(id);
        std::fs::create_dir_all(&dir).expect("site folder");
        let text = format!(
            "[site]\nid = \"{id}\"\nname = \"Site {id}\"\n[storage]\ndata_dir = \"data\"\n\
             [federation]\naggregator_url = \"{}\"\naggregator_key = \"{}\"\nkey_file = {:?}\n\
             data = [{:?}]\npoll_interval_ms = 100\n{extra}\n",
            self.url(),
            self.aggregator_public,
            key.display().to_string(),
            cohort.join(id).display().to_string(),
        );
        let config = dir.join("oxbox.toml");
        std::fs::write(&config, text).expect("oxbox.toml");
        config
    }

    /// `GET /v1/status` of the aggregator.
    fn status(&self) -> serde_json::Value {
        let client =
            AggregatorClient::new(&self.url(), None, Duration::from_secs(10)).expect("client");
        let answer = client
            .send(hyper::Method::GET, "/v1/status", None, None, 1 << 20)
            .expect("status");
        serde_json::from_slice(&answer.body).expect("status JSON")
    }
}

/// `oxbox federate --config C --exit-when-finished`, stderr piped.
fn federate(config: &Path) -> Child {
    oxbox_command()
        .args(["federate", "--exit-when-finished", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start oxbox federate")
}

/// Waits for `child` at most `limit`, killing it after.
fn finish(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || {
        if wait.recv_timeout(limit).is_err() {
            // Our own child, not reaped yet (wait_with_output has not
            // returned).
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = done.send(());
    out
}

/// Reads `child`'s stderr lines until one contains `needle` (then kills
/// it at once, SIGKILL) or it exits; everything read.
fn kill_at(mut child: Child, needle: &str, limit: Duration) -> String {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + limit;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Two sites, a statistics round and two training rounds, each site a
/// separate `oxbox federate` over real HTTP: both finish (exit 0) on the
/// same final model, whose signed record and files the test checks
/// itself against the aggregator's key; both contributed to every round.
#[test]
fn two_sites_finish_a_job_on_a_verified_global_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    cohort(&dir.join("cohort"), 2, 60);
    start_model(&dir.join("start"));
    let job = Job::new(dir, 2);
    let _aggregator = job.start_aggregator("e2e-two-sites", 2, true, 1);
    let configs: Vec<PathBuf> = (0..2)
        .map(|i| job.site_config(i, &dir.join("cohort"), ""))
        .collect();
    let sites: Vec<Child> = configs.iter().map(|c| federate(c)).collect();
    let outputs: Vec<Output> = sites
        .into_iter()
        .map(|s| finish(s, Duration::from_secs(240)))
        .collect();
    let mut finals = Vec::new();
    for out in &outputs {
        assert!(out.status.success(), "{}", stderr(out));
        let log = text(&out.stderr);
        assert!(log.contains("statistics sent"), "{log}");
        assert!(log.contains("round 2: update complete"), "{log}");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
        assert_eq!(summary["final_round"], 2, "{summary}");
        finals.push(summary["final_model"].as_str().expect("digest").to_owned());
    }
    assert_eq!(finals[0], finals[1]);

    // The test checks the final model itself: record signed by the
    // aggregator, files hashing to the digest.
    let status = job.status();
    assert_eq!(status["phase"], "finished", "{status}");
    assert_eq!(
        status["global_model"]["digest"],
        finals[0].as_str(),
        "{status}"
    );
    for site in status["sites"].as_array().expect("sites") {
        assert_eq!(site["last_round_contributed"], 2, "{status}");
        assert_eq!(site["statistics"], true, "{status}");
    }
    let client = AggregatorClient::new(&job.url(), None, Duration::from_secs(30)).expect("client");
    let aggregator_key =
        oxbox::signing::parse_public_key(&job.aggregator_public).expect("public key");
    let record: GlobalModelRecord = client
        .model_record(&finals[0])
        .expect("record")
        .expect("a record")
        .verify(&[aggregator_key], "record")
        .expect("signed by the aggregator");
    assert_eq!(
        (record.round, record.digest.as_str()),
        (2, finals[0].as_str())
    );
    let mut contributors: Vec<&str> = record
        .contributions
        .iter()
        .map(|c| c.site.as_str())
        .collect();
    contributors.sort_unstable();
    assert_eq!(contributors, ["site-1", "site-2"]);
    let package = PackageBytes {
        manifest: client
            .model_file(&finals[0], "model.toml", 1 << 20)
            .expect("model.toml"),
        weights: client
            .model_file(&finals[0], "weights.safetensors", 1 << 30)
            .expect("weights"),
    };
    assert_eq!(package.digest(), finals[0]);
    // The federated normalisation differs from the start model's defaults.
    let start = PackageBytes::read(&dir.join("start")).expect("start model");
    assert_ne!(package.manifest, start.manifest);
}

/// A site killed (SIGKILL) right after epoch 1 of 3 resumes from that
/// epoch's checkpoint (not from epoch 1) and finishes the round.
#[test]
fn a_site_killed_mid_training_resumes_from_its_last_epoch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    cohort(&dir.join("cohort"), 1, 150);
    start_model(&dir.join("start"));
    let job = Job::new(dir, 1);
    let _aggregator = job.start_aggregator("e2e-resume", 1, false, 3);
    let config = job.site_config(0, &dir.join("cohort"), "");
    let first = kill_at(federate(&config), "epoch 1 done", Duration::from_secs(180));
    assert!(first.contains("training epochs 1..=3"), "{first}");
    assert!(first.contains("epoch 1 done"), "{first}");
    assert!(
        !first.contains("update signed"),
        "killed before the update: {first}"
    );

    let out = finish(federate(&config), Duration::from_secs(180));
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        !log.contains("training epochs 1..="),
        "did not start over: {log}"
    );
    assert!(
        log.contains("(resumed from the checkpoint of epoch"),
        "resumed: {log}"
    );
    assert!(log.contains("round 1: update complete"), "{log}");
    let status = job.status();
    assert_eq!(status["phase"], "finished", "{status}");
}

/// A site killed (SIGKILL) after its first shard was stored re-sends the
/// identical manifest and only the shards the aggregator lacks: the
/// aggregator receives every byte of the update exactly once.
#[test]
fn a_site_killed_mid_upload_resends_nothing_the_aggregator_has() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    cohort(&dir.join("cohort"), 1, 60);
    start_model(&dir.join("start"));
    let job = Job::new(dir, 1);
    let _aggregator = job.start_aggregator("e2e-upload", 1, false, 1);
    // 64 KiB shards at 128 KiB/s: several shards, half a second each.
    let config = job.site_config(
        0,
        &dir.join("cohort"),
        "shard_mib = 0.0625\nmax_upload_kib_s = 128",
    );
    let first = kill_at(federate(&config), "shard stored", Duration::from_secs(180));
    let shards: u64 = first
        .lines()
        .find_map(|l| {
            l.split("update signed: ")
                .nth(1)?
                .split(" shard")
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no update line: {first}"));
    assert!(shards >= 4, "{first}");
    assert!(first.contains("(0 already at the aggregator)"), "{first}");

    let out = finish(federate(&config), Duration::from_secs(180));
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("training epochs"), "not retrained: {log}");
    let line = log
        .lines()
        .find(|l| l.contains("manifest accepted"))
        .unwrap_or_else(|| panic!("no upload line: {log}"));
    let already: u64 = line
        .split("bytes (")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(already >= 1 && already < shards, "{line}");
    assert_eq!(
        log.matches("shard stored").count() as u64,
        shards - already,
        "{log}"
    );

    // The aggregator holds the update exactly once: its count is the
    // manifest and each declared shard, once.
    let update = dir.join("site-1/data/federation/e2e-upload/round-1/update");
    let declared: u64 = std::fs::read_dir(&update)
        .expect("update folder")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "shard"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum::<u64>()
        + std::fs::metadata(update.join("manifest.json"))
            .expect("manifest")
            .len();
    let status = job.status();
    let received = &status["sites"][0]["bytes_received"][0];
    assert_eq!(received["round"], 1, "{status}");
    assert_eq!(received["bytes"], declared, "{status}");
    assert_eq!(status["phase"], "finished", "{status}");
}

/// A fake aggregator: answers GETs from a fixed table, 404 otherwise.
fn fake_aggregator(routes: Vec<(String, Vec<u8>, Option<String>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head.split(' ').nth(1).unwrap_or("").to_owned();
            let answer = routes.iter().find(|(p, _, _)| *p == path);
            let (status, body, signature) = match answer {
                Some((_, body, signature)) => ("200 OK", body.clone(), signature.clone()),
                None => ("404 Not Found", b"{}".to_vec(), None),
            };
            let mut response = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            if let Some(line) = signature {
                response.push_str(&format!("oxbox-signature: {line}\r\n"));
            }
            response.push_str("\r\n");
            let _ = stream.write_all(response.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    port
}

/// A global model whose signature or digest does not check out is
/// refused before anything of it is loaded or kept: the site exits 1
/// naming the cause, and its model cache stays empty.
#[test]
fn a_tampered_global_model_is_refused_and_not_loaded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    cohort(&dir.join("cohort"), 1, 20);
    start_model(&dir.join("start"));
    let package = PackageBytes::read(&dir.join("start")).expect("package");
    let digest = package.digest();
    let (aggregator_file, aggregator_public) = keys(&dir.join("aggregator-key"));
    let aggregator = SigningKey::load(&aggregator_file).expect("key");
    let (other_file, _) = keys(&dir.join("other-key"));
    let other = SigningKey::load(&other_file).expect("key");
    let (site_key, _) = keys(&dir.join("site-key"));
    let task = RoundTask {
        format: FORMAT,
        job: "e2e-tampered".to_owned(),
        phase: Phase::Training,
        round: 1,
        rounds: 1,
        global_model: digest.clone(),
        global_round: 0,
        training: TrainingSettings {
            epochs: 1,
            batch_size: 8,
            learning_rate: 0.001,
            proximal_mu: 0.0,
        },
        received: Vec::new(),
    };
    let record = GlobalModelRecord {
        format: FORMAT,
        job: task.job.clone(),
        round: 0,
        digest: digest.clone(),
        previous: None,
        contributions: Vec::new(),
    };
    let signed = |value: &dyn Fn(&SigningKey) -> SignedDocument, key: &SigningKey| {
        let d = value(key);
        let line = d.signature_line();
        (d.body, Some(line))
    };
    let task_by = |key: &SigningKey| SignedDocument::sign(&task, key).expect("sign");
    let record_by = |key: &SigningKey| SignedDocument::sign(&record, key).expect("sign");
    let mut tampered_weights = package.weights.clone();
    let last = tampered_weights.len() - 1;
    tampered_weights[last] ^= 0x01;

    let files = |weights: &[u8]| {
        vec![
            (
                format!("/v1/models/{digest}/model.toml"),
                package.manifest.clone(),
                None,
            ),
            (
                format!("/v1/models/{digest}/weights.safetensors"),
                weights.to_vec(),
                None,
            ),
        ]
    };
    let cases: Vec<(&str, Vec<FakeRoute>, &str)> = vec![
        (
            "weights changed after signing",
            {
                let mut routes = files(&tampered_weights);
                let (body, line) = signed(&task_by, &aggregator);
                routes.push(("/v1/task".to_owned(), body, line));
                let (body, line) = signed(&record_by, &aggregator);
                routes.push((format!("/v1/models/{digest}/record"), body, line));
                routes
            },
            "not to the digest the aggregator signed",
        ),
        (
            "task signed by another key",
            {
                let mut routes = files(&package.weights);
                let (body, line) = signed(&task_by, &other);
                routes.push(("/v1/task".to_owned(), body, line));
                routes
            },
            "refused the round task from the aggregator",
        ),
        (
            "record signed by another key",
            {
                let mut routes = files(&package.weights);
                let (body, line) = signed(&task_by, &aggregator);
                routes.push(("/v1/task".to_owned(), body, line));
                let (body, line) = signed(&record_by, &other);
                routes.push((format!("/v1/models/{digest}/record"), body, line));
                routes
            },
            "refused global model",
        ),
    ];
    for (i, (what, routes, expected)) in cases.into_iter().enumerate() {
        let port = fake_aggregator(routes);
        let site = dir.join(format!("site-{i}"));
        std::fs::create_dir_all(&site).expect("site folder");
        let config = site.join("oxbox.toml");
        std::fs::write(
            &config,
            format!(
                "[site]\nid = \"site-1\"\nname = \"One\"\n[storage]\ndata_dir = \"data\"\n\
                 [federation]\naggregator_url = \"http://127.0.0.1:{port}\"\n\
                 aggregator_key = \"{aggregator_public}\"\nkey_file = {:?}\ndata = [{:?}]\n\
                 poll_interval_ms = 100\nmax_retries = 0\n",
                site_key.display().to_string(),
                dir.join("cohort/site-1").display().to_string(),
            ),
        )
        .expect("config");
        let out = finish(federate(&config), Duration::from_secs(60));
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {log}");
        assert!(log.contains(expected), "{what}: {log}");
        assert!(log.contains("nothing of it was loaded"), "{what}: {log}");
        assert!(!log.contains("training epochs"), "{what}: {log}");
        let cache = site.join("data/federation/e2e-tampered/models");
        assert!(
            !cache.exists()
                || std::fs::read_dir(&cache)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(true),
            "{what}: nothing kept in {}",
            cache.display()
        );
    }
}

/// One route of the fake aggregator: path, body, `Oxbox-Signature` line.
type FakeRoute = (String, Vec<u8>, Option<String>);
