//! What training leaves on disk, so that an interrupted run can continue
//! (`--resume`) exactly where it stopped:
//!
//! ```text
//! OUT/
//!   model.toml, weights.safetensors   the trained package (best epoch)
//!   training.json                     what was trained, how, and how well
//!   train-state.json                  the run's state (written last: the commit point)
//!   checkpoints/init/                 the initial package
//!   checkpoints/epoch-NNN/            package + optimizer.safetensors (latest and best)
//! ```

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::optimizer::AdamW;
use crate::model::ModelPackage;
use crate::model::package::{MANIFEST_FILE, ModelManifest, WEIGHTS_FILE};

/// The run's state file.
pub const STATE_FILE: &str = "train-state.json";
/// The optimizer's moments inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Validation loss after the epoch.
    pub validation_loss: f64,
    /// Training cases per second (forward, backward, update; without
    /// validation).
    pub cases_per_second: f64,
}

/// `train-state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Digest of everything that must not change on `--resume` (data,
    /// architecture, hyper-parameters, seed, normalisation).
    pub fingerprint: String,
    /// Epochs finished.
    pub epoch: usize,
    /// The epoch with the lowest validation loss.
    pub best_epoch: usize,
    /// Its validation loss.
    pub best_validation_loss: f64,
    /// Epochs since the best one.
    pub epochs_without_improvement: usize,
    /// Optimizer steps taken.
    pub optimizer_steps: u64,
    /// Every finished epoch.
    pub history: Vec<EpochRecord>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The folder of epoch `epoch`'s checkpoint.
pub fn epoch_dir(out: &Path, epoch: usize) -> PathBuf {
    out.join("checkpoints").join(format!("epoch-{epoch:03}"))
}

/// Writes a model package (manifest and the varmap's weights), each file
/// atomically, and loads it back (checking it and computing its digest).
///
/// # Errors
/// [`TrainError`] on I/O or tensor failures.
pub fn write_package(
    dir: &Path,
    manifest: &ModelManifest,
    varmap: &VarMap,
) -> Result<ModelPackage, TrainError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let weights = dir.join(WEIGHTS_FILE);
    let partial = dir.join(".weights.safetensors.part");
    varmap.save(&partial)?;
    std::fs::rename(&partial, &weights).map_err(io(&weights))?;
    let text = toml::to_string(manifest).map_err(|e| TrainError::Internal(e.to_string()))?;
    crate::output::write_bytes(&dir.join(MANIFEST_FILE), text.as_bytes())?;
    Ok(ModelPackage::load(dir)?)
}

/// Writes epoch `state.epoch`'s checkpoint (package and optimizer), then
/// the state file, then removes checkpoints that are neither the latest
/// nor the best.
///
/// # Errors
/// [`TrainError`] on I/O or tensor failures.
pub fn write_checkpoint(
    out: &Path,
    manifest: &ModelManifest,
    varmap: &VarMap,
    optimizer: &AdamW,
    state: &TrainState,
) -> Result<(), TrainError> {
    let dir = epoch_dir(out, state.epoch);
    write_package(&dir, manifest, varmap)?;
    let partial = dir.join(".optimizer.safetensors.part");
    optimizer.save(&partial)?;
    let target = dir.join(OPTIMIZER_FILE);
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    let json =
        serde_json::to_string_pretty(state).map_err(|e| TrainError::Internal(e.to_string()))?;
    crate::output::write_bytes(&out.join(STATE_FILE), json.as_bytes())?;
    let keep = [
        epoch_dir(out, state.epoch),
        epoch_dir(out, state.best_epoch),
    ];
    let checkpoints = out.join("checkpoints");
    for entry in std::fs::read_dir(&checkpoints).map_err(io(&checkpoints))? {
        let path = entry.map_err(io(&checkpoints))?.path();
        let is_epoch = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("epoch-"));
        if is_epoch && !keep.contains(&path) {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Reads `OUT/train-state.json`.
///
/// # Errors
/// [`TrainError::Resume`] when it is missing or malformed.
pub fn read_state(out: &Path) -> Result<TrainState, TrainError> {
    let path = out.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        TrainError::Resume(format!(
            "{}: {e} (nothing to resume: run without --resume)",
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::Resume(format!("{}: {e}", path.display())))
}
