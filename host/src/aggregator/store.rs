//! The aggregator's durable state under `data_dir`:
//! - `aggregator.sqlite3` (WAL): the round state, every accepted signed
//!   document (statistics, update manifests) byte for byte with its
//!   signature line, which declared shards are stored, and the published
//!   global models with their signed records;
//! - `shards/<sha256>`: uploaded shard files, each written atomically
//!   (temporary file, fsync, rename) after its digest and decoding were
//!   checked, and only then marked stored in SQLite. A file that exists
//!   is complete; one marked stored exists (a crash between the rename and
//!   the mark is repaired by [`Store::reconcile`]);
//! - `models/<digest>/`: published global model packages.
//!
//! Every change is one SQLite transaction, so a `kill -9` at any moment
//! leaves either the old or the new state.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::AggregatorError;
use super::rounds::RoundState;
use crate::federation::protocol::Phase;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS state (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    job          TEXT NOT NULL,
    phase        TEXT NOT NULL,
    round        INTEGER NOT NULL,
    opened_at    INTEGER NOT NULL,
    closing      TEXT,
    global_model TEXT NOT NULL,
    global_round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS statistics (
    site        TEXT PRIMARY KEY,
    body        BLOB NOT NULL,
    signature   TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    round          INTEGER NOT NULL,
    site           TEXT NOT NULL,
    body           BLOB NOT NULL,
    signature      TEXT NOT NULL,
    samples        INTEGER NOT NULL,
    declared_bytes INTEGER NOT NULL,
    received_at    INTEGER NOT NULL,
    rejected       TEXT,
    PRIMARY KEY (round, site)
);
CREATE TABLE IF NOT EXISTS shards (
    round  INTEGER NOT NULL,
    site   TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    bytes  INTEGER NOT NULL,
    stored INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round, site, idx)
);
CREATE INDEX IF NOT EXISTS shards_by_digest ON shards (round, sha256);
CREATE TABLE IF NOT EXISTS models (
    digest            TEXT PRIMARY KEY,
    round             INTEGER NOT NULL,
    previous          TEXT,
    record            BLOB NOT NULL,
    signature         TEXT NOT NULL,
    contributions     INTEGER NOT NULL,
    aggregate_seconds REAL NOT NULL,
    published_at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    site      TEXT PRIMARY KEY,
    last_seen INTEGER NOT NULL
);
";

/// Writes a shard file atomically: a temporary file beside `path`, its
/// data synced (`fdatasync`: the size is part of the data; no other
/// metadata matters), then renamed into place. One `write` of the whole
/// buffer, no intermediate copy.
fn write_shard_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a shard path has a folder"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".oxbox-")
        .suffix(".part")
        .tempfile_in(dir)?;
    tmp.as_file_mut().write_all(bytes)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// What happened to a document offered for storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Stored now.
    Inserted,
    /// The identical bytes were already stored (a resumed upload).
    Identical,
    /// The site already has a different document for this round.
    Different,
}

/// One declared shard of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredShard {
    /// 0-based position.
    pub index: u32,
    /// sha256 hex of its bytes.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// A stored signed document: its exact bytes and signature line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// The canonical bytes.
    pub body: Vec<u8>,
    /// `ed25519 <key hex> <signature hex>`.
    pub signature: String,
}

/// A published global model.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedModel {
    /// Package digest.
    pub digest: String,
    /// The round that produced it.
    pub round: u64,
    /// The global model it came from.
    pub previous: Option<String>,
    /// The signed [`crate::federation::protocol::GlobalModelRecord`].
    pub record: StoredDocument,
    /// Sites that went into it.
    pub contributions: u64,
    /// Seconds the aggregation took.
    pub aggregate_seconds: f64,
}

/// What one site sent in one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRoundBytes {
    /// The site.
    pub site: String,
    /// The round (0: statistics).
    pub round: u64,
    /// Bytes of accepted documents and stored shards.
    pub bytes: u64,
    /// Whether the site's contribution to that round is complete.
    pub complete: bool,
}

/// The durable state (see the module documentation).
#[derive(Debug)]
pub struct Store {
    connection: Mutex<Connection>,
    path: PathBuf,
    data_dir: PathBuf,
}

