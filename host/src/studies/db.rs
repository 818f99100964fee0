//! The studies database (`<data_dir>/studies.sqlite`): one row per study
//! received (its state, the stored instance, the result) and the EMR
//! records waiting for their images. Accession numbers are kept only while
//! a study or a record waits: a study that ends (inferred, expired,
//! failed) loses its accession number, and its matched record is deleted.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::StudyError;

/// Where a study stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StudyState {
    /// Stored, waiting for its EMR record.
    Waiting,
    /// Matched (or given up waiting, image-only) and being inferred.
    Inferring,
    /// Inferred: the result is stored.
    Done,
    /// No EMR record came within `dicom.emr_wait_s` (and image-only
    /// inference is off), or the instance's retention ended first.
    Expired,
    /// The case was refused by the ingest, a plugin or the model.
    Failed,
}

impl StudyState {
    fn as_str(self) -> &'static str {
        match self {
            StudyState::Waiting => "waiting",
            StudyState::Inferring => "inferring",
            StudyState::Done => "done",
            StudyState::Expired => "expired",
            StudyState::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "waiting" => StudyState::Waiting,
            "inferring" => StudyState::Inferring,
            "done" => StudyState::Done,
            "expired" => StudyState::Expired,
            _ => StudyState::Failed,
        }
    }
}

/// A study's row as `GET /v1/studies/{uid}/result` shows it.
#[derive(Debug, Clone)]
pub struct StudyRow {
    /// Where it stands.
    pub state: StudyState,
    /// Inferred without an EMR record.
    pub image_only: bool,
    /// When its image was received, Unix milliseconds.
    pub received_at_ms: i64,
    /// The prediction report (JSON text), when done.
    pub result: Option<String>,
    /// Why it failed or expired (no patient data).
    pub reason: Option<String>,
}

/// A study ready to infer: its instance and, unless image-only, its record.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Study Instance UID.
    pub study_uid: String,
    /// The stored instance.
    pub instance_path: PathBuf,
    /// The EMR record (JSON text); `None` for image-only inference.
    pub record: Option<String>,
}

/// The database.
#[derive(Debug)]
pub struct StudyDb {
    connection: Connection,
}

