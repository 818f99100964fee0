//! `oxbox simulate` end to end, CI-sized: a five-site cohort of unequal
//! sites (two with at most 150 cases, EMR only), one command that starts a
//! real aggregator and five site processes on loopback and compares the
//! federated model with local-only and pooled ones. One run (shared by the
//! tests of this module) is checked for
//!
//! - the report: its files, its structure, AUCs with DeLong CIs, bytes per
//!   site per round, the federated mean AUC above the local-only one, and
//!   the bound on its wall time (under 5 minutes);
//! - the privacy guard (issue item 7): every byte each site sent, recorded
//!   by the simulation's proxy, holds no patient name, ID or birth date of
//!   the cohort, and nothing but signed statistics, signed update manifests
//!   and safetensors shards matching their digests; no statistics bucket
//!   is under the minimum count.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aho_corasick::AhoCorasick;
use serde_json::Value;

use crate::util::{csv_rows, repo_root, run, site_identifiers, stderr};

/// Site sizes of the CI cohort: unequal, two of them ≤ 150 cases.
const SITE_SIZES: &str = "300,200,120,80,60";
/// Rounds of the CI run.
const ROUNDS: &str = "5";
/// The bound on the CI-sized simulation.
const CI_BOUND: Duration = Duration::from_secs(300);

/// One simulation shared by the tests: (cohort, report folder, wall time).
struct Simulation {
    cohort: PathBuf,
    out: PathBuf,
    seconds: f64,
}

fn simulation() -> &'static Simulation {
    static RUN: OnceLock<Simulation> = OnceLock::new();
    RUN.get_or_init(|| {
        // Kept for the whole test binary (the tests read it).
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let cohort = dir.join("cohort");
        let synth = run(&[
            "synth".as_ref(),
            "--site-sizes".as_ref(),
            SITE_SIZES.as_ref(),
            "--no-images".as_ref(),
            "--seed".as_ref(),
            "7".as_ref(),
            "--out".as_ref(),
            cohort.as_os_str(),
        ]);
        assert!(synth.status.success(), "{}", stderr(&synth));
        let out = dir.join("report");
        let plugins = repo_root().join("plugins/dist");
        let started = Instant::now();
        let simulate = run(&[
            "simulate".as_ref(),
            "--sites".as_ref(),
            "5".as_ref(),
            "--rounds".as_ref(),
            ROUNDS.as_ref(),
            "--data".as_ref(),
            cohort.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--emr-only".as_ref(),
            "--record".as_ref(),
            "--timeout-s".as_ref(),
            "240".as_ref(),
            "--plugins-dir".as_ref(),
            plugins.as_os_str(),
        ]);
        let seconds = started.elapsed().as_secs_f64();
        assert!(
            simulate.status.success(),
            "oxbox simulate failed:\n{}",
            stderr(&simulate)
        );
        Simulation {
            cohort,
            out,
            seconds,
        }
    })
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

fn model<'a>(report: &'a Value, horizon: &str, name: &str) -> &'a Value {
    report["horizons"]
        .as_array()
        .expect("horizons")
        .iter()
        .find(|h| h["horizon"] == horizon)
        .and_then(|h| {
            h["models"]
                .as_array()
                .expect("models")
                .iter()
                .find(|m| m["model"] == name)
        })
        .unwrap_or_else(|| panic!("no {name} at {horizon}"))
}

