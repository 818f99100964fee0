//! Studies received over DICOM: which images are inferred (the frontal
//! chest rule of `[dicom]`), where they are kept and for how long, how each
//! is matched to its EMR record (by accession number, whichever comes
//! first, within `dicom.emr_wait_s`), and the results.
//!
//! - [`storage`]: instances written atomically under the data dir;
//! - [`db`]: the studies database (SQLite): states, records, results;
//! - [`result_object`]: a result as a DICOM Comprehensive SR, kept and sent
//!   to the PACS.
//!
//! This module decides and records; it runs no model. The server
//! ([`crate::serve`]) infers what [`Studies`] hands it as [`Claimed`] and
//! reports back with [`Studies::complete`] / [`Studies::fail`] /
//! [`Studies::requeue`]. Accession numbers and records stay in the database
//! only while their study waits; logs name a study by its UID's
//! [`fingerprint`], never by a patient identifier or accession number.

pub mod db;
pub mod result_object;
pub mod storage;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use db::{Claimed, StudyRow, StudyState};

use crate::config::{Config, DicomConfig};
use crate::pipeline::PredictionReport;
use db::StudyDb;
use storage::InstanceStorage;

/// Errors of the studies store.
#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    /// The database failed.
    #[error("studies database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (a path under the data dir).
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database lock was poisoned by a panic.
    #[error("studies database lock poisoned")]
    Poisoned,
}

impl StudyError {
    fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StudyError {
        let what = format!("{what} {}", path.display());
        move |source| StudyError::Io { what, source }
    }
}

/// What the rule and the matching need of a received image.
#[derive(Debug, Clone, Default)]
pub struct ImageAttributes {
    /// Study Instance UID (0020,000D).
    pub study_uid: String,
    /// SOP Instance UID (0008,0018).
    pub sop_instance_uid: String,
    /// Accession Number (0008,0050), trimmed; `None` when absent or empty.
    pub accession: Option<String>,
    /// Modality (0008,0060).
    pub modality: Option<String>,
    /// Body Part Examined (0018,0015).
    pub body_part: Option<String>,
    /// View Position (0018,5101).
    pub view_position: Option<String>,
}

/// What became of a received image.
#[derive(Debug)]
pub enum Received {
    /// Not a frontal chest radiograph by the rule: acknowledged, not kept.
    Ignored,
    /// Its study already has an image: acknowledged, not kept.
    Duplicate,
    /// Stored and waiting; `Some` when its record was already here.
    Stored(Option<Claimed>),
}

/// The frontal chest rule of `[dicom]`: each list empty = any value; a
/// missing attribute passes only an empty list. Values compare without case
/// and padding.
#[derive(Debug, Clone)]
pub struct FrontalRule {
    modalities: Vec<String>,
    body_parts: Vec<String>,
    view_positions: Vec<String>,
}

impl FrontalRule {
    /// The rule of `config`.
    pub fn new(config: &DicomConfig) -> Self {
        let upper = |list: &[String]| -> Vec<String> {
            list.iter().map(|v| v.trim().to_ascii_uppercase()).collect()
        };
        Self {
            modalities: upper(&config.modalities),
            body_parts: upper(&config.body_parts),
            view_positions: upper(&config.view_positions),
        }
    }

    /// Whether `image` is inferred.
    pub fn matches(&self, image: &ImageAttributes) -> bool {
        let passes = |list: &[String], value: &Option<String>| {
            list.is_empty()
                || value
                    .as_deref()
                    .is_some_and(|v| list.iter().any(|l| *l == v.trim().to_ascii_uppercase()))
        };
        passes(&self.modalities, &image.modality)
            && passes(&self.body_parts, &image.body_part)
            && passes(&self.view_positions, &image.view_position)
    }
}

/// The first 12 hex digits of the SHA-256 of `value`: how logs name a
/// study or an accession number.
pub fn fingerprint(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    hex::encode(&digest.as_ref()[..6])
}

