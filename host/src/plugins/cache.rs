//! Compiled-plugin cache: compile each component once, keep the artifact
//! under `<data_dir>/plugin-cache`, keyed by the component's sha256 and the
//! engine's compatibility hash.
//!
//! Deserialising a compiled artifact runs native code it contains, so the box
//! must never load one it did not write itself: every artifact carries an
//! HMAC-SHA256 tag under a key that exists only on this box
//! (`<data_dir>/keys/cache-hmac.key`, mode 0600), checked before wasmtime
//! sees the bytes. The tag binds the artifact to what it was compiled from
//! and for: it covers a domain label, the component's sha256 and the
//! engine's compatibility hash, then the artifact bytes — so an artifact
//! renamed onto another component's entry (or another engine's) does not
//! verify. A missing, stale, tampered or swapped artifact is recompiled.
//!
//! The key is made on first use only: any other failure to read it (a
//! permission error, a key of the wrong length) stops with an error rather
//! than silently replacing it.

use std::path::{Path, PathBuf};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use wasmtime::component::Component;

use super::{PluginEngine, PluginError};

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Compiled now (and stored).
    Compiled,
    /// Loaded from an authenticated artifact.
    Cached,
}

/// The cache directory and its key.
pub struct ComponentCache {
    dir: PathBuf,
    key: hmac::Key,
}

