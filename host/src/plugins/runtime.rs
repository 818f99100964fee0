//! One loaded plugin: checked once, instantiated fresh for every call.
//!
//! Loading: compile (or take from the authenticated cache), read the
//! component's imports — the interface version is in the `oxbox:plugin`
//! import names, so an unsupported version is refused before anything is
//! instantiated, as is any import the sandbox does not provide — then link
//! an `InstancePre` and ask the plugin to `describe` itself.
//!
//! Calling: a sandbox slot from the engine's gate (waiting at most the
//! deadline, else [`PluginError::Busy`] — load, not a fault), then a fresh
//! `Store` with a memory cap, table, instance and resource limits, a
//! wall-clock deadline (epoch interruption) and captured stdio. Nothing a
//! plugin can import blocks inside the host (see [`super::wasi`]), so the
//! deadline always fires. A guest `plugin-error` is a rejection of the
//! input; a trap, timeout, exceeded limit or malformed result is a fault,
//! classified by the limit the store recorded (not by wasmtime's message
//! text) and counted: after `fault_threshold` consecutive faults the plugin
//! is quarantined until the plugin set is reloaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::component::types::ComponentItem;
use wasmtime::{Store, StoreLimitsBuilder, Trap};

use super::bindings::{
    Feature, Frame, GuestError, ImageDecision, LimitHit, LogBudget, LogCounts, PixelsData,
    PluginInfo, PluginState, Preprocessor, PreprocessorPre, RawField, SandboxLimiter, WitHook,
};
use super::cache::{CacheOutcome, ComponentCache};
use super::engine::{MAX_CONCURRENT_SANDBOXES, SlotPermit};
use super::manifest::{Hook, sha256_hex};
use super::wasi::{LINKED_WASI, MAX_RANDOM_BYTES};
use super::{FaultCause, INTERFACE_PACKAGE, INTERFACE_VERSION, PluginEngine, PluginError};

/// Most features a `map-emr` answer may hold (the schema has 21).
pub const MAX_FEATURES: usize = 256;
/// Longest text (names, messages) accepted from a plugin, in bytes.
pub const MAX_TEXT: usize = 512;
/// Table elements per store: generous for Rust components, bounded.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Core instances, tables and memories per store (a component is a few).
const MAX_INSTANCES: usize = 16;

/// Limits applied to every plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimits {
    /// Wall-clock deadline per call.
    pub deadline: Duration,
    /// Linear memory cap per call, bytes.
    pub memory_bytes: usize,
    /// Consecutive faults that quarantine a plugin.
    pub fault_threshold: u32,
    /// Sandbox slots in the engine's pool (calls at once, all plugins).
    pub sandboxes: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(250),
            memory_bytes: 128 * 1024 * 1024,
            fault_threshold: 3,
            sandboxes: MAX_CONCURRENT_SANDBOXES,
        }
    }
}

/// WASI interfaces refused outright, with the reason (a clearer message
/// than "not linked"; the linker provides only [`LINKED_WASI`]).
const FORBIDDEN_WASI: [(&str, &str); 2] = [
    ("wasi:filesystem/", "plugins get no filesystem"),
    ("wasi:sockets/", "plugins get no network"),
];

