//! Winograd F(4×4, 3×3) and F(2×2, 3×3): the stride-1, padding-1 3×3
//! convolutions that hold most of a ResNet's work, with 36 multiplications
//! per 4×4 output tile and input channel instead of 144 (F(2×2): 16
//! instead of 36) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016).
//!
//! For each (m+2)×(m+2) input tile d (overlapping by 2) and 3×3 filter g
//! the m×m output tile is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. Summed over input
//! channels, the element-wise product becomes (m+2)² independent matrix
//! products, one per frequency ξ:
//!
//! ```text
//! M[ξ] (out × tiles) = U[ξ] (out × in) · V[ξ] (in × tiles)
//! ```
//!
//! - U = G g Gᵀ is computed once per kernel and tile size (in f64, from
//!   the weights with batch norm already folded in; `FusedConv` builds
//!   each form on its first call, which the warm-up pass at model load
//!   makes);
//! - V = Bᵀ d B per call (the input transform), in groups of [`LANES`]
//!   tiles so the arithmetic runs on vectors;
//! - the products run with U packed once ([`super::packed_gemm`]);
//! - the output transform Aᵀ M A is fused with the bias, the residual and
//!   the ReLU.
//!
//! The work is spread over the threads one of two ways:
//! - planes with many tiles (at least one block per thread): in blocks of
//!   [`BLOCK_TILES`] tiles, each block's input transform, 36 products and
//!   output transform on one thread in turn, so its V and M stay in that
//!   core's cache and each frequency's V is one contiguous panel for the
//!   products' kernel (ResNet-18's layers 1 and 2 at 224²);
//! - planes with few tiles (the deep layers): phase by phase over all
//!   tiles, the products spread by frequency, so that each thread reads
//!   only its frequencies' weights, which is what bounds those layers.
//!
//! Both give the same bits (tested).
//!
//! F(4×4) needs 4× the weights' memory in the Winograd domain and F(2×2)
//! 16/9×; F(2×2) suits small planes (7×7 at 224²: four 4×4 tiles would
//! leave the products 4 columns wide, reading 36 weight matrices for
//! little work). The interpolation points are 0, ±1, ±2 and ∞ (F(4×4)),
//! 0, ±1 and ∞ (F(2×2)); with f32 the result agrees with a direct
//! convolution to 1e-6–1e-5 of the output's scale (tested here against
//! f64 and in [`super::cpu_conv`]'s tests against candle's conv2d).
//!
//! Vector code: the transforms are written on fixed-width lane arrays
//! (the portable path; on aarch64 the baseline already has NEON) and, on
//! x86-64 with AVX2 + FMA (chosen at run time), on 256-bit registers
//! ([`avx2`]: the patch gather as 8×8 transposes, which the compiler does
//! not find from the element-by-element copy, and no round trip through
//! memory between the steps); on AVX-512 the blocks' input transform and
//! F(4×4)'s output transform run 16 tiles at a time ([`avx512`]: each
//! value of a group one whole cache line of V or M). All do the same
//! operations in the same order. The forward products dispatch the same way
//! ([`super::packed_gemm`]); the weight gradient's use `gemm`, which does
//! its own run-time dispatch (AVX-512, AVX2, NEON).

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::packed_gemm::{self, BLOCK_ROWS, Epilogue, Operands, PackedWeights};
use super::scratch::with_scratch;
#[cfg(target_arch = "x86_64")]
use super::vector_isa::{self, VectorIsa};

/// Bᵀ x on M + 2 vectors of one width, the operations of the portable
/// [`input_1d`] in its order (no fused multiply-adds, so that every path
/// gives the same bits): the vector paths' one definition, given that
/// width's add, subtract, multiply, splat and zero.
#[cfg(target_arch = "x86_64")]
macro_rules! input_1d_vectors {
    ($m:expr, $x:expr, $add:path, $sub:path, $mul:path, $splat:path, $zero:expr) => {{
        let (add, sub, mul, splat) = ($add, $sub, $mul, $splat);
        let [d0, d1, d2, d3, d4, d5] = $x;
        if $m == 4 {
            [
                add(sub(mul(splat(4.0), d0), mul(splat(5.0), d2)), d4),
                add(add(mul(splat(-4.0), add(d1, d2)), d3), d4),
                add(sub(mul(splat(4.0), sub(d1, d2)), d3), d4),
                add(sub(mul(splat(2.0), sub(d3, d1)), d2), d4),
                add(sub(mul(splat(2.0), sub(d1, d3)), d2), d4),
                add(sub(mul(splat(4.0), d1), mul(splat(5.0), d3)), d5),
            ]
        } else {
            let zero = $zero;
            [
                sub(d0, d2),
                add(d1, d2),
                sub(d2, d1),
                sub(d1, d3),
                zero,
                zero,
            ]
        }
    }};
}

/// Aᵀ x on M + 2 vectors of one width, the operations of the portable
/// [`output_1d`] in its order: see [`input_1d_vectors`].
#[cfg(target_arch = "x86_64")]
macro_rules! output_1d_vectors {
    ($m:expr, $x:expr, $add:path, $sub:path, $mul:path, $splat:path, $zero:expr) => {{
        let (add, sub, mul, splat) = ($add, $sub, $mul, $splat);
        let [m0, m1, m2, m3, m4, m5] = $x;
        if $m == 4 {
            let (a, b) = (add(m1, m2), sub(m1, m2));
            let (c, d) = (add(m3, m4), sub(m3, m4));
            [
                add(add(m0, a), c),
                add(b, mul(splat(2.0), d)),
                add(a, mul(splat(4.0), c)),
                add(add(b, mul(splat(8.0), d)), m5),
            ]
        } else {
            let zero = $zero;
            [add(add(m0, m1), m2), sub(sub(m1, m2), m3), zero, zero]
        }
    }};
}

/// The input transform of a group of tiles, one per lane, into `$v` at
/// `$at`: written once for the vector paths, expanded where `patch_row`
/// (one patch row gathered and transformed, d B), `input_1d` (Bᵀ x) and
/// `store` (the group's lanes of a vector) are that path's own.
#[cfg(target_arch = "x86_64")]
macro_rules! input_group_vectors {
    ($m:expr, $padded:expr, $row:expr, $starts:expr, $v:expr, $at:expr) => {{
        let (patch, lanes) = ($m + 2, $starts.len());
        // Per patch row: gather, transpose, then d B (rows); then Bᵀ (d B)
        // (columns), in [`super::input_group`]'s order. Row by row, each
        // written once (a zeroed array first was a `memset` call per
        // group, a `MaybeUninit` one a copy).
        let rows = [
            patch_row::<{ $m }>($padded, $row, $starts, 0),
            patch_row::<{ $m }>($padded, $row, $starts, 1),
            patch_row::<{ $m }>($padded, $row, $starts, 2),
            patch_row::<{ $m }>($padded, $row, $starts, 3),
            patch_row::<{ $m }>($padded, $row, $starts, 4),
            patch_row::<{ $m }>($padded, $row, $starts, 5),
        ];
        for j in 0..patch {
            let column = [
                rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j],
            ];
            for (i, value) in input_1d::<{ $m }>(column)
                .into_iter()
                .enumerate()
                .take(patch)
            {
                store(
                    &mut $v[(i * patch + j) * $at.stride + $at.offset..][..lanes],
                    value,
                );
            }
        }
    }};
}

