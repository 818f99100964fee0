//! Local state in SQLite (rusqlite, bundled): the audit log of predictions
//! and of administrative actions.
//!
//! One record per prediction — time, request id, model digest, plugin
//! versions, outputs, timings, status — and never a patient identifier: the
//! record is built from the prediction report, which holds none. One record
//! per plugin reload (over HTTP or SIGHUP) — time, who asked (the peer
//! address, or `SIGHUP`), outcome, the plugins before and after.
//!
//! The schema is versioned with SQLite's `user_version`: opening a database
//! applies the migrations it lacks, in order (version 1: `predictions`;
//! version 2: `admin_events`; version 3: `predictions.reason`, why a
//! prediction was refused), so databases written by earlier versions keep
//! their records and gain the new tables and columns.

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
    /// "ok", or the failure's category: "rejected" (bad input) or
    /// "failed" (the box).
    pub status: String,
    /// Why a prediction was refused, redacted: the stage, plugin and field
    /// at fault, never a value from the input (`PipelineError::redacted`).
    /// `None` for a prediction that was given, and for records written
    /// before the column existed.
    pub reason: Option<String>,
}

/// The audit log under the data dir (`audit.sqlite3`).
#[derive(Debug)]
pub struct AuditLog {
    connection: Connection,
    path: PathBuf,
}

/// One audited administrative action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminRecord {
    /// When it was recorded (UTC, RFC 3339), set by the database.
    pub time: String,
    /// Who asked: `http <peer address>` or `SIGHUP`.
    pub actor: String,
    /// What: `plugins.reload` or `model.reload`.
    pub action: String,
    /// `ok`, `failed`, or for a model reload that found the served model
    /// `unchanged`.
    pub outcome: String,
    /// The plugins before (JSON: name, version, sha256 of each), or the
    /// model (name, version, digest, federation).
    pub before: serde_json::Value,
    /// The plugins after (the same as before when it failed).
    pub after: serde_json::Value,
    /// Why it failed (configuration or plugin load errors: no patient data),
    /// or empty.
    pub detail: String,
}

/// How long an operation waits for a lock another connection holds before
/// it fails with "database is locked".
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The schema migrations, in order; migration `i` brings the database to
/// `user_version = i + 1`.
const MIGRATIONS: [&str; 3] = [
    "
CREATE TABLE IF NOT EXISTS predictions (
    id           INTEGER PRIMARY KEY,
    time         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    request_id   TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    plugins      TEXT NOT NULL,
    outputs      TEXT NOT NULL,
    timings      TEXT NOT NULL,
    status       TEXT NOT NULL
);",
    "
CREATE TABLE IF NOT EXISTS admin_events (
    id      INTEGER PRIMARY KEY,
    time    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    outcome TEXT NOT NULL,
    before  TEXT NOT NULL,
    after   TEXT NOT NULL,
    detail  TEXT NOT NULL
);",
    "ALTER TABLE predictions ADD COLUMN reason TEXT;",
];

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
        let mut connection = Connection::open(&path).map_err(sqlite)?;
        // Other processes open the same database: `oxbox audit` and
        // `oxbox predict` while the server runs, a restarted server while
        // the old one drains. SQLite answers a lock held by one of them with
        // SQLITE_BUSY at once unless told to wait; a prediction whose record
        // fails is not given out, so wait instead (a write holds the lock
        // for one fsync, milliseconds).
        connection.busy_timeout(LOCK_WAIT).map_err(sqlite)?;
        // WAL with `synchronous = FULL`: each record's commit is synced to
        // disk before `record` returns, and the server answers a prediction
        // only after `record` has returned — so a prediction a client was
        // given has its record even if the box loses power right after
        // (with NORMAL it would survive a crash of the process, not of the
        // machine). One fsync of the WAL per prediction.
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(sqlite)?;
        migrate(&mut connection).map_err(sqlite)?;
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
                "INSERT INTO predictions (request_id, model_digest, plugins, outputs, timings, status, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    record.request_id,
                    record.model_digest,
                    serde_json::Value::from(record.plugins.clone()).to_string(),
                    record.outputs.to_string(),
                    record.timings_ms.to_string(),
                    record.status,
                    record.reason,
                ],
            )
            .map(drop)
            .map_err(|e| self.error(e))
    }

    /// Appends an administrative record (its `time` is ignored).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn record_admin(&self, record: &AdminRecord) -> Result<(), StoreError> {
        self.connection
            .execute(
                "INSERT INTO admin_events (actor, action, outcome, before, after, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.actor,
                    record.action,
                    record.outcome,
                    record.before.to_string(),
                    record.after.to_string(),
                    record.detail,
                ],
            )
            .map(drop)
            .map_err(|e| self.error(e))
    }

    /// The last `n` administrative records, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn admin_tail(&self, n: usize) -> Result<Vec<AdminRecord>, StoreError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT time, actor, action, outcome, before, after, detail
                 FROM (SELECT * FROM admin_events ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )
            .map_err(|e| self.error(e))?;
        let json = |text: String| serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        let rows = statement
            .query_map(params![n as i64], |row| {
                Ok(AdminRecord {
                    time: row.get(0)?,
                    actor: row.get(1)?,
                    action: row.get(2)?,
                    outcome: row.get(3)?,
                    before: json(row.get(4)?),
                    after: json(row.get(5)?),
                    detail: row.get(6)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.error(e))
    }

    /// The last `n` records, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT time, request_id, model_digest, plugins, outputs, timings, status, reason
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
                    reason: row.get(7)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.error(e))
    }
}

