//! Model promotion and hot swap on the real server: a package promoted
//! (`oxbox::model::promote`, what the site client calls) is served after
//! `POST /v1/admin/model/reload` or SIGHUP without a restart, while clients
//! keep predicting and none of their requests fails; `GET /v1/model` says
//! which federation round it came from; a corrupted promoted package is
//! refused (422) and the old model keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use oxbox::model::PackageBytes;
use oxbox::model::promote::{CURRENT_FILE, VERSIONS_DIR};
use serde_json::Value;

use crate::serve::{
    Reply, ServerProcess, Setup, assert_conforms, assert_problem, multipart, multipart_type,
    openapi, request, sample_case, wait_for_admin_events,
};
use crate::util::init_model;

const RELOAD: &str = "/v1/admin/model/reload";
const AGGREGATOR: &str = "5f1c0b7a2d9e4c3b8a6f7e1d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f7";

/// A tiny model package (seed `seed`), optionally with a `[federation]`
/// table as the aggregator writes it, as bytes.
pub(crate) fn package(dir: &Path, seed: u64, round: Option<u64>) -> PackageBytes {
    let out = dir.join(format!("package-{seed}"));
    init_model(&out, &["--backbone", "tiny", "--seed", &seed.to_string()]);
    let mut bytes = PackageBytes::read(&out).expect("read package");
    if let Some(round) = round {
        let mut manifest = String::from_utf8(bytes.manifest).expect("utf-8");
        manifest.push_str(&format!(
            "\n[federation]\njob = \"exam-sim\"\nround = {round}\naggregator = \"{AGGREGATOR}\"\n"
        ));
        bytes.manifest = manifest.into_bytes();
    }
    bytes
}

/// A server whose `[model] package` is a promotion layout holding
/// `first`, with a token; returns the layout's folder and the
/// `Authorization` value.
pub(crate) fn served_setup(first: &PackageBytes) -> (Setup, PathBuf, String) {
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nreload_min_interval_s = 30");
    let served = setup.dir.path().join("served");
    oxbox::model::promote(first, &served).expect("promote the first model");
    let config = std::fs::read_to_string(&setup.config).expect("config");
    let model = setup.dir.path().join("model");
    let config = config.replace(
        &format!("package = \"{}\"", model.display()),
        &format!("package = \"{}\"", served.display()),
    );
    assert!(config.contains(&served.display().to_string()));
    std::fs::write(&setup.config, config).expect("config");
    let auth = setup.with_token();
    (setup, served, auth)
}

fn get_model(server: &ServerProcess, auth: &str) -> Reply {
    request(
        server.addr,
        "GET",
        "/v1/model",
        &[("Authorization", auth)],
        b"",
    )
}

fn served_digest(server: &ServerProcess, auth: &str) -> String {
    let reply = get_model(server, auth);
    assert_eq!(reply.status, 200);
    reply.json()["model"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned()
}

/// Clients predicting in a loop until stopped: every reply's status and
/// model digest, in order per client.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Vec<(u16, String)>>>,
}

