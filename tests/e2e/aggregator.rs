//! The federation aggregator (`oxbox aggregator serve`), driven over real
//! HTTP on loopback by sites simulated in the test with the oxbox library
//! (signed manifests, safetensors shards): enrolment and a full round, the
//! statistics round, every refusal of issue item 9 that concerns the
//! aggregator, `kill -9` mid-upload and mid-aggregation, TLS, and
//! `oxbox aggregator status`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oxbox::federation::protocol::{GlobalModelRecord, Phase, RoundTask, UpdateManifest};
use oxbox::federation::signed::SignedDocument;
use oxbox::federation::site::{SystemNormal, UpdateHeader, build_update};
use oxbox::federation::stats::{SiteStatistics, site_statistics};
use oxbox::federation::tensors::{Tensor32, Tensors, from_safetensors};
use oxbox::model::package::{ModelManifest, PackageBytes};
use oxbox::signing::{SigningKey, generate_keypair};
use serde_json::Value;
use tempfile::TempDir;

use crate::util::{init_model, oxbox_command, stderr};

const JOB: &str = "exam-test";

/// A federation set up on disk: the aggregator's key and config, the
/// start model, the sites' keys.
struct Federation {
    dir: TempDir,
    config: PathBuf,
    aggregator_key: [u8; 32],
    sites: Vec<(String, SigningKey)>,
    start: PathBuf,
}

fn key(dir: &Path) -> SigningKey {
    let (private, _) = generate_keypair(dir).expect("generate a key");
    SigningKey::load(&private).expect("load the key")
}

/// Start model shared by every test (a tiny network at a small input
/// size), written once.
fn start_model(dir: &Path) -> PathBuf {
    let out = dir.join("start-model");
    init_model(
        &out,
        &["--backbone", "tiny", "--input-size", "32", "--seed", "7"],
    );
    out
}

