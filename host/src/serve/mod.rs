//! `oxbox serve`: the box's local HTTP/1.1 endpoint (hyper 1 on tokio).
//!
//! - [`routes`]: `POST /v1/predict` (multipart radiograph + EMR record, or
//!   JSON EMR only), health, readiness, model, plugins, metrics, the
//!   OpenAPI document and the plugin reload;
//! - [`batcher`]: dynamic batching of concurrent predictions;
//! - [`problem`]: RFC 9457 problem details for every error;
//! - [`metrics`]: the Prometheus/OpenMetrics exposition;
//! - [`auth`]: the bearer token required off loopback, and on the admin
//!   route everywhere;
//! - [`admission`]: the memory budget predictions are admitted against;
//! - [`reload`]: plugin reloads, serialised, rate-limited and audited.
//!
//! Decode and plugins run on tokio's blocking pool, the model on one
//! inference thread (batches), the SQLite audit log on the blocking pool.
//! A prediction reads its body (under its timeout, size limit and the
//! memory budget) before it takes one of `server.max_concurrent_requests`
//! permits, so a client trickling its body holds none; the permit then
//! moves into the blocking decode-and-plugins work, so a client that
//! disconnects frees it only when that work ends. At most
//! `server.max_connections` connections are open at once; further ones wait
//! in the listen backlog. SIGHUP reloads the plugins; SIGINT/SIGTERM stop
//! accepting, let requests in progress finish (up to 30 s), then exit.

pub mod admission;
pub mod auth;
pub mod batcher;
pub mod metrics;
pub mod problem;
pub mod reload;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Semaphore;

use crate::config::{Config, LimitsConfig, LoadedConfig};
use crate::model::{Model, ModelError, select_device, set_compute_threads};
use crate::pipeline::Pipeline;
use crate::plugins::{PluginError, PluginRegistry};
use crate::store::{AuditLog, StoreError};
use admission::MemoryBudget;
use auth::{BearerToken, TokenError};
use batcher::Batcher;
use metrics::Metrics;
use reload::ReloadGate;

/// How long requests in progress may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The most a connection buffers while reading a request (hyper's
/// `max_buf_size`; its default is about 400 KiB): request heads larger than
/// this are refused, bodies stream through it.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The plugins could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The audit log could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token file is unusable.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Binding, the runtime or a thread failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// Server limits from `[server]`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Largest body, bytes.
    pub max_body_bytes: u64,
    /// Time to send the headers.
    pub header_timeout: Duration,
    /// Time to send the body.
    pub body_timeout: Duration,
    /// Predictions in progress at once.
    pub max_concurrent: usize,
    /// Open connections at once.
    pub max_connections: usize,
    /// Least time between two HTTP plugin reloads.
    pub reload_min_interval: Duration,
    /// The memory budget, bytes (derived when the config says 0).
    pub memory_budget_bytes: u64,
}