/// The output transform of a group of `$lanes` tiles, one per lane, from
/// the products at `$at`: `y[i][j]` = output row i, column j (i, j <
/// M). Written once for the vector paths, expanded where `load` (the
/// group's lanes, the others zero) and `output_1d` (Aᵀ x) are that
/// path's own; `$zero` is its zero vector.
#[cfg(target_arch = "x86_64")]
macro_rules! output_group_vectors {
    ($m:expr, $products:expr, $at:expr, $lanes:expr, $zero:expr) => {{
        let patch = $m + 2;
        let zero = $zero;
        let mut m = [[zero; PATCH]; PATCH];
        for (i, row) in m.iter_mut().enumerate().take(patch) {
            for (j, cell) in row.iter_mut().enumerate().take(patch) {
                *cell = load(&$products[(i * patch + j) * $at.stride + $at.offset..][..$lanes]);
            }
        }
        // Aᵀ m (columns), then (Aᵀ m) A (rows).
        let mut columns = [[zero; PATCH]; 4];
        for j in 0..patch {
            let r = output_1d::<{ $m }>([m[0][j], m[1][j], m[2][j], m[3][j], m[4][j], m[5][j]]);
            for (i, value) in r.into_iter().enumerate().take($m) {
                columns[i][j] = value;
            }
        }
        let mut y = [[zero; 4]; 4];
        for (y_row, row) in y.iter_mut().zip(columns).take($m) {
            *y_row = output_1d::<{ $m }>(row);
        }
        y
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// The largest input tile side (F(4×4): 4 + 3 − 1): the size of the
/// fixed arrays the transforms work in.
const PATCH: usize = 6;
/// Tiles transformed together, one per vector lane.
const LANES: usize = 8;
/// At most this many tiles (over a batch) go through one pass of the
/// products: bounds the transformed buffers (in·36·tiles floats) so they
/// stay in cache.
const MAX_TILES_PER_PASS: usize = 256;
/// Tiles per block of the blocked forward pass ([`Winograd::run_blocks`]):
/// the columns of one call of the products' AVX-512 kernel.
const BLOCK_TILES: usize = 32;
/// Floats between one frequency's matrix and the next in a block's V and
/// M beyond the matrix itself: one cache line. Without it the 36
/// frequencies of a tile lie a power of two apart (8 KiB for 64 rows) and
/// fall into one L1 set, so each tile's transforms missed L1 on every
/// store and load (the input transform took 40% of layer 1's time).
const FREQUENCY_SKEW: usize = 16;

/// Floats from one frequency's matrix to the next in a block's V or M of
/// `rows` rows ([`BLOCK_TILES`] floats each).
fn frequency_stride(rows: usize) -> usize {
    rows * BLOCK_TILES + FREQUENCY_SKEW
}

/// How a call spreads its work over the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spread {
    /// By blocks of [`BLOCK_TILES`] tiles, each wholly on one thread
    /// ([`Winograd::run_blocks`]): when there are at least as many blocks
    /// as threads.
    Blocks,
    /// Each phase over all tiles of a pass, the products by frequency
    /// ([`Winograd::run_group`]): planes with few tiles (the deep layers),
    /// where blocks would leave threads idle and each thread would read
    /// every frequency's weights.
    Phases,
}

/// F(4×4, 3×3)'s filter transform G (6×3).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// F(2×2, 3×3)'s filter transform G (4×3).
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// The output tile: F(m×m, 3×3) with m = 4 or 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(4×4, 3×3): 36 frequencies, 2.25× fewer multiplications than F(2×2).
    Four,
    /// F(2×2, 3×3): 16 frequencies, for small planes.
    Two,
}

impl Tile {
    /// The output tile side m.
    pub fn side(self) -> usize {
        match self {
            Tile::Four => 4,
            Tile::Two => 2,
        }
    }

    /// The input tile side m + 2.
    fn patch(self) -> usize {
        self.side() + 2
    }

    /// Frequencies: (m + 2)².
    fn frequencies(self) -> usize {
        self.patch() * self.patch()
    }

    /// Tiles covering a `height` × `width` plane.
    pub fn tiles(self, height: usize, width: usize) -> usize {
        height.div_ceil(self.side()) * width.div_ceil(self.side())
    }
}

thread_local! {
    /// The transformed input V and the products M, reused across calls on
    /// this thread (allocating them afresh each time costs page faults).
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// The transformed input V and gradient dM of [`weight_gradient`],
    /// reused the same way (up to 2 × [`MAX_GRADIENT_FLOATS`]): fresh
    /// buffers were zeroed and faulted in on every call, twice per
    /// convolution and training step.
    static GRADIENT_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
    /// The zero-padded input planes of [`Winograd::run_blocks`], on the
    /// thread that calls it.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One block's transformed input V and products M in
    /// [`Winograd::run_blocks`], per thread.
    static BLOCK_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A 3×3, stride 1, padding 1 convolution in the Winograd domain: the
/// transformed weights, the bias and whether a ReLU follows.
#[derive(Debug, Clone)]
pub struct Winograd {
    tile: Tile,
    /// U: one (out × in) matrix per frequency, packed for
    /// [`packed_gemm::multiply`].
    weights: Vec<PackedWeights>,
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    relu: bool,
}

/// The shape of one call: batch, input height and width (= output's).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// The output tile side m.
    m: usize,
    batch: usize,
    height: usize,
    width: usize,
    /// Tile rows and columns per image.
    tile_rows: usize,
    tile_cols: usize,
    /// The row stride of the transformed buffers per frequency: all
    /// tiles over the batch, rounded up to whole vectors in the forward
    /// pass (the products then need no partial column blocks).
    columns: usize,
}

impl Geometry {
    fn new(tile: Tile, batch: usize, height: usize, width: usize) -> Self {
        let m = tile.side();
        Self {
            m,
            batch,
            height,
            width,
            tile_rows: height.div_ceil(m),
            tile_cols: width.div_ceil(m),
            columns: batch * height.div_ceil(m) * width.div_ceil(m),
        }
    }

    /// The same with the transformed buffers' rows rounded up to whole
    /// vectors of 8.
    fn with_vector_columns(self) -> Self {
        Self {
            columns: self.columns.next_multiple_of(8),
            ..self
        }
    }

    /// Frequencies: (m + 2)².
    fn frequencies(&self) -> usize {
        (self.m + 2) * (self.m + 2)
    }

    /// Tiles per image.
    fn tiles(&self) -> usize {
        self.tile_rows * self.tile_cols
    }

    /// Tile `t` (numbered over the batch): its image, and its output
    /// tile's top row and left column in that image's planes.
    fn tile_origin(&self, t: usize) -> (usize, usize, usize) {
        let (image, t) = (t / self.tiles(), t % self.tiles());
        (
            image,
            self.m * (t / self.tile_cols),
            self.m * (t % self.tile_cols),
        )
    }

    /// Sides of an image zero-padded so that every tile's (m+2)² patch
    /// lies inside: one row/column before, up to m + 1 after.
    fn padded(&self) -> (usize, usize) {
        (self.m * self.tile_rows + 2, self.m * self.tile_cols + 2)
    }
}

impl Winograd {
    /// Transforms folded weights `(out, in, 3, 3)` (row-major) for `tile`
    /// and keeps `bias` (out). The caller has checked the lengths.
    pub fn new(
        tile: Tile,
        weights: &[f32],
        bias: &[f32],
        (out_channels, in_channels): (usize, usize),
        relu: bool,
    ) -> Self {
        debug_assert_eq!(weights.len(), out_channels * in_channels * 9);
        let frequencies = tile.frequencies();
        // U[ξ] (out × in) for every frequency, written straight into the
        // packed layout: tasks by block of output channels, each writing
        // every element of its block in every frequency's matrix (the
        // rows past the last as zeros), so nothing is zeroed first. A
        // training step transforms every 3×3 kernel twice (forward and
        // input gradient): layer 4's 512×512 kernels make 38 MiB each.
        let blocks = out_channels.div_ceil(BLOCK_ROWS);
        let len = PackedWeights::packed_len(out_channels, in_channels);
        let mut packed: Vec<Vec<f32>> = (0..frequencies).map(|_| Vec::with_capacity(len)).collect();
        let targets: Vec<usize> = packed.iter_mut().map(|u| u.as_mut_ptr() as usize).collect();
        (0..blocks).into_par_iter().for_each(|block| {
            let first_row = block * BLOCK_ROWS;
            let rows = BLOCK_ROWS.min(out_channels - first_row);
            // U of the block's rows for GRADIENT_LANES input channels:
            // [row][ξ][lane]; the rows past the last stay zero.
            let mut block_u = [[[0f32; GRADIENT_LANES]; PATCH * PATCH]; BLOCK_ROWS];
            for first in (0..in_channels).step_by(GRADIENT_LANES) {
                let lanes = GRADIENT_LANES.min(in_channels - first);
                for (r, u) in block_u.iter_mut().enumerate().take(rows) {
                    // The lanes' filters lie side by side in the weights.
                    let source =
                        &weights[((first_row + r) * in_channels + first) * 9..][..lanes * 9];
                    let mut filters = [[0f64; GRADIENT_LANES]; 9];
                    for (lane, g) in source.chunks_exact(9).enumerate() {
                        for (f, &v) in filters.iter_mut().zip(g) {
                            f[lane] = f64::from(v);
                        }
                    }
                    transform_filters(&filters, tile, u);
                }
                // Element (first + lane, row r) of the block in the packed
                // layout: one run of lanes · BLOCK_ROWS floats.
                let run = PackedWeights::packed_offset(first_row, first, in_channels);
                for (xi, &target) in targets.iter().enumerate() {
                    for lane in 0..lanes {
                        for (r, u) in block_u.iter().enumerate() {
                            // SAFETY: run + lane · BLOCK_ROWS + r is the
                            // packed offset of (first_row + r, first +
                            // lane), < len, in a buffer of len floats'
                            // capacity that outlives the tasks; the block's
                            // elements are written by this task only.
                            unsafe {
                                (target as *mut f32)
                                    .add(run + lane * BLOCK_ROWS + r)
                                    .write(u[xi][lane]);
                            }
                        }
                    }
                }
            }
        });
        for u in &mut packed {
            // SAFETY: the tasks cover every block, each every input
            // channel and every row of its block (rows past the last as
            // zeros): all len elements are written.
            unsafe { u.set_len(len) };
        }
        let weights: Vec<PackedWeights> = packed
            .into_iter()
            .map(|u| PackedWeights::from_packed(out_channels, in_channels, u))
            .collect();
        Self {
            tile,
            weights,
            bias: bias.to_vec(),
            in_channels,
            out_channels,
            relu,
        }
    }

    /// Convolves contiguous NCHW `input` (batch, in, height, width) into a
    /// new (batch, out, height, width) buffer, adding `residual` (same
    /// shape as the output) when given, then the ReLU when the kernel has
    /// one.
    pub fn run(
        &self,
        input: &[f32],
        [batch, height, width]: [usize; 3],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let blocks = (batch * self.tile.tiles(height, width)).div_ceil(BLOCK_TILES);
        let spread = if blocks >= rayon::current_num_threads() {
            Spread::Blocks
        } else {
            Spread::Phases
        };
        self.run_spread(spread, input, [batch, height, width], residual)
    }

    /// [`Self::run`] with the work spread as `spread` says.
    fn run_spread(
        &self,
        spread: Spread,
        input: &[f32],
        [batch, height, width]: [usize; 3],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let plane_in = self.in_channels * height * width;
        let plane_out = self.out_channels * height * width;
        let len = batch * plane_out;
        // Not zeroed first: the output transform writes every element
        // (a training step's Winograd outputs are hundreds of MiB).
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if plane_out > 0 && spread == Spread::Blocks {
            self.run_blocks(
                input,
                Geometry::new(self.tile, batch, height, width),
                residual,
                &mut out.spare_capacity_mut()[..len],
            );
        } else if plane_out > 0 {
            let tiles = self.tile.tiles(height, width);
            let group = (MAX_TILES_PER_PASS / tiles).clamp(1, batch.max(1));
            let spare = &mut out.spare_capacity_mut()[..len];
            let mut first = 0;
            while first < batch {
                let count = group.min(batch - first);
                let images = first..first + count;
                self.run_group(
                    &input[images.start * plane_in..images.end * plane_in],
                    Geometry::new(self.tile, count, height, width).with_vector_columns(),
                    residual.map(|r| &r[images.start * plane_out..images.end * plane_out]),
                    &mut spare[images.start * plane_out..images.end * plane_out],
                );
                first += count;
            }
        }
        // SAFETY: the blocks cover every tile of every image, and a tile's
        // output transform writes its pixels of every output plane (cut at
        // the plane's edges); otherwise every group wrote every element of
        // its images' planes (`transform_output` covers each plane,
        // `finish_plane` each row and column of it), and the groups cover
        // 0..batch; with no plane, len is 0.
        unsafe { out.set_len(len) };
        out
    }

    /// Every tile of the batch in blocks of [`BLOCK_TILES`], spread over
    /// the threads: each block's input transform, products and output
    /// transform run in turn on one thread, so its V and M stay in that
    /// core's cache, and each frequency's V is one contiguous panel
    /// (`[ξ][in][tile]`) for the products' kernel. What the layers with
    /// many tiles run (in layer 1 of a ResNet at 224², spreading the
    /// products by frequency left half of each core's V in the other
    /// core's cache, and its rows 36 frequencies apart).
    fn run_blocks(
        &self,
        input: &[f32],
        geometry: Geometry,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (padded_h, padded_w) = geometry.padded();
        let padded_plane = padded_h * padded_w;
        let plane = geometry.height * geometry.width;
        let planes = geometry.batch * self.in_channels;
        let frequencies = geometry.frequencies();
        let tiles = geometry.batch * geometry.tiles();
        assert!(
            input.len() >= planes * plane
                && out.len() >= geometry.batch * self.out_channels * plane
                && residual.is_none_or(|r| r.len() >= out.len())
        );
        let dst = out.as_mut_ptr() as usize;
        let finish = Finish {
            bias: &self.bias,
            relu: self.relu,
            residual,
            channels: self.out_channels,
        };
        with_scratch(&PADDED, |padded: &mut Vec<f32>| {
            padded.resize(planes * padded_plane + GATHER_SLACK, 0.0);
            padded[..planes * padded_plane]
                .par_chunks_mut(padded_plane)
                .zip(input.par_chunks(plane))
                .for_each(|(padded, source)| {
                    pad_plane(source, geometry.width, 1, padded, padded_w);
                });
            let padded = &padded[..];
            (0..tiles.div_ceil(BLOCK_TILES))
                .into_par_iter()
                .for_each(|block| {
                    let first = block * BLOCK_TILES;
                    let block_tiles = first..(first + BLOCK_TILES).min(tiles);
                    with_scratch(&BLOCK_SCRATCH, |(v, m)| {
                        v.resize(frequencies * frequency_stride(self.in_channels), 0.0);
                        m.resize(frequencies * frequency_stride(self.out_channels), 0.0);
                        input_block(padded, geometry, self.in_channels, block_tiles.clone(), v);
                        self.multiply_block(v, m, block_tiles.len());
                        // SAFETY: `out` holds every output plane (asserted
                        // above); the block writes only its tiles' pixels,
                        // which no other block writes, and nothing else
                        // touches `out` while the blocks run.
                        unsafe {
                            output_block(
                                m,
                                geometry,
                                block_tiles,
                                finish,
                                dst as *mut MaybeUninit<f32>,
                            );
                        }
                    });
                });
        });
    }

    /// M[ξ] (out × tiles) = U[ξ] · V[ξ] (in × tiles) for every frequency
    /// of one block of `tiles` tiles, both in the block layout (row stride
    /// [`BLOCK_TILES`], frequency ξ's matrix at ξ · rows · [`BLOCK_TILES`]).
    fn multiply_block(&self, v: &[f32], m: &mut [f32], tiles: usize) {
        let (rows, depth) = (self.out_channels, self.in_channels);
        assert!(
            tiles <= BLOCK_TILES
                && v.len() >= self.weights.len() * frequency_stride(depth)
                && m.len() >= self.weights.len() * frequency_stride(rows)
        );
        for (xi, u) in self.weights.iter().enumerate() {
            let operands = Operands {
                rhs: v[xi * frequency_stride(depth)..].as_ptr(),
                rhs_stride: BLOCK_TILES,
                cols: tiles,
                dst: m[xi * frequency_stride(rows)..].as_mut_ptr(),
                residual: std::ptr::null(),
                dst_stride: BLOCK_TILES,
            };
            // SAFETY: frequency ξ's V holds `depth` rows and its M `rows`
            // rows (U's rows) of BLOCK_TILES ≥ `tiles` floats (asserted
            // above); `m` is borrowed mutably, so nothing else reads or
            // writes it.
            unsafe { packed_gemm::multiply(u, 0..u.blocks(), operands, Epilogue::default()) };
        }
    }

    /// One pass: every tile of `geometry.batch` images at once.
    fn run_group(
        &self,
        input: &[f32],
        geometry: Geometry,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let columns = geometry.columns;
        let frequencies = geometry.frequencies();
        with_scratch(&SCRATCH, |(transformed, products)| {
            transformed.resize(self.in_channels * frequencies * columns, 0.0);
            products.resize(self.out_channels * frequencies * columns, 0.0);
            transform_input(input, geometry, self.in_channels, transformed);
            self.multiply(transformed, products, columns);
            self.transform_output(products, geometry, residual, out);
        });
    }

    /// M[o][ξ][t] = Σ_c U[ξ][o][c] · V[c][ξ][t] for every frequency ξ
    /// and every column t of the `columns` (a multiple of 8) per
    /// frequency: single-threaded products with the packed weights,
    /// spread over the threads by frequency.
    fn multiply(&self, transformed: &[f32], products: &mut [f32], columns: usize) {
        let (m, k, n) = (self.out_channels, self.in_channels, columns);
        let frequencies = self.tile.frequencies();
        assert!(
            transformed.len() >= k * frequencies * n
                && products.len() >= m * frequencies * n
                && self.weights.len() == frequencies
                && self.weights.iter().all(|u| u.rows() == m)
        );
        // Each frequency writes its own columns ξ·n .. (ξ+1)·n of every row
        // of M: disjoint sets of elements, so the threads never share one.
        let dst = products.as_mut_ptr() as usize;
        let work = |xi: usize| {
            let u = &self.weights[xi];
            let operands = Operands {
                // SAFETY (of the offsets): ξ·n < frequencies·n, inside both.
                rhs: transformed[xi * n..].as_ptr(),
                rhs_stride: frequencies * n,
                cols: n,
                dst: (dst as *mut f32).wrapping_add(xi * n),
                residual: std::ptr::null(),
                dst_stride: frequencies * n,
            };
            // SAFETY: with row stride frequencies·n, rows 0..k of V and
            // 0..m of M, columns ξ·n .. ξ·n + n, every element addressed
            // lies inside the asserted lengths. The destinations of
            // different ξ are disjoint (see above) and no other reference
            // to `products` is used while the products run.
            unsafe { packed_gemm::multiply(u, 0..u.blocks(), operands, Epilogue::default()) };
        };
        if m * n * k >= 1 << 14 && rayon::current_num_threads() > 1 {
            (0..frequencies).into_par_iter().for_each(work);
        } else {
            (0..frequencies).for_each(work);
        }
    }

    /// Y = Aᵀ M A per tile, + bias (+ residual), ReLU, into NCHW `out`,
    /// every element written.
    fn transform_output(
        &self,
        products: &[f32],
        geometry: Geometry,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let plane = geometry.height * geometry.width;
        let columns = geometry.columns;
        let frequencies = geometry.frequencies();
        let o_count = self.out_channels;
        let staging_len = geometry.m * geometry.tile_rows * geometry.m * geometry.tile_cols;
        out.par_chunks_mut(plane).enumerate().for_each_init(
            || vec![0f32; staging_len],
            |staging, (index, plane_out)| {
                let (image, o) = (index / o_count, index % o_count);
                let source = &products[o * frequencies * columns..][..frequencies * columns];
                output_plane(source, geometry, image, staging);
                let skip = residual.map(|r| &r[index * plane..][..plane]);
                finish_plane(staging, geometry, self.bias[o], skip, self.relu, plane_out);
            },
        );
    }
}

/// At most this many floats of transformed input and gradient (V and
/// dM) per pass of [`weight_gradient`]: 16 MiB.
const MAX_GRADIENT_FLOATS: usize = 1 << 22;

/// The weight gradient of a 3×3, stride 1, padding 1 convolution in the
/// Winograd domain: dW (out, in, 3, 3) = Σ over the batch of dY ⋆ X.
///
/// With U = G g Gᵀ and Y = Aᵀ [U ⊙ V] A per tile, the chain rule gives,
/// per frequency ξ, dU[ξ] (out × in) = Σ_t dM[ξ][·][t] · V[ξ][·][t]ᵀ with
/// dM = A dY Aᵀ per output tile (the adjoint of the output transform), and
/// dg = Gᵀ dU G. The sums over tiles are (m+2)² `gemm` products, spread
/// over the threads by frequency; the transforms reuse the forward pass's
/// input transform. `input` is (batch, in, height, width), `grad_output`
/// (batch, out, height, width), both contiguous NCHW.
pub fn weight_gradient(
    tile: Tile,
    input: &[f32],
    grad_output: &[f32],
    [batch, height, width]: [usize; 3],
    (out_channels, in_channels): (usize, usize),
) -> Vec<f32> {
    let frequencies = tile.frequencies();
    let tiles = tile.tiles(height, width);
    let per_image = (in_channels + out_channels) * frequencies * tiles;
    let group = (MAX_GRADIENT_FLOATS / per_image.max(1)).clamp(1, batch.max(1));
    let (plane_in, plane_out) = (in_channels * height * width, out_channels * height * width);
    let mut du = vec![0f32; frequencies * out_channels * in_channels];
    with_scratch(&GRADIENT_SCRATCH, |(transformed, gradient)| {
        let mut first = 0;
        while first < batch {
            let count = group.min(batch - first);
            let images = first..first + count;
            let geometry = Geometry::new(tile, count, height, width);
            let all_tiles = count * tiles;
            // Both transforms write every element they are given: the
            // buffers only grow, and keep what an earlier call left.
            let (v_len, dm_len) = (
                in_channels * frequencies * all_tiles,
                out_channels * frequencies * all_tiles,
            );
            transformed.resize(transformed.len().max(v_len), 0.0);
            gradient.resize(gradient.len().max(dm_len), 0.0);
            let (transformed, gradient) = (&mut transformed[..v_len], &mut gradient[..dm_len]);
            transform_input(
                &input[images.start * plane_in..images.end * plane_in],
                geometry,
                in_channels,
                transformed,
            );
            transform_gradient(
                &grad_output[images.start * plane_out..images.end * plane_out],
                geometry,
                out_channels,
                gradient,
            );
            accumulate_products(
                &mut du,
                gradient,
                transformed,
                (out_channels, in_channels, all_tiles),
                frequencies,
            );
            first += count;
        }
    });
    filter_gradient(&du, tile, (out_channels, in_channels))
}

/// Output channels whose filter gradients [`filter_gradient`] computes
/// together: dU holds them side by side (one cache line of each
/// frequency's row).
const GRADIENT_LANES: usize = 16;

/// dg = Gᵀ dU G (in f64) for every (out, in) pair, from dU laid out
/// (frequency, in, out), into (out, in, 3, 3). Blocks of
/// [`GRADIENT_LANES`] output channels in parallel: each reads whole
/// lines of dU (reading one pair's (m+2)² values at a time, each from
/// another page, took a quarter of a ResNet-18 training step) and
/// applies G separably, rows then columns.
fn filter_gradient(
    du: &[f32],
    tile: Tile,
    (out_channels, in_channels): (usize, usize),
) -> Vec<f32> {
    let mut grad = vec![0f32; out_channels * in_channels * 9];
    if out_channels == 0 || in_channels == 0 {
        return grad;
    }
    let row = in_channels * out_channels;
    let patch = tile.patch();
    grad.par_chunks_mut(GRADIENT_LANES * in_channels * 9)
        .enumerate()
        .for_each(|(block, dst)| {
            let first = block * GRADIENT_LANES;
            let lanes = GRADIENT_LANES.min(out_channels - first);
            let mut lines = [[0f64; GRADIENT_LANES]; PATCH * PATCH];
            for c in 0..in_channels {
                for (xi, line) in lines.iter_mut().enumerate().take(patch * patch) {
                    let source = &du[xi * row + c * out_channels + first..][..lanes];
                    for (d, &v) in line.iter_mut().zip(source) {
                        *d = f64::from(v);
                    }
                }
                let dg = filter_lanes(&lines, tile);
                for lane in 0..lanes {
                    let out = &mut dst[(lane * in_channels + c) * 9..][..9];
                    for (o, sums) in out.iter_mut().zip(&dg) {
                        *o = sums[lane] as f32;
                    }
                }
            }
        });
    grad
}

/// Gᵀ dU G for [`GRADIENT_LANES`] (out, in) pairs at once, dU given per
/// frequency (`lines[ξ][lane]`), for `tile`'s G: the widest vector code
/// the CPU runs.
fn filter_lanes(
    lines: &[[f64; GRADIENT_LANES]; PATCH * PATCH],
    tile: Tile,
) -> [[f64; GRADIENT_LANES]; 9] {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), all the
        // function requires beyond the baseline.
        return unsafe { filter_lanes_avx2(lines, tile) };
    }
    match tile {
        Tile::Four => filter_lanes_generic(lines, &G4),
        Tile::Two => filter_lanes_generic(lines, &G2),
    }
}

