//! The site's side of a federation (`oxbox federate`): poll the
//! aggregator's signed task, and do what it asks, resumably.
//!
//! - **statistics** phase: the site's EMR statistics over its training
//!   cases ([`super::stats::site_statistics`], never a bucket under the
//!   minimum count), signed, sent once;
//! - **training** round r: the global model's signed record and files,
//!   checked (signature by the configured aggregator key, then the package
//!   digest over exactly the downloaded bytes) BEFORE anything is parsed
//!   or loaded → the site's kept tensors overlaid (FedBN) → `epochs` local
//!   epochs through the site's plugins ([`crate::train::trainer::Trainer`],
//!   normalisation and thresholds as the global model has them, FedProx's
//!   proximal term when μ > 0), each checkpointed → Δ = local − global →
//!   the privacy filters → shards → a signed [`UpdateManifest`] → upload
//!   (the manifest, then each shard the aggregator still lacks, with
//!   retries and backoff);
//! - each new global model is evaluated on the held-out cases
//!   ([`crate::cases::is_held_out`]) and, when `promote` is on and it
//!   passes the gate, becomes the served model.
//!
//! Progress persists under `<data_dir>/federation/<job>/`: a site killed
//! mid-training resumes from its last epoch checkpoint of that round; one
//! killed mid-upload re-sends the identical signed manifest and only the
//! shards the aggregator says it lacks. Nothing written there or sent
//! holds a patient identifier: cases are only counted, never named.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::FederationError;
use super::client::{AggregatorClient, ClientError};
use super::filters::{self, NormalSource};
use super::protocol::{
    FORMAT, GlobalModelRecord, Phase, RoundTask, ShardInfo, TensorInfo, UpdateManifest,
};
use super::shards;
use super::signed::SignedDocument;
use super::stats;
use super::tensors::{self, Tensor32, Tensors};
use crate::config::{Config, FederationConfig};
use crate::model::package::{MANIFEST_FILE, ModelManifest, PackageBytes, WEIGHTS_FILE};
use crate::model::{Model, ModelInput};
use crate::pipeline::Pipeline;
use crate::signing::SigningKey;
use crate::train::data::Example;
use crate::train::objective::{self, ClassWeighting};
use crate::train::optimizer::AdamWConfig;
use crate::train::trainer::{FitSettings, Trainer};

/// Largest `model.toml` accepted from the aggregator.
const MAX_MANIFEST_BYTES: u64 = 256 * 1024;
/// Largest `weights.safetensors` accepted from the aggregator (ResNet-50
/// scale models are ~100 MiB).
const MAX_WEIGHTS_BYTES: u64 = 2 << 30;
/// First wait after a failed transfer; doubles per attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Cases per forward pass when evaluating a global model.
const EVALUATION_BATCH: usize = 32;
/// The file, in a job's folder, of the tensors the site's filters kept at
/// home (FedBN's batch-norm statistics), overlaid on every global model.
const KEPT_FILE: &str = "kept.safetensors";

/// Where a site whose box stores under `data_dir` keeps job `job`'s
/// kept tensors ([`crate::federation::tensors::overlay`] them on a global
/// model to get the site's own model): read by `oxbox simulate` to
/// evaluate FedBN per site.
pub fn kept_tensors_path(data_dir: &Path, job: &str) -> PathBuf {
    data_dir.join("federation").join(job).join(KEPT_FILE)
}

