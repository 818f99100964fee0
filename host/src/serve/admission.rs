//! Admission by memory: every prediction reserves, from one byte budget
//! (`server.memory_budget_mib`), an estimate of the memory it will hold,
//! before it holds it. The reservation grows in steps — while the body
//! arrives, before the multipart and JSON parsers copy it, before the DICOM
//! parser reads the file, and, from the image header alone, before the
//! pixels are decoded — and is given back when the request's decode and
//! plugin stage ends.
//!
//! A step that does not fit beside the requests in progress is refused with
//! 503 and Retry-After ([`AdmissionError::Busy`]); a request whose own
//! estimate exceeds the whole budget can never be served and is refused with
//! 413 ([`AdmissionError::TooLarge`]).
//!
//! # The estimate (bytes)
//!
//! With `B` the body, `E` the EMR JSON text, `D` the DICOM part's data set
//! as the structural scan counted it (the part's bytes; for a deflated data
//! set, the bytes it inflates to), `N` its nodes (elements, items,
//! fragments, string values),
//! `P = Rows × Columns` of the first frame, `b` the bytes per stored sample
//! (`BitsAllocated` / 8, at least 1) and `S` the model's input side:
//!
//! | step                  | reserved                                          |
//! |-----------------------|---------------------------------------------------|
//! | body, as it arrives   | `B`                                               |
//! | multipart parse       | `+ B` (the parser's own copy)                     |
//! | JSON parse            | `+ 16 × E` ([`JSON_EXPANSION`]: the parsed value), `+ B` for a JSON body (its one contiguous copy) |
//! | DICOM parse           | `+ D + 128 × N` (the in-memory data set, reserved after the scan and before the parse; [`crate::dicom::scan::Footprint`]) |
//! | decode (image models) | `+ P × b` native, `+ P × (b + 4)` compressed      |
//! |                       | `+ 4 × S × max(Rows, Columns) + 8 × S² + 1 MiB`   |
//! |                       |   (canonical resize buffers, lookup table, histogram) |
//! | image plugins loaded  | `+ P × b + 4 × 1024 × Columns + 4 × S²`             |
//! |                       |   (the frame lent to the plugin, at most one copy at its stored width ([`IMAGE_PLUGIN_BYTES_PER_PIXEL`] = b); one `read-rows` answer of at most 1024 rows of f32; the canonical image as a list) |
//!
//! The plugins' own linear memory is bounded separately, by the sandbox
//! (`sandbox.memory_limit_mib` per call).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dicom::Geometry;

/// Parsed JSON (serde_json values, ordered maps) per byte of JSON text, at
/// most: a one-byte scalar becomes a 32-byte value.
pub const JSON_EXPANSION: u64 = 16;

/// Bytes per pixel that lending the frame to `preprocess-image` plugins
/// costs, per byte of stored sample: the frame is moved (decoder output) or
/// copied once at its stored width (samples borrowed from the file); rows
/// are converted lazily, one `read-rows` answer at a time
/// ([`crate::plugins::MAX_ROWS_PER_READ`] rows of f32).
pub const IMAGE_PLUGIN_BYTES_PER_PIXEL: u64 = 1;

/// Lower bound of the derived budget.
pub const MIN_DERIVED_BUDGET: u64 = 256 * 1024 * 1024;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The budget is in use by other requests; a retry may succeed.
    #[error(
        "the memory budget is in use: this request needs {needed} more bytes, {in_use} of {capacity} are held by requests in progress (server.memory_budget_mib)"
    )]
    Busy {
        /// Bytes this step asked for.
        needed: u64,
        /// Bytes held by every request at the time.
        in_use: u64,
        /// The whole budget.
        capacity: u64,
    },
    /// This request alone needs more than the whole budget.
    #[error(
        "this case needs an estimated {total} bytes to decode, more than the whole memory budget of {capacity} bytes (server.memory_budget_mib)"
    )]
    TooLarge {
        /// The request's estimate so far.
        total: u64,
        /// The whole budget.
        capacity: u64,
    },
}

/// The shared byte budget.
#[derive(Debug)]
pub struct MemoryBudget {
    capacity: u64,
    in_use: AtomicU64,
    peak: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// The whole budget, bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// An empty reservation, to grow step by step.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }

