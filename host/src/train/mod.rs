//! Local training (`oxbox train`): site folders → a trained model package,
//! in three stages:
//!
//! - **preparation** ([`prepare`]): every case once through its site's
//!   plugins, exactly as a prediction is ([`crate::cases`], [`data`]), split
//!   into training and validation by a stable hash of (seed, site, case
//!   id); the EMR normalisation fitted on the training split and written
//!   into the package's `model.toml` (optional: `refit_normalisation`);
//! - **fitting** ([`trainer::Trainer`]): the network
//!   ([`crate::model::ExamNet`], trainable batch norm) learns, on the
//!   configured device, from given weights and optimizer state, with AdamW
//!   ([`optimizer`]) on the class-weighted ordinal loss ([`objective`]),
//!   images augmented each epoch; after every epoch: validation loss, a
//!   checkpoint, early stopping after `patience` epochs without
//!   improvement ([`checkpoint`]);
//! - **finalisation**: the best epoch's weights, with thresholds refit
//!   without class weights on the validation split (optional:
//!   `refit_thresholds`), become the package in `OUT`.
//!
//! In a federation the normalisation and thresholds come from the global
//! model: both refits are then switched off.
//!
//! Deterministic for a seed and thread count: the initial weights, the
//! split, the order of cases and every augmentation derive from the seed.

pub mod checkpoint;
pub mod data;
pub mod objective;
pub mod optimizer;
pub mod trainer;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rayon::prelude::*;
use serde::Serialize;

use crate::cases::site_plugins;
use crate::config::Config;
use crate::dataset;
use crate::model::net::{HORIZONS, THRESHOLDS};
use crate::model::package::{ModelManifest, encode_emr};
use crate::model::{Architecture, Backbone, ExamNet, Model, default_manifest, init_package};
use crate::pipeline::Pipeline;
use crate::rng::Pcg;
use checkpoint::{EpochRecord, TrainState};
use data::{Augmentation, Example};
use objective::{ClassWeighting, ClassWeights};
use optimizer::{AdamW, AdamWConfig};
use trainer::{FitSettings, Trainer};

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Options out of range, or data that cannot be trained on.
    #[error("{0}")]
    Options(String),
    /// A failure inside training itself (serialising its records, a
    /// network without the expected variables).
    #[error("training: {0}")]
    Internal(String),
    /// `--resume` cannot continue this run.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A site folder is unreadable.
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    /// A site's plugins could not be loaded.
    #[error(transparent)]
    Cases(#[from] crate::cases::CasesError),
    /// The model package failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A tensor operation failed.
    #[error("training: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Writing an output failed.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What to train and how.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Site folders (as `oxbox synth` writes them).
    pub data: Vec<PathBuf>,
    /// The output folder: must be absent or empty, unless `resume`.
    pub out: PathBuf,
    /// Where the sites' plugins are found.
    pub plugins: dataset::PluginLookup,
    /// The package's name.
    pub name: String,
    /// Image backbone.
    pub backbone: Backbone,
    /// No image branch: the EMR alone (cases need no radiograph).
    pub emr_only: bool,
    /// Side of the canonical image.
    pub input_size: u32,
    /// Most epochs.
    pub epochs: usize,
    /// Cases per optimizer step.
    pub batch_size: usize,
    /// AdamW settings.
    pub optimizer: AdamWConfig,
    /// Share of cases held out for validation, in (0, 1).
    pub validation: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    /// Epochs over which the learning rate decays (cosine) to a tenth.
    pub decay_epochs: usize,
    /// Class weighting of the ordinal loss.
    pub class_weighting: ClassWeighting,
    /// Image augmentation.
    pub augmentation: Augmentation,
    /// Seed of everything random.
    pub seed: u64,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
    /// The device training runs on (`model.device`, [`crate::model::select_device`]).
    pub device: Device,
    /// Fit the EMR normalisation on the training split (else keep the
    /// initial package's: in a federation, the global model's).
    pub refit_normalisation: bool,
    /// Refit the ordinal thresholds on the validation split at the end
    /// (else keep the trained ones).
    pub refit_thresholds: bool,
    /// Which cases train: [`crate::cases::HeldOut::Exclude`] never sees the
    /// held-out test cases ([`crate::cases::is_held_out`]).
    pub held_out: crate::cases::HeldOut,
}

