//! The plugin interface as Rust types (`bindgen!` over `wit/`), the per-call
//! store state, and the host side of the plugin interface: the `pixels`
//! resource (rows converted lazily from the decoded frame) and `log`
//! (length checked before anything is copied, escaped, capped per call and
//! per minute, prefixed with the plugin's name).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable, WasmStr};
use wasmtime::{ResourceLimiter, StoreContextMut, StoreLimits};
use wasmtime_wasi::p2::pipe::ClosedInputStream;
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::wasi::{Capture, SeededRandom};
use crate::dicom::{DecodedFrame, Samples};

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

/// The host side of a `pixels` resource: frame 1 as decoded (shared, not
/// copied, between the plugins of a request) and the rule that turns its
/// samples into modality values (stored × slope + intercept). Rows are
/// converted only when a plugin reads them, so a plugin that reads nothing
/// costs nothing, and one that reads everything costs one `read-rows`
/// answer at a time (at most [`MAX_ROWS_PER_READ`] rows).
#[derive(Debug, Clone)]
pub struct PixelsData {
    frame: Arc<DecodedFrame<'static>>,
    slope: f64,
    intercept: f64,
}

impl PixelsData {
    /// The frame's pixels as modality values `stored × slope + intercept`.
    pub fn new(frame: Arc<DecodedFrame<'static>>, slope: f64, intercept: f64) -> Self {
        Self {
            frame,
            slope,
            intercept,
        }
    }

    /// Rows of the frame.
    pub fn rows(&self) -> u32 {
        self.frame.rows
    }

    /// Columns of the frame.
    pub fn columns(&self) -> u32 {
        self.frame.columns
    }

    /// Bytes the host holds for these pixels (the decoded samples).
    pub fn held_bytes(&self) -> usize {
        match &self.frame.samples {
            Samples::U8(s) => s.len(),
            Samples::U16(s) => s.len() * 2,
            Samples::Stored(s) => s.len() * 4,
        }
    }

    /// The sample range of `count` rows (at most [`MAX_ROWS_PER_READ`])
    /// from row `first`, clipped to the frame.
    fn row_range(&self, first: u32, count: u32) -> std::ops::Range<usize> {
        let frame = &*self.frame;
        let columns = frame.columns as usize;
        let start = first.min(frame.rows) as usize * columns;
        let end = first
            .saturating_add(count.min(MAX_ROWS_PER_READ))
            .min(frame.rows) as usize
            * columns;
        start..end
    }

    /// `count` rows (at most [`MAX_ROWS_PER_READ`]) from row `first` as
    /// modality values, row-major; rows past the last one are not returned.
    pub fn read_rows(&self, first: u32, count: u32) -> Vec<f32> {
        let frame = &*self.frame;
        let std::ops::Range { start, end } = self.row_range(first, count);
        let modality = |stored: i64| (stored as f64 * self.slope + self.intercept) as f32;
        match &frame.samples {
            Samples::U8(s) => s
                .get(start..end)
                .unwrap_or_default()
                .iter()
                .map(|&v| modality(frame.bits.stored(v.into())))
                .collect(),
            Samples::U16(s) => s
                .get(start..end)
                .unwrap_or_default()
                .iter()
                .map(|&v| modality(frame.bits.stored(v.into())))
                .collect(),
            Samples::Stored(s) => s
                .get(start..end)
                .unwrap_or_default()
                .iter()
                .map(|&v| modality(i64::from(v)))
                .collect(),
        }
    }
}

/// Longest log message kept from a plugin, in bytes; the rest is cut.
pub const MAX_LOG_MESSAGE: usize = 1024;
/// Most `log` messages kept per call; later ones are dropped, and counted
/// in one warning at the end of the call. (stdout and stderr add at most
/// one line each per call.)
pub const MAX_LOG_MESSAGES: u32 = 64;
/// Most log lines kept per plugin per minute, across all its calls; later
/// ones are dropped until the minute is over, and counted in one warning.
pub const MAX_LOG_LINES_PER_MINUTE: u32 = 600;
/// Capacity of each of a plugin's stdout and stderr per call. Writing more
/// traps the call: a plugin cannot flood the host's memory or log.
pub const MAX_STDIO_BYTES: usize = 64 * 1024;
/// Host resources (streams, pollables, pixels) one call may hold at once
/// (wasmtime's default is 1,000,000): a Rust plugin uses a handful.
pub const MAX_RESOURCES: usize = 1024;