impl StudyDb {
    /// Opens (creates) `<data_dir>/studies.sqlite`; studies left
    /// `inferring` by a previous run wait again.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn open(data_dir: &Path) -> Result<Self, StudyError> {
        let path = data_dir.join("studies.sqlite");
        let connection = Connection::open(&path)?;
        // WAL with `synchronous = FULL`: a study's row is synced before the
        // C-STORE that brought it is acknowledged (and an EMR record's
        // before its 200/202), so a power loss right after cannot lose what
        // the PACS or the site was told was received (with NORMAL the
        // instance file would survive, fsynced, but not its row).
        connection.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS studies(
               study_uid TEXT PRIMARY KEY,
               sop_instance_uid TEXT NOT NULL,
               accession TEXT,
               instance_path TEXT,
               received_at INTEGER NOT NULL,
               state TEXT NOT NULL,
               image_only INTEGER NOT NULL DEFAULT 0,
               result TEXT,
               reason TEXT,
               updated_at INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession);
             CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
             CREATE TABLE IF NOT EXISTS emr(
               accession TEXT PRIMARY KEY,
               record TEXT NOT NULL,
               received_at INTEGER NOT NULL);
             UPDATE studies SET state = 'waiting' WHERE state = 'inferring';",
        )?;
        Ok(Self { connection })
    }

    /// Whether a study is known.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn exists(&self, study_uid: &str) -> Result<bool, StudyError> {
        Ok(self
            .connection
            .query_row(
                "SELECT 1 FROM studies WHERE study_uid = ?1",
                [study_uid],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records a received study, waiting; false when it was already known.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn insert(
        &self,
        study_uid: &str,
        sop_instance_uid: &str,
        accession: Option<&str>,
        instance_path: &Path,
        now_ms: i64,
    ) -> Result<bool, StudyError> {
        let inserted = self.connection.execute(
            "INSERT OR IGNORE INTO studies(study_uid, sop_instance_uid, accession, instance_path,
               received_at, state, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, 'waiting', ?5)",
            params![
                study_uid,
                sop_instance_uid,
                accession,
                instance_path.to_string_lossy().into_owned(),
                now_ms
            ],
        )?;
        Ok(inserted == 1)
    }

    /// Stores (replaces) the EMR record of `accession`.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn put_record(&self, accession: &str, record: &str, now_ms: i64) -> Result<(), StudyError> {
        self.connection.execute(
            "INSERT INTO emr(accession, record, received_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(accession) DO UPDATE SET record = excluded.record,
               received_at = excluded.received_at",
            params![accession, record, now_ms],
        )?;
        Ok(())
    }

    /// Moves every waiting study whose record is here (of `accession`, or
    /// any when `None`) to inferring, and returns them.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn claim_matched(&mut self, accession: Option<&str>) -> Result<Vec<Claimed>, StudyError> {
        let tx = self.connection.transaction()?;
        let claimed = {
            let mut select = tx.prepare(
                "SELECT s.study_uid, s.instance_path, e.record FROM studies s
                 JOIN emr e ON e.accession = s.accession
                 WHERE s.state = 'waiting' AND s.instance_path IS NOT NULL
                   AND (?1 IS NULL OR s.accession = ?1)",
            )?;
            let rows = select.query_map([accession], |row| {
                Ok(Claimed {
                    study_uid: row.get(0)?,
                    instance_path: PathBuf::from(row.get::<_, String>(1)?),
                    record: Some(row.get(2)?),
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for study in &claimed {
            tx.execute(
                "UPDATE studies SET state = 'inferring', image_only = 0 WHERE study_uid = ?1",
                [&study.study_uid],
            )?;
        }
        tx.commit()?;
        Ok(claimed)
    }

    /// Studies that waited for their record since before `cutoff_ms`:
    /// claimed image-only when `image_only`, else expired. Returns the
    /// image-only claims and the number expired.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn give_up_waiting(
        &mut self,
        cutoff_ms: i64,
        image_only: bool,
        now_ms: i64,
    ) -> Result<(Vec<Claimed>, usize), StudyError> {
        let tx = self.connection.transaction()?;
        let overdue = {
            let mut select = tx.prepare(
                "SELECT study_uid, instance_path FROM studies
                 WHERE state = 'waiting' AND received_at < ?1",
            )?;
            let rows = select.query_map([cutoff_ms], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let mut claimed = Vec::new();
        let mut expired = 0;
        for (study_uid, path) in overdue {
            match path.filter(|_| image_only) {
                Some(path) => {
                    tx.execute(
                        "UPDATE studies SET state = 'inferring', image_only = 1,
                           updated_at = ?2 WHERE study_uid = ?1",
                        params![study_uid, now_ms],
                    )?;
                    claimed.push(Claimed {
                        study_uid,
                        instance_path: PathBuf::from(path),
                        record: None,
                    });
                }
                None => {
                    tx.execute(
                        "UPDATE studies SET state = 'expired', accession = NULL, updated_at = ?2,
                           reason = 'no EMR record arrived within dicom.emr_wait_s'
                         WHERE study_uid = ?1",
                        params![study_uid, now_ms],
                    )?;
                    expired += 1;
                }
            }
        }
        tx.commit()?;
        Ok((claimed, expired))
    }

    /// Ends a study: `done` with its result, or `failed` with a reason; the
    /// accession number is forgotten and the matched record deleted when no
    /// other study waits for it.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn finish(
        &mut self,
        study_uid: &str,
        state: StudyState,
        result: Option<&str>,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StudyError> {
        let tx = self.connection.transaction()?;
        let accession: Option<String> = tx
            .query_row(
                "SELECT accession FROM studies WHERE study_uid = ?1",
                [study_uid],
                |row| row.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten();
        tx.execute(
            "UPDATE studies SET state = ?2, result = ?3, reason = ?4, accession = NULL,
               updated_at = ?5 WHERE study_uid = ?1",
            params![study_uid, state.as_str(), result, reason, now_ms],
        )?;
        if let Some(accession) = accession {
            tx.execute(
                "DELETE FROM emr WHERE accession = ?1 AND NOT EXISTS (
                   SELECT 1 FROM studies WHERE accession = ?1
                     AND state IN ('waiting', 'inferring'))",
                [accession],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Puts a study back to waiting (inference refused for load: tried
    /// again at the next sweep).
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn requeue(&self, study_uid: &str) -> Result<(), StudyError> {
        self.connection.execute(
            "UPDATE studies SET state = 'waiting' WHERE study_uid = ?1 AND state = 'inferring'",
            [study_uid],
        )?;
        Ok(())
    }

    /// Deletes records older than `cutoff_ms`; returns how many.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn expire_records(&self, cutoff_ms: i64) -> Result<usize, StudyError> {
        Ok(self
            .connection
            .execute("DELETE FROM emr WHERE received_at < ?1", [cutoff_ms])?)
    }

    /// Instances received before `cutoff_ms` and not being inferred:
    /// forgets their paths (a study still waiting expires) and returns them
    /// for deletion.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn past_retention(
        &mut self,
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<PathBuf>, StudyError> {
        let tx = self.connection.transaction()?;
        let paths = {
            let mut select = tx.prepare(
                "SELECT instance_path FROM studies WHERE instance_path IS NOT NULL
                   AND received_at < ?1 AND state != 'inferring'",
            )?;
            let rows = select.query_map([cutoff_ms], |row| row.get::<_, String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.execute(
            "UPDATE studies SET state = 'expired', accession = NULL, updated_at = ?2,
               reason = 'the instance reached dicom.retention_hours before its EMR record came'
             WHERE state = 'waiting' AND instance_path IS NOT NULL AND received_at < ?1",
            params![cutoff_ms, now_ms],
        )?;
        tx.execute(
            "UPDATE studies SET instance_path = NULL WHERE instance_path IS NOT NULL
               AND received_at < ?1 AND state != 'inferring'",
            [cutoff_ms],
        )?;
        tx.commit()?;
        Ok(paths.into_iter().map(PathBuf::from).collect())
    }

    /// Studies waiting now.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn waiting(&self) -> Result<u64, StudyError> {
        let n: i64 = self.connection.query_row(
            "SELECT COUNT(*) FROM studies WHERE state = 'waiting'",
            [],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// A study's row.
    ///
    /// # Errors
    /// [`StudyError::Db`].
    pub fn get(&self, study_uid: &str) -> Result<Option<StudyRow>, StudyError> {
        Ok(self
            .connection
            .query_row(
                "SELECT state, image_only, received_at, result, reason FROM studies
                 WHERE study_uid = ?1",
                [study_uid],
                |row| {
                    Ok(StudyRow {
                        state: StudyState::parse(&row.get::<_, String>(0)?),
                        image_only: row.get::<_, i64>(1)? != 0,
                        received_at_ms: row.get(2)?,
                        result: row.get(3)?,
                        reason: row.get(4)?,
                    })
                },
            )
            .optional()?)
    }
}

#[cfg(test)]
impl StudyDb {
    /// The connection, for assertions in tests.
    pub(crate) fn connection_for_tests(&self) -> &Connection {
        &self.connection
    }
}
