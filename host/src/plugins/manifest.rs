//! `plugin.toml`: what a plugin is, which component file carries it, the
//! sha256 of that file, and the hooks it implements; optionally signed
//! (`plugin.toml.sig`, Ed25519 over the manifest's exact bytes — and so over
//! the component, through its digest).
//!
//! ```toml
//! name = "example-site"
//! version = "0.1.0"
//! interface = "0.1.0"
//! component = "example-site.wasm"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! hooks = ["map-emr", "preprocess-image"]
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::PluginError;
use crate::signing;

/// Largest manifest accepted.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Largest component accepted: real plugins are a few hundred KiB.
pub const MAX_COMPONENT_BYTES: u64 = 64 * 1024 * 1024;
/// The signature file beside a manifest.
pub const SIGNATURE_SUFFIX: &str = ".sig";

/// A hook a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// `map-emr`.
    MapEmr,
    /// `preprocess-image`.
    PreprocessImage,
}

impl Hook {
    /// The WIT name.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::MapEmr => "map-emr",
            Hook::PreprocessImage => "preprocess-image",
        }
    }
}

/// The contents of `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Plugin name (letters, digits, '-', '_').
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Interface version it was built for, e.g. "0.1.0".
    pub interface: String,
    /// The component file, relative to the manifest's directory.
    pub component: PathBuf,
    /// sha256 of the component file, lowercase hex.
    pub sha256: String,
    /// Hooks it implements.
    pub hooks: Vec<Hook>,
}

/// A manifest read from disk with its component and signature.
#[derive(Debug, Clone)]
pub struct PluginFiles {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// Where it was read from.
    pub manifest_path: PathBuf,
    /// Its exact bytes (what a signature covers).
    pub manifest_bytes: Vec<u8>,
    /// The component's bytes, digest-checked.
    pub component: Vec<u8>,
    /// The hex signature beside the manifest, if any.
    pub signature: Option<String>,
}

/// Whether and how a plugin's manifest is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum SignatureStatus {
    /// No signature file.
    Unsigned,
    /// Signed by the trusted key with this public key (hex).
    Verified {
        /// The trusted public key that verified.
        key: String,
    },
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, PluginError> {
    use std::io::Read;
    let io = |source| PluginError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > cap {
        return Err(PluginError::Manifest {
            path: path.display().to_string(),
            reason: format!("{size} bytes, over the limit of {cap}"),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(cap).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

impl PluginFiles {
    /// Reads `plugin.toml`, its component (checking the sha256) and its
    /// signature file if present.
    ///
    /// # Errors
    /// [`PluginError::Io`] or [`PluginError::Manifest`] (syntax, unknown
    /// keys, bad name, digest mismatch).
    pub fn load(manifest_path: &Path) -> Result<Self, PluginError> {
        let bad = |reason: String| PluginError::Manifest {
            path: manifest_path.display().to_string(),
            reason,
        };
        let manifest_bytes = read_capped(manifest_path, MAX_MANIFEST_BYTES)?;
        let text = std::str::from_utf8(&manifest_bytes).map_err(|_| bad("not UTF-8".to_owned()))?;
        let manifest: Manifest = toml::from_str(text).map_err(|e| bad(e.message().to_owned()))?;
        if manifest.name.is_empty()
            || manifest.name.len() > 64
            || !manifest
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(format!(
                "name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                manifest.name
            )));
        }
        if manifest.component.is_absolute()
            || manifest
                .component
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad(
                "component must be a file beside the manifest".to_owned()
            ));
        }
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let component = read_capped(&dir.join(&manifest.component), MAX_COMPONENT_BYTES)?;
        let digest = sha256_hex(&component);
        if !digest.eq_ignore_ascii_case(manifest.sha256.trim()) {
            return Err(bad(format!(
                "sha256 of {} is {digest}, the manifest says {}",
                manifest.component.display(),
                manifest.sha256
            )));
        }
        let sig_path = signature_path(manifest_path);
        let signature = match std::fs::read_to_string(&sig_path) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(PluginError::Io {
                    path: sig_path.display().to_string(),
                    source,
                });
            }
        };
        Ok(Self {
            manifest,
            manifest_path: manifest_path.to_path_buf(),
            manifest_bytes,
            component,
            signature,
        })
    }

    /// Checks the signature against `trusted` keys. Unsigned is accepted
    /// only when `required` is false; a present signature must verify.
    ///
    /// # Errors
    /// [`PluginError::Signature`].
    pub fn verify(
        &self,
        trusted: &[[u8; 32]],
        required: bool,
    ) -> Result<SignatureStatus, PluginError> {
        let fail = |reason: String| PluginError::Signature {
            plugin: self.manifest.name.clone(),
            reason,
        };
        match &self.signature {
            None if required => Err(fail(format!(
                "require_signed_plugins is on and {} has no {}",
                self.manifest_path.display(),
                SIGNATURE_SUFFIX
            ))),
            None => Ok(SignatureStatus::Unsigned),
            Some(sig) => {
                let index = signing::verify_any(&self.manifest_bytes, sig, trusted)
                    .map_err(|e| fail(e.to_string()))?;
                Ok(SignatureStatus::Verified {
                    key: hex::encode(trusted[index]),
                })
            }
        }
    }
}