impl ServerSettings {
    fn from_config(config: &Config) -> Self {
        let s = &config.server;
        Self {
            max_body_bytes: s.max_body_mib * 1024 * 1024,
            header_timeout: Duration::from_millis(s.header_timeout_ms),
            body_timeout: Duration::from_millis(s.body_timeout_ms),
            max_concurrent: s.max_concurrent_requests,
            max_connections: s.max_connections,
            reload_min_interval: Duration::from_secs(s.reload_min_interval_s),
            memory_budget_bytes: if s.memory_budget_mib == 0 {
                admission::derived_budget()
            } else {
                s.memory_budget_mib * 1024 * 1024
            },
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    pipeline: Arc<Pipeline>,
    plugins: Arc<PluginRegistry>,
    batcher: Batcher,
    audit: Arc<Mutex<AuditLog>>,
    metrics: Arc<Metrics>,
    token: Option<BearerToken>,
    limits: LimitsConfig,
    settings: ServerSettings,
    permits: Arc<Semaphore>,
    budget: Arc<MemoryBudget>,
    reloads: ReloadGate,
}

/// The signals the server handles, installed before it says it listens
/// (so that a SIGHUP sent at once reloads rather than kills it).
#[derive(Debug)]
struct Signals {
    hangup: Signal,
    interrupt: Signal,
    terminate: Signal,
}

/// A server with its model and plugins loaded and its socket bound.
#[derive(Debug)]
pub struct Server {
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    runtime: tokio::runtime::Runtime,
    signals: Signals,
}

impl Server {
    /// Loads the model (`model_dir`, or `[model] package`, or the embedded
    /// demo model) and the plugins,
    /// opens the audit log, reads the token file, binds `[server] listen`.
    ///
    /// # Errors
    /// [`ServeError`], naming what failed.
    pub fn new(loaded: &LoadedConfig, model_dir: Option<&Path>) -> Result<Self, ServeError> {
        let config = &loaded.config;
        set_compute_threads(config.model.threads);
        let device = select_device(
            crate::config::parse_device(&config.model.device).ok_or_else(|| {
                ModelError::Device {
                    device: config.model.device.clone(),
                    reason: "use \"cpu\" or \"cuda:N\"".to_owned(),
                }
            })?,
        )?;
        let package = crate::model::demo::resolve(
            model_dir,
            config.model.package.as_deref(),
            &config.storage.data_dir,
        )?;
        let model = Model::load(package, &device)?;
        let pipeline = Arc::new(Pipeline::new(config, model));
        let plugins = Arc::new(PluginRegistry::new(loaded)?);
        let audit = Arc::new(Mutex::new(AuditLog::open(&config.storage.data_dir)?));
        let token = config
            .server
            .token_file
            .as_deref()
            .map(BearerToken::from_file)
            .transpose()?;
        let metrics = Arc::new(Metrics::new());
        let batcher = Batcher::start(
            Arc::clone(&pipeline),
            config.server.batch_max,
            Duration::from_millis(config.server.batch_max_wait_ms),
            Arc::clone(&metrics),
        )
        .map_err(io("starting the inference thread"))?;
        let listener = std::net::TcpListener::bind(&config.server.listen)
            .map_err(io(format!("binding {}", config.server.listen)))?;
        listener
            .set_nonblocking(true)
            .map_err(io("configuring the socket"))?;
        let settings = ServerSettings::from_config(config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(settings.max_concurrent + 8)
            .thread_name("oxbox-http")
            .enable_all()
            .build()
            .map_err(io("starting the async runtime"))?;
        let signals = {
            let _context = runtime.enter();
            Signals {
                hangup: signal(SignalKind::hangup())
                    .map_err(io("installing the SIGHUP handler"))?,
                interrupt: signal(SignalKind::interrupt())
                    .map_err(io("installing the SIGINT handler"))?,
                terminate: signal(SignalKind::terminate())
                    .map_err(io("installing the SIGTERM handler"))?,
            }
        };
        tracing::info!(
            "memory budget {} MiB, at most {} connections, {} predictions at once",
            settings.memory_budget_bytes / (1024 * 1024),
            settings.max_connections,
            settings.max_concurrent
        );
        Ok(Self {
            state: Arc::new(AppState {
                pipeline,
                plugins,
                batcher,
                audit,
                metrics,
                token,
                limits: config.limits.clone(),
                permits: Arc::new(Semaphore::new(settings.max_concurrent)),
                budget: MemoryBudget::new(settings.memory_budget_bytes),
                reloads: ReloadGate::new(settings.reload_min_interval),
                settings,
            }),
            listener,
            runtime,
            signals,
        })
    }

    /// The bound address (the port, when `listen` asked for port 0).
    ///
    /// # Errors
    /// If the socket cannot say.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until SIGINT or SIGTERM, then drains.
    ///
    /// # Errors
    /// [`ServeError::Io`] when the socket fails.
    pub fn run(self) -> Result<(), ServeError> {
        let Self {
            state,
            listener,
            runtime,
            signals,
        } = self;
        runtime.block_on(serve(state, listener, signals))
    }
}

async fn serve(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    signals: Signals,
) -> Result<(), ServeError> {
    let Signals {
        hangup,
        mut interrupt,
        mut terminate,
    } = signals;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(io("registering the socket"))?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::spawn(reload::on_sighup(Arc::clone(&state), hangup));
    let header_timeout = state.settings.header_timeout;
    let connections = Arc::new(Semaphore::new(state.settings.max_connections));
    loop {
        // A free connection slot first: at the cap, new connections wait in
        // the kernel's listen backlog, holding nothing of ours.
        let slot = tokio::select! {
            slot = Arc::clone(&connections).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let service_state = Arc::clone(&state);
        let service = service_fn(move |request| {
            let state = Arc::clone(&service_state);
            async move { Ok::<_, Infallible>(routes::handle(state, peer, request).await) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(READ_BUFFER_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        let open = OpenConnection::new(Arc::clone(&state.metrics), slot);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(open);
        });
    }
    tracing::info!("shutting down: draining requests in progress");
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in progress after {SHUTDOWN_GRACE:?}; exiting");
    }
    Ok(())
}

/// A connection's slot under `server.max_connections`, counted in the
/// open-connections gauge while held.
struct OpenConnection {
    metrics: Arc<Metrics>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(metrics: Arc<Metrics>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.connections().inc();
        Self {
            metrics,
            _slot: slot,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connections().dec();
    }
}
