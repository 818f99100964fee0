//! The DICOM listener of `oxbox serve` against real Debian peers (dcmtk's
//! `echoscu` and `storescu`) and hostile hand-made byte streams: C-ECHO,
//! C-STORE of RG1 in every transfer syntax the box accepts (each proposed
//! with the storescu flag it needs, and checked stored in that syntax),
//! AE title rejection, malformed, truncated, silent and oversized PDUs
//! beside a good association, EMR matching in both orders and expiry, the
//! result route against the OpenAPI document, no accession number in the
//! log.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::serve::{Reply, ServerProcess, Setup, assert_conforms, openapi, request};
use crate::util::{corpus_file, repo_root};

pub(crate) const EMR_TOKEN: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A server with the DICOM listener on: its process, HTTP and DICOM
/// addresses, and the setup (data dir, config).
pub(crate) struct DicomServer {
    pub(crate) server: ServerProcess,
    pub(crate) dicom: SocketAddr,
    pub(crate) setup: Setup,
    pub(crate) log: PathBuf,
}

/// A setup with `[dicom]` enabled (`extra`: more `[dicom]` lines).
pub(crate) fn dicom_setup(extra: &str) -> Setup {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    let token = setup.dir.path().join("emr-token");
    std::fs::write(&token, format!("{EMR_TOKEN}\n")).expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    setup.append(&format!(
        "[dicom]\nenabled = true\nlisten = \"127.0.0.1:0\"\nae_title = \"OXBOX\"\n\
         allowed_calling_ae_titles = [\"STORESCU\", \"ECHOSCU\", \"OXTEST\", \"ORTHANC\"]\n\
         emr_token_file = \"{}\"\nmin_free_disk_mib = 1\n{extra}\n",
        token.display()
    ));
    setup
}

impl DicomServer {
    pub(crate) fn start(setup: Setup) -> Self {
        let log = setup.dir.path().join("server.log");
        let (server, lines) = ServerProcess::start_logged_reading(&setup.config, &log, 1);
        let dicom = lines[0]
            .strip_prefix("dicom listening on ")
            .unwrap_or_else(|| panic!("unexpected second line {:?}", lines[0]))
            .parse()
            .expect("dicom address");
        Self {
            server,
            dicom,
            setup,
            log,
        }
    }

    pub(crate) fn port(&self) -> String {
        self.dicom.port().to_string()
    }

    pub(crate) fn get(&self, path: &str) -> Reply {
        request(self.server.addr, "GET", path, &[], b"")
    }

    pub(crate) fn post_emr(&self, accession: &str, token: &str) -> Reply {
        let record: Value = serde_json::from_slice(
            &std::fs::read(repo_root().join("samples/example-site-record.json")).expect("record"),
        )
        .expect("record JSON");
        let body = serde_json::json!({"accession_number": accession, "emr": record}).to_string();
        let auth = format!("Bearer {token}");
        request(
            self.server.addr,
            "POST",
            "/v1/emr",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            body.as_bytes(),
        )
    }

