//! The federation aggregator (`oxbox aggregator serve`): enrolled sites
//! poll it for the signed round task, fetch the global model, and send
//! signed statistics and update manifests plus the shards those declare;
//! when a round closes it averages the updates (FedAvg by sample count)
//! into the next global model, which it publishes with a signed record.
//!
//! - [`config`]: its own TOML file (listen, data_dir, key, TLS, limits,
//!   the job, the enrolled sites);
//! - [`store`]: SQLite state and atomically written shard files;
//! - [`rounds`]: the round state machine (pure);
//! - [`publish`]: closing a round: the statistics combine, the streaming
//!   FedAvg, the new package and its signed record;
//! - [`routes`]: the HTTP API (`host/api/aggregator-openapi.json`) on the
//!   shared [`crate::http`] plumbing, TLS via [`crate::http::tls`].
//!
//! What it trusts: documents signed by the key enrolled for the site id
//! they name, for this job, the open round and the current global model;
//! shards whose bytes hash to a digest such a document declares, no larger
//! than declared, that decode as update shards. Everything else is
//! refused before it is stored. It links neither plugins, DICOM nor the
//! pipeline (a unit test below reads its sources).
//!
//! Durability: every accepted document and every stored shard is in
//! SQLite or on disk (written atomically) before the client hears 201; a
//! round is closed in two transactions around a pure aggregation, so a
//! `kill -9` at any moment and a restart lose nothing and count nothing
//! twice.
//!
//! Test hook: `OXBOX_TEST_AGGREGATION_DELAY_MS` (read at start) sleeps
//! that long before adding each update during aggregation, so that the
//! crash tests can kill the process mid-aggregation.

pub mod config;
pub mod publish;
pub mod rounds;
pub mod routes;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use config::{AggregatorConfig, AggregatorConfigError};

use crate::federation::FederationError;
use crate::http::server::{self, ConnectionLimits, HttpError, ShutdownSignals};
use crate::model::ModelError;
use crate::signing::{SigningError, SigningKey};
use store::Store;

/// Errors of the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state database failed.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] AggregatorConfigError),
    /// The aggregator's key could not be loaded.
    #[error("aggregator key: {0}")]
    Key(#[from] SigningError),
    /// A model package (the start model, a global model) is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The federation maths refused stored data (a stored update that no
    /// longer decodes, tensors that do not match the global model).
    #[error(transparent)]
    Federation(#[from] FederationError),
    /// The server could not start.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] crate::http::tls::TlsError),
    /// The stored state contradicts itself or the configuration.
    #[error("aggregator state: {0}")]
    Corrupt(String),
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Labels of the refusal counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The problem type's slug (`bad-signature`, `stale-base-model`, …).
    pub reason: String,
}

/// Labels of the accepted-upload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UploadLabels {
    /// `statistics`, `manifest` or `shard`.
    pub kind: &'static str,
}

/// What `GET /metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Uploads accepted (new, not resumed), by kind.
    pub accepted: Family<UploadLabels, Counter>,
    /// Uploads refused, by problem type.
    pub refused: Family<RefusalLabels, Counter>,
    /// Shard bytes stored.
    pub shard_bytes: Counter,
    /// Rounds closed (statistics included).
    pub rounds_closed: Counter,
    /// The open round.
    pub round: Gauge,
    /// Seconds the last aggregation took, in milliseconds.
    pub last_aggregation_ms: Gauge,
    /// Open connections.
    pub open_connections: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("oxbox_aggregator");
        let accepted = Family::<UploadLabels, Counter>::default();
        let refused = Family::<RefusalLabels, Counter>::default();
        let shard_bytes = Counter::default();
        let rounds_closed = Counter::default();
        let round = Gauge::default();
        let last_aggregation_ms = Gauge::default();
        let open_connections = Gauge::default();
        registry.register(
            "uploads_accepted",
            "Statistics, manifests and shards accepted",
            accepted.clone(),
        );
        registry.register(
            "uploads_refused",
            "Uploads refused, by problem type",
            refused.clone(),
        );
        registry.register("shard_bytes", "Shard bytes stored", shard_bytes.clone());
        registry.register("rounds_closed", "Rounds closed", rounds_closed.clone());
        registry.register("round", "The open round", round.clone());
        registry.register(
            "last_aggregation_milliseconds",
            "Wall time of the last round's aggregation and publication",
            last_aggregation_ms.clone(),
        );
        registry.register(
            "open_connections",
            "Open HTTP connections",
            open_connections.clone(),
        );
        Self {
            registry,
            accepted,
            refused,
            shard_bytes,
            rounds_closed,
            round,
            last_aggregation_ms,
            open_connections,
        }
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// A published package's bytes, kept in memory for downloads (shared, not
/// copied, between concurrent responses).
#[derive(Debug, Clone)]
pub struct CachedModel {
    /// Package digest.
    pub digest: String,
    /// `model.toml`.
    pub manifest: Bytes,
    /// `weights.safetensors`.
    pub weights: Bytes,
}

