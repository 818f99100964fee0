//! The image branch's stem at inference, in one pass: the 7×7 stride-2
//! convolution of the one-channel radiograph (batch norm folded in), its
//! bias and ReLU, and the 3×3 stride-2 max pool that follows (padding 1).
//!
//! Run as a convolution and then a pool, the stem unfolds 49 values per
//! output pixel (2.4 MB at 224²), writes its 112² × 64 output (3.2 MB)
//! and the pool reads it back, half of it from the other core's cache.
//! Here the convolution is direct, vectorised along the output row, and
//! each output row is pooled as soon as it is computed, from L1; only the
//! pooled 56² × 64 planes are written.
//!
//! The input is unfolded along x only, once per image: for each input
//! row and each of the 7 horizontal taps, the row of values that tap
//! reads for every output pixel of a row ([`unfold_rows`], 7× the input,
//! 0.7 MB at 224²). The output row's pixels sit in their lanes even
//! ones first (ox = 0, 2, 4, …), then the odd ones, so that the pool's
//! columns 2·px − 1, 2·px and 2·px + 1 are three contiguous slices. A
//! kernel then computes [`GROUP`] channels × a few vectors of an output
//! row: per tap, one broadcast weight per channel and one load per
//! vector, in registers across the 49 taps ([`tile`], written once for
//! AVX-512's 16 lanes and AVX2's 8).
//!
//! Both paths sum bias + the 49 products in the same order, one fused
//! multiply-add each, so they give the same bits; candle's convolution
//! and pool agree within rounding (tested). Where neither AVX2 nor
//! AVX-512 runs, the stem stays a [`super::cpu_conv::FusedConv`] and a
//! pool.
//!
//! ReLU makes every value ≥ 0, so the pool's padding (zeros, as in
//! [`super::cpu_batch_norm::MaxPool3x3Stride2`]) and −∞ padding give the
//! same maxima.

// The kernels are x86-64's. Elsewhere (aarch64) the fused stem never runs
// (`StemPool::available` is false), and what only the kernels use is
// unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::cpu_conv::contiguous_f32;
use super::scratch::with_scratch;
use super::vector_isa::{self, VectorIsa};

/// The convolution's side (7×7).
const KERNEL: usize = 7;
/// Its stride.
const STRIDE: usize = 2;
/// Its zero padding on every side.
const PADDING: usize = 3;
/// Taps per output pixel.
const TAPS: usize = KERNEL * KERNEL;
/// Output channels per kernel call: one broadcast weight each per tap.
const GROUP: usize = 4;
/// Lanes of an unfolded row are a multiple of this (one AVX-512 vector,
/// two AVX2 ones).
const LANE_BLOCK: usize = 16;

thread_local! {
    /// The unfolded input of one image, reused across calls on this
    /// thread (0.7 MB at 224²; allocated afresh, it costs page faults).
    static UNFOLDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The folded stem convolution with its pool, ready to run: weights in
/// groups of [`GROUP`] output channels, tap-major
/// (`[group][tap][channel of the group]`, channels past the last zero).
#[derive(Debug, Clone)]
pub struct StemPool {
    weights: Vec<f32>,
    /// The bias, zero past the last channel.
    bias: Vec<f32>,
    out_channels: usize,
}

/// Where an image's output rows and pooled planes lie.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    /// Convolution output rows and columns.
    out_h: usize,
    out_w: usize,
    /// Even output columns (the first lanes), also the pooled width.
    even: usize,
    /// Lanes per unfolded row: `out_w` rounded up to [`LANE_BLOCK`].
    lanes: usize,
    /// Pooled rows.
    pooled_h: usize,
}

impl Geometry {
    fn new(height: usize, width: usize) -> Self {
        let side = |s: usize| (s + 2 * PADDING - KERNEL) / STRIDE + 1;
        let (out_h, out_w) = (side(height), side(width));
        Self {
            height,
            width,
            out_h,
            out_w,
            even: out_w.div_ceil(2),
            lanes: out_w.next_multiple_of(LANE_BLOCK),
            pooled_h: (out_h - 1) / 2 + 1,
        }
    }

    /// Pooled columns: (out_w + 2 − 3) / 2 + 1, the even columns' count.
    fn pooled_w(&self) -> usize {
        self.even
    }

    /// Floats of one input row's unfolding (7 taps × lanes).
    fn row_stride(&self) -> usize {
        KERNEL * self.lanes
    }
}