/// [`filter_lanes_generic`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn filter_lanes_avx2(
    lines: &[[f64; GRADIENT_LANES]; PATCH * PATCH],
    tile: Tile,
) -> [[f64; GRADIENT_LANES]; 9] {
    match tile {
        Tile::Four => filter_lanes_generic(lines, &G4),
        Tile::Two => filter_lanes_generic(lines, &G2),
    }
}

/// Gᵀ dU G per lane for the P×3 matrix G: the columns transformed first
/// ((dU G)[a][j]), then the rows; every size is a constant, so the loops
/// unroll and run over whole lane arrays.
#[inline(always)]
fn filter_lanes_generic<const P: usize>(
    lines: &[[f64; GRADIENT_LANES]; PATCH * PATCH],
    g_matrix: &[[f64; 3]; P],
) -> [[f64; GRADIENT_LANES]; 9] {
    let mut rows = [[[0f64; GRADIENT_LANES]; 3]; P];
    for (a, row_a) in rows.iter_mut().enumerate() {
        for (j, out) in row_a.iter_mut().enumerate() {
            let mut sums = [0f64; GRADIENT_LANES];
            for (b, g_b) in g_matrix.iter().enumerate() {
                let (line, g) = (&lines[a * P + b], g_b[j]);
                for lane in 0..GRADIENT_LANES {
                    sums[lane] += g * line[lane];
                }
            }
            *out = sums;
        }
    }
    let mut dg = [[0f64; GRADIENT_LANES]; 9];
    for i in 0..3 {
        for j in 0..3 {
            let mut sums = [0f64; GRADIENT_LANES];
            for (row_a, g_a) in rows.iter().zip(g_matrix) {
                let (column, g) = (&row_a[j], g_a[i]);
                for lane in 0..GRADIENT_LANES {
                    sums[lane] += g * column[lane];
                }
            }
            dg[i * 3 + j] = sums;
        }
    }
    dg
}

