//! A small deterministic random generator (PCG-XSH-RR 64/32) with the
//! distributions oxbox needs: the same numbers on every platform and build,
//! so a seed reproduces a model initialisation or a synthetic cohort
//! exactly.

/// PCG-XSH-RR with a 64-bit state.
#[derive(Debug, Clone)]
pub struct Pcg(u64);

impl Pcg {
    /// A generator for `seed`, on an independent `stream` (e.g. one per
    /// site or per case), so streams do not depend on each other's draws.
    pub fn new(seed: u64, stream: u64) -> Self {
        // SplitMix64 of (seed, stream) spreads nearby seeds apart.
        let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let mut rng = Pcg(z ^ (z >> 31));
        rng.next_u32();
        rng
    }

    /// A generator from a raw state (kept for model initialisation digests).
    pub fn from_state(state: u64) -> Self {
        Pcg(state)
    }

    /// 32 uniform bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.0;
        self.0 = old
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        xorshifted.rotate_right((old >> 59) as u32)
    }

    /// 64 uniform bits.
    pub fn next_u64(&mut self) -> u64 {
        (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        (f64::from(self.next_u32()) + 0.5) / 4_294_967_296.0
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n) (n ≥ 1).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Normal with mean `mu` and standard deviation `sd`.
    pub fn gauss(&mut self, mu: f64, sd: f64) -> f64 {
        mu + sd * self.normal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u32> = (0..4).map(|_| Pcg::new(7, 1).next_u32()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = Pcg::new(7, 1);
        let mut y = Pcg::new(7, 2);
        assert_ne!(
            (0..8).map(|_| x.next_u32()).collect::<Vec<_>>(),
            (0..8).map(|_| y.next_u32()).collect::<Vec<_>>()
        );
        let mut r = Pcg::new(1, 0);
        let mean = (0..20_000).map(|_| r.normal()).sum::<f64>() / 20_000.0;
        assert!(mean.abs() < 0.03, "{mean}");
    }
}
