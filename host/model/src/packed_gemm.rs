//! Matrix products with the weights packed once, at load: `Y = W · X`
//! for a weight matrix W (rows × depth) and a row-major X (depth ×
//! columns), with a per-row bias, an optional residual and an optional
//! ReLU applied as each result is stored.
//!
//! Used by the convolutions' inference paths ([`super::cpu_conv`]: im2col
//! and 1×1; [`super::winograd`]: one product per frequency). A general
//! `gemm` repacks its left operand on every call and splits the work in
//! ways that suit large square matrices; the convolutions of a ResNet at
//! batch 1 multiply the same weights every time by narrow right operands
//! (16 to a few thousand columns), so the weights are packed once into
//! blocks of [`BLOCK_ROWS`] rows, each stored column by column (the
//! `BLOCK_ROWS` values of one depth index side by side), and a small
//! register-blocked kernel streams through them.
//!
//! Vector code: the kernel is written three times, chosen at run time
//! ([`vector_isa::active`]):
//! - AVX-512: two blocks of [`BLOCK_ROWS`] rows × 32 columns in 24
//!   16-lane registers (per depth index two loads of X, twelve broadcasts
//!   of W, 24 multiply-adds), the last partial column block read and
//!   written in place through lane masks;
//! - AVX2 + FMA: [`BLOCK_ROWS`] × 16 in twelve 8-lane registers;
//! - plain arrays (the portable path; on aarch64 the compiler vectorises
//!   it for NEON).
//!
//! The sums run over the depth in order, one multiply-add per term, so
//! the paths differ only by the rounding of the fused multiply-add.

use std::cell::RefCell;
use std::ops::Range;

use crate::scratch::with_scratch;
use crate::vector_isa::{self, VectorIsa};

/// Rows of W per packed block: the height of the kernel.
pub const BLOCK_ROWS: usize = 6;
/// f32 lanes per vector (AVX2).
const LANES: usize = 8;
/// Columns per kernel call at most: two vectors.
const BLOCK_COLS: usize = 2 * LANES;
/// Below this many floats of packed weights in the rows a call covers,
/// the loop runs column block by column block (each block of X read once,
/// the weights re-read from cache); above, row block by row block (each
/// block of W read once, X re-read from cache).
const WEIGHTS_IN_CACHE: usize = 1 << 16;
/// Depth indices per pass at most: deeper products run in passes over
/// slices of the depth, so that the slice of X a pass re-reads (up to
/// 256 × 16 floats per column block) stays in L1 and L2; the partial
/// sums wait in Y and the epilogue comes with the last pass.
const DEPTH_BLOCK: usize = 256;

thread_local! {
    /// X's last, partial column block, copied and zero-padded to whole
    /// vectors (the kernel reads whole vectors).
    static TAIL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A weight matrix (rows × depth) packed for the kernel: blocks of
/// [`BLOCK_ROWS`] rows, each stored depth index by depth index, the rows
/// past the last zero.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    rows: usize,
    depth: usize,
    /// `[block][depth][BLOCK_ROWS]`.
    data: Vec<f32>,
}

impl PackedWeights {
    /// Packs the row-major `rows × depth` matrix `matrix` (at least
    /// `rows · depth` values).
    pub fn new(matrix: &[f32], rows: usize, depth: usize) -> Self {
        let mut data = vec![0f32; Self::packed_len(rows, depth)];
        if depth > 0 {
            for (row, values) in matrix.chunks_exact(depth).take(rows).enumerate() {
                for (k, value) in values.iter().enumerate() {
                    data[Self::packed_offset(row, k, depth)] = *value;
                }
            }
        }
        Self { rows, depth, data }
    }

    /// Floats of a packed `rows × depth` matrix: whole blocks of
    /// [`BLOCK_ROWS`] rows.
    pub fn packed_len(rows: usize, depth: usize) -> usize {
        rows.div_ceil(BLOCK_ROWS) * depth * BLOCK_ROWS
    }

    /// Where element (row, k) of a packed matrix of depth `depth` sits in
    /// its data.
    pub fn packed_offset(row: usize, k: usize, depth: usize) -> usize {
        ((row / BLOCK_ROWS) * depth + k) * BLOCK_ROWS + row % BLOCK_ROWS
    }

    /// A `rows × depth` matrix written directly in the packed layout
    /// ([`Self::packed_offset`]; [`Self::packed_len`] values, the rows past
    /// the last zero): what [`Self::new`] would store, without the
    /// row-major copy.
    pub(crate) fn from_packed(rows: usize, depth: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), Self::packed_len(rows, depth));
        Self { rows, depth, data }
    }

    /// Rows of W.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks of [`BLOCK_ROWS`] rows (the last one may be partial).
    pub fn blocks(&self) -> usize {
        self.rows.div_ceil(BLOCK_ROWS)
    }
}