/// U = G g Gᵀ for [`GRADIENT_LANES`] filters at once (`filters[k][lane]`,
/// k = 3·row + column), for `tile`'s G, into `u` (rounded to f32, laid
/// out (m+2)·i + j): the widest vector code the CPU runs.
fn transform_filters(
    filters: &[[f64; GRADIENT_LANES]; 9],
    tile: Tile,
    u: &mut [[f32; GRADIENT_LANES]; PATCH * PATCH],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), all the
        // function requires beyond the baseline.
        unsafe { transform_filters_avx2(filters, tile, u) };
        return;
    }
    match tile {
        Tile::Four => transform_filters_generic(filters, &G4, u),
        Tile::Two => transform_filters_generic(filters, &G2, u),
    }
}

/// [`transform_filters_generic`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_filters_avx2(
    filters: &[[f64; GRADIENT_LANES]; 9],
    tile: Tile,
    u: &mut [[f32; GRADIENT_LANES]; PATCH * PATCH],
) {
    match tile {
        Tile::Four => transform_filters_generic(filters, &G4, u),
        Tile::Two => transform_filters_generic(filters, &G2, u),
    }
}

/// G g Gᵀ per lane for the P×3 matrix G: G g (P×3) first, then (G g) Gᵀ,
/// in f64, the sums in the order the one-filter code had them (k = 0, 1,
/// 2), rounded to f32 once at the end. Every size is a constant, so the
/// loops unroll and each sum stays in registers.
#[inline(always)]
fn transform_filters_generic<const P: usize>(
    filters: &[[f64; GRADIENT_LANES]; 9],
    g_matrix: &[[f64; 3]; P],
    u: &mut [[f32; GRADIENT_LANES]; PATCH * PATCH],
) {
    let mut gg = [[[0f64; GRADIENT_LANES]; 3]; P];
    for (row, g_row) in gg.iter_mut().zip(g_matrix) {
        for (j, out) in row.iter_mut().enumerate() {
            let mut sums = [0f64; GRADIENT_LANES];
            for (k, &g) in g_row.iter().enumerate() {
                let filter = &filters[k * 3 + j];
                for lane in 0..GRADIENT_LANES {
                    sums[lane] += g * filter[lane];
                }
            }
            *out = sums;
        }
    }
    for (i, gg_row) in gg.iter().enumerate() {
        for (j, g_row) in g_matrix.iter().enumerate() {
            let mut sums = [0f64; GRADIENT_LANES];
            for (k, &g) in g_row.iter().enumerate() {
                let column = &gg_row[k];
                for lane in 0..GRADIENT_LANES {
                    sums[lane] += column[lane] * g;
                }
            }
            for (out, sum) in u[i * P + j].iter_mut().zip(sums) {
                *out = sum as f32;
            }
        }
    }
}

