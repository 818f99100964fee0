//! Matrix products with few columns, `Y = W · X`, vectorised along W's
//! rows: the deep convolutions of a ResNet at batch 1, whose outputs have
//! 7×7 or 14×14 pixels (49 or 196 columns) and whose weights are the
//! bulk of what they read.
//!
//! [`super::packed_gemm`] vectorises along X's columns, 32 at a time: 49
//! columns become 64 and the last vector is mostly lanes thrown away.
//! Here the weights are packed once into panels of [`PANEL_ROWS`] rows
//! (`[panel][depth][PANEL_ROWS]`, the rows past the last zero), and a
//! block of a few columns costs in proportion to its width, so 49 columns
//! cost 49, not 64. Per depth index, the kernel loads W's rows as vectors
//! and broadcasts X's value of each column:
//! - AVX-512: a panel's 32 rows × up to [`BLOCK_COLS_AVX512`] columns of
//!   sums in 24 registers (two loads of W, then per column a broadcast and
//!   two fused multiply-adds);
//! - AVX2 + FMA: each half of the panel (16 rows) in turn × up to
//!   [`BLOCK_COLS_AVX2`] columns in 12 of the 16 registers.
//!
//! Both paths run the same loops over the same packed panels, and each sum
//! runs over the depth in order, one fused multiply-add per term, so they
//! give the same bits; then + (bias + residual) and the ReLU, as in
//! [`super::packed_gemm`]. The portable path (no AVX2) keeps `gemm`.

// The kernels are x86-64's. Elsewhere (aarch64) the panels are never
// multiplied here (`available` is false), and what only the kernels use is
// unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use std::ops::Range;

use crate::packed_gemm::{Epilogue, Operands};
use crate::vector_isa::{self, VectorIsa};

/// Rows of W per packed panel: two 16-lane vectors (four 8-lane ones).
pub const PANEL_ROWS: usize = 32;
/// Columns of X per kernel call at most on the AVX-512 path (24 sums in
/// registers).
const BLOCK_COLS_AVX512: usize = 12;
/// Columns of X per kernel call at most on the AVX2 path (12 sums in
/// registers, per half panel).
const BLOCK_COLS_AVX2: usize = 6;
/// Columns whose sums wait in memory between depth slices: five blocks on
/// the AVX-512 path, ten on the AVX2 path.
const CHUNK_COLS: usize = 60;
/// Depth indices per slice: a slice of the panel (16 KiB) and of X's
/// columns in a chunk (up to 30 KiB) stay in L1 while the chunk's blocks
/// reuse them.
const DEPTH_SLICE: usize = 128;

/// Column blocks of a chunk that prefetch the next depth slice of the
/// panel into L2, a quarter each. Only the first block of a slice reads W
/// from memory (the others find it in L1), so without this the weights
/// arrive in bursts, each at the rate of one block; with it they stream
/// in while every block runs. A 3×3/2 convolution 256 → 512 on a 14×14
/// input, its weights evicted before each run: 1.19–1.34 → 0.97–1.04 ms
/// (median of 300 runs, three alternating rounds).
const PREFETCH_BLOCKS: usize = 4;
/// Floats of the next slice each of those blocks prefetches.
const PREFETCH_SPAN: usize = DEPTH_SLICE * PANEL_ROWS / PREFETCH_BLOCKS;
/// Floats between prefetches: one per depth index, half a cache line, so
/// a block's 128 depth indices cover its span.
const PREFETCH_STEP: usize = PREFETCH_SPAN / DEPTH_SLICE;

/// A chunk's sums: `[column][row of the panel]`.
type ChunkSums = [[f32; PANEL_ROWS]; CHUNK_COLS];

/// A weight matrix (rows × depth) packed in panels of [`PANEL_ROWS`]
/// rows, each stored depth index by depth index.
#[derive(Debug, Clone)]
pub struct PanelWeights {
    rows: usize,
    depth: usize,
    /// `[panel][depth][PANEL_ROWS]`.
    data: Vec<f32>,
}

