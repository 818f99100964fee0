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
//! X is either a matrix ([`multiply`]) or a convolution's input read in
//! place ([`convolve`]): depth index (tap, channel), column (output row,
//! output column), each value found at the tap's offset in the channel's
//! (padded) plane, so the input is never unfolded (im2col) — at batch 1
//! the unfolded copy of a deep layer (1.8 MB for a 3×3 convolution on a
//! 14×14×256 input) is several times the input and, read once per panel,
//! does not stay in cache.
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

/// A chunk's sums: `[column][row of the panel]`, with room for a whole
/// block past the chunk's last column (a block starts anywhere in the
/// chunk; the kernels touch only their block's columns).
type ChunkSums = [[f32; PANEL_ROWS]; CHUNK_COLS + BLOCK_COLS_AVX512];

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

/// A convolution's input as [`convolve`] reads it, in place: channel
/// planes (already padded), the weights' depth index running over the
/// kernel's taps, then the channels (W packed with [`PanelWeights::new`]
/// from its (out, tap, channel) matrix), the columns over the output
/// pixels row by row.
/// Element (tap t, channel c; output row y, column x) is at `pixels +
/// c · plane + taps[t] + y · row_step + x · stride`.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    /// The first channel plane's first value.
    pub pixels: *const f32,
    /// Floats from one channel's plane to the next.
    pub plane: usize,
    /// Each tap's offset in a plane (`ky · row width + kx`), in the
    /// weights' order.
    pub taps: &'a [usize],
    /// Output pixels per output row.
    pub out_width: usize,
    /// Floats from one output row's first input to the next (the
    /// convolution's stride × the plane's row width).
    pub row_step: usize,
    /// The convolution's stride: 1 or 2.
    pub stride: usize,
}

/// Where [`panel_loops`] reads X. Depth index k = s · `segment_depth` + i
/// (segment s), column j = l · `line_width` + c (line l): X(k, j) is at
/// `base + segments[s] + i · row_stride + l · line_step + c ·
/// column_step`. A matrix is one segment and one line, a convolution's
/// input ([`Image`]) one segment per tap and one line per output row.
#[derive(Debug, Clone, Copy)]
struct Source<'a> {
    base: *const f32,
    segments: &'a [usize],
    segment_depth: usize,
    row_stride: usize,
    line_width: usize,
    line_step: usize,
    column_step: usize,
}

impl<'a> Source<'a> {
    /// `image` as X of depth `depth` (the taps × the channels).
    fn image(image: &Image<'a>, depth: usize) -> Self {
        Source {
            base: image.pixels,
            segments: image.taps,
            segment_depth: depth / image.taps.len().max(1),
            row_stride: image.plane,
            line_width: image.out_width,
            line_step: image.row_step,
            column_step: image.stride,
        }
    }

    /// X's value (k = segment start + `depth`, column 0 of line `line` +
    /// `column`): a block's first value in a slice.
    fn at(&self, segment: usize, depth: usize, line: usize, column: usize) -> *const f32 {
        self.base.wrapping_add(
            self.segments[segment]
                + depth * self.row_stride
                + line * self.line_step
                + column * self.column_step,
        )
    }
}

/// Whether [`multiply`] runs on this CPU (the kernels are AVX-512 and
/// AVX2 + FMA).
pub fn available() -> bool {
    vector_isa::active() >= VectorIsa::Avx2
}

/// Where a product's results go: Y(i, j) at `dst + i · stride + j`, for
/// W's rows i and `cols` columns j; the residual, when not null, added
/// from `residual + i · stride + j`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Y's first value.
    pub dst: *mut f32,
    /// Added to Y before the ReLU when not null (same layout as Y).
    pub residual: *const f32,
    /// Row stride of Y and the residual.
    pub stride: usize,
    /// Columns of Y.
    pub cols: usize,
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
    let source = Source {
        base: operands.rhs,
        segments: &[0],
        segment_depth: weights.depth,
        row_stride: operands.rhs_stride,
        line_width: operands.cols,
        line_step: 0,
        column_step: 1,
    };
    let output = Output {
        dst: operands.dst,
        residual: operands.residual,
        stride: operands.dst_stride,
        cols: operands.cols,
    };
    // SAFETY: forwarded; X(k, j) is at rhs + k · rhs_stride + j.
    unsafe { multiply_source(weights, panels, source, output, epilogue) }
}

