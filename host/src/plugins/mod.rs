//! Plugins: site knowledge as sandboxed WebAssembly components (wasmtime).
//!
//! A site plugin is a component built against `wit/oxbox-plugin.wit` plus a
//! `plugin.toml` manifest. This stage loads, checks and runs them:
//!
//! - [`manifest`]: `plugin.toml` ↔ component (sha256), optional Ed25519
//!   signature against the configured trusted keys;
//! - [`engine`]: one wasmtime `Engine` (pooling allocator, epoch
//!   interruption) and the epoch ticker thread that enforces deadlines;
//! - [`cache`]: each component compiled once, the artifact kept under the
//!   data dir, authenticated so the box only ever loads what it wrote itself;
//! - [`runtime`]: one loaded plugin — interface version and imports checked
//!   before instantiation, an `InstancePre`, a sandbox slot and a fresh
//!   `Store` per call with memory, table, resource, stack, output and time
//!   limits, faults classified by the limit hit and counted to quarantine a
//!   plugin that keeps failing (a call refused for load is not a fault);
//! - [`wasi`]: the WASI subset the linker provides — the allowlist —
//!   where nothing blocks (sleeps return at once) and randomness is seeded;
//! - [`set`]: the configured plugins in order (EMR mapping chained, the last
//!   image decision wins) and their atomic reload.
//!
//! What a plugin gets: its arguments, and `log`. No filesystem, sockets,
//! environment, arguments or clock: only the WASI interfaces std needs are
//! linked, with an empty context (frozen clocks whose pollables are ready at
//! once, a closed stdin, captured stdout/stderr, fixed-seed randomness), and
//! a component that imports anything else (`wasi:filesystem`,
//! `wasi:sockets`, …) is refused before it runs.

pub mod cache;
pub mod engine;
pub use oxbox_plugin_manifest as manifest;
pub mod record;
pub mod runtime;
pub mod set;
pub mod wasi;

mod bindings;

use std::fmt;
use std::time::Duration;

pub use bindings::{
    Feature, Frame, ImageAttributes, ImageDecision, LogCounts, MAX_LOG_LINES_PER_MINUTE,
    MAX_LOG_MESSAGE, MAX_LOG_MESSAGES, MAX_ROWS_PER_READ, MAX_STDIO_BYTES, PixelsData, RawField,
};
pub use engine::PluginEngine;
pub use manifest::{Hook, Manifest};
pub use runtime::{LoadedPlugin, PluginLimits};
pub use set::{PluginRegistry, PluginSet};

/// The plugin interface version this host implements.
pub const INTERFACE_VERSION: &str = "0.1.0";
/// The WIT package of the plugin interface.
pub const INTERFACE_PACKAGE: &str = "oxbox:plugin";

/// Why a plugin call or load failed. Every variant names the plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin's package files: `plugin.toml` malformed or disagreeing
    /// with the component, a signature missing or not verifying, a manifest
    /// or signature that cannot be read or written.
    #[error(transparent)]
    Package(#[from] manifest::ManifestError),
    /// A file (component, cache) could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The component was built for another interface version.
    #[error(
        "plugin {plugin} was built for interface {INTERFACE_PACKAGE}@{found}; this host supports {INTERFACE_PACKAGE}@{supported}"
    )]
    UnsupportedInterface {
        /// The plugin.
        plugin: String,
        /// The version it imports.
        found: String,
        /// The version this host implements.
        supported: &'static str,
    },
    /// The component imports something the sandbox does not provide.
    #[error("plugin {plugin} imports {import}, which the sandbox does not provide: {why}")]
    ForbiddenImport {
        /// The plugin.
        plugin: String,
        /// The import name.
        import: String,
        /// Why it is not provided.
        why: &'static str,
    },
    /// The bytes are not a valid component, or do not fit the interface.
    #[error("plugin {plugin}: not a valid oxbox plugin component: {reason}")]
    Invalid {
        /// The plugin (or file name).
        plugin: String,
        /// What wasmtime said.
        reason: String,
    },
    /// The plugin rejected the input (a guest `plugin-error`): HTTP 422.
    #[error("plugin {plugin} rejected the input{}: {message}", field.as_deref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Rejected {
        /// "name version".
        plugin: String,
        /// The field at fault, if the plugin named one.
        field: Option<String>,
        /// The plugin's message (capped in length).
        message: String,
    },
    /// The plugin returned a value outside EMR schema v1's plausible range
    /// for a feature (or a code that is not a whole number): the input's
    /// fault — the plugin passed on what the record held — so HTTP 422, and
    /// never counted towards quarantine. Names the feature, never the value.
    #[error(
        "plugin {plugin} mapped the record to an implausible {feature}: {reason} (the value is not shown)"
    )]
    Implausible {
        /// "name version".
        plugin: String,
        /// The canonical feature.
        feature: String,
        /// Why, in the host's words (the range, never the value).
        reason: String,
    },
    /// The plugin failed: trap, timeout, limit, malformed output: HTTP 500.
    #[error("plugin {plugin} failed: {cause}")]
    Fault {
        /// "name version".
        plugin: String,
        /// What happened.
        cause: FaultCause,
    },
    /// Every sandbox slot stayed busy for the call's whole wait: the box is
    /// overloaded (HTTP 503 with Retry-After). Not the plugin's fault: it
    /// never counts towards quarantine.
    #[error(
        "plugin {plugin}: all {sandboxes} sandboxes stayed busy for {} ms; retry shortly",
        waited.as_millis()
    )]
    Busy {
        /// "name version".
        plugin: String,
        /// Sandbox slots in the pool.
        sandboxes: u32,
        /// How long the call waited for a slot.
        waited: Duration,
    },
    /// The plugin failed too often and is quarantined until reload.
    #[error("plugin {plugin} is quarantined after {faults} consecutive faults; fix it and reload")]
    Quarantined {
        /// "name version".
        plugin: String,
        /// Consecutive faults counted.
        faults: u32,
    },
}