/// The signature file of a manifest: `plugin.toml.sig`.
pub fn signature_path(manifest: &Path) -> PathBuf {
    let mut name = manifest.as_os_str().to_owned();
    name.push(SIGNATURE_SUFFIX);
    PathBuf::from(name)
}

/// Writes a manifest as TOML (atomically).
///
/// # Errors
/// [`PluginError::Io`].
pub fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), PluginError> {
    let text = toml::to_string(manifest).map_err(|e| PluginError::Manifest {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    crate::output::write_atomically(path, |out| {
        out.write_all(text.as_bytes())
            .map_err(|source| crate::output::OutputError::Io {
                path: path.display().to_string(),
                source,
            })
    })
    .map_err(|e| PluginError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_plugin(dir: &Path, wasm: &[u8], sha: &str) -> PathBuf {
        std::fs::write(dir.join("p.wasm"), wasm).expect("wasm");
        let manifest = format!(
            "name = \"p\"\nversion = \"1.0.0\"\ninterface = \"0.1.0\"\ncomponent = \"p.wasm\"\nsha256 = \"{sha}\"\nhooks = [\"map-emr\"]\n"
        );
        let path = dir.join("plugin.toml");
        std::fs::write(&path, manifest).expect("manifest");
        path
    }

    #[test]
    fn digest_must_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write_plugin(dir.path(), b"\0asm", &sha256_hex(b"\0asm"));
        let files = PluginFiles::load(&good).expect("loads");
        assert_eq!(files.manifest.hooks, vec![Hook::MapEmr]);
        let bad = write_plugin(dir.path(), b"\0asm-tampered", &sha256_hex(b"\0asm"));
        let err = PluginFiles::load(&bad).expect_err("digest mismatch");
        assert!(err.to_string().contains("sha256 of p.wasm"), "{err}");
    }

    #[test]
    fn signatures_are_checked_and_required_when_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_plugin(dir.path(), b"\0asm", &sha256_hex(b"\0asm"));
        let keys = tempfile::tempdir().expect("keys");
        let (private, public) = signing::generate_keypair(keys.path()).expect("keys");
        let trusted = [signing::parse_public_key(&public).expect("hex")];
        let files = PluginFiles::load(&path).expect("load");
        assert_eq!(
            files.verify(&trusted, false).expect("ok"),
            SignatureStatus::Unsigned
        );
        assert!(files.verify(&trusted, true).is_err());
        let key = signing::SigningKey::load(&private).expect("key");
        std::fs::write(signature_path(&path), key.sign_hex(&files.manifest_bytes)).expect("sig");
        let files = PluginFiles::load(&path).expect("load");
        assert!(matches!(
            files.verify(&trusted, true),
            Ok(SignatureStatus::Verified { .. })
        ));
        // Any change to the manifest breaks the signature.
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace("1.0.0", "1.0.1");
        std::fs::write(&path, text).expect("write");
        let files = PluginFiles::load(&path).expect("load");
        assert!(files.verify(&trusted, false).is_err());
    }
}
