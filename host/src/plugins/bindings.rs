//! The plugin interface as Rust types (`bindgen!` over `wit/`), the per-call
//! store state, and the host side of the `host` interface (`log`).

use std::time::Duration;

use std::sync::Arc;

use wasmtime::StoreLimits;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

/// Generated from `wit/oxbox-plugin.wit`; the WIT's doc comments become the
/// types' docs (the world's `use` aliases have none of their own).
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "preprocessor",
        path: "../wit",
        with: { "oxbox:plugin/types.pixels": super::PixelsData },
        // Host functions may fail (a bad resource handle): as a trap.
        imports: { default: trappable },
    });
}

use generated::oxbox;
pub use generated::oxbox::plugin::host::Level;
pub use generated::oxbox::plugin::types::{
    Feature, Frame, Hook as WitHook, ImageAttributes, ImageDecision, PluginError as GuestError,
    PluginInfo, RawField,
};
pub use generated::{Preprocessor, PreprocessorPre};

/// Most rows one `read-rows` call returns.
pub const MAX_ROWS_PER_READ: u32 = 1024;

/// The host side of a `pixels` resource: frame 1's modality values,
/// shared (not copied) between the plugins of a request.
#[derive(Debug, Clone)]
pub struct PixelsData {
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub columns: u32,
    /// rows × columns modality values, row-major.
    pub values: Arc<[f32]>,
}

/// Longest log message kept from a plugin, in bytes; the rest is cut.
pub const MAX_LOG_MESSAGE: usize = 1024;
/// Most log messages kept per call; later ones are dropped (and counted).
pub const MAX_LOG_MESSAGES: u32 = 64;
/// Capacity of each of a plugin's stdout and stderr per call. Writing more
/// traps the call: a plugin cannot flood the host's memory or log.
pub const MAX_STDIO_BYTES: usize = 64 * 1024;

/// Everything one call's `Store` holds.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory, table and instance limits, enforced by wasmtime.
    pub limits: StoreLimits,
    /// "name version", for log lines.
    plugin: String,
    logged: u32,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

/// A clock that always reads zero: plugins get no time.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl PluginState {
    /// A fresh, empty sandbox for one call of `plugin`.
    pub fn new(plugin: &str, limits: StoreLimits) -> Self {
        let stdout = MemoryOutputPipe::new(MAX_STDIO_BYTES);
        let stderr = MemoryOutputPipe::new(MAX_STDIO_BYTES);
        // No preopens, no environment, no arguments, no network, no clock;
        // randomness is seeded deterministically (plugins need no secrets).
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .insecure_random_seed(0)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits,
            plugin: plugin.to_owned(),
            logged: 0,
            stdout,
            stderr,
        }
    }

    /// Whether stdout or stderr reached its capacity during the call.
    pub fn stdio_full(&self) -> bool {
        self.stdout.contents().len() >= MAX_STDIO_BYTES
            || self.stderr.contents().len() >= MAX_STDIO_BYTES
    }

    /// Routes what the plugin printed to the host log (capped, one event per
    /// stream).
    pub fn flush_stdio(&self) {
        for (stream, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let bytes = pipe.contents();
            if !bytes.is_empty() {
                let text = String::from_utf8_lossy(&bytes);
                tracing::info!(plugin = %self.plugin, stream, "{}", truncate(&text, MAX_LOG_MESSAGE * 4));
            }
        }
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginState {
    /// Makes `pixels` available to the plugin for this call.
    ///
    /// # Errors
    /// If the resource table is full (it never is: one resource per call).
    pub fn lend_pixels(&mut self, pixels: PixelsData) -> wasmtime::Result<Resource<PixelsData>> {
        Ok(self.table.push(pixels)?)
    }
}

impl oxbox::plugin::types::Host for PluginState {}

impl oxbox::plugin::types::HostPixels for PluginState {
    fn read_rows(
        &mut self,
        pixels: Resource<PixelsData>,
        first: u32,
        count: u32,
    ) -> wasmtime::Result<Vec<f32>> {
        let data = self.table.get(&pixels)?;
        let columns = data.columns as usize;
        let start = first.min(data.rows) as usize;
        let end = first
            .saturating_add(count.min(MAX_ROWS_PER_READ))
            .min(data.rows) as usize;
        Ok(data.values[start * columns..end * columns].to_vec())
    }

    fn drop(&mut self, pixels: Resource<PixelsData>) -> wasmtime::Result<()> {
        self.table.delete(pixels)?;
        Ok(())
    }
}

impl oxbox::plugin::host::Host for PluginState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.logged += 1;
        if self.logged > MAX_LOG_MESSAGES {
            if self.logged == MAX_LOG_MESSAGES + 1 {
                tracing::warn!(plugin = %self.plugin, "log limit reached; further messages dropped");
            }
            return Ok(());
        }
        let message = truncate(&message, MAX_LOG_MESSAGE);
        let plugin = &self.plugin;
        match level {
            Level::Debug => tracing::debug!(%plugin, "{message}"),
            Level::Info => tracing::info!(%plugin, "{message}"),
            Level::Warn => tracing::warn!(%plugin, "{message}"),
            Level::Error => tracing::error!(%plugin, "{message}"),
        }
        Ok(())
    }
}
