//! The wasmtime engine every plugin runs on, and the epoch ticker that turns
//! wall-clock deadlines into traps.
//!
//! Deny by default, each limit a named constant with its reason:
//! - instances come from a pooling allocator (fast per-call instantiation,
//!   and a hard bound on how many sandboxes can exist at once);
//! - every call gets a deadline counted in epoch ticks of [`EPOCH_TICK`];
//! - the wasm stack is capped ([`MAX_WASM_STACK`]) so deep recursion traps
//!   cleanly instead of touching the host's stack;
//! - linear memory is capped per store (see [`super::PluginLimits`]).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use super::PluginError;
use super::runtime::PluginLimits;

/// Epoch tick: the granularity of plugin deadlines. 5 ms keeps a 250 ms
/// deadline accurate to 2 % at negligible cost (one atomic add per tick).
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Wasm stack per call: enough for real plugins, small enough that runaway
/// recursion traps within microseconds.
pub const MAX_WASM_STACK: usize = 1024 * 1024;
/// Sandboxes that can exist at once (concurrent calls). Beyond it a call
/// fails fast instead of queueing without bound. Each reserves (not
/// commits) its memory cap plus a guard in virtual address space.
pub const MAX_CONCURRENT_SANDBOXES: u32 = 32;
/// Core wasm instances one plugin component may contain (a Rust component
/// is a handful: the module plus shims).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Guard region after each memory: out-of-bounds accesses just past the end
/// fault in hardware instead of needing a check.
const MEMORY_GUARD: u64 = 32 * 1024 * 1024;

/// The shared engine, with its ticker.
pub struct PluginEngine {
    engine: Engine,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEngine").finish_non_exhaustive()
    }
}

impl PluginEngine {
    /// Builds the engine for plugins with these limits and starts the ticker.
    ///
    /// # Errors
    /// [`PluginError::Invalid`] if wasmtime rejects the configuration.
    pub fn new(limits: &PluginLimits) -> Result<Self, PluginError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_CONCURRENT_SANDBOXES)
            .total_core_instances(MAX_CONCURRENT_SANDBOXES * MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .total_memories(MAX_CONCURRENT_SANDBOXES)
            .max_memories_per_component(1)
            .total_tables(MAX_CONCURRENT_SANDBOXES * MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memory_size(limits.memory_bytes);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .cranelift_opt_level(OptLevel::Speed)
            .memory_reservation(limits.memory_bytes as u64)
            .memory_guard_size(MEMORY_GUARD)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PluginError::Invalid {
            plugin: "<engine>".to_owned(),
            reason: format!("{e:#}"),
        })?;
        let ticker = EpochTicker::start(engine.clone()).map_err(|e| PluginError::Io {
            path: "<epoch ticker thread>".to_owned(),
            source: e,
        })?;
        Ok(Self {
            engine,
            _ticker: ticker,
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A deadline as a number of epoch ticks (at least 1).
    pub fn ticks(deadline: Duration) -> u64 {
        (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }

    /// Identifies the engine's code format: compiled artifacts are only
    /// valid for the same wasmtime version and configuration.
    pub fn compatibility_hash(&self) -> String {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: stable across runs of the same binary.
        let mut hasher = std::hash::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

/// Increments the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    /// Without the ticker no deadline would ever fire: failing to start it
    /// is an error, not a degraded mode.
    fn start(engine: Engine) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("oxbox-epoch".to_owned())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