impl StemPool {
    /// The stem from its folded weights `(out_channels, 1, 7, 7)` and
    /// bias; the ReLU is part of it.
    ///
    /// # Panics
    /// When `weights` or `bias` do not have that many values (a caller's
    /// bug: [`super::cpu_conv::FusedConv`] checked its shapes).
    pub fn new(weights: &[f32], bias: &[f32], out_channels: usize) -> Self {
        assert_eq!(weights.len(), out_channels * TAPS, "stem weights");
        assert_eq!(bias.len(), out_channels, "stem bias");
        let groups = out_channels.div_ceil(GROUP);
        let mut packed = vec![0f32; groups * TAPS * GROUP];
        for (c, taps) in weights.chunks_exact(TAPS).enumerate() {
            let (group, lane) = (c / GROUP, c % GROUP);
            for (tap, w) in taps.iter().enumerate() {
                packed[(group * TAPS + tap) * GROUP + lane] = *w;
            }
        }
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(groups * GROUP, 0.0);
        Self {
            weights: packed,
            bias: padded_bias,
            out_channels,
        }
    }

    /// Whether this CPU runs the fused stem (AVX2 and FMA, or AVX-512);
    /// the portable path keeps the convolution and the pool.
    pub fn available() -> bool {
        vector_isa::active() >= VectorIsa::Avx2
    }

    /// The pooled output's side for an input side (at least 1): the
    /// convolution's (s − 1) / 2 + 1, then the pool's.
    pub fn out_side(side: usize) -> usize {
        Geometry::new(side, side).pooled_h
    }

    /// The pooled planes `(batch, out_channels, ph, pw)` of `input`
    /// `(batch, 1, height, width)`, contiguous.
    ///
    /// # Panics
    /// When `input` holds fewer than batch · height · width values, a
    /// side is 0, or the CPU runs neither AVX2 nor AVX-512 ([`available`]
    /// is the caller's check).
    ///
    /// [`available`]: Self::available
    pub fn run(&self, input: &[f32], dims: [usize; 3]) -> Vec<f32> {
        let isa = vector_isa::active();
        assert!(
            isa >= VectorIsa::Avx2,
            "the fused stem needs AVX2 or AVX-512"
        );
        // SAFETY: the CPU runs `isa` (`active` is at most what it detected).
        unsafe { self.run_on(isa, input, dims) }
    }

    /// [`Self::run`] on the kernels of `isa` (tests run each path).
    ///
    /// # Safety
    /// The CPU runs `isa`, which is AVX2 or AVX-512.
    unsafe fn run_on(
        &self,
        isa: VectorIsa,
        input: &[f32],
        [batch, height, width]: [usize; 3],
    ) -> Vec<f32> {
        assert!(height > 0 && width > 0, "stem input {height}x{width}");
        assert!(input.len() >= batch * height * width, "stem input");
        let geometry = Geometry::new(height, width);
        let plane = geometry.pooled_h * geometry.pooled_w();
        let mut out = vec![0f32; batch * self.out_channels * plane];
        with_scratch(&UNFOLDED, |unfolded| {
            unfolded.resize(height * geometry.row_stride(), 0.0);
            for (image, pooled) in input
                .chunks_exact(height * width)
                .zip(out.chunks_exact_mut(self.out_channels * plane))
            {
                unfold_rows(image, geometry, unfolded);
                let unfolded = &unfolded[..];
                // One task per group of channels: each reads the whole
                // unfolding (in L2) and writes its own pooled planes.
                pooled
                    .par_chunks_mut(GROUP * plane)
                    .enumerate()
                    .for_each_init(
                        || vec![0f32; 2 * GROUP * geometry.lanes],
                        |rows, (group, planes)| {
                            let job = GroupJob {
                                unfolded,
                                weights: &self.weights[group * TAPS * GROUP..][..TAPS * GROUP],
                                bias: &self.bias[group * GROUP..][..GROUP],
                                geometry,
                            };
                            // SAFETY: the CPU runs `isa` (the caller's
                            // contract).
                            unsafe { job.run(isa, rows, planes) };
                        },
                    );
            }
        });
        out
    }
}