/// Applies the migrations the database lacks, each in its own transaction
/// with the version bump. A database from a later version is left as it is.
fn migrate(connection: &mut Connection) -> Result<(), rusqlite::Error> {
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (i, migration) in MIGRATIONS.iter().enumerate() {
        let target = i as i64 + 1;
        if version >= target {
            continue;
        }
        let transaction = connection.transaction()?;
        transaction.execute_batch(migration)?;
        transaction.execute_batch(&format!("PRAGMA user_version = {target}"))?;
        transaction.commit()?;
    }
    Ok(())
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
                status: if i == 4 { "rejected" } else { "ok" }.into(),
                reason: (i == 4)
                    .then(|| "plugin example-site 0.1.0 rejected the input (field TEMP_F)".into()),
            })
            .expect("record");
        }
        let tail = log.tail(2).expect("tail");
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].request_id, "r3");
        assert_eq!(tail[1].request_id, "r4");
        assert_eq!(tail[1].plugins, vec!["example-site 0.1.0".to_owned()]);
        assert_eq!(tail[1].outputs["24h"]["p_o2_any"], 0.5);
        assert_eq!(tail[0].reason, None);
        assert_eq!(
            tail[1].reason.as_deref(),
            Some("plugin example-site 0.1.0 rejected the input (field TEMP_F)")
        );
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
    }

    #[test]
    fn a_record_waits_for_a_lock_another_process_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        // Another connection (as `oxbox predict` beside a running server)
        // holds the write lock for 300 ms.
        let other = Connection::open(dir.path().join("audit.sqlite3")).expect("sqlite");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            other.execute_batch("COMMIT").expect("unlock");
        });
        let started = std::time::Instant::now();
        log.record(&AuditRecord {
            time: String::new(),
            request_id: "waited".into(),
            model_digest: "abc".into(),
            plugins: Vec::new(),
            outputs: serde_json::json!({}),
            timings_ms: serde_json::json!({}),
            status: "ok".into(),
            reason: None,
        })
        .expect("the record waits for the lock instead of failing");
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        holder.join().expect("holder");
        assert_eq!(log.tail(1).expect("tail")[0].request_id, "waited");
    }

    #[test]
    fn a_database_from_before_admin_events_is_migrated_and_keeps_its_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The version-1 database, as earlier versions wrote it (no
        // user_version, predictions only), with one record.
        {
            let connection = Connection::open(dir.path().join("audit.sqlite3")).expect("sqlite");
            connection.execute_batch(MIGRATIONS[0]).expect("v1 schema");
            connection
                .execute(
                    "INSERT INTO predictions (request_id, model_digest, plugins, outputs, timings, status)
                     VALUES ('old', 'abc', '[]', 'null', '{}', 'ok')",
                    [],
                )
                .expect("old record");
        }
        let log = AuditLog::open(dir.path()).expect("open migrates");
        assert_eq!(log.tail(10).expect("tail")[0].request_id, "old");
        log.record_admin(&AdminRecord {
            time: String::new(),
            actor: "http 127.0.0.1:40000".into(),
            action: "plugins.reload".into(),
            outcome: "ok".into(),
            before: serde_json::json!([{"name": "a", "version": "1", "sha256": "x"}]),
            after: serde_json::json!([{"name": "a", "version": "2", "sha256": "y"}]),
            detail: String::new(),
        })
        .expect("admin record");
        drop(log);
        // Reopening applies nothing twice and keeps both kinds of record.
        let log = AuditLog::open(dir.path()).expect("reopen");
        let version: i64 = log
            .connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let admin = log.admin_tail(5).expect("admin tail");
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0].outcome, "ok");
        assert_eq!(admin[0].after[0]["version"], "2");
        assert_eq!(log.tail(10).expect("tail").len(), 1);
        assert_eq!(new_request_id().len(), 32);
    }

    #[test]
    fn a_database_from_before_the_reason_column_is_migrated_and_keeps_its_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The version-2 database as the previous release wrote it, with a
        // refused prediction and an admin event.
        {
            let connection = Connection::open(dir.path().join("audit.sqlite3")).expect("sqlite");
            connection.execute_batch(MIGRATIONS[0]).expect("v1 schema");
            connection.execute_batch(MIGRATIONS[1]).expect("v2 schema");
            connection
                .execute_batch(
                    "PRAGMA user_version = 2;
                     INSERT INTO predictions (request_id, model_digest, plugins, outputs, timings, status)
                     VALUES ('old', 'abc', '[\"example-site 0.1.0\"]', 'null', 'null', 'rejected');
                     INSERT INTO admin_events (actor, action, outcome, before, after, detail)
                     VALUES ('SIGHUP', 'plugins.reload', 'ok', '[]', '[]', '');",
                )
                .expect("old records");
        }
        let log = AuditLog::open(dir.path()).expect("open migrates");
        let version: i64 = log
            .connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, 3);
        let old = log.tail(10).expect("tail");
        assert_eq!(old.len(), 1);
        assert_eq!(
            (old[0].request_id.as_str(), old[0].status.as_str()),
            ("old", "rejected")
        );
        assert_eq!(old[0].reason, None, "an old record has no reason");
        assert_eq!(log.admin_tail(10).expect("admin tail").len(), 1);
        log.record(&AuditRecord {
            time: String::new(),
            request_id: "new".into(),
            model_digest: "abc".into(),
            plugins: vec![],
            outputs: serde_json::Value::Null,
            timings_ms: serde_json::Value::Null,
            status: "rejected".into(),
            reason: Some("plugin my-site 0.2.0 gave an implausible spo2_pct".into()),
        })
        .expect("new record");
        drop(log);
        let log = AuditLog::open(dir.path()).expect("reopen");
        let tail = log.tail(10).expect("tail");
        assert_eq!(tail.len(), 2);
        assert_eq!(
            tail[1].reason.as_deref(),
            Some("plugin my-site 0.2.0 gave an implausible spo2_pct")
        );
    }
}
