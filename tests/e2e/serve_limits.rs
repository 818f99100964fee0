//! `oxbox serve` under hostile local clients, measured from outside the
//! real binary: the admin route's token, serialisation, rate limit and audit;
//! a slow body that must hold no prediction permit; the connection cap
//! (sockets counted in /proc/<pid>/fd); admission by memory (503 beyond the
//! budget, 413 for a case larger than the whole budget, peak RSS of the
//! server). Each test prints what it measured.
//!
//! The inference thread's panic containment is tested in
//! `host/src/serve/batcher.rs` with an injected forward step: the release
//! binary has no fault-injection hook (one reachable from outside would be
//! an attack surface, and a build feature would test another binary than the
//! one shipped).

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dicom_dictionary_std::tags;

use crate::serve::{
    BOUNDARY, Reply, ServerProcess, Setup, assert_conforms, assert_problem, connect, multipart,
    multipart_type, openapi, read_reply, request, sample_case, wait_for_admin_events,
};
use crate::util::{corpus_file, vm_hwm, vm_size};

/// A line of the server's /metrics whose name and labels are `series`.
fn metric(addr: std::net::SocketAddr, auth: &[(&str, &str)], series: &str) -> f64 {
    let reply = request(addr, "GET", "/metrics", auth, b"");
    assert_eq!(reply.status, 200);
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Sockets the process holds open (its descriptors that are sockets).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

fn predict_body(dicom: &[u8], record: &[u8]) -> Vec<u8> {
    multipart(&[
        ("dicom", "application/dicom", dicom),
        ("emr", "application/json", record),
    ])
}

#[test]
fn the_reload_route_needs_the_token_and_is_serialised_rate_limited_and_audited() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nreload_min_interval_s = 30");
    let reload = |addr, auth: &[(&str, &str)]| -> Reply {
        let reply = request(addr, "POST", "/v1/admin/plugins/reload", auth, b"");
        assert_conforms(&doc, "POST", "/v1/admin/plugins/reload", &reply);
        reply
    };

    // Loopback without server.token_file: refused, nothing reloaded.
    {
        let server = ServerProcess::start(&setup.config);
        let reply = reload(server.addr, &[]);
        assert_eq!(reply.status, 403);
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        let problem = reply.json();
        assert_eq!(problem["type"], "urn:oxbox:problem:admin-token-required");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("server.token_file")),
            "{problem}"
        );
        println!("loopback, no token_file: reload -> {}", reply.status);
    }
    assert!(wait_for_no_admin_events(&setup));

    // With a token: a loopback client without it gets 401, and nothing is
    // reloaded either.
    let bearer = setup.with_token();
    let auth = [("Authorization", bearer.as_str())];
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let reply = reload(addr, &[]);
    assert_eq!(reply.status, 401);
    assert!(
        reply
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    let wrong = format!("Bearer {}", "0".repeat(64));
    assert_eq!(reload(addr, &[("Authorization", &wrong)]).status, 401);
    println!("loopback, token_file set, no/wrong token: reload -> 401");
    assert!(wait_for_no_admin_events(&setup));

    // The token: reloaded, and audited with who, outcome, before and after.
    let reply = reload(addr, &auth);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["plugins"][0]["name"], "example-site");
    let events = wait_for_admin_events(&setup, 1);
    let event = &events[0];
    println!("audit row: {event:?}");
    assert_eq!(event.action, "plugins.reload");
    assert_eq!(event.outcome, "ok");
    assert!(event.actor.starts_with("http 127.0.0.1:"), "{event:?}");
    assert_eq!(event.before[0]["name"], "example-site");
    assert_eq!(event.after[0]["name"], "example-site");
    assert_eq!(
        event.after[0]["sha256"].as_str().map(str::len),
        Some(64),
        "{event:?}"
    );
    assert!(event.time.ends_with('Z'), "{event:?}");

    // A second one at once: rate-limited, with Retry-After, not audited.
    let reply = reload(addr, &auth);
    assert_eq!(
        reply.status,
        429,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let retry: u32 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    assert_eq!(reply.json()["type"], "urn:oxbox:problem:rate-limited");
    println!("second reload at once -> 429, Retry-After {retry}");

    // SIGHUP goes through the same gate (not rate-limited) and is audited.
    let hup = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    // SIGHUP reloads the plugins, then the model (here unchanged): two rows.
    let events = wait_for_admin_events(&setup, 3);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[1].actor, "SIGHUP");
    assert_eq!(events[1].action, "plugins.reload");
    assert_eq!(events[1].outcome, "ok");
    assert_eq!(events[2].actor, "SIGHUP");
    assert_eq!(events[2].action, "model.reload");
    assert_eq!(events[2].outcome, "unchanged");
    // The operator reads them with `oxbox audit tail --admin`.
    let tail = crate::util::oxbox_command()
        .args(["--config".as_ref(), setup.config.as_os_str()])
        .args(["audit", "tail", "--admin", "-n", "5"])
        .output()
        .expect("oxbox audit tail --admin");
    assert!(tail.status.success(), "{}", crate::util::stderr(&tail));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[1]["actor"], "SIGHUP");
    assert_eq!(lines[2]["action"], "model.reload");
    assert!(
        lines[0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("http ")),
        "{lines:?}"
    );
    // The server is still up and ready after all of it.
    assert_eq!(request(addr, "GET", "/v1/ready", &[], b"").status, 200);
}

