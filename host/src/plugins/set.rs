//! The site's plugins, in order, and their atomic reload.
//!
//! EMR mapping is chained: each plugin with `map-emr` gets the previous
//! one's canonical features as raw fields (name, value, canonical unit).
//! Image decisions: every plugin with `preprocess-image` sees the host's
//! canonical image; the last one's decision wins.
//!
//! [`PluginRegistry`] holds the current set behind an `Arc`: a request takes
//! the `Arc` and finishes on that set even if a reload swaps in a new one
//! meanwhile. A set that fails to load leaves the old one in place.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::cache::ComponentCache;
use super::manifest::{ManifestError, PluginFiles, SignatureStatus};
use super::{
    Feature, Frame, Hook, ImageDecision, LoadedPlugin, PixelsData, PluginEngine, PluginError,
    RawField,
};
use crate::config::{Config, LoadedConfig};
use crate::signing;

/// The configured plugins, loaded, in run order.
#[derive(Debug, Default)]
pub struct PluginSet {
    plugins: Vec<Arc<LoadedPlugin>>,
    signatures: Vec<SignatureStatus>,
}

impl PluginSet {
    /// Loads every `[[plugins]]` entry of `config`, in order: manifest,
    /// digest, signature policy, component, `describe` — which must agree
    /// with the manifest.
    ///
    /// # Errors
    /// The first plugin that fails to load, with its cause.
    pub fn load(
        config: &Config,
        engine: &Arc<PluginEngine>,
        cache: Option<&ComponentCache>,
    ) -> Result<Self, PluginError> {
        let trusted = trusted_keys(config)?;
        let mut set = Self::default();
        for entry in &config.plugins {
            let files = PluginFiles::load(&entry.path)?;
            let signature = files.verify(&trusted, config.sandbox.require_signed_plugins)?;
            let plugin = LoadedPlugin::load(
                engine,
                cache,
                &files.component,
                &files.manifest.name,
                config.sandbox.limits(),
            )?;
            let manifest = &files.manifest;
            let mut hooks = manifest.hooks.clone();
            let mut described = plugin.hooks().to_vec();
            hooks.sort_by_key(|h| h.as_str());
            described.sort_by_key(|h| h.as_str());
            if plugin.name() != manifest.name
                || plugin.version() != manifest.version
                || hooks != described
            {
                return Err(PluginError::Package(ManifestError::Manifest {
                    path: entry.path.display().to_string(),
                    reason: format!(
                        "manifest says {} {} with hooks {:?}; the component describes itself as {} {} with hooks {:?}",
                        manifest.name,
                        manifest.version,
                        hooks.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                        plugin.name(),
                        plugin.version(),
                        described.iter().map(|h| h.as_str()).collect::<Vec<_>>()
                    ),
                }));
            }
            set.plugins.push(Arc::new(plugin));
            set.signatures.push(signature);
        }
        Ok(set)
    }

    /// A set of already-loaded plugins (tests, `oxbox plugin run`).
    pub fn from_plugins(plugins: Vec<LoadedPlugin>) -> Self {
        let signatures = plugins.iter().map(|_| SignatureStatus::Unsigned).collect();
        Self {
            plugins: plugins.into_iter().map(Arc::new).collect(),
            signatures,
        }
    }

    /// The plugins, in run order.
    pub fn plugins(&self) -> &[Arc<LoadedPlugin>] {
        &self.plugins
    }

    /// Signature status of each plugin, in run order.
    pub fn signatures(&self) -> &[SignatureStatus] {
        &self.signatures
    }

    /// What the operator should be told about the loaded set: plugins
    /// signed by a key this box does not trust (accepted only because
    /// signatures are optional).
    pub fn warnings(&self) -> Vec<String> {
        self.plugins
            .iter()
            .zip(&self.signatures)
            .filter_map(|(plugin, signature)| signature.warning(plugin.name()))
            .collect()
    }

    /// Logs [`PluginSet::warnings`] (serve at start and on reload, predict).
    pub fn log_warnings(&self) {
        for warning in self.warnings() {
            tracing::warn!("{warning}");
        }
    }

    /// The fewest sandbox slots any of its plugins' pools holds: how many
    /// cases may run through the set at once without waiting for a slot
    /// (each case calls one plugin at a time). `None` without plugins.
    pub fn sandboxes(&self) -> Option<u32> {
        self.plugins.iter().map(|p| p.sandboxes()).min()
    }

