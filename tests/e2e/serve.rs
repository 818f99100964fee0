//! `oxbox serve` over real sockets: every route and error status, each
//! response validated against the OpenAPI document, the CLI and the server
//! agreeing on the same case, the audit record, the token rule, overload,
//! body and header timeouts, and the plugin reload (SIGHUP; the admin route
//! needs a token, see `serve_limits`). The helpers here (server process,
//! requests, OpenAPI check, setup) are shared with `serve_limits`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{init_model, pack_plugin, repo_root, run, stderr};

/// A running `oxbox serve`, stopped (SIGTERM, then kill) on drop.
pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
}

impl ServerProcess {
    /// `oxbox --config CONFIG serve`, its log (stderr) on the test's stderr.
    pub(crate) fn start(config: &Path) -> Self {
        Self::spawn(config, Stdio::inherit())
    }

    /// `oxbox --config CONFIG serve`, its log (stderr) going to the file `log`.
    pub(crate) fn start_logged(config: &Path, log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        Self::spawn(config, Stdio::from(file))
    }

    /// Spawns the server and waits for its `listening on` line.
    fn spawn(config: &Path, log: Stdio) -> Self {
        Self::spawn_reading(config, log, 0).0
    }

    /// `oxbox --config CONFIG serve`, its log going to the file `log`, and
    /// the `more` lines its stdout prints after the `listening on` line
    /// (the DICOM listener's address, when it is on).
    pub(crate) fn start_logged_reading(
        config: &Path,
        log: &Path,
        more: usize,
    ) -> (Self, Vec<String>) {
        let file = std::fs::File::create(log).expect("log file");
        Self::spawn_reading(config, Stdio::from(file), more)
    }

    fn spawn_reading(config: &Path, log: Stdio, more: usize) -> (Self, Vec<String>) {
        let mut child = crate::util::oxbox_command()
            .args(["--config".as_ref(), config.as_os_str(), "serve".as_ref()])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn oxbox serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut lines = Vec::new();
        for _ in 0..=more {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read a stdout line");
            lines.push(line.trim().to_owned());
        }
        let first = lines.remove(0);
        let addr = first
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .expect("address");
        (Self { child, addr }, lines)
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (not exited, not killed).
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the server as an operator does (SIGTERM) and waits up to
    /// `wait` for it to exit; its exit status, `None` if it had to be
    /// killed.
    pub(crate) fn stop(&mut self, wait: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// A response as the tests see it.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one HTTP/1.1 response (Content-Length bodies; the server sends
/// no other kind).
pub(crate) fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').expect("header");
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().expect("content-length"));
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    Reply {
        status,
        headers,
        body,
    }
}

pub(crate) fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream
}

/// Sends one request and reads the reply.
pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = connect(addr);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send head");
    stream.write_all(body).expect("send body");
    read_reply(&mut stream)
}

pub(crate) const BOUNDARY: &str = "oxbox-test-boundary-7f3a";