impl PanelWeights {
    /// Packs the row-major `rows × depth` matrix `matrix` (at least
    /// `rows · depth` values).
    pub fn new(matrix: &[f32], rows: usize, depth: usize) -> Self {
        let panels = rows.div_ceil(PANEL_ROWS);
        let mut data = vec![0f32; panels * depth * PANEL_ROWS];
        if depth > 0 {
            for (row, values) in matrix.chunks_exact(depth).take(rows).enumerate() {
                let (panel, lane) = (row / PANEL_ROWS, row % PANEL_ROWS);
                for (k, value) in values.iter().enumerate() {
                    data[(panel * depth + k) * PANEL_ROWS + lane] = *value;
                }
            }
        }
        Self { rows, depth, data }
    }

    /// Panels of [`PANEL_ROWS`] rows (the last one may be partial).
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL_ROWS)
    }
}

/// Whether [`multiply`] runs on this CPU (the kernels are AVX-512 and
/// AVX2 + FMA).
pub fn available() -> bool {
    vector_isa::active() >= VectorIsa::Avx2
}

/// Y = W · X + bias (+ residual) (ReLU) for W's rows in the panels
/// `panels` (rows `PANEL_ROWS · panels.start` up to `PANEL_ROWS ·
/// panels.end`, cut at W's last row) and every column of `operands`.
///
/// # Safety
/// As [`super::packed_gemm::multiply`]: X's `depth` rows of `cols`
/// readable, the rows of Y written (and of the residual, when not null)
/// this caller's alone; `epilogue.bias`, when given, has at least
/// `weights.rows` values; and [`available`] is true.
pub unsafe fn multiply(
    weights: &PanelWeights,
    panels: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    debug_assert!(available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded; the CPU has the kernel's instructions (`active`).
    unsafe {
        match vector_isa::active() {
            VectorIsa::Avx512 => multiply_avx512(weights, panels, operands, epilogue),
            VectorIsa::Avx2 => multiply_avx2(weights, panels, operands, epilogue),
            VectorIsa::Portable => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (weights, panels, operands, epilogue);
}

/// [`multiply`] on the AVX-512 path: [`panel_loops`] with [`kernel_avx512`].
///
/// # Safety
/// As [`multiply`]; the CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn multiply_avx512(
    weights: &PanelWeights,
    panels: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    // SAFETY: the kernel's contract is the loops' (the caller's); the CPU
    // has AVX-512 F.
    unsafe {
        panel_loops::<BLOCK_COLS_AVX512>(
            weights,
            panels,
            operands,
            epilogue,
            |slice, x, stride, sums, width, first, ahead| match width {
                12 => kernel_avx512::<12>(slice, x, stride, sums, first, ahead),
                11 => kernel_avx512::<11>(slice, x, stride, sums, first, ahead),
                10 => kernel_avx512::<10>(slice, x, stride, sums, first, ahead),
                9 => kernel_avx512::<9>(slice, x, stride, sums, first, ahead),
                8 => kernel_avx512::<8>(slice, x, stride, sums, first, ahead),
                7 => kernel_avx512::<7>(slice, x, stride, sums, first, ahead),
                6 => kernel_avx512::<6>(slice, x, stride, sums, first, ahead),
                5 => kernel_avx512::<5>(slice, x, stride, sums, first, ahead),
                4 => kernel_avx512::<4>(slice, x, stride, sums, first, ahead),
                3 => kernel_avx512::<3>(slice, x, stride, sums, first, ahead),
                2 => kernel_avx512::<2>(slice, x, stride, sums, first, ahead),
                _ => kernel_avx512::<1>(slice, x, stride, sums, first, ahead),
            },
        );
    }
}

/// [`multiply`] on the AVX2 path: [`panel_loops`] with [`kernel_avx2`].
///
/// # Safety
/// As [`multiply`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn multiply_avx2(
    weights: &PanelWeights,
    panels: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    // SAFETY: the kernel's contract is the loops' (the caller's); the CPU
    // has AVX2 and FMA.
    unsafe {
        panel_loops::<BLOCK_COLS_AVX2>(
            weights,
            panels,
            operands,
            epilogue,
            |slice, x, stride, sums, width, first, ahead| match width {
                6 => kernel_avx2::<6>(slice, x, stride, sums, first, ahead),
                5 => kernel_avx2::<5>(slice, x, stride, sums, first, ahead),
                4 => kernel_avx2::<4>(slice, x, stride, sums, first, ahead),
                3 => kernel_avx2::<3>(slice, x, stride, sums, first, ahead),
                2 => kernel_avx2::<2>(slice, x, stride, sums, first, ahead),
                _ => kernel_avx2::<1>(slice, x, stride, sums, first, ahead),
            },
        );
    }
}

/// [`multiply`]'s loops, for a kernel of up to `COLS` columns: per panel,
/// the columns in chunks of [`CHUNK_COLS`]; per chunk, the depth in slices
/// of [`DEPTH_SLICE`], each run through every block of `COLS` columns of
/// the chunk (the slice of W then comes from L1 for all but the first);
/// then the epilogue. `kernel(slice, x, stride, sums, width, first,
/// ahead)` adds the slice's products for `width` ≤ `COLS` columns of X
/// from `x` to `sums` (starting from zero when `first`), prefetching
/// [`PREFETCH_SPAN`] floats from `ahead` unless it is null (the first
/// [`PREFETCH_BLOCKS`] blocks: the next slice, or past the panel's last
/// one the next panel's first slice; addresses past the weights are
/// never read, a prefetch does not fault).
///
/// # Safety
/// As [`multiply`]; `kernel` reads X's rows of the slice, `width` values
/// from `x`, and writes only `sums`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel_loops<const COLS: usize>(
    weights: &PanelWeights,
    panels: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
    kernel: impl Fn(&[f32], *const f32, usize, &mut [[f32; PANEL_ROWS]; COLS], usize, bool, *const f32),
) {
    let depth = weights.depth;
    for panel in panels.start..panels.end.min(weights.panels()) {
        let packed = &weights.data[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
        let first_row = panel * PANEL_ROWS;
        let rows = PANEL_ROWS.min(weights.rows - first_row);
        for chunk in (0..operands.cols).step_by(CHUNK_COLS) {
            let chunk_width = CHUNK_COLS.min(operands.cols - chunk);
            // sums[j][r]: column chunk + j, row first_row + r.
            let mut sums: ChunkSums = [[0f32; PANEL_ROWS]; CHUNK_COLS];
            for start in (0..depth).step_by(DEPTH_SLICE) {
                let slice =
                    &packed[start * PANEL_ROWS..][..DEPTH_SLICE.min(depth - start) * PANEL_ROWS];
                let (blocks, _) = sums.as_chunks_mut::<COLS>();
                for (block, sums) in blocks.iter_mut().enumerate() {
                    let col = block * COLS;
                    if col >= chunk_width {
                        break;
                    }
                    let width = COLS.min(chunk_width - col);
                    let x = operands
                        .rhs
                        .wrapping_add(start * operands.rhs_stride + chunk + col);
                    // Blocks 0 to 3 each fetch a quarter of the next
                    // slice into L2 as they go (`kernel_avx512`).
                    let ahead = if block < PREFETCH_BLOCKS {
                        packed.as_ptr().wrapping_add(
                            (start + DEPTH_SLICE) * PANEL_ROWS + block * PREFETCH_SPAN,
                        )
                    } else {
                        std::ptr::null()
                    };
                    kernel(
                        slice,
                        x,
                        operands.rhs_stride,
                        sums,
                        width,
                        start == 0,
                        ahead,
                    );
                }
            }
            for (j, column) in sums.iter().enumerate().take(chunk_width) {
                for (r, &sum) in column.iter().enumerate().take(rows) {
                    let row = first_row + r;
                    let at = row * operands.dst_stride + chunk + j;
                    let mut extra = epilogue.bias.map_or(0.0, |b| b[row]);
                    if !operands.residual.is_null() {
                        // SAFETY: element (row, chunk + j) of the residual
                        // is readable (the caller's contract).
                        extra += unsafe { *operands.residual.add(at) };
                    }
                    let mut value = sum + extra;
                    if epilogue.relu {
                        value = value.max(0.0);
                    }
                    // SAFETY: element (row, chunk + j) of Y is this
                    // caller's to write.
                    unsafe { *operands.dst.add(at) = value };
                }
            }
        }
    }
}

/// `sums[j][r]` (+)= Σ_k W[r][k] · X[k][j] over a slice of a panel
/// (`[slice depth][PANEL_ROWS]`) and `B` columns of X from `x` (row
/// stride `stride`), starting from zero when `first`, else from `sums`:
/// per depth index two loads of W, then per column a broadcast of X and
/// two fused multiply-adds; and, unless `ahead` is null, a prefetch into
/// L2 of the cache line [`PREFETCH_STEP`] floats further each time from
/// `ahead` ([`PREFETCH_SPAN`] floats in all).
///
/// # Safety
/// X's rows of the slice hold `B` readable values from `x`; the CPU has
/// AVX-512 F. `ahead` is only prefetched, never read.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel_avx512<const B: usize>(
    slice: &[f32],
    x: *const f32,
    stride: usize,
    sums: &mut [[f32; PANEL_ROWS]; BLOCK_COLS_AVX512],
    first: bool,
    ahead: *const f32,
) {
    use std::arch::x86_64::{
        __m512, _MM_HINT_T1, _mm_prefetch, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_storeu_ps,
    };
    let mut acc: [[__m512; 2]; B] = [[_mm512_setzero_ps(); 2]; B];
    if !first {
        for (sum, from) in acc.iter_mut().zip(sums.iter()) {
            // SAFETY: `from` is PANEL_ROWS floats (two 512-bit loads).
            *sum = unsafe {
                [
                    _mm512_loadu_ps(from.as_ptr()),
                    _mm512_loadu_ps(from[16..].as_ptr()),
                ]
            };
        }
    }
    let mut row = x;
    let mut next = ahead;
    for w in slice.chunks_exact(PANEL_ROWS) {
        if !ahead.is_null() {
            _mm_prefetch::<_MM_HINT_T1>(next.cast());
            next = next.wrapping_add(PREFETCH_STEP);
        }
        // SAFETY: `w` is PANEL_ROWS floats (two 512-bit loads).
        let (w0, w1) = unsafe {
            (
                _mm512_loadu_ps(w.as_ptr()),
                _mm512_loadu_ps(w[16..].as_ptr()),
            )
        };
        for (j, sum) in acc.iter_mut().enumerate() {
            // SAFETY: column j < B of this row of X (the caller's contract).
            let b = _mm512_set1_ps(unsafe { *row.add(j) });
            sum[0] = _mm512_fmadd_ps(w0, b, sum[0]);
            sum[1] = _mm512_fmadd_ps(w1, b, sum[1]);
        }
        row = row.wrapping_add(stride);
    }
    for (out, sum) in sums.iter_mut().zip(acc) {
        // SAFETY: `out` is PANEL_ROWS floats (two 512-bit stores).
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), sum[0]);
            _mm512_storeu_ps(out[16..].as_mut_ptr(), sum[1]);
        }
    }
}

