//! `oxbox serve`: the box's local HTTP/1.1 endpoint (hyper 1 on tokio).
//!
//! - [`routes`]: `POST /v1/predict` (multipart radiograph + EMR record, or
//!   JSON EMR only), health, readiness, model, plugins, metrics, the
//!   OpenAPI document and the plugin reload;
//! - [`batcher`]: dynamic batching of concurrent predictions;
//! - [`problem`]: the endpoint's own problem details (overload, admission,
//!   reloads, pipeline failures);
//! - [`metrics`]: the Prometheus/OpenMetrics exposition;
//! - [`admission`]: the memory budget predictions are admitted against;
//! - [`reload`]: plugin reloads, serialised, rate-limited and audited;
//! - [`studies`]: the DICOM listener's instances (`[dicom] enabled`):
//!   parsed, stored and matched to their EMR records (`POST /v1/emr`),
//!   inferred as predictions are, results at
//!   `GET /v1/studies/{study_instance_uid}/result`.
//!
//! The HTTP plumbing (accept loop, connection and body limits, drain,
//! problem rendering, the bearer token) is [`crate::http`]'s; the token is
//! required off loopback, and on the admin route everywhere.
//!
//! Decode and plugins run on tokio's blocking pool, the model on one
//! inference thread (batches), the SQLite audit log on the blocking pool.
//! A prediction reads its body (under its timeout, size limit and the
//! memory budget) before it takes one of `server.max_concurrent_requests`
//! permits, so a client trickling its body holds none; the permit then
//! moves into the blocking decode-and-plugins work, so a client that
//! disconnects frees it only when that work ends. At most
//! `server.max_connections` connections are open at once; further ones wait
//! in the listen backlog. SIGHUP reloads the plugins and the model
//! ([`model_reload`]); SIGINT/SIGTERM stop
//! accepting, let requests in progress finish (up to 30 s), then exit.

pub mod admission;
pub mod batcher;
pub mod metrics;
pub mod model_reload;
pub mod problem;
pub mod reload;
pub mod routes;
pub mod studies;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind};
use tokio::sync::Semaphore;

use crate::config::{Config, LimitsConfig, LoadedConfig};
use crate::http::server::{self, ConnectionLimits, HttpError, ShutdownSignals};
use crate::http::{BearerToken, BodyLimits, TokenError};
use crate::model::{Model, ModelError, select_device, set_compute_threads};
use crate::pipeline::Pipeline;
use crate::plugins::{PluginError, PluginRegistry};
use crate::store::{AuditLog, StoreError};
use admission::MemoryBudget;
use batcher::Batcher;
use candle_core::Device;
use metrics::Metrics;
use reload::ReloadGate;

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
    /// Binding, the runtime, a signal handler or the socket failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The DICOM listener or its studies store could not start.
    #[error("[dicom]: {0}")]
    Dicom(String),
    /// A thread failed to start.
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
    /// The connections: how many at once, the header timeout, the read
    /// buffer, the drain at shutdown.
    pub connections: ConnectionLimits,
    /// The body: largest size and the time it may take.
    pub body: BodyLimits,
    /// Predictions in progress at once.
    pub max_concurrent: usize,
    /// Least time between two HTTP plugin reloads (and, apart, between
    /// two HTTP model reloads).
    pub reload_min_interval: Duration,
    /// The memory budget, bytes (derived when the config says 0).
    pub memory_budget_bytes: u64,
    /// Predictions answer with a `Server-Timing` header.
    pub server_timing: bool,
}

impl ServerSettings {
    fn from_config(config: &Config) -> Self {
        let s = &config.server;
        Self {
            connections: ConnectionLimits {
                max_connections: s.max_connections,
                header_timeout: Duration::from_millis(s.header_timeout_ms),
                read_buffer_bytes: server::READ_BUFFER_BYTES,
                shutdown_grace: server::SHUTDOWN_GRACE,
            },
            body: BodyLimits {
                max_bytes: s.max_body_mib * 1024 * 1024,
                max_bytes_setting: "server.max_body_mib",
                timeout: Duration::from_millis(s.body_timeout_ms),
                timeout_setting: "server.body_timeout_ms",
            },
            max_concurrent: s.max_concurrent_requests,
            reload_min_interval: Duration::from_secs(s.reload_min_interval_s),
            memory_budget_bytes: if s.memory_budget_mib == 0 {
                admission::derived_budget()
            } else {
                s.memory_budget_mib * 1024 * 1024
            },
            server_timing: s.server_timing,
        }
    }
}

