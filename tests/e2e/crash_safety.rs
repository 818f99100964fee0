//! `kill -9` of the real server in the middle of a model swap, of plugin
//! reloads and of audit writes, then a restart on the same data directory:
//! the state must be consistent (one whole model served, the old or the
//! new one; the plugins load; the audit database opens) and nothing the
//! server answered is lost (every prediction a client got 200 for has its
//! audit record: the record is committed before the response is sent).
//!
//! The aggregator's round is killed mid-upload and mid-aggregation in
//! `aggregator::kill_9_mid_upload_and_mid_aggregation_loses_nothing_and_counts_nothing_twice`;
//! a site killed mid-round in `federate`. The promotion layout's own crash
//! points (a staging folder and a temporary `CURRENT` left behind) are
//! covered here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use oxbox::model::PackageBytes;
use oxbox::model::promote::{CURRENT_FILE, VERSIONS_DIR};

use crate::model_swap::{package, served_setup};
use crate::serve::{ServerProcess, Setup, multipart, multipart_type, request, sample_case};

/// SIGKILL, and the process reaped.
fn kill_9(server: &mut ServerProcess) {
    server.child.kill().expect("SIGKILL");
    server.child.wait().expect("reap");
}

fn predict_body() -> Arc<Vec<u8>> {
    let (dicom, record) = sample_case();
    Arc::new(multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]))
}

/// Clients predicting in a loop until stopped; the request ids of the
/// predictions answered 200, and how many failed otherwise (connection
/// errors once the server is killed are expected and not counted).
struct Clients {
    stop: Arc<AtomicBool>,
    /// Predictions answered 200 so far, all clients together.
    answered: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<(Vec<String>, Vec<String>)>>,
}

impl Clients {
    fn start(addr: std::net::SocketAddr, auth: Option<&str>, n: usize) -> Self {
        let body = predict_body();
        let stop = Arc::new(AtomicBool::new(false));
        let answered_count = Arc::new(AtomicUsize::new(0));
        let threads = (0..n)
            .map(|_| {
                let (stop, count, body, auth) = (
                    Arc::clone(&stop),
                    Arc::clone(&answered_count),
                    Arc::clone(&body),
                    auth.map(str::to_owned),
                );
                std::thread::spawn(move || {
                    let mut answered = Vec::new();
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        // A raw exchange: once the server is killed the
                        // connection breaks, which ends this client.
                        let Some(reply) = try_predict(addr, auth.as_deref(), &body) else {
                            break;
                        };
                        match reply.0 {
                            200 => {
                                answered.push(reply.1);
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            status => failed.push(format!("{status}: {}", reply.1)),
                        }
                    }
                    (answered, failed)
                })
            })
            .collect();
        Self {
            stop,
            answered: answered_count,
            threads,
        }
    }

    /// Predictions answered 200 so far.
    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut answered = Vec::new();
        let mut failed = Vec::new();
        for t in self.threads {
            let (a, f) = t.join().expect("client");
            answered.extend(a);
            failed.extend(f);
        }
        (answered, failed)
    }
}

/// One prediction; `None` when the connection broke (the server died):
/// otherwise the status and, for 200, the request id (else the body).
fn try_predict(
    addr: std::net::SocketAddr,
    auth: Option<&str>,
    body: &[u8],
) -> Option<(u16, String)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut head = format!(
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        multipart_type(),
        body.len()
    );
    if let Some(auth) = auth {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).ok()?;
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    // A whole response: the client has been answered.
    let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
    if status == 200 {
        Some((status, value["request_id"].as_str()?.to_owned()))
    } else {
        Some((status, value.to_string()))
    }
}

/// Every request id in the audit database (opened as the restarted
/// server would).
fn audited_request_ids(data_dir: &Path) -> std::collections::HashSet<String> {
    oxbox::store::AuditLog::open(data_dir)
        .expect("the audit database opens after the kill")
        .tail(1_000_000)
        .expect("the audit records read")
        .into_iter()
        .map(|r| r.request_id)
        .collect()
}