/// A convolution, Y = W · unfold(image) + bias (+ residual) (ReLU), for
/// W's rows in the panels `panels` and the first `output.cols` output
/// pixels, reading the input in place ([`Image`]); W's depth is the taps
/// × the channels, in that order.
///
/// # Safety
/// Every value [`Image`] addresses for W's depth and `output.cols`
/// pixels is readable; the rest as [`multiply`].
///
/// # Panics
/// When the stride is not 1 or 2, or W's depth is not a multiple of the
/// taps.
pub unsafe fn convolve(
    weights: &PanelWeights,
    panels: Range<usize>,
    image: &Image<'_>,
    output: Output,
    epilogue: Epilogue<'_>,
) {
    assert!(
        matches!(image.stride, 1 | 2),
        "narrow_gemm::convolve: stride {}",
        image.stride
    );
    assert!(
        !image.taps.is_empty() && weights.depth.is_multiple_of(image.taps.len()),
        "narrow_gemm::convolve: depth {} for {} taps",
        weights.depth,
        image.taps.len()
    );
    let source = Source::image(image, weights.depth);
    // SAFETY: forwarded.
    unsafe { multiply_source(weights, panels, source, output, epilogue) }
}

/// [`multiply`] and [`convolve`]: X read from `source`, with the kernel
/// of the active vector instructions ([`vector_isa::active`]).
///
/// # Safety
/// As [`multiply`], for the values `source` addresses.
unsafe fn multiply_source(
    weights: &PanelWeights,
    panels: Range<usize>,
    source: Source<'_>,
    output: Output,
    epilogue: Epilogue<'_>,
) {
    debug_assert!(available());
    // SAFETY: forwarded; `active` is at most what the CPU runs.
    unsafe {
        multiply_on(
            vector_isa::active(),
            weights,
            panels,
            source,
            output,
            epilogue,
        )
    }
}

/// [`multiply_source`] with the kernel of `isa` (at most what the CPU
/// runs: [`vector_isa::detected`]) and X's column step (1 or 2) compiled
/// in; nothing on the portable path.
///
/// # Safety
/// As [`multiply_source`].
unsafe fn multiply_on(
    isa: VectorIsa,
    weights: &PanelWeights,
    panels: Range<usize>,
    source: Source<'_>,
    output: Output,
    epilogue: Epilogue<'_>,
) {
    let isa = isa.min(vector_isa::detected());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded; the CPU has the kernel's instructions (`isa` is
    // at most what it runs).
    unsafe {
        let args = (weights, panels, source, output, epilogue);
        match (isa, source.column_step) {
            (VectorIsa::Avx512, 1) => loops_avx512::<1>(args),
            (VectorIsa::Avx512, _) => loops_avx512::<2>(args),
            (VectorIsa::Avx2, 1) => loops_avx2::<1>(args),
            (VectorIsa::Avx2, _) => loops_avx2::<2>(args),
            (VectorIsa::Portable, _) => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, weights, panels, source, output, epilogue);
}

/// What [`multiply_on`] hands each instruction set's loops.
#[cfg(target_arch = "x86_64")]
type LoopArgs<'a, 'b> = (
    &'a PanelWeights,
    Range<usize>,
    Source<'b>,
    Output,
    Epilogue<'a>,
);

/// Calls `$kernel::<B, $step>` for the block width `$width` (the listed
/// widths, else 1): the width and the column step are constants in each
/// kernel.
#[cfg(target_arch = "x86_64")]
macro_rules! by_width {
    ($kernel:ident, $step:ident, $width:expr, ($($b:literal)*), $args:tt) => {
        match $width {
            $($b => by_width!(@call $kernel, $b, $step, $args),)*
            _ => by_width!(@call $kernel, 1, $step, $args),
        }
    };
    (@call $kernel:ident, $b:literal, $step:ident, ($($arg:expr),*)) => {
        $kernel::<$b, $step>($($arg),*)
    };
}

/// [`multiply_on`] on the AVX-512 path: [`panel_loops`] with
/// [`kernel_avx512`], for X's column step `STEP`.
///
/// # Safety
/// As [`multiply_source`]; the CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn loops_avx512<const STEP: usize>(
    (weights, panels, source, output, epilogue): LoopArgs<'_, '_>,
) {
    // SAFETY: the kernel's contract is the loops' (the caller's); the CPU
    // has AVX-512 F.
    unsafe {
        panel_loops::<BLOCK_COLS_AVX512>(
            weights,
            panels,
            source,
            output,
            epilogue,
            |slice, x, stride, sums, width, first, ahead| {
                by_width!(
                    kernel_avx512,
                    STEP,
                    width,
                    (12 11 10 9 8 7 6 5 4 3 2),
                    (slice, x, stride, sums, first, ahead)
                )
            },
        );
    }
}