/// A multipart/form-data body from (name, content type, bytes) parts.
pub(crate) fn multipart(parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, content_type, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

pub(crate) fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// Checks a reply against the OpenAPI document: the status is declared for
/// the operation, the media type is declared, and a JSON body validates
/// against the declared schema (JSON Schema 2020-12, as OpenAPI 3.1 says).
pub(crate) fn assert_conforms(doc: &Value, method: &str, path: &str, reply: &Reply) {
    let operation = &doc["paths"][path][method.to_ascii_lowercase()];
    let declared = &operation["responses"][reply.status.to_string()];
    assert!(
        declared.is_object(),
        "{method} {path}: status {} is not in the OpenAPI document; body {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    let media = reply
        .header("content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let content = &declared["content"][&media];
    assert!(
        content.is_object(),
        "{method} {path} {}: media type {media:?} not declared",
        reply.status
    );
    if media.ends_with("json") {
        let mut schema = content["schema"].clone();
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
        schema["components"] = doc["components"].clone();
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let body = reply.json();
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {}: body does not validate: {errors:?}\n{body:#}",
            reply.status
        );
    }
    if let Some(headers) = declared["headers"].as_object() {
        for name in headers.keys() {
            if name.eq_ignore_ascii_case("retry-after") {
                assert!(
                    reply.header(name).is_some_and(|v| v.parse::<u32>().is_ok()),
                    "{method} {path} {}: Retry-After missing",
                    reply.status
                );
            }
        }
    }
}

/// Checks that `reply` is the problem `kind` (`urn:oxbox:problem:<kind>`)
/// with `status`, and conforms to the OpenAPI document.
pub(crate) fn assert_problem(
    doc: &Value,
    method: &str,
    path: &str,
    reply: &Reply,
    status: u16,
    kind: &str,
) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_conforms(doc, method, path, reply);
    assert_eq!(reply.json()["type"], format!("urn:oxbox:problem:{kind}"));
}

pub(crate) fn openapi() -> Value {
    let text = std::fs::read_to_string(repo_root().join("host/api/openapi.json"))
        .expect("host/api/openapi.json");
    let doc: Value = serde_json::from_str(&text).expect("OpenAPI JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    doc
}

/// A tiny untrained model, the example-site plugin, a data dir and a config
/// with `extra` lines in `[server]`.
pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
}

impl Setup {
    pub(crate) fn new(server: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model");
        init_model(&model, &["--backbone", "tiny", "--seed", "11"]);
        let plugin = repo_root().join("plugins/dist/example-site/plugin.toml");
        let config = dir.path().join("oxbox.toml");
        std::fs::write(
            &config,
            format!(
                "[site]\nid = \"st-elsewhere\"\nname = \"test\"\n[server]\n{server}\n[storage]\ndata_dir = \"{}\"\n[model]\npackage = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
                dir.path().join("data").display(),
                model.display(),
                plugin.display()
            ),
        )
        .expect("config");
        Self { dir, config }
    }

    /// Writes a token file (mode 600) and names it in `[server]`; returns
    /// the `Authorization` header value.
    pub(crate) fn with_token(&self) -> String {
        use std::os::unix::fs::PermissionsExt;
        let token = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let token_file = self.dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let text = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(
            &self.config,
            text.replacen(
                "[server]\n",
                &format!("[server]\ntoken_file = \"{}\"\n", token_file.display()),
                1,
            ),
        )
        .expect("config");
        format!("Bearer {token}")
    }

    /// Appends `text` (whole tables) to the config.
    pub(crate) fn append(&self, text: &str) {
        let mut config = std::fs::read_to_string(&self.config).expect("config");
        config.push_str(text);
        std::fs::write(&self.config, config).expect("config");
    }

    /// The data directory (audit database, plugin cache).
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

pub(crate) fn sample_case() -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(repo_root().join("samples/chest-cr-sample.dcm")).expect("sample"),
        std::fs::read(repo_root().join("samples/example-site-record.json")).expect("record"),
    )
}

#[test]
fn every_route_and_error_status_conforms_and_matches_the_cli() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nmax_body_mib = 1");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let check =
        |method: &str, path: &str, reply: &Reply| assert_conforms(&doc, method, path, reply);

    for path in [
        "/v1/health",
        "/v1/ready",
        "/v1/model",
        "/v1/plugins",
        "/v1/openapi.json",
    ] {
        let reply = request(addr, "GET", path, &[], b"");
        assert_eq!(reply.status, 200, "{path}");
        check("GET", path, &reply);
    }
    let plugins = request(addr, "GET", "/v1/plugins", &[], b"").json();
    assert_eq!(plugins["plugins"][0]["name"], "example-site");

    // The prediction, and the CLI on the same case and config.
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let ct = multipart_type();
    let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    check("POST", "/v1/predict", &reply);
    let served = reply.json();
    assert_eq!(reply.header("x-request-id"), served["request_id"].as_str());
    let cli = run(&[
        "--config".as_ref(),
        setup.config.as_os_str(),
        "predict".as_ref(),
        "--dicom".as_ref(),
        repo_root().join("samples/chest-cr-sample.dcm").as_os_str(),
        "--emr".as_ref(),
        repo_root()
            .join("samples/example-site-record.json")
            .as_os_str(),
    ]);
    assert!(cli.status.success(), "{}", stderr(&cli));
    let cli: Value = serde_json::from_slice(&cli.stdout).expect("CLI JSON");
    for key in ["horizons", "model", "plugins", "site", "warnings"] {
        assert_eq!(served[key], cli[key], "{key}: server and CLI differ");
    }

    // The audit record: the outputs given out, no patient identifiers.
    let audit = run(&[
        "--config".as_ref(),
        setup.config.as_os_str(),
        "audit".as_ref(),
        "tail".as_ref(),
        "-n".as_ref(),
        "10".as_ref(),
    ]);
    assert!(audit.status.success(), "{}", stderr(&audit));
    let audit_text = String::from_utf8_lossy(&audit.stdout).into_owned();
    let records: Vec<Value> = audit_text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ours = records
        .iter()
        .find(|r| r["request_id"] == served["request_id"])
        .unwrap_or_else(|| panic!("no audit record for the request: {audit_text}"));
    assert_eq!(ours["status"], "ok");
    assert_eq!(ours["outputs"], served["horizons"]);
    assert_eq!(ours["model_digest"], served["model"]["digest"]);
    let record_json: Value = serde_json::from_slice(&record).expect("record");
    for field in ["MRN", "PT_NAME", "DOB"] {
        let value = record_json[field]
            .as_str()
            .expect("identifier in the sample");
        assert!(
            !audit_text.contains(value),
            "{field} leaked into the audit log"
        );
        assert!(
            !String::from_utf8_lossy(&reply.body).contains(value),
            "{field} leaked into the response"
        );
    }

    // Every error status the API promises, each a conforming problem.
    let json_type = [("Content-Type", "application/json")];
    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        (
            "emr part missing",
            request(
                addr,
                "POST",
                "/v1/predict",
                &[("Content-Type", &ct)],
                &multipart(&[("dicom", "application/dicom", &dicom)]),
            ),
            400,
            "malformed-request",
        ),
        (
            "broken JSON body",
            request(addr, "POST", "/v1/predict", &json_type, b"{\"emr\": "),
            400,
            "malformed-request",
        ),
        (
            "unexpected part",
            request(
                addr,
                "POST",
                "/v1/predict",
                &[("Content-Type", &ct)],
                &multipart(&[
                    ("emr", "application/json", &record),
                    ("notes", "text/plain", b"x"),
                ]),
            ),
            400,
            "malformed-request",
        ),
        (
            "text/plain body",
            request(
                addr,
                "POST",
                "/v1/predict",
                &[("Content-Type", "text/plain")],
                b"hello",
            ),
            415,
            "unsupported-media-type",
        ),
        (
            "emr part of the wrong type",
            request(
                addr,
                "POST",
                "/v1/predict",
                &[("Content-Type", &ct)],
                &multipart(&[("emr", "text/csv", b"a,b")]),
            ),
            415,
            "unsupported-media-type",
        ),
        (
            "not DICOM",
            request(
                addr,
                "POST",
                "/v1/predict",
                &[("Content-Type", &ct)],
                &multipart(&[
                    (
                        "dicom",
                        "application/dicom",
                        b"this is not a DICOM file at all, only text",
                    ),
                    ("emr", "application/json", &record),
                ]),
            ),
            422,
            "dicom-rejected",
        ),
        (
            "no radiograph for an image model",
            request(
                addr,
                "POST",
                "/v1/predict",
                &json_type,
                format!("{{\"emr\": {}}}", String::from_utf8_lossy(&record)).as_bytes(),
            ),
            422,
            "model-input-rejected",
        ),
        (
            "plugin rejects an implausible value",
            request(
                addr,
                "POST",
                "/v1/predict",
                &[("Content-Type", &ct)],
                &multipart(&[
                    ("dicom", "application/dicom", &dicom),
                    ("emr", "application/json", b"{\"O2SAT\": \"250\"}"),
                ]),
            ),
            422,
            "plugin-rejected",
        ),
    ];
    for (what, reply, status, kind) in &cases {
        assert_eq!(
            reply.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        check("POST", "/v1/predict", reply);
        let problem = reply.json();
        assert_eq!(
            problem["type"],
            format!("urn:oxbox:problem:{kind}"),
            "{what}"
        );
        assert!(problem["request_id"].is_string(), "{what}");
    }

    // 413 from Content-Length alone: the server answers before the body.
    let mut stream = connect(addr);
    stream
        .write_all(format!("POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: 5000000\r\n\r\n").as_bytes())
        .expect("head");
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 413);
    check("POST", "/v1/predict", &reply);
    // 413 while reading a chunked body with no length announced.
    let mut stream = connect(addr);
    stream
        .write_all(format!("POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes())
        .expect("head");
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..24 {
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || stream.write_all(&chunk).is_err()
            || stream.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 413);
    check("POST", "/v1/predict", &reply);

    // Unknown route, wrong method.
    let reply = request(addr, "GET", "/v1/nothing", &[], b"");
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let reply = request(addr, "GET", "/v1/predict", &[], b"");
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));

    // Reload over HTTP needs a token, loopback included: without
    // server.token_file the route is refused (serve_limits tests it with one).
    let reply = request(addr, "POST", "/v1/admin/plugins/reload", &[], b"");
    assert_eq!(reply.status, 403);
    check("POST", "/v1/admin/plugins/reload", &reply);
    assert_eq!(
        reply.json()["type"],
        "urn:oxbox:problem:admin-token-required"
    );

    // Metrics saw all of it.
    let reply = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200);
    check("GET", "/metrics", &reply);
    let text = String::from_utf8_lossy(&reply.body);
    for needle in [
        "oxbox_http_requests_total{route=\"/v1/predict\",status=\"200\"} 1",
        "oxbox_http_requests_total{route=\"/v1/predict\",status=\"422\"} 3",
        "oxbox_http_requests_total{route=\"/v1/predict\",status=\"413\"} 2",
        "oxbox_prediction_stage_seconds_count{stage=\"inference\"} 1",
        "oxbox_inference_batch_size_count 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
}