/// True once it is certain no admin event was recorded (the database may
/// not exist yet).
fn wait_for_no_admin_events(setup: &Setup) -> bool {
    std::thread::sleep(Duration::from_millis(200));
    oxbox::store::AuditLog::open(&setup.data_dir())
        .expect("audit database")
        .admin_tail(10)
        .expect("admin events")
        .is_empty()
}

#[test]
fn a_slow_body_holds_no_prediction_permit() {
    let setup = Setup::new(
        "listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 1\nbody_timeout_ms = 20000",
    );
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let ct = multipart_type();
    let (dicom, record) = sample_case();
    let body = predict_body(&dicom, &record);

    // A client sends its headers, then trickles its body: 1 KiB every 100 ms
    // for 3 s, then the rest.
    let slow = {
        let (ct, body) = (ct.clone(), body.clone());
        std::thread::spawn(move || {
            let mut stream = connect(addr);
            stream
                .write_all(
                    format!(
                        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                )
                .expect("head");
            let mut sent = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                stream.write_all(&body[sent..sent + 1024]).expect("trickle");
                sent += 1024;
                std::thread::sleep(Duration::from_millis(100));
            }
            stream.write_all(&body[sent..]).expect("rest");
            read_reply(&mut stream)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile, good requests are served by the only permit.
    for _ in 0..3 {
        let started = Instant::now();
        let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        println!(
            "good request during a trickled body: 200 in {:?}",
            started.elapsed()
        );
    }
    let slow = slow.join().expect("slow client");
    assert_eq!(slow.status, 200, "{}", String::from_utf8_lossy(&slow.body));
}

#[test]
fn a_declared_content_length_allocates_nothing_before_the_body_arrives() {
    // 64 clients each declare a 60 MiB body (under max_body_mib = 64) and
    // send 1 KiB of it. A server that sized its buffer from the declared
    // length would map 64 × 60 MiB = 3.75 GiB; it holds what arrived.
    const CLIENTS: usize = 64;
    const DECLARED: u64 = 60 << 20;
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nbody_timeout_ms = 60000");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let pid = server.child.id();
    let ct = multipart_type();
    // Warm up the runtime's threads and buffers with one good request.
    let (dicom, record) = sample_case();
    let body = predict_body(&dicom, &record);
    let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
    assert_eq!(reply.status, 200);
    let before = vm_size(pid);
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut stream = connect(addr);
            stream
                .write_all(
                    format!(
                        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {DECLARED}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .expect("head");
            stream.write_all(&body[..1024]).expect("first KiB");
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let during = vm_size(pid);
    let grown = during.saturating_sub(before);
    println!(
        "{CLIENTS} clients declaring {} MiB bodies, 1 KiB sent: server VmSize {:.1} -> {:.1} MiB (+{:.1} MiB)",
        DECLARED >> 20,
        before as f64 / f64::from(1u32 << 20),
        during as f64 / f64::from(1u32 << 20),
        grown as f64 / f64::from(1u32 << 20)
    );
    assert!(
        grown < 512 << 20,
        "the server mapped {} MiB for bodies it has not received",
        grown >> 20
    );
    drop(clients);
    let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
    assert_eq!(reply.status, 200);
}

#[test]
fn a_client_that_goes_away_frees_its_permit_only_when_its_decode_ends() {
    // One permit. A case that takes a while to parse (a deflated file of
    // zeros, inflated as it is walked) is sent whole, and its client
    // disconnects while the server parses it: the permit stays with the
    // parse, so a good request meanwhile gets 503 overloaded, and 200 once
    // the parse has ended.
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 1");
    // Room for the largest case below (the default limit is 256 MiB).
    setup.append("[limits]\nmax_inflated_mib = 1100\n");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let ct = multipart_type();
    let (dicom, record) = sample_case();
    let good = predict_body(&dicom, &record);
    // How long the slow case takes when its client waits: it is made larger
    // until it takes long enough for the timings below to be far apart on
    // a fast machine (250 MiB of zeros inflated in 200 ms on one). Each
    // size runs twice and the faster run counts: the first run on a new
    // server can take several times the next one (a loaded machine, 1 Dec:
    // 1.57 s, and the next run was over before 0.69 s), and the timings
    // below must fall inside the parse.
    let mut slow = Vec::new();
    let mut took = Duration::ZERO;
    for inflated_mib in [250u64, 500, 1000] {
        slow = predict_body(
            &crate::bombs::deflated_zeros_file(inflated_mib << 20),
            &record,
        );
        took = Duration::MAX;
        for _ in 0..2 {
            let started = Instant::now();
            let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &slow);
            took = took.min(started.elapsed());
            assert!(
                [200, 422].contains(&reply.status),
                "{inflated_mib} MiB: {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
            println!(
                "slow case of {inflated_mib} MiB inflated: {:?}",
                started.elapsed()
            );
        }
        if took >= Duration::from_millis(400) {
            break;
        }
    }
    assert!(
        took >= Duration::from_millis(200),
        "the slow case took only {took:?}"
    );
    // Again, and the client goes away a quarter of the way in.
    let mut stream = connect(addr);
    stream
        .write_all(
            format!(
                "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                slow.len()
            )
            .as_bytes(),
        )
        .expect("head");
    let sent = Instant::now();
    stream.write_all(&slow).expect("body");
    std::thread::sleep(took / 4);
    drop(stream);
    std::thread::sleep(took / 8);
    let during = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &good);
    let at = sent.elapsed();
    println!(
        "slow case {took:?}; its client left after {:?}; a good request at {at:?} -> {}",
        took / 4,
        during.status
    );
    assert!(
        at < took,
        "the good request came too late ({at:?} of {took:?})"
    );
    assert_eq!(
        during.status,
        503,
        "the permit was freed while the parse ran: {}",
        String::from_utf8_lossy(&during.body)
    );
    assert!(
        during.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("server.max_concurrent_requests")),
        "{}",
        String::from_utf8_lossy(&during.body)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &good);
        if reply.status == 200 {
            break;
        }
        assert_eq!(
            reply.status,
            503,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(Instant::now() < deadline, "the permit never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("the good request got 200 after {:?}", sent.elapsed());
}

#[test]
fn the_connection_cap_bounds_the_sockets_the_server_holds() {
    const CAP: usize = 20;
    const EXTRA: usize = 50;
    let setup = Setup::new(&format!(
        "listen = \"127.0.0.1:0\"\nmax_connections = {CAP}\nheader_timeout_ms = 60000"
    ));
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let pid = server.child.id();
    let baseline = open_sockets(pid);

    // cap + 50 clients connect and send nothing.
    let idle: Vec<TcpStream> = (0..CAP + EXTRA)
        .map(|_| TcpStream::connect(addr).expect("connect (backlog)"))
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let held = open_sockets(pid);
    println!(
        "{} idle connections: the server holds {held} sockets ({baseline} before: listener and runtime), cap {CAP}",
        idle.len()
    );
    assert!(
        held <= baseline + CAP,
        "the server holds {held} sockets with a cap of {CAP} (baseline {baseline})"
    );
    assert!(
        held >= baseline + CAP,
        "the server accepted only {} of its {CAP} connections",
        held - baseline
    );

    // Once they go away, a good request is served.
    drop(idle);
    let started = Instant::now();
    let reply = request(addr, "GET", "/v1/health", &[], b"");
    assert_eq!(reply.status, 200);
    let (dicom, record) = sample_case();
    let ct = multipart_type();
    let reply = request(
        addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", &ct)],
        &predict_body(&dicom, &record),
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    println!(
        "after the idle clients closed: health and predict 200 in {:?}",
        started.elapsed()
    );
    // A request head larger than the 64 KiB read buffer is refused, not
    // buffered.
    let mut big = connect(addr);
    let filler = "a".repeat(128 * 1024);
    let _ = big.write_all(
        format!("GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n").as_bytes(),
    );
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut big, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "a 128 KiB head was answered: {answer}"
    );
    println!(
        "128 KiB request head: {}",
        answer.lines().next().unwrap_or("connection closed")
    );
    drop(big);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_sockets(pid) > baseline + 1 {
        assert!(
            Instant::now() < deadline,
            "{} sockets still open",
            open_sockets(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RG1_UNCR (1955 × 1841, 16-bit native) re-sized to `side` × `side` with
/// real pixel data (a gradient), written under `dir`.
pub(crate) fn square_image(dir: &Path, side: u16) -> PathBuf {
    let mut obj = dicom_object::open_file(corpus_file("RG1_UNCR.dcm")).expect("open RG1_UNCR");
    for tag in [tags::ROWS, tags::COLUMNS] {
        obj.put_element(dicom_object::mem::InMemElement::new(
            tag,
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(side),
        ));
    }
    let pixels = usize::from(side) * usize::from(side);
    let bytes: Vec<u8> = (0..pixels)
        .flat_map(|i| ((i % 4096) as u16).to_le_bytes())
        .collect();
    obj.put_element(dicom_object::mem::InMemElement::new(
        tags::PIXEL_DATA,
        dicom_core::VR::OW,
        dicom_core::PrimitiveValue::from(bytes),
    ));
    let path = dir.join(format!("square-{side}.dcm"));
    obj.write_to_file(&path).expect("write");
    path
}

#[test]
fn memory_admission_refuses_beyond_the_budget() {
    const BUDGET_MIB: u64 = 70;
    let doc = openapi();
    let setup = Setup::new(&format!(
        "listen = \"127.0.0.1:0\"\nmemory_budget_mib = {BUDGET_MIB}\nbody_timeout_ms = 30000"
    ));
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let ct = multipart_type();
    let record = std::fs::read(crate::util::repo_root().join("samples/example-site-record.json"))
        .expect("record");
    // RG1_UNCR: 7.2 MB, 3.6 megapixels; its estimate (body twice, file,
    // frame, canonical buffers, the frame lent to the example plugin and one
    // read-rows answer) is about 45 MiB: one fits in 70 MiB, two do not.
    let large = std::fs::read(corpus_file("RG1_UNCR.dcm")).expect("RG1_UNCR");
    let body = predict_body(&large, &record);
    let predict =
        |body: &[u8]| request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], body);
    let in_use = || metric(addr, &[], "oxbox_memory_budget_in_use_bytes");

    // Within the budget: served.
    let reply = predict(&body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let peak_one = metric(addr, &[], "oxbox_memory_budget_peak_bytes");
    println!("one RG1_UNCR case reserved {:.1} MiB", peak_one / 1048576.0);
    assert!(peak_one > 30.0 * 1048576.0 && peak_one < 70.0 * 1048576.0);

    // A client holds 40 MiB of a body it has not finished sending …
    let mut hog = connect(addr);
    hog.write_all(
        format!(
            "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n--{BOUNDARY}\r\n",
            60 << 20
        )
        .as_bytes(),
    )
    .expect("head");
    hog.write_all(&vec![b'x'; 40 << 20]).expect("40 MiB");
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_use() < (40 << 20) as f64 {
        assert!(Instant::now() < deadline, "the body was not read");
        std::thread::sleep(Duration::from_millis(50));
    }
    // … so the next large case does not fit: 503 with Retry-After.
    let reply = predict(&body);
    assert_problem(&doc, "POST", "/v1/predict", &reply, 503, "overloaded");
    assert!(
        reply
            .header("retry-after")
            .is_some_and(|v| v.parse::<u32>().is_ok()),
        "Retry-After"
    );
    println!(
        "with 40 MiB of a body held: large case -> 503, Retry-After {:?}; {}",
        reply.header("retry-after"),
        reply.json()["detail"]
    );
    // When that client goes away, its share comes back and the case fits.
    drop(hog);
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_use() > 0.0 {
        assert!(Instant::now() < deadline, "the budget was not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(predict(&body).status, 200);

    // Six at once: each is served or told to retry, never more than the
    // budget reserved.
    let outcomes: Vec<Reply> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..6).map(|_| s.spawn(|| predict(&body))).collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let served = outcomes.iter().filter(|r| r.status == 200).count();
    let refused = outcomes.iter().filter(|r| r.status == 503).count();
    println!("6 concurrent large cases: {served} served, {refused} refused (503)");
    for reply in &outcomes {
        assert!(
            reply.status == 200 || reply.status == 503,
            "{}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        assert_conforms(&doc, "POST", "/v1/predict", reply);
    }
    assert!(served >= 1, "none of the concurrent cases was served");

    // A single case larger than the whole budget (3000 × 3000, 16-bit: an
    // estimate of about 100 MiB): 413, from the header, before decoding.
    let tmp = tempfile::tempdir().expect("tempdir");
    let huge = std::fs::read(square_image(tmp.path(), 3000)).expect("square");
    let reply = predict(&predict_body(&huge, &record));
    assert_problem(&doc, "POST", "/v1/predict", &reply, 413, "case-too-large");
    assert!(reply.header("retry-after").is_none());
    println!("3000 x 3000 case -> 413: {}", reply.json()["detail"]);

    // From outside: what the budget saw, and the server's peak RSS.
    let peak = metric(addr, &[], "oxbox_memory_budget_peak_bytes");
    let budget = metric(addr, &[], "oxbox_memory_budget_bytes");
    assert_eq!(budget, (BUDGET_MIB << 20) as f64);
    assert!(
        peak <= budget,
        "peak reservation {peak} over the budget {budget}"
    );
    assert!(
        metric(
            addr,
            &[],
            "oxbox_admission_refusals_total{reason=\"memory\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric(
            addr,
            &[],
            "oxbox_admission_refusals_total{reason=\"too_large\"}"
        ),
        1.0
    );
    let rss = vm_hwm(server.child.id());
    println!(
        "budget {BUDGET_MIB} MiB: peak reserved {:.1} MiB; server peak RSS (VmHWM) {:.1} MiB",
        peak / 1048576.0,
        rss as f64 / 1048576.0
    );
    assert!(rss <= 3 << 29, "server peak RSS {rss} bytes over 1.5 GiB");
}