impl Load {
    fn start(server: &ServerProcess, auth: &str, clients: usize) -> Self {
        let (dicom, record) = sample_case();
        let body = Arc::new(multipart(&[
            ("dicom", "application/dicom", &dicom),
            ("emr", "application/json", &record),
        ]));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (stop, body, addr, auth) = (
                    Arc::clone(&stop),
                    Arc::clone(&body),
                    server.addr,
                    auth.to_owned(),
                );
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let reply = request(
                            addr,
                            "POST",
                            "/v1/predict",
                            &[
                                ("Content-Type", &multipart_type()),
                                ("Authorization", &auth),
                            ],
                            &body,
                        );
                        let digest = if reply.status == 200 {
                            reply.json()["model"]["digest"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned()
                        } else {
                            String::from_utf8_lossy(&reply.body).into_owned()
                        };
                        seen.push((reply.status, digest));
                    }
                    seen
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Lets the clients run for `duration`.
    fn run_for(&self, duration: Duration) {
        std::thread::sleep(duration);
    }

    fn finish(self) -> Vec<Vec<(u16, String)>> {
        self.stop.store(true, Ordering::SeqCst);
        self.clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect()
    }
}

#[test]
fn a_promoted_model_is_swapped_in_under_load_with_no_failed_request() {
    let doc = openapi();
    let work = tempfile::tempdir().expect("tempdir");
    let a = package(work.path(), 21, None);
    let b = package(work.path(), 22, Some(3));
    let c = package(work.path(), 23, Some(4));
    assert_ne!(a.digest(), b.digest());
    let (setup, served, auth) = served_setup(&a);
    let server = ServerProcess::start(&setup.config);

    let reply = get_model(&server, &auth);
    assert_conforms(&doc, "GET", "/v1/model", &reply);
    assert_eq!(reply.json()["model"]["digest"], a.digest());
    assert!(reply.json().get("federation").is_none(), "{}", reply.json());

    let load = Load::start(&server, &auth, 4);
    load.run_for(Duration::from_millis(800));

    // The site client's promotion, then the reload over HTTP.
    oxbox::model::promote(&b, &served).expect("promote b");
    let reply = request(
        server.addr,
        "POST",
        RELOAD,
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_conforms(&doc, "POST", RELOAD, &reply);
    assert_eq!(reply.json()["model"]["digest"], b.digest());
    let reply = get_model(&server, &auth);
    assert_conforms(&doc, "GET", "/v1/model", &reply);
    let body: Value = reply.json();
    assert_eq!(body["model"]["digest"], b.digest());
    assert_eq!(
        body["federation"],
        serde_json::json!({"job": "exam-sim", "round": 3, "aggregator": AGGREGATOR})
    );
    load.run_for(Duration::from_millis(800));

    // SIGHUP reloads too (not rate-limited).
    oxbox::model::promote(&c, &served).expect("promote c");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_digest(&server, &auth) != c.digest() {
        assert!(Instant::now() < deadline, "SIGHUP did not swap the model");
        std::thread::sleep(Duration::from_millis(100));
    }
    load.run_for(Duration::from_millis(800));
    let seen = load.finish();

    // No request failed; each client saw a, then b, then c, never back.
    let order = [a.digest(), b.digest(), c.digest()];
    let mut total = 0;
    let mut models = std::collections::BTreeSet::new();
    for client in &seen {
        let mut last = 0;
        for (status, digest) in client {
            assert_eq!(*status, 200, "a request failed during the swap: {digest}");
            let at = order
                .iter()
                .position(|d| d == digest)
                .unwrap_or_else(|| panic!("unknown model {digest}"));
            assert!(at >= last, "a client went back to an older model");
            last = at;
            models.insert(at);
            total += 1;
        }
    }
    println!(
        "{total} predictions from {} clients across two swaps, none failed",
        seen.len()
    );
    assert_eq!(models.len(), 3, "the load saw every model: {models:?}");

    // Audited: HTTP and SIGHUP, with the digests before and after.
    let events = wait_for_admin_events(&setup, 3);
    let swaps: Vec<_> = events
        .iter()
        .filter(|e| e.action == "model.reload" && e.outcome == "ok")
        .collect();
    assert_eq!(swaps.len(), 2, "{events:?}");
    assert!(swaps.iter().any(|e| e.actor.starts_with("http ")
        && e.before["digest"] == a.digest()
        && e.after["digest"] == b.digest()
        && e.after["federation"]["round"] == 3));
    assert!(
        swaps
            .iter()
            .any(|e| e.actor == "SIGHUP" && e.after["digest"] == c.digest())
    );

    // Only the current and the previous version are kept.
    let versions = std::fs::read_dir(served.join(VERSIONS_DIR))
        .expect("versions")
        .count();
    assert_eq!(versions, 2);
}

#[test]
fn a_corrupt_promoted_package_is_refused_and_the_old_model_keeps_serving() {
    let doc = openapi();
    let work = tempfile::tempdir().expect("tempdir");
    let a = package(work.path(), 31, Some(1));
    let b = package(work.path(), 32, Some(2));
    let (setup, served, auth) = served_setup(&a);
    let server = ServerProcess::start(&setup.config);

    // Without the token: 401, nothing reloaded.
    let reply = request(server.addr, "POST", RELOAD, &[], b"");
    assert_problem(&doc, "POST", RELOAD, &reply, 401, "unauthorized");

    // b promoted, then its weights corrupted on disk before the reload.
    oxbox::model::promote(&b, &served).expect("promote b");
    let weights = served
        .join(VERSIONS_DIR)
        .join(b.digest())
        .join("weights.safetensors");
    let mut bytes = std::fs::read(&weights).expect("weights");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&weights, bytes).expect("corrupt");
    assert_eq!(
        std::fs::read_to_string(served.join(CURRENT_FILE))
            .expect("CURRENT")
            .trim(),
        b.digest()
    );

    let load = Load::start(&server, &auth, 2);
    load.run_for(Duration::from_millis(300));
    let reply = request(
        server.addr,
        "POST",
        RELOAD,
        &[("Authorization", &auth)],
        b"",
    );
    assert_problem(&doc, "POST", RELOAD, &reply, 422, "model-reload-failed");
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(detail.contains("not loaded"), "{detail}");
    assert!(detail.contains("running model stays"), "{detail}");
    load.run_for(Duration::from_millis(300));
    let seen = load.finish();
    for (status, digest) in seen.iter().flatten() {
        assert_eq!(*status, 200, "{digest}");
        assert_eq!(*digest, a.digest(), "only the old model served");
    }
    let reply = get_model(&server, &auth);
    assert_eq!(reply.json()["model"]["digest"], a.digest());
    assert_eq!(reply.json()["federation"]["round"], 1);

    // A second reload at once: rate-limited.
    let reply = request(
        server.addr,
        "POST",
        RELOAD,
        &[("Authorization", &auth)],
        b"",
    );
    assert_problem(&doc, "POST", RELOAD, &reply, 429, "rate-limited");

    let events = wait_for_admin_events(&setup, 1);
    let failed = events
        .iter()
        .find(|e| e.action == "model.reload")
        .expect("the failed reload is audited");
    assert_eq!(failed.outcome, "failed");
    assert_eq!(failed.before["digest"], a.digest());
    assert_eq!(failed.after["digest"], a.digest());
    assert!(failed.detail.contains("not loaded"), "{}", failed.detail);
    let metrics = request(
        server.addr,
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        b"",
    );
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("oxbox_model_reloads_total{outcome=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("oxbox_model_reload_refusals_total{reason=\"rate_limited\"} 1"),
        "{text}"
    );
}
