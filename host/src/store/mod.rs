//! Local state in SQLite (rusqlite, bundled): the audit log of predictions.
//!
//! One record per prediction — time, request id, model digest, plugin
//! versions, outputs, timings, status — and never a patient identifier: the
//! record is built from the prediction report, which holds none.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};
use serde::Serialize;

/// Errors from the local store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, created or written.
    #[error("audit database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The data directory could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// One audited prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// When it was recorded (UTC, RFC 3339), set by the database.
    pub time: String,
    /// The request id given to the caller.
    pub request_id: String,
    /// Digest of the model package.
    pub model_digest: String,
    /// Plugins that ran, "name version", in order.
    pub plugins: Vec<String>,
    /// The outputs (JSON), or null when the prediction failed.
    pub outputs: serde_json::Value,
    /// Stage timings (JSON).
    pub timings_ms: serde_json::Value,
    /// "ok", or the failure's category (never its text: it may echo input).
    pub status: String,
}

/// The audit log under the data dir (`audit.sqlite3`).
#[derive(Debug)]
pub struct AuditLog {
    connection: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS predictions (
    id           INTEGER PRIMARY KEY,
    time         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    request_id   TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    plugins      TEXT NOT NULL,
    outputs      TEXT NOT NULL,
    timings      TEXT NOT NULL,
    status       TEXT NOT NULL
);";

impl AuditLog {
    /// Opens (creating if needed) the audit log in `data_dir`.
    ///
    /// # Errors
    /// [`StoreError`] when the directory or database cannot be made.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join("audit.sqlite3");
        let sqlite = |source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        let connection = Connection::open(&path).map_err(sqlite)?;
        connection
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; {SCHEMA}"
            ))
            .map_err(sqlite)?;
        Ok(Self { connection, path })
    }

    fn error(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Appends a record (its `time` is ignored: the database stamps it).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn record(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.connection
            .execute(
                "INSERT INTO predictions (request_id, model_digest, plugins, outputs, timings, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.request_id,
                    record.model_digest,
                    serde_json::Value::from(record.plugins.clone()).to_string(),
                    record.outputs.to_string(),
                    record.timings_ms.to_string(),
                    record.status,
                ],
            )
            .map(drop)
            .map_err(|e| self.error(e))
    }

    /// The last `n` records, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT time, request_id, model_digest, plugins, outputs, timings, status
                 FROM (SELECT * FROM predictions ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )
            .map_err(|e| self.error(e))?;
        let json = |text: String| serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        let rows = statement
            .query_map(params![n as i64], |row| {
                Ok(AuditRecord {
                    time: row.get(0)?,
                    request_id: row.get(1)?,
                    model_digest: row.get(2)?,
                    plugins: serde_json::from_str(&row.get::<_, String>(3)?).unwrap_or_default(),
                    outputs: json(row.get(4)?),
                    timings_ms: json(row.get(5)?),
                    status: row.get(6)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.error(e))
    }
}

/// A fresh request id: 128 random bits, hex.
pub fn new_request_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    // Falls back to a time-derived id if the system generator fails.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tail_keeps_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        for i in 0..5 {
            log.record(&AuditRecord {
                time: String::new(),
                request_id: format!("r{i}"),
                model_digest: "abc".into(),
                plugins: vec!["example-site 0.1.0".into()],
                outputs: serde_json::json!({"24h": {"p_o2_any": 0.5}}),
                timings_ms: serde_json::json!({"total": 12.5}),
                status: "ok".into(),
            })
            .expect("record");
        }
        let tail = log.tail(2).expect("tail");
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].request_id, "r3");
        assert_eq!(tail[1].request_id, "r4");
        assert_eq!(tail[1].plugins, vec!["example-site 0.1.0".to_owned()]);
        assert_eq!(tail[1].outputs["24h"]["p_o2_any"], 0.5);
        assert!(
            tail[1].time.ends_with('Z') && tail[1].time.contains('T'),
            "{}",
            tail[1].time
        );
        // Reopening keeps the records.
        drop(log);
        assert_eq!(
            AuditLog::open(dir.path())
                .expect("reopen")
                .tail(10)
                .expect("tail")
                .len(),
            5
        );
        assert_ne!(new_request_id(), new_request_id());
        assert_eq!(new_request_id().len(), 32);
    }
}