/// Progress, for a progress bar.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Cases to prepare.
    Preparing {
        /// All cases of all sites.
        total: usize,
    },
    /// One more case prepared (or refused).
    Prepared,
    /// Training starts (or resumes) at `first_epoch`.
    Started {
        /// Training cases.
        train: usize,
        /// Validation cases.
        validation: usize,
        /// First epoch to run.
        first_epoch: usize,
        /// Last epoch allowed.
        epochs: usize,
        /// Optimizer steps per epoch.
        steps_per_epoch: usize,
    },
    /// One optimizer step done; `loss` is the epoch's running mean.
    Step {
        /// Epoch.
        epoch: usize,
        /// Running mean loss.
        loss: f64,
    },
    /// An epoch finished.
    Epoch(EpochRecord),
}

/// Counts of cases.
#[derive(Debug, Clone, Serialize)]
pub struct CaseCounts {
    /// Training split.
    pub train: usize,
    /// Validation split.
    pub validation: usize,
    /// Refused by the pipeline (bad DICOM, plugin rejection, …).
    pub refused: usize,
}

/// What a training run produced (also `OUT/training.json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// The package's name.
    pub name: String,
    /// The trained package's digest.
    pub digest: String,
    /// Backbone.
    pub backbone: Backbone,
    /// Image side.
    pub input_size: u32,
    /// Site ids, in order.
    pub sites: Vec<String>,
    /// Cases.
    pub cases: CaseCounts,
    /// The first refusals (`case id: reason`), at most 20.
    pub refused_examples: Vec<String>,
    /// Epochs run in total (over all resumptions).
    pub epochs: usize,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
    /// Its validation loss.
    pub best_validation_loss: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Mean training throughput over this invocation's epochs, cases/s.
    pub cases_per_second: Option<f64>,
    /// Seconds preparing cases (decode, plugins) in this invocation.
    pub preparation_seconds: f64,
    /// Seconds training in this invocation.
    pub training_seconds: f64,
    /// Thresholds θ per horizon after recalibration (24 h, 72 h).
    pub thresholds: Vec<Vec<f64>>,
    /// Which thresholds were refit on the validation split (others had
    /// fewer than 5 positive or negative validation cases).
    pub recalibrated: Vec<Vec<bool>>,
    /// Seed.
    pub seed: u64,
    /// Every epoch.
    pub history: Vec<EpochRecord>,
}

impl TrainOptions {
    fn check(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Options(m.to_owned()));
        if self.data.is_empty() {
            return bad("--data: at least one site folder");
        }
        if self.epochs == 0 || self.batch_size < 2 {
            return bad("--epochs must be at least 1 and --batch-size at least 2");
        }
        if !(self.validation > 0.0 && self.validation < 1.0) {
            return bad("--validation: a share strictly between 0 and 1");
        }
        if !(self.optimizer.learning_rate > 0.0 && self.optimizer.learning_rate.is_finite()) {
            return bad("--learning-rate must be positive");
        }
        if !(self.optimizer.weight_decay >= 0.0 && self.optimizer.weight_decay.is_finite()) {
            return bad("--weight-decay must be 0 or more");
        }
        if self.patience == 0 || self.decay_epochs == 0 {
            return bad("--patience and --decay-epochs must be at least 1");
        }
        if !self.held_out.is_valid() {
            return bad("--exclude-held-out: a share strictly between 0 and 1");
        }
        Ok(())
    }

    /// The network trained (see [`architecture`]), without its image
    /// branch when `emr_only`.
    pub fn architecture(&self) -> Architecture {
        Architecture {
            emr_only: self.emr_only,
            ..architecture(self.backbone)
        }
    }
}

