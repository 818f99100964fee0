//! Compiled-plugin cache: compile each component once, keep the artifact
//! under `<data_dir>/plugin-cache`, keyed by the component's sha256 and the
//! engine's compatibility hash.
//!
//! Deserialising a compiled artifact runs native code it contains, so the box
//! must never load one it did not write itself: every artifact carries an
//! HMAC-SHA256 tag under a key that exists only on this box
//! (`<data_dir>/keys/cache-hmac.key`, mode 0600), checked before wasmtime
//! sees the bytes. A missing, stale or tampered artifact is recompiled.

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
            Ok(bytes) if bytes.len() == 32 => bytes,
            Ok(_) | Err(_) => {
                let mut bytes = vec![0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| PluginError::Io {
                        path: key_path.display().to_string(),
                        source: std::io::Error::other("system random generator failed"),
                    })?;
                // Replace an unusable key; every artifact tagged with it is
                // then recompiled.
                let _ = std::fs::remove_file(&key_path);
                crate::output::write_new_private(&key_path, &bytes).map_err(io(&key_path))?;
                bytes
            }
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
        let stem = format!("{digest}-{}", engine.compatibility_hash());
        let artifact = self.dir.join(format!("{stem}.cwasm"));
        let tag_path = self.dir.join(format!("{stem}.tag"));
        if let (Ok(compiled), Ok(tag)) =
            (std::fs::read(&artifact), std::fs::read_to_string(&tag_path))
            && let Ok(tag) = hex::decode(tag.trim())
            && hmac::verify(&self.key, &compiled, &tag).is_ok()
        {
            // SAFETY: the artifact was produced by `Component::serialize` on
            // this box: its HMAC verified under a key only this box holds, and
            // its name carries this engine's compatibility hash.
            match unsafe { Component::deserialize(engine.engine(), &compiled) } {
                Ok(component) => return Ok((component, CacheOutcome::Cached)),
                Err(e) => tracing::warn!(%plugin, "cached artifact unusable, recompiling: {e:#}"),
            }
        }
        let component =
            Component::new(engine.engine(), bytes).map_err(|e| PluginError::Invalid {
                plugin: plugin.to_owned(),
                reason: format!("{e:#}").replace('\n', " "),
            })?;
        match component.serialize() {
            Ok(compiled) => {
                let tag = hex::encode(hmac::sign(&self.key, &compiled).as_ref());
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

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), crate::output::OutputError> {
    crate::output::write_atomically(path, |out| {
        out.write_all(bytes)
            .map_err(|source| crate::output::OutputError::Io {
                path: path.display().to_string(),
                source,
            })
    })
}
