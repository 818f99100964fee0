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
//! input, and so is a `map-emr` value outside EMR schema v1's plausible
//! range; a trap, timeout, exceeded limit or malformed result (a feature
//! name the schema does not know, a feature given twice) is a fault,
//! classified by the limit the store recorded (not by wasmtime's message
//! text) and counted: after `fault_threshold` consecutive faults the plugin
//! is quarantined until the plugin set is reloaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use oxbox_emr_schema::FeatureSpec;
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
        answer.map_err(|e| self.rejected(e, |f| is_record_field(record, f)))?;
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
        // A call that returns is not yet a success: its answer is checked
        // by the hook's caller, which settles the count ([`Self::settle`]).
        match result {
            Ok(value) => Ok(value),
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
        self.log_fault(faults, &cause, Some(elapsed));
        PluginError::Fault {
            plugin: self.label.clone(),
            cause,
        }
    }

    /// Ends the count of consecutive faults unless `result` is one: an
    /// answer that passed the host's checks, or a refusal of the input, is
    /// the plugin working.
    fn settle<T>(&self, result: &Result<T, PluginError>) {
        if !matches!(result, Err(PluginError::Fault { .. })) {
            self.consecutive_faults.store(0, Ordering::Relaxed);
        }
    }

    fn malformed(&self, what: String) -> PluginError {
        let faults = self.consecutive_faults.fetch_add(1, Ordering::Relaxed) + 1;
        let cause = FaultCause::MalformedOutput(what);
        self.log_fault(faults, &cause, None);
        PluginError::Fault {
            plugin: self.label.clone(),
            cause,
        }
    }

    /// Logs a fault: at debug while it is one of a run below the threshold
    /// (the caller — the server, with its request id, or the command line —
    /// reports the failure itself), at warn when it is the one that
    /// quarantines the plugin.
    fn log_fault(&self, faults: u32, cause: &FaultCause, elapsed: Option<Duration>) {
        let elapsed_ms = elapsed.map(|e| e.as_millis() as u64);
        if faults == self.limits.fault_threshold {
            tracing::warn!(
                plugin = %self.label,
                faults,
                elapsed_ms,
                "plugin quarantined after {faults} consecutive faults (until reload); the last: {cause}"
            );
        } else {
            tracing::debug!(plugin = %self.label, faults, elapsed_ms, "plugin fault: {cause}");
        }
    }

    /// A guest's `plugin-error` as a rejection. The `field` it names is
    /// kept as the field only when `is_field` recognises it (a column of the
    /// record, a schema feature, an image attribute): that name is what
    /// logs and audit records may carry. Anything else the plugin put there
    /// is its own text, which may hold a value, so it moves into the
    /// message, which only the caller sees.
    fn rejected(&self, error: GuestError, is_field: impl Fn(&str) -> bool) -> PluginError {
        let message = truncate(&error.message);
        match error.field {
            Some(field) if is_field(&field) => PluginError::Rejected {
                plugin: self.label.clone(),
                field: Some(truncate(&field)),
                message,
            },
            Some(text) => PluginError::Rejected {
                plugin: self.label.clone(),
                field: None,
                message: truncate(&format!("{text}: {message}")),
            },
            None => PluginError::Rejected {
                plugin: self.label.clone(),
                field: None,
                message,
            },
        }
    }

    /// `map-emr`: the site's record → canonical features, checked against
    /// EMR schema v1: every name a schema feature, none twice, every value
    /// finite and within the schema's plausible range.
    ///
    /// # Errors
    /// [`PluginError::Rejected`] when the plugin refuses the record,
    /// [`PluginError::Implausible`] when it returns a value outside the
    /// schema's range (the input's fault), a fault otherwise — including a
    /// feature the schema does not know (named, with the nearest schema
    /// name when one is close) or one given twice.
    pub fn map_emr(&self, record: &[RawField]) -> Result<Vec<Feature>, PluginError> {
        let answer = self.call(|bindings, store| bindings.call_map_emr(store, record))?;
        let result = answer
            .map_err(|e| self.rejected(e, |f| is_record_field(record, f)))
            .and_then(|features| self.check_features(features));
        self.settle(&result);
        result
    }

    /// The host's checks of a `map-emr` answer (see [`Self::map_emr`]).
    fn check_features(&self, features: Vec<Feature>) -> Result<Vec<Feature>, PluginError> {
        if features.len() > MAX_FEATURES {
            return Err(self.malformed(format!(
                "{} features (at most {MAX_FEATURES})",
                features.len()
            )));
        }
        let mut specs = Vec::with_capacity(features.len());
        for feature in &features {
            if feature.name.is_empty() || feature.name.len() > 64 {
                return Err(self.malformed("a feature name is empty or too long".to_owned()));
            }
            let spec = check_feature_name(&feature.name).map_err(|what| self.malformed(what))?;
            if specs.iter().any(|s: &&FeatureSpec| s.name == spec.name) {
                return Err(self.malformed(format!("feature {:?} given twice", spec.name)));
            }
            if feature.value.is_some_and(|v| !v.is_finite()) {
                return Err(self.malformed(format!("{} is not a finite number", spec.name)));
            }
            specs.push(spec);
        }
        // Names first: a plugin bug is reported as one even when the value
        // is also wrong. A value outside the schema's range is the input's
        // fault (the plugin passed on what it was given): a refusal of the
        // case, never counted towards quarantine, so hostile input cannot
        // take a healthy plugin out of service.
        for (feature, spec) in features.iter().zip(&specs) {
            if let Some(value) = feature.value {
                oxbox_emr_schema::check(spec, value).map_err(|e| PluginError::Implausible {
                    plugin: self.label.clone(),
                    feature: spec.name.to_owned(),
                    reason: implausible_reason(spec, &e),
                })?;
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
        let result = answer
            .map_err(|e| self.rejected(e, is_image_field))
            .and_then(|decision| self.check_decision(frame, decision));
        self.settle(&result);
        result
    }

    /// The host's checks of a `preprocess-image` answer.
    fn check_decision(
        &self,
        frame: &Frame,
        decision: ImageDecision,
    ) -> Result<ImageDecision, PluginError> {
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

/// The schema v1 spec of a feature a plugin returned, or why the name is
/// not one: the text names the feature and, where a schema name is a small
/// edit away (a typo, another case), suggests it.
///
/// # Errors
/// The malformed-output text.
fn check_feature_name(name: &str) -> Result<&'static FeatureSpec, String> {
    oxbox_emr_schema::feature(name).ok_or_else(|| {
        let mut what = format!(
            "feature {name:?} is not in EMR schema v{}",
            oxbox_emr_schema::SCHEMA_VERSION
        );
        if let Some(near) = nearest_feature(name) {
            what.push_str(&format!(" (did you mean {near:?}?)"));
        }
        what.push_str("; plugins/README.md lists the schema's features");
        what
    })
}

/// The schema feature closest to `name` in edit distance (ASCII case
/// ignored), if within [`SUGGESTION_DISTANCE`].
fn nearest_feature(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    oxbox_emr_schema::FEATURES
        .iter()
        .map(|f| (edit_distance(&name, f.name), f.name))
        .filter(|(d, _)| *d <= SUGGESTION_DISTANCE)
        .min_by_key(|(d, _)| *d)
        .map(|(_, f)| f)
}

/// Largest edit distance at which an unknown feature name is taken for a
/// typo of a schema name: two edits catch a dropped, added or swapped
/// character ("spo2_pc", "sp02_pct", "temperature") without pairing
/// unrelated names (a lab outside the schema, "il6_pg_ml", is 5 from the
/// nearest); the nearest wins (the closest two schema names,
/// systolic/diastolic, are 3 apart).
const SUGGESTION_DISTANCE: usize = 2;

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Why a value fails the schema's check, without the value: the range (a
/// property of the schema) or that a code must be a whole number.
fn implausible_reason(spec: &FeatureSpec, error: &oxbox_emr_schema::ValueError) -> String {
    match error {
        oxbox_emr_schema::ValueError::NotACode(_) => {
            format!("not a whole-number code ({})", spec.unit)
        }
        _ => format!(
            "outside the plausible range {}..={} {} of EMR schema v{}",
            spec.min,
            spec.max,
            spec.unit,
            oxbox_emr_schema::SCHEMA_VERSION
        ),
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

/// Whether `name` is a field of `record` or an EMR schema v1 feature: a
/// name a `map-emr` rejection may carry into logs.
fn is_record_field(record: &[RawField], name: &str) -> bool {
    record.iter().any(|f| f.name == name) || oxbox_emr_schema::feature(name).is_some()
}

/// What a `preprocess-image` rejection may name: the frame's parts and
/// attributes as the WIT interface calls them (either `-` or `_`).
fn is_image_field(name: &str) -> bool {
    const IMAGE_FIELDS: [&str; 15] = [
        "canonical",
        "pixels",
        "rows",
        "columns",
        "size",
        "modality",
        "photometric-interpretation",
        "bits-stored",
        "signed",
        "rescale-slope",
        "rescale-intercept",
        "window-center",
        "window-width",
        "presentation-lut-shape",
        "manufacturer",
    ];
    let name = name.replace('_', "-");
    IMAGE_FIELDS.contains(&name.as_str())
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
    fn unknown_features_are_named_with_the_nearest_schema_name() {
        assert_eq!(edit_distance("spo2_pc", "spo2_pct"), 1);
        assert_eq!(edit_distance("sp02_pct", "spo2_pct"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(nearest_feature("spo2_pc"), Some("spo2_pct"));
        assert_eq!(nearest_feature("CRP_MG_L"), Some("crp_mg_l"));
        assert_eq!(nearest_feature("il6_pg_ml"), None);
        assert_eq!(nearest_feature("temperature"), Some("temperature_c"));
        assert_eq!(nearest_feature("temp_c"), None);
        // The two closest schema names (3 edits apart): each typo goes to
        // the nearer one.
        assert_eq!(
            nearest_feature("sistolic_bp_mmhg"),
            Some("systolic_bp_mmhg")
        );
        assert_eq!(
            nearest_feature("diastolic_bp_mmgh"),
            Some("diastolic_bp_mmhg")
        );
        assert!(check_feature_name("spo2_pct").is_ok());
        let what = check_feature_name("spo2_pc").expect_err("typo");
        assert!(
            what.starts_with(
                "feature \"spo2_pc\" is not in EMR schema v1 (did you mean \"spo2_pct\"?)"
            ),
            "{what}"
        );
    }

    #[test]
    fn implausible_values_are_described_without_the_value() {
        let spo2 = oxbox_emr_schema::feature("spo2_pct").expect("schema");
        let error = oxbox_emr_schema::check(spo2, 917.25).expect_err("out of range");
        let reason = implausible_reason(spo2, &error);
        assert_eq!(
            reason,
            "outside the plausible range 30..=100 % of EMR schema v1"
        );
        let sex = oxbox_emr_schema::feature("sex").expect("schema");
        let error = oxbox_emr_schema::check(sex, 0.5).expect_err("not a code");
        assert!(!implausible_reason(sex, &error).contains("0.5"));
    }

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