/// The network `oxbox train` trains: the image backbone, the EXAM EMR
/// branch (two cross layers beside a 64-64 MLP) and a 128-wide fusion
/// layer.
pub fn architecture(backbone: Backbone) -> Architecture {
    Architecture {
        backbone,
        emr_only: false,
        cross_layers: 2,
        deep_layers: vec![64, 64],
        fusion_layers: vec![128],
    }
}

/// Everything that must be equal for `--resume` to continue a run.
fn fingerprint(
    options: &TrainOptions,
    sites: &[String],
    counts: (usize, usize),
    manifest: &ModelManifest,
    init_digest: &str,
) -> String {
    let text = serde_json::json!({
        "sites": sites,
        "cases": [counts.0, counts.1],
        "batch_size": options.batch_size,
        "decay_epochs": options.decay_epochs,
        "optimizer": format!("{:?}", options.optimizer),
        "validation": options.validation,
        "class_weighting": options.class_weighting,
        "augmentation": options.augmentation,
        "seed": options.seed,
        "manifest": manifest,
        "init": init_digest,
    })
    .to_string();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// Tensors for one batch: image (B,1,S,S), values and missing (B,F),
/// targets and weights (B,H,T).
struct Batch {
    image: Option<Tensor>,
    values: Tensor,
    missing: Tensor,
    targets: Tensor,
    weights: Tensor,
}

/// Assembles a batch; `augment` = Some((seed, epoch)) perturbs each image
/// with a generator of its own (case index, epoch), so batches are the
/// same whatever the thread count.
fn batch(
    cases: &[(usize, &Example)],
    manifest: &ModelManifest,
    class_weights: &ClassWeights,
    augment: Option<(&Augmentation, u64, usize)>,
    device: &Device,
) -> Result<Batch, TrainError> {
    let size = manifest.input_size as usize;
    let b = cases.len();
    let images: Vec<Vec<f32>> = if manifest.architecture.emr_only {
        Vec::new()
    } else {
        cases
            .par_iter()
            .map(|(index, e)| {
                let image = e.image.as_deref().unwrap_or_default();
                match augment {
                    Some((augmentation, seed, epoch)) => {
                        let stream = ((epoch as u64) << 32) | *index as u64;
                        augmentation.apply(image, size, &mut Pcg::new(seed, stream))
                    }
                    None => image.to_vec(),
                }
            })
            .collect()
    };
    let pixels: Vec<f32> = images.concat();
    let n = manifest.emr.len();
    let (mut values, mut missing) = (Vec::with_capacity(b * n), Vec::with_capacity(b * n));
    for (_, e) in cases {
        let (v, m) = encode_emr(&manifest.emr, &e.features);
        values.extend(v);
        missing.extend(m);
    }
    let levels: Vec<[u8; HORIZONS]> = cases.iter().map(|(_, e)| e.levels).collect();
    let (targets, weights) = objective::targets(&levels, class_weights);
    let image = if manifest.architecture.emr_only {
        None
    } else {
        Some(Tensor::from_vec(pixels, (b, 1, size, size), device)?)
    };
    Ok(Batch {
        image,
        values: Tensor::from_vec(values, (b, n), device)?,
        missing: Tensor::from_vec(missing, (b, n), device)?,
        targets: Tensor::from_vec(targets, (b, HORIZONS, THRESHOLDS), device)?,
        weights: Tensor::from_vec(weights, (b, HORIZONS, THRESHOLDS), device)?,
    })
}

/// The trainable variables and which get weight decay (convolution and
/// linear weights; not biases, batch-norm scales or thresholds).
fn trainable(varmap: &VarMap) -> Result<Vec<(String, candle_core::Var)>, TrainError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Internal("weights lock poisoned".to_owned()))?;
    Ok(data
        .iter()
        .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect())
}

fn decays(name: &str) -> bool {
    name.ends_with(".weight") && !name.contains(".bn.")
}

/// The prepared data of a run: every case through its site's plugins,
/// split.
pub struct Prepared {
    /// Site ids, in order.
    pub sites: Vec<String>,
    /// The training split.
    pub train: Vec<Example>,
    /// The validation split.
    pub validation: Vec<Example>,
    /// Refused cases (`case id: reason`).
    pub refused: Vec<String>,
    /// Seconds it took.
    pub seconds: f64,
}