/// What is applied to each result as it is stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Added to every result of row i: `bias[i]` (indexed by W's row).
    pub bias: Option<&'a [f32]>,
    /// max(0, ·) last.
    pub relu: bool,
}

/// The operands of one product, as raw parts so that threads can each
/// write their own rows or columns of one destination.
#[derive(Debug, Clone, Copy)]
pub struct Operands {
    /// X: element (k, j) at `rhs + k · rhs_stride + j`.
    pub rhs: *const f32,
    /// Row stride of X.
    pub rhs_stride: usize,
    /// Columns of X and Y.
    pub cols: usize,
    /// Y: element (i, j) at `dst + i · dst_stride + j` (i is W's row).
    pub dst: *mut f32,
    /// Added to Y before the ReLU when not null: element (i, j) at
    /// `residual + i · dst_stride + j`.
    pub residual: *const f32,
    /// Row stride of Y and the residual.
    pub dst_stride: usize,
}

/// Y = W · X (+ bias) (+ residual) (ReLU) for W's rows in the row blocks
/// `blocks` (rows `BLOCK_ROWS · blocks.start` up to `BLOCK_ROWS ·
/// blocks.end`, cut at W's last row) and every column of `operands`.
///
/// # Safety
/// For every k < depth and j < cols, `rhs + k · rhs_stride + j` must be
/// readable; for every row i written (above) and j < cols, `dst + i ·
/// dst_stride + j` writable (and `residual + …` readable when not null),
/// with no other thread reading or writing those elements of Y during the
/// call; `epilogue.bias`, when given, has at least `weights.rows()`
/// values.
pub unsafe fn multiply(
    weights: &PackedWeights,
    blocks: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    // SAFETY: forwarded.
    unsafe { multiply_on(vector_isa::active(), weights, blocks, operands, epilogue) }
}

/// [`multiply`] with the kernel of `isa` (at most what the CPU runs:
/// [`vector_isa::detected`]).
///
/// # Safety
/// As [`multiply`].
pub(crate) unsafe fn multiply_on(
    isa: VectorIsa,
    weights: &PackedWeights,
    blocks: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    let blocks = blocks.start..blocks.end.min(weights.blocks());
    if blocks.is_empty() || operands.cols == 0 {
        return;
    }
    let isa = isa.min(vector_isa::detected());
    #[cfg(target_arch = "x86_64")]
    if isa == VectorIsa::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`isa` is at most what it runs);
        // the caller upholds the memory contract.
        unsafe { multiply_avx512(weights, blocks, operands, epilogue) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == VectorIsa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (as above); the caller upholds
        // the memory contract.
        unsafe { multiply_avx2(weights, blocks, operands, epilogue) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    // SAFETY: the caller upholds the memory contract.
    unsafe { multiply_generic::<false>(weights, blocks, operands, epilogue) };
}

/// [`multiply_generic`] with the AVX2 + FMA kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn multiply_avx2(
    weights: &PackedWeights,
    blocks: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    // SAFETY: forwarded from `multiply`'s contract; the CPU has AVX2 and
    // FMA.
    unsafe { multiply_generic::<true>(weights, blocks, operands, epilogue) };
}

