//! The WASI a plugin gets — the linker is the allowlist.
//!
//! Rust's standard library for `wasm32-wasip2` imports a handful of WASI
//! interfaces, so they are linked, but each one either gives nothing away
//! or returns at once:
//!
//! - `wasi:cli`: no environment, no arguments, a closed stdin, and stdout
//!   and stderr captured in memory ([`Capture`]) up to a cap;
//! - `wasi:io`: streams and pollables over those — every pollable a plugin
//!   can obtain is ready at once (a closed stdin, in-memory output, and the
//!   clock below), so `poll` and the `blocking-*` calls never wait; the two
//!   writes that take a byte list are redefined to check its length against
//!   what the stream accepts before copying it out of the guest;
//! - `wasi:clocks`: frozen at zero, and `subscribe-duration` /
//!   `subscribe-instant` return an already-ready pollable, so a plugin's
//!   `std::thread::sleep` returns at once instead of blocking inside the
//!   host where the epoch deadline cannot reach it;
//! - `wasi:random`: a fixed-seed generator ([`SeededRandom`]), the same
//!   bytes on every call (plugins are deterministic), at most
//!   [`MAX_RANDOM_BYTES`] per call.
//!
//! Everything else (`wasi:filesystem`, `wasi:sockets`, any other package) is
//! not linked: [`LINKED_WASI`] is the list the import check uses, and the
//! linker refuses whatever is not in it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use wasmtime::StoreContextMut;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable, WasmList};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksCtxView, WasiClocksView};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::io::streams::StreamError as WitStreamError;
use wasmtime_wasi::p2::bindings::random::{insecure, insecure_seed, random};
use wasmtime_wasi::p2::bindings::{cli, clocks, sync};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::p2::{DynOutputStream, DynPollable, OutputStream, Pollable, StreamError};

use super::bindings::{LimitHit, PluginState};
use crate::rng::Pcg;