/// dU[ξ] (out × in) += dM[ξ] (out × tiles) · V[ξ]ᵀ (tiles × in) for every
/// frequency ξ, where dU is laid out (frequency, in, out) (column-major,
/// what gemm stores fastest), dM (out, frequency, tiles) and V (in,
/// frequency, tiles).
fn accumulate_products(
    du: &mut [f32],
    gradient: &[f32],
    transformed: &[f32],
    (m, n, tiles): (usize, usize, usize),
    frequencies: usize,
) {
    assert!(
        du.len() >= frequencies * m * n
            && gradient.len() >= m * frequencies * tiles
            && transformed.len() >= n * frequencies * tiles
    );
    if m == 0 || n == 0 || tiles == 0 {
        return;
    }
    let row = frequencies * tiles;
    du[..frequencies * m * n]
        .par_chunks_mut(m * n)
        .enumerate()
        .for_each(|(xi, dst)| {
            // SAFETY: dst is frequency ξ's own m·n block (column-major:
            // column stride m); lhs element (o, t) is gradient[o·row + ξ·tiles
            // + t] and rhs element (t, c) is transformed[c·row + ξ·tiles + t],
            // inside the asserted lengths for o < m, c < n, t < tiles.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    tiles,
                    dst.as_mut_ptr(),
                    m as isize,
                    1,
                    true,
                    gradient.as_ptr().add(xi * tiles),
                    1,
                    row as isize,
                    transformed.as_ptr().add(xi * tiles),
                    row as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

/// dM[o][ξ][t] = (A dY Aᵀ)[ξ] for every output channel o and tile t (over
/// the batch): the adjoint of the output transform, parallel over
/// channels; the gradient outside the plane is zero.
fn transform_gradient(grad: &[f32], geometry: Geometry, channels: usize, transformed: &mut [f32]) {
    let plane = geometry.height * geometry.width;
    let columns = geometry.columns;
    let frequencies = geometry.frequencies();
    let (rows, cols) = (
        geometry.m * geometry.tile_rows,
        geometry.m * geometry.tile_cols,
    );
    transformed[..channels * frequencies * columns]
        .par_chunks_mut(frequencies * columns)
        .enumerate()
        .for_each_init(
            || vec![0f32; rows * cols],
            |padded, (c, v)| {
                for image in 0..geometry.batch {
                    let source = &grad[(image * channels + c) * plane..][..plane];
                    // The plane, zero-padded after its last row and column.
                    pad_plane(source, geometry.width, 0, padded, cols);
                    gradient_plane(padded, geometry, image, v);
                }
            },
        );
}

/// Dispatches the gradient transform of one image's plane to the widest
/// vector code the CPU runs.
fn gradient_plane(padded: &[f32], geometry: Geometry, image: usize, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), all the
        // function requires beyond the baseline.
        unsafe { gradient_plane_avx2(padded, geometry, image, v) };
        return;
    }
    match geometry.m {
        4 => gradient_plane_generic::<4>(padded, geometry, image, v),
        _ => gradient_plane_generic::<2>(padded, geometry, image, v),
    }
}

/// [`gradient_plane_generic`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gradient_plane_avx2(padded: &[f32], geometry: Geometry, image: usize, v: &mut [f32]) {
    match geometry.m {
        4 => gradient_plane_generic::<4>(padded, geometry, image, v),
        _ => gradient_plane_generic::<2>(padded, geometry, image, v),
    }
}

/// The gradient transform of one plane, zero-padded to whole tiles
/// ((M · tile rows) × (M · tile columns)), into image `image`'s tiles of
/// `v` ((M+2)² × all tiles), [`LANES`] tiles at a time.
#[inline(always)]
fn gradient_plane_generic<const M: usize>(
    padded: &[f32],
    geometry: Geometry,
    image: usize,
    v: &mut [f32],
) {
    let patch = M + 2;
    let tiles = geometry.tiles();
    let stride = geometry.columns;
    let cols = M * geometry.tile_cols;
    let mut d = [[[0f32; LANES]; 4]; 4];
    let mut columns = [[[0f32; LANES]; 4]; PATCH];
    let mut first = 0;
    while first < tiles {
        let lanes = LANES.min(tiles - first);
        for lane in 0..lanes {
            let t = first + lane;
            let (ty, tx) = (t / geometry.tile_cols, t % geometry.tile_cols);
            for (i, row) in d.iter_mut().enumerate().take(M) {
                let src = &padded[(M * ty + i) * cols + M * tx..][..M];
                for (cell, value) in row.iter_mut().zip(src) {
                    cell[lane] = *value;
                }
            }
        }
        // A dY (columns), then (A dY) Aᵀ (rows).
        for j in 0..M {
            let r = gradient_1d::<M>([d[0][j], d[1][j], d[2][j], d[3][j]]);
            for i in 0..patch {
                columns[i][j] = r[i];
            }
        }
        let base = image * tiles + first;
        for (i, row) in columns.iter().enumerate().take(patch) {
            let r = gradient_1d::<M>(*row);
            for (j, lanes_value) in r.iter().enumerate().take(patch) {
                store(
                    &mut v[(i * patch + j) * stride + base..][..lanes],
                    lanes_value,
                );
            }
        }
        first += lanes;
    }
}

/// A x for M lane vectors (the first M of four): M + 2, the adjoint of
/// [`output_1d`].
#[inline(always)]
fn gradient_1d<const M: usize>(x: [[f32; LANES]; 4]) -> [[f32; LANES]; PATCH] {
    let mut r = [[0f32; LANES]; PATCH];
    for l in 0..LANES {
        let [y0, y1, y2, y3] = [x[0][l], x[1][l], x[2][l], x[3][l]];
        if M == 4 {
            let (even, odd) = (y0 + y2, y1 + y3);
            let (even4, odd2) = (y0 + 4.0 * y2, 2.0 * y1 + 8.0 * y3);
            r[0][l] = y0;
            r[1][l] = even + odd;
            r[2][l] = even - odd;
            r[3][l] = even4 + odd2;
            r[4][l] = even4 - odd2;
            r[5][l] = y3;
        } else {
            r[0][l] = y0;
            r[1][l] = y0 + y1;
            r[2][l] = y0 - y1;
            r[3][l] = -y1;
        }
    }
    r
}

/// `out` = staging (cropped to the plane) + bias (+ residual), then the
/// ReLU when `relu`: contiguous rows, one loop per case so each
/// vectorises.
fn finish_plane(
    staging: &[f32],
    geometry: Geometry,
    bias: f32,
    residual: Option<&[f32]>,
    relu: bool,
    out: &mut [MaybeUninit<f32>],
) {
    let staging_w = geometry.m * geometry.tile_cols;
    let width = geometry.width;
    let finish = |v: f32| if relu { v.max(0.0) } else { v };
    for (y, row) in out.chunks_exact_mut(width).enumerate() {
        let src = &staging[y * staging_w..][..width];
        match residual {
            Some(r) => {
                let skip = &r[y * width..][..width];
                for ((o, s), k) in row.iter_mut().zip(src).zip(skip) {
                    o.write(finish(s + bias + k));
                }
            }
            None => {
                for (o, s) in row.iter_mut().zip(src) {
                    o.write(finish(s + bias));
                }
            }
        }
    }
}

/// V[c][ξ][t] = (Bᵀ d B)[ξ] for every channel c and tile t (over the
/// batch), parallel over channels.
fn transform_input(input: &[f32], geometry: Geometry, channels: usize, transformed: &mut [f32]) {
    let plane = geometry.height * geometry.width;
    let columns = geometry.columns;
    let frequencies = geometry.frequencies();
    let (padded_h, padded_w) = geometry.padded();
    transformed[..channels * frequencies * columns]
        .par_chunks_mut(frequencies * columns)
        .enumerate()
        .for_each_init(
            || vec![0f32; padded_h * padded_w + GATHER_SLACK],
            |padded, (c, v)| {
                for image in 0..geometry.batch {
                    let source = &input[(image * channels + c) * plane..][..plane];
                    // The plane, zero-padded: row/column 0 is the padding,
                    // and so is what follows the last row and column.
                    pad_plane(
                        source,
                        geometry.width,
                        1,
                        &mut padded[..padded_h * padded_w],
                        padded_w,
                    );
                    input_plane(padded, geometry, image, v);
                }
            },
        );
}

/// V of the tiles `tiles` (numbered over the batch) for every input
/// channel, from the zero-padded planes `padded` (`[image][channel]`,
/// [`GATHER_SLACK`] floats after the last), into `v` in the block layout:
/// `v[(ξ · channels + c) · BLOCK_TILES + t − tiles.start]`.
fn input_block(
    padded: &[f32],
    geometry: Geometry,
    channels: usize,
    tiles: Range<usize>,
    v: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if vector_isa::active() == VectorIsa::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`active` never reports more than
        // it detected), all the function requires beyond the baseline.
        unsafe {
            match geometry.m {
                4 => avx512::input_block::<4>(padded, geometry, channels, tiles, v),
                _ => avx512::input_block::<2>(padded, geometry, channels, tiles, v),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), all the
        // function requires beyond the baseline.
        unsafe { input_block_avx2(padded, geometry, channels, tiles, v) };
        return;
    }
    match geometry.m {
        4 => input_block_generic::<4, false>(padded, geometry, channels, tiles, v),
        _ => input_block_generic::<2, false>(padded, geometry, channels, tiles, v),
    }
}

/// [`input_block_generic`] compiled with AVX2 and FMA, the transforms in
/// AVX2 registers ([`avx2::input_group`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_block_avx2(
    padded: &[f32],
    geometry: Geometry,
    channels: usize,
    tiles: Range<usize>,
    v: &mut [f32],
) {
    match geometry.m {
        4 => input_block_generic::<4, true>(padded, geometry, channels, tiles, v),
        _ => input_block_generic::<2, true>(padded, geometry, channels, tiles, v),
    }
}

/// See [`input_block`]; `AVX2` as in [`input_group`].
#[inline(always)]
fn input_block_generic<const M: usize, const AVX2: bool>(
    padded: &[f32],
    geometry: Geometry,
    channels: usize,
    tiles: Range<usize>,
    v: &mut [f32],
) {
    let padded_w = geometry.padded().1;
    for_each_input_group::<LANES>(geometry, channels, tiles, |starts, at| {
        input_group::<M, AVX2>(padded, padded_w, starts, v, at);
    });
}

