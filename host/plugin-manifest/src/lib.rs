//! `plugin.toml`: what a plugin is, which component file carries it, the
//! sha256 of that file, and the hooks it implements; optionally signed
//! (`plugin.toml.sig`, Ed25519 over the manifest's exact bytes — and so over
//! the component, through its digest).
//!
//! `plugin.toml.sig` is one line naming the scheme, the signer's public key
//! and the signature, both hex:
//!
//! ```text
//! ed25519 <public key, 64 hex digits> <signature, 128 hex digits>
//! ```
//!
//! Naming the key tells the four [`SignatureStatus`]es apart: no file
//! (unsigned), a signature by a trusted key (verified), a valid signature by
//! a key this box does not trust (untrusted key: a warning where signatures
//! are optional, an error where required), and a signature that does not
//! verify under the key that made it (tampered: always an error). A legacy
//! file holding only the hex signature still verifies against the trusted
//! keys; when it does not, which of the last two it is cannot be told.
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

use oxbox_signing as signing;

/// What can be wrong with a plugin's package files (`oxbox`'s plugin loader
/// reports it as `PluginError::Package`).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file (manifest, signature) could not be written.
    #[error(transparent)]
    Write(#[from] oxbox_files::OutputError),
    /// A file (manifest, component, signature) could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed or disagrees with the component.
    #[error("plugin manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A signature is required and missing, or does not verify.
    #[error("plugin {plugin}: signature: {reason}")]
    Signature {
        /// The plugin.
        plugin: String,
        /// What is wrong.
        reason: String,
    },
}

impl ManifestError {
    /// Whether the package itself is refused (a malformed manifest, a
    /// missing or bad signature) rather than a file failing to read or
    /// write: the CLI exits 2 for these, 1 otherwise.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ManifestError::Manifest { .. } | ManifestError::Signature { .. }
        )
    }
}

/// Largest manifest accepted.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Largest component accepted: real plugins are a few hundred KiB.
pub const MAX_COMPONENT_BYTES: u64 = 64 * 1024 * 1024;
/// The signature file beside a manifest.
pub const SIGNATURE_SUFFIX: &str = ".sig";
/// Largest signature file accepted (a real one is 202 bytes).
pub const MAX_SIGNATURE_BYTES: u64 = 4 * 1024;
/// The first word of a signature file: the scheme.
pub const SIGNATURE_SCHEME: &str = "ed25519";

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
    /// The bytes of the signature file beside the manifest, if any (at
    /// most [`MAX_SIGNATURE_BYTES`] + 1: parsed by [`PluginFiles::verify`]).
    pub signature: Option<Vec<u8>>,
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
    /// Validly signed by a key that `sandbox.trusted_plugin_keys` does not
    /// list: loaded (with a warning) only where signatures are optional.
    UntrustedKey {
        /// The signer's public key (hex).
        key: String,
    },
}

impl SignatureStatus {
    /// The trusted key that verified the manifest, if one did.
    pub fn trusted_key(&self) -> Option<&str> {
        match self {
            SignatureStatus::Verified { key } => Some(key),
            SignatureStatus::Unsigned | SignatureStatus::UntrustedKey { .. } => None,
        }
    }

    /// What an operator should be told about plugin `plugin` loaded with
    /// this status, if anything: a signature by an untrusted key.
    pub fn warning(&self, plugin: &str) -> Option<String> {
        match self {
            SignatureStatus::UntrustedKey { key } => Some(format!(
                "plugin {plugin} is signed by key {key}, which sandbox.trusted_plugin_keys does \
                 not list: loaded because signatures are optional here; add the key to \
                 trusted_plugin_keys to trust it (with require_signed_plugins it is refused)"
            )),
            SignatureStatus::Unsigned | SignatureStatus::Verified { .. } => None,
        }
    }
}

impl Manifest {
    /// Parses and checks a manifest's bytes (at most the manifest size
    /// limit): UTF-8 TOML with exactly the known keys, a name of 1 to 64
    /// letters, digits, '-' or '_', and a component path beside the
    /// manifest. What [`PluginFiles::load`] runs on `plugin.toml`; the fuzz
    /// target `plugin_manifest` (`host/fuzz/`) drives it.
    ///
    /// # Errors
    /// Why the bytes are not a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(format!("over {MAX_MANIFEST_BYTES} bytes"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        let manifest: Self = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if manifest.name.is_empty()
            || manifest.name.len() > 64
            || !manifest
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                manifest.name
            ));
        }
        if manifest.component.is_absolute()
            || manifest
                .component
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err("component must be a file beside the manifest".to_owned());
        }
        Ok(manifest)
    }
}