/// Which limit a call hit, recorded where it is enforced (the resource
/// limiter, the stdio capture, the random generator) so that faults are
/// classified by cause, not by wasmtime's message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// Linear memory growth past the cap.
    Memory,
    /// Table growth past the cap.
    Table,
    /// stdout or stderr past [`MAX_STDIO_BYTES`].
    Stdio,
    /// `get-random-bytes` past the per-call maximum.
    RandomBytes {
        /// Bytes asked for.
        requested: u64,
    },
}

/// The store's resource limiter: wasmtime's [`StoreLimits`] (memory, table
/// elements, instances, tables, memories), recording which growth limit
/// was hit.
pub struct SandboxLimiter {
    inner: StoreLimits,
    hit: Option<LimitHit>,
}

impl SandboxLimiter {
    /// Wraps `limits` (built with `trap_on_grow_failure`).
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            inner: limits,
            hit: None,
        }
    }

    fn record(&mut self, hit: LimitHit, allowed: &wasmtime::Result<bool>) {
        if !matches!(allowed, Ok(true)) {
            self.hit.get_or_insert(hit);
        }
    }
}

impl ResourceLimiter for SandboxLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum);
        self.record(LimitHit::Memory, &allowed);
        allowed
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.hit.get_or_insert(LimitHit::Memory);
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.table_growing(current, desired, maximum);
        self.record(LimitHit::Table, &allowed);
        allowed
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.hit.get_or_insert(LimitHit::Table);
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// A plugin's log budget, shared by all its calls: at most
/// [`MAX_LOG_LINES_PER_MINUTE`] lines per minute.
#[derive(Debug)]
pub struct LogBudget {
    window: Mutex<LogWindow>,
}

#[derive(Debug)]
struct LogWindow {
    started: Instant,
    lines: u32,
    dropped: u64,
    emitted_total: u64,
    dropped_total: u64,
}

/// Lines a plugin's log budget let through and dropped so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCounts {
    /// Lines written to the host log.
    pub emitted: u64,
    /// Lines dropped by the per-minute limit.
    pub dropped: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            window: Mutex::new(LogWindow {
                started: Instant::now(),
                lines: 0,
                dropped: 0,
                emitted_total: 0,
                dropped_total: 0,
            }),
        }
    }
}

impl LogBudget {
    const WINDOW: Duration = Duration::from_secs(60);

    /// Whether one more line of `plugin` may be written now. The first
    /// line dropped in a minute says so once; the next minute's first line
    /// is preceded by the count of lines dropped.
    fn admit(&self, plugin: &str) -> bool {
        let mut w = match self.window.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if w.started.elapsed() >= Self::WINDOW {
            if w.dropped > 0 {
                tracing::warn!(
                    %plugin,
                    "dropped {} log lines over the limit of {MAX_LOG_LINES_PER_MINUTE} per minute",
                    w.dropped
                );
            }
            w.started = Instant::now();
            w.lines = 0;
            w.dropped = 0;
        }
        if w.lines < MAX_LOG_LINES_PER_MINUTE {
            w.lines += 1;
            w.emitted_total += 1;
            return true;
        }
        if w.dropped == 0 {
            tracing::warn!(
                %plugin,
                "log limit of {MAX_LOG_LINES_PER_MINUTE} lines per minute reached; dropping lines until the minute is over"
            );
        }
        w.dropped += 1;
        w.dropped_total += 1;
        false
    }

