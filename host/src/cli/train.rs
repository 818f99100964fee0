//! `oxbox train`: site folders → a trained model package.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use oxbox::model::{Backbone, select_device, set_compute_threads};
use oxbox::train::data::Augmentation;
use oxbox::train::objective::ClassWeighting;
use oxbox::train::optimizer::AdamWConfig;
use oxbox::train::{TrainEvent, TrainOptions, train};

/// Arguments of `oxbox train`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  oxbox synth --sites 4 --cases-per-site 400 --seed 2020 --out cohort\n  \
oxbox train --data cohort/site-1,cohort/site-2,cohort/site-3,cohort/site-4 --out models/mine --backbone tiny\n  \
oxbox train --data cohort/site-1,cohort/site-2 --out models/mine --backbone tiny --resume --epochs 40\n\n\
Every case is read through its site's plugin (named in site.toml; found in --plugins-dir, \
the configured [[plugins]], the site folder's plugins/, then the installation's plugins/dist) exactly as a prediction is, \
then split into training and validation (--validation, \
by a hash of seed, site and case id). AdamW (cosine learning-rate decay over --decay-epochs) on the class-weighted ordinal \
cross-entropy of P(level >= k) at 24 h and 72 h; images rotated, shifted and contrast-jittered each epoch. \
After each epoch: validation loss, a checkpoint in OUT/checkpoints, early stopping after \
--patience epochs without improvement. The best epoch, its thresholds refit without class \
weights on the validation split, becomes the package in OUT (model.toml, weights.safetensors), \
with OUT/training.json. Interrupted? Run the same command with --resume. Same seed and \
thread count, same weights."
)]
pub struct Args {
    /// Site folders (as `oxbox synth` writes them), comma-separated.
    #[arg(long, value_name = "SITE_DIR", num_args = 1.., value_delimiter = ',', required = true)]
    pub data: Vec<PathBuf>,
    /// Output folder (absent or empty; with --resume, the run to continue).
    #[arg(long, value_name = "MODEL_DIR")]
    pub out: PathBuf,
    /// Image backbone.
    #[arg(long, value_enum, default_value = "resnet18")]
    pub backbone: Backbone,
    /// No image branch: train on the EMR alone (cases need no radiograph;
    /// an empty image_file in cases.csv is allowed).
    #[arg(long)]
    pub emr_only: bool,
    /// Most epochs.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub epochs: u32,
    /// Cases per optimizer step.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub batch_size: u32,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-4)]
    pub learning_rate: f64,
    /// AdamW decoupled weight decay (convolution and linear weights).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Share of cases held out for validation.
    #[arg(long, default_value_t = 0.15)]
    pub validation: f64,
    /// Epochs without a lower validation loss before stopping.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub patience: u32,
    /// Epochs over which the learning rate decays (cosine) to a tenth of
    /// --learning-rate; constant after.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub decay_epochs: u32,
    /// How the rarer class of each threshold is weighted.
    #[arg(long, value_enum, default_value = "sqrt")]
    pub class_weighting: ClassWeighting,
    /// No image augmentation.
    #[arg(long)]
    pub no_augmentation: bool,
    /// Seed of the initialisation, split, order and augmentation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Side S of the image input (default: model.input_size from the config).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub input_size: Option<u32>,
    /// The package's name.
    #[arg(long, default_value = "exam-trained")]
    pub name: String,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Where the site plugins are built (DIR/<plugin>/plugin.toml), looked
    /// in first; then the configured [[plugins]], the site folder's
    /// plugins/, and the plugins/dist of the oxbox installation.
    #[arg(long, value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Leave out the held-out test cases at this share (the split of
    /// `oxbox simulate` and the federation's promotion gate; evaluate them
    /// with `oxbox evaluate --held-out-only` at the same share).
    #[arg(long, value_name = "SHARE")]
    pub exclude_held_out: Option<f64>,
    /// CPU threads (default: model.threads from the config, 0 = one per
    /// core). Results are reproducible for a seed and thread count.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Runs `oxbox train`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let config = super::load_config(config)?.config;
    set_compute_threads(args.threads.unwrap_or(config.model.threads));
    let device = select_device(
        oxbox::config::parse_device(&config.model.device)
            .ok_or_else(|| anyhow::anyhow!("model.device = {:?}", config.model.device))?,
    )?;
    let options = TrainOptions {
        data: args.data,
        out: args.out.clone(),
        plugins: oxbox::dataset::PluginLookup {
            dir: args.plugins_dir,
            installed: oxbox::dataset::PluginLookup::installed_dir(),
        },
        name: args.name,
        backbone: args.backbone,
        emr_only: args.emr_only,
        input_size: args.input_size.unwrap_or(config.model.input_size),
        epochs: args.epochs as usize,
        batch_size: args.batch_size as usize,
        optimizer: AdamWConfig {
            learning_rate: args.learning_rate,
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
        validation: args.validation,
        patience: args.patience as usize,
        decay_epochs: args.decay_epochs as usize,
        class_weighting: args.class_weighting,
        augmentation: if args.no_augmentation {
            Augmentation {
                rotation_degrees: 0.0,
                translation: 0.0,
                contrast: 0.0,
                brightness: 0.0,
            }
        } else {
            Augmentation::default()
        },
        seed: args.seed,
        resume: args.resume,
        device,
        refit_normalisation: true,
        refit_thresholds: true,
        held_out: args
            .exclude_held_out
            .map_or(oxbox::cases::HeldOut::All, oxbox::cases::HeldOut::Exclude),
    };
    let bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    let style = |template: &str| {
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
    };
    let on_event = |event: TrainEvent| {
        let Ok(mut bar) = bar.lock() else {
            return;
        };
        match event {
            TrainEvent::Preparing { total } => {
                let b = ProgressBar::new(total as u64);
                b.set_style(style(
                    "preparing {bar:30} {pos}/{len} cases (decode, site plugin)  ETA {eta}",
                ));
                *bar = Some(b);
            }
            TrainEvent::Prepared => {
                if let Some(b) = bar.as_ref() {
                    b.inc(1);
                }
            }
            TrainEvent::Started {
                train,
                validation,
                first_epoch,
                epochs,
                steps_per_epoch,
            } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let remaining = (epochs + 1).saturating_sub(first_epoch) * steps_per_epoch;
                let b = ProgressBar::new(remaining as u64);
                b.set_style(style(
                    "training {bar:30} epoch {prefix} loss {msg}  {elapsed} elapsed, ETA {eta} (at most)",
                ));
                b.println(format!(
                    "{train} training and {validation} validation cases; epochs {first_epoch}..={epochs}, {steps_per_epoch} steps each"
                ));
                *bar = Some(b);
            }
            TrainEvent::Step { epoch, loss } => {
                if let Some(b) = bar.as_ref() {
                    b.set_prefix(epoch.to_string());
                    b.set_message(format!("{loss:.4}"));
                    b.inc(1);
                }
            }
            TrainEvent::Epoch(record) => {
                if let Some(b) = bar.as_ref() {
                    b.println(format!(
                        "epoch {:>3}  train loss {:.4}  validation loss {:.4}  {:.1} cases/s",
                        record.epoch,
                        record.train_loss,
                        record.validation_loss,
                        record.cases_per_second
                    ));
                }
            }
        }
    };
    let summary = train(&options, &config, &on_event);
    if let Ok(mut bar) = bar.lock()
        && let Some(b) = bar.take()
    {
        b.finish_and_clear();
    }
    let summary = summary?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": args.out.display().to_string(),
            "digest": summary.digest,
            "cases": summary.cases,
            "epochs": summary.epochs,
            "best_epoch": summary.best_epoch,
            "best_validation_loss": (summary.best_validation_loss * 1e4).round() / 1e4,
            "stopped_early": summary.stopped_early,
            "cases_per_second": summary.cases_per_second.map(|v| (v * 100.0).round() / 100.0),
            "preparation_seconds": (summary.preparation_seconds * 10.0).round() / 10.0,
            "training_seconds": (summary.training_seconds * 10.0).round() / 10.0,
            "report": args.out.join("training.json").display().to_string(),
        }))?
    );
    Ok(())
}