/// Calls `transform(starts, at)` for each group of up to `W` of the tiles
/// `tiles` (numbered over the batch, at most [`BLOCK_TILES`]) and each of
/// `channels` input channels: `starts` are the group's patches in the
/// zero-padded planes, `at` where its values go in the block layout
/// ([`input_block`]'s).
#[inline(always)]
fn for_each_input_group<const W: usize>(
    geometry: Geometry,
    channels: usize,
    tiles: Range<usize>,
    mut transform: impl FnMut(&[usize], GroupAt),
) {
    let (padded_h, padded_w) = geometry.padded();
    let padded_plane = padded_h * padded_w;
    // Each tile's patch in its image's first plane, worked out once per
    // block (two divisions a tile).
    let mut first_plane = [0usize; BLOCK_TILES];
    for (start, t) in first_plane.iter_mut().zip(tiles.clone()) {
        let (image, top, left) = geometry.tile_origin(t);
        *start = image * channels * padded_plane + top * padded_w + left;
    }
    let count = tiles.len().min(BLOCK_TILES);
    let stride = frequency_stride(channels);
    for c in 0..channels {
        for group in (0..count).step_by(W) {
            let lanes = W.min(count - group);
            let mut starts = [0usize; W];
            for (start, first) in starts.iter_mut().zip(&first_plane[group..group + lanes]) {
                *start = first + c * padded_plane;
            }
            let at = GroupAt {
                stride,
                offset: c * BLOCK_TILES + group,
            };
            transform(&starts[..lanes], at);
        }
    }
}

/// What follows the output transform: + bias, + residual, ReLU.
#[derive(Debug, Clone, Copy)]
struct Finish<'a> {
    /// Per output channel.
    bias: &'a [f32],
    relu: bool,
    /// Same shape as the output.
    residual: Option<&'a [f32]>,
    /// Output channels.
    channels: usize,
}

/// Y = Aᵀ M A + bias (+ residual) (ReLU) of the tiles `tiles` (numbered
/// over the batch) for every output channel, from `products` in the block
/// layout ([`input_block`]'s), into the NCHW output at `out`.
///
/// # Safety
/// `out` points at `geometry.batch · finish.channels` output planes; no
/// other thread reads or writes the tiles' pixels of them meanwhile.
unsafe fn output_block(
    products: &[f32],
    geometry: Geometry,
    tiles: Range<usize>,
    finish: Finish<'_>,
    out: *mut MaybeUninit<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if geometry.m == 4 && vector_isa::active() == VectorIsa::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`active` never reports more than
        // it detected); the caller upholds the memory contract.
        unsafe { avx512::output_block(products, geometry, tiles, finish, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the
        // caller upholds the memory contract.
        unsafe {
            match geometry.m {
                4 => avx2::output_block::<4>(products, geometry, tiles, finish, out),
                _ => avx2::output_block::<2>(products, geometry, tiles, finish, out),
            }
        }
        return;
    }
    // SAFETY: the caller upholds the memory contract.
    unsafe {
        match geometry.m {
            4 => output_block_generic::<4>(products, geometry, tiles, finish, out),
            _ => output_block_generic::<2>(products, geometry, tiles, finish, out),
        }
    }
}

/// See [`output_block`].
///
/// # Safety
/// As [`output_block`].
#[inline(always)]
unsafe fn output_block_generic<const M: usize>(
    products: &[f32],
    geometry: Geometry,
    tiles: Range<usize>,
    finish: Finish<'_>,
    out: *mut MaybeUninit<f32>,
) {
    let origins = tile_origins(geometry, tiles.clone(), finish.channels);
    for o in 0..finish.channels {
        let mut first = tiles.start;
        while first < tiles.end {
            let lanes = LANES.min(tiles.end - first);
            let at = GroupAt {
                stride: frequency_stride(finish.channels),
                offset: o * BLOCK_TILES + first - tiles.start,
            };
            let y = output_group::<M, false>(products, at, lanes);
            for (lane, &origin) in origins[first - tiles.start..][..lanes].iter().enumerate() {
                // SAFETY: forwarded (the caller's contract).
                unsafe { finish_tile(&y, lane, origin, o, geometry, finish, out) };
            }
            first += lanes;
        }
    }
}

/// Where a tile's output lies: its first pixel in its image's first
/// output plane, counted from the start of the output, and its rows and
/// columns inside the plane (M, or fewer at the plane's edges).
#[derive(Debug, Clone, Copy, Default)]
struct TileOrigin {
    at: usize,
    rows: usize,
    cols: usize,
}

/// The origins of the tiles `tiles` (numbered over the batch, at most
/// [`BLOCK_TILES`]) in an output of `channels` planes per image, worked
/// out once per block (two divisions a tile).
fn tile_origins(
    geometry: Geometry,
    tiles: Range<usize>,
    channels: usize,
) -> [TileOrigin; BLOCK_TILES] {
    let (height, width) = (geometry.height, geometry.width);
    let mut origins = [TileOrigin::default(); BLOCK_TILES];
    for (origin, t) in origins.iter_mut().zip(tiles) {
        let (image, top, left) = geometry.tile_origin(t);
        *origin = TileOrigin {
            at: image * channels * height * width + top * width + left,
            rows: geometry.m.min(height - top),
            cols: geometry.m.min(width - left),
        };
    }
    origins
}

/// Writes the tile at `origin`, in lane `lane` of `y`, to output channel
/// `o`, element by element: + bias, + residual, ReLU, cut at the plane's
/// edges.
///
/// # Safety
/// As [`output_block`], for the tile's pixels.
#[inline(always)]
unsafe fn finish_tile<const L: usize>(
    y: &[[[f32; L]; 4]; 4],
    lane: usize,
    origin: TileOrigin,
    o: usize,
    geometry: Geometry,
    finish: Finish<'_>,
    out: *mut MaybeUninit<f32>,
) {
    let base = origin.at + o * geometry.height * geometry.width;
    let bias = finish.bias[o];
    for (i, y_row) in y.iter().enumerate().take(origin.rows) {
        let at = base + i * geometry.width;
        for (j, y_cell) in y_row.iter().enumerate().take(origin.cols) {
            let mut value = y_cell[lane] + bias;
            if let Some(r) = finish.residual {
                value += r[at + j];
            }
            if finish.relu {
                value = value.max(0.0);
            }
            // SAFETY: `origin` is one of the output's tiles and (i, j)
            // inside its plane: the caller's contract covers the write.
            unsafe { out.add(at + j).write(MaybeUninit::new(value)) };
        }
    }
}

/// Copies `source` (rows of `width`) into `padded` (rows of `padded_w`)
/// after `before` rows and columns of zeros, and zeroes what follows each
/// row and the last one. Only the padding is written with zeros (a fill
/// of the whole buffer first was a second pass over every plane of a
/// training step).
pub(crate) fn pad_plane(
    source: &[f32],
    width: usize,
    before: usize,
    padded: &mut [f32],
    padded_w: usize,
) {
    for (y, row) in padded.chunks_exact_mut(padded_w).enumerate() {
        let inside = y
            .checked_sub(before)
            .and_then(|y| source.get(y * width..(y + 1) * width));
        match inside {
            Some(src) => {
                let (zeros, rest) = row.split_at_mut(before);
                let (middle, after) = rest.split_at_mut(width);
                zeros.fill(0.0);
                middle.copy_from_slice(src);
                after.fill(0.0);
            }
            None => row.fill(0.0),
        }
    }
}

/// Dispatches the input transform of one image's plane to the widest
/// vector code the CPU runs.
fn input_plane(padded: &[f32], geometry: Geometry, image: usize, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), all the
        // function requires beyond the baseline.
        unsafe { input_plane_avx2(padded, geometry, image, v) };
        return;
    }
    match geometry.m {
        4 => input_plane_generic::<4, false>(padded, geometry, image, v),
        _ => input_plane_generic::<2, false>(padded, geometry, image, v),
    }
}

/// [`input_plane_generic`] compiled with AVX2 and FMA, the transforms in
/// AVX2 registers ([`avx2::input_group`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_plane_avx2(padded: &[f32], geometry: Geometry, image: usize, v: &mut [f32]) {
    match geometry.m {
        4 => input_plane_generic::<4, true>(padded, geometry, image, v),
        _ => input_plane_generic::<2, true>(padded, geometry, image, v),
    }
}

/// Floats after a padded plane that the AVX2 patch gather may read (and
/// ignore): it loads [`LANES`] values where a patch row needs M + 2.
const GATHER_SLACK: usize = LANES;

/// The input transform of one zero-padded plane (`geometry.padded()`)
/// into image `image`'s tiles of `v` ((M+2)² × all tiles), [`LANES`]
/// tiles at a time; M is the output tile side.
///
/// `AVX2`: the transform in AVX2 registers (only in [`input_plane_avx2`],
/// whose caller checked the CPU); `padded` then ends with
/// [`GATHER_SLACK`] more floats.
#[inline(always)]
fn input_plane_generic<const M: usize, const AVX2: bool>(
    padded: &[f32],
    geometry: Geometry,
    image: usize,
    v: &mut [f32],
) {
    let tiles = geometry.tiles();
    let (_, padded_w) = geometry.padded();
    let mut first = 0;
    while first < tiles {
        let lanes = LANES.min(tiles - first);
        let mut starts = [0usize; LANES];
        for (lane, start) in starts.iter_mut().enumerate().take(lanes) {
            let t = first + lane;
            let (ty, tx) = (t / geometry.tile_cols, t % geometry.tile_cols);
            *start = M * ty * padded_w + M * tx;
        }
        let at = GroupAt {
            stride: geometry.columns,
            offset: image * tiles + first,
        };
        input_group::<M, AVX2>(padded, padded_w, &starts[..lanes], v, at);
        first += lanes;
    }
}

/// Where a group of up to [`LANES`] tiles sits in a transformed buffer:
/// frequency ξ's lanes start at `ξ · stride + offset`.
#[derive(Debug, Clone, Copy)]
struct GroupAt {
    stride: usize,
    offset: usize,
}