/// The served model: its pipeline and the inference thread that runs it.
/// A request takes the one current when it starts and keeps it to the end,
/// so a model reload lets requests in progress finish on the old model
/// (whose thread stops when the last of them lets go).
#[derive(Debug)]
pub struct Served {
    /// The model with the site's settings.
    pub pipeline: Arc<Pipeline>,
    /// Its inference thread.
    pub batcher: Batcher,
}

/// Where the served model comes from, for reloads: the same resolution as
/// at start ([`crate::model::demo::resolve`]), on the same device.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// `--model DIR`.
    pub explicit: Option<PathBuf>,
    /// `[model] package`.
    pub configured: Option<PathBuf>,
    /// `[storage] data_dir` (the demo model, the default promotion folder).
    pub data_dir: PathBuf,
    /// The compute device.
    pub device: Device,
    /// The configuration the server started with (site, limits, batching).
    pub config: Config,
}

impl ModelSource {
    /// Resolves and reads the package the server should serve now.
    ///
    /// # Errors
    /// [`ModelError`] from reading or checking it.
    pub fn package(&self) -> Result<crate::model::ModelPackage, ModelError> {
        crate::model::demo::resolve(
            self.explicit.as_deref(),
            self.configured.as_deref(),
            &self.data_dir,
        )
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    served: RwLock<Arc<Served>>,
    model_source: ModelSource,
    plugins: Arc<PluginRegistry>,
    audit: Arc<Mutex<AuditLog>>,
    metrics: Arc<Metrics>,
    token: Option<BearerToken>,
    limits: LimitsConfig,
    settings: ServerSettings,
    permits: Arc<Semaphore>,
    budget: Arc<MemoryBudget>,
    reloads: ReloadGate,
    model_reloads: ReloadGate,
    dicom: Option<DicomState>,
}

/// What the DICOM side shares with the routes (`[dicom] enabled`).
#[derive(Debug)]
pub struct DicomState {
    /// The received studies.
    pub studies: Arc<crate::studies::Studies>,
    /// The token `POST /v1/emr` needs.
    pub emr_token: BearerToken,
}

impl AppState {
    /// `[storage] data_dir`.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.model_source.data_dir
    }