/// Whether `accession` is a usable Accession Number (SH: 1 to 16
/// characters, printable, no backslash).
pub fn is_accession_number(accession: &str) -> bool {
    (1..=16).contains(&accession.len())
        && accession
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        && !accession.trim().is_empty()
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Studies to infer now: matched (a retry after overload, or a record
    /// that came while the server was down) or image-only.
    pub claimed: Vec<Claimed>,
    /// Studies that expired.
    pub expired: usize,
    /// Records deleted unmatched.
    pub records_expired: usize,
    /// Instance files deleted at the end of their retention.
    pub files_deleted: usize,
    /// Studies waiting after the sweep.
    pub waiting: u64,
}

/// The studies of this box.
#[derive(Debug)]
pub struct Studies {
    db: Mutex<StudyDb>,
    storage: InstanceStorage,
    rule: FrontalRule,
    emr_wait: Duration,
    emr_expiry: Duration,
    retention: Duration,
    image_only: bool,
    min_free_bytes: u64,
}

impl Studies {
    /// Opens the database and the instance folder under `data_dir`.
    ///
    /// # Errors
    /// [`StudyError`] when either cannot be opened.
    pub fn open(data_dir: &Path, config: &DicomConfig) -> Result<Self, StudyError> {
        let storage = InstanceStorage::open(data_dir)?;
        let db = StudyDb::open(data_dir)?;
        Ok(Self {
            db: Mutex::new(db),
            storage,
            rule: FrontalRule::new(config),
            emr_wait: Duration::from_secs(config.emr_wait_s),
            emr_expiry: Duration::from_secs(config.emr_expiry_s),
            retention: Duration::from_secs(config.retention_hours.saturating_mul(3600)),
            image_only: config.image_only,
            min_free_bytes: config.min_free_disk_mib.saturating_mul(1024 * 1024),
        })
    }

    fn db(&self) -> Result<std::sync::MutexGuard<'_, StudyDb>, StudyError> {
        self.db.lock().map_err(|_| StudyError::Poisoned)
    }

    /// Whether the disk keeps its reserve after writing `more` bytes.
    ///
    /// # Errors
    /// [`StudyError::Io`] when the free space cannot be read.
    pub fn has_room(&self, more: u64) -> Result<bool, StudyError> {
        Ok(self.storage.free_bytes()?.saturating_sub(more) >= self.min_free_bytes)
    }

    /// Whether `image` is inferred by the rule.
    pub fn wanted(&self, image: &ImageAttributes) -> bool {
        self.rule.matches(image)
    }

    /// Takes a received image whose Part 10 file is `bytes`: stores it
    /// when the rule wants it and its study has none yet, and claims it
    /// when its record is already here.
    ///
    /// # Errors
    /// [`StudyError`]: nothing is recorded when the file could not be
    /// written.
    pub fn receive(&self, image: &ImageAttributes, bytes: &[u8]) -> Result<Received, StudyError> {
        if !self.rule.matches(image) {
            return Ok(Received::Ignored);
        }
        if self.db()?.exists(&image.study_uid)? {
            return Ok(Received::Duplicate);
        }
        let path = self.storage.write(&image.sop_instance_uid, bytes)?;
        let mut db = self.db()?;
        let inserted = db.insert(
            &image.study_uid,
            &image.sop_instance_uid,
            image.accession.as_deref(),
            &path,
            now_ms(),
        )?;
        if !inserted {
            // Another association stored the same study meanwhile.
            drop(db);
            let _ = std::fs::remove_file(&path);
            return Ok(Received::Duplicate);
        }
        let claimed = match image.accession.as_deref() {
            Some(accession) => db.claim_matched(Some(accession))?.into_iter().next(),
            None => None,
        };
        Ok(Received::Stored(claimed))
    }

    /// Takes an EMR record for `accession` (JSON text); returns the studies
    /// it completes.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn record(&self, accession: &str, record: &str) -> Result<Vec<Claimed>, StudyError> {
        let mut db = self.db()?;
        db.put_record(accession, record, now_ms())?;
        db.claim_matched(Some(accession))
    }

    /// Records a study's result.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn complete(&self, study_uid: &str, report: &PredictionReport) -> Result<(), StudyError> {
        let result = serde_json::to_string(report).map_err(|e| StudyError::Io {
            what: "serialising a result".to_owned(),
            source: std::io::Error::other(e),
        })?;
        self.db()?
            .finish(study_uid, StudyState::Done, Some(&result), None, now_ms())
    }

    /// Records a study's failure; `reason` names no patient data.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn fail(&self, study_uid: &str, reason: &str) -> Result<(), StudyError> {
        self.db()?
            .finish(study_uid, StudyState::Failed, None, Some(reason), now_ms())
    }

    /// Puts a claimed study back to wait (inference refused for load).
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn requeue(&self, study_uid: &str) -> Result<(), StudyError> {
        self.db()?.requeue(study_uid)
    }

    /// A study's state and result.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn get(&self, study_uid: &str) -> Result<Option<StudyRow>, StudyError> {
        self.db()?.get(study_uid)
    }

    /// How long a study waits for its record.
    pub fn emr_wait(&self) -> Duration {
        self.emr_wait
    }

    /// The periodic work: claims matched studies still waiting, gives up
    /// on those past `emr_wait_s` (image-only or expired), deletes records
    /// past `emr_expiry_s` and instances past `retention_hours`.
    ///
    /// # Errors
    /// [`StudyError`].
    pub fn sweep(&self) -> Result<Swept, StudyError> {
        let now = now_ms();
        let mut db = self.db()?;
        let mut swept = Swept {
            claimed: db.claim_matched(None)?,
            ..Swept::default()
        };
        let (image_only, expired) =
            db.give_up_waiting(now - ms(self.emr_wait), self.image_only, now)?;
        swept.claimed.extend(image_only);
        swept.expired = expired;
        swept.records_expired = db.expire_records(now - ms(self.emr_expiry))?;
        let old = db.past_retention(now - ms(self.retention), now)?;
        swept.waiting = db.waiting()?;
        drop(db);
        for path in old {
            if std::fs::remove_file(&path).is_ok() {
                swept.files_deleted += 1;
            }
            // The result SR goes with its source instance.
            if let Some(sr) = result_object::result_path(&path) {
                let _ = std::fs::remove_file(sr);
            }
        }
        Ok(swept)
    }
}