/// How many packages [`Aggregator`] keeps in memory for downloads.
const CACHED_MODELS: usize = 2;

/// The read buffer per connection: shards of megabytes stream through it
/// in chunks of up to this size (hyper's `max_buf_size`; the endpoint's
/// 64 KiB would cut an 8 MiB shard into hundreds of reads). It also bounds
/// a request head, and each open connection holds at most this much.
pub const READ_BUFFER_BYTES: usize = 512 * 1024;

/// Shard uploads checked at once (each holds at most its declared size in
/// memory).
pub const SHARD_SLOTS: usize = 4;

/// The aggregator: configuration, key, store and metrics, shared by the
/// routes and the round coordinator.
#[derive(Debug)]
pub struct Aggregator {
    /// The configuration.
    pub config: AggregatorConfig,
    key: SigningKey,
    /// The durable state.
    pub store: Store,
    /// The metrics.
    pub metrics: Metrics,
    /// Wakes the coordinator after an upload completed.
    pub wake: tokio::sync::Notify,
    /// Bounds the shard uploads checked at once.
    pub shard_slots: tokio::sync::Semaphore,
    cache: Mutex<Vec<CachedModel>>,
    test_delay: Duration,
}

impl Aggregator {
    /// Opens the aggregator's state (starting the job from the start model
    /// the first time), repairing what a crash left.
    ///
    /// # Errors
    /// [`AggregatorError`]: an unusable key, start model or state, or a
    /// `data_dir` that belongs to another job.
    pub fn open(config: AggregatorConfig) -> Result<Self, AggregatorError> {
        let key = SigningKey::load(&config.key_file)?;
        let store = Store::open(&config.data_dir)?;
        let test_delay = std::env::var("OXBOX_TEST_AGGREGATION_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or_default();
        let aggregator = Self {
            config,
            key,
            store,
            metrics: Metrics::new(),
            wake: tokio::sync::Notify::new(),
            shard_slots: tokio::sync::Semaphore::new(SHARD_SLOTS),
            cache: Mutex::new(Vec::new()),
            test_delay,
        };
        match aggregator.store.state()? {
            None => publish::start_job(&aggregator)?,
            Some((job, state)) => {
                if job != aggregator.config.job.id {
                    return Err(AggregatorError::Corrupt(format!(
                        "{} holds job {job:?}, the config names job {:?}: use another data_dir",
                        aggregator.config.data_dir.display(),
                        aggregator.config.job.id
                    )));
                }
                aggregator.store.reconcile(state.round)?;
            }
        }
        if let Some((_, state)) = aggregator.store.state()? {
            aggregator
                .metrics
                .round
                .set(i64::try_from(state.round).unwrap_or(i64::MAX));
        }
        Ok(aggregator)
    }

    /// The aggregator's public key, hex (what sites put in
    /// `federation.aggregator_key`).
    pub fn public_hex(&self) -> String {
        self.key.public_hex()
    }

    /// The signing key.
    pub(crate) fn key(&self) -> &SigningKey {
        &self.key
    }

    /// The configured pause per update during aggregation (test hook).
    pub(crate) fn test_delay(&self) -> Duration {
        self.test_delay
    }

    /// The package `digest`'s bytes, from memory or from
    /// `models/<digest>/`, if published.
    ///
    /// # Errors
    /// [`AggregatorError`] when the package cannot be read.
    pub fn cached_model(&self, digest: &str) -> Result<Option<CachedModel>, AggregatorError> {
        {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(m) = cache.iter().find(|m| m.digest == digest) {
                return Ok(Some(m.clone()));
            }
        }
        if self.store.model(digest)?.is_none() {
            return Ok(None);
        }
        let bytes = crate::model::package::PackageBytes::read(&self.store.model_dir(digest))?;
        let model = CachedModel {
            digest: digest.to_owned(),
            manifest: Bytes::from(bytes.manifest),
            weights: Bytes::from(bytes.weights),
        };
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.retain(|m| m.digest != digest);
        cache.push(model.clone());
        while cache.len() > CACHED_MODELS {
            cache.remove(0);
        }
        Ok(Some(model))
    }

    /// One step of the round coordinator: closes the open round if it
    /// should close (or finishes a close a crash interrupted). Returns
    /// whether a round closed.
    ///
    /// # Errors
    /// [`AggregatorError`]; the round stays as it was, and the next step
    /// tries again.
    pub fn step(&self) -> Result<bool, AggregatorError> {
        publish::step(self)
    }
}

/// Shard buffers (up to `shard_mib` each, several in flight) are freed
/// right after use. glibc's allocator raises its mmap threshold as large
/// blocks are freed, after which such buffers come from per-thread heaps
/// that keep the memory: the aggregator's peak RSS then drifted from 260 to
/// 327 MiB between identical 20-site rounds. A fixed 1 MiB threshold keeps
/// every large buffer in its own mapping, returned to the system when
/// freed, so the peak stays what the running sum and the buffers in flight
/// need.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is thread-safe and
    // takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Runs the aggregator: serves the API on `config.listen` (TLS when
/// configured) and closes rounds as they complete, until SIGINT or
/// SIGTERM. `on_listening` gets the bound address once the server
/// accepts connections.
///
/// # Errors
/// [`AggregatorError`] when it cannot start.
pub fn serve(
    config: AggregatorConfig,
    on_listening: impl FnOnce(std::net::SocketAddr, &Aggregator),
) -> Result<(), AggregatorError> {
    let tls = match &config.tls {
        Some((cert, key)) => Some(crate::http::tls::acceptor(cert, key)?),
        None => None,
    };
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        header_timeout: Duration::from_secs(10),
        read_buffer_bytes: READ_BUFFER_BYTES,
        shutdown_grace: Duration::from_secs(10),
    };
    let listen = config.listen.to_string();
    return_large_buffers_to_the_system();
    let aggregator = Arc::new(Aggregator::open(config)?);
    let runtime = server::runtime(8)?;
    let shutdown = ShutdownSignals::install(&runtime)?;
    let listener = server::bind(&listen)?;
    let addr = listener
        .local_addr()
        .map_err(|source| AggregatorError::Io {
            path: listen.clone(),
            source,
        })?;
    on_listening(addr, &aggregator);
    let gauge = aggregator.metrics.open_connections.clone();
    let coordinator = Arc::clone(&aggregator);
    runtime.spawn(async move { coordinate(coordinator).await });
    let handler = {
        let aggregator = Arc::clone(&aggregator);
        move |peer, request| routes::handle(Arc::clone(&aggregator), peer, request)
    };
    runtime.block_on(server::serve_with_tls(
        listener,
        limits,
        tls,
        shutdown.received(),
        gauge,
        handler,
    ))?;
    Ok(())
}