/// The loops around the kernel: column blocks of X (full ones read in
/// place, the last partial one from a zero-padded copy) × row blocks of
/// W, in the order that keeps the larger operand streaming once.
/// `AVX` selects the AVX2 kernel (only from [`multiply_avx2`]).
#[inline(always)]
unsafe fn multiply_generic<const AVX: bool>(
    weights: &PackedWeights,
    blocks: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    let depth = weights.depth;
    let cols = operands.cols;
    let full = cols / BLOCK_COLS * BLOCK_COLS;
    #[cfg(target_arch = "x86_64")]
    let end = blocks.end;
    let tail_width = cols - full;
    with_scratch(&TAIL, |tail| {
        // The partial block: used in place when it is one whole vector,
        // else copied into a zero-padded depth × 16 panel.
        let tail_panel: Option<(*const f32, usize)> = match tail_width {
            0 => None,
            // SAFETY: column `full` .. `full` + 8 of X is inside it.
            LANES => Some((unsafe { operands.rhs.add(full) }, operands.rhs_stride)),
            _ => {
                tail.clear();
                tail.resize(depth * BLOCK_COLS, 0.0);
                for (k, row) in tail.chunks_exact_mut(BLOCK_COLS).enumerate() {
                    for (j, cell) in row.iter_mut().enumerate().take(tail_width) {
                        // SAFETY: k < depth and full + j < cols.
                        *cell = unsafe { *operands.rhs.add(k * operands.rhs_stride + full + j) };
                    }
                }
                Some((tail.as_ptr(), BLOCK_COLS))
            }
        };
        // One (row block, column block, depth slice) step: the kernel,
        // then the store.
        let step = |block: usize, col: usize, slice: &Range<usize>, pass: Pass| {
            let (rhs, stride, width) = if col < full {
                // SAFETY: column `col` .. `col` + 16 of X is inside it.
                (
                    unsafe { operands.rhs.add(col) },
                    operands.rhs_stride,
                    BLOCK_COLS,
                )
            } else if let Some((rhs, stride)) = tail_panel {
                (rhs, stride, tail_width)
            } else {
                return;
            };
            let packed = &weights.data[(block * depth + slice.start) * BLOCK_ROWS..]
                [..slice.len() * BLOCK_ROWS];
            let first_row = block * BLOCK_ROWS;
            let rows = BLOCK_ROWS.min(weights.rows - first_row);
            let rhs = rhs.wrapping_add(slice.start * stride);
            #[cfg(target_arch = "x86_64")]
            if AVX && (width == BLOCK_COLS || width == LANES) {
                // Whole vectors: the epilogue in registers, stored in place.
                let block_out = BlockOut::new(&operands, epilogue, (first_row, rows), col, pass);
                let lead = weights_lead(block, 1, end, depth);
                // SAFETY: rows slice.start .. slice.end of the panel at
                // `rhs` hold `width` readable values; the block of Y (and
                // of the residual) is the caller's and this thread's.
                unsafe {
                    if width == BLOCK_COLS && col + BLOCK_COLS < cols {
                        kernel_avx2_out::<2, true>(packed, rhs, stride, &block_out, lead);
                    } else if width == BLOCK_COLS {
                        kernel_avx2_out::<2, false>(packed, rhs, stride, &block_out, lead);
                    } else {
                        kernel_avx2_out::<1, false>(packed, rhs, stride, &block_out, lead);
                    }
                }
                return;
            }
            let mut acc = [[0f32; BLOCK_COLS]; BLOCK_ROWS];
            // SAFETY: rows slice.start .. slice.end < depth of the panel at
            // `rhs` hold at least `width` (rounded up to whole vectors)
            // readable values.
            unsafe {
                kernel::<AVX>(packed, rhs, stride, width > LANES, &mut acc);
            }
            // SAFETY: rows first_row .. first_row + rows are in the
            // caller's row blocks, columns col .. col + width in 0..cols.
            unsafe {
                store(
                    &acc,
                    (first_row, rows),
                    (col, width),
                    operands,
                    (epilogue, pass),
                )
            };
        };
        for_each_step(
            blocks,
            1,
            depth,
            cols.div_ceil(BLOCK_COLS),
            |block, c, slice, pass| {
                step(block, c * BLOCK_COLS, slice, pass);
            },
        );
    });
}

/// Calls `step(first row block, column step, depth slice, pass)` for
/// every step of a product, the row blocks taken `group` at a time (the
/// last group may be smaller): the depth in passes of at most
/// [`DEPTH_BLOCK`] indices, and within a pass the order that keeps the
/// larger operand streaming once ([`WEIGHTS_IN_CACHE`]).
#[inline(always)]
fn for_each_step(
    blocks: Range<usize>,
    group: usize,
    depth: usize,
    col_steps: usize,
    mut step: impl FnMut(usize, usize, &Range<usize>, Pass),
) {
    let passes = depth.div_ceil(DEPTH_BLOCK).max(1);
    let per_pass = depth.div_ceil(passes);
    for p in 0..passes {
        let slice = p * per_pass..((p + 1) * per_pass).min(depth);
        let pass = Pass {
            first: p == 0,
            last: p + 1 == passes,
        };
        if blocks.len() * slice.len() * BLOCK_ROWS <= WEIGHTS_IN_CACHE {
            for c in 0..col_steps {
                for block in blocks.clone().step_by(group) {
                    step(block, c, &slice, pass);
                }
            }
        } else {
            for block in blocks.clone().step_by(group) {
                for c in 0..col_steps {
                    step(block, c, &slice, pass);
                }
            }
        }
    }
}

/// Columns per kernel call on the AVX-512 path: two 16-lane vectors.
#[cfg(target_arch = "x86_64")]
const WIDE_COLS: usize = 32;

/// Row blocks per kernel call on the AVX-512 path: two, so that each load
/// of X feeds twelve rows (24 sums in registers for 32 columns, 12 for 16:
/// enough independent multiply-adds to hide their latency).
#[cfg(target_arch = "x86_64")]
const BLOCK_PAIR: usize = 2;