/// The input transform of up to [`LANES`] tiles whose (M+2)² patches
/// start at `starts` in `padded` (rows of `row` floats), into `v` at `at`.
///
/// `AVX2`: the transform in AVX2 registers ([`avx2::input_group`]; only
/// from a function compiled with AVX2 and FMA, whose caller checked the
/// CPU), which reads up to [`GATHER_SLACK`] floats past a patch's last
/// row of `padded`.
#[inline(always)]
fn input_group<const M: usize, const AVX2: bool>(
    padded: &[f32],
    row: usize,
    starts: &[usize],
    v: &mut [f32],
    at: GroupAt,
) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 is only set by functions compiled with AVX2 and
        // FMA, whose callers checked that the CPU has them.
        unsafe { avx2::input_group::<M>(padded, row, starts, v, at) };
        return;
    }
    let patch = M + 2;
    let lanes = starts.len();
    // d[i][j][lane]: the (M+2)² patches of up to LANES tiles.
    let mut d = [[[0f32; LANES]; PATCH]; PATCH];
    for (lane, &start) in starts.iter().enumerate() {
        for (i, d_row) in d.iter_mut().enumerate().take(patch) {
            let src = &padded[start + i * row..][..patch];
            for (cell, value) in d_row.iter_mut().zip(src) {
                cell[lane] = *value;
            }
        }
    }
    // d B (rows), then Bᵀ (d B) (columns): the order the AVX2 code can
    // follow with each row's vectors as they come from the gather.
    let mut rows = [[[0f32; LANES]; PATCH]; PATCH];
    for (transformed, d_row) in rows.iter_mut().zip(&d).take(patch) {
        *transformed = input_1d::<M>(*d_row);
    }
    for j in 0..patch {
        let column = [
            rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j],
        ];
        for (i, lanes_value) in input_1d::<M>(column).iter().enumerate().take(patch) {
            store(
                &mut v[(i * patch + j) * at.stride + at.offset..][..lanes],
                lanes_value,
            );
        }
    }
}

/// Copies the first `dst.len()` (≤ [`LANES`]) lanes of `value` into `dst`:
/// one vector store for a full group (a length-generic copy would be a
/// `memmove` call per vector).
#[inline(always)]
fn store(dst: &mut [f32], value: &[f32; LANES]) {
    match <&mut [f32; LANES]>::try_from(&mut *dst) {
        Ok(full) => *full = *value,
        Err(_) => dst.iter_mut().zip(value).for_each(|(d, v)| *d = *v),
    }
}

/// Copies `src` (≤ [`LANES`] values) into the first lanes of `dst`: one
/// vector load for a full group.
#[inline(always)]
fn load(dst: &mut [f32; LANES], src: &[f32]) {
    match <&[f32; LANES]>::try_from(src) {
        Ok(full) => *dst = *full,
        Err(_) => dst.iter_mut().zip(src).for_each(|(d, v)| *d = *v),
    }
}

/// Bᵀ x for M + 2 lane vectors (the first M + 2 of six).
#[inline(always)]
fn input_1d<const M: usize>(x: [[f32; LANES]; PATCH]) -> [[f32; LANES]; PATCH] {
    let mut r = [[0f32; LANES]; PATCH];
    for l in 0..LANES {
        let [d0, d1, d2, d3, d4, d5] = [x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]];
        if M == 4 {
            r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
            r[1][l] = -4.0 * (d1 + d2) + d3 + d4;
            r[2][l] = 4.0 * (d1 - d2) - d3 + d4;
            r[3][l] = 2.0 * (d3 - d1) - d2 + d4;
            r[4][l] = 2.0 * (d1 - d3) - d2 + d4;
            r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
        } else {
            r[0][l] = d0 - d2;
            r[1][l] = d1 + d2;
            r[2][l] = d2 - d1;
            r[3][l] = d1 - d3;
        }
    }
    r
}

/// Aᵀ x for M + 2 lane vectors: M (the first of four).
#[inline(always)]
fn output_1d<const M: usize>(x: [[f32; LANES]; PATCH]) -> [[f32; LANES]; 4] {
    let mut r = [[0f32; LANES]; 4];
    for l in 0..LANES {
        let [m0, m1, m2, m3, m4, m5] = [x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]];
        if M == 4 {
            let (a, b) = (m1 + m2, m1 - m2);
            let (c, d) = (m3 + m4, m3 - m4);
            r[0][l] = m0 + a + c;
            r[1][l] = b + 2.0 * d;
            r[2][l] = a + 4.0 * c;
            r[3][l] = b + 8.0 * d + m5;
        } else {
            r[0][l] = m0 + m1 + m2;
            r[1][l] = m1 - m2 - m3;
        }
    }
    r
}

/// Dispatches the output transform of one plane to the widest vector code
/// the CPU runs.
fn output_plane(products: &[f32], geometry: Geometry, image: usize, staging: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), all the
        // function requires beyond the baseline.
        unsafe { output_plane_avx2(products, geometry, image, staging) };
        return;
    }
    match geometry.m {
        4 => output_plane_generic::<4, false>(products, geometry, image, staging),
        _ => output_plane_generic::<2, false>(products, geometry, image, staging),
    }
}

/// [`output_plane_generic`] compiled with AVX2 and FMA, the transform in
/// AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_plane_avx2(
    products: &[f32],
    geometry: Geometry,
    image: usize,
    staging: &mut [f32],
) {
    match geometry.m {
        4 => output_plane_generic::<4, true>(products, geometry, image, staging),
        _ => output_plane_generic::<2, true>(products, geometry, image, staging),
    }
}

/// The output transform of image `image`'s tiles of one output channel's
/// products ((M+2)² × all tiles) into `staging`, the plane rounded up to
/// whole tiles ((M · tile rows) × (M · tile columns)).
#[inline(always)]
fn output_plane_generic<const M: usize, const AVX2: bool>(
    products: &[f32],
    geometry: Geometry,
    image: usize,
    staging: &mut [f32],
) {
    let tiles = geometry.tiles();
    let staging_w = M * geometry.tile_cols;
    let mut first = 0;
    while first < tiles {
        let lanes = LANES.min(tiles - first);
        let at = GroupAt {
            stride: geometry.columns,
            offset: image * tiles + first,
        };
        let y = output_group::<M, AVX2>(products, at, lanes);
        for lane in 0..lanes {
            let t = first + lane;
            let (ty, tx) = (t / geometry.tile_cols, t % geometry.tile_cols);
            for (i, y_row) in y.iter().enumerate().take(M) {
                let at = (M * ty + i) * staging_w + M * tx;
                let dst = &mut staging[at..at + M];
                for (d, y_cell) in dst.iter_mut().zip(y_row) {
                    *d = y_cell[lane];
                }
            }
        }
        first += lanes;
    }
}