    /// The model served now (kept by a request to its end).
    pub fn served(&self) -> Arc<Served> {
        match self.served.read() {
            Ok(served) => Arc::clone(&served),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Serves `model` from now on: a new pipeline and inference thread;
    /// requests in progress keep the old ones.
    ///
    /// # Errors
    /// When the inference thread cannot be started (the old model stays).
    pub fn swap_model(&self, model: Model) -> std::io::Result<()> {
        let config = &self.model_source.config;
        let pipeline = Arc::new(Pipeline::new(config, model));
        let batcher = Batcher::start(
            Arc::clone(&pipeline),
            config.server.batch_max,
            Duration::from_millis(config.server.batch_max_wait_ms),
            config.server.batch_calibrate,
            Arc::clone(&self.metrics),
        )?;
        let next = Arc::new(Served { pipeline, batcher });
        match self.served.write() {
            Ok(mut served) => *served = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(())
    }
}

/// The signals the server handles, installed before it says it listens
/// (so that a SIGHUP sent at once reloads rather than kills it).
#[derive(Debug)]
struct Signals {
    /// Reloads the plugins and the model.
    hangup: Signal,
    /// SIGINT and SIGTERM: drain and exit.
    shutdown: ShutdownSignals,
}

/// A server with its model and plugins loaded and its socket bound.
#[derive(Debug)]
pub struct Server {
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    runtime: tokio::runtime::Runtime,
    signals: Signals,
    dicom: Option<crate::dimse::scp::Listener>,
}

/// How long a shutdown waits for DICOM associations to finish the data set
/// they are receiving.
pub const DICOM_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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
        let model_source = ModelSource {
            explicit: model_dir.map(Path::to_path_buf),
            configured: config.model.package.clone(),
            data_dir: config.storage.data_dir.clone(),
            device: device.clone(),
            config: config.clone(),
        };
        let model = Model::load(model_source.package()?, &device)?;
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
            config.server.batch_calibrate,
            Arc::clone(&metrics),
        )
        .map_err(io("starting the inference thread"))?;
        let listener = server::bind(&config.server.listen)?;
        let settings = ServerSettings::from_config(config);
        let runtime = server::runtime(settings.max_concurrent + 8)?;
        let signals = Signals {
            hangup: server::install_signal(&runtime, SignalKind::hangup(), "SIGHUP")?,
            shutdown: ShutdownSignals::install(&runtime)?,
        };
        tracing::info!(
            "memory budget {} MiB, at most {} connections, {} predictions at once",
            settings.memory_budget_bytes / (1024 * 1024),
            settings.connections.max_connections,
            settings.max_concurrent
        );
        let dicom = if config.dicom.enabled {
            let studies = crate::studies::Studies::open(&config.storage.data_dir, &config.dicom)
                .map_err(|e| ServeError::Dicom(e.to_string()))?;
            let token_file =
                config.dicom.emr_token_file.as_deref().ok_or_else(|| {
                    ServeError::Dicom("dicom.emr_token_file is not set".to_owned())
                })?;
            let emr_token = BearerToken::from_file(token_file).map_err(|e| {
                ServeError::Dicom(e.to_string().replacen(
                    "server.token_file",
                    "dicom.emr_token_file",
                    1,
                ))
            })?;
            let socket = crate::dimse::scp::bind(&config.dicom.listen)
                .map_err(|e| ServeError::Dicom(format!("binding {}: {e}", config.dicom.listen)))?;
            Some((
                DicomState {
                    studies: Arc::new(studies),
                    emr_token,
                },
                socket,
            ))
        } else {
            None
        };
        let (dicom_state, dicom_socket) = match dicom {
            Some((state, socket)) => (Some(state), Some(socket)),
            None => (None, None),
        };
        let state = Arc::new(AppState {
            served: RwLock::new(Arc::new(Served { pipeline, batcher })),
            model_source,
            plugins,
            audit,
            metrics,
            token,
            limits: config.limits.clone(),
            permits: Arc::new(Semaphore::new(settings.max_concurrent)),
            budget: MemoryBudget::new(settings.memory_budget_bytes),
            reloads: ReloadGate::new(settings.reload_min_interval),
            model_reloads: ReloadGate::new(settings.reload_min_interval),
            dicom: dicom_state,
            settings,
        });
        let dicom = match (dicom_socket, &state.dicom) {
            (Some(socket), Some(dicom)) => {
                let d = &config.dicom;
                let settings = crate::dimse::scp::ScpSettings {
                    ae_title: d.ae_title.clone(),
                    allowed_calling_ae_titles: d.allowed_calling_ae_titles.clone(),
                    max_pdu_length: d.max_pdu_length,
                    association_timeout: Duration::from_secs(d.association_timeout_s),
                    idle_timeout: Duration::from_secs(d.idle_timeout_s),
                    max_associations: d.max_associations,
                    max_instance_bytes: config.limits.max_dicom_file_bytes(),
                };
                let sink = studies::StudySink::new(
                    Arc::clone(&state),
                    Arc::clone(&dicom.studies),
                    runtime.handle().clone(),
                );
                let listener = crate::dimse::scp::Listener::start(
                    socket,
                    settings,
                    Arc::clone(&state.budget),
                    Arc::new(sink),
                )
                .map_err(io("starting the DICOM listener"))?;
                tracing::info!(
                    "DICOM listener on {} as {}, {} associations at once",
                    listener.local_addr(),
                    d.ae_title,
                    d.max_associations
                );
                Some(listener)
            }
            _ => None,
        };
        Ok(Self {
            state,
            listener,
            runtime,
            signals,
            dicom,
        })
    }

    /// The DICOM listener's address, when `[dicom] enabled`.
    pub fn dicom_addr(&self) -> Option<SocketAddr> {
        self.dicom
            .as_ref()
            .map(crate::dimse::scp::Listener::local_addr)
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
    /// [`ServeError::Http`] when the socket fails.
    pub fn run(self) -> Result<(), ServeError> {
        let Self {
            state,
            listener,
            runtime,
            signals,
            dicom,
        } = self;
        if let Some(dicom) = &state.dicom {
            runtime.spawn(studies::sweeper(
                Arc::clone(&state),
                Arc::clone(&dicom.studies),
            ));
        }
        let served = runtime.block_on(serve(state, listener, signals));
        if let Some(dicom) = dicom {
            let left = dicom.shutdown(DICOM_SHUTDOWN_GRACE);
            if left > 0 {
                tracing::warn!(
                    "{left} DICOM associations still open after {} s: closed; their incomplete data sets were not stored",
                    DICOM_SHUTDOWN_GRACE.as_secs()
                );
            }
        }
        served
    }
}

async fn serve(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    signals: Signals,
) -> Result<(), ServeError> {
    let Signals { hangup, shutdown } = signals;
    tokio::spawn(reload::on_sighup(Arc::clone(&state), hangup));
    let limits = state.settings.connections;
    let open_connections = state.metrics.connections().clone();
    let handler = move |peer, request| routes::handle(Arc::clone(&state), peer, request);
    server::serve(
        listener,
        limits,
        shutdown.received(),
        open_connections,
        handler,
    )
    .await?;
    Ok(())
}
