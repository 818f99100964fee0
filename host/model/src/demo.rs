//! The embedded demo model: a small model trained on a synthetic cohort
//! (`host/assets/demo-model/`, made by `scripts/train-demo.sh`), compiled
//! into the binary so that `oxbox serve` and `oxbox predict` answer with a
//! trained model on a fresh machine with no model configured. It learned
//! from synthetic data only: a demonstration, not a clinical model.

use std::path::{Path, PathBuf};

use super::package::{MANIFEST_FILE, WEIGHTS_FILE, package_digest};
use super::{ModelError, ModelPackage};

/// `model.toml` of the demo model.
pub const MANIFEST: &str = include_str!("../../assets/demo-model/model.toml");
/// `weights.safetensors` of the demo model.
pub const WEIGHTS: &[u8] = include_bytes!("../../assets/demo-model/weights.safetensors");

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The demo package's digest (as [`ModelPackage::load`] computes it).
pub fn digest() -> String {
    package_digest(&sha256_hex(MANIFEST.as_bytes()), &sha256_hex(WEIGHTS))
}

/// Where the demo package lives under `data_dir`: one folder per digest.
pub fn location(data_dir: &Path) -> PathBuf {
    data_dir
        .join("models")
        .join(format!("demo-{}", &digest()[..16]))
}

/// Writes the embedded package under `data_dir` (once: a complete folder
/// is renamed into place, so a crash leaves no half package) and loads it.
///
/// # Errors
/// [`ModelError::Io`] when the folder cannot be written, or the package
/// found there is not the embedded one.
pub fn materialize(data_dir: &Path) -> Result<ModelPackage, ModelError> {
    let dir = location(data_dir);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ModelError::Io { path, source }
    };
    if !dir.join(WEIGHTS_FILE).is_file() {
        let parent = data_dir.join("models");
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".demo-")
            .tempdir_in(&parent)
            .map_err(io(&parent))?;
        std::fs::write(staging.path().join(MANIFEST_FILE), MANIFEST).map_err(io(staging.path()))?;
        std::fs::write(staging.path().join(WEIGHTS_FILE), WEIGHTS).map_err(io(staging.path()))?;
        let staged = staging.keep();
        if let Err(e) = std::fs::rename(&staged, &dir) {
            // Another process may have put it there first.
            let _ = std::fs::remove_dir_all(&staged);
            if !dir.join(WEIGHTS_FILE).is_file() {
                return Err(io(&dir)(e));
            }
        }
    }
    let package = ModelPackage::load(&dir)?;
    if package.digest != digest() {
        return Err(ModelError::Invalid {
            path: dir.display().to_string(),
            reason: "this folder should hold the embedded demo model but holds other files; \
                     remove it and it is written again"
                .to_owned(),
        });
    }
    Ok(package)
}

/// The package a command uses: `explicit` (`--model DIR`), else
/// `configured` (`[model] package`), else a promoted model under
/// `data_dir` ([`super::promote::default_served_dir`]), else the embedded
/// demo model (written under `data_dir`), with a warning in the log. A
/// folder that is a promotion layout serves the version its `CURRENT`
/// names ([`super::promote::load_served`]).
///
/// # Errors
/// [`ModelError`] from loading the package.
pub fn resolve(
    explicit: Option<&Path>,
    configured: Option<&Path>,
    data_dir: &Path,
) -> Result<ModelPackage, ModelError> {
    let promoted = super::promote::default_served_dir(data_dir);
    match explicit.or(configured) {
        Some(dir) => super::promote::load_served(dir),
        None if super::promote::is_layout(&promoted) => super::promote::load_served(&promoted),
        None => {
            let package = materialize(data_dir)?;
            tracing::warn!(
                digest = %package.digest,
                "no model configured: using the embedded demo model (trained on synthetic data, \
                 not for clinical use); set [model] package for a real one"
            );
            Ok(package)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_demo_model_is_trained_and_written_once() {
        let data = tempfile::tempdir().expect("tempdir");
        let package = materialize(data.path()).expect("materialize");
        assert!(package.manifest.trained, "the demo model is a trained one");
        assert_eq!(package.digest, digest());
        // Again: the same folder, nothing rewritten.
        let again = resolve(None, None, data.path()).expect("resolve");
        assert_eq!(again.dir, package.dir);
        let entries = std::fs::read_dir(data.path().join("models"))
            .expect("models")
            .count();
        assert_eq!(entries, 1, "no staging folder left behind");
        // A tampered copy is refused, not served.
        std::fs::write(package.dir.join(MANIFEST_FILE), "name = \"x\"").expect("tamper");
        assert!(materialize(data.path()).is_err());
    }
}