/// [`multiply_on`] on the AVX2 path: [`panel_loops`] with
/// [`kernel_avx2`], for X's column step `STEP`.
///
/// # Safety
/// As [`multiply_source`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn loops_avx2<const STEP: usize>(
    (weights, panels, source, output, epilogue): LoopArgs<'_, '_>,
) {
    // SAFETY: the kernel's contract is the loops' (the caller's); the CPU
    // has AVX2 and FMA.
    unsafe {
        panel_loops::<BLOCK_COLS_AVX2>(
            weights,
            panels,
            source,
            output,
            epilogue,
            |slice, x, stride, sums, width, first, ahead| {
                by_width!(
                    kernel_avx2,
                    STEP,
                    width,
                    (6 5 4 3 2),
                    (slice, x, stride, sums, first, ahead)
                )
            },
        );
    }
}

/// A block of a chunk: `width` columns from position `at` of the chunk's
/// sums, all in one line of X (`line`, from `column`).
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    at: usize,
    width: usize,
    line: usize,
    column: usize,
}

/// The chunk of columns that starts at column `first` of `cols`: whole
/// lines of `line_width` columns, as many as fit in [`CHUNK_COLS`] (or a
/// part of one line, when one does not fit), cut into blocks of at most
/// `COLS` columns, each inside one line and the blocks of a line as even
/// as they can be (a 14-column line is two blocks of 7, not 12 and 2).
/// Writes the blocks to `blocks` and returns (the chunk's columns, the
/// blocks).
fn plan_chunk<const COLS: usize>(
    first: usize,
    cols: usize,
    line_width: usize,
    blocks: &mut [Block; CHUNK_COLS],
) -> (usize, usize) {
    let line_width = line_width.max(1);
    let width = if first.is_multiple_of(line_width) && line_width <= CHUNK_COLS {
        (CHUNK_COLS / line_width * line_width).min(cols - first)
    } else {
        CHUNK_COLS
            .min(line_width - first % line_width)
            .min(cols - first)
    };
    let (mut count, mut at) = (0, 0);
    while at < width {
        let (line, column) = ((first + at) / line_width, (first + at) % line_width);
        let piece = (line_width - column).min(width - at);
        let parts = piece.div_ceil(COLS);
        let mut column = column;
        for part in 0..parts {
            let width = piece / parts + usize::from(part < piece % parts);
            blocks[count] = Block {
                at,
                width,
                line,
                column,
            };
            count += 1;
            at += width;
            column += width;
        }
    }
    (width, count)
}