/// Called after a study's result is stored: makes its result object (the
/// Comprehensive SR, [`result_object`]) and sends it to the PACS when
/// `[dicom.forward]` is enabled. Blocking (the SCU retries); failures are
/// logged without patient data, and the JSON result stays available.
/// `image_only`: inferred without its EMR record.
pub fn on_result(
    instance_path: &Path,
    report: &PredictionReport,
    config: &Config,
    image_only: bool,
) {
    let study = fingerprint(&instance_path.to_string_lossy());
    match result_object::make_and_forward(instance_path, report, config, image_only) {
        Ok(made) => tracing::info!(
            request_id = report.request_id.as_str(),
            "dicom: result SR of instance {study} kept{}",
            match &made.forwarded {
                Some(outcome) => format!(
                    ", sent to the PACS (status {:#06x}, {} attempt(s))",
                    outcome.status, outcome.attempts
                ),
                None => String::new(),
            }
        ),
        Err(e) => tracing::warn!(
            request_id = report.request_id.as_str(),
            "dicom: result SR of instance {study}: {e}"
        ),
    }
}

/// The stored instance of a claimed study, read for inference.
///
/// # Errors
/// [`StudyError::Io`] when the file is gone or unreadable.
pub fn read_instance(path: &Path) -> Result<Vec<u8>, StudyError> {
    std::fs::read(path).map_err(StudyError::io("reading", path))
}