/// The output transform Aᵀ m A of `lanes` (≤ [`LANES`]) tiles of one
/// output channel, whose products lie in `products` at `at`: `y[i][j]`
/// holds the tiles' output row i, column j (i, j < M), a tile per lane.
///
/// `AVX2`: the transform in AVX2 registers ([`avx2::output_group_lanes`];
/// only from a function compiled with AVX2 and FMA, whose caller checked
/// the CPU).
#[inline(always)]
fn output_group<const M: usize, const AVX2: bool>(
    products: &[f32],
    at: GroupAt,
    lanes: usize,
) -> [[[f32; LANES]; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: as in `input_group`.
        return unsafe { avx2::output_group_lanes::<M>(products, at, lanes) };
    }
    let patch = M + 2;
    let mut m = [[[0f32; LANES]; PATCH]; PATCH];
    for (i, row) in m.iter_mut().enumerate().take(patch) {
        for (j, cell) in row.iter_mut().enumerate().take(patch) {
            load(
                cell,
                &products[(i * patch + j) * at.stride + at.offset..][..lanes],
            );
        }
    }
    // Aᵀ m (columns), then (Aᵀ m) A (rows).
    let mut columns = [[[0f32; LANES]; PATCH]; 4];
    for j in 0..patch {
        let r = output_1d::<M>([m[0][j], m[1][j], m[2][j], m[3][j], m[4][j], m[5][j]]);
        for i in 0..M {
            columns[i][j] = r[i];
        }
    }
    let mut y = [[[0f32; LANES]; 4]; 4];
    for i in 0..M {
        y[i] = output_1d::<M>(columns[i]);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_conv::tests::values;

    /// A direct 3×3, stride 1, padding 1 convolution in f64.
    fn direct(
        input: &[f32],
        weights: &[f32],
        bias: &[f32],
        (batch, cin, cout, h, w): (usize, usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; batch * cout * h * w];
        for b in 0..batch {
            for o in 0..cout {
                for y in 0..h {
                    for x in 0..w {
                        let mut sum = f64::from(bias[o]);
                        for c in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) =
                                        ((y + ky).wrapping_sub(1), (x + kx).wrapping_sub(1));
                                    if iy < h && ix < w {
                                        sum += f64::from(input[((b * cin + c) * h + iy) * w + ix])
                                            * f64::from(weights[((o * cin + c) * 3 + ky) * 3 + kx]);
                                    }
                                }
                            }
                        }
                        out[((b * cout + o) * h + y) * w + x] = sum;
                    }
                }
            }
        }
        out
    }

    /// Small planes (a single partial tile, tiles overhanging the border,
    /// rectangles) and batches against a direct f64 convolution.
    #[test]
    fn winograd_equals_direct_convolution() {
        for (i, &(batch, cin, cout, h, w)) in [
            (1, 1, 1, 1, 1),
            (1, 2, 3, 3, 5),
            (2, 3, 4, 7, 7),
            (3, 5, 2, 9, 6),
            (1, 4, 4, 16, 13),
            // Two chunks of input channels and two blocks of output
            // channels in the filter transform, both partial.
            (1, 20, 7, 6, 6),
        ]
        .iter()
        .enumerate()
        {
            let seed = i as u32;
            let input = values(batch * cin * h * w, seed);
            let weights = values(cout * cin * 9, seed + 10);
            let bias = values(cout, seed + 20);
            let want = direct(&input, &weights, &bias, (batch, cin, cout, h, w));
            for tile in [Tile::Four, Tile::Two] {
                let kernel = Winograd::new(tile, &weights, &bias, (cout, cin), false);
                let got = kernel.run(&input, [batch, h, w], None);
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        ((f64::from(*g) - w) / scale).abs() < 1e-5,
                        "case {i} {tile:?}, element {k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Both ways of spreading the work give the same bits, whichever the
    /// thread count picks: blocks of tiles (full and partial, over several
    /// images, tiles cut by the plane's edges) and the phase-by-phase
    /// passes, with bias, residual and ReLU, both tile sizes; and the
    /// blocks agree with a direct convolution.
    #[test]
    fn blocks_of_tiles_equal_the_phase_by_phase_passes() {
        for (i, &(batch, cin, cout, h, w)) in [
            (1, 3, 5, 17, 19),
            (2, 8, 16, 13, 14),
            (1, 20, 7, 30, 30),
            (3, 2, 3, 5, 5),
        ]
        .iter()
        .enumerate()
        {
            let seed = 60 + i as u32;
            let input = values(batch * cin * h * w, seed);
            let weights = values(cout * cin * 9, seed + 10);
            let bias = values(cout, seed + 20);
            let residual = values(batch * cout * h * w, seed + 30);
            let mut want = direct(&input, &weights, &bias, (batch, cin, cout, h, w));
            for (v, r) in want.iter_mut().zip(&residual) {
                *v = (*v + f64::from(*r)).max(0.0);
            }
            for tile in [Tile::Four, Tile::Two] {
                let kernel = Winograd::new(tile, &weights, &bias, (cout, cin), true);
                let dims = [batch, h, w];
                let blocks = kernel.run_spread(Spread::Blocks, &input, dims, Some(&residual));
                let phases = kernel.run_spread(Spread::Phases, &input, dims, Some(&residual));
                assert_eq!(blocks, phases, "case {i} {tile:?}");
                let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                for (k, (g, w)) in blocks.iter().zip(&want).enumerate() {
                    assert!(
                        ((f64::from(*g) - w) / scale).abs() < 1e-5,
                        "case {i} {tile:?}, element {k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The blocks' vector transforms give the portable ones' bits: the
    /// input transform of a block (full and partial groups, several
    /// images) on AVX2 and, where the CPU has it, AVX-512, and the output
    /// transform with bias, residual and ReLU (tiles inside the plane and
    /// cut by its edges, full and partial groups) on AVX2 and (F(4×4))
    /// AVX-512, both tile sizes.
    #[test]
    fn the_vector_block_transforms_equal_the_portable_ones() {
        if !crate::has_avx2_fma() {
            return;
        }
        for (tile, batch, h, w) in [(Tile::Four, 2, 9, 13), (Tile::Two, 1, 7, 7)] {
            let (channels, out_channels) = (3, 5);
            let geometry = Geometry::new(tile, batch, h, w);
            let (padded_h, padded_w) = geometry.padded();
            let mut padded = values(batch * channels * padded_h * padded_w, 7);
            padded.extend([0.0; GATHER_SLACK]);
            let tiles = 3..(batch * geometry.tiles()).min(3 + BLOCK_TILES);
            let len = geometry.frequencies() * frequency_stride(channels.max(out_channels));
            let (mut portable, mut vector) = (vec![0f32; len], vec![0f32; len]);
            match tile {
                Tile::Four => input_block_generic::<4, false>(
                    &padded,
                    geometry,
                    channels,
                    tiles.clone(),
                    &mut portable,
                ),
                Tile::Two => input_block_generic::<2, false>(
                    &padded,
                    geometry,
                    channels,
                    tiles.clone(),
                    &mut portable,
                ),
            }
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { input_block_avx2(&padded, geometry, channels, tiles.clone(), &mut vector) };
            assert!(portable.iter().any(|&v| v != 0.0));
            assert_eq!(portable, vector, "input {tile:?}");
            if vector_isa::detected() == VectorIsa::Avx512 {
                let mut wide = vec![0f32; len];
                // SAFETY: the CPU has AVX-512 F (checked just above).
                unsafe {
                    match tile {
                        Tile::Four => avx512::input_block::<4>(
                            &padded,
                            geometry,
                            channels,
                            tiles.clone(),
                            &mut wide,
                        ),
                        Tile::Two => avx512::input_block::<2>(
                            &padded,
                            geometry,
                            channels,
                            tiles.clone(),
                            &mut wide,
                        ),
                    }
                }
                assert_eq!(portable, wide, "AVX-512 input {tile:?}");
            }

            let products = values(len, 8);
            let bias = values(out_channels, 9);
            let plane = h * w;
            let residual = values(batch * out_channels * plane, 10);
            let finish = Finish {
                bias: &bias,
                relu: true,
                residual: Some(&residual),
                channels: out_channels,
            };
            let mut outputs = [(); 3].map(|()| vec![MaybeUninit::new(f32::NAN); residual.len()]);
            let [portable, vector, wide] = &mut outputs;
            // SAFETY: both buffers hold every output plane; nothing else
            // touches them; the CPU has AVX2 and FMA (checked above).
            unsafe {
                match tile {
                    Tile::Four => output_block_generic::<4>(
                        &products,
                        geometry,
                        tiles.clone(),
                        finish,
                        portable.as_mut_ptr(),
                    ),
                    Tile::Two => output_block_generic::<2>(
                        &products,
                        geometry,
                        tiles.clone(),
                        finish,
                        portable.as_mut_ptr(),
                    ),
                }
                match tile {
                    Tile::Four => avx2::output_block::<4>(
                        &products,
                        geometry,
                        tiles.clone(),
                        finish,
                        vector.as_mut_ptr(),
                    ),
                    Tile::Two => avx2::output_block::<2>(
                        &products,
                        geometry,
                        tiles.clone(),
                        finish,
                        vector.as_mut_ptr(),
                    ),
                }
                // F(4×4) on AVX-512 where the CPU has it (else the
                // portable code again).
                if tile == Tile::Four {
                    let wide = wide.as_mut_ptr();
                    if vector_isa::detected() == VectorIsa::Avx512 {
                        avx512::output_block(&products, geometry, tiles.clone(), finish, wide);
                    } else {
                        output_block_generic::<4>(&products, geometry, tiles.clone(), finish, wide);
                    }
                }
            }
            // SAFETY: every element was initialised (NaN, or written).
            let [portable, vector, wide] = outputs.map(|o| {
                o.into_iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            });
            let written = portable.iter().filter(|v| !v.is_nan()).count();
            assert!(
                written > 0 && written < portable.len(),
                "{tile:?}: {written} written"
            );
            assert_eq!(
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                vector.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "output {tile:?}"
            );
            if tile == Tile::Four {
                assert_eq!(
                    portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "AVX-512 output {tile:?}"
                );
            }
        }
    }

    /// The weight gradient in the Winograd domain against a direct f64
    /// sum over the batch, both tile sizes, planes with partial tiles and
    /// batches split into several passes.
    /// The AVX2 input transform (vector patch gather) writes exactly what
    /// the portable one does, for both tile sizes and for partial groups
    /// of tiles (tile counts that are not a multiple of LANES).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_patch_gather_equals_the_element_copy() {
        if !crate::has_avx2_fma() {
            return;
        }
        for (tile, batch, h, w) in [
            (Tile::Four, 2, 9, 13),
            (Tile::Four, 1, 56, 56),
            (Tile::Two, 3, 7, 7),
        ] {
            let geometry = Geometry::new(tile, batch, h, w).with_vector_columns();
            let (padded_h, padded_w) = geometry.padded();
            let mut padded = values(padded_h * padded_w, 7);
            padded.extend([f32::NAN; GATHER_SLACK]);
            let len = geometry.frequencies() * geometry.columns;
            let (mut portable, mut vector) = (vec![0f32; len], vec![0f32; len]);
            for image in 0..batch {
                match tile {
                    Tile::Four => {
                        input_plane_generic::<4, false>(&padded, geometry, image, &mut portable)
                    }
                    Tile::Two => {
                        input_plane_generic::<2, false>(&padded, geometry, image, &mut portable)
                    }
                }
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { input_plane_avx2(&padded, geometry, image, &mut vector) };
            }
            assert!(portable.iter().any(|&v| v != 0.0));
            assert_eq!(portable, vector, "{tile:?} {batch}×{h}×{w}");
        }
    }

    #[test]
    fn weight_gradient_equals_direct_sum() {
        for (i, &(batch, cin, cout, h, w)) in [
            (1, 1, 1, 1, 1),
            (2, 3, 5, 9, 9),
            (3, 4, 2, 7, 6),
            (2, 2, 3, 13, 16),
        ]
        .iter()
        .enumerate()
        {
            let seed = 40 + i as u32;
            let input = values(batch * cin * h * w, seed);
            let grad = values(batch * cout * h * w, seed + 10);
            let mut want = vec![0f64; cout * cin * 9];
            for b in 0..batch {
                for o in 0..cout {
                    for c in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let mut sum = 0f64;
                                for y in 0..h {
                                    for x in 0..w {
                                        let (iy, ix) =
                                            ((y + ky).wrapping_sub(1), (x + kx).wrapping_sub(1));
                                        if iy < h && ix < w {
                                            sum +=
                                                f64::from(grad[((b * cout + o) * h + y) * w + x])
                                                    * f64::from(
                                                        input[((b * cin + c) * h + iy) * w + ix],
                                                    );
                                        }
                                    }
                                }
                                want[((o * cin + c) * 3 + ky) * 3 + kx] += sum;
                            }
                        }
                    }
                }
            }
            for tile in [Tile::Four, Tile::Two] {
                let got = weight_gradient(tile, &input, &grad, [batch, h, w], (cout, cin));
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        ((f64::from(*g) - w) / scale).abs() < 1e-5,
                        "case {i} {tile:?}, element {k}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