/// The WASI interfaces linked into every sandbox (package/interface,
/// without version). An import of anything else is refused at load.
pub const LINKED_WASI: [&str; 18] = [
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Most bytes one `get-random-bytes` (or `get-insecure-random-bytes`) call
/// may ask for: std's hash seeds take 16; more is refused with a fault
/// rather than allocated on the host (wasmtime-wasi's default is 64 MiB).
pub const MAX_RANDOM_BYTES: u64 = 4096;

/// The `wasi:io/streams` instance wasmtime-wasi 48 links (its WIT version).
/// It must name that instance exactly: the two writes are redefined inside
/// it. (Were it to drift on a wasmtime upgrade, the shadowing would replace
/// the whole instance and every plugin would fail to link, loudly, in the
/// sandbox tests.)
const WASI_IO_STREAMS: &str = "wasi:io/streams@0.2.12";
/// Most bytes one `blocking-write-and-flush` takes (the WASI contract).
const MAX_BLOCKING_WRITE: usize = 4096;

/// The seed of every plugin call's random generator.
const RANDOM_SEED: u64 = 0x6f78_626f_782d_706c;

/// Links [`LINKED_WASI`], and nothing else, into `linker`.
///
/// # Errors
/// If wasmtime refuses a definition (a duplicate, which is a bug).
pub(super) fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    let l = linker;
    sync::io::error::add_to_linker::<PluginState, Table>(l, PluginState::table_mut)?;
    sync::io::poll::add_to_linker::<PluginState, Table>(l, PluginState::table_mut)?;
    sync::io::streams::add_to_linker::<PluginState, Table>(l, PluginState::table_mut)?;
    clocks::wall_clock::add_to_linker::<PluginState, WasiClocks>(l, PluginState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<PluginState, NeverWait>(l, never_wait)?;
    cli::environment::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::exit::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::stdin::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::stdout::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::stderr::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::terminal_input::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::terminal_output::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::terminal_stdin::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::terminal_stdout::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    cli::terminal_stderr::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
    random::add_to_linker::<PluginState, Seeded>(l, PluginState::random_mut)?;
    insecure::add_to_linker::<PluginState, Seeded>(l, PluginState::random_mut)?;
    insecure_seed::add_to_linker::<PluginState, Seeded>(l, PluginState::random_mut)?;
    add_bounded_writes(l)
}

/// Redefines `output-stream.write` and `blocking-write-and-flush` with the
/// byte list taken as a [`WasmList`] (a bounds-checked pointer and length):
/// its length is checked against the stream's permit (at most the capture's
/// remaining capacity) before any byte is copied, where wasmtime-wasi would
/// first copy the whole list (up to the plugin's memory cap) to the host.
fn add_bounded_writes(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    {
        let mut streams = linker.instance(WASI_IO_STREAMS)?;
        streams.func_wrap(
            "[method]output-stream.write",
            |store: StoreContextMut<'_, PluginState>,
             (stream, contents): (Resource<DynOutputStream>, WasmList<u8>)| {
                Ok((bounded_write(store, &stream, &contents, false)?,))
            },
        )?;
        streams.func_wrap(
            "[method]output-stream.blocking-write-and-flush",
            |store: StoreContextMut<'_, PluginState>,
             (stream, contents): (Resource<DynOutputStream>, WasmList<u8>)| {
                Ok((bounded_write(store, &stream, &contents, true)?,))
            },
        )?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// One write of `contents` to `stream`, its length checked first.
fn bounded_write(
    mut store: StoreContextMut<'_, PluginState>,
    stream: &Resource<DynOutputStream>,
    contents: &WasmList<u8>,
    blocking: bool,
) -> wasmtime::Result<Result<(), WitStreamError>> {
    let len = contents.len();
    if blocking && len > MAX_BLOCKING_WRITE {
        wasmtime::bail!(
            "buffer too large for blocking-write-and-flush ({len} bytes, at most {MAX_BLOCKING_WRITE})"
        );
    }
    let permit = match store.data_mut().table_mut().get_mut(stream)?.check_write() {
        Ok(permit) => permit,
        Err(e) => return stream_error(store.data_mut().table_mut(), e),
    };
    if len > permit {
        if blocking {
            // What fits is written; the stream is then full (closed).
            let fits = Bytes::copy_from_slice(&contents.as_le_slice(&store)[..permit]);
            let out = store.data_mut().table_mut().get_mut(stream)?;
            let result = out.write(fits).and_then(|()| out.check_write().map(drop));
            return match result {
                Ok(()) => stream_error(store.data_mut().table_mut(), StreamError::Closed),
                Err(e) => stream_error(store.data_mut().table_mut(), e),
            };
        }
        wasmtime::bail!("write of {len} bytes exceeds the stream's permit of {permit}");
    }
    let bytes = Bytes::copy_from_slice(contents.as_le_slice(&store));
    let out = store.data_mut().table_mut().get_mut(stream)?;
    let result = out
        .write(bytes)
        .and_then(|()| if blocking { out.flush() } else { Ok(()) });
    match result {
        Ok(()) => Ok(Ok(())),
        Err(e) => stream_error(store.data_mut().table_mut(), e),
    }
}

/// A stream error as the guest sees it (a trap stays a trap).
fn stream_error(
    table: &mut ResourceTable,
    error: StreamError,
) -> wasmtime::Result<Result<(), WitStreamError>> {
    match error {
        StreamError::Closed => Ok(Err(WitStreamError::Closed)),
        StreamError::LastOperationFailed(e) => {
            Ok(Err(WitStreamError::LastOperationFailed(table.push(e)?)))
        }
        StreamError::Trap(e) => Err(e),
    }
}

/// `wasi:io` over the store's resource table.
struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

/// `wasi:clocks/monotonic-clock` whose pollables never wait.
struct NeverWait;

impl HasData for NeverWait {
    type Data<'a> = NeverWaitClock<'a>;
}

fn never_wait(state: &mut PluginState) -> NeverWaitClock<'_> {
    NeverWaitClock(state.clocks())
}

/// The frozen monotonic clock, with subscriptions that are ready at once.
struct NeverWaitClock<'a>(WasiClocksCtxView<'a>);

impl monotonic_clock::Host for NeverWaitClock<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        monotonic_clock::Host::now(&mut self.0)
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        monotonic_clock::Host::resolution(&mut self.0)
    }

    /// Ready at once, whatever the instant: time does not pass for a plugin.
    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        monotonic_clock::Host::subscribe_duration(&mut self.0, 0)
    }

    /// Ready at once, whatever the duration (a zero duration is wasmtime's
    /// already-elapsed deadline): a sleep returns immediately.
    fn subscribe_duration(
        &mut self,
        _duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        monotonic_clock::Host::subscribe_duration(&mut self.0, 0)
    }
}