/// The instance folder of a data dir (for tests and operators).
pub fn instance_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("dicom").join("instances")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DicomConfig {
        DicomConfig {
            emr_wait_s: 3600,
            ..DicomConfig::default()
        }
    }

    fn image(study: &str, accession: Option<&str>) -> ImageAttributes {
        ImageAttributes {
            study_uid: study.to_owned(),
            sop_instance_uid: format!("{study}.1"),
            accession: accession.map(str::to_owned),
            modality: Some("CR".to_owned()),
            body_part: Some("CHEST".to_owned()),
            view_position: Some("PA".to_owned()),
        }
    }

    #[test]
    fn the_frontal_rule_takes_frontal_chest_films_only() {
        let rule = FrontalRule::new(&DicomConfig::default());
        assert!(rule.matches(&image("1.2", None)));
        let lateral = ImageAttributes {
            view_position: Some("LL".to_owned()),
            ..image("1.2", None)
        };
        assert!(!rule.matches(&lateral));
        let no_view = ImageAttributes {
            view_position: None,
            ..image("1.2", None)
        };
        assert!(!rule.matches(&no_view));
        let any_view = FrontalRule::new(&DicomConfig {
            view_positions: Vec::new(),
            ..DicomConfig::default()
        });
        assert!(any_view.matches(&no_view));
        let lower = ImageAttributes {
            body_part: Some("chest ".to_owned()),
            ..image("1.2", None)
        };
        assert!(rule.matches(&lower));
    }

    #[test]
    fn a_record_before_or_after_its_image_claims_the_study_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let studies = Studies::open(dir.path(), &config()).expect("open");
        // Image first, then the record.
        let Received::Stored(None) = studies
            .receive(&image("1.1", Some("A1")), b"x")
            .expect("receive")
        else {
            panic!("the image should wait");
        };
        let claimed = studies.record("A1", "{}").expect("record");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].study_uid, "1.1");
        assert!(
            studies.record("A1", "{}").expect("again").is_empty(),
            "claimed twice"
        );
        // Record first, then the image.
        assert!(
            studies
                .record("B2", "{\"x\":1}")
                .expect("record")
                .is_empty()
        );
        let Received::Stored(Some(claimed)) = studies
            .receive(&image("2.2", Some("B2")), b"y")
            .expect("receive")
        else {
            panic!("the image should be claimed");
        };
        assert_eq!(claimed.record.as_deref(), Some("{\"x\":1}"));
        // A second image of the same study is not kept.
        assert!(matches!(
            studies
                .receive(&image("2.2", Some("B2")), b"z")
                .expect("receive"),
            Received::Duplicate
        ));
        let report_state = studies.get("2.2").expect("get").expect("row").state;
        assert_eq!(report_state, StudyState::Inferring);
        studies.fail("2.2", "plugin rejection").expect("fail");
        let row = studies.get("2.2").expect("get").expect("row");
        assert_eq!(row.state, StudyState::Failed);
        // The matched record is gone with its study.
        let db = studies.db().expect("db");
        let left: i64 = db_count(&db, "SELECT COUNT(*) FROM emr WHERE accession = 'B2'");
        assert_eq!(left, 0);
        let accessions: i64 = db_count(
            &db,
            "SELECT COUNT(*) FROM studies WHERE accession IS NOT NULL AND state != 'waiting' AND state != 'inferring'",
        );
        assert_eq!(accessions, 0, "an ended study kept its accession number");
    }

    fn db_count(db: &StudyDb, sql: &str) -> i64 {
        db.connection_for_tests()
            .query_row(sql, [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn a_study_without_its_record_expires_or_goes_image_only() {
        for image_only in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let studies = Studies::open(
                dir.path(),
                &DicomConfig {
                    emr_wait_s: 1,
                    image_only,
                    ..DicomConfig::default()
                },
            )
            .expect("open");
            studies
                .receive(&image("3.3", Some("C3")), b"x")
                .expect("receive");
            let swept = studies.sweep().expect("sweep");
            assert!(swept.claimed.is_empty());
            assert_eq!(swept.waiting, 1);
            std::thread::sleep(Duration::from_millis(1100));
            let swept = studies.sweep().expect("sweep");
            let row = studies.get("3.3").expect("get").expect("row");
            if image_only {
                assert_eq!(swept.claimed.len(), 1);
                assert!(swept.claimed[0].record.is_none());
                assert_eq!(row.state, StudyState::Inferring);
                assert!(row.image_only);
            } else {
                assert_eq!(swept.expired, 1);
                assert_eq!(row.state, StudyState::Expired);
            }
            assert_eq!(swept.waiting, 0);
        }
    }

    #[test]
    fn accession_numbers_are_short_printable_strings() {
        assert!(is_accession_number("ACC-000123"));
        for bad in ["", "   ", "12345678901234567", "a\\b", "a\nb"] {
            assert!(!is_accession_number(bad), "{bad:?}");
        }
        assert_eq!(fingerprint("x").len(), 12);
        assert_ne!(fingerprint("A1"), fingerprint("A2"));
    }
}