#[test]
fn a_kill_with_predictions_in_flight_loses_no_answered_audit_record() {
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 32");
    let mut server = ServerProcess::start(&setup.config);
    let clients = Clients::start(server.addr, None, 12);
    // Let answers accumulate, then kill with requests in flight (twelve
    // clients, each always waiting on one). Counted where the clients got
    // their answers: an audit record is written before its answer is sent,
    // so 60 records can stand for fewer than 60 answers received.
    let deadline = Instant::now() + Duration::from_secs(120);
    while clients.answered() < 60 {
        assert!(Instant::now() < deadline, "no predictions answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_9(&mut server);
    let (answered, failed) = clients.finish();
    let audited = audited_request_ids(&setup.data_dir());
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !audited.contains(*id))
        .collect();
    println!(
        "killed with 12 clients in flight: {} predictions answered 200, {} audit records, {} answered but not audited, other statuses {failed:?}",
        answered.len(),
        audited.len(),
        lost.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(answered.len() >= 60);
    assert!(
        lost.is_empty(),
        "answered 200 without an audit record: {lost:?}"
    );

    // The restarted server opens the same database and goes on.
    let server = ServerProcess::start(&setup.config);
    let (status, id) = try_predict(server.addr, None, &predict_body()).expect("a reply");
    assert_eq!(status, 200, "{id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !audited_request_ids(&setup.data_dir()).contains(&id) {
        assert!(
            Instant::now() < deadline,
            "the new prediction was not audited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The model `served` (a promotion layout) points at, from its `CURRENT`.
fn current(served: &Path) -> String {
    std::fs::read_to_string(served.join(CURRENT_FILE))
        .expect("CURRENT")
        .trim()
        .to_owned()
}

fn served_model(server: &ServerProcess, auth: &str) -> String {
    let reply = request(
        server.addr,
        "GET",
        "/v1/model",
        &[("Authorization", auth)],
        b"",
    );
    assert_eq!(reply.status, 200);
    reply.json()["model"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned()
}

/// After a restart: ready, the served model is the one `CURRENT` names and
/// one of `known`, whole (a prediction is answered by it).
fn assert_consistent_model(server: &ServerProcess, auth: &str, served: &Path, known: &[String]) {
    assert_eq!(
        request(server.addr, "GET", "/v1/ready", &[], b"").status,
        200
    );
    let digest = served_model(server, auth);
    assert_eq!(digest, current(served));
    assert!(known.contains(&digest), "{digest} is none of {known:?}");
    let body = predict_body();
    let reply = request(
        server.addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", &multipart_type()), ("Authorization", auth)],
        &body,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["model"]["digest"], digest.as_str());
}

#[test]
fn a_kill_during_model_swaps_leaves_one_whole_model_served() {
    let work = tempfile::tempdir().expect("tempdir");
    let first = package(work.path(), 30, None);
    let (setup, served, auth) = served_setup(&first);
    let config = std::fs::read_to_string(&setup.config).expect("config");
    std::fs::write(
        &setup.config,
        config.replace("reload_min_interval_s = 30", "reload_min_interval_s = 0"),
    )
    .expect("config");
    let mut known = vec![first.digest()];
    let mut server = ServerProcess::start(&setup.config);

    // Each round: a new model promoted, a reload asked for while clients
    // predict, and the server killed a few milliseconds into it (a
    // different point each round).
    for (round, delay_ms) in [0u64, 3, 10, 25, 60].into_iter().enumerate() {
        let next: PackageBytes = package(work.path(), 31 + round as u64, Some(round as u64 + 1));
        oxbox::model::promote(&next, &served).expect("promote");
        known.push(next.digest());
        let clients = Clients::start(server.addr, Some(&auth), 4);
        std::thread::sleep(Duration::from_millis(100));
        let reloader = {
            let (addr, auth) = (server.addr, auth.clone());
            std::thread::spawn(move || {
                // Broken by the kill, or answered: either is fine.
                let _ = std::panic::catch_unwind(|| {
                    request(
                        addr,
                        "POST",
                        "/v1/admin/model/reload",
                        &[("Authorization", &auth)],
                        b"",
                    )
                });
            })
        };
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill_9(&mut server);
        let _ = reloader.join();
        let (_, failed) = clients.finish();
        assert!(failed.is_empty(), "{failed:?}");

        server = ServerProcess::start(&setup.config);
        assert_consistent_model(&server, &auth, &served, &known);
        println!(
            "round {round}: killed {delay_ms} ms into a reload; restarted serving {}",
            current(&served)
        );
    }

    // A promotion killed before its rename leaves a staging folder and
    // possibly a temporary CURRENT beside the real one: the restarted
    // server serves CURRENT, and the next promotion clears the debris.
    kill_9(&mut server);
    let versions = served.join(VERSIONS_DIR);
    let staging = versions.join(".staging-killed");
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::write(staging.join("weights.safetensors"), b"\x10\x00\x00").expect("partial");
    std::fs::write(served.join(".oxbox-killed"), b"0123").expect("partial CURRENT");
    let server = ServerProcess::start(&setup.config);
    assert_consistent_model(&server, &auth, &served, &known);
    let last = package(work.path(), 40, Some(9));
    oxbox::model::promote(&last, &served).expect("promote after the crash");
    assert!(!staging.exists(), "the staging folder was not pruned");
    let kept: Vec<PathBuf> = std::fs::read_dir(&versions)
        .expect("versions")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
}

#[test]
fn a_kill_during_plugin_reloads_leaves_the_plugins_loadable() {
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nreload_min_interval_s = 0");
    let auth = setup.with_token();
    for round in 0..4u64 {
        let mut server = ServerProcess::start(&setup.config);
        let stop = Arc::new(AtomicBool::new(false));
        let reloader = {
            let (addr, auth, stop) = (server.addr, auth.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut reloads = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let reply = std::panic::catch_unwind(|| {
                        request(
                            addr,
                            "POST",
                            "/v1/admin/plugins/reload",
                            &[("Authorization", &auth)],
                            b"",
                        )
                    });
                    match reply {
                        Ok(r) if r.status == 200 => reloads += 1,
                        Ok(r) => assert!(
                            [409, 429, 503].contains(&r.status),
                            "reload: {} {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        ),
                        Err(_) => break,
                    }
                }
                reloads
            })
        };
        let clients = Clients::start(server.addr, Some(&auth), 2);
        std::thread::sleep(Duration::from_millis(300 + 170 * round));
        kill_9(&mut server);
        stop.store(true, Ordering::SeqCst);
        let reloads = reloader.join().expect("reloader");
        let (_, failed) = clients.finish();
        assert!(failed.is_empty(), "{failed:?}");

        let server = ServerProcess::start(&setup.config);
        assert_eq!(
            request(server.addr, "GET", "/v1/ready", &[], b"").status,
            200
        );
        let plugins = request(
            server.addr,
            "GET",
            "/v1/plugins",
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(plugins.status, 200);
        assert_eq!(plugins.json()["plugins"][0]["name"], "example-site");
        let (status, body) = try_predict(server.addr, Some(&auth), &predict_body()).expect("reply");
        assert_eq!(status, 200, "{body}");
        let events = oxbox::store::AuditLog::open(&setup.data_dir())
            .expect("audit database")
            .admin_tail(100_000)
            .expect("admin events");
        assert!(
            events
                .iter()
                .all(|e| e.action == "plugins.reload" && !e.outcome.is_empty())
        );
        println!(
            "round {round}: killed after {reloads} plugin reloads; restarted ready, {} admin events on record",
            events.len()
        );
    }
}