impl Federation {
    /// `n` enrolled sites; `aggregator` and `job` are extra lines for
    /// those tables.
    fn new(n: usize, aggregator: &str, job: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let aggregator_key = key(&dir.path().join("aggregator")).public_key();
        let start = start_model(dir.path());
        let mut sites = Vec::new();
        let mut enrolled = String::new();
        for i in 1..=n {
            let id = format!("site-{i}");
            let k = key(&dir.path().join(&id));
            enrolled.push_str(&format!(
                "[[sites]]\nid = \"{id}\"\npublic_key = \"{}\"\n",
                k.public_hex()
            ));
            sites.push((id, k));
        }
        let config = dir.path().join("aggregator.toml");
        let listen = if aggregator.contains("listen") {
            String::new()
        } else {
            "listen = \"127.0.0.1:0\"\n".to_owned()
        };
        std::fs::write(
            &config,
            format!(
                "[aggregator]\n{listen}data_dir = \"state\"\nkey_file = \"aggregator/signing-key.pk8\"\n{aggregator}\n\
                 [job]\nid = \"{JOB}\"\nstart_model = \"start-model\"\n{job}\n\
                 [job.training]\nepochs = 1\nbatch_size = 8\nlearning_rate = 0.001\n\n{enrolled}"
            ),
        )
        .expect("write the config");
        Self {
            dir,
            config,
            aggregator_key,
            sites,
            start,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn start(&self) -> Aggregator {
        Aggregator::start(&self.config, &[])
    }

    fn start_with(&self, env: &[(&str, &str)]) -> Aggregator {
        Aggregator::start(&self.config, env)
    }

    fn site(&self, i: usize) -> &SigningKey {
        &self.sites[i].1
    }

    /// The start model's weights.
    fn global(&self) -> Tensors {
        let bytes = std::fs::read(self.start.join("weights.safetensors")).expect("weights");
        from_safetensors(&bytes, "start").expect("start weights")
    }
}

/// A running `oxbox aggregator serve`.
struct Aggregator {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Aggregator {
    fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let log = config.with_file_name(format!(
            "aggregator-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos()
        ));
        let mut command = oxbox_command();
        command
            .args(["--config".as_ref(), config.as_os_str()])
            .args(["aggregator", "serve"])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn oxbox aggregator serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .or_else(|| line.trim().strip_prefix("listening on https://"))
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .parse()
            .expect("address");
        Self { child, addr, log }
    }

    /// `kill -9`.
    fn kill(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    fn get(&self, path: &str) -> Reply {
        http(self.addr, "GET", path, &[], &[])
    }

    fn status(&self) -> Value {
        let r = self.get("/v1/status");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Polls the status until `done` says so (60 s at most).
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:#}\nlog: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The task, its signature checked against the aggregator's key.
    fn task(&self, aggregator_key: &[u8; 32]) -> RoundTask {
        let r = self.get("/v1/task");
        assert_eq!(r.status, 200, "{}", r.text());
        let line = r.header("oxbox-signature").expect("signed task").to_owned();
        SignedDocument::from_parts(r.body, &line)
            .expect("signature line")
            .verify(&[*aggregator_key], "round task")
            .expect("the task verifies with the aggregator's key")
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reply as the tests see it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: not JSON ({e}): {}", self.status, self.text()))
    }

    /// Asserts a problem of this status and type.
    fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        assert_eq!(
            self.json()["type"],
            format!("urn:oxbox:problem:{slug}"),
            "{}",
            self.text()
        );
    }
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no reply head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// One HTTP/1.1 request with `Connection: close`.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send head");
    // The server may refuse before reading the body; a reset is fine.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw)
}

/// A body sent chunked (no Content-Length): the server learns its size
/// only by reading.
fn http_chunked(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("send head");
    for chunk in body.chunks(4096) {
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|()| stream.write_all(chunk))
            .and_then(|()| stream.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn post_signed(addr: SocketAddr, path: &str, document: &SignedDocument) -> Reply {
    let line = document.signature_line();
    http(
        addr,
        "POST",
        path,
        &[
            ("Oxbox-Signature", &line),
            ("Content-Type", "application/json"),
        ],
        &document.body,
    )
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A deterministic update: every tensor of `global` shifted by small
/// values that depend on `seed`.
fn delta(global: &Tensors, seed: u32) -> Tensors {
    global
        .iter()
        .map(|(name, t)| {
            let values = (0..t.values.len())
                .map(|i| {
                    let x = (i as u32)
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(seed * 97_531);
                    ((x % 2001) as f32 - 1000.0) * 1e-5
                })
                .collect();
            (
                name.clone(),
                Tensor32 {
                    shape: t.shape.clone(),
                    values,
                },
            )
        })
        .collect()
}

/// A site's signed update for `round` against `base`: its manifest and
/// shards (at most 64 KiB each, so a tiny model makes several).
struct Update {
    document: SignedDocument,
    manifest: UpdateManifest,
    shards: Vec<Vec<u8>>,
}

fn update(
    site: &str,
    key: &SigningKey,
    round: u64,
    base: &str,
    samples: u64,
    delta: &Tensors,
) -> Update {
    // The sites' own way to the wire (no filters: no noise is drawn).
    let signed = build_update(
        UpdateHeader {
            job: JOB,
            round,
            site,
            base_model: base,
            samples,
        },
        delta.clone(),
        &[],
        64 * 1024,
        key,
        &mut SystemNormal::new(),
    )
    .expect("build the update");
    Update {
        document: signed.document,
        manifest: signed.manifest,
        shards: signed.shards.into_iter().map(|s| s.bytes).collect(),
    }
}

impl Update {
    fn post(&self, addr: SocketAddr) -> Reply {
        post_signed(addr, "/v1/updates", &self.document)
    }

    fn put(&self, addr: SocketAddr, i: usize) -> Reply {
        http(
            addr,
            "PUT",
            &format!("/v1/shards/{}", self.manifest.shards[i].sha256),
            &[("Content-Type", "application/octet-stream")],
            &self.shards[i],
        )
    }

    /// Manifest then every shard, each accepted.
    fn send(&self, addr: SocketAddr) {
        let r = self.post(addr);
        assert_eq!(r.status, 201, "{}", r.text());
        let missing: Vec<String> =
            serde_json::from_value(r.json()["missing"].clone()).expect("missing");
        assert_eq!(missing.len(), self.shards.len());
        for i in 0..self.shards.len() {
            let r = self.put(addr, i);
            assert!(r.status == 201 || r.status == 200, "{}", r.text());
        }
    }
}

/// The published package `digest`, fetched over HTTP, its digest checked
/// over the bytes fetched, and its signed record.
fn fetch_model(a: &Aggregator, key: &[u8; 32], digest: &str) -> (PackageBytes, GlobalModelRecord) {
    let manifest = a.get(&format!("/v1/models/{digest}/model.toml"));
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    let weights = a.get(&format!("/v1/models/{digest}/weights.safetensors"));
    assert_eq!(weights.status, 200, "{}", weights.text());
    let bytes = PackageBytes {
        manifest: manifest.body,
        weights: weights.body,
    };
    assert_eq!(bytes.digest(), digest, "the files are the digest's bytes");
    let r = a.get(&format!("/v1/models/{digest}/record"));
    assert_eq!(r.status, 200, "{}", r.text());
    let line = r
        .header("oxbox-signature")
        .expect("signed record")
        .to_owned();
    let record: GlobalModelRecord = SignedDocument::from_parts(r.body, &line)
        .expect("line")
        .verify(&[*key], "global model record")
        .expect("the record verifies with the aggregator's key");
    assert_eq!(record.digest, digest);
    (bytes, record)
}

/// global + Σ nᵢ Δᵢ / Σ nᵢ, computed here independently.
fn expected_average(global: &Tensors, updates: &[(&Tensors, u64)]) -> Tensors {
    let total: u64 = updates.iter().map(|(_, n)| n).sum();
    global
        .iter()
        .map(|(name, t)| {
            let values = (0..t.values.len())
                .map(|i| {
                    let sum: f64 = updates
                        .iter()
                        .map(|(d, n)| f64::from(d[name].values[i]) * *n as f64)
                        .sum();
                    (f64::from(t.values[i]) + sum / total as f64) as f32
                })
                .collect();
            (
                name.clone(),
                Tensor32 {
                    shape: t.shape.clone(),
                    values,
                },
            )
        })
        .collect()
}

fn assert_close(got: &Tensors, want: &Tensors) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{name}");
        for (i, (a, b)) in g.values.iter().zip(&w.values).enumerate() {
            assert!((a - b).abs() <= 1e-5, "{name}[{i}]: {a} vs {b}");
        }
    }
}

fn shard_files(f: &Federation) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(f.state().join("shards"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn enrolled_sites_complete_a_round_and_the_global_model_is_their_weighted_average() {
    // A fixed port, so that `aggregator status --config` finds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let f = Federation::new(
        2,
        &format!("listen = \"127.0.0.1:{port}\""),
        "rounds = 2\nmin_sites = 2\nmax_wait_s = 600\nstatistics = false",
    );
    let a = f.start();
    let task = a.task(&f.aggregator_key);
    assert_eq!(
        (task.phase, task.round, task.rounds),
        (Phase::Training, 1, 2)
    );
    assert_eq!(task.job, JOB);
    assert!(task.received.is_empty());
    let start_digest = PackageBytes::read(&f.start).expect("start").digest();
    assert_eq!(task.global_model, start_digest);
    let (start_bytes, start_record) = fetch_model(&a, &f.aggregator_key, &start_digest);
    assert_eq!(start_record.round, 0);
    assert_eq!(start_record.previous, None);
    let global = from_safetensors(&start_bytes.weights, "global").expect("weights");
    assert_eq!(global, f.global());

    let d1 = delta(&global, 1);
    let d2 = delta(&global, 2);
    let u1 = update("site-1", f.site(0), 1, &start_digest, 30, &d1);
    let u2 = update("site-2", f.site(1), 1, &start_digest, 10, &d2);
    assert!(u1.shards.len() >= 2, "a multi-shard update");
    u1.send(a.addr);
    // Resume: the identical manifest again says nothing is missing, and a
    // shard sent again changes nothing.
    let again = u1.post(a.addr);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["missing"], serde_json::json!([]));
    assert_eq!(u1.put(a.addr, 0).status, 200);
    let task = a.task(&f.aggregator_key);
    assert_eq!(task.received, ["site-1"]);
    u2.send(a.addr);

    let s = a.wait_for("round 1 to close", |s| s["round"] == 2);
    let digest = s["global_model"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    assert_eq!(s["global_model"]["round"], 1);
    let (bytes, record) = fetch_model(&a, &f.aggregator_key, &digest);
    assert_eq!(record.round, 1);
    assert_eq!(record.previous.as_deref(), Some(start_digest.as_str()));
    let contributions: Vec<(String, u64)> = record
        .contributions
        .iter()
        .map(|c| (c.site.clone(), c.samples))
        .collect();
    assert_eq!(
        contributions,
        [("site-1".to_owned(), 30), ("site-2".to_owned(), 10)],
        "each site counted once"
    );
    let new = from_safetensors(&bytes.weights, "new global").expect("weights");
    assert_close(&new, &expected_average(&global, &[(&d1, 30), (&d2, 10)]));
    let manifest: ModelManifest =
        toml::from_str(std::str::from_utf8(&bytes.manifest).expect("utf-8")).expect("model.toml");
    assert!(manifest.trained);
    assert!(manifest.version.contains("round-1"), "{}", manifest.version);

    // The status: per site, bytes received in round 1 (manifest + shards)
    // and the last round contributed; the closed round.
    for (i, u) in [&u1, &u2].into_iter().enumerate() {
        let site = &s["sites"][i];
        assert_eq!(site["seen"], true);
        assert_eq!(site["last_round_contributed"], 1);
        let sent = u.document.body.len() + u.shards.iter().map(Vec::len).sum::<usize>();
        assert_eq!(site["bytes_received"][0]["round"], 1);
        assert_eq!(site["bytes_received"][0]["bytes"], sent as u64);
    }
    assert_eq!(s["closed_rounds"][0]["contributions"], 2);
    assert_eq!(s["closed_rounds"][0]["digest"], digest.as_str());
    // Uploads of a closed round are deleted once the new model is committed.
    assert!(shard_files(&f).is_empty(), "{:?}", shard_files(&f));

    // `oxbox aggregator status` prints it, for people and as JSON.
    let out = oxbox_command()
        .args(["--config".as_ref(), f.config.as_os_str()])
        .args(["aggregator", "status"])
        .output()
        .expect("status");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("job {JOB}: training round 2 of 2")),
        "{text}"
    );
    assert!(text.contains(&digest), "{text}");
    assert!(text.contains("site-1") && text.contains("site-2"), "{text}");
    let out = oxbox_command()
        .args(["aggregator", "status", "--json", "--url"])
        .arg(format!("http://{}", a.addr))
        .output()
        .expect("status --json");
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["round"], 2);

    // Round 2 from the new global, then the job is finished.
    let u1 = update("site-1", f.site(0), 2, &digest, 30, &d2);
    let u2 = update("site-2", f.site(1), 2, &digest, 10, &d1);
    u1.send(a.addr);
    u2.send(a.addr);
    let s = a.wait_for("the job to finish", |s| s["phase"] == "finished");
    assert_eq!(s["global_model"]["round"], 2);
    assert_eq!(a.task(&f.aggregator_key).phase, Phase::Finished);
    let metrics = a.get("/metrics").text();
    assert!(
        metrics.contains("oxbox_aggregator_rounds_closed_total 2"),
        "{metrics}"
    );
}

#[test]
fn the_statistics_round_publishes_the_start_model_with_the_federated_normalisation() {
    let f = Federation::new(
        2,
        "",
        "rounds = 1\nmin_sites = 2\nstatistics = true\nmin_count = 10",
    );
    let a = f.start();
    let task = a.task(&f.aggregator_key);
    assert_eq!((task.phase, task.round), (Phase::Statistics, 0));
    let start = PackageBytes::read(&f.start).expect("start");
    let start_manifest = start.package(&f.start).expect("package").manifest;
    let emr = &start_manifest.emr;
    let feature = emr[0].name.clone();
    // Site 1: 40 cases at 60 + i % 10, site 2: 60 cases at 100 + i % 10.
    let cases = |n: usize, base: f64| -> Vec<Vec<(String, Option<f64>)>> {
        (0..n)
            .map(|i| {
                emr.iter()
                    .map(|e| {
                        let v = if e.name == feature {
                            Some(base + (i % 10) as f64)
                        } else {
                            Some((e.min + e.max) / 2.0)
                        };
                        (e.name.clone(), v)
                    })
                    .collect()
            })
            .collect()
    };
    let s1 = site_statistics(JOB, "site-1", emr, &cases(40, 60.0), 10);
    let s2 = site_statistics(JOB, "site-2", emr, &cases(60, 100.0), 10);
    // A document with a bucket under the minimum count is refused.
    let mut leaky = s1.clone();
    leaky.features[0].histogram[0] = 3;
    let r = post_signed(
        a.addr,
        "/v1/statistics",
        &SignedDocument::sign(&leaky, f.site(0)).expect("sign"),
    );
    r.assert_problem(422, "statistics-refused");
    // Statistics are not an update: a manifest now is refused.
    let early = update(
        "site-1",
        f.site(0),
        1,
        &task.global_model,
        5,
        &delta(&f.global(), 1),
    );
    early.post(a.addr).assert_problem(409, "round-not-open");

    let doc1 = SignedDocument::sign(&s1, f.site(0)).expect("sign");
    assert_eq!(post_signed(a.addr, "/v1/statistics", &doc1).status, 201);
    assert_eq!(post_signed(a.addr, "/v1/statistics", &doc1).status, 200);
    let other: SiteStatistics = SiteStatistics {
        min_count: 20,
        ..s1.clone()
    };
    post_signed(
        a.addr,
        "/v1/statistics",
        &SignedDocument::sign(&other, f.site(0)).expect("sign"),
    )
    .assert_problem(409, "conflicting-document");
    let doc2 = SignedDocument::sign(&s2, f.site(1)).expect("sign");
    assert_eq!(post_signed(a.addr, "/v1/statistics", &doc2).status, 201);

    let s = a.wait_for("the statistics round to close", |s| {
        s["phase"] == "training"
    });
    assert_eq!(s["round"], 1);
    assert_eq!(s["global_model"]["round"], 0);
    let digest = s["global_model"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    assert_ne!(digest, start.digest());
    let (bytes, record) = fetch_model(&a, &f.aggregator_key, &digest);
    assert_eq!(record.round, 0);
    assert_eq!(record.previous, Some(start.digest()));
    assert_eq!(record.contributions.len(), 2);
    assert_eq!(bytes.weights, start.weights, "same weights");
    let manifest: ModelManifest =
        toml::from_str(std::str::from_utf8(&bytes.manifest).expect("utf-8")).expect("toml");
    let combined = manifest
        .emr
        .iter()
        .find(|e| e.name == feature)
        .expect("feature");
    assert_eq!(
        manifest.emr,
        oxbox::federation::stats::combine(emr, &[s1, s2]),
        "the manifest carries stats::combine of both sites"
    );
    // The pooled values: 40 around 64.5 and 60 around 104.5.
    let inside = |e: &oxbox::model::package::EmrFeature| e.min <= 60.0 && e.max >= 110.0;
    if !combined.log && inside(combined) {
        assert!((combined.mean - 88.5).abs() < 1.0, "{combined:?}");
    }
    // Statistics after the phase are refused.
    let late = SignedDocument::sign(
        &site_statistics(JOB, "site-1", emr, &cases(30, 50.0), 10),
        f.site(0),
    )
    .expect("sign");
    post_signed(a.addr, "/v1/statistics", &late).assert_problem(409, "round-not-open");
    assert_eq!(s["sites"][0]["statistics"], true);
    assert_eq!(s["sites"][0]["last_round_contributed"], 0);
}

#[test]
fn forged_stale_replayed_oversized_and_tampered_uploads_are_refused_before_anything_is_stored() {
    // Four sites; a round closes as soon as two are complete.
    let f = Federation::new(
        4,
        "max_upload_mib_per_site_round = 1",
        "rounds = 2\nmin_sites = 2\nmax_wait_s = 0\nstatistics = false",
    );
    let a = f.start();
    let base = a.task(&f.aggregator_key).global_model;
    let global = f.global();
    let d = delta(&global, 3);
    let u1 = update("site-1", f.site(0), 1, &base, 20, &d);

    // No signature; a malformed line.
    http(a.addr, "POST", "/v1/updates", &[], &u1.document.body)
        .assert_problem(400, "missing-signature");
    http(
        a.addr,
        "POST",
        "/v1/updates",
        &[("Oxbox-Signature", "ed25519 zz")],
        &u1.document.body,
    )
    .assert_problem(400, "missing-signature");
    // Forged: the body changed after signing (more samples).
    let mut forged = u1.document.clone();
    let text = String::from_utf8(forged.body.clone()).expect("utf-8");
    forged.body = text
        .replace("\"samples\":20", "\"samples\":2000")
        .into_bytes();
    assert_ne!(forged.body, u1.document.body);
    post_signed(a.addr, "/v1/updates", &forged).assert_problem(403, "bad-signature");
    // Signed by an enrolled key, but not site-1's.
    let mis = update("site-1", f.site(1), 1, &base, 20, &d);
    mis.post(a.addr).assert_problem(403, "site-key-mismatch");
    // A key no site has.
    let stranger = key(&f.dir.path().join("stranger"));
    update("site-1", &stranger, 1, &base, 20, &d)
        .post(a.addr)
        .assert_problem(403, "unknown-key");
    // Another job.
    let mut other_job = u1.manifest.clone();
    other_job.job = "another-job".to_owned();
    post_signed(
        a.addr,
        "/v1/updates",
        &SignedDocument::sign(&other_job, f.site(0)).expect("sign"),
    )
    .assert_problem(409, "wrong-job");
    // Against a stale base model.
    update("site-1", f.site(0), 1, &"0".repeat(64), 20, &d)
        .post(a.addr)
        .assert_problem(409, "stale-base-model");
    // For a round that is not open.
    update("site-1", f.site(0), 2, &base, 20, &d)
        .post(a.addr)
        .assert_problem(409, "round-not-open");
    // Declaring more than max_upload_mib_per_site_round (1 MiB).
    let mut big = u1.manifest.clone();
    big.shards[0].bytes = 2 * 1024 * 1024;
    post_signed(
        a.addr,
        "/v1/updates",
        &SignedDocument::sign(&big, f.site(0)).expect("sign"),
    )
    .assert_problem(413, "upload-limit");
    // Not the canonical encoding (signed over pretty JSON).
    let pretty = serde_json::to_vec_pretty(&u1.manifest).expect("json");
    let signature = f.site(0).sign(&pretty);
    let line = format!(
        "ed25519 {} {}",
        f.site(0).public_hex(),
        hex::encode(signature)
    );
    http(
        a.addr,
        "POST",
        "/v1/updates",
        &[("Oxbox-Signature", &line)],
        &pretty,
    )
    .assert_problem(400, "malformed-document");
    // A tensor the global model does not have in that shape.
    let mut wrong = u1.manifest.clone();
    wrong.tensors[0].shape = vec![1, 2, 3];
    post_signed(
        a.addr,
        "/v1/updates",
        &SignedDocument::sign(&wrong, f.site(0)).expect("sign"),
    )
    .assert_problem(400, "malformed-document");
    // A shard no manifest declares.
    http(
        a.addr,
        "PUT",
        &format!("/v1/shards/{}", "a".repeat(64)),
        &[],
        b"bytes",
    )
    .assert_problem(404, "shard-not-declared");
    let s = a.status();
    assert!(
        s["sites"]
            .as_array()
            .expect("sites")
            .iter()
            .all(|x| x["seen"] == false),
        "nothing refused was stored: {s:#}"
    );

    // The genuine manifest is accepted.
    let r = u1.post(a.addr);
    assert_eq!(r.status, 201, "{}", r.text());
    // A different manifest from the same site for the same round.
    update("site-1", f.site(0), 1, &base, 21, &d)
        .post(a.addr)
        .assert_problem(409, "conflicting-document");
    let sha0 = u1.manifest.shards[0].sha256.clone();
    let path = format!("/v1/shards/{sha0}");
    // Tampered bytes.
    let mut tampered = u1.shards[0].clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    http(a.addr, "PUT", &path, &[], &tampered).assert_problem(422, "shard-digest-mismatch");
    // Larger than declared: by Content-Length, and chunked (no length: the
    // server stops reading one byte past the declared size).
    let mut larger = u1.shards[0].clone();
    larger.extend_from_slice(&[0; 1000]);
    http(a.addr, "PUT", &path, &[], &larger).assert_problem(413, "shard-too-large");
    let mut huge = u1.shards[0].clone();
    huge.extend(std::iter::repeat_n(7u8, 8 * 1024 * 1024));
    http_chunked(a.addr, &path, &huge).assert_problem(413, "shard-too-large");
    // Shorter than declared.
    http(a.addr, "PUT", &path, &[], &u1.shards[0][..mid])
        .assert_problem(422, "shard-size-mismatch");
    assert!(
        shard_files(&f).is_empty(),
        "nothing stored: {:?}",
        shard_files(&f)
    );

    // Bytes that hash right but are no shard (site-3 declares them).
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut g = update("site-3", f.site(2), 1, &base, 5, &d).manifest;
    g.shards.truncate(1);
    g.shards[0].sha256 = sha256(&garbage);
    g.shards[0].bytes = garbage.len() as u64;
    let gdoc = SignedDocument::sign(&g, f.site(2)).expect("sign");
    assert_eq!(post_signed(a.addr, "/v1/updates", &gdoc).status, 201);
    http(
        a.addr,
        "PUT",
        &format!("/v1/shards/{}", g.shards[0].sha256),
        &[],
        &garbage,
    )
    .assert_problem(422, "malformed-shard");
    assert!(
        shard_files(&f).is_empty(),
        "nothing stored: {:?}",
        shard_files(&f)
    );

    // An update whose shards would not cover its tensors (site-4 declares
    // every tensor but only the first shard): its last shard is refused.
    let full = update("site-4", f.site(3), 1, &base, 5, &delta(&global, 5));
    let mut partial = full.manifest.clone();
    partial.shards.truncate(1);
    let pdoc = SignedDocument::sign(&partial, f.site(3)).expect("sign");
    assert_eq!(post_signed(a.addr, "/v1/updates", &pdoc).status, 201);
    full.put(a.addr, 0).assert_problem(422, "incomplete-update");
    assert!(
        shard_files(&f).is_empty(),
        "nothing stored: {:?}",
        shard_files(&f)
    );

    // Site 1 and 2 complete round 1.
    for i in 0..u1.shards.len() {
        assert_eq!(u1.put(a.addr, i).status, 201);
    }
    let u2 = update("site-2", f.site(1), 1, &base, 10, &delta(&global, 4));
    u2.send(a.addr);
    let s = a.wait_for("round 1 to close", |s| s["round"] == 2);
    assert_eq!(s["closed_rounds"][0]["contributions"], 2);
    // A replay of last round's upload: the manifest, then a shard.
    u1.post(a.addr).assert_problem(409, "round-not-open");
    u1.put(a.addr, 0).assert_problem(404, "shard-not-declared");
    // An update against the previous global model is stale.
    update("site-3", f.site(2), 2, &base, 5, &d)
        .post(a.addr)
        .assert_problem(409, "stale-base-model");
    let metrics = a.get("/metrics").text();
    for reason in [
        "bad-signature",
        "unknown-key",
        "stale-base-model",
        "shard-too-large",
        "round-not-open",
    ] {
        assert!(
            metrics.contains(&format!(
                "oxbox_aggregator_uploads_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
}

/// Round 1 of a three-site job from the same updates, uninterrupted: the
/// digest of the global model it publishes.
fn reference_weights(updates: impl Fn(&Federation, &str) -> Vec<Update>) -> String {
    let f = Federation::new(3, "", "rounds = 1\nmin_sites = 3\nstatistics = false");
    let a = f.start();
    let base = a.task(&f.aggregator_key).global_model;
    for u in updates(&f, &base) {
        u.send(a.addr);
    }
    let s = a.wait_for("the reference round", |s| s["phase"] == "finished");
    let digest = s["global_model"]["digest"].as_str().expect("digest");
    let (bytes, _) = fetch_model(&a, &f.aggregator_key, digest);
    sha256(&bytes.weights)
}

#[test]
fn kill_9_mid_upload_and_mid_aggregation_loses_nothing_and_counts_nothing_twice() {
    let make = |f: &Federation, base: &str| -> Vec<Update> {
        let global = f.global();
        (0..3)
            .map(|i| {
                update(
                    &format!("site-{}", i + 1),
                    f.site(i),
                    1,
                    base,
                    10 * (i as u64 + 1),
                    &delta(&global, 10 + i as u32),
                )
            })
            .collect()
    };
    // The reference runs under another aggregator key, which the model's
    // [federation] provenance names: its weights must be the same bytes.
    let reference = reference_weights(make);

    let f = Federation::new(3, "", "rounds = 1\nmin_sites = 3\nstatistics = false");
    let slow = [("OXBOX_TEST_AGGREGATION_DELAY_MS", "1500")];
    let a = f.start_with(&slow);
    let base = a.task(&f.aggregator_key).global_model;
    let updates = make(&f, &base);
    updates[0].send(a.addr);
    // Site 2: its manifest and half its shards, then a shard cut off
    // mid-body when the aggregator is killed.
    let u2 = &updates[1];
    assert_eq!(u2.post(a.addr).status, 201);
    let sent = u2.shards.len() / 2;
    assert!(sent >= 1 && sent < u2.shards.len());
    for i in 0..sent {
        assert_eq!(u2.put(a.addr, i).status, 201);
    }
    let mut cut = TcpStream::connect(a.addr).expect("connect");
    write!(
        cut,
        "PUT /v1/shards/{} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        u2.manifest.shards[sent].sha256,
        u2.shards[sent].len()
    )
    .expect("head");
    cut.write_all(&u2.shards[sent][..u2.shards[sent].len() / 2])
        .expect("half a shard");
    std::thread::sleep(Duration::from_millis(200));
    a.kill();
    drop(cut);

    // Restarted: the resumed manifest says exactly what is missing.
    let a = f.start_with(&slow);
    let r = u2.post(a.addr);
    assert_eq!(r.status, 200, "{}", r.text());
    let missing: Vec<String> =
        serde_json::from_value(r.json()["missing"].clone()).expect("missing");
    let expected: Vec<String> = u2.manifest.shards[sent..]
        .iter()
        .map(|s| s.sha256.clone())
        .collect();
    assert_eq!(missing, expected);
    // Site 1 resumes too: nothing missing, and a shard sent again is not
    // counted again.
    let r = updates[0].post(a.addr);
    assert_eq!(
        (r.status, r.json()["missing"].clone()),
        (200, serde_json::json!([]))
    );
    assert_eq!(updates[0].put(a.addr, 0).status, 200);
    for i in sent..u2.shards.len() {
        assert_eq!(u2.put(a.addr, i).status, 201);
    }
    updates[2].send(a.addr);
    // Killed while aggregating.
    a.wait_for("the aggregation to start", |s| s["closing"] == true);
    a.kill();

    let a = f.start();
    let s = a.wait_for("the round to close after the restart", |s| {
        s["phase"] == "finished"
    });
    let digest = s["global_model"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let (package, record) = fetch_model(&a, &f.aggregator_key, &digest);
    assert_eq!(
        sha256(&package.weights),
        reference,
        "the same global weights as the uninterrupted run"
    );
    let manifest: ModelManifest =
        toml::from_str(std::str::from_utf8(&package.manifest).expect("utf-8")).expect("model.toml");
    let provenance = manifest.federation.expect("[federation] provenance");
    assert_eq!(
        (provenance.round, provenance.aggregator),
        (1, hex::encode(f.aggregator_key)),
        "the provenance names the round and this aggregator's key"
    );
    let closed = s["closed_rounds"].as_array().expect("closed rounds");
    assert_eq!(closed.len(), 1, "{s:#}");
    assert_eq!(
        closed[0]["sites"],
        serde_json::json!(["site-1", "site-2", "site-3"])
    );
    let samples: Vec<u64> = record.contributions.iter().map(|c| c.samples).collect();
    assert_eq!(samples, [10, 20, 30], "each site counted once");
    let bytes: BTreeMap<String, u64> = s["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .map(|x| {
            (
                x["id"].as_str().expect("id").to_owned(),
                x["bytes_received"][0]["bytes"].as_u64().expect("bytes"),
            )
        })
        .collect();
    for (i, u) in updates.iter().enumerate() {
        let sent = (u.document.body.len() + u.shards.iter().map(Vec::len).sum::<usize>()) as u64;
        assert_eq!(
            bytes[&format!("site-{}", i + 1)],
            sent,
            "bytes counted once"
        );
    }
}

fn openssl_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/setup.sh --tests installs it)");
    assert!(out.status.success(), "openssl: {}", stderr(&out));
    (cert, key)
}

#[test]
fn the_aggregator_serves_https_with_its_certificate_and_refuses_plain_http_off_loopback() {
    // Plain HTTP on every interface is refused at start.
    let f = Federation::new(1, "listen = \"0.0.0.0:0\"", "rounds = 1\nmin_sites = 1");
    let out = oxbox_command()
        .args(["--config".as_ref(), f.config.as_os_str()])
        .args(["aggregator", "serve"])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("plain HTTP is only allowed on loopback"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "it never listened");

    // With a certificate it serves HTTPS there.
    let (cert, key) = openssl_certificate(f.dir.path(), "aggregator");
    let (other, _) = openssl_certificate(f.dir.path(), "other");
    let text = std::fs::read_to_string(&f.config).expect("config");
    let tls = format!(
        "listen = \"0.0.0.0:0\"\ntls_certificate = \"{}\"\ntls_private_key = \"{}\"",
        cert.display(),
        key.display()
    );
    std::fs::write(&f.config, text.replace("listen = \"0.0.0.0:0\"", &tls)).expect("config");
    let a = f.start();
    let url = format!("https://127.0.0.1:{}", a.addr.port());
    let status = |ca: &Path| {
        oxbox_command()
            .args(["aggregator", "status", "--json", "--url", &url, "--ca"])
            .arg(ca)
            .output()
            .expect("status")
    };
    let out = status(&cert);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["job"], JOB);
    // A client trusting another certificate refuses the connection.
    let out = status(&other);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("TLS"), "{}", stderr(&out));
    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut stream = TcpStream::connect(("127.0.0.1", a.addr.port())).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    assert!(!raw.starts_with(b"HTTP/1.1 200"), "plain HTTP was served");
}