#[test]
fn simulate_reports_federated_local_and_pooled_auc_and_federation_beats_local() {
    let sim = simulation();
    assert!(
        sim.seconds < CI_BOUND.as_secs_f64(),
        "the CI-sized simulation took {:.0} s (bound {} s)",
        sim.seconds,
        CI_BOUND.as_secs()
    );
    for file in [
        "report.md",
        "report.json",
        "auc-per-site-24h.png",
        "auc-per-site-24h.svg",
        "auc-per-site-72h.png",
        "auc-summary-24h.png",
        "auc-summary-72h.svg",
        "bytes-per-round.png",
    ] {
        let path = sim.out.join(file);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 500, "{} missing or empty", path.display());
    }
    let report = json(&sim.out.join("report.json"));

    // Five unequal sites, two with at most 150 cases, each with test cases.
    let sites = report["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 5);
    let sizes: Vec<u64> = sites
        .iter()
        .map(|s| s["cases"].as_u64().expect("cases"))
        .collect();
    assert!(
        sizes.iter().filter(|&&c| c <= 150).count() >= 2,
        "{sizes:?}"
    );
    assert!(sizes.windows(2).any(|w| w[0] != w[1]), "{sizes:?}");
    for s in sites {
        let test = s["test_cases"].as_u64().expect("test cases");
        let cases = s["cases"].as_u64().expect("cases");
        assert!(test >= 5 && test < cases / 2, "{s}");
        assert_eq!(s["refused"], 0, "{s}");
    }

    // Both horizons, three models, per-site AUC with a CI around it.
    for horizon in ["24h", "72h"] {
        for name in ["local-only", "federated fedavg", "pooled"] {
            let m = model(&report, horizon, name);
            let per_site = m["per_site"].as_array().expect("per site");
            assert_eq!(per_site.len(), 5, "{name} {horizon}");
            for (site, entry) in sites.iter().zip(per_site) {
                assert_eq!(entry["site"], site["id"]);
                let auc = entry["auc"].as_f64().expect("auc");
                let (lo, hi) = (
                    entry["ci_low"].as_f64().expect("ci"),
                    entry["ci_high"].as_f64().expect("ci"),
                );
                assert!((0.0..=1.0).contains(&auc), "{entry}");
                assert!(lo <= auc && auc <= hi && hi - lo > 0.0, "{entry}");
                let n = entry["positives"].as_u64().unwrap_or(0)
                    + entry["negatives"].as_u64().unwrap_or(0);
                assert_eq!(n, site["test_cases"].as_u64().unwrap_or(0), "{entry}");
            }
            let mean = m["mean_auc"].as_f64().expect("mean");
            let direct = per_site
                .iter()
                .map(|e| e["auc"].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / 5.0;
            assert!((mean - direct).abs() < 1e-9, "{name}: {mean} vs {direct}");
            assert!(m["generalisability"].as_f64().is_some(), "{name}");
            // Each site its own model only for local-only here (an EMR-only
            // model has no batch norm a FedBN site could keep).
            assert_eq!(m["site_specific"], name == "local-only", "{name}");
        }
    }

    // The claim, at 24 h: federation beats local-only training.
    let local = model(&report, "24h", "local-only")["mean_auc"]
        .as_f64()
        .expect("local");
    let federated = model(&report, "24h", "federated fedavg")["mean_auc"]
        .as_f64()
        .expect("federated");
    assert!(
        federated > local,
        "federated mean AUC {federated:.4} not above local-only {local:.4}"
    );

    // Bytes per site per round, for every training round.
    let federation = &report["federations"][0];
    assert_eq!(federation["variant"], "fedavg");
    let bytes = federation["bytes"].as_array().expect("bytes");
    assert_eq!(bytes.len(), 5);
    let rounds: u64 = ROUNDS.parse().expect("rounds");
    for site in bytes {
        let per_round = site["per_round"].as_array().expect("per round");
        for r in 1..=rounds {
            let sent = per_round
                .iter()
                .find(|x| x["round"] == r)
                .and_then(|x| x["bytes"].as_u64());
            assert!(sent.is_some_and(|b| b > 0), "{site}: round {r}");
        }
    }
    // The Markdown report carries the tables and names the charts.
    let md = std::fs::read_to_string(sim.out.join("report.md")).expect("report.md");
    for needle in [
        "| **mean AUC** |",
        "| **generalisability** |",
        "auc-per-site-24h.png",
        "Bytes sent per site per round",
        "federated fedavg",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}");
    }
}