/// Unfolds `image` (height × width) along x: row `iy · 7 + kx` of
/// `unfolded` holds, in lane `l`, the input value that tap kx of output
/// column ox(l) reads on input row iy (0 in the padding and past the
/// last column), where ox(l) = 2·l for the first `even` lanes and
/// 2·(l − even) + 1 after them.
fn unfold_rows(image: &[f32], g: Geometry, unfolded: &mut [f32]) {
    // Input column c + PADDING of a padded row, read in four phases:
    // phase r holds padded columns 4·j + r. Output column ox = 2·l reads
    // padded column 4·l + kx (phase kx % 4, from j = kx / 4); ox =
    // 2·l + 1 reads 4·l + 2 + kx.
    let phase_len = (g.width + 2 * PADDING).div_ceil(4) + 2;
    let odd = g.out_w - g.even;
    let fill = |phase: &mut Vec<f32>, (row, out): (&[f32], &mut [f32])| {
        phase.clear();
        phase.resize(4 * phase_len, 0.0);
        for (c, v) in row.iter().enumerate() {
            let p = c + PADDING;
            phase[(p % 4) * phase_len + p / 4] = *v;
        }
        for (kx, lanes) in out.chunks_exact_mut(g.lanes).enumerate() {
            let evens = &phase[(kx % 4) * phase_len + kx / 4..][..g.even];
            let odds = &phase[((kx + 2) % 4) * phase_len + (kx + 2) / 4..][..odd];
            lanes[..g.even].copy_from_slice(evens);
            lanes[g.even..g.out_w].copy_from_slice(odds);
            lanes[g.out_w..].fill(0.0);
        }
    };
    let (image, unfolded) = (
        &image[..g.height * g.width],
        &mut unfolded[..g.height * g.row_stride()],
    );
    if g.height * g.width >= 1 << 14 {
        image
            .par_chunks_exact(g.width)
            .zip(unfolded.par_chunks_exact_mut(g.row_stride()))
            .for_each_init(Vec::new, fill);
    } else {
        let mut phase = Vec::new();
        image
            .chunks_exact(g.width)
            .zip(unfolded.chunks_exact_mut(g.row_stride()))
            .for_each(|rows| fill(&mut phase, rows));
    }
}

/// One group of [`GROUP`] output channels of one image: its weights and
/// bias, and the image's unfolding.
struct GroupJob<'a> {
    unfolded: &'a [f32],
    weights: &'a [f32],
    bias: &'a [f32],
    geometry: Geometry,
}

