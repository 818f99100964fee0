//! The wasmtime engine every plugin runs on, and the epoch ticker that turns
//! wall-clock deadlines into traps.
//!
//! Deny by default, each limit a named constant with its reason:
//! - instances come from a pooling allocator (fast per-call instantiation,
//!   and a hard bound on how many sandboxes can exist at once);
//! - every call gets a deadline counted in epoch ticks of [`EPOCH_TICK`];
//! - the wasm stack is capped ([`MAX_WASM_STACK`]) so deep recursion traps
//!   cleanly instead of touching the host's stack;
//! - linear memory is capped per store (see [`super::PluginLimits`]);
//! - a call takes one of the pool's sandbox slots through a host-side gate
//!   ([`PluginEngine::slot`]), waiting at most its deadline: when every
//!   slot is busy the call is refused as load ([`super::PluginError::Busy`]),
//!   never failed inside wasmtime and counted as the plugin's fault.

use std::sync::{Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use super::PluginError;
use super::runtime::PluginLimits;

/// Epoch tick: the granularity of plugin deadlines. 5 ms keeps a 250 ms
/// deadline accurate to 2 % at negligible cost (one atomic add per tick).
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Wasm stack per call: enough for real plugins, small enough that runaway
/// recursion traps within microseconds.
pub const MAX_WASM_STACK: usize = 1024 * 1024;
/// Sandboxes that can exist at once (concurrent calls), the default of
/// [`super::PluginLimits::sandboxes`]. Beyond it a call waits for a slot
/// (at most its deadline) instead of queueing without bound. Each reserves
/// (not commits) its memory cap plus a guard in virtual address space;
/// `server.max_concurrent_requests` may not exceed it (a request holds at
/// most one sandbox at a time).
pub const MAX_CONCURRENT_SANDBOXES: u32 = 32;
/// Core wasm instances one plugin component may contain (a Rust component
/// is a handful: the module plus shims).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Guard region after each memory: out-of-bounds accesses just past the end
/// fault in hardware instead of needing a check.
const MEMORY_GUARD: u64 = 32 * 1024 * 1024;

/// The shared engine, with its ticker and the gate on its sandbox slots.
pub struct PluginEngine {
    engine: Engine,
    slots: SlotGate,
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
        let sandboxes = limits.sandboxes.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(sandboxes)
            .total_core_instances(sandboxes * MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .total_memories(sandboxes)
            .max_memories_per_component(1)
            .total_tables(sandboxes * MAX_CORE_INSTANCES_PER_COMPONENT)
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
            slots: SlotGate::new(sandboxes),
            _ticker: ticker,
        })
    }

    /// Sandbox slots in the pool.
    pub fn sandboxes(&self) -> u32 {
        self.slots.size
    }

    /// Takes a sandbox slot, waiting at most `wait` for one to be free;
    /// `None` when every slot stayed busy. The slot is free again when the
    /// permit is dropped (after the call's store).
    pub fn slot(&self, wait: Duration) -> Option<SlotPermit<'_>> {
        self.slots.acquire(wait)
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

/// A counting semaphore over the pool's sandbox slots.
struct SlotGate {
    free: Mutex<u32>,
    freed: Condvar,
    size: u32,
}

/// One sandbox slot, held for one call.
#[derive(Debug)]
pub struct SlotPermit<'a> {
    gate: &'a SlotGate,
}

impl std::fmt::Debug for SlotGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotGate")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl SlotGate {
    fn new(size: u32) -> Self {
        Self {
            free: Mutex::new(size),
            freed: Condvar::new(),
            size,
        }
    }

    fn acquire(&self, wait: Duration) -> Option<SlotPermit<'_>> {
        let until = Instant::now() + wait;
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            free = match self.freed.wait_timeout(free, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        *free -= 1;
        Some(SlotPermit { gate: self })
    }
}

impl Drop for SlotPermit<'_> {
    fn drop(&mut self) {
        let mut free = self.gate.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.gate.freed.notify_one();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_gate_waits_then_refuses() {
        let gate = SlotGate::new(2);
        let a = gate.acquire(Duration::ZERO).expect("first slot");
        let _b = gate.acquire(Duration::ZERO).expect("second slot");
        let started = Instant::now();
        assert!(gate.acquire(Duration::from_millis(30)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(30));
        drop(a);
        assert!(gate.acquire(Duration::ZERO).is_some());
    }
}
