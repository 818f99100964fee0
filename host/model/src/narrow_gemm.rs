//! Matrix products with few columns, `Y = W · X`, vectorised along W's
//! rows: the deep convolutions of a ResNet at batch 1, whose outputs have
//! 7×7 or 14×14 pixels (49 or 196 columns) and whose weights are the
//! bulk of what they read.
//!
//! [`super::packed_gemm`] vectorises along X's columns, 32 at a time: 49
//! columns become 64 and the last vector is mostly lanes thrown away.
//! Here the weights are packed once into panels of [`PANEL_ROWS`] rows
//! (`[panel][depth][PANEL_ROWS]`, the rows past the last zero) and the
//! kernel holds a panel's 32 rows × up to [`BLOCK_COLS`] columns of sums
//! in 24 AVX-512 registers: per depth index, two loads of W and one
//! broadcast of X per column; a block of fewer columns costs
//! proportionally less, so 49 columns cost 49, not 64.
//!
//! AVX-512 only (the callers check [`vector_isa::active`]); the other
//! paths keep `gemm`. The sums run over the depth in order, one fused
//! multiply-add per term, then + (bias + residual) and the ReLU, as in
//! [`super::packed_gemm`].

use std::ops::Range;

use crate::packed_gemm::{Epilogue, Operands};
use crate::vector_isa::{self, VectorIsa};

/// Rows of W per packed panel: two 16-lane vectors.
pub const PANEL_ROWS: usize = 32;
/// Columns of X per kernel call at most (24 sums in registers).
const BLOCK_COLS: usize = 12;
/// Column blocks whose sums wait in memory between depth slices.
const CHUNK_BLOCKS: usize = 5;
/// Depth indices per slice: a slice of the panel (16 KiB) and of X's
/// columns in a chunk (up to 30 KiB) stay in L1 while the chunk's blocks
/// reuse them.
const DEPTH_SLICE: usize = 128;

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

/// Whether [`multiply`] runs on this CPU (the kernel is AVX-512).
pub fn available() -> bool {
    vector_isa::active() == VectorIsa::Avx512
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
    // SAFETY: forwarded; the CPU has AVX-512 F (`available`).
    unsafe {
        multiply_avx512(weights, panels, operands, epilogue);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (weights, panels, operands, epilogue);
}

/// [`multiply`]'s loops: per panel, the columns in chunks of
/// [`CHUNK_BLOCKS`] blocks of [`BLOCK_COLS`]; per chunk, the depth in
/// slices of [`DEPTH_SLICE`], each run through every block of the chunk
/// (the slice of W then comes from L1 for all but the first); then the
/// epilogue.
///
/// # Safety
/// As [`multiply`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn multiply_avx512(
    weights: &PanelWeights,
    panels: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    let depth = weights.depth;
    let chunk_cols = CHUNK_BLOCKS * BLOCK_COLS;
    for panel in panels.start..panels.end.min(weights.panels()) {
        let packed = &weights.data[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
        let first_row = panel * PANEL_ROWS;
        let rows = PANEL_ROWS.min(weights.rows - first_row);
        for chunk in (0..operands.cols).step_by(chunk_cols) {
            let chunk_width = chunk_cols.min(operands.cols - chunk);
            // sums[j][r]: column chunk + j, row first_row + r.
            let mut sums = [[0f32; PANEL_ROWS]; CHUNK_BLOCKS * BLOCK_COLS];
            for start in (0..depth).step_by(DEPTH_SLICE) {
                let slice =
                    &packed[start * PANEL_ROWS..][..DEPTH_SLICE.min(depth - start) * PANEL_ROWS];
                let (blocks, _) = sums.as_chunks_mut::<BLOCK_COLS>();
                for (block, sums) in blocks.iter_mut().enumerate() {
                    let col = block * BLOCK_COLS;
                    if col >= chunk_width {
                        break;
                    }
                    let width = BLOCK_COLS.min(chunk_width - col);
                    let x = operands
                        .rhs
                        .wrapping_add(start * operands.rhs_stride + chunk + col);
                    let stride = operands.rhs_stride;
                    let first = start == 0;
                    // SAFETY: X's rows in the slice hold `width` readable
                    // values from column chunk + col (the caller's
                    // contract); the CPU has AVX-512 F.
                    unsafe {
                        match width {
                            12 => kernel::<12>(slice, x, stride, sums, first),
                            11 => kernel::<11>(slice, x, stride, sums, first),
                            10 => kernel::<10>(slice, x, stride, sums, first),
                            9 => kernel::<9>(slice, x, stride, sums, first),
                            8 => kernel::<8>(slice, x, stride, sums, first),
                            7 => kernel::<7>(slice, x, stride, sums, first),
                            6 => kernel::<6>(slice, x, stride, sums, first),
                            5 => kernel::<5>(slice, x, stride, sums, first),
                            4 => kernel::<4>(slice, x, stride, sums, first),
                            3 => kernel::<3>(slice, x, stride, sums, first),
                            2 => kernel::<2>(slice, x, stride, sums, first),
                            _ => kernel::<1>(slice, x, stride, sums, first),
                        }
                    }
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
/// two fused multiply-adds.
///
/// # Safety
/// X's rows of the slice hold `B` readable values from `x`; the CPU has
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const B: usize>(
    slice: &[f32],
    x: *const f32,
    stride: usize,
    sums: &mut [[f32; PANEL_ROWS]; BLOCK_COLS],
    first: bool,
) {
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps,
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
    for w in slice.chunks_exact(PANEL_ROWS) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_conv::tests::values;

    /// Against a plain f64 product, with bias, residual and ReLU, for
    /// partial panels and every column-block width.
    #[test]
    fn panel_product_equals_plain_product() {
        if !available() {
            return;
        }
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
            // the bias rows long; AVX-512 checked above.
            unsafe { multiply(&packed, 0..packed.panels(), operands, epilogue) };
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
                        "{rows}×{depth}×{cols} ({r}, {c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