#[test]
fn off_loopback_the_token_is_required() {
    // Without a token file the server refuses to start.
    let setup = Setup::new("listen = \"0.0.0.0:0\"");
    let out = run(&[
        "--config".as_ref(),
        setup.config.as_os_str(),
        "serve".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("server.token_file"),
        "{}",
        stderr(&out)
    );

    let token = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let token_file = setup.dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let text = std::fs::read_to_string(&setup.config).expect("config");
    std::fs::write(
        &setup.config,
        text.replace(
            "listen = \"0.0.0.0:0\"",
            &format!(
                "listen = \"0.0.0.0:0\"\ntoken_file = \"{}\"",
                token_file.display()
            ),
        ),
    )
    .expect("config");
    let server = ServerProcess::start(&setup.config);
    let addr = SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let doc = openapi();

    let reply = request(addr, "GET", "/v1/model", &[], b"");
    assert_eq!(reply.status, 401);
    assert_conforms(&doc, "GET", "/v1/model", &reply);
    assert!(
        reply
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    let wrong = format!("Bearer {}", "0".repeat(64));
    assert_eq!(
        request(addr, "GET", "/v1/model", &[("Authorization", &wrong)], b"").status,
        401
    );
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let ct = multipart_type();
    let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
    assert_eq!(reply.status, 401);
    assert_conforms(&doc, "POST", "/v1/predict", &reply);

    let bearer = format!("Bearer {token}");
    let reply = request(addr, "GET", "/v1/model", &[("Authorization", &bearer)], b"");
    assert_eq!(reply.status, 200);
    assert_conforms(&doc, "GET", "/v1/model", &reply);
    let reply = request(
        addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", &ct), ("Authorization", &bearer)],
        &body,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // Probes need no token.
    assert_eq!(request(addr, "GET", "/v1/health", &[], b"").status, 200);
    assert_eq!(request(addr, "GET", "/v1/ready", &[], b"").status, 200);
}

#[test]
fn overload_and_slow_clients_get_their_statuses() {
    let doc = openapi();
    let setup = Setup::new(
        "listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 1\nbody_timeout_ms = 1500\nheader_timeout_ms = 800",
    );
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let ct = multipart_type();
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);

    // A client that announces a body and stalls holds no prediction permit
    // (the body is read before one is taken) …
    let mut slow = connect(addr);
    slow.write_all(
        format!("POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: 1000\r\n\r\n--{BOUNDARY}")
            .as_bytes(),
    )
    .expect("slow head");
    std::thread::sleep(Duration::from_millis(300));
    // … so the only slot still serves the next prediction.
    let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // The stalled body times out with 408.
    let started = Instant::now();
    let reply = read_reply(&mut slow);
    assert_eq!(reply.status, 408);
    assert_conforms(&doc, "POST", "/v1/predict", &reply);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Headers that never finish: the connection is closed after the header
    // timeout, without a response.
    let mut stalled = connect(addr);
    stalled
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .expect("partial head");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = stalled.read(&mut buf);
    assert!(
        matches!(read, Ok(0)) || read.is_err() || String::from_utf8_lossy(&buf).contains("408"),
        "header timeout: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_prediction_beyond_max_concurrent_requests_gets_503() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"\nmax_concurrent_requests = 1");
    // A plugin that spins in map-emr until its (raised) deadline holds the
    // only permit for 1.5 s.
    let dist = pack_guest(&setup, "infinite_loop");
    let text = std::fs::read_to_string(&setup.config).expect("config");
    let example = repo_root().join("plugins/dist/example-site/plugin.toml");
    std::fs::write(
        &setup.config,
        text.replace(
            &example.display().to_string(),
            &dist.join("plugin.toml").display().to_string(),
        ),
    )
    .expect("config");
    setup.append("[sandbox]\ndeadline_ms = 1500\n");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let ct = multipart_type();
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let busy = {
        let (ct, body) = (ct.clone(), body.clone());
        std::thread::spawn(move || {
            request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let reply = request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);
    assert_problem(&doc, "POST", "/v1/predict", &reply, 503, "overloaded");
    // Health is not a prediction: it still answers.
    assert_eq!(request(addr, "GET", "/v1/health", &[], b"").status, 200);
    let busy = busy.join().expect("busy request");
    assert_eq!(busy.status, 500, "{}", String::from_utf8_lossy(&busy.body));
    assert_eq!(busy.json()["type"], "urn:oxbox:problem:plugin-fault");
    let metrics =
        String::from_utf8_lossy(&request(addr, "GET", "/metrics", &[], b"").body).into_owned();
    assert!(
        metrics.contains("oxbox_admission_refusals_total{reason=\"requests\"} 1"),
        "{metrics}"
    );
}

/// Packs the test guest `name` (tests/guests, built by
/// scripts/build-plugins.sh) as a plugin under the setup's directory.
pub(crate) fn pack_guest(setup: &Setup, name: &str) -> PathBuf {
    let wasm = repo_root().join(format!(
        "tests/guests/target/wasm32-wasip2/release/hostile_{name}.wasm"
    ));
    assert!(
        wasm.is_file(),
        "{}: run scripts/build-plugins.sh",
        wasm.display()
    );
    let dist = setup.dir.path().join(name);
    pack_plugin(&wasm, &dist);
    dist
}

#[test]
fn a_faulting_plugin_is_quarantined_then_reloaded() {
    let doc = openapi();
    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    // Swap the example plugin for one that panics on every record.
    let dist = pack_guest(&setup, "panics");
    let text = std::fs::read_to_string(&setup.config).expect("config");
    let example = repo_root().join("plugins/dist/example-site/plugin.toml");
    std::fs::write(
        &setup.config,
        text.replace(
            &example.display().to_string(),
            &dist.join("plugin.toml").display().to_string(),
        ),
    )
    .expect("config");
    let server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let ct = multipart_type();
    let predict = || request(addr, "POST", "/v1/predict", &[("Content-Type", &ct)], &body);

    // Three faults (sandbox.fault_threshold), each a 500 naming the trap …
    for _ in 0..3 {
        let reply = predict();
        assert_problem(&doc, "POST", "/v1/predict", &reply, 500, "plugin-fault");
    }
    // … then quarantine: 503 with Retry-After, and the box is not ready.
    let reply = predict();
    assert_problem(
        &doc,
        "POST",
        "/v1/predict",
        &reply,
        503,
        "plugin-quarantined",
    );
    let ready = request(addr, "GET", "/v1/ready", &[], b"");
    assert_eq!(ready.status, 503);
    assert_conforms(&doc, "GET", "/v1/ready", &ready);
    let plugins = request(addr, "GET", "/v1/plugins", &[], b"").json();
    assert_eq!(plugins["plugins"][0]["quarantined"], true);
    let metrics = request(addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("oxbox_plugin_faults_total{") && l.ends_with(" 4")),
        "plugin faults not counted:\n{text}"
    );
    assert!(text.contains("oxbox_http_requests_total{route=\"/v1/predict\",status=\"500\"} 3"));

    // A reload (SIGHUP here: this loopback server has no token for the
    // admin route) lifts the quarantine, and is audited.
    let hup = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let audit = wait_for_admin_events(&setup, 1);
    assert_eq!(audit[0].actor, "SIGHUP");
    assert_eq!(audit[0].outcome, "ok");
    assert_eq!(audit[0].after[0]["name"], "panics", "{audit:?}");
    assert_eq!(request(addr, "GET", "/v1/ready", &[], b"").status, 200);
    assert_eq!(predict().status, 500);
}

#[test]
fn with_no_model_configured_the_trained_demo_model_is_served() {
    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    let text = std::fs::read_to_string(&setup.config).expect("config");
    let without_model: String = text
        .lines()
        .filter(|l| !l.starts_with("package = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_model, text);
    std::fs::write(&setup.config, without_model).expect("config");
    // What the committed demo package is.
    let info = run(&[
        "model".as_ref(),
        "info".as_ref(),
        repo_root().join("host/assets/demo-model").as_os_str(),
    ]);
    assert!(info.status.success(), "{}", stderr(&info));
    let info: Value = serde_json::from_slice(&info.stdout).expect("model info JSON");

    let server = ServerProcess::start(&setup.config);
    let model = request(server.addr, "GET", "/v1/model", &[], b"").json();
    assert_eq!(model["model"]["trained"], true, "{model}");
    assert_eq!(model["model"]["digest"], info["digest"], "{model}");
    let (dicom, record) = sample_case();
    let body = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let ct = multipart_type();
    let reply = request(
        server.addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", &ct)],
        &body,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let prediction = reply.json();
    assert_eq!(prediction["model"]["trained"], true);
    assert_eq!(prediction["model"]["digest"], info["digest"]);
    let h24 = &prediction["horizons"]["24h"];
    let p = |k: &str| h24[k].as_f64().expect("probability");
    assert!(p("p_o2_any") >= p("p_o2_high_flow_or_niv"), "{h24}");
    // The package was written under the data dir, once.
    let models = std::fs::read_dir(setup.dir.path().join("data/models"))
        .expect("data/models")
        .count();
    assert_eq!(models, 1);
}

/// The audit database's administrative records once there are `n` (within
/// 20 s).
pub(crate) fn wait_for_admin_events(setup: &Setup, n: usize) -> Vec<oxbox::store::AdminRecord> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = oxbox::store::AuditLog::open(&setup.data_dir())
            .expect("audit database")
            .admin_tail(100)
            .expect("admin events");
        if events.len() >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{} admin event(s), expected {n}: {events:?}",
            events.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