/// [`kernel_avx512`] on the AVX2 path: the same sums, for each half of the
/// panel (16 rows) in turn: per depth index two 8-lane loads of W's half,
/// then per column (`B` ≤ [`BLOCK_COLS_AVX2`]) a broadcast of X and two
/// fused multiply-adds, the 12 sums and 3 operands in 15 of the 16
/// registers.
///
/// # Safety
/// X's rows of the slice hold `B` readable values from `x`; the CPU has
/// AVX2 and FMA. `ahead` is only prefetched (during the first half's
/// pass), never read.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2<const B: usize>(
    slice: &[f32],
    x: *const f32,
    stride: usize,
    sums: &mut [[f32; PANEL_ROWS]; BLOCK_COLS_AVX2],
    first: bool,
    ahead: *const f32,
) {
    use std::arch::x86_64::{
        __m256, _MM_HINT_T1, _mm_prefetch, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps,
        _mm256_setzero_ps, _mm256_storeu_ps,
    };
    const HALF: usize = PANEL_ROWS / 2;
    for half in [0, HALF] {
        let mut acc: [[__m256; 2]; B] = [[_mm256_setzero_ps(); 2]; B];
        if !first {
            for (sum, from) in acc.iter_mut().zip(sums.iter()) {
                let from = &from[half..half + HALF];
                // SAFETY: `from` is 16 floats (two 256-bit loads).
                *sum = unsafe {
                    [
                        _mm256_loadu_ps(from.as_ptr()),
                        _mm256_loadu_ps(from[8..].as_ptr()),
                    ]
                };
            }
        }
        let mut row = x;
        // The first half's pass fetches the next slice's quarter.
        let mut next = if half == 0 { ahead } else { std::ptr::null() };
        for w in slice.chunks_exact(PANEL_ROWS) {
            if !next.is_null() {
                _mm_prefetch::<_MM_HINT_T1>(next.cast());
                next = next.wrapping_add(PREFETCH_STEP);
            }
            let w = &w[half..half + HALF];
            // SAFETY: `w` is 16 floats (two 256-bit loads).
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_ps(w.as_ptr()),
                    _mm256_loadu_ps(w[8..].as_ptr()),
                )
            };
            for (j, sum) in acc.iter_mut().enumerate() {
                // SAFETY: column j < B of this row of X (the caller's contract).
                let b = _mm256_set1_ps(unsafe { *row.add(j) });
                sum[0] = _mm256_fmadd_ps(w0, b, sum[0]);
                sum[1] = _mm256_fmadd_ps(w1, b, sum[1]);
            }
            row = row.wrapping_add(stride);
        }
        for (out, sum) in sums.iter_mut().zip(acc) {
            let out = &mut out[half..half + HALF];
            // SAFETY: `out` is 16 floats (two 256-bit stores).
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), sum[0]);
                _mm256_storeu_ps(out[8..].as_mut_ptr(), sum[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_conv::tests::values;

    /// The paths this CPU runs, by name.
    #[cfg(target_arch = "x86_64")]
    fn paths() -> Vec<(&'static str, Multiply)> {
        let mut paths: Vec<(&'static str, Multiply)> = Vec::new();
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            paths.push(("avx2", multiply_avx2));
        }
        if std::is_x86_feature_detected!("avx512f") {
            paths.push(("avx512", multiply_avx512));
        }
        paths
    }

    #[cfg(target_arch = "x86_64")]
    type Multiply = unsafe fn(&PanelWeights, Range<usize>, Operands, Epilogue<'_>);

    /// Against a plain f64 product, with bias, residual and ReLU, for
    /// partial panels and every column-block width, on every path this CPU
    /// runs; and the paths give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panel_product_equals_plain_product() {
        for &(rows, depth, cols) in &[
            (32, 7, 1),
            (40, 33, 13),
            (64, 300, 49),
            (5, 2, 24),
            (32, 260, 130),
        ] {
            let w = values(rows * depth, 1);
            let x = values(depth * cols, 2);
            let bias = values(rows, 3);
            let residual = values(rows * cols, 4);
            let packed = PanelWeights::new(&w, rows, depth);
            let mut first: Option<Vec<f32>> = None;
            for (name, multiply) in paths() {
                let mut y = vec![f32::NAN; rows * cols];
                let operands = Operands {
                    rhs: x.as_ptr(),
                    rhs_stride: cols,
                    cols,
                    dst: y.as_mut_ptr(),
                    residual: residual.as_ptr(),
                    dst_stride: cols,
                };
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    relu: true,
                };
                // SAFETY: X is depth × cols, Y and the residual rows × cols,
                // the bias rows long; the CPU runs the path (`paths`).
                unsafe { multiply(&packed, 0..packed.panels(), operands, epilogue) };
                if let Some(first) = &first {
                    let same = first
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{rows}×{depth}×{cols}: {name} differs from the first path"
                    );
                }
                for r in 0..rows {
                    for c in 0..cols {
                        let mut want: f64 = (0..depth)
                            .map(|k| f64::from(w[r * depth + k]) * f64::from(x[k * cols + c]))
                            .sum();
                        want += f64::from(bias[r]) + f64::from(residual[r * cols + c]);
                        let want = want.max(0.0);
                        let got = f64::from(y[r * cols + c]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{name} {rows}×{depth}×{cols} ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
                first.get_or_insert(y);
            }
        }
    }
}
