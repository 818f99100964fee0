//! The served model as a promotion layout, so that a new model (a
//! federation's global model that passed the site's gate) replaces the
//! served one atomically, and `oxbox serve` picks it up without a restart
//! (SIGHUP or `POST /v1/admin/model/reload`).
//!
//! ```text
//! SERVED_DIR/
//!   CURRENT                 one line: the digest of the served version
//!   versions/<digest>/      model.toml, weights.safetensors
//! ```
//!
//! [`promote`] writes the package into a staging folder beside the
//! versions (each file synced), renames it to `versions/<digest>/`, then
//! writes `CURRENT` to a temporary file and renames it over the old one:
//! a reader sees the old version or the new one, never a half package,
//! whenever the promoting process is killed. Only the current and the
//! previous version are kept (the previous one for a rollback by hand:
//! write its digest into `CURRENT`).
//!
//! [`load_served`] reads a folder that is either a plain package or such a
//! layout; for a layout it checks that the version it loads has the digest
//! `CURRENT` names, so a corrupted or tampered version is refused and the
//! running model stays.

use std::path::{Path, PathBuf};

use super::ModelError;
use super::package::{ModelPackage, PackageBytes, WEIGHTS_FILE};

/// The pointer file of a promotion layout.
pub const CURRENT_FILE: &str = "CURRENT";
/// The folder of versions of a promotion layout.
pub const VERSIONS_DIR: &str = "versions";
/// Where a box that configures no `[model] package` keeps promoted models:
/// `<storage.data_dir>/models/served` (served when it exists, before the
/// embedded demo model).
pub fn default_served_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models").join("served")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.display().to_string();
    move |source| ModelError::Io { path, source }
}