    fn take(&self, bytes: u64) -> Result<(), u64> {
        let mut current = self.in_use.load(Ordering::Acquire);
        loop {
            let next = current.saturating_add(bytes);
            if next > self.capacity {
                return Err(current);
            }
            match self.in_use.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    return Ok(());
                }
                Err(seen) => current = seen,
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One request's share of the budget, returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `bytes` more.
    ///
    /// # Errors
    /// [`AdmissionError::TooLarge`] when this request's total would exceed
    /// the whole budget, [`AdmissionError::Busy`] when it does not fit now.
    /// Either way, what was reserved before stays reserved.
    pub fn grow(&mut self, bytes: u64) -> Result<(), AdmissionError> {
        let total = self.bytes.saturating_add(bytes);
        let capacity = self.budget.capacity;
        if total > capacity {
            return Err(AdmissionError::TooLarge { total, capacity });
        }
        self.budget
            .take(bytes)
            .map_err(|in_use| AdmissionError::Busy {
                needed: bytes,
                in_use,
                capacity,
            })?;
        self.bytes = total;
        Ok(())
    }

    /// Bytes this request holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// The decode step's estimate for an image of `geometry`, whose pixel data
/// is `encapsulated` (compressed) or native, for a model of input side
/// `input_size`, with or without `preprocess-image` plugins (see the table in
/// the module documentation).
pub fn decode_estimate(
    geometry: &Geometry,
    encapsulated: bool,
    input_size: u32,
    image_plugins: bool,
) -> u64 {
    let pixels = u64::from(geometry.rows) * u64::from(geometry.columns);
    let sample = u64::from(geometry.bits_allocated).div_ceil(8).max(1);
    let side = u64::from(input_size);
    let longest = u64::from(geometry.rows.max(geometry.columns));
    let frame = if encapsulated {
        pixels.saturating_mul(sample + 4)
    } else {
        pixels.saturating_mul(sample)
    };
    let canonical = 4 * side * longest + 8 * side * side + (1 << 20);
    let plugins = if image_plugins {
        let rows_answer =
            4 * u64::from(crate::plugins::MAX_ROWS_PER_READ) * u64::from(geometry.columns);
        pixels
            .saturating_mul(IMAGE_PLUGIN_BYTES_PER_PIXEL * sample)
            .saturating_add(rows_answer)
            + 4 * side * side
    } else {
        0
    };
    frame.saturating_add(canonical).saturating_add(plugins)
}

/// The budget when `server.memory_budget_mib = 0`: half of the smaller of
/// the machine's memory (`MemTotal` in /proc/meminfo) and the process's
/// cgroup limit ([`cgroup_memory_limit`]: systemd's `MemoryMax=` included),
/// at least [`MIN_DERIVED_BUDGET`]. Where none can be read, the floor.
pub fn derived_budget() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_memory_limit(&text, Path::new("/sys/fs/cgroup")));
    let machine = match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    machine.map_or(MIN_DERIVED_BUDGET, |bytes| {
        (bytes / 2).max(MIN_DERIVED_BUDGET)
    })
}

/// The tightest memory limit over the process's cgroup and its ancestors,
/// bytes: `proc_self_cgroup` is /proc/self/cgroup's text, `root` where the
/// hierarchy is mounted (/sys/fs/cgroup). cgroup v2 (`0::/path`): each
/// `memory.max` from `root/path` up to `root`; v1 (`N:...memory...:/path`):
/// each `memory.limit_in_bytes` from `root/memory/path` up. `None` where no
/// level sets a limit (or none can be read).
pub fn cgroup_memory_limit(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let mut tightest: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (base, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The cgroup itself, then each ancestor up to the mount's root.
        let mut level = PathBuf::from(path.trim().trim_start_matches('/'));
        loop {
            let limit = std::fs::read_to_string(base.join(&level).join(file))
                .ok()
                .and_then(|text| cgroup_limit(&text));
            if let Some(limit) = limit {
                tightest = Some(tightest.map_or(limit, |t| t.min(limit)));
            }
            if !level.pop() {
                break;
            }
        }
    }
    tightest
}

