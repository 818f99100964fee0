//! `oxbox serve` under abusive clients, on the real binary over real
//! sockets: a body declared or streamed past `max_body_mib` (413 before the
//! body is read), request heads trickled byte by byte (cut off by
//! `header_timeout_ms`), 1,000 idle connections (bounded by
//! `max_connections`), malformed multipart, deeply nested JSON and invalid
//! UTF-8 (400/415 problem+json), and a storm of predictions past
//! `max_concurrent_requests` (503 with Retry-After). During each, a good
//! prediction is still answered 200, and the server's peak RSS (`VmHWM`) is
//! asserted against [`PEAK_RSS_BOUND`]. Each test prints what it measured.
//!
//! The slow body (no permit held), the connection cap with 70 clients, the
//! declared length that allocates nothing and memory admission are in
//! `serve_limits`; the parser bombs in `bombs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::serve::{
    BOUNDARY, Reply, ServerProcess, Setup, assert_conforms, assert_problem, connect, multipart,
    multipart_type, openapi, read_reply, request, sample_case,
};
use crate::util::vm_hwm;

/// The most the server may hold resident through any one abuse here: the
/// tiny test model, the example-site plugin's sandboxes and the runtime
/// take about 50–100 MiB; none of the abuse may add a body's or a
/// connection horde's worth to it.
const PEAK_RSS_BOUND: u64 = 256 << 20;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// One good prediction (the sample case), with its status.
fn good_prediction(addr: SocketAddr) -> Reply {
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    request(
        addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", &multipart_type())],
        &body,
    )
}

fn assert_good_prediction(addr: SocketAddr, during: &str) {
    let reply = good_prediction(addr);
    assert_eq!(
        reply.status,
        200,
        "a good prediction during {during}: {}",
        String::from_utf8_lossy(&reply.body)
    );
}

/// Asserts and prints the server's peak RSS.
fn assert_peak_rss(server: &ServerProcess, what: &str) -> u64 {
    let peak = vm_hwm(server.pid());
    println!(
        "{what}: server peak RSS (VmHWM) {:.1} MiB (bound {:.0} MiB)",
        mib(peak),
        mib(PEAK_RSS_BOUND)
    );
    assert!(
        peak < PEAK_RSS_BOUND,
        "{what}: peak RSS {:.1} MiB",
        mib(peak)
    );
    peak
}

/// Sockets the process holds open (its descriptors that are sockets).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Everything the server sends on `stream` until it closes or resets it.
fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

/// Whether the server closed `stream` (EOF or reset) within `within`,
/// reading and discarding whatever it sent first (a 408 is allowed).
fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn an_oversized_body_is_refused_before_it_is_read() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nmax_body_mib = 1");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let ct = multipart_type();

    // 10 GiB declared, nothing sent: the answer comes before any body
    // byte exists (the client sends none until it has read the reply).
    let mut stream = connect(addr);
    stream
        .write_all(
            format!(
                "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                10u64 << 30
            )
            .as_bytes(),
        )
        .expect("head");
    let started = Instant::now();
    let reply = read_reply(&mut stream);
    println!(
        "Content-Length 10 GiB, no body sent: {} after {:?}",
        reply.status,
        started.elapsed()
    );
    assert_problem(
        &doc,
        "POST",
        "/v1/predict",
        &reply,
        413,
        "payload-too-large",
    );
    assert!(
        reply.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("max_body_mib")),
        "{}",
        reply.json()
    );
    drop(stream);

    // A chunked body (no length to refuse up front) of 64 MiB streamed as
    // fast as the socket takes it: refused as soon as it passes 1 MiB; the
    // client's writes fail long before the 64 MiB are out.
    let mut stream = connect(addr);
    stream
        .write_all(
            format!(
                "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("head");
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        let sent = Arc::clone(&sent);
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let frame = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk,
                b"\r\n".to_vec(),
            ]
            .concat();
            for _ in 0..1024 {
                if stream.write_all(&frame).is_err() {
                    break;
                }
                sent.fetch_add(64 * 1024, Ordering::SeqCst);
            }
        })
    };
    let answer = read_all(&mut stream);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    writer.join().expect("writer");
    let sent = sent.load(Ordering::SeqCst) as u64;
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    println!(
        "chunked 64 MiB body: {status_line:?} with {:.1} MiB written by the client",
        mib(sent)
    );
    // The server answers 413 and closes; with the client's unread bytes
    // still in its buffer the close may be a reset that overtakes the
    // answer, so a reset without it is accepted — but never a body read
    // to its end.
    assert!(
        status_line.is_empty() || status_line.starts_with("HTTP/1.1 413"),
        "{status_line:?}"
    );
    assert!(sent < 32 << 20, "the client wrote {:.1} MiB", mib(sent));

    assert_good_prediction(addr, "the oversized bodies");
    assert_peak_rss(&server, "oversized bodies");
}