/// The product with the AVX-512 kernel: [`BLOCK_PAIR`] row blocks ×
/// [`WIDE_COLS`] columns per call, the last partial column block read and
/// written in place through lane masks (no padded copy), the epilogue in
/// registers.
///
/// # Safety
/// As [`multiply`]; the CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn multiply_avx512(
    weights: &PackedWeights,
    blocks: Range<usize>,
    operands: Operands,
    epilogue: Epilogue<'_>,
) {
    let depth = weights.depth;
    let cols = operands.cols;
    let end = blocks.end;
    let col_steps = cols.div_ceil(WIDE_COLS);
    for_each_step(
        blocks,
        BLOCK_PAIR,
        depth,
        col_steps,
        |first, c, slice, pass| {
            let col = c * WIDE_COLS;
            let width = WIDE_COLS.min(cols - col);
            let block = |b: usize| block_parts(weights, b, slice, &operands, epilogue, col, pass);
            // X's rows of this slice, from column `col`.
            let rhs = operands
                .rhs
                .wrapping_add(slice.start * operands.rhs_stride + col);
            let stride = operands.rhs_stride;
            // Whether another column block follows (its lines are fetched
            // while this one is multiplied: see [`kernel_avx512`]).
            let next = col + WIDE_COLS < cols;
            let lead = weights_lead(first, BLOCK_PAIR, end, depth);
            // SAFETY: X's rows in `slice` hold `width` readable values from
            // `rhs`; the blocks of Y (and of the residual) are this thread's;
            // the CPU has AVX-512 F.
            unsafe {
                if first + 1 < end {
                    let [(p0, o0), (p1, o1)] = [block(first), block(first + 1)];
                    kernel_avx512_width([p0, p1], rhs, stride, [&o0, &o1], width, next, lead);
                } else {
                    let (p0, o0) = block(first);
                    kernel_avx512_width([p0], rhs, stride, [&o0], width, next, lead);
                }
            }
        },
    );
}

/// Row block `b`'s slice `slice` of the packed weights and its block of
/// Y at column `col`: what one kernel call on the AVX-512 path takes.
/// Inlined into the loop (a call per kernel call, as a closure, was a
/// tenth of a short-depth product's time).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn block_parts<'a>(
    weights: &'a PackedWeights,
    b: usize,
    slice: &Range<usize>,
    operands: &Operands,
    epilogue: Epilogue<'a>,
    col: usize,
    pass: Pass,
) -> (&'a [f32], BlockOut<'a>) {
    let depth = weights.depth;
    let packed =
        &weights.data[(b * depth + slice.start) * BLOCK_ROWS..][..slice.len() * BLOCK_ROWS];
    let first_row = b * BLOCK_ROWS;
    let rows = BLOCK_ROWS.min(weights.rows - first_row);
    let out = BlockOut::new(operands, epilogue, (first_row, rows), col, pass);
    (packed, out)
}

/// [`kernel_avx512`] compiled for `width` (1 to [`WIDE_COLS`] columns):
/// one or two vectors, whole or masked; a whole block prefetches the next
/// one's columns when `prefetch_next`; the weights `lead` floats on are
/// prefetched as these are read.
///
/// # Safety
/// As [`kernel_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel_avx512_width<const B: usize>(
    packed: [&[f32]; B],
    rhs: *const f32,
    stride: usize,
    out: [&BlockOut<'_>; B],
    width: usize,
    prefetch_next: bool,
    lead: usize,
) {
    // SAFETY: forwarded.
    unsafe {
        match width {
            WIDE_COLS if prefetch_next => {
                kernel_avx512::<B, 2, false, true>(packed, rhs, stride, out, width, lead)
            }
            WIDE_COLS => kernel_avx512::<B, 2, false, false>(packed, rhs, stride, out, width, lead),
            17.. => kernel_avx512::<B, 2, true, false>(packed, rhs, stride, out, width, lead),
            16 => kernel_avx512::<B, 1, false, false>(packed, rhs, stride, out, width, lead),
            _ => kernel_avx512::<B, 1, true, false>(packed, rhs, stride, out, width, lead),
        }
    }
}

