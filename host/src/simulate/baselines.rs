//! The baselines the federation is compared with, trained in-process with
//! the train library on the sites' training cases only (held-out cases
//! excluded, [`crate::cases::HeldOut::Exclude`]): (a) each site's
//! local-only model and (c) one pooled model on every site's training
//! cases together, both for rounds × epochs (the same number of passes
//! over their data as a federated site makes; `--baseline-epochs` to give
//! them more), keeping the epoch with the best validation loss, from the
//! same seed.

use std::path::PathBuf;

use super::{SimSite, SimulateError, SimulateEvent, SimulateOptions};
use crate::cases::HeldOut;
use crate::config::Config;
use crate::train::{TrainEvent, TrainOptions, train};

/// The trained baselines.
#[derive(Debug, Clone)]
pub struct Baselines {
    /// Per site (in site order): its local-only model's folder.
    pub local: Vec<PathBuf>,
    /// The pooled model's folder.
    pub pooled: PathBuf,
}

fn options_for(options: &SimulateOptions, data: Vec<PathBuf>, out: PathBuf) -> TrainOptions {
    let epochs = options.baseline_epochs();
    TrainOptions {
        data,
        out,
        plugins: options.plugins.clone(),
        name: "exam-baseline".to_owned(),
        backbone: options.backbone,
        emr_only: options.emr_only,
        input_size: options.input_size,
        epochs,
        batch_size: options.batch_size,
        optimizer: crate::train::optimizer::AdamWConfig {
            learning_rate: options.learning_rate,
            ..Default::default()
        },
        validation: 0.15,
        // Every epoch runs; the best by validation loss is kept.
        patience: epochs,
        decay_epochs: epochs,
        class_weighting: crate::train::objective::ClassWeighting::Sqrt,
        augmentation: crate::train::data::Augmentation::default(),
        seed: options.seed,
        resume: false,
        device: candle_core::Device::Cpu,
        refit_normalisation: true,
        refit_thresholds: true,
        held_out: HeldOut::Exclude(options.holdout),
    }
}

/// Trains every site's local-only model, then the pooled model, into
/// `OUT/work/local/<site>` and `OUT/work/pooled`.
///
/// # Errors
/// [`SimulateError::Train`] naming the cause (e.g. a site too small for
/// the batch size).
pub fn train_all(
    options: &SimulateOptions,
    config: &Config,
    sites: &[SimSite],
    progress: &(dyn Fn(SimulateEvent) + Sync),
) -> Result<Baselines, SimulateError> {
    let work = options.out.join("work");
    let run = |name: String, train_options: TrainOptions| -> Result<PathBuf, SimulateError> {
        progress(SimulateEvent::Stage(format!("training {name}")));
        let epochs = train_options.epochs;
        let on_event = |event: TrainEvent| {
            if let TrainEvent::Epoch(record) = event {
                progress(SimulateEvent::Epoch {
                    model: name.clone(),
                    epoch: record.epoch,
                    epochs,
                });
            }
        };
        train(&train_options, config, &on_event)?;
        Ok(train_options.out)
    };
    let mut local = Vec::new();
    for site in sites {
        let out = work.join("local").join(&site.id);
        local.push(run(
            format!("local-only {}", site.id),
            options_for(options, vec![site.dir.clone()], out),
        )?);
    }
    let pooled = run(
        "pooled".to_owned(),
        options_for(
            options,
            sites.iter().map(|s| s.dir.clone()).collect(),
            work.join("pooled"),
        ),
    )?;
    Ok(Baselines { local, pooled })
}