impl GroupJob<'_> {
    /// The group's pooled planes into `planes` (up to [`GROUP`] planes of
    /// pooled_h × pooled_w; fewer for the last group of a count that is
    /// not a multiple), `rows` being scratch for 2 · GROUP rows of lanes.
    ///
    /// # Safety
    /// The CPU runs `isa`, which is AVX2 or AVX-512.
    unsafe fn run(&self, isa: VectorIsa, rows: &mut [f32], planes: &mut [f32]) {
        match isa {
            // SAFETY: the CPU runs the path (the caller's contract).
            #[cfg(target_arch = "x86_64")]
            VectorIsa::Avx512 => unsafe { self.run_avx512(rows, planes) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            VectorIsa::Avx2 => unsafe { self.run_avx2(rows, planes) },
            _ => unreachable!("the fused stem needs AVX2 or AVX-512, not {isa:?}"),
        }
    }

    /// [`Self::pool_rows`] with the AVX-512 kernel.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, rows: &mut [f32], planes: &mut [f32]) {
        use std::arch::x86_64::__m512;
        // SAFETY: AVX-512 (this function's feature).
        self.pool_rows(rows, planes, |job, oy, row| unsafe {
            job.conv_row::<__m512>(oy, row)
        });
    }

    /// [`Self::pool_rows`] with the AVX2 kernel.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, rows: &mut [f32], planes: &mut [f32]) {
        use std::arch::x86_64::__m256;
        // SAFETY: AVX2 and FMA (this function's feature).
        self.pool_rows(rows, planes, |job, oy, row| unsafe {
            job.conv_row::<__m256>(oy, row)
        });
    }

    /// Output row `oy` of the group's channels into `row` (GROUP rows of
    /// lanes), in tiles of up to `L::MAX_VECTORS` vectors ([`tile`]).
    ///
    /// # Safety
    /// The CPU runs `L`'s instructions.
    #[inline(always)]
    unsafe fn conv_row<L: Lanes>(&self, oy: usize, row: &mut [f32]) {
        let lanes = self.geometry.lanes;
        let mut lane = 0;
        while lane < lanes {
            let vectors = ((lanes - lane) / L::WIDTH).min(L::MAX_VECTORS);
            // SAFETY: lane + WIDTH · vectors ≤ lanes (a multiple of 16,
            // so of WIDTH); the CPU runs L (the caller's contract).
            unsafe {
                match vectors {
                    1 => tile::<L, 1>(self, oy, lane, row),
                    2 => tile::<L, 2>(self, oy, lane, row),
                    3 => tile::<L, 3>(self, oy, lane, row),
                    _ => tile::<L, 4>(self, oy, lane, row),
                }
            }
            lane += L::WIDTH * vectors;
        }
    }

    /// Computes the group's output rows in order with `conv_row` (output
    /// row oy → GROUP rows of lanes after bias and ReLU) and pools them:
    /// pooled row py is the maximum of output rows 2·py − 1, 2·py and
    /// 2·py + 1 (those that exist), then of columns 2·px − 1, 2·px and
    /// 2·px + 1.
    #[inline(always)]
    fn pool_rows(
        &self,
        rows: &mut [f32],
        planes: &mut [f32],
        conv_row: impl Fn(&Self, usize, &mut [f32]),
    ) {
        let g = self.geometry;
        let (row, column_max) = rows.split_at_mut(GROUP * g.lanes);
        // Maxima of the rows so far of the pooled row being built (the
        // rows above the first are padding: zeros).
        column_max.fill(0.0);
        for oy in 0..g.out_h {
            conv_row(self, oy, row);
            for (m, v) in column_max.iter_mut().zip(row.iter()) {
                *m = m.max(*v);
            }
            if oy % 2 == 1 {
                self.pool_columns(column_max, oy / 2, planes);
                // Row 2·py + 1 is also row 2·(py + 1) − 1.
                column_max.copy_from_slice(row);
            }
        }
        if g.out_h % 2 == 1 {
            self.pool_columns(column_max, g.pooled_h - 1, planes);
        }
    }

    /// Pooled row `py` of each channel from the maxima over its output
    /// rows: even columns in the first lanes, odd ones after them.
    #[inline(always)]
    fn pool_columns(&self, column_max: &[f32], py: usize, planes: &mut [f32]) {
        let g = self.geometry;
        let pw = g.pooled_w();
        let odd_count = g.out_w - g.even;
        let plane = g.pooled_h * pw;
        for (lanes, out) in column_max
            .chunks_exact(g.lanes)
            .zip(planes.chunks_exact_mut(plane))
        {
            let out = &mut out[py * pw..][..pw];
            let (even, odd) = (&lanes[..g.even], &lanes[g.even..g.out_w]);
            // px = 0: columns 0 and 1 (column −1 is padding).
            out[0] = even[0].max(odd.first().copied().unwrap_or(0.0));
            // 0 < px < odd_count: columns 2·px − 1, 2·px, 2·px + 1.
            let middle = odd_count.max(1);
            if odd_count > 1 {
                for (((o, e), left), right) in out[1..middle]
                    .iter_mut()
                    .zip(&even[1..middle])
                    .zip(&odd[..middle - 1])
                    .zip(&odd[1..middle])
                {
                    *o = e.max(*left).max(*right);
                }
            }
            // The last pooled column of an odd width: column 2·px + 1 is
            // padding.
            if pw > middle {
                out[pw - 1] = even[pw - 1].max(odd[pw - 2]);
            }
        }
    }

    /// The input rows output row `oy` reads, as the valid range of ky and
    /// the first such row's input row.
    fn taps_of_row(&self, oy: usize) -> (std::ops::Range<usize>, usize) {
        let top = oy * STRIDE;
        let first = PADDING.saturating_sub(top);
        let last = (self.geometry.height + PADDING)
            .saturating_sub(top)
            .min(KERNEL);
        (
            first..last.max(first),
            (top + first).saturating_sub(PADDING),
        )
    }
}