impl PluginError {
    /// Whether the input was refused through a plugin (the plugin's own
    /// rejection, or a value it returned outside the schema's range) as
    /// opposed to the plugin failing: the HTTP layer maps this to 422.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            PluginError::Rejected { .. } | PluginError::Implausible { .. }
        )
    }

    /// Whether the error is about the input given (a record the plugin
    /// rejects, or a plugin file that is refused) rather than a failure
    /// while running: the CLI exits 2 for these, 1 otherwise.
    pub fn is_bad_input(&self) -> bool {
        if let PluginError::Package(e) = self {
            return e.is_bad_input();
        }
        matches!(
            self,
            PluginError::Rejected { .. }
                | PluginError::Implausible { .. }
                | PluginError::UnsupportedInterface { .. }
                | PluginError::ForbiddenImport { .. }
                | PluginError::Invalid { .. }
        )
    }
}

/// How a plugin call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultCause {
    /// It ran past its wall-clock deadline.
    Timeout(Duration),
    /// It tried to grow memory past the cap.
    MemoryLimit {
        /// The cap, in bytes.
        limit: usize,
    },
    /// It tried to grow a table past the cap.
    TableLimit {
        /// The cap, in elements.
        limit: usize,
    },
    /// It wrote more than the cap to stdout or stderr.
    StdioLimit {
        /// The cap per stream, in bytes.
        limit: usize,
    },
    /// It asked a host function for more than that function allows
    /// (e.g. too many random bytes).
    HostCallLimit(String),
    /// It exhausted the wasm stack (deep recursion).
    StackOverflow,
    /// It could not be instantiated (e.g. more instances, tables or
    /// memories than a sandbox holds).
    Instantiation(String),
    /// Any other trap (a panic is `unreachable`).
    Trap(String),
    /// It returned something the host does not accept.
    MalformedOutput(String),
}

impl fmt::Display for FaultCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultCause::Timeout(d) => {
                write!(f, "timed out after the {} ms deadline", d.as_millis())
            }
            FaultCause::MemoryLimit { limit } => {
                write!(
                    f,
                    "exceeded the memory limit of {} MiB",
                    limit / (1024 * 1024)
                )
            }
            FaultCause::TableLimit { limit } => {
                write!(f, "exceeded the table limit of {limit} elements")
            }
            FaultCause::StdioLimit { limit } => {
                write!(
                    f,
                    "wrote more than {} KiB to stdout or stderr",
                    limit / 1024
                )
            }
            FaultCause::HostCallLimit(what) => write!(f, "exceeded a host call limit: {what}"),
            FaultCause::StackOverflow => f.write_str("overflowed its stack (recursion too deep)"),
            FaultCause::Instantiation(why) => write!(f, "could not be instantiated: {why}"),
            FaultCause::Trap(t) => write!(f, "trapped: {t}"),
            FaultCause::MalformedOutput(m) => write!(f, "returned malformed output: {m}"),
        }
    }
}