    /// Lines let through and dropped so far.
    pub fn counts(&self) -> LogCounts {
        let w = match self.window.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        LogCounts {
            emitted: w.emitted_total,
            dropped: w.dropped_total,
        }
    }
}

/// `text` made safe for a one-line log record: newlines, control
/// characters (ANSI escapes included) and other unprintable characters
/// are escaped (`\n`, `\u{1b}`), so a plugin cannot forge log lines or
/// drive a terminal.
pub fn escape(text: &str) -> String {
    text.escape_debug().to_string()
}

/// Everything one call's `Store` holds.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory, table and instance limits, enforced by wasmtime.
    pub limiter: SandboxLimiter,
    random: SeededRandom,
    /// "name version", for log lines.
    plugin: String,
    budget: Arc<LogBudget>,
    logged: u32,
    dropped: u32,
    stdout: Capture,
    stderr: Capture,
    memory_bytes: usize,
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
    /// A fresh, empty sandbox for one call of `plugin`, logging against
    /// the plugin's `budget`.
    /// `memory_bytes` is the call's linear-memory cap: no host answer
    /// larger than it is built (it could not be handed over anyway).
    pub fn new(
        plugin: &str,
        limiter: SandboxLimiter,
        memory_bytes: usize,
        budget: Arc<LogBudget>,
    ) -> Self {
        let stdout = Capture::new(MAX_STDIO_BYTES);
        let stderr = Capture::new(MAX_STDIO_BYTES);
        // No preopens, no environment, no arguments, no network, no clock,
        // a closed stdin. (Randomness is linked from `SeededRandom`.)
        let wasi = WasiCtxBuilder::new()
            .stdin(ClosedInputStream)
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .insecure_random_seed(0)
            .max_random_size(super::wasi::MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            wasi,
            table,
            limiter,
            random: SeededRandom::new(),
            plugin: plugin.to_owned(),
            budget,
            logged: 0,
            dropped: 0,
            stdout,
            stderr,
            memory_bytes,
        }
    }

    /// The limit the call hit, if any.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        if self.stdout.overflowed() || self.stderr.overflowed() {
            return Some(LimitHit::Stdio);
        }
        self.limiter.hit.or(self.random.refused)
    }

    pub(super) fn table_mut(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    pub(super) fn random_mut(&mut self) -> &mut SeededRandom {
        &mut self.random
    }

    /// Whether another `log` message may be written for this call
    /// (per-call and per-minute caps); counts the message either way.
    fn admit_message(&mut self) -> bool {
        if self.logged >= MAX_LOG_MESSAGES {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        self.logged += 1;
        self.budget.admit(&self.plugin)
    }

    /// Routes what the plugin printed to the host log (escaped, capped, one
    /// line per stream, within the per-minute budget), and reports messages
    /// dropped by the per-call cap.
    pub fn flush_stdio(&mut self) {
        for stream in ["stdout", "stderr"] {
            let bytes = match stream {
                "stdout" => self.stdout.contents(),
                _ => self.stderr.contents(),
            };
            if bytes.is_empty() || !self.budget.admit(&self.plugin) {
                continue;
            }
            let cut = &bytes[..bytes.len().min(MAX_LOG_MESSAGE * 4)];
            let text = escape(&String::from_utf8_lossy(cut));
            tracing::info!(plugin = %self.plugin, stream, "{text}");
        }
        if self.dropped > 0 {
            tracing::warn!(
                plugin = %self.plugin,
                "dropped {} log lines over the limit of {MAX_LOG_MESSAGES} per call",
                self.dropped
            );
        }
    }

    /// Makes `pixels` available to the plugin for this call.
    ///
    /// # Errors
    /// If the resource table is full (it never is: one resource per call).
    pub fn lend_pixels(&mut self, pixels: PixelsData) -> wasmtime::Result<Resource<PixelsData>> {
        Ok(self.table.push(pixels)?)
    }

    /// `log`: the message is a [`WasmStr`] (a bounds-checked pointer and
    /// length into the guest's memory): nothing is read when the call is
    /// over its line cap; otherwise the text is borrowed in place (UTF-8,
    /// validated, not copied) and only its first [`MAX_LOG_MESSAGE`] bytes
    /// are copied, escaped.
    fn log(
        mut store: StoreContextMut<'_, PluginState>,
        level: Level,
        message: &WasmStr,
    ) -> wasmtime::Result<()> {
        if !store.data_mut().admit_message() {
            return Ok(());
        }
        let text = {
            let whole = message.to_str(&store)?;
            escape(truncate(&whole, MAX_LOG_MESSAGE))
        };
        let plugin = &store.data().plugin;
        match level {
            Level::Debug => tracing::debug!(%plugin, "{text}"),
            Level::Info => tracing::info!(%plugin, "{text}"),
            Level::Warn => tracing::warn!(%plugin, "{text}"),
            Level::Error => tracing::error!(%plugin, "{text}"),
        }
        Ok(())
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

/// Links the plugin interface's imports: the `pixels` resource, and `log`
/// defined by hand so that its string is checked before it is read.
///
/// # Errors
/// If wasmtime refuses a definition (a bug).
pub(super) fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    oxbox::plugin::types::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)?;
    let host = format!(
        "{}/host@{}",
        super::INTERFACE_PACKAGE,
        super::INTERFACE_VERSION
    );
    linker.instance(&host)?.func_wrap(
        "log",
        |store: StoreContextMut<'_, PluginState>, (level, message): (Level, WasmStr)| {
            PluginState::log(store, level, &message)
        },
    )?;
    Ok(())
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
        // An answer the plugin's memory cannot hold is refused before the
        // host builds it.
        let values = data.row_range(first, count).len();
        if values.saturating_mul(4) > self.memory_bytes {
            self.limiter.hit.get_or_insert(LimitHit::Memory);
            wasmtime::bail!("read-rows answer of {values} values exceeds the memory cap");
        }
        Ok(data.read_rows(first, count))
    }

    fn drop(&mut self, pixels: Resource<PixelsData>) -> wasmtime::Result<()> {
        self.table.delete(pixels)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::StoredBits;
    use std::borrow::Cow;

    #[test]
    fn escaping_keeps_a_message_on_one_line() {
        let forged = "ok\n2026-01-01T00:00:00Z  INFO oxbox: forged\r\u{1b}[31mred\u{2028}";
        let escaped = escape(forged);
        assert!(!escaped.chars().any(char::is_control), "{escaped}");
        assert!(escaped.contains("\\n2026"), "{escaped}");
        assert!(escaped.contains("\\u{1b}[31m"), "{escaped}");
        assert!(!escaped.contains('\u{2028}'), "{escaped}");
    }

    #[test]
    fn rows_are_converted_lazily_and_bounded() {
        let frame = DecodedFrame {
            rows: 3,
            columns: 2,
            samples: Samples::U16(Cow::Owned(vec![0, 1, 2, 3, 4, 0xFFFF])),
            bits: StoredBits::width(16, true),
        };
        let pixels = PixelsData::new(Arc::new(frame), 2.0, -1.0);
        assert_eq!(pixels.read_rows(1, 1), vec![3.0, 5.0]);
        assert_eq!(pixels.read_rows(2, 5), vec![7.0, -3.0]);
        assert!(pixels.read_rows(3, 1).is_empty());
        assert!(pixels.read_rows(u32::MAX, u32::MAX).is_empty());
        assert_eq!(pixels.read_rows(0, 3).len(), 6);
        assert_eq!(pixels.held_bytes(), 12);
    }

    #[test]
    fn the_log_budget_caps_lines_per_minute() {
        let budget = LogBudget::default();
        let admitted = (0..MAX_LOG_LINES_PER_MINUTE + 10)
            .filter(|_| budget.admit("p"))
            .count();
        assert_eq!(admitted, MAX_LOG_LINES_PER_MINUTE as usize);
        assert_eq!(budget.counts().dropped, 10);
    }
}