/// `wasi:random` from a fixed-seed generator.
struct Seeded;

impl HasData for Seeded {
    type Data<'a> = &'a mut SeededRandom;
}

/// One call's random generator: the same sequence for every call, so a
/// plugin's answer depends on its input only.
pub struct SeededRandom {
    rng: Pcg,
    /// A request over [`MAX_RANDOM_BYTES`], for the fault's cause.
    pub(super) refused: Option<LimitHit>,
}

impl SeededRandom {
    /// The generator every call starts with.
    pub(super) fn new() -> Self {
        Self {
            rng: Pcg::new(RANDOM_SEED, 0),
            refused: None,
        }
    }

    fn bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            self.refused = Some(LimitHit::RandomBytes { requested: len });
            wasmtime::bail!("asked for {len} random bytes (at most {MAX_RANDOM_BYTES} per call)");
        }
        let mut out = Vec::with_capacity(len as usize);
        while out.len() < len as usize {
            let word = self.rng.next_u32().to_le_bytes();
            let take = (len as usize - out.len()).min(4);
            out.extend_from_slice(&word[..take]);
        }
        Ok(out)
    }
}

impl random::Host for SeededRandom {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.bytes(len)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.rng.next_u64())
    }
}

impl insecure::Host for SeededRandom {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.bytes(len)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.rng.next_u64())
    }
}

impl insecure_seed::Host for SeededRandom {
    fn insecure_seed(&mut self) -> wasmtime::Result<(u64, u64)> {
        Ok((RANDOM_SEED, !RANDOM_SEED))
    }
}

/// A plugin's stdout or stderr for one call: kept in memory up to its
/// capacity; a write past it is refused (the guest traps) and flagged, so
/// the fault is classified without reading wasmtime's message.
#[derive(Clone)]
pub struct Capture {
    pipe: MemoryOutputPipe,
    overflowed: Arc<AtomicBool>,
}

impl Capture {
    /// An empty capture of `capacity` bytes.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            pipe: MemoryOutputPipe::new(capacity),
            overflowed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What was written.
    pub(super) fn contents(&self) -> Bytes {
        self.pipe.contents()
    }

    /// Whether a write was refused because the capture was full.
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    fn flag<T>(&self, result: Result<T, StreamError>) -> Result<T, StreamError> {
        if result.is_err() {
            self.overflowed.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 uses this, and WASIp3 is not linked.
        Box::new(self.pipe.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    /// Always ready: in-memory output never waits.
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let result = self.pipe.write(bytes);
        self.flag(result)
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.pipe.flush()
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        let result = self.pipe.check_write();
        self.flag(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_seeded_and_bounded() {
        let mut a = SeededRandom::new();
        let mut b = SeededRandom::new();
        let first = a.bytes(33).expect("33 bytes");
        assert_eq!(first.len(), 33);
        assert_eq!(first, b.bytes(33).expect("33 bytes"));
        assert_ne!(first, a.bytes(33).expect("next 33"));
        assert!(a.bytes(MAX_RANDOM_BYTES + 1).is_err());
        assert!(matches!(a.refused, Some(LimitHit::RandomBytes { .. })));
    }
}