/// Why the site client stopped.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The configuration has no usable `[federation]` section.
    #[error("{0}")]
    Config(String),
    /// The site's key could not be read.
    #[error("federation.key_file: {0}")]
    Key(#[from] crate::signing::SigningError),
    /// A request to the aggregator failed (after its retries).
    #[error("aggregator: {0}")]
    Client(#[from] ClientError),
    /// Something the aggregator sent does not check out: refused, nothing
    /// of it was loaded.
    #[error("refused {what} from the aggregator: {reason}; nothing of it was loaded")]
    Untrusted {
        /// What (`round task`, `global model 3f2a…`).
        what: String,
        /// Why.
        reason: String,
    },
    /// The federation maths or formats failed.
    #[error(transparent)]
    Federation(#[from] FederationError),
    /// A model package could not be read or loaded.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// The site's cases could not be prepared.
    #[error(transparent)]
    Cases(#[from] crate::cases::CasesError),
    /// A site folder is unreadable.
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    /// A tensor operation failed.
    #[error("tensors: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The site's federation state could not be read or written.
    #[error("{path}: {reason}")]
    State {
        /// The file or folder.
        path: String,
        /// Why.
        reason: String,
    },
}

impl SiteError {
    fn state(path: &Path, reason: impl std::fmt::Display) -> Self {
        SiteError::State {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Whether polling again later may get past it: the aggregator
    /// unreachable, overloaded, or refusing for now — not a refusal of the
    /// site's documents as such (400 malformed, 401/403 a key or site the
    /// aggregator does not accept), which needs the operator.
    pub fn is_transient(&self) -> bool {
        match self {
            SiteError::Client(e) => !matches!(e.status(), Some(400 | 401 | 403)),
            _ => false,
        }
    }
}

/// What the site is doing, for a progress display (never a case or a
/// patient).
#[derive(Debug, Clone)]
pub enum SiteEvent {
    /// A verified task.
    Task {
        /// The job.
        job: String,
        /// Its phase.
        phase: Phase,
        /// The open round.
        round: u64,
        /// The job's last round.
        rounds: u64,
    },
    /// A global model was downloaded and verified.
    ModelVerified {
        /// Its round.
        round: u64,
        /// Its digest.
        digest: String,
    },
    /// Cases to prepare through the site's plugins.
    Preparing {
        /// All cases.
        total: usize,
    },
    /// One more case prepared (or refused).
    Prepared,
    /// Cases ready.
    CasesReady {
        /// Training cases.
        train: usize,
        /// Held-out cases.
        held_out: usize,
        /// Refused by the pipeline.
        refused: usize,
    },
    /// The statistics were sent (or were already accepted).
    StatisticsSent {
        /// Whether the aggregator newly accepted them.
        new: bool,
    },
    /// Local training of a round starts or resumes.
    Training {
        /// The round.
        round: u64,
        /// First epoch run now (> 1: resumed from a checkpoint).
        first_epoch: usize,
        /// The round's epochs.
        epochs: usize,
        /// Optimizer steps per epoch.
        steps_per_epoch: usize,
    },
    /// One optimizer step; `loss` is the epoch's running mean.
    Step {
        /// Epoch.
        epoch: usize,
        /// Running mean loss.
        loss: f64,
    },
    /// An epoch finished and was checkpointed.
    Epoch {
        /// The round.
        round: u64,
        /// The epoch.
        epoch: usize,
        /// Its mean training loss.
        loss: f64,
    },
    /// The update is signed and stored, ready to upload.
    UpdateReady {
        /// The round.
        round: u64,
        /// Shards.
        shards: usize,
        /// Bytes of all shards.
        bytes: u64,
        /// Entries shared (non-zero after the filters).
        nonzero: u64,
    },
    /// The aggregator accepted the manifest and lacks these shards.
    Uploading {
        /// The round.
        round: u64,
        /// Shards still to send.
        missing: usize,
        /// Their bytes.
        bytes: u64,
        /// Shards the aggregator already had.
        already: usize,
    },
    /// One shard sent.
    ShardSent {
        /// Its bytes.
        bytes: u64,
    },
    /// The round's update is complete at the aggregator.
    Uploaded {
        /// The round.
        round: u64,
    },
    /// The aggregator refused the round's update (not retried).
    UpdateRefused {
        /// The round.
        round: u64,
        /// Why (status, problem type, detail).
        reason: String,
    },
    /// A failed transfer is retried.
    Retrying {
        /// The request.
        what: String,
        /// Attempt about to be made (2 = first retry).
        attempt: u32,
        /// Wait before it.
        wait: Duration,
        /// Why the last one failed.
        reason: String,
    },
    /// A global model was evaluated on the held-out cases.
    Evaluated {
        /// Its round.
        round: u64,
        /// Its AUC, P(level ≥ 1) at 24 h.
        auc: Option<f64>,
        /// The served model's AUC on the same cases.
        served_auc: Option<f64>,
        /// Whether it was promoted.
        promoted: bool,
    },
    /// The job is finished.
    Finished {
        /// The final global model's round.
        round: u64,
        /// Its digest.
        digest: String,
    },
}

/// Counters of the site's federation work (also
/// `<data_dir>/federation/metrics.prom`, OpenMetrics text).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SiteCounters {
    /// Rounds trained locally.
    pub rounds_trained: u64,
    /// Updates complete at the aggregator.
    pub updates_uploaded: u64,
    /// Shards sent.
    pub shards_sent: u64,
    /// Shards not sent because the aggregator had them already.
    pub shards_skipped: u64,
    /// Shard bytes sent.
    pub bytes_sent: u64,
    /// Retried transfers.
    pub retries: u64,
    /// Updates the aggregator refused.
    pub updates_refused: u64,
    /// Global models evaluated.
    pub models_evaluated: u64,
    /// Global models promoted.
    pub promotions: u64,
}

/// What one pass of the loop found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Did something; poll again at once.
    Worked,
    /// Nothing to do until the task changes.
    Idle,
    /// The job is finished.
    Finished {
        /// The job.
        job: String,
        /// The final global model's round.
        round: u64,
        /// Its digest.
        digest: String,
    },
}

/// A global model, verified.
struct GlobalModel {
    digest: String,
    round: u64,
    bytes: PackageBytes,
    manifest: ModelManifest,
}

/// The site's cases, prepared once through its plugins.
struct PreparedCases {
    input_size: u32,
    emr_only: bool,
    train: Vec<Example>,
    held_out: Vec<Example>,
}

/// A round's local training, as persisted after each epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RoundProgress {
    round: u64,
    base_model: String,
    epochs_done: usize,
    optimizer_steps: u64,
}

/// The last global model evaluated, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Evaluation {
    round: u64,
    digest: String,
    auc: Option<f64>,
    served_auc: Option<f64>,
    promoted: bool,
}

/// One site taking part in a federation.
pub struct SiteClient<'a> {
    config: &'a Config,
    federation: &'a FederationConfig,
    client: AggregatorClient,
    key: SigningKey,
    aggregator_key: [u8; 32],
    root: PathBuf,
    device: Device,
    prepared: Option<PreparedCases>,
    counters: SiteCounters,
    events: &'a (dyn Fn(SiteEvent) + Sync),
}

impl<'a> SiteClient<'a> {
    /// A site client for `config`'s `[federation]` section; state under
    /// `<data_dir>/federation/`.
    ///
    /// # Errors
    /// [`SiteError::Config`] without the section, [`SiteError::Key`],
    /// [`SiteError::Client`] for an unusable URL or trust store.
    pub fn new(
        config: &'a Config,
        events: &'a (dyn Fn(SiteEvent) + Sync),
    ) -> Result<Self, SiteError> {
        let federation = config.federation.as_ref().ok_or_else(|| {
            SiteError::Config(
                "the configuration has no [federation] section (see config/README.md)".to_owned(),
            )
        })?;
        let key = SigningKey::load(&federation.key_file)?;
        let aggregator_key = crate::signing::parse_public_key(&federation.aggregator_key)
            .map_err(|e| SiteError::Config(format!("federation.aggregator_key: {e}")))?;
        let client = AggregatorClient::new(
            &federation.aggregator_url,
            federation.tls_ca.as_deref(),
            Duration::from_millis(federation.request_timeout_ms),
        )?;
        let spec = crate::config::parse_device(&config.model.device).ok_or_else(|| {
            SiteError::Config(format!("model.device = {:?}", config.model.device))
        })?;
        let device = crate::model::select_device(spec)?;
        let root = config.storage.data_dir.join("federation");
        let counters = std::fs::read(root.join("counters.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Self {
            config,
            federation,
            client,
            key,
            aggregator_key,
            root,
            device,
            prepared: None,
            counters,
            events,
        })
    }

    /// The counters so far.
    pub fn counters(&self) -> &SiteCounters {
        &self.counters
    }