    /// Polls the study's result until its state is one of `states`.
    pub(crate) fn wait_for(&self, study: &str, states: &[&str]) -> Value {
        let path = format!("/v1/studies/{study}/result");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self.get(&path);
            if reply.status == 200 {
                let body = reply.json();
                if states.iter().any(|s| body["state"] == *s) {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "study {study} never reached {states:?}: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn metrics(&self) -> String {
        String::from_utf8(self.get("/metrics").body).expect("metrics text")
    }

    /// Asserts that `/metrics` has each of `lines`.
    pub(crate) fn assert_metrics(&self, lines: &[&str]) {
        let metrics = self.metrics();
        for line in lines {
            assert!(metrics.contains(line), "{line} missing:\n{metrics}");
        }
    }

    pub(crate) fn instances(&self) -> Vec<PathBuf> {
        let dir = self.setup.data_dir().join("dicom/instances");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }
}

/// A copy of `source` in `dir` with its own study, series and instance
/// UIDs and accession number (dcmodify, which keeps the transfer syntax).
pub(crate) fn study_copy(source: &Path, dir: &Path, n: u32, accession: &str) -> (PathBuf, String) {
    let study = format!("1.2.826.0.1.3680043.10.1234.{n}");
    let out = dir.join(format!("study-{n}.dcm"));
    std::fs::copy(source, &out).expect("copy");
    let status = Command::new("dcmodify")
        .args([
            "-nb",
            "-m",
            &format!("(0020,000d)={study}"),
            "-m",
            &format!("(0020,000e)={study}.1"),
            "-m",
            &format!("(0008,0018)={study}.1.1"),
            "-m",
            &format!("(0008,0050)={accession}"),
        ])
        .arg(&out)
        .status()
        .expect("dcmodify (dcmtk: scripts/setup.sh --tests)");
    assert!(status.success(), "dcmodify {}", out.display());
    (out, study)
}

pub(crate) fn dcmtk(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (dcmtk: scripts/setup.sh --tests)"))
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The transfer syntax UID in a Part 10 file's meta group.
fn transfer_syntax_of(path: &Path) -> String {
    let out = dcmtk(
        "dcmdump",
        &[
            "-q",
            "-M",
            "-Un",
            "+P",
            "0002,0010",
            &path.to_string_lossy(),
        ],
    );
    // `(0002,0010) UI [1.2.840.10008.1.2.1]   # 20, 1 TransferSyntaxUID`
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = line
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map_or("", |(uid, _)| uid);
    value.trim_end_matches('\0').trim().to_owned()
}

/// RG1 in every transfer syntax of the corpus, the storescu flag that
/// proposes it, and its UID.
const SYNTAXES: [(&str, &str, &str); 12] = [
    ("rg1_explicit_le.dcm", "-xe", "1.2.840.10008.1.2.1"),
    ("rg1_implicit_le.dcm", "-xi", "1.2.840.10008.1.2"),
    ("rg1_explicit_be.dcm", "-xb", "1.2.840.10008.1.2.2"),
    ("rg1_deflated.dcm", "-xd", "1.2.840.10008.1.2.1.99"),
    ("rg1_rle16.dcm", "-xr", "1.2.840.10008.1.2.5"),
    ("rg1_jpeg_lossless_sv1.dcm", "-xs", "1.2.840.10008.1.2.4.70"),
    ("rg1_jpeg_baseline.dcm", "-xy", "1.2.840.10008.1.2.4.50"),
    ("rg1_jpeg_extended12.dcm", "-xx", "1.2.840.10008.1.2.4.51"),
    ("rg1_j2k_lossless_gdcm.dcm", "-xv", "1.2.840.10008.1.2.4.90"),
    ("rg1_j2k_lossy_gdcm.dcm", "-xw", "1.2.840.10008.1.2.4.91"),
    ("rg1_jpegls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),
    (
        "rg1_jpegls_near_lossless.dcm",
        "-xu",
        "1.2.840.10008.1.2.4.81",
    ),
];

pub(crate) fn storescu(server: &DicomServer, flags: &[&str], file: &Path) -> Output {
    let port = server.port();
    let mut args = vec!["-aec", "OXBOX", "-to", "30"];
    args.extend_from_slice(flags);
    let file = file.to_string_lossy().into_owned();
    args.extend_from_slice(&["127.0.0.1", &port, &file]);
    dcmtk("storescu", &args)
}

#[test]
fn echo_store_in_every_transfer_syntax_and_ae_title_rejection() {
    let server = DicomServer::start(dicom_setup(""));
    let port = server.port();

    let echo = dcmtk(
        "echoscu",
        &["-aec", "OXBOX", "-to", "10", "127.0.0.1", &port],
    );
    assert!(echo.status.success(), "echoscu: {}", text(&echo));

    // An unknown calling AE title, and a wrong called one: rejected at
    // association with the service user's reason.
    let unknown = dcmtk(
        "echoscu",
        &[
            "-aet",
            "INTRUDER",
            "-aec",
            "OXBOX",
            "-to",
            "10",
            "127.0.0.1",
            &port,
        ],
    );
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&unknown)
    );
    let wrong_called = dcmtk(
        "echoscu",
        &["-aec", "SOMEONE", "-to", "10", "127.0.0.1", &port],
    );
    assert!(!wrong_called.status.success());
    assert!(
        text(&wrong_called).contains("Called AE Title Not Recognized"),
        "{}",
        text(&wrong_called)
    );

    // Every transfer syntax, each its own study; stored as received.
    let work = tempfile::tempdir().expect("tempdir");
    for (n, (name, flag, uid)) in SYNTAXES.iter().enumerate() {
        let (file, study) = study_copy(&corpus_file(name), work.path(), n as u32 + 1, "ACC-TS");
        let sent = storescu(&server, &[flag, "-R"], &file);
        assert!(sent.status.success(), "{name} ({flag}): {}", text(&sent));
        let stored = server
            .setup
            .data_dir()
            .join(format!("dicom/instances/{study}.1.1.dcm"));
        assert!(
            stored.is_file(),
            "{name}: not stored at {}",
            stored.display()
        );
        assert_eq!(
            transfer_syntax_of(&stored),
            *uid,
            "{name}: stored in another syntax"
        );
        let state = server.get(&format!("/v1/studies/{study}/result")).json();
        assert_eq!(state["state"], "waiting", "{name}: {state}");
    }
    // A transfer syntax the ingest does not read, and a SOP class the box
    // does not store, are refused at negotiation (result 4: transfer
    // syntaxes not supported; 3: abstract syntax not supported).
    let cr = "1.2.840.10008.5.1.4.1.1.1";
    for (abstract_syntax, ts, expected) in [
        (cr, "1.2.840.10008.1.2.4.100", 4u8),
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", 3),
        (cr, "1.2.840.10008.1.2.1", 0),
    ] {
        let mut peer = TcpStream::connect(server.dicom).expect("connect");
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        peer.write_all(&associate_rq_for("OXTEST", abstract_syntax, ts))
            .expect("A-ASSOCIATE-RQ");
        let (kind, body) = read_pdu(&mut peer);
        assert_eq!(kind, 0x02, "{abstract_syntax} {ts}: not an A-ASSOCIATE-AC");
        assert_eq!(context_result(&body), expected, "{abstract_syntax} in {ts}");
        peer.write_all(&[0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
            .expect("A-RELEASE-RQ");
        assert_eq!(read_pdu(&mut peer).0, 0x06);
    }
    let metrics = server.metrics();
    assert!(
        metrics.contains(&format!(
            "oxbox_dicom_instances_total{{outcome=\"stored\"}} {}",
            SYNTAXES.len()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("oxbox_dicom_associations_total{outcome=\"rejected\"} 2"));
    // No temporary file left beside the instances.
    assert!(
        server
            .instances()
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "dcm")),
        "{:?}",
        server.instances()
    );
}

/// An A-ASSOCIATE-RQ from `calling` to OXBOX proposing Verification in
/// Implicit VR Little Endian, max PDU 16 KiB.
fn associate_rq(calling: &str) -> Vec<u8> {
    associate_rq_for(calling, "1.2.840.10008.1.1", "1.2.840.10008.1.2")
}

/// An A-ASSOCIATE-RQ from `calling` to OXBOX proposing `abstract_syntax`
/// in `transfer_syntax` as presentation context 1, max PDU 16 KiB.
fn associate_rq_for(calling: &str, abstract_syntax: &str, transfer_syntax: &str) -> Vec<u8> {
    fn item(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, 0];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    let ae = |s: &str| format!("{s:<16}").into_bytes();
    let mut context = vec![1, 0, 0, 0];
    context.extend(item(0x30, abstract_syntax.as_bytes()));
    context.extend(item(0x40, transfer_syntax.as_bytes()));
    let mut user = item(0x51, &16384u32.to_be_bytes());
    user.extend(item(0x52, b"1.2.3.4"));
    let mut body = vec![0, 1, 0, 0];
    body.extend(ae("OXBOX"));
    body.extend(ae(calling));
    body.extend([0u8; 32]);
    body.extend(item(0x10, b"1.2.840.10008.3.1.1.1"));
    body.extend(item(0x20, &context));
    body.extend(item(0x50, &user));
    let mut pdu = vec![0x01, 0];
    pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pdu.extend(body);
    pdu
}

/// Whether the server closed `stream` (EOF or reset) within `wait`,
/// reading and discarding what it sends.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn hostile_streams_do_not_disturb_a_good_association() {
    let server = DicomServer::start(dicom_setup("idle_timeout_s = 2\nmax_pdu_length = 16384"));
    let work = tempfile::tempdir().expect("tempdir");
    let (file, study) = study_copy(&corpus_file("rg1_explicit_le.dcm"), work.path(), 1, "ACC-H");

    // Garbage instead of a PDU.
    let mut garbage = TcpStream::connect(server.dicom).expect("connect");
    garbage.write_all(&[0xff; 64]).expect("garbage");
    // A truncated association request: the header promises more than comes.
    let mut truncated = TcpStream::connect(server.dicom).expect("connect");
    let rq = associate_rq("OXTEST");
    truncated.write_all(&rq[..rq.len() / 2]).expect("half");
    // An association that never sends.
    let mut silent = TcpStream::connect(server.dicom).expect("connect");
    // An accepted association, then a P-DATA PDU longer than max_pdu_length.
    let mut oversized = TcpStream::connect(server.dicom).expect("connect");
    oversized.write_all(&associate_rq("OXTEST")).expect("rq");
    let mut ac = [0u8; 6];
    oversized
        .read_exact(&mut ac)
        .expect("A-ASSOCIATE-AC header");
    assert_eq!(
        ac[0], 0x02,
        "expected A-ASSOCIATE-AC, got PDU type {:#x}",
        ac[0]
    );
    let length = u32::from_be_bytes([ac[2], ac[3], ac[4], ac[5]]) as usize;
    let mut rest = vec![0; length];
    oversized
        .read_exact(&mut rest)
        .expect("A-ASSOCIATE-AC body");
    let mut huge = vec![0x04, 0];
    huge.extend_from_slice(&(64u32 * 1024 * 1024).to_be_bytes());
    huge.extend_from_slice(&[0; 1024]);
    oversized.write_all(&huge).expect("oversized header");

    // Meanwhile a good peer stores and echoes.
    let started = Instant::now();
    let sent = storescu(&server, &["-xe"], &file);
    assert!(
        sent.status.success(),
        "storescu beside hostile peers: {}",
        text(&sent)
    );
    let echo = dcmtk(
        "echoscu",
        &["-aec", "OXBOX", "-to", "10", "127.0.0.1", &server.port()],
    );
    assert!(echo.status.success(), "{}", text(&echo));
    assert_eq!(
        server.get(&format!("/v1/studies/{study}/result")).json()["state"],
        "waiting"
    );

    // Each hostile connection is closed by the server: at once for the
    // garbage and the oversized PDU, after idle_timeout_s (2 s) for the
    // truncated and the silent ones.
    assert!(
        closed_within(&mut garbage, Duration::from_secs(5)),
        "garbage"
    );
    assert!(
        closed_within(&mut oversized, Duration::from_secs(5)),
        "oversized PDU"
    );
    assert!(
        closed_within(&mut truncated, Duration::from_secs(10)),
        "truncated"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)),
        "silent"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "hostile peers held the listener"
    );
    // A connection's outcome is counted as its thread ends, which may be
    // just after the socket closes.
    let failed = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("oxbox_dicom_associations_total{outcome=\"failed\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let counted = Instant::now();
    let mut metrics = server.metrics();
    while failed(&metrics) < 3 && counted.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        metrics = server.metrics();
    }
    assert!(failed(&metrics) >= 3, "{metrics}");
    assert!(
        metrics.contains("oxbox_dicom_associations_total{outcome=\"aborted\"} 1"),
        "{metrics}"
    );
}

#[test]
fn emr_before_or_after_the_image_yields_a_result_and_a_lone_image_expires() {
    let doc = openapi();
    let server = DicomServer::start(dicom_setup("emr_wait_s = 4"));
    let work = tempfile::tempdir().expect("tempdir");
    let rg1 = corpus_file("rg1_explicit_le.dcm");

    // The token is required, on loopback too.
    let refused = server.post_emr("ACC-EARLY-1", "wrong-token-wrong-token-wrong-token");
    assert_eq!(refused.status, 401);
    assert_conforms(&doc, "POST", "/v1/emr", &refused);

    // EMR record first, then the image.
    let early = server.post_emr("ACC-EARLY-1", EMR_TOKEN);
    assert_eq!(
        early.status,
        202,
        "{}",
        String::from_utf8_lossy(&early.body)
    );
    assert_conforms(&doc, "POST", "/v1/emr", &early);
    assert_eq!(early.json()["matched"], false);
    let (file, first) = study_copy(&rg1, work.path(), 1, "ACC-EARLY-1");
    assert!(storescu(&server, &["-xe"], &file).status.success());
    let done = server.wait_for(&first, &["done", "failed"]);
    assert_eq!(done["state"], "done", "{done}");

    // The image first, then its record.
    let (file, second) = study_copy(&rg1, work.path(), 2, "ACC-LATE-2");
    assert!(storescu(&server, &["-xe"], &file).status.success());
    let waiting = server.get(&format!("/v1/studies/{second}/result"));
    assert_conforms(
        &doc,
        "GET",
        "/v1/studies/{study_instance_uid}/result",
        &waiting,
    );
    assert_eq!(waiting.json()["state"], "waiting");
    let late = server.post_emr("ACC-LATE-2", EMR_TOKEN);
    assert_eq!(late.status, 200, "{}", String::from_utf8_lossy(&late.body));
    assert_conforms(&doc, "POST", "/v1/emr", &late);
    assert_eq!(late.json()["study_instance_uids"][0], second.as_str());
    let done_late = server.wait_for(&second, &["done", "failed"]);
    assert_eq!(done_late["state"], "done", "{done_late}");
    let reply = server.get(&format!("/v1/studies/{second}/result"));
    assert_conforms(
        &doc,
        "GET",
        "/v1/studies/{study_instance_uid}/result",
        &reply,
    );

    // Both orders give the same prediction (same film, same record) as the
    // HTTP route would: same horizons.
    assert_eq!(
        done["result"]["horizons"], done_late["result"]["horizons"],
        "the two orders disagree"
    );
    assert!(done["result"]["horizons"]["24h"]["p_o2_any"].is_number());

    // An image whose record never comes: waiting, then expired.
    let (file, lone) = study_copy(&rg1, work.path(), 3, "ACC-NEVER-3");
    assert!(storescu(&server, &["-xe"], &file).status.success());
    assert_eq!(
        server.get(&format!("/v1/studies/{lone}/result")).json()["state"],
        "waiting"
    );
    let expired = server.wait_for(&lone, &["expired", "done", "failed"]);
    assert_eq!(expired["state"], "expired", "{expired}");
    let reply = server.get(&format!("/v1/studies/{lone}/result"));
    assert_conforms(
        &doc,
        "GET",
        "/v1/studies/{study_instance_uid}/result",
        &reply,
    );
    let unknown = server.get("/v1/studies/1.2.3.4.5/result");
    assert_eq!(unknown.status, 404);
    assert_conforms(
        &doc,
        "GET",
        "/v1/studies/{study_instance_uid}/result",
        &unknown,
    );

    server.assert_metrics(&[
        "oxbox_studies_matched_total 2",
        "oxbox_studies_expired_total 1",
        "oxbox_studies_inferred_total{outcome=\"with_emr\"} 2",
    ]);
    // Both inferences are in the audit log.
    let audit = crate::util::run(&[
        "--config".as_ref(),
        server.setup.config.as_os_str(),
        "audit".as_ref(),
        "tail".as_ref(),
        "-n".as_ref(),
        "10".as_ref(),
    ]);
    let audit_text = String::from_utf8_lossy(&audit.stdout).into_owned();
    for id in [
        &done["result"]["request_id"],
        &done_late["result"]["request_id"],
    ] {
        let id = id.as_str().expect("request id");
        assert!(audit_text.contains(id), "{id} not audited:\n{audit_text}");
    }
    // Accession numbers never reach the log or the results.
    drop(server.server);
    let log = std::fs::read_to_string(&server.log).expect("log");
    for accession in ["ACC-EARLY-1", "ACC-LATE-2", "ACC-NEVER-3"] {
        assert!(
            !log.contains(accession),
            "{accession} in the server log:\n{log}"
        );
        assert!(!done.to_string().contains(accession));
        assert!(!audit_text.contains(accession));
    }
}

#[test]
fn a_study_whose_record_never_comes_is_inferred_image_only() {
    let doc = openapi();
    let server = DicomServer::start(dicom_setup("emr_wait_s = 3\nimage_only = true"));
    let work = tempfile::tempdir().expect("tempdir");
    let (file, study) = study_copy(
        &corpus_file("rg1_explicit_le.dcm"),
        work.path(),
        41,
        "ACC-ALONE-41",
    );
    assert!(storescu(&server, &["-xe"], &file).status.success());
    let path = format!("/v1/studies/{study}/result");
    let waiting = server.get(&path).json();
    assert_eq!(waiting["state"], "waiting", "{waiting}");
    assert!(waiting["waits_for_s"].as_i64().is_some_and(|s| s <= 3));

    // After emr_wait_s the sweeper claims it without a record.
    let done = server.wait_for(&study, &["done", "failed", "expired"]);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["image_only"], true, "{done}");
    assert!(
        done["result"]["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("image only")))),
        "no image-only warning in {done}"
    );
    assert_conforms(
        &doc,
        "GET",
        "/v1/studies/{study_instance_uid}/result",
        &server.get(&path),
    );
    // The prediction is the one for the film with an empty record.
    let empty = work.path().join("empty.json");
    std::fs::write(&empty, "{}").expect("empty record");
    let cli = crate::util::run(&[
        "--config".as_ref(),
        server.setup.config.as_os_str(),
        "predict".as_ref(),
        "--dicom".as_ref(),
        file.as_os_str(),
        "--emr".as_ref(),
        empty.as_os_str(),
    ]);
    assert!(cli.status.success(), "{}", crate::util::stderr(&cli));
    let cli: Value = serde_json::from_slice(&cli.stdout).expect("CLI JSON");
    assert_eq!(done["result"]["horizons"], cli["horizons"]);

    // Its result SR is kept like any other, and says it had no record.
    let kept = server
        .setup
        .data_dir()
        .join(format!("dicom/results/{study}.1.1.dcm"));
    let started = Instant::now();
    while !kept.is_file() {
        assert!(started.elapsed() < Duration::from_secs(30), "no result SR");
        std::thread::sleep(Duration::from_millis(100));
    }
    // +L: the comment in full (dcmdump cuts long values).
    let dump = dcmtk("dcmdump", &["-q", "-Un", "+L", &kept.to_string_lossy()]);
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains("without an EMR record"),
        "{}",
        text(&dump)
    );
    server.assert_metrics(&[
        "oxbox_studies_inferred_total{outcome=\"image_only\"} 1",
        "oxbox_studies_expired_total 0",
        "oxbox_studies_matched_total 0",
    ]);
}