/// One call on the AVX-512 path: for each of `B` packed blocks, its
/// [`BLOCK_ROWS`] × 16·`V` sums with a panel of X in registers (per depth
/// index `V` loads of X shared by the blocks, then per row a broadcast of
/// W and `V` fused multiply-adds), then [`store`]'s work on them: added to
/// the partial sums in Y unless this is the first pass, then (last pass)
/// bias + residual and the ReLU, in [`store`]'s order. `MASKED`: only the
/// first `width` columns exist (X, Y and the residual are read and
/// written through lane masks, which never touch the lanes masked off).
/// `PREFETCH_NEXT`: per depth index, the next column block's two lines of
/// X's row are prefetched. X's rows lie far apart in the Winograd domain
/// (a row per input channel, every frequency's tiles between them), too
/// far for the hardware's stride prefetcher, and this block's lines were
/// fetched on demand, each a miss; the next block's arrive while this one
/// is multiplied (F(4×4) at 56×56, layer 1 of a ResNet at 224²: 3 to 7 %
/// faster, run alternately with and without). And per depth index each
/// block prefetches its weights `lead` floats on: the next pair of row
/// blocks' (`lead` 0 for the last pair prefetches lines already read).
/// Inside a network each product's weights come from memory, not cache
/// (a ResNet-18's 45 MB pass through a 32 MiB L3 shared with the
/// neighbours), and a block's 6 · depth floats are too short a stream
/// for the hardware prefetcher to run ahead of.
///
/// # Safety
/// The blocks are equally deep; X's rows `0..depth` from `rhs` (row stride
/// `stride`) hold `width` readable values (16·`V` when not `MASKED`);
/// `out[b].rows` rows of as many values at `out[b].dst` (and
/// `out[b].residual` when not null) are this thread's; the CPU has
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel_avx512<
    const B: usize,
    const V: usize,
    const MASKED: bool,
    const PREFETCH_NEXT: bool,
>(
    packed: [&[f32]; B],
    rhs: *const f32,
    stride: usize,
    out: [&BlockOut<'_>; B],
    width: usize,
    lead: usize,
) {
    use std::arch::x86_64::{
        __m512, __mmask16, _MM_HINT_T0, _mm_prefetch, _mm512_add_ps, _mm512_fmadd_ps,
        _mm512_loadu_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_max_ps,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    const LANES_512: usize = 16;
    let lanes = |v: usize| width.saturating_sub(v * LANES_512).min(LANES_512);
    let masks: [__mmask16; 2] = [0, 1].map(|v| ((1u32 << lanes(v)) - 1) as __mmask16);
    // Vector `v` of a row at `ptr`: a full vector only where 16 columns
    // exist, otherwise through the mask of those that do.
    macro_rules! load {
        ($ptr:expr, $v:expr) => {
            // SAFETY: the caller's contract covers the lanes read.
            unsafe {
                if MASKED {
                    _mm512_maskz_loadu_ps(masks[$v], $ptr)
                } else {
                    _mm512_loadu_ps($ptr)
                }
            }
        };
    }
    let depth = packed[0].len() / BLOCK_ROWS;
    let mut sums: [[[__m512; 2]; BLOCK_ROWS]; B] = [[[_mm512_setzero_ps(); 2]; BLOCK_ROWS]; B];
    let mut row = rhs;
    let mut weights = packed.map(<[f32]>::as_ptr);
    for _ in 0..depth {
        if PREFETCH_NEXT {
            // The next column block's two lines of this row of X.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(2 * LANES_512).cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(3 * LANES_512).cast());
        }
        let x0 = load!(row, 0);
        let x1 = if V == 2 {
            load!(row.wrapping_add(LANES_512), 1)
        } else {
            x0
        };
        for (block_sums, w) in sums.iter_mut().zip(&mut weights) {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(lead).cast());
            for (r, sum) in block_sums.iter_mut().enumerate() {
                // SAFETY: every block holds `depth` · BLOCK_ROWS values
                // (the caller's contract), and `w` points at the current
                // depth index's BLOCK_ROWS of them.
                let a = _mm512_set1_ps(unsafe { *w.add(r) });
                sum[0] = _mm512_fmadd_ps(a, x0, sum[0]);
                if V == 2 {
                    sum[1] = _mm512_fmadd_ps(a, x1, sum[1]);
                }
            }
            *w = w.wrapping_add(BLOCK_ROWS);
        }
        row = row.wrapping_add(stride);
    }
    for (block_sums, out) in sums.iter().zip(out) {
        for (r, sum) in block_sums.iter().enumerate().take(out.rows) {
            let bias = _mm512_set1_ps(out.bias.map_or(0.0, |b| b[r]));
            for (v, &value) in sum.iter().enumerate().take(V) {
                let offset = r * out.stride + v * LANES_512;
                let y = out.dst.wrapping_add(offset);
                let mut value = value;
                if !out.pass.first {
                    value = _mm512_add_ps(load!(y, v), value);
                }
                if out.pass.last {
                    let extra = if out.residual.is_null() {
                        bias
                    } else {
                        _mm512_add_ps(bias, load!(out.residual.wrapping_add(offset), v))
                    };
                    value = _mm512_add_ps(value, extra);
                    if out.relu {
                        value = _mm512_max_ps(value, _mm512_setzero_ps());
                    }
                }
                // SAFETY: as the loads (the caller's contract).
                unsafe {
                    if MASKED {
                        _mm512_mask_storeu_ps(y, masks[v], value);
                    } else {
                        _mm512_storeu_ps(y, value);
                    }
                }
            }
        }
    }
}

/// `acc` = the [`BLOCK_ROWS`] × 16 (`wide`) or × 8 products of one packed
/// block (`[depth][BLOCK_ROWS]`) and the depth × 16 (or × 8) panel of X
/// at `rhs` (row stride `stride`).
///
/// # Safety
/// `rhs + k · stride + j` readable for k < depth, j < 16 (8 when not
/// `wide`); with `AVX`, the CPU has AVX2 and FMA.
#[inline(always)]
unsafe fn kernel<const AVX: bool>(
    packed: &[f32],
    rhs: *const f32,
    stride: usize,
    wide: bool,
    acc: &mut [[f32; BLOCK_COLS]; BLOCK_ROWS],
) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: forwarded.
        unsafe {
            if wide {
                kernel_avx2::<2>(packed, rhs, stride, acc);
            } else {
                kernel_avx2::<1>(packed, rhs, stride, acc);
            }
        }
        return;
    }
    // SAFETY: forwarded.
    unsafe {
        if wide {
            kernel_portable::<2>(packed, rhs, stride, acc);
        } else {
            kernel_portable::<1>(packed, rhs, stride, acc);
        }
    }
}