    /// Polls and works until the job is finished (`exit_when_finished`) or
    /// forever; transient failures (the aggregator unreachable, an upload
    /// refused for now) are retried at the next poll.
    ///
    /// # Errors
    /// Any [`SiteError`] that is not transient: something refused as
    /// untrusted, the site's data or state unusable.
    pub fn run(&mut self, exit_when_finished: bool) -> Result<Step, SiteError> {
        let poll = Duration::from_millis(self.federation.poll_interval_ms);
        loop {
            match self.step() {
                Ok(Step::Worked) => {}
                Ok(finished @ Step::Finished { .. }) if exit_when_finished => return Ok(finished),
                Ok(_) => std::thread::sleep(poll),
                Err(e) if e.is_transient() => {
                    tracing::warn!("federation: {e}; trying again in {} ms", poll.as_millis());
                    std::thread::sleep(poll);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One pass: fetch and verify the task, do what it asks.
    ///
    /// # Errors
    /// As [`SiteClient::run`], transient ones included.
    pub fn step(&mut self) -> Result<Step, SiteError> {
        let document = self.with_retries("GET /v1/task", |c| c.task())?;
        let task: RoundTask = document
            .verify(&[self.aggregator_key], "round task")
            .map_err(|e| untrusted("the round task", e))?;
        if task.format != FORMAT {
            return Err(untrusted(
                "the round task",
                format!("format {} (this site speaks {FORMAT})", task.format),
            ));
        }
        check_job_id(&task.job)?;
        (self.events)(SiteEvent::Task {
            job: task.job.clone(),
            phase: task.phase,
            round: task.round,
            rounds: task.rounds,
        });
        match task.phase {
            Phase::Statistics => self.statistics(&task),
            Phase::Training => {
                if task.global_round > 0 {
                    self.evaluate_global(&task)?;
                }
                self.training(&task)
            }
            Phase::Finished => {
                if task.global_round > 0 {
                    self.evaluate_global(&task)?;
                }
                (self.events)(SiteEvent::Finished {
                    round: task.global_round,
                    digest: task.global_model.clone(),
                });
                Ok(Step::Finished {
                    job: task.job,
                    round: task.global_round,
                    digest: task.global_model,
                })
            }
        }
    }

    fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join(job)
    }

    fn kept_path(&self, job: &str) -> PathBuf {
        kept_tensors_path(&self.config.storage.data_dir, job)
    }

    fn round_dir(&self, job: &str, round: u64) -> PathBuf {
        self.job_dir(job).join(format!("round-{round}"))
    }

    /// The statistics phase: send once.
    fn statistics(&mut self, task: &RoundTask) -> Result<Step, SiteError> {
        let marker = self.job_dir(&task.job).join("statistics.sent");
        if marker.is_file() {
            return Ok(Step::Idle);
        }
        let global = self.global_model(task, false)?;
        self.prepare(&global)?;
        let prepared = self.prepared_cases()?;
        let cases: Vec<Vec<(String, Option<f64>)>> =
            prepared.train.iter().map(|e| e.features.clone()).collect();
        let statistics = stats::site_statistics(
            &task.job,
            &self.config.site.id,
            &global.manifest.emr,
            &cases,
            self.federation.min_count,
        );
        let document = SignedDocument::sign(&statistics, &self.key)?;
        let new = self.with_retries("POST /v1/statistics", |c| c.send_statistics(&document))?;
        write_file(&marker, b"sent\n")?;
        (self.events)(SiteEvent::StatisticsSent { new });
        Ok(Step::Worked)
    }

    /// A training round: train (or resume), then upload (or resume).
    fn training(&mut self, task: &RoundTask) -> Result<Step, SiteError> {
        self.forget_old_rounds(task)?;
        let dir = self.round_dir(&task.job, task.round);
        if task.received.contains(&self.config.site.id)
            || dir.join("uploaded").is_file()
            || dir.join("refused").is_file()
        {
            return Ok(Step::Idle);
        }
        let update = dir.join("update");
        if !update.join("manifest.json").is_file() {
            let global = self.global_model(task, true)?;
            self.train_round(task, &global, &dir)?;
        }
        self.upload(task, &dir)?;
        Ok(Step::Worked)
    }

    /// Removes the state of rounds before the open one and of an open
    /// round begun on another global model (the aggregator moved on).
    fn forget_old_rounds(&self, task: &RoundTask) -> Result<(), SiteError> {
        let job = self.job_dir(&task.job);
        let Ok(entries) = std::fs::read_dir(&job) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(round) = name
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|r| r.parse::<u64>().ok())
            else {
                continue;
            };
            let stale = round < task.round
                || (round == task.round
                    && read_json::<RoundProgress>(&entry.path().join("progress.json"))
                        .is_some_and(|p| p.base_model != task.global_model));
            if stale {
                std::fs::remove_dir_all(entry.path())
                    .map_err(|e| SiteError::state(&entry.path(), e))?;
            }
        }
        // Global models of earlier rounds are no longer needed.
        if let Ok(models) = std::fs::read_dir(job.join("models")) {
            for entry in models.flatten() {
                if entry.file_name().to_str() != Some(task.global_model.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    /// The task's global model: from the local cache (checked again), or
    /// downloaded and verified — the signed record (required when
    /// `require_record`) and the digest over exactly the bytes received —
    /// before anything is parsed.
    fn global_model(
        &mut self,
        task: &RoundTask,
        require_record: bool,
    ) -> Result<GlobalModel, SiteError> {
        let digest = &task.global_model;
        let what = || format!("global model {}", short(digest));
        let dir = self.job_dir(&task.job).join("models").join(digest);
        let cached = PackageBytes::read(&dir)
            .ok()
            .filter(|bytes| bytes.digest() == *digest);
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let record = self
                    .with_retries("GET /v1/models/{digest}/record", |c| c.model_record(digest))?;
                match record {
                    Some(document) => {
                        let record: GlobalModelRecord = document
                            .verify(&[self.aggregator_key], "global model record")
                            .map_err(|e| untrusted(&what(), e))?;
                        if record.digest != *digest || record.job != task.job {
                            return Err(untrusted(
                                &what(),
                                "its signed record names another model or job",
                            ));
                        }
                        if record.round != task.global_round {
                            return Err(untrusted(
                                &what(),
                                format!(
                                    "its signed record is of round {}, the task says {}",
                                    record.round, task.global_round
                                ),
                            ));
                        }
                    }
                    None if require_record => {
                        return Err(untrusted(&what(), "the aggregator has no signed record"));
                    }
                    None => {}
                }
                let manifest = self.with_retries("GET model.toml", |c| {
                    c.model_file(digest, MANIFEST_FILE, MAX_MANIFEST_BYTES)
                })?;
                let weights = self.with_retries("GET weights.safetensors", |c| {
                    c.model_file(digest, WEIGHTS_FILE, MAX_WEIGHTS_BYTES)
                })?;
                let bytes = PackageBytes { manifest, weights };
                let actual = bytes.digest();
                if actual != *digest {
                    return Err(untrusted(
                        &what(),
                        format!(
                            "its files hash to {}, not to the digest the aggregator signed",
                            short(&actual)
                        ),
                    ));
                }
                bytes.write(&dir)?;
                bytes
            }
        };
        let package = bytes.package(&dir)?;
        (self.events)(SiteEvent::ModelVerified {
            round: task.global_round,
            digest: digest.clone(),
        });
        Ok(GlobalModel {
            digest: digest.clone(),
            round: task.global_round,
            bytes,
            manifest: package.manifest,
        })
    }

    /// Prepares the site's cases through its plugins, once per input
    /// shape: what training, statistics and evaluation start from.
    fn prepare(&mut self, global: &GlobalModel) -> Result<(), SiteError> {
        let emr_only = global.manifest.architecture.emr_only;
        if self
            .prepared
            .as_ref()
            .is_some_and(|p| p.input_size == global.manifest.input_size && p.emr_only == emr_only)
        {
            return Ok(());
        }
        let model = Model::from_bytes(
            global.bytes.clone(),
            Path::new("global-model"),
            &Device::Cpu,
        )?;
        let pipeline = Pipeline::new(self.config, model);
        let sites: Vec<crate::dataset::Site> = self
            .federation
            .data
            .iter()
            .map(|d| crate::dataset::read_site(d))
            .collect::<Result<_, _>>()?;
        (self.events)(SiteEvent::Preparing {
            total: sites.iter().map(|s| s.cases.len()).sum(),
        });
        let engine = crate::cases::plugin_engine(self.config)?;
        let lookup = crate::dataset::PluginLookup {
            dir: None,
            installed: crate::dataset::PluginLookup::installed_dir(),
        };
        let (mut train, mut held_out, mut refused) = (Vec::new(), Vec::new(), 0usize);
        for site in &sites {
            let plugins = crate::cases::site_plugins(site, self.config, &lookup, &engine)?;
            let inputs = crate::cases::prepare_cases(
                site,
                &pipeline,
                &plugins,
                &self.config.limits,
                &|| (self.events)(SiteEvent::Prepared),
            );
            for (input, case) in inputs.into_iter().zip(&site.cases) {
                let Ok(input) = input else {
                    refused += 1;
                    continue;
                };
                let example = Example {
                    image: input.image,
                    features: input.features,
                    levels: [case.level_24h, case.level_72h],
                };
                if crate::cases::is_held_out(&site.id, &case.case_id, self.federation.holdout) {
                    held_out.push(example);
                } else {
                    train.push(example);
                }
            }
        }
        (self.events)(SiteEvent::CasesReady {
            train: train.len(),
            held_out: held_out.len(),
            refused,
        });
        self.prepared = Some(PreparedCases {
            input_size: global.manifest.input_size,
            emr_only,
            train,
            held_out,
        });
        Ok(())
    }

    fn prepared_cases(&self) -> Result<&PreparedCases, SiteError> {
        self.prepared
            .as_ref()
            .ok_or_else(|| SiteError::Config("cases not prepared".to_owned()))
    }

    /// The global weights with the site's kept tensors (FedBN) in place.
    fn start_weights(&self, job: &str, global: &Tensors) -> Result<Tensors, SiteError> {
        let mut start = global.clone();
        if let Ok(bytes) = std::fs::read(self.kept_path(job)) {
            tensors::overlay(
                &mut start,
                tensors::from_safetensors(&bytes, "kept tensors")?,
            );
        }
        Ok(start)
    }

    /// Trains round `task.round` from `global` (resuming from the last
    /// epoch checkpoint), then writes the signed update into `dir/update`.
    fn train_round(
        &mut self,
        task: &RoundTask,
        global: &GlobalModel,
        dir: &Path,
    ) -> Result<(), SiteError> {
        self.prepare(global)?;
        let settings = &task.training;
        if settings.epochs == 0 || settings.batch_size < 2 {
            return Err(untrusted(
                "the round task",
                "training needs at least one epoch and a batch of two",
            ));
        }
        let global_tensors = tensors::from_safetensors(&global.bytes.weights, "global weights")?;
        let start = self.start_weights(&task.job, &global_tensors)?;
        let seed = round_seed(&self.config.site.id, &task.job, task.round);
        let mut trainer = Trainer::new(
            &global.manifest,
            FitSettings {
                batch_size: settings.batch_size,
                optimizer: AdamWConfig {
                    learning_rate: settings.learning_rate,
                    ..AdamWConfig::default()
                },
                decay_epochs: settings.epochs,
                augmentation: crate::train::data::Augmentation::default(),
                seed,
            },
            &self.device,
        )?;
        let start_candle = to_candle(&start, &self.device)?;
        let progress_path = dir.join("progress.json");
        let mut progress = read_json::<RoundProgress>(&progress_path)
            .filter(|p| p.round == task.round && p.base_model == global.digest)
            .unwrap_or(RoundProgress {
                round: task.round,
                base_model: global.digest.clone(),
                epochs_done: 0,
                optimizer_steps: 0,
            });
        if progress.epochs_done > 0 {
            let checkpoint = dir.join(format!("epoch-{}", progress.epochs_done));
            trainer.load_weights(&checkpoint.join(WEIGHTS_FILE))?;
            trainer.load_optimizer(
                &checkpoint.join(crate::train::checkpoint::OPTIMIZER_FILE),
                progress.optimizer_steps,
            )?;
        } else {
            std::fs::create_dir_all(dir).map_err(|e| SiteError::state(dir, e))?;
            trainer.set_weights(&start_candle)?;
        }
        trainer.set_proximal(settings.proximal_mu, &start_candle)?;
        let prepared = self.prepared_cases()?;
        let train = &prepared.train;
        if train.len() < settings.batch_size {
            return Err(SiteError::Config(format!(
                "{} usable training cases, fewer than the round's batch size {}",
                train.len(),
                settings.batch_size
            )));
        }
        let levels: Vec<_> = train.iter().map(|e| e.levels).collect();
        let class_weights = objective::class_weights(&levels, ClassWeighting::Sqrt);
        let epochs = settings.epochs;
        if progress.epochs_done < epochs {
            (self.events)(SiteEvent::Training {
                round: task.round,
                first_epoch: progress.epochs_done + 1,
                epochs,
                steps_per_epoch: train.len() / settings.batch_size
                    + usize::from(train.len() % settings.batch_size >= 2),
            });
        }
        let events = self.events;
        while progress.epochs_done < epochs {
            let fit = trainer.fit_epoch(
                progress.epochs_done + 1,
                train,
                &class_weights,
                &|epoch, loss| events(SiteEvent::Step { epoch, loss }),
            )?;
            // Checkpoint: the epoch's weights and optimizer state in a
            // folder renamed into place, then the progress file.
            let checkpoint = dir.join(format!("epoch-{}", fit.epoch));
            let partial = dir.join(format!("epoch-{}.partial", fit.epoch));
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial).map_err(|e| SiteError::state(&partial, e))?;
            trainer
                .varmap()
                .save(partial.join(WEIGHTS_FILE))
                .map_err(crate::train::TrainError::from)?;
            trainer
                .optimizer()
                .save(&partial.join(crate::train::checkpoint::OPTIMIZER_FILE))
                .map_err(crate::train::TrainError::from)?;
            sync_dir_files(&partial)?;
            let _ = std::fs::remove_dir_all(&checkpoint);
            std::fs::rename(&partial, &checkpoint).map_err(|e| SiteError::state(&checkpoint, e))?;
            let previous = progress.epochs_done;
            progress.epochs_done = fit.epoch;
            progress.optimizer_steps = trainer.optimizer().steps();
            write_json(&progress_path, &progress)?;
            if previous > 0 {
                let _ = std::fs::remove_dir_all(dir.join(format!("epoch-{previous}")));
            }
            events(SiteEvent::Epoch {
                round: task.round,
                epoch: fit.epoch,
                loss: fit.train_loss,
            });
        }

        // Δ, filters, shards, manifest, signature.
        let local = from_candle(&trainer.weights()?)?;
        let delta = tensors::difference(&local, &global_tensors)?;
        let update = build_update(
            UpdateHeader {
                job: &task.job,
                round: task.round,
                site: &self.config.site.id,
                base_model: &global.digest,
                samples: train.len() as u64,
            },
            delta,
            &self.federation.filters,
            (self.federation.shard_mib * 1_048_576.0) as usize,
            &self.key,
            &mut SystemNormal::new(),
        )?;
        let (document, manifest, encoded) = (&update.document, &update.manifest, &update.shards);
        // What the update does not carry stays on the site (FedBN).
        let shared: BTreeSet<&String> = manifest.tensors.iter().map(|t| &t.name).collect();
        let kept: Tensors = local
            .iter()
            .filter(|(name, _)| !shared.contains(name))
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect();

        // The update folder, complete or absent: written aside, renamed.
        let folder = dir.join("update");
        let partial = dir.join("update.partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| SiteError::state(&partial, e))?;
        for (shard, info) in encoded.iter().zip(&manifest.shards) {
            write_file(
                &partial.join(format!("{}.shard", info.sha256)),
                &shard.bytes,
            )?;
        }
        write_file(
            &partial.join("manifest.sig"),
            document.signature_line().as_bytes(),
        )?;
        write_file(&partial.join("manifest.json"), &document.body)?;
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::rename(&partial, &folder).map_err(|e| SiteError::state(&folder, e))?;
        if !kept.is_empty() {
            write_file(&self.kept_path(&task.job), &tensors::to_safetensors(&kept)?)?;
        }
        let _ = std::fs::remove_dir_all(dir.join(format!("epoch-{}", progress.epochs_done)));
        self.counters.rounds_trained += 1;
        self.save_counters();
        (self.events)(SiteEvent::UpdateReady {
            round: task.round,
            shards: manifest.shards.len(),
            bytes: manifest.shards.iter().map(|s| s.bytes).sum(),
            nonzero: update.nonzero,
        });
        Ok(())
    }

    /// Uploads the round's stored update: the identical signed manifest,
    /// then every shard the aggregator says it lacks.
    fn upload(&mut self, task: &RoundTask, dir: &Path) -> Result<(), SiteError> {
        let update = dir.join("update");
        let body = read_file(&update.join("manifest.json"))?;
        let line = String::from_utf8(read_file(&update.join("manifest.sig"))?)
            .map_err(|e| SiteError::state(&update.join("manifest.sig"), e))?;
        let document = SignedDocument::from_parts(body, line.trim())?;
        let manifest: UpdateManifest = document.verify(&[self.key.public_key()], "own update")?;
        let missing = match self.with_retries("POST /v1/updates", |c| c.send_manifest(&document)) {
            Ok(missing) => missing,
            Err(SiteError::Client(e)) if !e.is_retryable() && e.status().is_some() => {
                let reason = e.to_string();
                write_file(&dir.join("refused"), reason.as_bytes())?;
                self.counters.updates_refused += 1;
                self.save_counters();
                (self.events)(SiteEvent::UpdateRefused {
                    round: task.round,
                    reason,
                });
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let declared: HashMap<&str, &ShardInfo> = manifest
            .shards
            .iter()
            .map(|s| (s.sha256.as_str(), s))
            .collect();
        let missing: Vec<&ShardInfo> = missing
            .iter()
            .filter_map(|sha| declared.get(sha.as_str()).copied())
            .collect();
        let already = manifest.shards.len() - missing.len();
        self.counters.shards_skipped += already as u64;
        (self.events)(SiteEvent::Uploading {
            round: task.round,
            missing: missing.len(),
            bytes: missing.iter().map(|s| s.bytes).sum(),
            already,
        });
        let pace = self.federation.max_upload_kib_s;
        let started = Instant::now();
        let mut sent_bytes = 0u64;
        for info in missing {
            let bytes = Bytes::from(read_file(&update.join(format!("{}.shard", info.sha256)))?);
            if sha256_hex(&bytes) != info.sha256 {
                return Err(SiteError::state(
                    &update,
                    format!("shard {} changed on disk since it was signed", info.index),
                ));
            }
            self.with_retries("PUT /v1/shards/{sha256}", |c| {
                c.put_shard(&info.sha256, bytes.clone())
            })?;
            sent_bytes += info.bytes;
            self.counters.shards_sent += 1;
            self.counters.bytes_sent += info.bytes;
            self.save_counters();
            (self.events)(SiteEvent::ShardSent { bytes: info.bytes });
            if pace > 0 {
                // Keep the average at most `max_upload_kib_s`.
                let due = Duration::from_secs_f64(sent_bytes as f64 / (pace as f64 * 1024.0));
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        write_file(&dir.join("uploaded"), b"uploaded\n")?;
        self.counters.updates_uploaded += 1;
        self.save_counters();
        (self.events)(SiteEvent::Uploaded { round: task.round });
        Ok(())
    }

    /// Evaluates the task's global model (round ≥ 1) on the held-out cases
    /// once, and promotes it when `promote` is on and it passes the gate.
    fn evaluate_global(&mut self, task: &RoundTask) -> Result<(), SiteError> {
        let record_path = self.job_dir(&task.job).join("evaluated.json");
        if read_json::<Evaluation>(&record_path).is_some_and(|e| e.digest == task.global_model) {
            return Ok(());
        }
        let global = self.global_model(task, true)?;
        self.prepare(&global)?;
        let global_tensors = tensors::from_safetensors(&global.bytes.weights, "global weights")?;
        let start = self.start_weights(&task.job, &global_tensors)?;
        // The site's package: the global's bytes, or its kept tensors in
        // place (FedBN) — then the bytes are this site's own.
        let candidate = if start == global_tensors {
            global.bytes.clone()
        } else {
            PackageBytes {
                manifest: global.bytes.manifest.clone(),
                weights: tensors::to_safetensors(&start)?,
            }
        };
        let held_out = &self.prepared_cases()?.held_out;
        let auc = held_out_auc(candidate.clone(), held_out, &self.device)?;
        let served = self.config.model.package.as_deref();
        // The served package: the promotion layout's current version, or
        // a plain package folder.
        let served_bytes = served.and_then(|dir| {
            crate::model::promote::load_served(dir)
                .ok()
                .and_then(|p| PackageBytes::read(&p.dir).ok())
                .or_else(|| PackageBytes::read(dir).ok())
        });
        let served_auc = match served_bytes {
            Some(bytes) => held_out_auc(bytes, held_out, &self.device).ok().flatten(),
            None => None,
        };
        let passes = match (auc, served_auc) {
            (Some(new), Some(old)) => new >= old - self.federation.promote_max_auc_drop,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let promoted = self.federation.promote && passes;
        if promoted && let Some(served) = served {
            crate::model::promote(&candidate, served)?;
            self.counters.promotions += 1;
            self.notify_serve();
        }
        self.counters.models_evaluated += 1;
        self.save_counters();
        write_json(
            &record_path,
            &Evaluation {
                round: global.round,
                digest: global.digest.clone(),
                auc,
                served_auc,
                promoted,
            },
        )?;
        (self.events)(SiteEvent::Evaluated {
            round: global.round,
            auc,
            served_auc,
            promoted,
        });
        Ok(())
    }

    /// Tells the local `oxbox serve` (`serve_url`) to reload its model;
    /// a failure is logged, not fatal (serve reloads on restart or SIGHUP).
    fn notify_serve(&self) {
        let Some(url) = &self.federation.serve_url else {
            return;
        };
        let token = self
            .config
            .server
            .token_file
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_owned());
        let client = match AggregatorClient::new(url, None, Duration::from_secs(30)) {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(
                    "federation: the promoted model is in place, but serve could not be told: {e}"
                );
                return;
            }
        };
        // A reload the server defers (429: sooner than its minimum interval
        // after the previous one; 409: one is running; 503) is asked again
        // after its Retry-After, so that the promoted model is served
        // without waiting for someone's SIGHUP.
        let mut attempt = 1u32;
        loop {
            let result = client.send(
                hyper::Method::POST,
                "/v1/admin/model/reload",
                None,
                token.as_deref(),
                64 * 1024,
            );
            let wait = match &result {
                Ok(answer) if answer.status.is_success() => return,
                Ok(answer) if reload_deferred(answer.status) => {
                    reload_retry_wait(answer.retry_after_s)
                }
                Ok(_) => None,
                Err(e) if e.is_retryable() => Some(backoff(attempt + 1)),
                Err(_) => None,
            };
            match wait {
                Some(wait) if attempt < RELOAD_ATTEMPTS => {
                    tracing::info!(
                        "federation: serve deferred the reload; asking again in {} s",
                        wait.as_secs_f64()
                    );
                    attempt += 1;
                    std::thread::sleep(wait);
                }
                _ => {
                    match result {
                        Ok(answer) => tracing::warn!(
                            "federation: the promoted model is in place, but serve answered {} to the reload (after {attempt} attempt(s)); SIGHUP or POST /v1/admin/model/reload serves it",
                            answer.status
                        ),
                        Err(e) => tracing::warn!(
                            "federation: the promoted model is in place, but serve could not be told: {e}"
                        ),
                    }
                    return;
                }
            }
        }
    }

    /// Runs `request` with retries: a retryable failure waits 0.5 s,
    /// 1 s, 2 s, … (at most 30 s) up to `max_retries` times.
    fn with_retries<T>(
        &mut self,
        what: &str,
        mut request: impl FnMut(&AggregatorClient) -> Result<T, ClientError>,
    ) -> Result<T, SiteError> {
        let mut attempt = 1u32;
        loop {
            match request(&self.client) {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() && attempt <= self.federation.max_retries => {
                    let wait = backoff(attempt);
                    attempt += 1;
                    self.counters.retries += 1;
                    (self.events)(SiteEvent::Retrying {
                        what: what.to_owned(),
                        attempt,
                        wait,
                        reason: e.to_string(),
                    });
                    std::thread::sleep(wait);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes the counters (JSON, and OpenMetrics text for a node
    /// exporter's textfile collector); best effort.
    fn save_counters(&self) {
        if std::fs::create_dir_all(&self.root).is_err() {
            return;
        }
        if let Ok(json) = serde_json::to_vec_pretty(&self.counters) {
            let _ = crate::output::write_bytes(&self.root.join("counters.json"), &json);
        }
        let _ = crate::output::write_bytes(
            &self.root.join("metrics.prom"),
            openmetrics(&self.counters).as_bytes(),
        );
    }
}

/// What identifies an update: job, round, site, base model, samples.
#[derive(Debug, Clone, Copy)]
pub struct UpdateHeader<'h> {
    /// The federation job.
    pub job: &'h str,
    /// The round.
    pub round: u64,
    /// The site id.
    pub site: &'h str,
    /// Digest of the global model Δ is against.
    pub base_model: &'h str,
    /// Training cases (the FedAvg weight).
    pub samples: u64,
}

/// A signed update, ready to store and send.
#[derive(Debug)]
pub struct SignedUpdate {
    /// The signed canonical manifest.
    pub document: SignedDocument,
    /// The manifest.
    pub manifest: UpdateManifest,
    /// Its shards, in order.
    pub shards: Vec<shards::Shard>,
    /// Entries shared (non-zero after the filters).
    pub nonzero: u64,
}

/// The way of a site's Δ to the wire: the privacy filters in order, then
/// safetensors shards of at most `shard_bytes`, each hashed, then the
/// manifest that declares them, signed with `key`.
///
/// # Errors
/// [`SiteError::Federation`] from the filters, the shard encoding or the
/// signature.
pub fn build_update(
    header: UpdateHeader<'_>,
    mut delta: Tensors,
    filters: &[filters::Filter],
    shard_bytes: usize,
    key: &SigningKey,
    noise: &mut dyn NormalSource,
) -> Result<SignedUpdate, SiteError> {
    let applied = filters::apply(filters, &mut delta, noise)?;
    let nonzero = delta
        .values()
        .map(|t| t.values.iter().filter(|v| **v != 0.0).count() as u64)
        .sum();
    let encoded = shards::encode(&delta, shard_bytes)?;
    let manifest = UpdateManifest {
        format: FORMAT,
        job: header.job.to_owned(),
        round: header.round,
        site: header.site.to_owned(),
        base_model: header.base_model.to_owned(),
        samples: header.samples,
        filters: applied,
        tensors: delta
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                shape: t.shape.clone(),
            })
            .collect(),
        shards: encoded
            .iter()
            .map(|s| ShardInfo {
                index: s.index,
                sha256: sha256_hex(&s.bytes),
                bytes: s.bytes.len() as u64,
                tensors: s.tensors.clone(),
            })
            .collect(),
    };
    let document = SignedDocument::sign(&manifest, key)?;
    Ok(SignedUpdate {
        document,
        manifest,
        shards: encoded,
        nonzero,
    })
}

/// The counters as OpenMetrics text (a whole exposition, `# EOF` last).
pub fn openmetrics(c: &SiteCounters) -> String {
    let mut out = openmetrics_families(c);
    out.push_str("# EOF\n");
    out
}

/// The counters as OpenMetrics metric families, without the closing
/// `# EOF`: what `oxbox serve` adds to its own `/metrics`.
pub fn openmetrics_families(c: &SiteCounters) -> String {
    let mut out = String::new();
    for (name, help, value) in [
        (
            "rounds_trained",
            "Rounds trained locally.",
            c.rounds_trained,
        ),
        (
            "updates_uploaded",
            "Updates complete at the aggregator.",
            c.updates_uploaded,
        ),
        ("shards_sent", "Update shards sent.", c.shards_sent),
        (
            "shards_skipped",
            "Shards the aggregator already had.",
            c.shards_skipped,
        ),
        ("bytes_sent", "Shard bytes sent.", c.bytes_sent),
        ("retries", "Retried transfers.", c.retries),
        (
            "updates_refused",
            "Updates the aggregator refused.",
            c.updates_refused,
        ),
        (
            "models_evaluated",
            "Global models evaluated on held-out cases.",
            c.models_evaluated,
        ),
        (
            "promotions",
            "Global models promoted to serving.",
            c.promotions,
        ),
    ] {
        out.push_str(&format!(
            "# TYPE oxbox_federation_{name} counter\n# HELP oxbox_federation_{name} {help}\n\
             oxbox_federation_{name}_total {value}\n"
        ));
    }
    out
}

/// The site's federation counters as `oxbox federate` last saved them
/// under `data_dir` (None: this box has not federated, or the file is
/// unreadable).
pub fn saved_counters(data_dir: &Path) -> Option<SiteCounters> {
    let bytes = std::fs::read(data_dir.join("federation").join("counters.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The wait before retry `attempt` (2 = the first retry).
/// How many times a site asks `oxbox serve` to reload a promoted model.
const RELOAD_ATTEMPTS: u32 = 6;

/// The longest a site waits before asking again, whatever Retry-After says.
const MAX_RELOAD_WAIT: Duration = Duration::from_secs(120);

/// Whether serve deferred a reload (worth asking again later) rather than
/// refused it: 429 (too soon after the previous one), 409 (one running),
/// 503 (overloaded or draining).
fn reload_deferred(status: hyper::StatusCode) -> bool {
    matches!(
        status,
        hyper::StatusCode::TOO_MANY_REQUESTS
            | hyper::StatusCode::CONFLICT
            | hyper::StatusCode::SERVICE_UNAVAILABLE
    )
}

/// The wait before asking serve again: its Retry-After (at least 1 s, at
/// most [`MAX_RELOAD_WAIT`]), 1 s when it gave none.
fn reload_retry_wait(retry_after_s: Option<u64>) -> Option<Duration> {
    let seconds = retry_after_s
        .unwrap_or(1)
        .clamp(1, MAX_RELOAD_WAIT.as_secs());
    Some(Duration::from_secs(seconds))
}

fn backoff(attempt: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(2).min(16));
    doubled.min(MAX_BACKOFF)
}

/// AUC of P(level ≥ 1) at 24 h of `package` on `cases` (None: one class
/// only, or no cases).
fn held_out_auc(
    package: PackageBytes,
    cases: &[Example],
    device: &Device,
) -> Result<Option<f64>, SiteError> {
    if cases.is_empty() {
        return Ok(None);
    }
    let model = Model::from_bytes(package, Path::new("held-out-evaluation"), device)?;
    let mut scores = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(EVALUATION_BATCH) {
        let inputs: Vec<ModelInput> = chunk
            .iter()
            .map(|e| ModelInput {
                image: e.image.clone(),
                features: e.features.clone(),
            })
            .collect();
        for prediction in model.predict_batch(&inputs)? {
            scores.push(f64::from(prediction.h24.p_o2_any));
        }
    }
    let labels: Vec<bool> = cases.iter().map(|e| e.levels[0] >= 1).collect();
    Ok(crate::metrics::auc(&scores, &labels))
}

/// Standard normal draws from a generator seeded by the system's random
/// source (the `noise` filter's).
pub struct SystemNormal(crate::rng::Pcg);

impl Default for SystemNormal {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemNormal {
    /// A generator seeded from the system's random source.
    pub fn new() -> Self {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 16];
        // The system generator does not fail on supported platforms; the
        // clock is a last resort that still differs per run.
        if ring::rand::SystemRandom::new().fill(&mut seed).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            seed = nanos.to_le_bytes();
        }
        let (a, b) = seed.split_at(8);
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(s);
            u64::from_le_bytes(w)
        };
        Self(crate::rng::Pcg::new(word(a), word(b)))
    }
}

impl NormalSource for SystemNormal {
    fn next_normal(&mut self) -> f64 {
        self.0.normal()
    }
}

fn untrusted(what: &str, reason: impl std::fmt::Display) -> SiteError {
    SiteError::Untrusted {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// A job id is a folder name here: letters, digits, `-`, `_`, `.`, not
/// starting with a dot.
fn check_job_id(job: &str) -> Result<(), SiteError> {
    let ok = !job.is_empty()
        && job.len() <= 64
        && !job.starts_with('.')
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(untrusted(
            "the round task",
            "its job id is not 1 to 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

/// The seed of a round's local training: the same after a restart.
fn round_seed(site: &str, job: &str, round: u64) -> u64 {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("oxbox-federate/{job}/{site}/{round}").as_bytes(),
    );
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(head)
}

/// sha256 of `bytes`, hex (a shard's name).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn read_file(path: &Path) -> Result<Vec<u8>, SiteError> {
    std::fs::read(path).map_err(|e| SiteError::state(path, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SiteError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| SiteError::state(parent, e))?;
    }
    crate::output::write_bytes(path, bytes).map_err(|e| SiteError::state(path, e))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), SiteError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| SiteError::state(path, e))?;
    write_file(path, &json)
}

/// fsyncs every file of `dir` (before the folder is renamed into place).
fn sync_dir_files(dir: &Path) -> Result<(), SiteError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SiteError::state(dir, e))?;
    for entry in entries.flatten() {
        std::fs::File::open(entry.path())
            .and_then(|f| f.sync_all())
            .map_err(|e| SiteError::state(&entry.path(), e))?;
    }
    Ok(())
}

/// Converts candle tensors (any device) to [`Tensors`].
///
/// # Errors
/// On tensor errors (a non-F32 tensor is converted).
fn from_candle(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<Tensors, candle_core::Error> {
    let mut out = Tensors::new();
    for (name, tensor) in tensors {
        let values = tensor
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.insert(
            name.clone(),
            Tensor32 {
                shape: tensor.dims().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// Converts [`Tensors`] to candle tensors on `device`.
///
/// # Errors
/// On tensor errors.
fn to_candle(
    tensors: &Tensors,
    device: &candle_core::Device,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>, candle_core::Error> {
    let mut out = std::collections::HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let t = candle_core::Tensor::from_slice(&tensor.values, tensor.shape.as_slice(), device)?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_candle() {
        let mut t = Tensors::new();
        t.insert(
            "head.weight".into(),
            Tensor32 {
                shape: vec![2, 3],
                values: vec![1.0, -2.5, 0.0, 3.25, f32::MIN_POSITIVE, -0.0],
            },
        );
        t.insert(
            "empty".into(),
            Tensor32 {
                shape: vec![0],
                values: vec![],
            },
        );
        let c = to_candle(&t, &Device::Cpu).expect("to candle");
        assert_eq!(c["head.weight"].dims(), &[2, 3]);
        assert_eq!(from_candle(&c).expect("from candle"), t);
    }

    #[test]
    fn a_deferred_reload_waits_for_retry_after_within_bounds() {
        use hyper::StatusCode;
        for status in [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::CONFLICT,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert!(reload_deferred(status), "{status}");
        }
        for status in [
            StatusCode::FORBIDDEN,
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            assert!(!reload_deferred(status), "{status}");
        }
        assert_eq!(reload_retry_wait(Some(7)), Some(Duration::from_secs(7)));
        assert_eq!(reload_retry_wait(None), Some(Duration::from_secs(1)));
        assert_eq!(reload_retry_wait(Some(0)), Some(Duration::from_secs(1)));
        assert_eq!(reload_retry_wait(Some(86_400)), Some(MAX_RELOAD_WAIT));
    }

    #[test]
    fn backoff_doubles_from_half_a_second_up_to_thirty() {
        let waits: Vec<u64> = (2..=10).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff(200), MAX_BACKOFF);
    }

    #[test]
    fn job_ids_that_are_not_plain_folder_names_are_refused() {
        for good in ["exam-sim", "job_1", "a.b"] {
            assert!(check_job_id(good).is_ok(), "{good}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a\\b", &"x".repeat(65)] {
            assert!(check_job_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_round_seed_is_stable_and_differs_per_site_and_round() {
        assert_eq!(round_seed("s", "j", 1), round_seed("s", "j", 1));
        assert_ne!(round_seed("s", "j", 1), round_seed("s", "j", 2));
        assert_ne!(round_seed("s", "j", 1), round_seed("t", "j", 1));
    }

    #[test]
    fn the_counters_are_openmetrics_text() {
        let counters = SiteCounters {
            shards_sent: 3,
            bytes_sent: 1234,
            ..SiteCounters::default()
        };
        let text = openmetrics(&counters);
        assert!(
            text.contains("oxbox_federation_shards_sent_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("oxbox_federation_bytes_sent_total 1234\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(!openmetrics_families(&counters).contains("# EOF"));
    }

    #[test]
    fn saved_counters_are_read_back_and_absent_ones_are_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(saved_counters(dir.path()).is_none());
        let counters = SiteCounters {
            rounds_trained: 4,
            ..SiteCounters::default()
        };
        std::fs::create_dir_all(dir.path().join("federation")).expect("mkdir");
        std::fs::write(
            dir.path().join("federation/counters.json"),
            serde_json::to_vec(&counters).expect("json"),
        )
        .expect("write");
        assert_eq!(
            saved_counters(dir.path()).map(|c| c.rounds_trained),
            Some(4)
        );
    }
}