    /// Whether any plugin maps EMR records.
    pub fn maps_emr(&self) -> bool {
        self.plugins.iter().any(|p| p.has_hook(Hook::MapEmr))
    }

    /// Runs the `map-emr` chain.
    ///
    /// # Errors
    /// The first plugin's rejection or fault.
    pub fn map_emr(&self, record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let mut fields = record;
        let mut features = None;
        for plugin in self.plugins.iter().filter(|p| p.has_hook(Hook::MapEmr)) {
            let mapped = plugin.map_emr(&fields)?;
            fields = mapped
                .iter()
                .map(|f| RawField {
                    name: f.name.clone(),
                    value: f.value.map(|v| v.to_string()).unwrap_or_default(),
                    unit: None,
                })
                .collect();
            features = Some(mapped);
        }
        Ok(features.unwrap_or_default())
    }

    /// Whether any plugin looks at images.
    pub fn preprocesses_images(&self) -> bool {
        self.plugins
            .iter()
            .any(|p| p.has_hook(Hook::PreprocessImage))
    }

    /// Runs every `preprocess-image` plugin; the last decision wins.
    ///
    /// # Errors
    /// The first plugin's rejection or fault.
    pub fn preprocess_image(
        &self,
        frame: &Frame,
        pixels: &PixelsData,
    ) -> Result<ImageDecision, PluginError> {
        let mut decision = ImageDecision::KeepCanonical;
        for plugin in self
            .plugins
            .iter()
            .filter(|p| p.has_hook(Hook::PreprocessImage))
        {
            decision = plugin.preprocess_image(frame, pixels)?;
        }
        Ok(decision)
    }
}

/// The public keys of `sandbox.trusted_plugin_keys`, parsed.
///
/// # Errors
/// [`ManifestError::Signature`] naming the setting when one is not a key.
pub fn trusted_keys(config: &Config) -> Result<Vec<[u8; 32]>, PluginError> {
    config
        .sandbox
        .trusted_plugin_keys
        .iter()
        .map(|k| {
            signing::parse_public_key(k).map_err(|e| {
                PluginError::Package(ManifestError::Signature {
                    plugin: "<config>".to_owned(),
                    reason: format!("sandbox.trusted_plugin_keys: {e}"),
                })
            })
        })
        .collect()
}

/// The current plugin set of a running box, reloadable.
pub struct PluginRegistry {
    current: RwLock<Arc<PluginSet>>,
    engine: Arc<PluginEngine>,
    cache: Option<ComponentCache>,
    config_path: Option<PathBuf>,
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl PluginRegistry {
    /// Loads the configured plugins.
    ///
    /// # Errors
    /// As [`PluginSet::load`], plus the engine and cache set-up.
    pub fn new(loaded: &LoadedConfig) -> Result<Self, PluginError> {
        let config = &loaded.config;
        let engine = Arc::new(PluginEngine::new(&config.sandbox.limits())?);
        let cache = ComponentCache::open(&config.storage.data_dir)?;
        let set = PluginSet::load(config, &engine, Some(&cache))?;
        set.log_warnings();
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            engine,
            cache: Some(cache),
            config_path: match &loaded.source {
                crate::config::ConfigSource::File(p) => Some(p.clone()),
                crate::config::ConfigSource::Embedded => None,
            },
        })
    }

    /// The set requests should use now. Holding it keeps it alive across a
    /// reload.
    pub fn current(&self) -> Arc<PluginSet> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads the configuration (if it came from a file) and loads its
    /// plugins; swaps them in only if all loaded. Quarantines are lifted.
    ///
    /// # Errors
    /// Why the new set failed; the old set stays in place.
    pub fn reload(&self) -> Result<usize, ReloadError> {
        let loaded =
            LoadedConfig::load(self.config_path.as_deref()).map_err(ReloadError::Config)?;
        let set = PluginSet::load(&loaded.config, &self.engine, self.cache.as_ref())
            .map_err(ReloadError::Plugin)?;
        set.log_warnings();
        let count = set.plugins.len();
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(set);
        Ok(count)
    }
}

/// Why a reload failed (the running plugins stay in place).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration no longer validates.
    #[error("configuration: {0}")]
    Config(#[source] crate::config::ConfigError),
    /// A plugin failed to load.
    #[error("{0}")]
    Plugin(#[source] PluginError),
}