#[test]
fn request_heads_trickled_byte_by_byte_are_cut_off_by_the_header_timeout() {
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nheader_timeout_ms = 1000");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;

    // Eight clients each send a request head one byte every 100 ms (a
    // 200-byte head would take 20 s), and one client sends a request and
    // then keeps its connection open without sending another.
    let stop = Arc::new(AtomicBool::new(false));
    let trickles: Vec<_> = (0..8)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                let head = format!(
                    "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
                    "a".repeat(160)
                );
                let started = Instant::now();
                for byte in head.bytes() {
                    if stop.load(Ordering::SeqCst) || stream.write_all(&[byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                // Closed: the reads see EOF (or a 408 and then EOF).
                closed_within(&mut stream, Duration::from_secs(1)).map(|_| started.elapsed())
            })
        })
        .collect();
    let mut kept_alive = connect(addr);
    kept_alive
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    assert_eq!(read_reply(&mut kept_alive).status, 200);
    let idle_closed = closed_within(&mut kept_alive, Duration::from_secs(15));

    assert_good_prediction(addr, "the trickled heads");
    let closed: Vec<Option<Duration>> = trickles
        .into_iter()
        .map(|t| t.join().expect("trickle"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    println!(
        "trickled heads closed after {closed:?}; idle keep-alive closed after {idle_closed:?}"
    );
    for c in &closed {
        let c = c.expect("a trickled head was never cut off");
        // The timeout is 1 s; the whole head would have taken 20 s.
        assert!(c < Duration::from_secs(6), "cut off only after {c:?}");
    }
    let idle = idle_closed.expect("an idle keep-alive connection was never closed");
    assert!(idle < Duration::from_secs(6), "idle closed after {idle:?}");
    assert_peak_rss(&server, "trickled heads");
}

#[test]
fn a_thousand_idle_connections_are_bounded_by_the_connection_cap() {
    const CAP: usize = 64;
    const IDLE: usize = 1000;
    let setup = Setup::new(&format!(
        "listen = \"127.0.0.1:0\"\nmax_connections = {CAP}\nheader_timeout_ms = 1500"
    ));
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let pid = server.pid();
    let baseline_sockets = open_sockets(pid);

    // 1,000 clients connect and send nothing. Past the cap and the
    // kernel's listen backlog a connect is not answered (the SYN is
    // dropped): such a client gives up after 250 ms and counts as refused.
    let started = Instant::now();
    let failed = Arc::new(AtomicUsize::new(0));
    let horde: Vec<TcpStream> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..16)
            .map(|_| {
                let failed = Arc::clone(&failed);
                scope.spawn(move || {
                    (0..IDLE / 16)
                        .filter_map(|_| {
                            let stream =
                                TcpStream::connect_timeout(&addr, Duration::from_millis(250));
                            if stream.is_err() {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                            stream.ok()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("connect worker"))
            .collect()
    });
    println!(
        "{} idle connections open, {} connects not answered, in {:?}",
        horde.len(),
        failed.load(Ordering::SeqCst),
        started.elapsed()
    );

    // While they are held, the server's sockets stay at the cap (plus its
    // listener and runtime), and a good prediction is served once the
    // header timeout has freed slots.
    let peak_sockets = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (Arc::clone(&peak_sockets), Arc::clone(&sampling));
        std::thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                peak.fetch_max(open_sockets(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let asked = Instant::now();
    assert_good_prediction(addr, "1,000 idle connections");
    let served_after = asked.elapsed();
    let health = request(addr, "GET", "/v1/health", &[], b"");
    assert_eq!(health.status, 200);
    std::thread::sleep(Duration::from_millis(500));
    sampling.store(false, Ordering::SeqCst);
    sampler.join().expect("sampler");
    let peak = peak_sockets.load(Ordering::SeqCst);
    println!(
        "server sockets: {baseline_sockets} before, at most {peak} with {} idle clients (cap {CAP}); a good prediction answered 200 after {served_after:?}",
        horde.len()
    );
    assert!(horde.len() >= CAP, "only {} connections", horde.len());
    assert!(peak <= CAP + baseline_sockets + 4, "{peak} sockets");

    // The first idle connections were closed by the server, not left open.
    let mut horde = horde;
    let mut closed = 0;
    for stream in horde.iter_mut().take(CAP) {
        if closed_within(stream, Duration::from_millis(300)).is_some() {
            closed += 1;
        }
    }
    println!("{closed} of the first {CAP} idle connections closed by the server");
    assert!(closed >= CAP / 2, "only {closed} closed");
    drop(horde);
    assert_good_prediction(addr, "after the idle connections");
    assert_peak_rss(&server, "1,000 idle connections");
}

/// A request to refuse: what it is, its Content-Type (any bytes) and body,
/// and the status and problem kind it must get.
struct Hostile {
    what: &'static str,
    content_type: Vec<u8>,
    body: Vec<u8>,
    status: u16,
    kind: &'static str,
}

/// Sends a request whose Content-Type may be any bytes.
fn raw_request(addr: SocketAddr, content_type: &[u8], body: &[u8]) -> Reply {
    let mut stream = connect(addr);
    let mut head =
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: ".to_vec();
    head.extend_from_slice(content_type);
    head.extend_from_slice(format!("\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    stream.write_all(&head).expect("head");
    stream.write_all(body).expect("body");
    read_reply(&mut stream)
}

#[test]
fn malformed_multipart_nested_json_and_invalid_utf8_get_their_problems() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let (dicom, record) = sample_case();
    let ct = multipart_type().into_bytes();
    let json = b"application/json".to_vec();
    let nested = |depth: usize| {
        let mut v = b"{\"emr\":".to_vec();
        v.extend(std::iter::repeat_n(b'[', depth));
        v.extend(std::iter::repeat_n(b']', depth));
        v.push(b'}');
        v
    };
    let deep_record = {
        let mut v = b"{\"AGE\":".to_vec();
        v.extend(std::iter::repeat_n(b'[', 100_000));
        v
    };
    let mut bad_utf8_record = record.clone();
    let at = bad_utf8_record
        .windows(3)
        .position(|w| w == b"DOE")
        .expect("a name");
    bad_utf8_record[at] = 0xFF;
    let cases = vec![
        Hostile {
            what: "multipart without its closing boundary",
            content_type: ct.clone(),
            body: {
                let mut body = multipart(&[("emr", "application/json", &record)]);
                body.truncate(body.len() - BOUNDARY.len() - 6);
                body
            },
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "multipart of garbage",
            content_type: ct.clone(),
            body: (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "multipart part header of 200 KB",
            content_type: ct.clone(),
            body: format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"other\"; x=\"{}\"\r\n\r\n{{}}\r\n--{BOUNDARY}--\r\n",
                "a".repeat(200_000)
            )
            .into_bytes(),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "multipart without a boundary",
            content_type: b"multipart/form-data".to_vec(),
            body: multipart(&[("emr", "application/json", &record)]),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "the emr part twice",
            content_type: ct.clone(),
            body: multipart(&[
                ("emr", "application/json", &record),
                ("emr", "application/json", &record),
            ]),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "an emr part nested 100,000 deep",
            content_type: ct.clone(),
            body: multipart(&[
                ("dicom", "application/dicom", &dicom),
                ("emr", "application/json", &deep_record),
            ]),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "a JSON body nested 1,000,000 deep",
            content_type: json.clone(),
            body: nested(1_000_000),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "a JSON body with invalid UTF-8",
            content_type: json.clone(),
            body: [b"{\"emr\":".as_slice(), &bad_utf8_record, b"}"].concat(),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "an emr part with invalid UTF-8",
            content_type: ct.clone(),
            body: multipart(&[
                ("dicom", "application/dicom", &dicom),
                ("emr", "application/json", &bad_utf8_record),
            ]),
            status: 400,
            kind: "malformed-request",
        },
        Hostile {
            what: "a Content-Type of invalid UTF-8",
            content_type: b"multipart/form-data; boundary=\xff\xfe".to_vec(),
            body: multipart(&[("emr", "application/json", &record)]),
            status: 415,
            kind: "unsupported-media-type",
        },
        Hostile {
            what: "an unpaired surrogate escape in the EMR",
            content_type: json.clone(),
            body: b"{\"emr\":{\"AGE\":\"\\ud800\"}}".to_vec(),
            status: 400,
            kind: "malformed-request",
        },
    ];
    for case in &cases {
        let reply = raw_request(addr, &case.content_type, &case.body);
        println!(
            "{}: {} {}",
            case.what,
            reply.status,
            reply.json()["detail"].as_str().unwrap_or_default()
        );
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json"),
            "{}",
            case.what
        );
        assert_problem(&doc, "POST", "/v1/predict", &reply, case.status, case.kind);
        assert!(reply.json()["request_id"].is_string(), "{}", case.what);
        assert_good_prediction(addr, case.what);
    }
    assert_peak_rss(&server, "malformed requests");
}

#[test]
fn a_storm_past_the_concurrency_limit_gets_503_with_retry_after() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 2");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let (dicom, record) = sample_case();
    let body = Arc::new(multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]));
    const CLIENTS: usize = 48;
    const EACH: usize = 4;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (barrier, body) = (Arc::clone(&barrier), Arc::clone(&body));
            std::thread::spawn(move || {
                barrier.wait();
                (0..EACH)
                    .map(|_| {
                        request(
                            addr,
                            "POST",
                            "/v1/predict",
                            &[("Content-Type", &multipart_type())],
                            &body,
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let replies: Vec<Reply> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    println!(
        "{} predictions from {CLIENTS} clients at once, limit 2: {ok} answered 200, {} 503",
        replies.len(),
        busy.len()
    );
    assert_eq!(ok + busy.len(), replies.len(), "only 200 and 503 expected");
    assert!(ok > 0 && !busy.is_empty(), "{ok} ok, {} busy", busy.len());
    for reply in busy {
        assert_problem(&doc, "POST", "/v1/predict", reply, 503, "overloaded");
        assert_conforms(&doc, "POST", "/v1/predict", reply);
        let retry: u32 = reply
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!(retry >= 1);
    }
    assert_good_prediction(addr, "after the storm");
    assert_peak_rss(&server, "request storm");
}