/// The contents of a `plugin.toml.sig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureFile {
    /// `ed25519 <public key hex> <signature hex>`: the signature and the
    /// key that made it.
    Ed25519 {
        /// The signer's public key.
        key: [u8; 32],
        /// The signature over the manifest's bytes.
        signature: [u8; 64],
    },
    /// A bare hex signature, as written before the key was named.
    Legacy {
        /// The signature over the manifest's bytes.
        signature: [u8; 64],
    },
}

impl SignatureFile {
    /// Parses a signature file's bytes.
    ///
    /// # Errors
    /// Why the bytes are not a signature file.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() as u64 > MAX_SIGNATURE_BYTES {
            return Err(format!("over {MAX_SIGNATURE_BYTES} bytes"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            [scheme, key, signature] if *scheme == SIGNATURE_SCHEME => Ok(Self::Ed25519 {
                key: signing::parse_public_key(key)
                    .map_err(|_| "the public key is not 64 hex digits".to_owned())?,
                signature: signing::parse_signature(signature)
                    .map_err(|_| "the signature is not 128 hex digits".to_owned())?,
            }),
            [signature] => Ok(Self::Legacy {
                signature: signing::parse_signature(signature).map_err(|_| {
                    format!("expected `{SIGNATURE_SCHEME} <public key hex> <signature hex>`")
                })?,
            }),
            [] => Err("empty".to_owned()),
            _ => Err(format!(
                "expected one line `{SIGNATURE_SCHEME} <public key hex> <signature hex>`"
            )),
        }
    }