/// A plugin ready to be called.
pub struct LoadedPlugin {
    info: PluginInfo,
    hooks: Vec<Hook>,
    sha256: String,
    imports: Vec<String>,
    label: String,
    pre: PreprocessorPre<PluginState>,
    engine: Arc<PluginEngine>,
    limits: PluginLimits,
    consecutive_faults: AtomicU32,
    cache: CacheOutcome,
    log: Arc<LogBudget>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("plugin", &self.label)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Loads a component: compile or fetch from `cache`, check imports and
    /// interface version, link, and call `describe`.
    ///
    /// `label` names the plugin in errors until it has described itself.
    ///
    /// # Errors
    /// [`PluginError::Invalid`], [`PluginError::UnsupportedInterface`],
    /// [`PluginError::ForbiddenImport`], or a fault from `describe`.
    pub fn load(
        engine: &Arc<PluginEngine>,
        cache: Option<&ComponentCache>,
        bytes: &[u8],
        label: &str,
        limits: PluginLimits,
    ) -> Result<Self, PluginError> {
        let invalid = |reason: String| PluginError::Invalid {
            plugin: label.to_owned(),
            reason: reason.replace('\n', " "),
        };
        let sha256 = sha256_hex(bytes);
        let (component, cache_outcome) = match cache {
            Some(cache) => cache.load_or_compile(engine, bytes, &sha256, label)?,
            None => (
                wasmtime::component::Component::new(engine.engine(), bytes)
                    .map_err(|e| invalid(format!("{e:#}")))?,
                CacheOutcome::Compiled,
            ),
        };

        // Type imports (e.g. the `pixels` resource the world uses) grant
        // nothing; every other import is screened.
        let imports: Vec<String> = component
            .component_type()
            .imports(engine.engine())
            .filter(|(_, item)| {
                !matches!(item.ty, ComponentItem::Type(_) | ComponentItem::Resource(_))
            })
            .map(|(name, _)| name.to_owned())
            .collect();
        check_imports(label, &imports)?;

        // The linker is the allowlist: the plugin interface and the WASI
        // subset of `super::wasi`, nothing else.
        let mut linker: Linker<PluginState> = Linker::new(engine.engine());
        super::wasi::add_to_linker(&mut linker).map_err(|e| invalid(format!("{e:#}")))?;
        super::bindings::add_to_linker(&mut linker).map_err(|e| invalid(format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let pre = PreprocessorPre::new(instance_pre).map_err(|e| invalid(format!("{e:#}")))?;

        let mut plugin = Self {
            info: PluginInfo {
                name: label.to_owned(),
                version: String::new(),
                site: String::new(),
                interface_version: String::new(),
                hooks: Vec::new(),
            },
            hooks: Vec::new(),
            sha256,
            imports,
            label: label.to_owned(),
            pre,
            engine: Arc::clone(engine),
            limits,
            consecutive_faults: AtomicU32::new(0),
            cache: cache_outcome,
            log: Arc::new(LogBudget::default()),
        };
        let info = plugin.call(|bindings, store| bindings.call_describe(store))?;
        if info.interface_version != INTERFACE_VERSION {
            return Err(PluginError::UnsupportedInterface {
                plugin: label.to_owned(),
                found: truncate(&info.interface_version),
                supported: INTERFACE_VERSION,
            });
        }
        check_text(label, "name", &info.name)?;
        check_text(label, "version", &info.version)?;
        plugin.hooks = info
            .hooks
            .iter()
            .map(|h| match h {
                WitHook::MapEmr => Hook::MapEmr,
                WitHook::PreprocessImage => Hook::PreprocessImage,
            })
            .collect();
        plugin.label = format!("{} {}", info.name, info.version);
        plugin.info = info;
        Ok(plugin)
    }

    /// The plugin's own description.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Sandbox slots in the pool its calls take a slot from (shared by
    /// every plugin of its engine).
    pub fn sandboxes(&self) -> u32 {
        self.engine.sandboxes()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Its version.
    pub fn version(&self) -> &str {
        &self.info.version
    }

    /// The hooks it implements.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// Whether it implements `hook`.
    pub fn has_hook(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    /// sha256 of its component, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The component's import names.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// Whether it was compiled now or loaded from the cache.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.cache
    }

    /// Consecutive faults so far (reset by a successful call).
    pub fn consecutive_faults(&self) -> u32 {
        self.consecutive_faults.load(Ordering::Relaxed)
    }

    /// Whether it is quarantined (refuses calls until the plugins reload).
    pub fn is_quarantined(&self) -> bool {
        self.consecutive_faults() >= self.limits.fault_threshold
    }

    /// Log lines (messages and stdio) written and dropped by the
    /// per-minute limit, over all its calls so far.
    pub fn log_counts(&self) -> LogCounts {
        self.log.counts()
    }

    /// A sandbox slot, waiting at most the deadline.
    fn slot(&self) -> Result<SlotPermit<'_>, PluginError> {
        let wait = self.limits.deadline;
        self.engine.slot(wait).ok_or_else(|| {
            tracing::warn!(
                plugin = %self.label,
                "every sandbox stayed busy for {} ms; call refused (load, not a fault)",
                wait.as_millis()
            );
            PluginError::Busy {
                plugin: self.label.clone(),
                sandboxes: self.engine.sandboxes(),
                waited: wait,
            }
        })
    }

    /// A fresh store with every limit set.
    fn store(&self) -> Store<PluginState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(MAX_INSTANCES)
            .tables(MAX_INSTANCES)
            .memories(MAX_INSTANCES)
            .trap_on_grow_failure(true)
            .build();
        let state = PluginState::new(
            &self.label,
            SandboxLimiter::new(limits),
            self.limits.memory_bytes,
            Arc::clone(&self.log),
        );
        let mut store = Store::new(self.engine.engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(PluginEngine::ticks(self.limits.deadline));
        store.epoch_deadline_trap();
        store
    }

    /// Times `map-emr` alone on a fresh instance (instantiation and
    /// teardown excluded), for benchmarks.
    ///
    /// # Errors
    /// A fault or rejection, as [`LoadedPlugin::map_emr`].
    pub fn time_map_emr_call(&self, record: &[RawField]) -> Result<Duration, PluginError> {
        let _slot = self.slot()?;
        let mut store = self.store();
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.fault(e, Duration::ZERO, store.data().limit_hit(), true))?;
        let started = Instant::now();
        let answer = bindings
            .call_map_emr(&mut store, record)
            .map_err(|e| self.fault(e, started.elapsed(), store.data().limit_hit(), false))?;
        let took = started.elapsed();
        answer.map_err(|e| self.rejected(e))?;
        Ok(took)
    }

    /// Instantiates only (for benchmarks): a fresh store and instance.
    ///
    /// # Errors
    /// A fault if instantiation fails.
    pub fn instantiate_only(&self) -> Result<(), PluginError> {
        let _slot = self.slot()?;
        let mut store = self.store();
        self.pre
            .instantiate(&mut store)
            .map(drop)
            .map_err(|e| self.fault(e, Duration::ZERO, store.data().limit_hit(), true))
    }

    /// Runs `f` against a fresh instance, classifying failures and counting
    /// faults.
    fn call<R>(
        &self,
        f: impl FnOnce(&Preprocessor, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let faults = self.consecutive_faults.load(Ordering::Relaxed);
        if faults >= self.limits.fault_threshold {
            return Err(PluginError::Quarantined {
                plugin: self.label.clone(),
                faults,
            });
        }
        // Declared before the store, so dropped after it: the slot is free
        // again only once the instance is gone.
        let _slot = self.slot()?;
        let started = Instant::now();
        let mut store = self.store();
        let result = match self.pre.instantiate(&mut store) {
            Ok(bindings) => f(&bindings, &mut store).map_err(|e| (e, false)),
            Err(e) => Err((e, true)),
        };
        store.data_mut().flush_stdio();
        match result {
            Ok(value) => {
                self.consecutive_faults.store(0, Ordering::Relaxed);
                Ok(value)
            }
            Err((e, instantiating)) => Err(self.fault(
                e,
                started.elapsed(),
                store.data().limit_hit(),
                instantiating,
            )),
        }
    }

    /// Records a fault and turns a wasmtime error into its cause: the limit
    /// the store recorded, else the trap code, else (instantiation, or a
    /// host call's error) the root message.
    fn fault(
        &self,
        error: wasmtime::Error,
        elapsed: Duration,
        hit: Option<LimitHit>,
        instantiating: bool,
    ) -> PluginError {
        let faults = self.consecutive_faults.fetch_add(1, Ordering::Relaxed) + 1;
        // The root cause, not the whole chain: the chain carries a wasm
        // backtrace that says nothing to an operator.
        let root = || {
            error
                .root_cause()
                .to_string()
                .chars()
                .take(MAX_TEXT)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
        };
        let cause = match (hit, error.downcast_ref::<Trap>()) {
            // A full stdout/stderr makes the guest's writes fail, and Rust's
            // print macros then panic: the flood is the cause.
            (Some(LimitHit::Stdio), _) => FaultCause::StdioLimit {
                limit: super::bindings::MAX_STDIO_BYTES,
            },
            (Some(LimitHit::Memory), _) => FaultCause::MemoryLimit {
                limit: self.limits.memory_bytes,
            },
            (Some(LimitHit::Table), _) => FaultCause::TableLimit {
                limit: MAX_TABLE_ELEMENTS,
            },
            (Some(LimitHit::RandomBytes { requested }), _) => FaultCause::HostCallLimit(format!(
                "asked for {requested} random bytes (at most {MAX_RANDOM_BYTES} per call)"
            )),
            (None, Some(Trap::Interrupt)) => FaultCause::Timeout(self.limits.deadline),
            (None, Some(Trap::StackOverflow)) => FaultCause::StackOverflow,
            (None, Some(Trap::UnreachableCodeReached)) => {
                FaultCause::Trap("panicked (wasm `unreachable` executed)".to_owned())
            }
            (None, Some(trap)) => FaultCause::Trap(trap.to_string()),
            (None, None) if instantiating => FaultCause::Instantiation(root()),
            (None, None) => FaultCause::Trap(root()),
        };
        tracing::warn!(
            plugin = %self.label,
            faults,
            elapsed_ms = elapsed.as_millis() as u64,
            "plugin fault: {cause}"
        );
        PluginError::Fault {
            plugin: self.label.clone(),
            cause,
        }
    }

    fn malformed(&self, what: String) -> PluginError {
        self.consecutive_faults.fetch_add(1, Ordering::Relaxed);
        PluginError::Fault {
            plugin: self.label.clone(),
            cause: FaultCause::MalformedOutput(what),
        }
    }

    fn rejected(&self, error: GuestError) -> PluginError {
        PluginError::Rejected {
            plugin: self.label.clone(),
            field: error.field.map(|f| truncate(&f)),
            message: truncate(&error.message),
        }
    }

    /// `map-emr`: the site's record → canonical features.
    ///
    /// # Errors
    /// [`PluginError::Rejected`] when the plugin refuses the record, a
    /// fault otherwise.
    pub fn map_emr(&self, record: &[RawField]) -> Result<Vec<Feature>, PluginError> {
        let answer = self.call(|bindings, store| bindings.call_map_emr(store, record))?;
        let features = answer.map_err(|e| self.rejected(e))?;
        if features.len() > MAX_FEATURES {
            return Err(self.malformed(format!(
                "{} features (at most {MAX_FEATURES})",
                features.len()
            )));
        }
        for feature in &features {
            if feature.name.is_empty() || feature.name.len() > 64 {
                return Err(self.malformed("a feature name is empty or too long".to_owned()));
            }
            if feature.value.is_some_and(|v| !v.is_finite()) {
                return Err(self.malformed(format!("{} is not a finite number", feature.name)));
            }
        }
        Ok(features)
    }

    /// `preprocess-image`: keep the canonical image or replace it.
    ///
    /// # Errors
    /// [`PluginError::Rejected`] when the plugin refuses the image, a fault
    /// otherwise (including a replacement of the wrong size or with values
    /// outside [0, 1]).
    pub fn preprocess_image(
        &self,
        frame: &Frame,
        pixels: &PixelsData,
    ) -> Result<ImageDecision, PluginError> {
        let answer = self.call(|bindings, store| {
            let lent = store.data_mut().lend_pixels(pixels.clone())?;
            bindings.call_preprocess_image(store, frame, lent)
        })?;
        let decision = answer.map_err(|e| self.rejected(e))?;
        if let ImageDecision::Replace(image) = &decision {
            let expected = frame.size as usize * frame.size as usize;
            if image.len() != expected {
                return Err(self.malformed(format!(
                    "replacement image has {} values, expected {expected}",
                    image.len()
                )));
            }
            if image.iter().any(|v| !(0.0..=1.0).contains(v)) {
                return Err(
                    self.malformed("replacement image has values outside [0, 1]".to_owned())
                );
            }
        }
        Ok(decision)
    }
}

/// Refuses forbidden or unknown imports and unsupported interface versions.
fn check_imports(label: &str, imports: &[String]) -> Result<(), PluginError> {
    for import in imports {
        if let Some((_, why)) = FORBIDDEN_WASI
            .iter()
            .find(|(prefix, _)| import.starts_with(prefix))
        {
            return Err(PluginError::ForbiddenImport {
                plugin: label.to_owned(),
                import: import.clone(),
                why,
            });
        }
        if let Some(rest) = import.strip_prefix(INTERFACE_PACKAGE) {
            let version = rest
                .rsplit_once('@')
                .map(|(_, v)| v)
                .unwrap_or("unversioned");
            if version != INTERFACE_VERSION {
                return Err(PluginError::UnsupportedInterface {
                    plugin: label.to_owned(),
                    found: truncate(version),
                    supported: INTERFACE_VERSION,
                });
            }
            continue;
        }
        let interface = import.split_once('@').map_or(import.as_str(), |(i, _)| i);
        if !LINKED_WASI.contains(&interface) {
            return Err(PluginError::ForbiddenImport {
                plugin: label.to_owned(),
                import: import.clone(),
                why: "only oxbox:plugin/host and an empty WASI environment are provided",
            });
        }
    }
    Ok(())
}

fn check_text(label: &str, what: &str, text: &str) -> Result<(), PluginError> {
    if text.is_empty() || text.len() > 64 || text.chars().any(char::is_control) {
        return Err(PluginError::Fault {
            plugin: label.to_owned(),
            cause: FaultCause::MalformedOutput(format!("describe() gave an unusable {what}")),
        });
    }
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars()
        .take(MAX_TEXT)
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_screened() {
        let ok = vec![
            "oxbox:plugin/types@0.1.0".to_owned(),
            "oxbox:plugin/host@0.1.0".to_owned(),
            "wasi:cli/environment@0.2.3".to_owned(),
            "wasi:io/streams@0.2.3".to_owned(),
        ];
        assert!(check_imports("p", &ok).is_ok());
        let fs = vec!["wasi:filesystem/types@0.2.3".to_owned()];
        let err = check_imports("p", &fs).expect_err("filesystem refused");
        assert!(err.to_string().contains("no filesystem"), "{err}");
        let net = vec!["wasi:sockets/tcp@0.2.3".to_owned()];
        assert!(
            check_imports("p", &net)
                .expect_err("sockets")
                .to_string()
                .contains("no network")
        );
        let version = vec!["oxbox:plugin/host@0.2.0".to_owned()];
        let err = check_imports("p", &version).expect_err("version");
        assert!(err.to_string().contains("oxbox:plugin@0.2.0"), "{err}");
        assert!(err.to_string().contains("oxbox:plugin@0.1.0"), "{err}");
        let other = vec!["acme:spy/exfiltrate@1.0.0".to_owned()];
        assert!(check_imports("p", &other).is_err());
    }
}