/// The kernel with AVX2 + FMA: `V` vectors (8 columns each) per row, the
/// [`BLOCK_ROWS`] · `V` sums in registers.
///
/// # Safety
/// As [`kernel`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2<const V: usize>(
    packed: &[f32],
    rhs: *const f32,
    stride: usize,
    acc: &mut [[f32; BLOCK_COLS]; BLOCK_ROWS],
) {
    use std::arch::x86_64::_mm256_storeu_ps;
    // SAFETY: forwarded.
    let sums = unsafe { sums_avx2::<V, false>(packed, rhs, stride, 0) };
    for (out, sum) in acc.iter_mut().zip(&sums) {
        // SAFETY: each row of `acc` holds 16 values.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), sum[0]);
            if V == 2 {
                _mm256_storeu_ps(out.as_mut_ptr().add(LANES), sum[1]);
            }
        }
    }
}

/// The [`BLOCK_ROWS`] × 8·`V` sums of one packed block and a panel of X,
/// in AVX registers: per depth index `V` loads of X, six broadcasts of W
/// and 6·`V` fused multiply-adds (and with `PREFETCH_NEXT` two prefetches
/// of the next column block's lines of X, as in [`kernel_avx512`]), and a
/// prefetch of the weights `lead` floats on (the next row block's).
///
/// # Safety
/// As [`kernel`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sums_avx2<const V: usize, const PREFETCH_NEXT: bool>(
    packed: &[f32],
    rhs: *const f32,
    stride: usize,
    lead: usize,
) -> [[std::arch::x86_64::__m256; 2]; BLOCK_ROWS] {
    use std::arch::x86_64::{
        __m256, _MM_HINT_T0, _mm_prefetch, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_setzero_ps,
    };
    let mut sums: [[__m256; 2]; BLOCK_ROWS] = [[_mm256_setzero_ps(); 2]; BLOCK_ROWS];
    let mut row = rhs;
    for w in packed.chunks_exact(BLOCK_ROWS) {
        if PREFETCH_NEXT {
            // The next column block of this row of X (see
            // `kernel_avx512`'s `PREFETCH_NEXT`).
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(BLOCK_COLS).cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(BLOCK_COLS + LANES).cast());
        }
        // SAFETY: `row` is X's row k (k < depth): 8·V readable values.
        let x0 = unsafe { _mm256_loadu_ps(row) };
        let x1 = if V == 2 {
            // SAFETY: as above.
            unsafe { _mm256_loadu_ps(row.add(LANES)) }
        } else {
            x0
        };
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(lead).cast());
        for (r, sum) in sums.iter_mut().enumerate() {
            let a = _mm256_broadcast_ss(&w[r]);
            sum[0] = _mm256_fmadd_ps(a, x0, sum[0]);
            if V == 2 {
                sum[1] = _mm256_fmadd_ps(a, x1, sum[1]);
            }
        }
        row = row.wrapping_add(stride);
    }
    sums
}