    /// The file's text (one line, newline-terminated).
    pub fn to_text(&self) -> String {
        match self {
            Self::Ed25519 { key, signature } => format!(
                "{SIGNATURE_SCHEME} {} {}\n",
                hex::encode(key),
                hex::encode(signature)
            ),
            Self::Legacy { signature } => format!("{}\n", hex::encode(signature)),
        }
    }
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ManifestError> {
    use std::io::Read;
    let io = |source| ManifestError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > cap {
        return Err(ManifestError::Manifest {
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
    /// [`ManifestError::Io`] or [`ManifestError::Manifest`] (syntax, unknown
    /// keys, bad name, digest mismatch).
    pub fn load(manifest_path: &Path) -> Result<Self, ManifestError> {
        let bad = |reason: String| ManifestError::Manifest {
            path: manifest_path.display().to_string(),
            reason,
        };
        let manifest_bytes = read_capped(manifest_path, MAX_MANIFEST_BYTES)?;
        let manifest = Manifest::parse(&manifest_bytes).map_err(bad)?;
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
        let signature = read_signature(&signature_path(manifest_path))?;
        Ok(Self {
            manifest,
            manifest_path: manifest_path.to_path_buf(),
            manifest_bytes,
            component,
            signature,
        })
    }

    /// Checks the signature against `trusted` keys. Unsigned, and signed
    /// by a key not in `trusted`, are accepted only when `required` is
    /// false; a signature that does not verify under the key that made it
    /// (tampered) never is.
    ///
    /// # Errors
    /// [`ManifestError::Signature`], saying which case it is.
    pub fn verify(
        &self,
        trusted: &[[u8; 32]],
        required: bool,
    ) -> Result<SignatureStatus, ManifestError> {
        let fail = |reason: String| ManifestError::Signature {
            plugin: self.manifest.name.clone(),
            reason,
        };
        let sig_path = signature_path(&self.manifest_path);
        let Some(bytes) = &self.signature else {
            return if required {
                Err(fail(format!(
                    "require_signed_plugins is on and {} has no {}: sign it (`oxbox plugin sign`)",
                    self.manifest_path.display(),
                    SIGNATURE_SUFFIX
                )))
            } else {
                Ok(SignatureStatus::Unsigned)
            };
        };
        let file = SignatureFile::parse(bytes).map_err(|why| {
            fail(format!(
                "{} is not an oxbox signature file ({why}): damaged or tampered; sign the \
                 manifest again (`oxbox plugin sign`)",
                sig_path.display()
            ))
        })?;
        match file {
            SignatureFile::Ed25519 { key, signature } => {
                let key_hex = hex::encode(key);
                if !signing::verifies(&self.manifest_bytes, &signature, &key) {
                    return Err(fail(format!(
                        "tampered: {} does not verify under the key that made it ({key_hex}): \
                         {} or the signature changed since signing (after a deliberate \
                         change or a re-pack, sign again)",
                        sig_path.display(),
                        self.manifest_path.display()
                    )));
                }
                if trusted.contains(&key) {
                    Ok(SignatureStatus::Verified { key: key_hex })
                } else if required {
                    Err(fail(format!(
                        "signed by key {key_hex}, which this box does not trust \
                         (require_signed_plugins is on): add it to \
                         sandbox.trusted_plugin_keys"
                    )))
                } else {
                    Ok(SignatureStatus::UntrustedKey { key: key_hex })
                }
            }
            SignatureFile::Legacy { signature } => trusted
                .iter()
                .find(|key| signing::verifies(&self.manifest_bytes, &signature, key))
                .map(|key| SignatureStatus::Verified {
                    key: hex::encode(key),
                })
                .ok_or_else(|| {
                    fail(format!(
                        "{} (an old-format file that does not name its key) verifies under \
                         none of the {} trusted key(s): signed by an unknown key or changed \
                         since signing; re-sign to tell which (`oxbox plugin sign`)",
                        sig_path.display(),
                        trusted.len()
                    ))
                }),
        }
    }

    /// Signs the manifest with `key`: writes `plugin.toml.sig` (mode 0644,
    /// atomically) naming the key; returns its path.
    ///
    /// # Errors
    /// [`ManifestError::Write`].
    pub fn sign(&self, key: &signing::SigningKey) -> Result<PathBuf, ManifestError> {
        let file = SignatureFile::Ed25519 {
            key: key.public_key(),
            signature: key.sign(&self.manifest_bytes),
        };
        let path = signature_path(&self.manifest_path);
        // A signature is public, like the manifest it signs.
        oxbox_files::write_shared_bytes(&path, file.to_text().as_bytes())?;
        Ok(path)
    }
}

/// Reads a signature file, if there is one: at most
/// [`MAX_SIGNATURE_BYTES`] + 1 bytes (so an oversized one is seen as such).
fn read_signature(path: &Path) -> Result<Option<Vec<u8>>, ManifestError> {
    use std::io::Read;
    let io = |source| ManifestError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io(source)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_SIGNATURE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(Some(bytes))
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
/// [`ManifestError::Manifest`] if it cannot be encoded, [`ManifestError::Write`].
pub fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), ManifestError> {
    let text = toml::to_string(manifest).map_err(|e| ManifestError::Manifest {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    oxbox_files::write_atomically(path, |out| {
        out.write_all(text.as_bytes())
            .map_err(|source| oxbox_files::OutputError::Io {
                path: path.display().to_string(),
                source,
            })
    })?;
    Ok(())
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

    /// A signed plugin in a fresh folder, the trusted-key list holding its
    /// key, and a second key pair that signs nothing.
    struct Signed {
        dir: tempfile::TempDir,
        path: PathBuf,
        key: signing::SigningKey,
        public: [u8; 32],
        other: [u8; 32],
    }

    fn signed() -> Signed {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_plugin(dir.path(), b"\0asm", &sha256_hex(b"\0asm"));
        let (private, public) = signing::generate_keypair(&dir.path().join("k1")).expect("keys");
        let (_, other) = signing::generate_keypair(&dir.path().join("k2")).expect("keys");
        let key = signing::SigningKey::load(&private).expect("key");
        PluginFiles::load(&path)
            .expect("load")
            .sign(&key)
            .expect("sign");
        Signed {
            dir,
            path,
            key,
            public: signing::parse_public_key(&public).expect("hex"),
            other: signing::parse_public_key(&other).expect("hex"),
        }
    }

    fn verify(
        path: &Path,
        trusted: &[[u8; 32]],
        required: bool,
    ) -> Result<SignatureStatus, String> {
        PluginFiles::load(path)
            .expect("load")
            .verify(trusted, required)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn unsigned_is_accepted_only_where_signatures_are_optional() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_plugin(dir.path(), b"\0asm", &sha256_hex(b"\0asm"));
        assert_eq!(verify(&path, &[], false), Ok(SignatureStatus::Unsigned));
        let err = verify(&path, &[], true).expect_err("required");
        assert!(err.contains("require_signed_plugins is on"), "{err}");
    }

    #[test]
    fn signed_by_a_trusted_key_verifies_under_both_policies() {
        let s = signed();
        let text = std::fs::read_to_string(signature_path(&s.path)).expect("sig");
        assert!(
            text.starts_with(&format!("ed25519 {} ", hex::encode(s.public))),
            "{text}"
        );
        assert_eq!(text.len(), 8 + 64 + 1 + 128 + 1, "{text}");
        for required in [false, true] {
            assert_eq!(
                verify(&s.path, &[s.other, s.public], required),
                Ok(SignatureStatus::Verified {
                    key: hex::encode(s.public)
                })
            );
        }
    }

    #[test]
    fn untrusted_key_warns_where_optional_and_fails_where_required() {
        let s = signed();
        let status = verify(&s.path, &[s.other], false).expect("optional: loads");
        assert_eq!(
            status,
            SignatureStatus::UntrustedKey {
                key: hex::encode(s.public)
            }
        );
        let warning = status.warning("p").expect("a warning");
        assert!(
            warning.contains(&hex::encode(s.public)) && warning.contains("trusted_plugin_keys"),
            "{warning}"
        );
        assert_eq!(SignatureStatus::Unsigned.warning("p"), None);
        for trusted in [&[][..], &[s.other][..]] {
            let err = verify(&s.path, trusted, true).expect_err("required");
            assert!(
                err.contains(&format!("signed by key {}", hex::encode(s.public)))
                    && err.contains("add it to sandbox.trusted_plugin_keys")
                    && !err.contains("tampered"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_changed_manifest_or_signature_is_tampered_under_both_policies() {
        let s = signed();
        let trusting = [s.public];
        // The manifest edited after signing.
        let original = std::fs::read_to_string(&s.path).expect("read");
        std::fs::write(&s.path, original.replace("1.0.0", "1.0.1")).expect("write");
        for (trusted, required) in [
            (&trusting[..], true),
            (&[][..], false),
            (&trusting[..], false),
        ] {
            let err = verify(&s.path, trusted, required).expect_err("tampered");
            assert!(err.contains("tampered"), "{err}");
        }
        std::fs::write(&s.path, &original).expect("restore");
        assert!(verify(&s.path, &trusting, true).is_ok());
        // One digit of the signature changed.
        let sig_path = signature_path(&s.path);
        let text = std::fs::read_to_string(&sig_path).expect("sig");
        let flipped = if text.ends_with("0\n") { "1\n" } else { "0\n" };
        std::fs::write(&sig_path, format!("{}{flipped}", &text[..text.len() - 2])).expect("write");
        for required in [false, true] {
            let err = verify(&s.path, &trusting, required).expect_err("tampered");
            assert!(err.contains("tampered"), "{err}");
        }
        // The key swapped for another one: the signature is not its.
        std::fs::write(
            &sig_path,
            text.replace(&hex::encode(s.public), &hex::encode(s.other)),
        )
        .expect("write");
        let err = verify(&s.path, &[s.other], false).expect_err("tampered");
        assert!(err.contains("tampered"), "{err}");
    }

    #[test]
    fn malformed_and_oversized_signature_files_are_refused_without_panic() {
        let s = signed();
        let sig_path = signature_path(&s.path);
        let good = std::fs::read(&sig_path).expect("sig");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "empty"),
            (b"ed25519 zz 00\n".to_vec(), "public key"),
            (b"rsa 00 11\n".to_vec(), "expected one line"),
            (vec![0xff, 0xfe], "UTF-8"),
            (b"ab".repeat(3000), "over 4096 bytes"),
            ([&good[..], &good[..]].concat(), "expected one line"),
        ];
        for (bytes, why) in cases {
            std::fs::write(&sig_path, &bytes).expect("write");
            for required in [false, true] {
                let err = verify(&s.path, &[s.public], required).expect_err("malformed");
                assert!(
                    err.contains("not an oxbox signature file") && err.contains(why),
                    "{why}: {err}"
                );
            }
        }
        drop(s.dir);
    }

    #[test]
    fn legacy_bare_signatures_verify_against_trusted_keys_only() {
        let s = signed();
        let files = PluginFiles::load(&s.path).expect("load");
        std::fs::write(
            signature_path(&s.path),
            format!("{}\n", hex::encode(s.key.sign(&files.manifest_bytes))),
        )
        .expect("legacy");
        assert_eq!(
            verify(&s.path, &[s.public], true),
            Ok(SignatureStatus::Verified {
                key: hex::encode(s.public)
            })
        );
        for required in [false, true] {
            let err = verify(&s.path, &[s.other], required).expect_err("unknown");
            assert!(
                err.contains(
                    "signed by an unknown key or changed since signing; re-sign to tell which"
                ),
                "{err}"
            );
        }
    }
}