/// `MemTotal` from /proc/meminfo text, bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// A cgroup memory limit file's value, bytes; `None` for "max" (no limit)
/// and v1's "unlimited" sentinel.
fn cgroup_limit(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    // cgroup v1 reports "no limit" as a page-rounded i64::MAX.
    (value < (1 << 62)).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(rows: u32, columns: u32, bits_allocated: u16) -> Geometry {
        Geometry {
            rows,
            columns,
            frames: 1,
            bits_allocated,
            bits_stored: bits_allocated,
            high_bit: bits_allocated - 1,
            signed: false,
            monochrome1: false,
        }
    }

    #[test]
    fn reservations_grow_within_the_budget_and_are_given_back() {
        let budget = MemoryBudget::new(1000);
        let mut a = budget.reservation();
        a.grow(600).expect("fits");
        let mut b = budget.reservation();
        assert_eq!(
            b.grow(500),
            Err(AdmissionError::Busy {
                needed: 500,
                in_use: 600,
                capacity: 1000
            })
        );
        assert_eq!(
            b.grow(1001),
            Err(AdmissionError::TooLarge {
                total: 1001,
                capacity: 1000
            })
        );
        b.grow(400).expect("fits beside a");
        assert_eq!(budget.in_use(), 1000);
        drop(a);
        assert_eq!(budget.in_use(), 400);
        b.grow(200).expect("fits now");
        assert_eq!(b.bytes(), 600);
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert_eq!(budget.peak(), 1000);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_budget() {
        let budget = MemoryBudget::new(10_000);
        std::thread::scope(|s| {
            for _ in 0..8 {
                let budget = Arc::clone(&budget);
                s.spawn(move || {
                    for i in 0..2000u64 {
                        let mut r = budget.reservation();
                        let _ = r.grow(1000 + i % 7);
                        let _ = r.grow(500);
                    }
                });
            }
        });
        assert_eq!(budget.in_use(), 0);
        assert!(budget.peak() <= 10_000, "{}", budget.peak());
    }

    #[test]
    fn the_decode_estimate_follows_the_documented_formula() {
        // 2000 × 1000 16-bit native, S = 224, no image plugins.
        let g = geometry(2000, 1000, 16);
        let canonical = 4 * 224 * 2000 + 8 * 224 * 224 + (1 << 20);
        assert_eq!(
            decode_estimate(&g, false, 224, false),
            2_000_000 * 2 + canonical
        );
        assert_eq!(
            decode_estimate(&g, true, 224, false),
            2_000_000 * 6 + canonical
        );
        assert_eq!(
            decode_estimate(&g, false, 224, true),
            // The frame at its stored width, one 1024-row answer, the
            // canonical image.
            2_000_000 * 4 + 4 * 1024 * 1000 + canonical + 4 * 224 * 224
        );
        // 1-bit data still counts a byte per sample (decoded unpacked).
        assert_eq!(
            decode_estimate(&geometry(10, 10, 1), false, 16, false),
            100 + 4 * 16 * 10 + 8 * 256 + (1 << 20)
        );
    }

    #[test]
    fn machine_memory_is_read_from_meminfo_and_cgroup_files() {
        assert_eq!(
            mem_total("MemTotal:       16318412 kB\nMemFree: 1 kB\n"),
            Some(16_318_412 * 1024)
        );
        assert_eq!(mem_total("nothing"), None);
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(cgroup_limit("2147483648\n"), Some(2 << 30));
        assert!(derived_budget() >= MIN_DERIVED_BUDGET);
    }

    #[test]
    fn the_cgroup_limit_is_the_tightest_over_the_process_cgroup_and_its_ancestors() {
        let root = tempfile::tempdir().expect("tempdir");
        let write = |rel: &str, text: &str| {
            let path = root.path().join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        // cgroup v2 under systemd: no limit at the root, MemoryMax=2G on
        // the service, 4G on its slice.
        write("memory.max", "max\n");
        write("system.slice/memory.max", "4294967296\n");
        write("system.slice/oxbox.service/memory.max", "2147483648\n");
        let v2 = "0::/system.slice/oxbox.service\n";
        assert_eq!(cgroup_memory_limit(v2, root.path()), Some(2 << 30));
        // A tighter ancestor wins.
        write("system.slice/memory.max", "1073741824\n");
        assert_eq!(cgroup_memory_limit(v2, root.path()), Some(1 << 30));
        // No limit anywhere on the path.
        assert_eq!(cgroup_memory_limit("0::/user.slice\n", root.path()), None);
        // cgroup v1: the memory controller's line and hierarchy.
        write("memory/docker/abc/memory.limit_in_bytes", "536870912\n");
        write("memory/memory.limit_in_bytes", "9223372036854771712\n");
        let v1 = "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n";
        assert_eq!(cgroup_memory_limit(v1, root.path()), Some(512 << 20));
        assert_eq!(cgroup_memory_limit("garbage", root.path()), None);
    }
}