fn phase_text(phase: Phase) -> &'static str {
    match phase {
        Phase::Statistics => "statistics",
        Phase::Training => "training",
        Phase::Finished => "finished",
    }
}

fn phase_of(text: &str) -> Option<Phase> {
    match text {
        "statistics" => Some(Phase::Statistics),
        "training" => Some(Phase::Training),
        "finished" => Some(Phase::Finished),
        _ => None,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`.
    ///
    /// # Errors
    /// [`AggregatorError::Io`] or [`AggregatorError::Sqlite`].
    pub fn open(data_dir: &Path) -> Result<Self, AggregatorError> {
        for dir in [
            data_dir.to_path_buf(),
            data_dir.join("shards"),
            data_dir.join("models"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| AggregatorError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let path = data_dir.join("aggregator.sqlite3");
        let sqlite = |source| AggregatorError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        let connection = Connection::open(&path).map_err(sqlite)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(sqlite)?;
        connection.execute_batch(SCHEMA).map_err(sqlite)?;
        Ok(Self {
            connection: Mutex::new(connection),
            path,
            data_dir: data_dir.to_path_buf(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done change
        // (every change is one transaction): keep going.
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every row of `sql` with `params`, each mapped by `row`.
    fn query_rows<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, AggregatorError> {
        let c = self.lock();
        let mut stmt = c.prepare(sql).map_err(self.sqlite())?;
        stmt.query_map(params, row)
            .map_err(self.sqlite())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sqlite())
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> AggregatorError + '_ {
        |source| AggregatorError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the shard with this digest lives.
    pub fn shard_path(&self, sha256: &str) -> PathBuf {
        self.data_dir.join("shards").join(sha256)
    }

    /// The folder of the published model with this digest.
    pub fn model_dir(&self, digest: &str) -> PathBuf {
        self.data_dir.join("models").join(digest)
    }

    /// The job and round state, if the job has started.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`], or [`AggregatorError::Corrupt`] for a
    /// state this version does not know.
    pub fn state(&self) -> Result<Option<(String, RoundState)>, AggregatorError> {
        let c = self.lock();
        let row = c
            .query_row(
                "SELECT job, phase, round, opened_at, closing, global_model, global_round FROM state WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                },
            )
            .optional()
            .map_err(self.sqlite())?;
        let Some((job, phase, round, opened_at, closing, global_model, global_round)) = row else {
            return Ok(None);
        };
        let phase = phase_of(&phase)
            .ok_or_else(|| AggregatorError::Corrupt(format!("unknown phase {phase:?}")))?;
        let closing = match closing {
            None => None,
            Some(text) => Some(
                serde_json::from_str::<Vec<String>>(&text)
                    .map_err(|e| AggregatorError::Corrupt(format!("closing set: {e}")))?,
            ),
        };
        Ok(Some((
            job,
            RoundState {
                phase,
                round: to_u64(round),
                opened_at: to_u64(opened_at),
                closing,
                global_model,
                global_round: to_u64(global_round),
            },
        )))
    }

    fn write_state(
        tx: &rusqlite::Transaction<'_>,
        job: &str,
        s: &RoundState,
    ) -> rusqlite::Result<()> {
        let closing = s
            .closing
            .as_ref()
            .map(|c| serde_json::to_string(c).unwrap_or_else(|_| "[]".to_owned()));
        tx.execute(
            "INSERT INTO state (id, job, phase, round, opened_at, closing, global_model, global_round)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET job = ?1, phase = ?2, round = ?3, opened_at = ?4,
               closing = ?5, global_model = ?6, global_round = ?7",
            params![
                job,
                phase_text(s.phase),
                to_i64(s.round),
                to_i64(s.opened_at),
                closing,
                s.global_model,
                to_i64(s.global_round)
            ],
        )?;
        Ok(())
    }

    /// Starts the job: the first state and the start model's record, in
    /// one transaction.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn start(
        &self,
        job: &str,
        state: &RoundState,
        start_model: &PublishedModel,
    ) -> Result<(), AggregatorError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sqlite())?;
        Self::insert_model(&tx, start_model).map_err(self.sqlite())?;
        Self::write_state(&tx, job, state).map_err(self.sqlite())?;
        tx.commit().map_err(self.sqlite())
    }

    /// Freezes the open round's contributions to `sites` (the first step
    /// of closing it).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn freeze(&self, job: &str, state: &RoundState) -> Result<(), AggregatorError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sqlite())?;
        Self::write_state(&tx, job, state).map_err(self.sqlite())?;
        tx.commit().map_err(self.sqlite())
    }

    /// Publishes `model` and moves to `next`, in one transaction (the
    /// second step of closing a round).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn commit_round(
        &self,
        job: &str,
        model: &PublishedModel,
        next: &RoundState,
    ) -> Result<(), AggregatorError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sqlite())?;
        Self::insert_model(&tx, model).map_err(self.sqlite())?;
        Self::write_state(&tx, job, next).map_err(self.sqlite())?;
        tx.commit().map_err(self.sqlite())
    }

    fn insert_model(tx: &rusqlite::Transaction<'_>, m: &PublishedModel) -> rusqlite::Result<()> {
        let now = super::now();
        tx.execute(
            "INSERT INTO models (digest, round, previous, record, signature, contributions, aggregate_seconds, published_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (digest) DO NOTHING",
            params![
                m.digest,
                to_i64(m.round),
                m.previous,
                m.record.body,
                m.record.signature,
                to_i64(m.contributions),
                m.aggregate_seconds,
                to_i64(now)
            ],
        )?;
        Ok(())
    }

    /// The published model with this digest.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn model(&self, digest: &str) -> Result<Option<PublishedModel>, AggregatorError> {
        let c = self.lock();
        c.query_row(
            "SELECT digest, round, previous, record, signature, contributions, aggregate_seconds FROM models WHERE digest = ?1",
            params![digest],
            model_row,
        )
        .optional()
        .map_err(self.sqlite())
    }

    /// Every published model, oldest first.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn models(&self) -> Result<Vec<PublishedModel>, AggregatorError> {
        self.query_rows("SELECT digest, round, previous, record, signature, contributions, aggregate_seconds FROM models ORDER BY round, published_at, rowid", params![], model_row)
    }

    /// Stores a site's statistics document.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn offer_statistics(
        &self,
        site: &str,
        document: &StoredDocument,
    ) -> Result<Offer, AggregatorError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sqlite())?;
        let existing: Option<Vec<u8>> = tx
            .query_row(
                "SELECT body FROM statistics WHERE site = ?1",
                params![site],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sqlite())?;
        let offer = match existing {
            Some(body) if body == document.body => Offer::Identical,
            Some(_) => Offer::Different,
            None => {
                tx.execute(
                    "INSERT INTO statistics (site, body, signature, received_at) VALUES (?1, ?2, ?3, ?4)",
                    params![site, document.body, document.signature, to_i64(super::now())],
                )
                .map_err(self.sqlite())?;
                Offer::Inserted
            }
        };
        Self::touch(&tx, site).map_err(self.sqlite())?;
        tx.commit().map_err(self.sqlite())?;
        Ok(offer)
    }

    /// Every stored statistics document, by site id.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn statistics(&self) -> Result<Vec<(String, StoredDocument)>, AggregatorError> {
        self.query_rows(
            "SELECT site, body, signature FROM statistics ORDER BY site",
            params![],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    StoredDocument {
                        body: r.get(1)?,
                        signature: r.get(2)?,
                    },
                ))
            },
        )
    }

    /// Stores a site's update manifest for `round` with its declared
    /// shards (shards whose file is already on disk count as stored).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn offer_manifest(
        &self,
        round: u64,
        site: &str,
        document: &StoredDocument,
        samples: u64,
        shards: &[DeclaredShard],
    ) -> Result<Offer, AggregatorError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sqlite())?;
        let existing: Option<Vec<u8>> = tx
            .query_row(
                "SELECT body FROM manifests WHERE round = ?1 AND site = ?2",
                params![to_i64(round), site],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sqlite())?;
        let offer = match existing {
            Some(body) if body == document.body => Offer::Identical,
            Some(_) => Offer::Different,
            None => {
                let declared: u64 = shards.iter().map(|s| s.bytes).sum();
                tx.execute(
                    "INSERT INTO manifests (round, site, body, signature, samples, declared_bytes, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        to_i64(round),
                        site,
                        document.body,
                        document.signature,
                        to_i64(samples),
                        to_i64(declared),
                        to_i64(super::now())
                    ],
                )
                .map_err(self.sqlite())?;
                for s in shards {
                    let stored = self.shard_path(&s.sha256).is_file();
                    tx.execute(
                        "INSERT INTO shards (round, site, idx, sha256, bytes, stored) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            to_i64(round),
                            site,
                            s.index,
                            s.sha256,
                            to_i64(s.bytes),
                            i64::from(stored)
                        ],
                    )
                    .map_err(self.sqlite())?;
                }
                Offer::Inserted
            }
        };
        Self::touch(&tx, site).map_err(self.sqlite())?;
        tx.commit().map_err(self.sqlite())?;
        Ok(offer)
    }

    /// The manifest `site` sent for `round`.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn manifest(
        &self,
        round: u64,
        site: &str,
    ) -> Result<Option<StoredDocument>, AggregatorError> {
        let c = self.lock();
        c.query_row(
            "SELECT body, signature FROM manifests WHERE round = ?1 AND site = ?2",
            params![to_i64(round), site],
            |r| {
                Ok(StoredDocument {
                    body: r.get(0)?,
                    signature: r.get(1)?,
                })
            },
        )
        .optional()
        .map_err(self.sqlite())
    }

    /// Digests of `site`'s declared shards for `round` not stored yet, in
    /// index order.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn missing(&self, round: u64, site: &str) -> Result<Vec<String>, AggregatorError> {
        self.query_rows(
            "SELECT sha256 FROM shards WHERE round = ?1 AND site = ?2 AND stored = 0 ORDER BY idx",
            params![to_i64(round), site],
            |r| r.get::<_, String>(0),
        )
    }

    /// The declaration of the shard `sha256` in `round`: its declared
    /// size (the smallest, if several manifests declare it), whether it is
    /// stored, and the sites and indices that declare it.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn declared(
        &self,
        round: u64,
        sha256: &str,
    ) -> Result<Vec<(String, u32, u64, bool)>, AggregatorError> {
        self.query_rows("SELECT site, idx, bytes, stored FROM shards WHERE round = ?1 AND sha256 = ?2 ORDER BY site, idx", params![to_i64(round), sha256], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    to_u64(r.get::<_, i64>(2)?),
                    r.get::<_, i64>(3)? != 0,
                ))
            })
    }

    /// Writes a checked shard's bytes to `shards/<sha256>` atomically
    /// (unless already there), then marks every declaration of it in
    /// `round` stored. Returns whether the file was written now.
    ///
    /// # Errors
    /// [`AggregatorError::Io`] or [`AggregatorError::Sqlite`].
    pub fn store_shard(
        &self,
        round: u64,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<bool, AggregatorError> {
        let path = self.shard_path(sha256);
        let written = if path.is_file() {
            false
        } else {
            write_shard_file(&path, bytes).map_err(|source| AggregatorError::Io {
                path: path.display().to_string(),
                source,
            })?;
            true
        };
        self.mark_stored(round, sha256)?;
        Ok(written)
    }

    /// Marks every declaration of `sha256` in `round` stored (its file
    /// exists).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn mark_stored(&self, round: u64, sha256: &str) -> Result<(), AggregatorError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sqlite())?;
        tx.execute(
            "UPDATE shards SET stored = 1 WHERE round = ?1 AND sha256 = ?2",
            params![to_i64(round), sha256],
        )
        .map_err(self.sqlite())?;
        let sites: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT DISTINCT site FROM shards WHERE round = ?1 AND sha256 = ?2")
                .map_err(self.sqlite())?;
            stmt.query_map(params![to_i64(round), sha256], |r| r.get(0))
                .map_err(self.sqlite())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.sqlite())?
        };
        for site in &sites {
            Self::touch(&tx, site).map_err(self.sqlite())?;
        }
        tx.commit().map_err(self.sqlite())
    }

    /// After a restart: marks stored every declared shard of `round` whose
    /// file is on disk (a crash between the rename and the mark).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn reconcile(&self, round: u64) -> Result<(), AggregatorError> {
        let pending: Vec<String> = {
            let c = self.lock();
            let mut stmt = c
                .prepare("SELECT DISTINCT sha256 FROM shards WHERE round = ?1 AND stored = 0")
                .map_err(self.sqlite())?;
            stmt.query_map(params![to_i64(round)], |r| r.get(0))
                .map_err(self.sqlite())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.sqlite())?
        };
        for sha in pending {
            if self.shard_path(&sha).is_file() {
                self.mark_stored(round, &sha)?;
            }
        }
        Ok(())
    }

    /// Sites whose update for `round` is complete (manifest accepted,
    /// every declared shard stored), sorted.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn complete_updates(&self, round: u64) -> Result<Vec<String>, AggregatorError> {
        self.query_rows("SELECT m.site FROM manifests m WHERE m.round = ?1 AND m.rejected IS NULL AND NOT EXISTS (
                   SELECT 1 FROM shards s WHERE s.round = m.round AND s.site = m.site AND s.stored = 0)
                 ORDER BY m.site", params![to_i64(round)], |r| r.get::<_, String>(0))
    }

    /// Marks `site`'s update for `round` rejected: it never counts (its
    /// shards, once all stored, would not aggregate).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn reject(&self, round: u64, site: &str, reason: &str) -> Result<(), AggregatorError> {
        let c = self.lock();
        c.execute(
            "UPDATE manifests SET rejected = ?3 WHERE round = ?1 AND site = ?2",
            params![to_i64(round), site, reason],
        )
        .map_err(self.sqlite())?;
        Ok(())
    }

    /// Sites that sent statistics, sorted.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn statistics_sites(&self) -> Result<Vec<String>, AggregatorError> {
        Ok(self.statistics()?.into_iter().map(|(s, _)| s).collect())
    }

    /// Deletes shard files no manifest of `round` declares (after a round
    /// closed, unless uploads are kept).
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`]; files that cannot be deleted are
    /// logged and left.
    pub fn delete_shards_except(&self, round: u64) -> Result<usize, AggregatorError> {
        let keep: std::collections::BTreeSet<String> = {
            let c = self.lock();
            let mut stmt = c
                .prepare("SELECT DISTINCT sha256 FROM shards WHERE round = ?1")
                .map_err(self.sqlite())?;
            stmt.query_map(params![to_i64(round)], |r| r.get(0))
                .map_err(self.sqlite())?
                .collect::<Result<_, _>>()
                .map_err(self.sqlite())?
        };
        let dir = self.data_dir.join("shards");
        let mut deleted = 0;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => deleted += 1,
                Err(e) => tracing::warn!("cannot delete {}: {e}", entry.path().display()),
            }
        }
        Ok(deleted)
    }

    fn touch(tx: &rusqlite::Transaction<'_>, site: &str) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO seen (site, last_seen) VALUES (?1, ?2)
             ON CONFLICT (site) DO UPDATE SET last_seen = ?2",
            params![site, to_i64(super::now())],
        )?;
        Ok(())
    }

    /// When each site was last seen (an accepted document or shard),
    /// seconds since the Unix epoch.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn seen(&self) -> Result<Vec<(String, u64)>, AggregatorError> {
        self.query_rows(
            "SELECT site, last_seen FROM seen ORDER BY site",
            params![],
            |r| Ok((r.get::<_, String>(0)?, to_u64(r.get::<_, i64>(1)?))),
        )
    }

    /// Bytes each site sent per round: round 0 its statistics document,
    /// training rounds its manifest plus the shards stored.
    ///
    /// # Errors
    /// [`AggregatorError::Sqlite`].
    pub fn bytes_per_site_round(&self) -> Result<Vec<SiteRoundBytes>, AggregatorError> {
        let c = self.lock();
        let mut out = Vec::new();
        {
            let mut stmt = c
                .prepare("SELECT site, length(body) FROM statistics ORDER BY site")
                .map_err(self.sqlite())?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(SiteRoundBytes {
                        site: r.get(0)?,
                        round: 0,
                        bytes: to_u64(r.get::<_, i64>(1)?),
                        complete: true,
                    })
                })
                .map_err(self.sqlite())?;
            for row in rows {
                out.push(row.map_err(self.sqlite())?);
            }
        }
        let mut stmt = c
            .prepare(
                "SELECT m.site, m.round, length(m.body)
                   + COALESCE((SELECT SUM(s.bytes) FROM shards s WHERE s.round = m.round AND s.site = m.site AND s.stored = 1), 0),
                   m.rejected IS NULL AND NOT EXISTS (SELECT 1 FROM shards s WHERE s.round = m.round AND s.site = m.site AND s.stored = 0)
                 FROM manifests m ORDER BY m.round, m.site",
            )
            .map_err(self.sqlite())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SiteRoundBytes {
                    site: r.get(0)?,
                    round: to_u64(r.get::<_, i64>(1)?),
                    bytes: to_u64(r.get::<_, i64>(2)?),
                    complete: r.get::<_, i64>(3)? != 0,
                })
            })
            .map_err(self.sqlite())?;
        for row in rows {
            out.push(row.map_err(self.sqlite())?);
        }
        Ok(out)
    }
}

fn model_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PublishedModel> {
    Ok(PublishedModel {
        digest: r.get(0)?,
        round: to_u64(r.get::<_, i64>(1)?),
        previous: r.get(2)?,
        record: StoredDocument {
            body: r.get(3)?,
            signature: r.get(4)?,
        },
        contributions: to_u64(r.get::<_, i64>(5)?),
        aggregate_seconds: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> StoredDocument {
        StoredDocument {
            body: text.as_bytes().to_vec(),
            signature: "ed25519 00 00".to_owned(),
        }
    }

    fn shard(index: u32, sha: &str) -> DeclaredShard {
        DeclaredShard {
            index,
            sha256: sha.to_owned(),
            bytes: 10,
        }
    }

    #[test]
    fn manifests_are_taken_once_and_shards_complete_an_update_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let shards = [shard(0, "aa"), shard(1, "bb")];
        let m = doc("{\"m\":1}");
        assert_eq!(
            store
                .offer_manifest(1, "site-1", &m, 5, &shards)
                .expect("offer"),
            Offer::Inserted
        );
        assert_eq!(
            store
                .offer_manifest(1, "site-1", &m, 5, &shards)
                .expect("offer"),
            Offer::Identical
        );
        assert_eq!(
            store
                .offer_manifest(1, "site-1", &doc("{\"m\":2}"), 5, &shards)
                .expect("offer"),
            Offer::Different
        );
        assert_eq!(store.missing(1, "site-1").expect("missing"), ["aa", "bb"]);
        assert!(store.store_shard(1, "aa", b"0123456789").expect("store"));
        assert!(!store.store_shard(1, "aa", b"0123456789").expect("again"));
        assert!(store.complete_updates(1).expect("complete").is_empty());
        // A crash after the rename, before the mark: the reopened store
        // finds the file.
        crate::output::write_bytes(&store.shard_path("bb"), b"0123456789").expect("write");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        store.reconcile(1).expect("reconcile");
        assert_eq!(store.complete_updates(1).expect("complete"), ["site-1"]);
        let bytes = store.bytes_per_site_round().expect("bytes");
        assert_eq!(bytes.len(), 1);
        assert_eq!(bytes[0].bytes, 7 + 20);
        assert!(bytes[0].complete);
        // Nothing declares them in round 2: both files go.
        assert_eq!(store.delete_shards_except(2).expect("delete"), 2);
    }

    #[test]
    fn the_state_and_models_commit_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.state().expect("state").is_none());
        let start = RoundState::start(false, "d0", 1);
        let model = PublishedModel {
            digest: "d0".to_owned(),
            round: 0,
            previous: None,
            record: doc("{}"),
            contributions: 0,
            aggregate_seconds: 0.0,
        };
        store.start("job", &start, &model).expect("start");
        let mut frozen = start.clone();
        frozen.closing = Some(vec!["site-1".to_owned()]);
        store.freeze("job", &frozen).expect("freeze");
        let (job, s) = store.state().expect("state").expect("started");
        assert_eq!(job, "job");
        assert_eq!(s, frozen);
        let next = s.after_close("d1", 3, 2);
        let m1 = PublishedModel {
            digest: "d1".to_owned(),
            round: 1,
            previous: Some("d0".to_owned()),
            ..model
        };
        store.commit_round("job", &m1, &next).expect("commit");
        assert_eq!(store.state().expect("state").expect("s").1, next);
        assert_eq!(store.models().expect("models").len(), 2);
        assert_eq!(store.model("d1").expect("model"), Some(m1));
    }
}