/// Where one kernel call's block of whole vectors goes, and what is
/// applied to it (the AVX path's [`store`]).
#[cfg(target_arch = "x86_64")]
struct BlockOut<'a> {
    /// Y at the block's first row and column.
    dst: *mut f32,
    /// The residual at the same element, or null.
    residual: *const f32,
    /// Row stride of Y and the residual.
    stride: usize,
    /// Rows of the block that exist (the last block of W may be partial).
    rows: usize,
    /// The bias of those rows.
    bias: Option<&'a [f32]>,
    relu: bool,
    pass: Pass,
}

#[cfg(target_arch = "x86_64")]
impl<'a> BlockOut<'a> {
    /// The block of Y (and of the residual) at row `first_row` and column
    /// `col`, `rows` rows of it existing.
    #[inline(always)]
    fn new(
        operands: &Operands,
        epilogue: Epilogue<'a>,
        (first_row, rows): (usize, usize),
        col: usize,
        pass: Pass,
    ) -> Self {
        let at = first_row * operands.dst_stride + col;
        Self {
            dst: operands.dst.wrapping_add(at),
            residual: if operands.residual.is_null() {
                std::ptr::null()
            } else {
                operands.residual.wrapping_add(at)
            },
            stride: operands.dst_stride,
            rows,
            bias: epilogue.bias.map(|b| &b[first_row..first_row + rows]),
            relu: epilogue.relu,
            pass,
        }
    }
}

/// [`kernel_avx2`] with [`store`]'s work done in registers: added to the
/// partial sums in Y unless this is the first pass over the depth, then
/// (last pass) bias + residual added and the ReLU, in the same order as
/// [`store`]. `PREFETCH_NEXT`: the next column block of X is prefetched
/// row by row, as in [`kernel_avx512`]; the weights `lead` floats on as
/// these are read.
///
/// # Safety
/// As [`kernel`] for the operands; `out.rows` rows of 8·`V` values at
/// `out.dst` (and `out.residual` when not null), row stride `out.stride`,
/// are this thread's to read and write.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2_out<const V: usize, const PREFETCH_NEXT: bool>(
    packed: &[f32],
    rhs: *const f32,
    stride: usize,
    out: &BlockOut<'_>,
    lead: usize,
) {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_set1_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    // SAFETY: forwarded.
    let sums = unsafe { sums_avx2::<V, PREFETCH_NEXT>(packed, rhs, stride, lead) };
    for (r, sum) in sums.iter().enumerate().take(out.rows) {
        let bias = _mm256_set1_ps(out.bias.map_or(0.0, |b| b[r]));
        for (v, &value) in sum.iter().enumerate().take(V) {
            let offset = r * out.stride + v * LANES;
            // SAFETY: row r < out.rows, columns v·8 .. v·8 + 8 of the block.
            unsafe {
                let y = out.dst.add(offset);
                let mut value = value;
                if !out.pass.first {
                    value = _mm256_add_ps(_mm256_loadu_ps(y), value);
                }
                if out.pass.last {
                    let extra = if out.residual.is_null() {
                        bias
                    } else {
                        _mm256_add_ps(bias, _mm256_loadu_ps(out.residual.add(offset)))
                    };
                    value = _mm256_add_ps(value, extra);
                    if out.relu {
                        value = _mm256_max_ps(value, _mm256_setzero_ps());
                    }
                }
                _mm256_storeu_ps(y, value);
            }
        }
    }
}

/// The kernel on plain arrays (every target): `V` vectors of 8 columns.
///
/// # Safety
/// As [`kernel`].
#[inline(always)]
unsafe fn kernel_portable<const V: usize>(
    packed: &[f32],
    rhs: *const f32,
    stride: usize,
    acc: &mut [[f32; BLOCK_COLS]; BLOCK_ROWS],
) {
    let mut sums = [[0f32; BLOCK_COLS]; BLOCK_ROWS];
    let mut row = rhs;
    for w in packed.chunks_exact(BLOCK_ROWS) {
        // SAFETY: `row` is X's row k (k < depth): 8·V readable values.
        let x = unsafe { std::slice::from_raw_parts(row, V * LANES) };
        for (sum, a) in sums.iter_mut().zip(w) {
            for (s, v) in sum.iter_mut().zip(x) {
                *s += a * v;
            }
        }
        row = row.wrapping_add(stride);
    }
    *acc = sums;
}

/// How far ahead of the weights it reads a kernel call on the `group`
/// row blocks from `first` prefetches, in floats: to the same place in
/// the next group's blocks (packed `depth` deep), which the next call
/// reads; 0 (lines already read) for the last group before `end`.
#[cfg(target_arch = "x86_64")]
fn weights_lead(first: usize, group: usize, end: usize, depth: usize) -> usize {
    if first + group < end {
        group * depth * BLOCK_ROWS
    } else {
        0
    }
}

