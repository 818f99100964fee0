//! Ed25519 signing (ring): key generation, detached signatures over bytes,
//! verification against a set of trusted public keys.
//!
//! Used for plugin manifests now and for federation weight shards later.
//! Private keys are PKCS#8 v2 documents written with mode 0600; public keys
//! and signatures travel as lowercase hex.

use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// File name of the private key written by [`generate_keypair`].
pub const PRIVATE_KEY_FILE: &str = "signing-key.pk8";
/// File name of the public key written by [`generate_keypair`].
pub const PUBLIC_KEY_FILE: &str = "signing-key.pub";

/// Errors from key handling, signing and verification.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A key file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A private key file is not an Ed25519 PKCS#8 document.
    #[error("{path}: not an Ed25519 PKCS#8 private key")]
    BadPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// Text that should be hex (a public key, a signature) is not.
    #[error("{what} is not valid hex of the right length")]
    BadHex {
        /// What was being parsed.
        what: &'static str,
    },
    /// `keys generate` would overwrite an existing private key.
    #[error(
        "{path} already exists: keys are never overwritten (move it away, or choose another --out)"
    )]
    KeyExists {
        /// The existing private key file.
        path: PathBuf,
    },
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// A key pair loaded from a PKCS#8 file.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads a private key from a PKCS#8 file.
    ///
    /// # Errors
    /// [`SigningError::Io`] or [`SigningError::BadPrivateKey`].
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let bytes = std::fs::read(path).map_err(|source| SigningError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| SigningError::BadPrivateKey {
            path: path.to_path_buf(),
        })?;
        Ok(Self { pair })
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        key
    }

    /// A detached signature over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut signature = [0u8; 64];
        signature.copy_from_slice(self.pair.sign(message).as_ref());
        signature
    }
}

/// Generates a key pair into `dir`: the private key (mode 0600) and the
/// public key (hex). Refuses to overwrite an existing private key.
///
/// # Errors
/// [`SigningError::KeyExists`] when `dir` already holds a private key,
/// [`SigningError::Io`], [`SigningError::Random`].
pub fn generate_keypair(dir: &Path) -> Result<(PathBuf, String), SigningError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SigningError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let private = dir.join(PRIVATE_KEY_FILE);
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| SigningError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| SigningError::Random)?;
    oxbox_files::write_new_private(&private, pkcs8.as_ref()).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            SigningError::KeyExists {
                path: private.clone(),
            }
        } else {
            SigningError::Io {
                path: private.clone(),
                source,
            }
        }
    })?;
    let public = hex::encode(pair.public_key().as_ref());
    let public_path = dir.join(PUBLIC_KEY_FILE);
    std::fs::write(&public_path, format!("{public}\n")).map_err(io(&public_path))?;
    Ok((private, public))
}

/// Parses a hex Ed25519 public key.
///
/// # Errors
/// [`SigningError::BadHex`].
pub fn parse_public_key(text: &str) -> Result<[u8; 32], SigningError> {
    let bytes =
        hex::decode(text.trim()).map_err(|_| SigningError::BadHex { what: "public key" })?;
    bytes
        .try_into()
        .map_err(|_| SigningError::BadHex { what: "public key" })
}

/// Parses a hex Ed25519 signature (64 bytes).
///
/// # Errors
/// [`SigningError::BadHex`].
pub fn parse_signature(text: &str) -> Result<[u8; 64], SigningError> {
    let bytes = hex::decode(text.trim()).map_err(|_| SigningError::BadHex { what: "signature" })?;
    bytes
        .try_into()
        .map_err(|_| SigningError::BadHex { what: "signature" })
}

/// Whether `signature` over `message` verifies under the public key `key`.
pub fn verifies(message: &[u8], signature: &[u8; 64], key: &[u8; 32]) -> bool {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (private, public) = generate_keypair(dir.path()).expect("generate");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&private)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let key = SigningKey::load(&private).expect("load");
        assert_eq!(key.public_hex(), public);
        let signature = key.sign(b"manifest bytes");
        let public = parse_public_key(&public).expect("hex");
        assert!(verifies(b"manifest bytes", &signature, &public));
        assert!(!verifies(b"manifest bytez", &signature, &public));
        assert_eq!(
            parse_signature(&hex::encode(signature)).expect("hex"),
            signature
        );
        assert!(
            generate_keypair(dir.path()).is_err(),
            "must not overwrite a key"
        );
    }
}