/// Reads one PDU: its type and body.
fn read_pdu(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).expect("PDU header");
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("PDU body");
    (header[0], body)
}

/// Sends `data` on presentation context 1 as P-DATA-TF PDUs of at most
/// 16 KiB, the last fragment flagged last when `last`.
fn send_pdata(stream: &mut TcpStream, command: bool, data: &[u8], last: bool) {
    let chunks: Vec<&[u8]> = data.chunks(16_000).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = u8::from(command) | if last && i + 1 == chunks.len() { 2 } else { 0 };
        let mut pdu = vec![0x04, 0];
        pdu.extend_from_slice(&(chunk.len() as u32 + 6).to_be_bytes());
        pdu.extend_from_slice(&(chunk.len() as u32 + 2).to_be_bytes());
        pdu.extend_from_slice(&[1, flags]);
        pdu.extend_from_slice(chunk);
        stream.write_all(&pdu).expect("P-DATA");
    }
}

/// A C-STORE-RQ command set (Implicit VR Little Endian).
fn c_store_rq(sop_class: &str, sop_instance: &str, message_id: u16) -> Vec<u8> {
    fn element(out: &mut Vec<u8>, element: u16, value: &[u8]) {
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    let uid = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if !v.len().is_multiple_of(2) {
            v.push(0);
        }
        v
    };
    let mut body = Vec::new();
    element(&mut body, 0x0002, &uid(sop_class));
    element(&mut body, 0x0100, &1u16.to_le_bytes());
    element(&mut body, 0x0110, &message_id.to_le_bytes());
    element(&mut body, 0x0700, &0u16.to_le_bytes());
    element(&mut body, 0x0800, &0u16.to_le_bytes());
    element(&mut body, 0x1000, &uid(sop_instance));
    let mut out = Vec::new();
    element(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// The Status (0000,0900) of the response command in a P-DATA-TF body.
fn response_status(pdata: &[u8]) -> u16 {
    // One PDV: length (4), context (1), flags (1), then the command set.
    let command = &pdata[6..];
    let mut at = 0;
    while at + 8 <= command.len() {
        let group = u16::from_le_bytes([command[at], command[at + 1]]);
        let element = u16::from_le_bytes([command[at + 2], command[at + 3]]);
        let length = u32::from_le_bytes([
            command[at + 4],
            command[at + 5],
            command[at + 6],
            command[at + 7],
        ]) as usize;
        if (group, element) == (0x0000, 0x0900) {
            return u16::from_le_bytes([command[at + 8], command[at + 9]]);
        }
        at += 8 + length;
    }
    panic!("no Status in the response");
}

/// The data set of a Part 10 file in Explicit VR Little Endian (after its
/// file meta group).
fn data_set_of(file: &[u8]) -> &[u8] {
    assert_eq!(&file[128..132], b"DICM");
    let group_length = u32::from_le_bytes([file[140], file[141], file[142], file[143]]) as usize;
    &file[144 + group_length..]
}

#[test]
fn a_store_during_shutdown_is_completed_and_a_later_one_refused() {
    let server = DicomServer::start(dicom_setup("max_pdu_length = 16384"));
    let work = tempfile::tempdir().expect("tempdir");
    let (file, study) = study_copy(&corpus_file("rg1_explicit_le.dcm"), work.path(), 1, "ACC-S");
    let bytes = std::fs::read(&file).expect("file");
    let data_set = data_set_of(&bytes);
    let cr = "1.2.840.10008.5.1.4.1.1.1";
    let instance = format!("{study}.1.1");

    let mut peer = TcpStream::connect(server.dicom).expect("connect");
    peer.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    peer.write_all(&associate_rq_for("OXTEST", cr, "1.2.840.10008.1.2.1"))
        .expect("A-ASSOCIATE-RQ");
    let (kind, _) = read_pdu(&mut peer);
    assert_eq!(kind, 0x02, "association not accepted");
    send_pdata(&mut peer, true, &c_store_rq(cr, &instance, 1), true);
    let half = data_set.len() / 2;
    send_pdata(&mut peer, false, &data_set[..half], false);
    // The store is in progress once the server has read its command; on a
    // loaded machine that can take a moment after the bytes are sent
    // (a SIGTERM before it makes the store a refused later one).
    std::thread::sleep(Duration::from_millis(1000));

    // SIGTERM while the data set is half sent.
    let pid = server.server.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    std::thread::sleep(Duration::from_millis(500));
    send_pdata(&mut peer, false, &data_set[half..], true);
    let (kind, response) = read_pdu(&mut peer);
    assert_eq!(kind, 0x04);
    assert_eq!(
        response_status(&response),
        0x0000,
        "the store in progress was not completed"
    );
    let stored = server
        .setup
        .data_dir()
        .join(format!("dicom/instances/{instance}.dcm"));
    let written = std::fs::read(&stored).expect("stored instance");
    assert_eq!(
        data_set_of(&written),
        data_set,
        "the stored data set differs"
    );

    // A later store on the same association is refused, not half-written.
    send_pdata(
        &mut peer,
        true,
        &c_store_rq(cr, "1.2.826.0.1.3680043.10.1234.77.1", 2),
        true,
    );
    send_pdata(&mut peer, false, data_set, true);
    let (kind, response) = read_pdu(&mut peer);
    assert_eq!(kind, 0x04);
    assert_eq!(
        response_status(&response),
        0xA700,
        "a store after shutdown was taken"
    );
    // Release; the server then exits.
    peer.write_all(&[0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
        .expect("A-RELEASE-RQ");
    let (kind, _) = read_pdu(&mut peer);
    assert_eq!(kind, 0x06, "no A-RELEASE-RP");
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.server.is_running() {
        assert!(
            Instant::now() < deadline,
            "the server did not exit after the release"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let files = server.instances();
    assert_eq!(files, vec![stored], "one whole instance, nothing else");
}

/// The result of presentation context 1 in an A-ASSOCIATE-AC body.
fn context_result(body: &[u8]) -> u8 {
    // Fixed part: protocol version (2), reserved (2), AE titles (32),
    // reserved (32); then items: type (1), reserved (1), length (2).
    let mut at = 68;
    while at + 4 <= body.len() {
        let kind = body[at];
        let length = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        if kind == 0x21 {
            return body[at + 6];
        }
        at += 4 + length;
    }
    panic!("no presentation context item in the A-ASSOCIATE-AC");
}

/// Files a dcmtk `storescp` wrote into `dir` (it names them by modality
/// and SOP Instance UID).
fn received_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn an_inferred_study_gets_a_result_sr_kept_and_sent_to_the_pacs() {
    // The hospital's PACS: dcmtk's storescp on loopback.
    let pacs_dir = tempfile::tempdir().expect("tempdir");
    let pacs_port = crate::util::free_port();
    // Killed on drop: a failed assertion must not leave it running.
    let _pacs = crate::util::KillOnDrop(
        Command::new("storescp")
            .args(["-aet", "PACS", "-od"])
            .arg(pacs_dir.path())
            .arg(pacs_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("storescp (dcmtk)"),
    );
    let up = Instant::now();
    while TcpStream::connect(("127.0.0.1", pacs_port)).is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "storescp did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let server = DicomServer::start(dicom_setup(&format!(
        "\n[dicom.forward]\nenabled = true\nhost = \"127.0.0.1\"\nport = {pacs_port}\n\
         called_ae_title = \"PACS\"\nretries = 2\nretry_backoff_s = 0.2\ntimeout_s = 10\n"
    )));
    let work = tempfile::tempdir().expect("tempdir");
    let (file, study) = study_copy(
        &corpus_file("rg1_explicit_le.dcm"),
        work.path(),
        7,
        "ACC-SR-7",
    );
    assert_eq!(server.post_emr("ACC-SR-7", EMR_TOKEN).status, 202);
    assert!(storescu(&server, &["-xe"], &file).status.success());
    let done = server.wait_for(&study, &["done", "failed"]);
    assert_eq!(done["state"], "done", "{done}");

    // Kept beside the instance, and received by the PACS.
    let kept = server
        .setup
        .data_dir()
        .join(format!("dicom/results/{study}.1.1.dcm"));
    let started = Instant::now();
    let received = loop {
        let files = received_files(pacs_dir.path());
        if kept.is_file() && !files.is_empty() {
            break files;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no result SR: kept {}, received {files:?}",
            kept.is_file()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(received.len(), 1, "{received:?}");
    let dump = dcmtk("dcmdump", &["-q", "-Un", &received[0].to_string_lossy()]);
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    for expected in [
        "1.2.840.10008.5.1.4.1.1.88.33", // Comprehensive SR
        "NOT FOR DIAGNOSTIC USE",
        "UNVERIFIED",
        &format!("{study}.1.1"), // references the source image
        &study,                  // in the source's study
    ] {
        assert!(dump.contains(expected), "{expected} missing from\n{dump}");
    }
}
