//! oxbox beside a real PACS: Debian's Orthanc (`/usr/sbin/Orthanc`,
//! installed by `scripts/setup.sh --tests`), started by the test on
//! loopback with a configuration of its own (storage under a temporary
//! folder, free ports, no plugins, stores accepted only from oxbox's AE
//! title on 127.0.0.1). Orthanc receives RG1 by its REST API, pushes the
//! study to oxbox's listener by C-STORE, and receives oxbox's result SR
//! back by C-STORE (`[dicom.forward]`); what Orthanc then holds is checked
//! through its REST API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::dicom_listener::{DicomServer, EMR_TOKEN, dicom_setup, study_copy};
use crate::serve::{Reply, request};
use crate::util::{corpus_file, free_port};

/// Where Debian's package puts the server.
const ORTHANC: &str = "/usr/sbin/Orthanc";
/// Orthanc's AE title, and the name it knows oxbox by.
const ORTHANC_AET: &str = "ORTHANC";
const OXBOX_MODALITY: &str = "oxbox";

/// A running Orthanc, killed on drop if the test did not stop it.
struct Orthanc {
    child: Child,
    http: SocketAddr,
    dicom_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Orthanc {
    /// Starts Orthanc on free loopback ports, `oxbox_dicom` as its only
    /// known modality, and waits for its REST API.
    fn start(dicom_port: u16, oxbox_dicom: SocketAddr) -> Self {
        assert!(
            Path::new(ORTHANC).is_file(),
            "{ORTHANC} missing: run scripts/setup.sh --tests (Debian's orthanc package)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        let http_port = free_port();
        let config = json!({
            "Name": "oxbox-e2e",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [],
            "HttpServerEnabled": true,
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "OrthancExplorerEnabled": false,
            "WebDavEnabled": false,
            "KeepAlive": false,
            "HttpCompressionEnabled": false,
            "SaveJobs": false,
            "DicomServerEnabled": true,
            "DicomAet": ORTHANC_AET,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": true,
            // Only oxbox, from loopback, may store (its result SR).
            "DicomAlwaysAllowEcho": false,
            "DicomAlwaysAllowStore": false,
            "DicomCheckModalityHost": true,
            "DicomAssociationCloseDelay": 0,
            "DicomModalities": {
                OXBOX_MODALITY: {
                    "AET": "OXBOX",
                    "Host": oxbox_dicom.ip().to_string(),
                    "Port": oxbox_dicom.port(),
                    "AllowEcho": true,
                    "AllowStore": true,
                    "AllowFind": false,
                    "AllowMove": false,
                    "AllowGet": false,
                }
            },
        });
        let config_path = dir.path().join("orthanc.json");
        std::fs::write(&config_path, config.to_string()).expect("orthanc.json");
        let log = dir.path().join("orthanc.log");
        let child = Command::new(ORTHANC)
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log).expect("log")))
            .stderr(Stdio::from(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            ))
            .spawn()
            .expect("start Orthanc");
        let mut orthanc = Self {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            dicom_port,
            log,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = orthanc.child.try_wait() {
                panic!("Orthanc exited ({status}):\n{}", orthanc.log_text());
            }
            if std::net::TcpStream::connect(orthanc.http).is_ok()
                && request(orthanc.http, "GET", "/system", &[], b"").status == 200
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Orthanc's REST API did not come up:\n{}",
                orthanc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let system = orthanc.get("/system");
        assert_eq!(system["DicomPort"], dicom_port, "{system}");
        assert_eq!(system["DicomAet"], ORTHANC_AET, "{system}");
        orthanc
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A REST call that must answer 200 with JSON.
    fn call(&self, method: &str, path: &str, body: &[u8]) -> Value {
        let reply: Reply = request(self.http, method, path, &[], body);
        assert_eq!(
            reply.status,
            200,
            "Orthanc {method} {path}: {}\n{}",
            String::from_utf8_lossy(&reply.body),
            self.log_text()
        );
        reply.json()
    }

    fn get(&self, path: &str) -> Value {
        self.call("GET", path, b"")
    }

    /// Stops Orthanc by its REST API and waits for it to exit.
    fn shutdown(mut self) -> ExitStatus {
        self.call("POST", "/tools/shutdown", b"");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "Orthanc did not exit after /tools/shutdown:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every value of `key` anywhere in Orthanc's simplified tags (`?simplify`:
/// sequences are arrays of objects, values strings).
fn values_of<'a>(tags: &'a Value, key: &str, out: &mut Vec<&'a str>) {
    match tags {
        Value::Object(map) => {
            for (name, value) in map {
                if name == key
                    && let Some(text) = value.as_str()
                {
                    out.push(text);
                }
                values_of(value, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| values_of(i, key, out)),
        _ => {}
    }
}

/// The NUM content items of an SR's simplified tags: (concept code value,
/// Numeric Value (DS), Floating Point Value (FD)).
fn num_items(tags: &Value, out: &mut Vec<(String, f64, f64)>) {
    match tags {
        Value::Object(map) => {
            if tags["ValueType"] == "NUM" {
                let code = tags["ConceptNameCodeSequence"][0]["CodeValue"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a NUM item without a concept code: {tags}"))
                    .to_owned();
                let measured = &tags["MeasuredValueSequence"][0];
                let number = |key: &str| -> f64 {
                    measured[key]
                        .as_str()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or_else(|| panic!("{code}: {key} {measured}"))
                };
                out.push((
                    code.clone(),
                    number("NumericValue"),
                    number("FloatingPointValue"),
                ));
            }
            map.values().for_each(|v| num_items(v, out));
        }
        Value::Array(items) => items.iter().for_each(|i| num_items(i, out)),
        _ => {}
    }
}

/// The result JSON field each private code of the SR carries
/// (`firmware-notes/dicom-conformance.md`, the 99OXBOX scheme).
const CODES: [(&str, &str, &str); 8] = [
    ("P-O2-ANY-24H", "24h", "p_o2_any"),
    ("P-HFNIV-24H", "24h", "p_o2_high_flow_or_niv"),
    ("P-VENTDEATH-24H", "24h", "p_ventilation_or_death"),
    ("EXAM-SCORE-24H", "24h", "exam_score"),
    ("P-O2-ANY-72H", "72h", "p_o2_any"),
    ("P-HFNIV-72H", "72h", "p_o2_high_flow_or_niv"),
    ("P-VENTDEATH-72H", "72h", "p_ventilation_or_death"),
    ("EXAM-SCORE-72H", "72h", "exam_score"),
];

#[test]
fn orthanc_pushes_a_study_and_receives_the_result_sr() {
    // oxbox first (it prints its DICOM port), its result SRs forwarded to
    // the port Orthanc will take.
    let orthanc_dicom = free_port();
    let server = DicomServer::start(dicom_setup(&format!(
        "\n[dicom.forward]\nenabled = true\nhost = \"127.0.0.1\"\nport = {orthanc_dicom}\n\
         called_ae_title = \"{ORTHANC_AET}\"\nretries = 2\nretry_backoff_s = 0.2\ntimeout_s = 10\n"
    )));
    let orthanc = Orthanc::start(orthanc_dicom, server.dicom);
    assert_eq!(orthanc.dicom_port, orthanc_dicom);

    // RG1 into Orthanc by REST, as a modality would have sent it.
    let work = tempfile::tempdir().expect("tempdir");
    let (file, study_uid) = study_copy(
        &corpus_file("rg1_explicit_le.dcm"),
        work.path(),
        31,
        "ACC-ORTHANC-31",
    );
    let source_sop = format!("{study_uid}.1.1");
    let uploaded = orthanc.call(
        "POST",
        "/instances",
        &std::fs::read(&file).expect("study file"),
    );
    assert_eq!(uploaded["Status"], "Success", "{uploaded}");
    let study_id = uploaded["ParentStudy"]
        .as_str()
        .expect("ParentStudy")
        .to_owned();
    let source_series = uploaded["ParentSeries"]
        .as_str()
        .expect("ParentSeries")
        .to_owned();

    // The EMR record, then Orthanc pushes the study to oxbox.
    assert_eq!(server.post_emr("ACC-ORTHANC-31", EMR_TOKEN).status, 202);
    let pushed = orthanc.call(
        "POST",
        &format!("/modalities/{OXBOX_MODALITY}/store"),
        json!({"Resources": [study_id], "Synchronous": true})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(pushed["InstancesCount"], 1, "{pushed}");
    assert_eq!(pushed["FailedInstancesCount"], 0, "{pushed}");
    let done = server.wait_for(&study_uid, &["done", "failed", "expired"]);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["image_only"], false, "{done}");
    let horizons = &done["result"]["horizons"];

    // Orthanc receives the result SR: a second series in the same study.
    let started = Instant::now();
    let sr_series = loop {
        let series = orthanc.get(&format!("/studies/{study_id}"))["Series"]
            .as_array()
            .expect("Series")
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .filter(|s| *s != source_series)
            .collect::<Vec<_>>();
        if !series.is_empty() {
            assert_eq!(series.len(), 1, "{series:?}");
            break orthanc.get(&format!("/series/{}", series[0]));
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Orthanc received no result SR\noxbox log:\n{}\nOrthanc log:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default(),
            orthanc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let series_tags = &sr_series["MainDicomTags"];
    assert_eq!(series_tags["Modality"], "SR", "{sr_series}");
    assert!(
        series_tags["SeriesDescription"]
            .as_str()
            .is_some_and(|d| d.contains("NOT FOR DIAGNOSTIC USE")),
        "{sr_series}"
    );
    let instances = sr_series["Instances"].as_array().expect("Instances");
    assert_eq!(instances.len(), 1, "{sr_series}");
    let instance = instances[0].as_str().expect("instance id");
    let tags = orthanc.get(&format!("/instances/{instance}/tags?simplify"));
    assert_eq!(tags["SOPClassUID"], "1.2.840.10008.5.1.4.1.1.88.33");
    assert_eq!(tags["StudyInstanceUID"], study_uid.as_str());
    assert_eq!(tags["VerificationFlag"], "UNVERIFIED");
    assert_eq!(tags["CompletionFlag"], "COMPLETE");

    // It references the source image, and only it.
    let mut referenced = Vec::new();
    values_of(&tags, "ReferencedSOPInstanceUID", &mut referenced);
    assert!(!referenced.is_empty(), "no reference in {tags:#}");
    assert!(
        referenced.iter().all(|uid| *uid == source_sop),
        "{referenced:?}, expected {source_sop}"
    );

    // Its eight numbers are the JSON result's: Numeric Value (DS, six
    // decimals) within 5e-7 plus rounding, Floating Point Value (FD, the
    // f32 widened) within 1e-7.
    let mut numbers = Vec::new();
    num_items(&tags, &mut numbers);
    assert_eq!(numbers.len(), CODES.len(), "{numbers:?}");
    for (code, horizon, field) in CODES {
        let expected = horizons[horizon][field]
            .as_f64()
            .unwrap_or_else(|| panic!("{horizon}.{field} in {done}"));
        let (_, ds, fd) = numbers
            .iter()
            .find(|(c, _, _)| c == code)
            .unwrap_or_else(|| panic!("{code} missing from {numbers:?}"));
        assert!(
            (ds - expected).abs() <= 5.01e-7,
            "{code}: DS {ds}, JSON {expected}"
        );
        assert!(
            (fd - expected).abs() <= 1e-7,
            "{code}: FD {fd}, JSON {expected}"
        );
    }

    // Both stop cleanly: Orthanc by its REST API, oxbox on SIGTERM.
    let orthanc_exit = orthanc.shutdown();
    assert!(orthanc_exit.success(), "Orthanc exited with {orthanc_exit}");
    let mut server = server;
    let oxbox_exit = server
        .server
        .stop(Duration::from_secs(30))
        .expect("oxbox did not stop within 30 s of SIGTERM");
    assert!(oxbox_exit.success(), "oxbox exited with {oxbox_exit}");
    let log = std::fs::read_to_string(&server.log).expect("oxbox log");
    assert!(
        log.contains("sent to the PACS (status 0x0000"),
        "no forwarding in the oxbox log:\n{log}"
    );
    assert!(!log.contains("ACC-ORTHANC-31"), "accession number logged");
}