/// The cohort's patient identifiers, read from its files: every value of
/// each site's identifier columns (site.toml), birth dates also in the
/// other spelling (YYYYMMDD and YYYY-MM-DD).
fn identifiers(cohort: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(cohort).expect("cohort") {
        let dir = entry.expect("entry").path();
        let Some((columns, _)) = site_identifiers(&dir) else {
            continue;
        };
        for row in csv_rows(&dir.join("cases.csv")) {
            for column in &columns {
                // The arrival time is the same for everyone: not an identifier.
                if column == "ARRIVAL_TS" {
                    continue;
                }
                let value = row.get(column).expect("column").clone();
                if value.len() < 6 {
                    continue;
                }
                if value.len() == 8 && value.bytes().all(|b| b.is_ascii_digit()) {
                    out.push(format!("{}-{}-{}", &value[..4], &value[4..6], &value[6..]));
                }
                if value.len() == 10 && value.as_bytes()[4] == b'-' {
                    out.push(value.replace('-', ""));
                }
                out.push(value);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Finds any of a cohort's identifiers in recorded bytes, in one pass over
/// them (Aho–Corasick), as whole tokens: a number is not found inside a
/// longer number (a birth date's digits inside a float).
struct IdentifierScan {
    ids: Vec<String>,
    /// Per identifier: all digits (and dashes), so matched as a whole number.
    numeric: Vec<bool>,
    matcher: AhoCorasick,
}

impl IdentifierScan {
    fn new(ids: Vec<String>) -> Self {
        let matcher = AhoCorasick::new(&ids).expect("identifier matcher");
        let numeric = ids
            .iter()
            .map(|id| id.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
            .collect();
        Self {
            ids,
            numeric,
            matcher,
        }
    }

    /// The first identifier found in `hay`, if any.
    fn first_in(&self, hay: &[u8]) -> Option<&str> {
        self.matcher.find_overlapping_iter(hay).find_map(|m| {
            let pattern = m.pattern().as_usize();
            let whole = !self.numeric[pattern]
                || ((m.start() == 0 || !hay[m.start() - 1].is_ascii_digit())
                    && hay.get(m.end()).is_none_or(|b| !b.is_ascii_digit()));
            whole.then_some(self.ids[pattern].as_str())
        })
    }
}

/// One HTTP/1.1 request as a site sent it.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits a connection's recorded bytes into requests (Content-Length or
/// chunked bodies); panics on anything that is not HTTP/1.1.
fn requests(mut raw: &[u8], file: &Path) -> Vec<Request> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = find(raw, b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{}: bytes that are not an HTTP request", file.display()));
        let head = std::str::from_utf8(&raw[..end]).expect("request head is text");
        let mut lines = head.split("\r\n");
        let start: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
        assert!(
            start.len() == 3 && start[2] == "HTTP/1.1",
            "{}: request line {start:?}",
            file.display()
        );
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        raw = &raw[end + 4..];
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let line = find(raw, b"\r\n").expect("chunk size");
                let size = usize::from_str_radix(
                    std::str::from_utf8(&raw[..line])
                        .expect("chunk size")
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .expect("chunk size");
                raw = &raw[line + 2..];
                if size == 0 {
                    let trailer = find(raw, b"\r\n").expect("end of chunks");
                    raw = &raw[trailer + 2..];
                    break;
                }
                body.extend_from_slice(&raw[..size]);
                raw = &raw[size + 2..];
            }
            body
        } else {
            let n: usize = header("content-length").map_or(0, |v| v.parse().expect("length"));
            assert!(raw.len() >= n, "{}: body cut short", file.display());
            let body = raw[..n].to_vec();
            raw = &raw[n..];
            body
        };
        out.push(Request {
            method: start[0].to_owned(),
            path: start[1].to_owned(),
            headers,
            body,
        });
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring_sha256(bytes);
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn ring_sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Whether `bytes` is one safetensors file: an 8-byte little-endian header
/// length, a JSON header of tensors whose offsets tile the data exactly.
fn is_safetensors(bytes: &[u8]) -> bool {
    let Some(head) = bytes.get(..8) else {
        return false;
    };
    let n = u64::from_le_bytes(head.try_into().unwrap_or([0; 8])) as usize;
    let Some(header) = bytes.get(8..8 + n) else {
        return false;
    };
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(header) else {
        return false;
    };
    let data = bytes.len() - 8 - n;
    let mut ends: Vec<(u64, u64)> = map
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| {
            let o = v["data_offsets"].as_array()?;
            Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?))
        })
        .collect();
    ends.sort_unstable();
    let mut at = 0;
    for (start, end) in &ends {
        if *start != at || end < start {
            return false;
        }
        at = *end;
    }
    !ends.is_empty() && at as usize == data
}

#[test]
fn privacy_guard_sites_send_only_signed_statistics_manifests_and_shards_without_identifiers() {
    let sim = simulation();
    let ids = identifiers(&sim.cohort);
    assert!(
        ids.len() > 500,
        "{} identifiers read from the cohort",
        ids.len()
    );
    let scan = IdentifierScan::new(ids);
    // The scan finds what is there: each site's own export holds its
    // patients' identifiers; a number is matched only as a whole token.
    for entry in std::fs::read_dir(&sim.cohort).expect("cohort") {
        let site = entry.expect("entry").path();
        if site_identifiers(&site).is_some() {
            let raw = std::fs::read(site.join("cases.csv")).expect("cases.csv");
            assert!(scan.first_in(&raw).is_some(), "{}", site.display());
        }
    }
    let numeric = IdentifierScan::new(vec!["19640203".into()]);
    assert_eq!(numeric.first_in(b"dob=19640203;"), Some("19640203"));
    assert_eq!(numeric.first_in(b"0.1964020311"), None);
    let sent = sim.out.join("work/fedavg/sent");
    let min_count = 10;
    let (mut statistics, mut manifests, mut shards, mut total) = (0, 0, 0, 0usize);
    let site_dirs: Vec<PathBuf> = std::fs::read_dir(&sent)
        .expect("recorded traffic")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(site_dirs.len(), 5, "one recording per site");
    for site_dir in site_dirs {
        for conn in std::fs::read_dir(&site_dir).expect("connections") {
            let file = conn.expect("entry").path();
            let raw = std::fs::read(&file).expect("recording");
            total += raw.len();
            assert!(
                scan.first_in(&raw).is_none(),
                "{}: a patient identifier of the cohort left the site",
                file.display()
            );
            for request in requests(&raw, &file) {
                let signature = request
                    .headers
                    .iter()
                    .find(|(n, _)| n == "oxbox-signature")
                    .map(|(_, v)| v.clone());
                let signed = signature.as_ref().is_some_and(|s| {
                    let parts: Vec<&str> = s.split(' ').collect();
                    parts.len() == 3 && parts[0] == "ed25519" && parts[2].len() == 128
                });
                match (request.method.as_str(), request.path.as_str()) {
                    ("GET", _) => assert!(request.body.is_empty(), "GET with a body"),
                    ("POST", "/v1/statistics") => {
                        assert!(signed, "unsigned statistics: {signature:?}");
                        let doc: Value =
                            serde_json::from_slice(&request.body).expect("statistics JSON");
                        assert_eq!(doc["min_count"], min_count);
                        for feature in doc["features"].as_array().expect("features") {
                            for bucket in feature["histogram"].as_array().expect("histogram") {
                                let n = bucket.as_u64().expect("count");
                                assert!(n == 0 || n >= min_count, "bucket of {n}: {feature}");
                            }
                            if feature["count"].as_u64().unwrap_or(0) < min_count {
                                assert!(feature["sum"].is_null(), "{feature}");
                            }
                        }
                        statistics += 1;
                    }
                    ("POST", "/v1/updates") => {
                        assert!(signed, "unsigned manifest: {signature:?}");
                        let doc: Value =
                            serde_json::from_slice(&request.body).expect("manifest JSON");
                        assert!(doc["shards"].is_array() && doc["samples"].is_u64(), "{doc}");
                        manifests += 1;
                    }
                    ("PUT", path) if path.starts_with("/v1/shards/") => {
                        let digest = &path["/v1/shards/".len()..];
                        assert_eq!(sha256_hex(&request.body), digest, "shard digest");
                        assert!(is_safetensors(&request.body), "shard is not safetensors");
                        shards += 1;
                    }
                    (method, path) => panic!("a site sent {method} {path}"),
                }
            }
        }
    }
    let rounds: usize = ROUNDS.parse().expect("rounds");
    assert_eq!(statistics, 5, "one statistics document per site");
    assert!(manifests >= 5 * rounds, "{manifests} manifests");
    assert!(shards >= 5 * rounds, "{shards} shards");
    assert!(total > 10_000, "{total} bytes recorded");
}
