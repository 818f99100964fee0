//! Which vector instructions the CPU kernels use: the widest the CPU runs,
//! detected at run time, unless capped lower (`oxbox bench --isa avx2`
//! measures the AVX2 path on an AVX-512 machine, so that both paths are
//! compared on one machine in one session).
//!
//! The kernels ask [`active`] each time they dispatch (the packed
//! products directly, the Winograd transforms through `has_avx2_fma`); the
//! detection is std's, cached after the first call, and the cap one
//! relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};

/// A family of vector instructions the kernels have a path for, narrowest
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum VectorIsa {
    /// Plain Rust loops, vectorised by the compiler for the build's
    /// baseline (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 (F): 16 f32 lanes, masked loads and stores.
    Avx512,
}

impl VectorIsa {
    /// The name `--isa` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }
}

/// The cap set by [`cap`], as a [`VectorIsa`] discriminant (the widest:
/// none).
static CAP: AtomicU8 = AtomicU8::new(VectorIsa::Avx512 as u8);

/// The widest family this CPU runs.
pub fn detected() -> VectorIsa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if avx2 && std::is_x86_feature_detected!("avx512f") {
            return VectorIsa::Avx512;
        }
        if avx2 {
            return VectorIsa::Avx2;
        }
    }
    VectorIsa::Portable
}

/// What the kernels use now: [`detected`], or the cap if that is lower.
pub fn active() -> VectorIsa {
    let cap = match CAP.load(Ordering::Relaxed) {
        c if c == VectorIsa::Portable as u8 => VectorIsa::Portable,
        c if c == VectorIsa::Avx2 as u8 => VectorIsa::Avx2,
        _ => VectorIsa::Avx512,
    };
    detected().min(cap)
}

/// Caps the kernels at `isa` from now on, for the whole process (a
/// benchmark's choice; a server never calls it). A cap above what the CPU
/// runs changes nothing.
pub fn cap(isa: VectorIsa) {
    CAP.store(isa as u8, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_lowers_the_active_family_and_never_raises_it() {
        let detected = detected();
        cap(VectorIsa::Portable);
        assert_eq!(active(), VectorIsa::Portable);
        cap(VectorIsa::Avx2);
        assert_eq!(active(), detected.min(VectorIsa::Avx2));
        cap(VectorIsa::Avx512);
        assert_eq!(active(), detected);
    }
}