/// [`multiply_source`]'s loops, for a kernel of up to `COLS` columns: per
/// panel, the columns in chunks ([`plan_chunk`]); per chunk, the depth in
/// slices of at most [`DEPTH_SLICE`] inside each of X's segments, each
/// run through every block of the chunk (the slice of W then comes from
/// L1 for all but the first); then the epilogue. `kernel(slice, x,
/// stride, sums, width, first, ahead)` adds the slice's products for
/// `width` ≤ `COLS` columns of X from `x` (each row `stride` after the
/// last) to `sums` (starting from zero when `first`), prefetching
/// [`PREFETCH_SPAN`] floats from `ahead` unless it is null (the first
/// [`PREFETCH_BLOCKS`] blocks: the weights after the slice, which are the
/// next slice's, or past the panel's last one the next panel's;
/// addresses past the weights are never read, a prefetch does not
/// fault).
///
/// # Safety
/// As [`multiply_source`]; `kernel` reads X's rows of the slice, `width`
/// values from `x`, and writes only `sums`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel_loops<const COLS: usize>(
    weights: &PanelWeights,
    panels: Range<usize>,
    source: Source<'_>,
    output: Output,
    epilogue: Epilogue<'_>,
    kernel: impl Fn(&[f32], *const f32, usize, &mut [[f32; PANEL_ROWS]], usize, bool, *const f32),
) {
    let depth = weights.depth;
    let mut blocks = [Block::default(); CHUNK_COLS];
    // sums[j][r]: column chunk + j, row first_row + r. Zeroed once: each
    // block's first slice starts its sums from zero (`first`), so no
    // chunk reads what the one before left.
    let mut sums: ChunkSums = [[0f32; PANEL_ROWS]; CHUNK_COLS + BLOCK_COLS_AVX512];
    for panel in panels.start..panels.end.min(weights.panels()) {
        let packed = &weights.data[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
        let first_row = panel * PANEL_ROWS;
        let rows = PANEL_ROWS.min(weights.rows - first_row);
        let mut chunk = 0;
        while chunk < output.cols {
            let (chunk_width, count) =
                plan_chunk::<COLS>(chunk, output.cols, source.line_width, &mut blocks);
            for segment in 0..source.segments.len() {
                for start in (0..source.segment_depth).step_by(DEPTH_SLICE) {
                    let k = segment * source.segment_depth + start;
                    let len = DEPTH_SLICE.min(source.segment_depth - start);
                    let slice = &packed[k * PANEL_ROWS..][..len * PANEL_ROWS];
                    for (b, block) in blocks[..count].iter().enumerate() {
                        let x = source.at(segment, start, block.line, block.column);
                        // Blocks 0 to 3 each fetch a quarter of the next
                        // slice into L2 as they go (`kernel_avx512`).
                        let ahead = if b < PREFETCH_BLOCKS {
                            packed
                                .as_ptr()
                                .wrapping_add((k + len) * PANEL_ROWS + b * PREFETCH_SPAN)
                        } else {
                            std::ptr::null()
                        };
                        kernel(
                            slice,
                            x,
                            source.row_stride,
                            &mut sums[block.at..block.at + COLS],
                            block.width,
                            k == 0,
                            ahead,
                        );
                    }
                }
            }
            for (j, column) in sums.iter().enumerate().take(chunk_width) {
                for (r, &sum) in column.iter().enumerate().take(rows) {
                    let row = first_row + r;
                    let at = row * output.stride + chunk + j;
                    let mut extra = epilogue.bias.map_or(0.0, |b| b[row]);
                    if !output.residual.is_null() {
                        // SAFETY: element (row, chunk + j) of the residual
                        // is readable (the caller's contract).
                        extra += unsafe { *output.residual.add(at) };
                    }
                    let mut value = sum + extra;
                    if epilogue.relu {
                        value = value.max(0.0);
                    }
                    // SAFETY: element (row, chunk + j) of Y is this
                    // caller's to write.
                    unsafe { *output.dst.add(at) = value };
                }
            }
            chunk += chunk_width;
        }
    }
}

/// `sums[j][r]` (+)= Σ_k W[r][k] · X[k][j] over a slice of a panel
/// (`[slice depth][PANEL_ROWS]`) and `B` columns of X from `x` (row
/// stride `stride`, each column `STEP` values after the last), starting
/// from zero when `first`, else from `sums` (at least `B` long):
/// per depth index two loads of W, then per column a broadcast of X and
/// two fused multiply-adds; and, unless `ahead` is null, a prefetch into
/// L2 of the cache line [`PREFETCH_STEP`] floats further each time from
/// `ahead` ([`PREFETCH_SPAN`] floats in all).
///
/// # Safety
/// X's rows of the slice hold `B` readable values, `STEP` apart, from
/// `x`; the CPU has AVX-512 F. `ahead` is only prefetched, never read.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel_avx512<const B: usize, const STEP: usize>(
    slice: &[f32],
    x: *const f32,
    stride: usize,
    sums: &mut [[f32; PANEL_ROWS]],
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
            let b = _mm512_set1_ps(unsafe { *row.add(j * STEP) });
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
/// X's rows of the slice hold `B` readable values, `STEP` apart, from
/// `x`; the CPU has AVX2 and FMA. `ahead` is only prefetched (during the first half's
/// pass), never read.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2<const B: usize, const STEP: usize>(
    slice: &[f32],
    x: *const f32,
    stride: usize,
    sums: &mut [[f32; PANEL_ROWS]],
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
                let b = _mm256_set1_ps(unsafe { *row.add(j * STEP) });
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

    /// The paths this CPU runs.
    #[cfg(target_arch = "x86_64")]
    fn paths() -> Vec<VectorIsa> {
        [VectorIsa::Avx2, VectorIsa::Avx512]
            .into_iter()
            .filter(|isa| *isa <= vector_isa::detected())
            .collect()
    }

    /// X as a row-major matrix, `cols` columns (what [`multiply`] reads).
    #[cfg(target_arch = "x86_64")]
    fn matrix(x: &[f32], depth: usize, cols: usize) -> Source<'_> {
        Source {
            base: x.as_ptr(),
            segments: &[0],
            segment_depth: depth,
            row_stride: cols,
            line_width: cols,
            line_step: 0,
            column_step: 1,
        }
    }

    /// Y (rows × cols) = W · X + bias + residual, ReLU'd, from `source` on
    /// every path this CPU runs, by name; asserts that the paths give the
    /// same bits (`case` names the shapes in the message).
    ///
    /// # Safety
    /// `source` addresses readable values for W's depth and `cols`
    /// columns; `bias` holds `rows` values and `residual` rows × cols.
    #[cfg(target_arch = "x86_64")]
    unsafe fn every_path(
        packed: &PanelWeights,
        source: Source<'_>,
        (bias, residual): (&[f32], &[f32]),
        (rows, cols): (usize, usize),
        case: &str,
    ) -> Vec<(&'static str, Vec<f32>)> {
        let mut outputs: Vec<(&'static str, Vec<f32>)> = Vec::new();
        for isa in paths() {
            let mut y = vec![f32::NAN; rows * cols];
            let output = Output {
                dst: y.as_mut_ptr(),
                residual: residual.as_ptr(),
                stride: cols,
                cols,
            };
            let epilogue = Epilogue {
                bias: Some(bias),
                relu: true,
            };
            // SAFETY: the caller's contract; Y is rows × cols; the CPU
            // runs the path (`paths`).
            unsafe { multiply_on(isa, packed, 0..packed.panels(), source, output, epilogue) };
            if let Some((_, first)) = outputs.first() {
                assert!(
                    first
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{case}: {} differs from the first path",
                    isa.name()
                );
            }
            outputs.push((isa.name(), y));
        }
        outputs
    }

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
            let source = matrix(&x, depth, cols);
            let case = format!("{rows}×{depth}×{cols}");
            // SAFETY: X is depth × cols, the bias rows long, the residual
            // rows × cols.
            let outputs =
                unsafe { every_path(&packed, source, (&bias, &residual), (rows, cols), &case) };
            for (name, y) in outputs {
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
            }
        }
    }
    /// Chunks cover the columns in order, each block inside one line and
    /// at most `COLS` wide, a line's blocks even.
    #[test]
    fn chunks_cover_the_columns_in_lines() {
        for &(cols, line_width) in &[
            (49, 7),
            (196, 14),
            (784, 28),
            (49, 49),
            (196, 196),
            (130, 65),
        ] {
            let mut blocks = [Block::default(); CHUNK_COLS];
            let mut next = 0;
            while next < cols {
                let (width, count) = plan_chunk::<12>(next, cols, line_width, &mut blocks);
                assert!(width > 0 && width <= CHUNK_COLS);
                let mut at = 0;
                for block in &blocks[..count] {
                    assert_eq!(block.at, at, "{cols}/{line_width}: blocks in order");
                    assert!(block.width >= 1 && block.width <= 12);
                    assert!(block.column + block.width <= line_width, "inside its line");
                    assert_eq!(block.line * line_width + block.column, next + at);
                    at += block.width;
                }
                assert_eq!(at, width);
                next += width;
            }
            assert_eq!(next, cols);
        }
        let mut blocks = [Block::default(); CHUNK_COLS];
        let (width, count) = plan_chunk::<12>(0, 196, 14, &mut blocks);
        assert_eq!((width, count), (56, 8), "four lines of 14, each 7 + 7");
        assert!(blocks[..count].iter().all(|b| b.width == 7));
    }

    /// [`convolve`] against a plain f64 convolution of the same padded
    /// input, with bias, residual and ReLU: 3×3 at stride 1 and 2, 1×1 at
    /// stride 1 and 2, output rows shorter and longer than a chunk, on
    /// every path this CPU runs; and the paths give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn convolution_in_place_equals_plain_convolution() {
        // (out channels, in channels, kernel, stride, padded side)
        for &(rows, channels, k, stride, side) in &[
            (32, 16, 3, 1, 9),
            (64, 8, 3, 2, 16),
            (40, 5, 1, 2, 14),
            (32, 3, 1, 1, 7),
            (32, 2, 3, 1, 72),
            (32, 130, 3, 1, 6),
        ] {
            let out_side = (side - k) / stride + 1;
            let cols = out_side * out_side;
            let taps: Vec<usize> = (0..k * k).map(|t| (t / k) * side + t % k).collect();
            let depth = k * k * channels;
            // W in (out, tap, channel) order, as `convolve` takes it.
            let w = values(rows * depth, 5);
            let x = values(channels * side * side, 6);
            let bias = values(rows, 7);
            let residual = values(rows * cols, 8);
            let packed = PanelWeights::new(&w, rows, depth);
            let image = Image {
                pixels: x.as_ptr(),
                plane: side * side,
                taps: &taps,
                out_width: out_side,
                row_step: stride * side,
                stride,
            };
            let source = Source::image(&image, depth);
            let case = format!("{rows}×{channels}×{k}/{stride}");
            // SAFETY: the taps, channels and output pixels stay inside the
            // padded input; the bias is rows long, the residual rows × cols.
            let outputs =
                unsafe { every_path(&packed, source, (&bias, &residual), (rows, cols), &case) };
            for (name, y) in outputs {
                for r in 0..rows {
                    for (oy, ox) in
                        (0..out_side).flat_map(|oy| (0..out_side).map(move |ox| (oy, ox)))
                    {
                        let mut want =
                            f64::from(bias[r]) + f64::from(residual[r * cols + oy * out_side + ox]);
                        for t in 0..k * k {
                            for c in 0..channels {
                                let (iy, ix) = (oy * stride + t / k, ox * stride + t % k);
                                want += f64::from(w[r * depth + t * channels + c])
                                    * f64::from(x[c * side * side + iy * side + ix]);
                            }
                        }
                        let want = want.max(0.0);
                        let got = f64::from(y[r * cols + oy * out_side + ox]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{name} {rows}×{channels}×{k}/{stride} ({r}, {oy}, {ox}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