/// The round coordinator: after every completed upload, and every second
/// (for `max_wait`), one [`Aggregator::step`] on the blocking pool.
async fn coordinate(aggregator: Arc<Aggregator>) {
    loop {
        let a = Arc::clone(&aggregator);
        match tokio::task::spawn_blocking(move || a.step()).await {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!("closing the round failed (retrying): {e}"),
            Err(e) => tracing::error!("the round coordinator panicked (retrying): {e}"),
        }
        tokio::select! {
            () = aggregator.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The layering, proven on the sources: the aggregator names neither
    /// plugins, DICOM, the pipeline nor the endpoint.
    #[test]
    fn the_aggregator_links_no_plugins_dicom_pipeline_or_endpoint() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/aggregator");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("src/aggregator") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        assert!(files.len() >= 6, "sources not found: {files:?}");
        // Spelt in pieces so that this test's own text does not match.
        let forbidden = [
            concat!("crate::", "plugins"),
            concat!("crate::", "dicom"),
            concat!("crate::", "pipeline"),
            concat!("crate::", "serve"),
            concat!("crate::", "train"),
            concat!("crate::", "cases"),
        ];
        let mut offending = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read");
            for (n, line) in text.lines().enumerate() {
                if forbidden.iter().any(|f| line.contains(f)) {
                    offending.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(offending.is_empty(), "{}", offending.join("\n"));
    }
}