/// Which pass over the depth a store ends.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// The first: Y holds nothing of this product yet.
    first: bool,
    /// The last: the epilogue follows.
    last: bool,
}

/// Stores `rows` × `width` results of `acc` at (first_row, col) of Y:
/// added to the partial sums there unless `pass.first`, with the bias,
/// the residual and the ReLU when `pass.last`.
///
/// # Safety
/// Those elements of Y (and of the residual, when not null) are inside
/// the caller's operands and this thread's to write.
#[inline(always)]
unsafe fn store(
    acc: &[[f32; BLOCK_COLS]; BLOCK_ROWS],
    (first_row, rows): (usize, usize),
    (col, width): (usize, usize),
    operands: Operands,
    (epilogue, pass): (Epilogue<'_>, Pass),
) {
    for (r, values) in acc.iter().enumerate().take(rows) {
        let i = first_row + r;
        let at = i * operands.dst_stride + col;
        // SAFETY: row i, columns col .. col + width of Y are this call's.
        let out = unsafe { std::slice::from_raw_parts_mut(operands.dst.add(at), width) };
        if !pass.first {
            for (o, v) in out.iter_mut().zip(values) {
                *o += v;
            }
        } else {
            out.copy_from_slice(&values[..width]);
        }
        if !pass.last {
            continue;
        }
        let bias = epilogue.bias.map_or(0.0, |b| b[i]);
        if operands.residual.is_null() {
            out.iter_mut().for_each(|o| *o += bias);
        } else {
            // SAFETY: the residual has Y's layout.
            let skip = unsafe { std::slice::from_raw_parts(operands.residual.add(at), width) };
            for (o, s) in out.iter_mut().zip(skip) {
                *o += bias + s;
            }
        }
        if epilogue.relu {
            out.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_conv::tests::values;

    /// Every shape class (partial row blocks, full, one-vector and partial
    /// column blocks, both loop orders), bias, residual and ReLU, against
    /// a product in f64, on every kernel the CPU runs.
    #[test]
    fn packed_product_equals_plain_product() {
        for (case, &(rows, depth, cols)) in [
            (1, 1, 1),
            (5, 3, 7),
            (6, 9, 16),
            (13, 20, 24),
            (64, 49, 100),
            (130, 600, 49),
            (10, 520, 32),
            (7, 300, 8),
            (12, 40, 48),
        ]
        .iter()
        .enumerate()
        {
            let seed = case as u32;
            let w = values(rows * depth, seed);
            // X with a wider row stride than its columns.
            let stride = cols + 3;
            let x = values(depth * stride, seed + 1);
            let bias = values(rows, seed + 2);
            let residual = values(rows * cols, seed + 3);
            let packed = PackedWeights::new(&w, rows, depth);
            // Every kernel this CPU runs.
            let isas = [VectorIsa::Portable, VectorIsa::Avx2, VectorIsa::Avx512]
                .into_iter()
                .filter(|&isa| isa <= vector_isa::detected());
            for (isa, (with_residual, relu)) in
                isas.flat_map(|isa| [(false, false), (true, true)].map(|flags| (isa, flags)))
            {
                let mut y = vec![f32::NAN; rows * cols];
                let operands = Operands {
                    rhs: x.as_ptr(),
                    rhs_stride: stride,
                    cols,
                    dst: y.as_mut_ptr(),
                    residual: if with_residual {
                        residual.as_ptr()
                    } else {
                        std::ptr::null()
                    },
                    dst_stride: cols,
                };
                // Two calls over halves of the row blocks, as threads do.
                let half = packed.blocks() / 2;
                for blocks in [0..half, half..packed.blocks()] {
                    let epilogue = Epilogue {
                        bias: Some(&bias),
                        relu,
                    };
                    // SAFETY: x holds depth rows of `stride` ≥ cols values,
                    // y and the residual rows × cols.
                    unsafe { multiply_on(isa, &packed, blocks, operands, epilogue) };
                }
                for i in 0..rows {
                    for j in 0..cols {
                        let mut want = f64::from(bias[i]);
                        for k in 0..depth {
                            want += f64::from(w[i * depth + k]) * f64::from(x[k * stride + j]);
                        }
                        if with_residual {
                            want += f64::from(residual[i * cols + j]);
                        }
                        if relu {
                            want = want.max(0.0);
                        }
                        let got = f64::from(y[i * cols + j]);
                        assert!(
                            (got - want).abs() < 1e-5 * (depth as f64).sqrt().max(1.0),
                            "{isa:?} case {case} ({rows}x{depth}x{cols}) at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