impl std::fmt::Debug for ComponentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Length of the cache key, bytes.
const KEY_BYTES: usize = 32;
/// Domain label of the cache tags (a new label for a new tag layout).
const TAG_DOMAIN: &[u8] = b"oxbox plugin-cache artifact v2\0";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PluginError + '_ {
    move |source| PluginError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` (and parents) with owner-only permissions.
fn private_dir(dir: &Path) -> Result<(), PluginError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io(dir))
}

impl ComponentCache {
    /// Opens (creating if needed) the cache under `data_dir`.
    ///
    /// # Errors
    /// [`PluginError::Io`] when the directories or the key cannot be made.
    pub fn open(data_dir: &Path) -> Result<Self, PluginError> {
        let dir = data_dir.join("plugin-cache");
        let keys = data_dir.join("keys");
        private_dir(&dir)?;
        private_dir(&keys)?;
        let key_path = keys.join("cache-hmac.key");
        let key_bytes = match std::fs::read(&key_path) {
            Ok(bytes) if bytes.len() == KEY_BYTES => bytes,
            Ok(bytes) => {
                return Err(PluginError::Io {
                    path: key_path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "the plugin cache key is {} bytes, not {KEY_BYTES}: remove it (and the plugin-cache directory) to make a new one",
                            bytes.len()
                        ),
                    ),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; KEY_BYTES];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| PluginError::Io {
                        path: key_path.display().to_string(),
                        source: std::io::Error::other("system random generator failed"),
                    })?;
                // First use: `write_new_private` refuses to replace a file
                // that appeared meanwhile.
                crate::output::write_new_private(&key_path, &bytes).map_err(io(&key_path))?;
                bytes
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        Ok(Self {
            dir,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
        })
    }

    /// The component for `bytes` (sha256 `digest`), from the cache when an
    /// authenticated artifact exists, else compiled and stored.
    ///
    /// # Errors
    /// [`PluginError::Invalid`] when the bytes do not compile.
    pub fn load_or_compile(
        &self,
        engine: &PluginEngine,
        bytes: &[u8],
        digest: &str,
        plugin: &str,
    ) -> Result<(Component, CacheOutcome), PluginError> {
        let engine_hash = engine.compatibility_hash();
        let stem = format!("{digest}-{engine_hash}");
        let artifact = self.dir.join(format!("{stem}.cwasm"));
        let tag_path = self.dir.join(format!("{stem}.tag"));
        if let (Ok(compiled), Ok(tag)) =
            (std::fs::read(&artifact), std::fs::read_to_string(&tag_path))
        {
            if let Ok(tag) = hex::decode(tag.trim())
                && self.verify(digest, &engine_hash, &compiled, &tag)
            {
                // SAFETY: the artifact was produced by `Component::serialize`
                // on this box from the component with this digest, for this
                // engine: its HMAC, which covers both, verified under a key
                // only this box holds.
                match unsafe { Component::deserialize(engine.engine(), &compiled) } {
                    Ok(component) => return Ok((component, CacheOutcome::Cached)),
                    Err(e) => {
                        tracing::warn!(%plugin, "cached artifact unusable, recompiling: {e:#}");
                    }
                }
            } else {
                tracing::warn!(
                    %plugin,
                    "cached artifact does not verify for this component and engine, recompiling"
                );
            }
        }
        let component =
            Component::new(engine.engine(), bytes).map_err(|e| PluginError::Invalid {
                plugin: plugin.to_owned(),
                reason: format!("{e:#}").replace('\n', " "),
            })?;
        match component.serialize() {
            Ok(compiled) => {
                let tag = hex::encode(self.sign(digest, &engine_hash, &compiled));
                let stored = write_file(&artifact, &compiled)
                    .and_then(|()| write_file(&tag_path, tag.as_bytes()));
                if let Err(e) = stored {
                    tracing::warn!(%plugin, "cannot store compiled plugin: {e}");
                }
            }
            Err(e) => tracing::warn!(%plugin, "cannot serialise compiled plugin: {e:#}"),
        }
        Ok((component, CacheOutcome::Compiled))
    }
}

impl ComponentCache {
    /// What a tag is computed over: domain label, component digest, engine
    /// hash (each length-prefixed), then the artifact bytes.
    fn tagged_input(digest: &str, engine_hash: &str, artifact: &[u8]) -> Vec<u8> {
        let mut input = Vec::with_capacity(TAG_DOMAIN.len() + 32 + 128 + artifact.len());
        input.extend_from_slice(TAG_DOMAIN);
        for part in [digest.as_bytes(), engine_hash.as_bytes()] {
            input.extend_from_slice(&(part.len() as u64).to_be_bytes());
            input.extend_from_slice(part);
        }
        input.extend_from_slice(artifact);
        input
    }

    fn sign(&self, digest: &str, engine_hash: &str, artifact: &[u8]) -> Vec<u8> {
        let input = Self::tagged_input(digest, engine_hash, artifact);
        hmac::sign(&self.key, &input).as_ref().to_vec()
    }

    /// Whether `tag` is the artifact's tag; compared in constant time
    /// (`ring::hmac::verify`).
    fn verify(&self, digest: &str, engine_hash: &str, artifact: &[u8], tag: &[u8]) -> bool {
        let input = Self::tagged_input(digest, engine_hash, artifact);
        hmac::verify(&self.key, &input, tag).is_ok()
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), crate::output::OutputError> {
    crate::output::write_atomically(path, |out| {
        out.write_all(bytes)
            .map_err(|source| crate::output::OutputError::Io {
                path: path.display().to_string(),
                source,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_the_digest_and_engine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ComponentCache::open(dir.path()).expect("open");
        let tag = cache.sign("aa", "e1", b"artifact");
        assert!(cache.verify("aa", "e1", b"artifact", &tag));
        assert!(!cache.verify("bb", "e1", b"artifact", &tag));
        assert!(!cache.verify("aa", "e2", b"artifact", &tag));
        assert!(!cache.verify("aa", "e1", b"artifacT", &tag));
        assert!(!cache.verify("aa", "e1", b"artifact", &tag[..16]));
        assert!(!cache.verify("aa", "e1", b"artifact", b""));
        // The layout tags had before (an incremental HMAC over the same
        // parts): artifacts already in a cache stay valid.
        let mut context = hmac::Context::with_key(&cache.key);
        context.update(TAG_DOMAIN);
        for part in [&b"aa"[..], b"e1"] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        context.update(b"artifact");
        assert_eq!(context.sign().as_ref(), &tag[..]);
        // Reopening reads the same key; a key of the wrong length stops.
        let again = ComponentCache::open(dir.path()).expect("reopen");
        assert!(again.verify("aa", "e1", b"artifact", &tag));
        std::fs::write(dir.path().join("keys/cache-hmac.key"), b"short").expect("write");
        let err = ComponentCache::open(dir.path()).expect_err("short key");
        assert!(err.to_string().contains("5 bytes"), "{err}");
    }
}