/// Preparation: reads the site folders and runs every case through its
/// site's plugins with `pipeline` (whose model fixes the input), split into
/// training and validation.
///
/// # Errors
/// [`TrainError`]: unreadable sites, plugins that do not load, too few
/// usable cases.
pub fn prepare(
    options: &TrainOptions,
    config: &Config,
    pipeline: &Pipeline,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<Prepared, TrainError> {
    let started = Instant::now();
    let sites: Vec<dataset::Site> = options
        .data
        .iter()
        .map(|d| dataset::read_site(d).map(|site| options.held_out.select(&site)))
        .collect::<Result<_, _>>()?;
    progress(TrainEvent::Preparing {
        total: sites.iter().map(|s| s.cases.len()).sum(),
    });
    let engine = crate::cases::plugin_engine(config)?;
    let (mut train_set, mut validation_set, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    for site in &sites {
        let plugins = site_plugins(site, config, &options.plugins, &engine)?;
        let prepared = data::prepare_site(
            site,
            pipeline,
            &plugins,
            config,
            (options.seed, options.validation),
            &|| progress(TrainEvent::Prepared),
        );
        for (example, validation) in prepared.examples {
            if validation {
                validation_set.push(example);
            } else {
                train_set.push(example);
            }
        }
        refused.extend(prepared.refused);
    }
    if train_set.len() < options.batch_size || validation_set.len() < 2 {
        return Err(TrainError::Options(format!(
            "too few usable cases: {} for training (at least --batch-size {}), {} for validation \
             (at least 2); {} refused",
            train_set.len(),
            options.batch_size,
            validation_set.len(),
            refused.len()
        )));
    }
    Ok(Prepared {
        sites: sites.iter().map(|s| s.id.clone()).collect(),
        train: train_set,
        validation: validation_set,
        refused,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Trains on the site folders and writes the package to `options.out`:
/// [`prepare`], then a [`Trainer`] from the initial (or checkpointed)
/// weights and optimizer state, epoch by epoch with checkpoints and early
/// stopping, then finalisation.
///
/// # Errors
/// [`TrainError`], naming the cause.
pub fn train(
    options: &TrainOptions,
    config: &Config,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<TrainSummary, TrainError> {
    options.check()?;
    let out = &options.out;
    prepare_out_dir(options)?;

    // The initial package (deterministic for the seed).
    let init = init_package(
        &out.join("checkpoints").join("init"),
        &options.name,
        options.architecture(),
        options.input_size,
        options.seed,
    )?;
    let pipeline = Pipeline::new(config, Model::load(init.clone(), &Device::Cpu)?);

    // 1. Preparation: every case through its site's plugins.
    let prepared = prepare(options, config, &pipeline, progress)?;
    let (train_set, validation_set) = (&prepared.train, &prepared.validation);

    // The normalisation from the training split (or the initial one).
    let mut manifest = init.manifest.clone();
    if options.refit_normalisation {
        data::fit_normalisation(&mut manifest.emr, &train_set.iter().collect::<Vec<_>>());
    }
    manifest.trained = true;
    let fingerprint = fingerprint(
        options,
        &prepared.sites,
        (train_set.len(), validation_set.len()),
        &manifest,
        &init.digest,
    );

    // 2. The trainer, from the initial weights or the last checkpoint.
    let mut trainer = Trainer::new(
        &manifest,
        FitSettings {
            batch_size: options.batch_size,
            optimizer: options.optimizer,
            decay_epochs: options.decay_epochs,
            augmentation: options.augmentation,
            seed: options.seed,
        },
        &options.device,
    )?;
    let mut state = if options.resume {
        let state = checkpoint::read_state(out)?;
        if state.fingerprint != fingerprint {
            return Err(TrainError::Resume(format!(
                "{} was trained with other data, architecture or settings (only --epochs and \
                 --patience may change on --resume)",
                out.display()
            )));
        }
        let dir = checkpoint::epoch_dir(out, state.epoch);
        trainer.load_weights(&dir.join(crate::model::package::WEIGHTS_FILE))?;
        trainer.load_optimizer(&dir.join(checkpoint::OPTIMIZER_FILE), state.optimizer_steps)?;
        state
    } else {
        trainer.load_weights(&init.weights_path())?;
        TrainState {
            fingerprint,
            epoch: 0,
            best_epoch: 0,
            best_validation_loss: f64::INFINITY,
            epochs_without_improvement: 0,
            optimizer_steps: 0,
            history: Vec::new(),
        }
    };
    let levels: Vec<[u8; HORIZONS]> = train_set.iter().map(|e| e.levels).collect();
    let class_weights = objective::class_weights(&levels, options.class_weighting);
    progress(TrainEvent::Started {
        train: train_set.len(),
        validation: validation_set.len(),
        first_epoch: state.epoch + 1,
        epochs: options.epochs,
        steps_per_epoch: train_set.len().div_ceil(options.batch_size),
    });

    // Epochs, each checkpointed, until the last or early stopping.
    let training_started = Instant::now();
    let mut speeds = Vec::new();
    while state.epoch < options.epochs && state.epochs_without_improvement < options.patience {
        let fit = trainer.fit_epoch(
            state.epoch + 1,
            train_set,
            &class_weights,
            &|epoch, loss| progress(TrainEvent::Step { epoch, loss }),
        )?;
        speeds.push(fit.cases_per_second);
        let (validation_loss, _) = validation_pass(
            trainer.net(),
            validation_set,
            &manifest,
            &class_weights,
            options.batch_size,
            &options.device,
        )?;
        let record = EpochRecord {
            epoch: fit.epoch,
            train_loss: fit.train_loss,
            validation_loss,
            cases_per_second: fit.cases_per_second,
        };
        state.epoch = fit.epoch;
        state.optimizer_steps = trainer.optimizer().steps();
        if validation_loss < state.best_validation_loss {
            state.best_validation_loss = validation_loss;
            state.best_epoch = fit.epoch;
            state.epochs_without_improvement = 0;
        } else {
            state.epochs_without_improvement += 1;
        }
        state.history.push(record.clone());
        checkpoint::write_checkpoint(
            out,
            &manifest,
            trainer.varmap(),
            trainer.optimizer(),
            &state,
        )?;
        progress(TrainEvent::Epoch(record));
    }
    let training_seconds = training_started.elapsed().as_secs_f64();

    // 3. Finalisation: the best epoch, recalibrated, becomes the package.
    let best = checkpoint::epoch_dir(out, state.best_epoch);
    trainer.load_weights(&best.join(crate::model::package::WEIGHTS_FILE))?;
    let (thresholds, recalibrated) = if options.refit_thresholds {
        recalibrate(
            trainer.net(),
            trainer.varmap(),
            validation_set,
            &manifest,
            &options.device,
        )?
    } else {
        let current = trainer.net().thresholds()?.to_vec2::<f32>()?;
        (
            current
                .iter()
                .map(|row| row.iter().map(|&t| f64::from(t)).collect())
                .collect(),
            vec![vec![false; THRESHOLDS]; HORIZONS],
        )
    };
    let package = checkpoint::write_package(out, &manifest, trainer.varmap())?;
    let summary = TrainSummary {
        name: options.name.clone(),
        digest: package.digest,
        backbone: options.backbone,
        input_size: options.input_size,
        sites: prepared.sites,
        cases: CaseCounts {
            train: train_set.len(),
            validation: validation_set.len(),
            refused: prepared.refused.len(),
        },
        refused_examples: prepared.refused.into_iter().take(20).collect(),
        epochs: state.epoch,
        best_epoch: state.best_epoch,
        best_validation_loss: state.best_validation_loss,
        stopped_early: state.epochs_without_improvement >= options.patience,
        cases_per_second: (!speeds.is_empty())
            .then(|| speeds.iter().sum::<f64>() / speeds.len() as f64),
        preparation_seconds: prepared.seconds,
        training_seconds,
        thresholds,
        recalibrated,
        seed: options.seed,
        history: state.history,
    };
    let json =
        serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Internal(e.to_string()))?;
    crate::output::write_bytes(&out.join("training.json"), json.as_bytes())?;
    Ok(summary)
}

/// The learning rate of `epoch` (1-based): cosine decay from `base` to a
/// tenth of it over `decay_epochs`, then constant — so late epochs refine
/// rather than jump. It does not depend on `--epochs`, so a run resumed
/// with more epochs continues on the same schedule.
pub fn cosine_learning_rate(base: f64, epoch: usize, decay_epochs: usize) -> f64 {
    let progress = (epoch.saturating_sub(1)).min(decay_epochs) as f64 / decay_epochs.max(1) as f64;
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// `out` must be absent or empty for a new run, and hold a run to resume.
fn prepare_out_dir(options: &TrainOptions) -> Result<(), TrainError> {
    let out = &options.out;
    let io = |source| TrainError::Io {
        path: out.display().to_string(),
        source,
    };
    if options.resume {
        if !out.join(checkpoint::STATE_FILE).is_file() {
            return Err(TrainError::Resume(format!(
                "{} holds no training run ({} missing)",
                out.display(),
                checkpoint::STATE_FILE
            )));
        }
        return Ok(());
    }
    if out.exists() && std::fs::read_dir(out).map_err(io)?.next().is_some() {
        return Err(TrainError::Options(format!(
            "{} is not empty: choose a new folder, or pass --resume to continue the run in it",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io)
}

/// Weighted validation loss (inference mode: running batch-norm
/// statistics, no augmentation) and each case's score s per horizon.
fn validation_pass(
    net: &ExamNet,
    cases: &[Example],
    manifest: &ModelManifest,
    class_weights: &ClassWeights,
    batch_size: usize,
    device: &Device,
) -> Result<(f64, Vec<[f64; HORIZONS]>), TrainError> {
    let thresholds = net.thresholds()?.to_vec2::<f32>()?;
    let mut total = 0.0;
    let mut scores = Vec::with_capacity(cases.len());
    let indexed: Vec<(usize, &Example)> = cases.iter().enumerate().collect();
    for chunk in indexed.chunks(batch_size) {
        let b = batch(chunk, manifest, class_weights, None, device)?;
        let logits = net.forward(b.image.as_ref(), &b.values, &b.missing, false)?;
        let loss = objective::ordinal_loss(&logits, &b.targets, &b.weights)?;
        total += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
        // s = (s − θ₁) + θ₁.
        let first = logits
            .narrow(D::Minus1, 0, 1)?
            .squeeze(D::Minus1)?
            .to_vec2::<f32>()?;
        for row in first {
            let mut s = [0f64; HORIZONS];
            for (h, slot) in s.iter_mut().enumerate() {
                *slot = f64::from(row[h]) + f64::from(thresholds[h][0]);
            }
            scores.push(s);
        }
    }
    Ok((total / cases.len() as f64, scores))
}

type Thresholds = (Vec<Vec<f64>>, Vec<Vec<bool>>);

/// Refits every threshold without class weights on the validation split
/// (keeping the learned score), writes them into the network's variables,
/// and returns them with which were refit.
fn recalibrate(
    net: &ExamNet,
    varmap: &VarMap,
    validation: &[Example],
    manifest: &ModelManifest,
    device: &Device,
) -> Result<Thresholds, TrainError> {
    let unweighted = [[(1f32, 1f32); THRESHOLDS]; HORIZONS];
    let (_, scores) = validation_pass(net, validation, manifest, &unweighted, 32, device)?;
    let current = net.thresholds()?.to_vec2::<f32>()?;
    let mut thresholds = [[0f64; THRESHOLDS]; HORIZONS];
    let mut refit = vec![vec![false; THRESHOLDS]; HORIZONS];
    for h in 0..HORIZONS {
        let s: Vec<f64> = scores.iter().map(|x| x[h]).collect();
        for k in 0..THRESHOLDS {
            let labels: Vec<bool> = validation
                .iter()
                .map(|e| usize::from(e.levels[h]) > k)
                .collect();
            thresholds[h][k] = match objective::fit_threshold(&s, &labels, 5) {
                Some(theta) => {
                    refit[h][k] = true;
                    theta
                }
                // Too few cases to refit: keep the trained gap to the
                // threshold below, wherever that one moved.
                None if k > 0 => {
                    thresholds[h][k - 1] + f64::from(current[h][k] - current[h][k - 1])
                }
                None => f64::from(current[h][k]),
            };
        }
    }
    let (base, steps) = objective::threshold_parameters(&thresholds, 1e-3);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Internal("weights lock poisoned".to_owned()))?;
    let set = |name: &str, values: Vec<f32>, shape: &[usize]| -> Result<(), TrainError> {
        let var = data
            .get(name)
            .ok_or_else(|| TrainError::Internal(format!("no variable {name}")))?;
        var.set(&Tensor::from_vec(values, shape, var.device())?)?;
        Ok(())
    };
    set("head.threshold_base", base, &[HORIZONS])?;
    set("head.threshold_steps", steps, &[HORIZONS, THRESHOLDS - 1])?;
    drop(data);
    let after = net.thresholds()?.to_vec2::<f32>()?;
    Ok((
        after
            .iter()
            .map(|row| row.iter().map(|&t| f64::from(t)).collect())
            .collect(),
        refit,
    ))
}

/// Keeps freed memory in the process for the next training step instead of
/// returning it to the system. A CPU step allocates and frees hundreds of
/// activation and gradient tensors of up to tens of MiB; glibc serves the
/// large ones from fresh mappings (always above 32 MiB), so every step
/// page-faulted and zeroed them again: a quarter of a ResNet-18 step's CPU
/// time at batch 16. With mappings off and no trimming the heap is reused;
/// the peak stays what one step needs, but the process keeps it after
/// training. Process-wide, so only training processes call it.
pub(crate) fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is thread-safe and
    // takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Training speed without data preparation: `steps` optimizer steps
/// (after one warm-up step) on batches of `batch` synthetic cases —
/// augmentation, forward, backward, AdamW — on a freshly initialised
/// network on `device`; cases per second.
///
/// # Errors
/// On tensor errors.
pub fn measure_throughput(
    backbone: Backbone,
    input_size: u32,
    batch_size: usize,
    steps: usize,
    device: &Device,
) -> Result<f64, TrainError> {
    reuse_freed_memory();
    let manifest = default_manifest("throughput", architecture(backbone), input_size);
    let varmap = VarMap::new();
    let net = ExamNet::new(
        &manifest.architecture,
        manifest.emr.len(),
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    let mut optimizer = AdamW::new(trainable(&varmap)?, AdamWConfig::default(), decays)?;
    let size = input_size as usize;
    let mut rng = Pcg::new(1, 1);
    let examples: Vec<Example> = (0..batch_size)
        .map(|i| Example {
            image: Some((0..size * size).map(|_| rng.uniform() as f32).collect()),
            features: vec![("spo2_pct".to_owned(), Some(85.0 + i as f64))],
            levels: [(i % 5) as u8, ((i + 1) % 5) as u8],
        })
        .collect();
    let cases: Vec<(usize, &Example)> = examples.iter().enumerate().collect();
    let weights = objective::class_weights(
        &examples.iter().map(|e| e.levels).collect::<Vec<_>>(),
        ClassWeighting::Sqrt,
    );
    let augmentation = Augmentation::default();
    let mut started = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            started = Instant::now();
        }
        let b = batch(
            &cases,
            &manifest,
            &weights,
            Some((&augmentation, 1, step)),
            device,
        )?;
        let logits = net.forward(b.image.as_ref(), &b.values, &b.missing, true)?;
        let loss = objective::ordinal_loss(&logits, &b.targets, &b.weights)?;
        optimizer.step(&loss.backward()?)?;
    }
    // A GPU runs the steps asynchronously: the time is taken once they ran.
    device.synchronize()?;
    Ok((steps * batch_size) as f64 / started.elapsed().as_secs_f64())
}