fn invalid(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Whether `dir` is a promotion layout (has a `CURRENT` file).
pub fn is_layout(dir: &Path) -> bool {
    dir.join(CURRENT_FILE).is_file()
}

/// The digest `CURRENT` names in the layout `dir` (`None`: not a layout).
///
/// # Errors
/// [`ModelError::Io`], or [`ModelError::Invalid`] when `CURRENT` does not
/// hold one package digest (64 lowercase hex digits).
pub fn current_digest(dir: &Path) -> Result<Option<String>, ModelError> {
    let path = dir.join(CURRENT_FILE);
    let text = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let digest = std::str::from_utf8(&text)
        .ok()
        .map(str::trim)
        .filter(|d| {
            d.len() == 64
                && d.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| {
            invalid(
                &path,
                "must hold one package digest (64 lowercase hex digits)",
            )
        })?;
    Ok(Some(digest.to_owned()))
}

/// The package `dir` serves: `dir` itself, or in a promotion layout the
/// version `CURRENT` names, checked to have that digest.
///
/// # Errors
/// [`ModelError`] from reading the package; [`ModelError::Invalid`] when
/// the version's files do not have the digest `CURRENT` names.
pub fn load_served(dir: &Path) -> Result<ModelPackage, ModelError> {
    let Some(digest) = current_digest(dir)? else {
        return ModelPackage::load(dir);
    };
    let version = dir.join(VERSIONS_DIR).join(&digest);
    let package = ModelPackage::load(&version)?;
    if package.digest != digest {
        return Err(invalid(
            &version,
            format!(
                "its files have digest {}, not the {digest} that {CURRENT_FILE} names \
                 (corrupted or changed after promotion): not loaded",
                package.digest
            ),
        ));
    }
    Ok(package)
}

/// Makes `package` the model served from `served_dir` (a promotion
/// layout, created if needed; a plain package folder becomes one): the
/// manifest is checked and the weights must be a safetensors file, the
/// version is written and synced under `versions/<digest>/`, then
/// `CURRENT` is replaced atomically. Versions other than the new and the
/// previous one are removed. Tell `oxbox serve` afterwards (SIGHUP or
/// `POST /v1/admin/model/reload`).
///
/// # Errors
/// [`ModelError::Invalid`] for a package that does not check,
/// [`ModelError::Io`] when a file cannot be written.
pub fn promote(package: &PackageBytes, served_dir: &Path) -> Result<ModelPackage, ModelError> {
    let digest = package.digest();
    let versions = served_dir.join(VERSIONS_DIR);
    let target = versions.join(&digest);
    // Check before anything is written.
    package.package(&target)?;
    safetensors::SafeTensors::read_metadata(&package.weights).map_err(|e| {
        invalid(
            &target.join(WEIGHTS_FILE),
            format!("not a safetensors file: {e}"),
        )
    })?;
    std::fs::create_dir_all(&versions).map_err(io(&versions))?;
    let previous = current_digest(served_dir).ok().flatten();

    let complete = ModelPackage::load(&target).is_ok_and(|p| p.digest == digest);
    if !complete {
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&versions)
            .map_err(io(&versions))?;
        package.write(staging.path())?;
        sync_dir(staging.path())?;
        let staged = staging.keep();
        if let Err(e) = std::fs::rename(&staged, &target) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(io(&target)(e));
        }
        sync_dir(&versions)?;
    }
    let pointer = served_dir.join(CURRENT_FILE);
    oxbox_files::write_shared_bytes(&pointer, format!("{digest}\n").as_bytes()).map_err(|e| {
        ModelError::Io {
            path: pointer.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    sync_dir(served_dir)?;
    prune(&versions, &digest, previous.as_deref());
    load_served(served_dir)
}

/// Removes every version but `keep` and `previous`, and staging folders
/// left by an interrupted promotion. Best effort: a version that cannot be
/// removed stays (and is logged).
fn prune(versions: &Path, keep: &str, previous: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(versions) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == keep || Some(name.as_ref()) == previous {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(
                "cannot remove the old model version {}: {e}",
                entry.path().display()
            );
        }
    }
}

/// Syncs a folder, so that the renames in it survive a power cut.
fn sync_dir(dir: &Path) -> Result<(), ModelError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::MANIFEST_FILE;

    fn package(seed: u64) -> PackageBytes {
        let dir = tempfile::tempdir().expect("tempdir");
        let arch = crate::Architecture {
            backbone: crate::Backbone::Tiny,
            emr_only: true,
            cross_layers: 1,
            deep_layers: vec![8],
            fusion_layers: vec![8],
        };
        crate::init_package(dir.path(), "promo", arch, 32, seed).expect("init");
        PackageBytes::read(dir.path()).expect("read")
    }

    #[test]
    fn promote_swaps_current_and_keeps_the_previous_version() {
        let served = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (package(1), package(2), package(3));
        let pa = promote(&a, served.path()).expect("promote a");
        assert_eq!(pa.digest, a.digest());
        assert_eq!(
            load_served(served.path()).expect("served").digest,
            a.digest()
        );
        promote(&b, served.path()).expect("promote b");
        promote(&c, served.path()).expect("promote c");
        assert_eq!(
            load_served(served.path()).expect("served").digest,
            c.digest()
        );
        let mut kept: Vec<String> = std::fs::read_dir(served.path().join(VERSIONS_DIR))
            .expect("versions")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        let mut expected = vec![b.digest(), c.digest()];
        expected.sort();
        assert_eq!(kept, expected, "current and previous only, no staging left");
        // Promoting the current one again changes nothing.
        promote(&c, served.path()).expect("again");
        assert_eq!(
            current_digest(served.path()).expect("current"),
            Some(c.digest())
        );
    }

    #[test]
    fn a_corrupted_version_is_refused_and_bad_packages_are_not_promoted() {
        let served = tempfile::tempdir().expect("tempdir");
        let a = package(4);
        promote(&a, served.path()).expect("promote");
        let weights = served
            .path()
            .join(VERSIONS_DIR)
            .join(a.digest())
            .join(WEIGHTS_FILE);
        let mut bytes = std::fs::read(&weights).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&weights, bytes).expect("corrupt");
        let err = load_served(served.path()).expect_err("corrupt version refused");
        assert!(err.to_string().contains("not loaded"), "{err}");
        // A package whose manifest or weights do not check is not promoted.
        let mut bad = package(5);
        bad.manifest = b"name = 1".to_vec();
        assert!(promote(&bad, served.path()).is_err());
        let mut bad = package(6);
        bad.weights = b"not safetensors".to_vec();
        assert!(promote(&bad, served.path()).is_err());
        assert_eq!(
            current_digest(served.path()).expect("current"),
            Some(a.digest())
        );
        // A garbled pointer is refused.
        std::fs::write(served.path().join(CURRENT_FILE), "../../etc\n").expect("write");
        assert!(load_served(served.path()).is_err());
        // A plain package folder loads as itself.
        let plain = tempfile::tempdir().expect("tempdir");
        a.write(plain.path()).expect("write");
        assert!(plain.path().join(MANIFEST_FILE).is_file());
        assert_eq!(load_served(plain.path()).expect("plain").digest, a.digest());
    }
}