/// A vector register of f32 lanes as [`tile`] uses it. Implemented for
/// AVX-512's `__m512` (16 lanes) and AVX2's `__m256` (8); every method
/// needs the CPU to run those instructions, and is inlined into a
/// function that enables them.
trait Lanes: Copy {
    /// Lanes per vector.
    const WIDTH: usize;
    /// Vectors per tile at most: GROUP × this many sums in registers
    /// (AVX-512 16 of 32; AVX2 12 of 16, the compiler keeping a broadcast
    /// weight on the stack as an FMA's memory operand).
    const MAX_VECTORS: usize;
    /// `value` in every lane.
    unsafe fn splat(value: f32) -> Self;
    /// WIDTH values from `from`.
    unsafe fn load(from: *const f32) -> Self;
    /// a · b + c, one rounding.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// max(self, 0) into WIDTH values at `to`.
    unsafe fn store_relu(self, to: *mut f32);
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m512 {
    const WIDTH: usize = 16;
    const MAX_VECTORS: usize = 4;
    #[inline(always)]
    unsafe fn splat(value: f32) -> Self {
        // SAFETY: AVX-512 F (the trait's contract).
        unsafe { std::arch::x86_64::_mm512_set1_ps(value) }
    }
    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        // SAFETY: 16 readable values (the caller's); AVX-512 F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(from) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: AVX-512 F.
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn store_relu(self, to: *mut f32) {
        use std::arch::x86_64::{_mm512_max_ps, _mm512_setzero_ps, _mm512_storeu_ps};
        // SAFETY: 16 writable values (the caller's); AVX-512 F.
        unsafe { _mm512_storeu_ps(to, _mm512_max_ps(self, _mm512_setzero_ps())) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m256 {
    const WIDTH: usize = 8;
    const MAX_VECTORS: usize = 3;
    #[inline(always)]
    unsafe fn splat(value: f32) -> Self {
        // SAFETY: AVX (the trait's contract).
        unsafe { std::arch::x86_64::_mm256_set1_ps(value) }
    }
    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        // SAFETY: 8 readable values (the caller's); AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(from) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: FMA.
        unsafe { std::arch::x86_64::_mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn store_relu(self, to: *mut f32) {
        use std::arch::x86_64::{_mm256_max_ps, _mm256_setzero_ps, _mm256_storeu_ps};
        // SAFETY: 8 writable values (the caller's); AVX.
        unsafe { _mm256_storeu_ps(to, _mm256_max_ps(self, _mm256_setzero_ps())) }
    }
}

/// Output row `oy`, lanes `lane .. lane + WIDTH·V`, of the group's
/// [`GROUP`] channels into `row` (GROUP rows of `lanes`): bias + the
/// products of the valid taps in order, then the ReLU; GROUP × V sums in
/// registers, per tap GROUP broadcasts and V loads. Every path sums in
/// the same order, one fused multiply-add per product: the same bits.
///
/// # Safety
/// The CPU runs `L`'s instructions; lane + WIDTH·V ≤ lanes.
#[inline(always)]
unsafe fn tile<L: Lanes, const V: usize>(
    job: &GroupJob<'_>,
    oy: usize,
    lane: usize,
    row: &mut [f32],
) {
    let g = job.geometry;
    assert!(lane + L::WIDTH * V <= g.lanes && row.len() >= GROUP * g.lanes);
    // SAFETY (every intrinsic below): the CPU runs L (the caller's
    // contract).
    let splat = |value: f32| unsafe { L::splat(value) };
    // Sums by vector, then channel.
    let mut acc: [[L; GROUP]; V] = [std::array::from_fn(|c| splat(job.bias[c])); V];
    let (taps, first_row) = job.taps_of_row(oy);
    let stride = g.row_stride();
    assert!(job.unfolded.len() >= (first_row + taps.len()) * stride);
    let base = job.unfolded.as_ptr();
    for (i, ky) in taps.enumerate() {
        for kx in 0..KERNEL {
            let w = &job.weights[(ky * KERNEL + kx) * GROUP..][..GROUP];
            let w: [L; GROUP] = std::array::from_fn(|c| splat(w[c]));
            // SAFETY: row first_row + i < first_row + taps.len() of the
            // unfolding (asserted), tap kx < 7, lanes lane .. +
            // WIDTH·V ≤ lanes (asserted).
            let src = unsafe { base.add((first_row + i) * stride + kx * g.lanes + lane) };
            for (v, sums) in acc.iter_mut().enumerate() {
                // SAFETY: as `src`.
                let x = unsafe { L::load(src.add(L::WIDTH * v)) };
                for (sum, w) in sums.iter_mut().zip(&w) {
                    // SAFETY: as `splat`.
                    *sum = unsafe { L::mul_add(*w, x, *sum) };
                }
            }
        }
    }
    for (v, sums) in acc.iter().enumerate() {
        for (c, sum) in sums.iter().enumerate() {
            let at = c * g.lanes + lane + L::WIDTH * v;
            // SAFETY: at + WIDTH ≤ GROUP · lanes ≤ row.len() (asserted).
            unsafe { sum.store_relu(row.as_mut_ptr().add(at)) };
        }
    }
}

impl CustomOp1 for StemPool {
    fn name(&self) -> &'static str {
        "stem-conv-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "stem")?;
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if channels != 1 || height == 0 || width == 0 {
            candle_core::bail!(
                "stem: input (1, {height}, {width}) expected, got {channels} channels"
            );
        }
        if !Self::available() {
            candle_core::bail!("stem: the fused stem needs AVX2 or AVX-512");
        }
        let out = self.run(x, [batch, height, width]);
        let (ph, pw) = (Self::out_side(height), Self::out_side(width));
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, self.out_channels, ph, pw)),
        ))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::cpu_conv::tests::values;
    use candle_core::{Device, Module, Tensor};
    use candle_nn::{Conv2d, Conv2dConfig};

    /// The paths this CPU runs.
    fn paths() -> Vec<VectorIsa> {
        [VectorIsa::Avx2, VectorIsa::Avx512]
            .into_iter()
            .filter(|isa| *isa <= vector_isa::detected())
            .collect()
    }

    /// candle's conv2d (7×7, stride 2, padding 3) + bias, ReLU, then its
    /// 3×3 stride-2 max pool over the output padded with one row and
    /// column of zeros.
    fn candle_stem(
        x: &Tensor,
        weights: &[f32],
        bias: &[f32],
        channels: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let w = Tensor::from_vec(weights.to_vec(), (channels, 1, 7, 7), &Device::Cpu)?;
        let b = Tensor::from_vec(bias.to_vec(), channels, &Device::Cpu)?;
        let cfg = Conv2dConfig {
            padding: 3,
            stride: 2,
            ..Default::default()
        };
        let y = Conv2d::new(w, Some(b), cfg).forward(x)?.relu()?;
        let y = y.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        y.max_pool2d_with_stride(3, 2)?.flatten_all()?.to_vec1()
    }

    /// Odd and even sides, planes narrower than a vector and wider than
    /// four, channel counts that are not a multiple of the group, batches
    /// of 1 and 2: each path equals candle's convolution + pool within
    /// rounding, and the paths give the same bits.
    #[test]
    fn stem_pool_equals_candle_conv_then_pool() {
        for &(batch, channels, height, width) in &[
            (1, 64, 224, 224),
            (2, 8, 64, 64),
            (1, 5, 37, 45),
            (2, 3, 9, 8),
            (1, 4, 7, 130),
            (1, 6, 3, 2),
            (1, 1, 1, 1),
            (1, 9, 150, 17),
        ] {
            let case = format!("{batch}x{height}x{width} -> {channels}");
            let scale = (2.0f32 / 49.0).sqrt();
            let weights: Vec<f32> = values(channels * 49, 3).iter().map(|w| w * scale).collect();
            let bias = values(channels, 5);
            let input: Vec<f32> = values(batch * height * width, 11)
                .iter()
                .map(|v| v.abs())
                .collect();
            let x = Tensor::from_vec(input.clone(), (batch, 1, height, width), &Device::Cpu)
                .expect("input");
            let want = candle_stem(&x, &weights, &bias, channels).expect("candle");
            let (ph, pw) = (StemPool::out_side(height), StemPool::out_side(width));
            assert_eq!(
                want.len(),
                batch * channels * ph * pw,
                "{case}: candle's shape"
            );
            let stem = StemPool::new(&weights, &bias, channels);
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let mut first: Option<Vec<f32>> = None;
            for isa in paths() {
                // SAFETY: the CPU runs `isa` (`paths`).
                let got = unsafe { stem.run_on(isa, &input, [batch, height, width]) };
                assert_eq!(got.len(), want.len(), "{case} {isa:?}: length");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "{case} {isa:?} at {i}: {g} vs candle's {w}"
                    );
                }
                if let Some(first) = &first {
                    let same = first
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{case}: {isa:?} differs from the first path");
                }
                first.get_or_insert(got);
            }
        }
    }

    /// Through candle: the op's output shape, and a multi-channel input
    /// refused by name.
    #[test]
    fn the_op_takes_one_channel_and_gives_the_pooled_shape() {
        if !StemPool::available() {
            return;
        }
        let stem = StemPool::new(&values(8 * 49, 1), &values(8, 2), 8);
        let x =
            Tensor::from_vec(values(2 * 64 * 60, 3), (2, 1, 64, 60), &Device::Cpu).expect("input");
        let y = x.apply_op1_no_bwd(&stem).expect("stem");
        assert_eq!(y.dims(), &[2, 8, 16, 15]);
        let two =
            Tensor::from_vec(values(2 * 64 * 60, 3), (1, 2, 64, 60), &Device::Cpu).expect("input");
        let err = two.apply_op1_no_bwd(&stem).expect_err("two channels");
        assert!(err.to_string().contains("2 channels"), "{err}");
    }
}
