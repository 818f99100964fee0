//! The CPU inference kernel of the image branch: a convolution with its
//! batch norm already folded in, fused with the bias, an optional residual
//! add and an optional ReLU — one pass over the output instead of four.
//!
//! It is a candle custom op ([`CustomOp1`] without a residual, [`CustomOp2`]
//! with one), so the network stays one candle graph; only the arithmetic
//! differs from `candle_nn::Conv2d`: the input is unfolded once per image
//! (im2col, in parallel, into a reused per-thread buffer) and multiplied by
//! the weights with the `gemm` crate (the matrix kernel candle itself uses),
//! the output pre-filled with bias (+ residual) so the product accumulates
//! into it. 1×1 stride-1 convolutions skip the unfolding. 3×3 stride-1
//! convolutions with enough output tiles run in the Winograd domain
//! instead ([`super::winograd`], weights transformed once, when the kernel
//! is built). At batch 1 the products run with weights packed once:
//! [`super::packed_gemm`] for large output planes, and on AVX-512 and
//! AVX2 [`super::narrow_gemm`] for small ones (the deep layers' 7×7 and
//! 14×14), which reads the input in place instead of unfolding it.
//! Training uses [`super::cpu_conv_grad`], which adds the backward
//! pass and runs its forward products here.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::narrow_gemm::{self, PANEL_ROWS, PanelWeights};
use super::packed_gemm::{self, Epilogue, Operands, PackedWeights};
use super::scratch::with_scratch;
use super::stem_pool::StemPool;
use super::vector_isa::{self, VectorIsa};
use super::winograd::{Tile, Winograd, pad_plane};

/// A folded convolution: weights (out, in, k, k), bias (out), stride,
/// padding, and whether a ReLU follows.
#[derive(Debug, Clone)]
pub struct FusedConv {
    weights: Vec<f32>,
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    relu: bool,
    /// The same convolution in the Winograd domain, for 3×3 stride-1
    /// padding-1 kernels.
    winograd: Option<WinogradForms>,
    /// The weights packed for [`packed_gemm`] (im2col and 1×1 at batch
    /// 1), on the first call that runs them; `None` when the kernel runs
    /// every im2col product with `gemm` (the kernel before packing, for
    /// comparisons and tests).
    packed: Option<OnceLock<PackedWeights>>,
    /// The weights packed for [`narrow_gemm`] (im2col and 1×1 at batch 1
    /// with few output pixels, on AVX-512 and AVX2), on the first call
    /// that runs them; `None` as `packed`.
    panels: Option<OnceLock<PanelWeights>>,
}

/// A kernel's Winograd forms, each transformed once, on the first call
/// that runs it (the plane size decides which; a network's are all built
/// by the warm-up pass when a model is loaded), then kept: only the forms
/// a network uses take memory (F(4×4) holds 4× the weights).
#[derive(Debug, Clone, Default)]
struct WinogradForms {
    four: OnceLock<Winograd>,
    two: OnceLock<Winograd>,
}

thread_local! {
    /// The im2col buffer, reused across calls on this thread (up to a few
    /// MiB at 224²; allocating it afresh every time costs page faults).
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The zero-padded input of [`FusedConv::run_panels`], reused likewise
    /// (256 KiB for a 3×3 convolution on a 14×14×256 input).
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output planes of at least this many pixels run image by image in a
/// batch; smaller ones (the deep layers) as one wide product.
const WIDE_MAX_PIXELS: usize = 1024;

/// Below this many multiply-adds a convolution runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// The threads for a product of `work` multiply-adds: all of the pool's
/// from [`PARALLEL_MIN_WORK`] up, else one.
fn threads_for(work: usize) -> usize {
    if work >= PARALLEL_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Output planes of at least this many pixels run at batch 1 with the
/// packed weights, split between the threads by output rows (each
/// unfolds and multiplies its own rows, with all the weights); smaller
/// ones (the deep layers, bound by reading the weights), with whole
/// panels of output channels on AVX-512 or AVX2, run with [`narrow_gemm`]
/// reading the input in place (the panels split between the threads,
/// each reading only its weights), else im2col and `gemm`, measured
/// faster there than the packed weights (`oxbox bench --layers`:
/// `im2col_ms` against `gemm_ms`). 3×3 stride-2 convolutions run with
/// [`narrow_gemm`] whatever their plane: a ResNet's first one (56×56 →
/// 28×28, 64 → 128 channels) took 0.34 ms against 0.46 with the packed
/// weights (AVX-512; AVX2 0.58 against 0.71; `oxbox bench --layers`,
/// 1 Dec, AMD EPYC).
const SPLIT_BY_PIXELS_MIN: usize = 256;

/// With packed weights split by output rows: the unfolded input a task
/// holds at most, in floats (256 KiB: inside this CPU generation's L2).
const UNFOLDED_PER_TASK: usize = 1 << 16;

/// A 3×3 convolution runs in the Winograd domain with 4×4 tiles when its
/// output has at least this many of them (over the batch) per 64 input
/// channels, else with 2×2 tiles when it has [`WINOGRAD2_MIN_TILES`] of
/// those, else im2col: with fewer tiles the transformed weights (4× or
/// 16/9× the direct ones) cost more to read than the multiplications
/// saved (`oxbox bench --layers` measures both paths per layer).
const WINOGRAD4_MIN_TILES: usize = 4;
/// See [`WINOGRAD4_MIN_TILES`].
const WINOGRAD2_MIN_TILES: usize = 2;
/// On AVX-512, where the convolution would otherwise run with
/// [`narrow_gemm`] reading its input in place ([`FusedConv::runs_narrow`]),
/// it runs with 2×2 tiles when it has at least this many per 64 input
/// channels, never with 4×4 ones: there the multiply-adds are cheap
/// beside reading the weights, which in the network come from memory.
/// At batch 1 a ResNet-18's layer 3 (14×14, 256 channels: 12 tiles per
/// 64 channels) runs F(2×2), layer 4 (7×7, 512: 2 per 64) the panels.
/// The three 3×3 convolutions of layer 3 timed inside the forward pass
/// (medians of 200, five rounds, 1 Dec, AMD EPYC): 1.16–1.27 ms with
/// F(2×2), 1.03–1.34 with F(4×4) (4.2 MB and 9.4 MB of weights a
/// convolution), 1.67–1.82 in place (three rounds); layer 4 with F(2×2)
/// (16.8 MB against 9.4) 1.61–1.87 ms against 1.77–1.95 in place, a wash
/// for twice the memory. On AVX2, with half the lanes, F(4×4) and F(2×2)
/// keep their thresholds: layer 4 at 2.03–2.38 ms with F(2×2) against
/// 3.74–4.03 in place.
const WINOGRAD2_MIN_TILES_AVX512_NARROW: usize = 4;

impl FusedConv {
    /// A fused convolution from folded weights `(out, in, k, k)` (row-major)
    /// and bias `(out)`.
    ///
    /// # Errors
    /// When the lengths do not fit the shape.
    pub fn new(
        weights: Vec<f32>,
        bias: Vec<f32>,
        (out_channels, in_channels, kernel): (usize, usize, usize),
        stride: usize,
        padding: usize,
        relu: bool,
    ) -> Result<Self> {
        if weights.len() != out_channels * in_channels * kernel * kernel
            || bias.len() != out_channels
            || stride == 0
            || kernel == 0
        {
            return Err(candle_core::Error::Msg(format!(
                "fused conv: {} weights and {} biases do not fit ({out_channels}, {in_channels}, {kernel}, {kernel}) stride {stride}",
                weights.len(),
                bias.len()
            )));
        }
        let winograd = (kernel == 3 && stride == 1 && padding == 1).then(WinogradForms::default);
        Ok(Self {
            weights,
            bias,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            relu,
            winograd,
            packed: Some(OnceLock::new()),
            panels: Some(OnceLock::new()),
        })
    }

    /// The kernel as it was before packed weights and Winograd: every
    /// call runs im2col + `gemm` (the reference of the model-level
    /// comparisons).
    pub fn plain_gemm(mut self) -> Self {
        self.winograd = None;
        self.packed = None;
        self.panels = None;
        self
    }

    /// The same kernel without its Winograd form: every call runs im2col +
    /// gemm (for comparisons and tests).
    pub fn without_winograd(mut self) -> Self {
        self.winograd = None;
        self
    }

    /// This convolution and the 3×3 stride-2 max pool after it as one
    /// kernel ([`StemPool`]) when it is a ResNet stem: one input channel,
    /// 7×7, stride 2, padding 3, ReLU.
    pub(super) fn stem_pool(&self) -> Option<StemPool> {
        let stem = self.in_channels == 1
            && (self.kernel, self.stride, self.padding) == (7, 2, 3)
            && self.relu;
        stem.then(|| StemPool::new(&self.weights, &self.bias, self.out_channels))
    }

    /// Whether a call on `batch` images with `pixels` output pixels runs
    /// with [`narrow_gemm`] ([`FusedConv::run_panels`]): one image, fewer
    /// than [`SPLIT_BY_PIXELS_MIN`] pixels or a 3×3 stride-2 kernel, a
    /// stride of 1 or 2, whole panels of output channels, and a CPU with
    /// the kernel (AVX-512 or AVX2).
    fn runs_narrow(&self, batch: usize, pixels: usize) -> bool {
        self.narrow_panels(batch, pixels).is_some()
    }

    /// The panels' cell when [`FusedConv::runs_narrow`].
    fn narrow_panels(&self, batch: usize, pixels: usize) -> Option<&OnceLock<PanelWeights>> {
        let planes = pixels < SPLIT_BY_PIXELS_MIN || (self.kernel, self.stride) == (3, 2);
        self.panels_for(batch).filter(|_| planes)
    }

    /// The panels' cell when a call on `batch` images can run with
    /// [`narrow_gemm`] whatever its plane size: one image, a stride of 1
    /// or 2, whole panels of output channels, weights that may be packed
    /// (not [`FusedConv::plain_gemm`]) and a CPU with the kernel.
    fn panels_for(&self, batch: usize) -> Option<&OnceLock<PanelWeights>> {
        let can = batch == 1
            && matches!(self.stride, 1 | 2)
            && self.out_channels.is_multiple_of(PANEL_ROWS)
            && narrow_gemm::available();
        self.panels.as_ref().filter(|_| can)
    }

    /// The convolution of one image with the input read in place
    /// ([`FusedConv::run_panels`]) whatever its plane size, for `oxbox bench
    /// --layers`; `None` where that path cannot run (a batch, output
    /// channels not in whole panels, a stride above 2, no AVX2).
    pub fn run_in_place(&self, input: &[f32], dims: [usize; 5]) -> Option<Vec<f32>> {
        let panels = self.panels_for(dims[0])?;
        Some(self.run_panels(panels, input, dims, None))
    }

    /// Whether a call on `batch` images of `height`×`width` runs in the
    /// Winograd domain.
    pub fn uses_winograd(&self, batch: usize, height: usize, width: usize) -> bool {
        self.winograd_tile(batch, height, width).is_some()
    }

    /// The Winograd tile a call on `batch` images of `height`×`width` runs
    /// with, or `None` for im2col + gemm.
    pub fn winograd_tile(&self, batch: usize, height: usize, width: usize) -> Option<Tile> {
        self.winograd.as_ref()?;
        // Stride 1, padding 1: the output plane is the input's.
        let enough = |tile: Tile, min: usize| {
            batch * tile.tiles(height, width) * 64 >= min * self.in_channels
        };
        if self.runs_narrow(batch, height * width) && vector_isa::active() == VectorIsa::Avx512 {
            return enough(Tile::Two, WINOGRAD2_MIN_TILES_AVX512_NARROW).then_some(Tile::Two);
        }
        if enough(Tile::Four, WINOGRAD4_MIN_TILES) {
            Some(Tile::Four)
        } else if enough(Tile::Two, WINOGRAD2_MIN_TILES) {
            Some(Tile::Two)
        } else {
            None
        }
    }

    /// The Winograd form for `tile`, transformed on first use.
    fn winograd_form<'a>(&'a self, forms: &'a WinogradForms, tile: Tile) -> &'a Winograd {
        let cell = match tile {
            Tile::Four => &forms.four,
            Tile::Two => &forms.two,
        };
        cell.get_or_init(|| {
            Winograd::new(
                tile,
                &self.weights,
                &self.bias,
                (self.out_channels, self.in_channels),
                self.relu,
            )
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Output side for an input side.
    pub(super) fn out_side(&self, side: usize) -> Result<usize> {
        (side + 2 * self.padding)
            .checked_sub(self.kernel)
            .map(|span| span / self.stride + 1)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "fused conv: input side {side} smaller than the {k}x{k} kernel",
                    k = self.kernel
                ))
            })
    }

    /// Checks the input and returns (batch, height, width, out height, out
    /// width) and the input slice.
    fn input<'a>(
        &self,
        storage: &'a CpuStorage,
        layout: &Layout,
    ) -> Result<(&'a [f32], [usize; 5])> {
        let CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::Msg("fused conv: f32 input only".into()));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "fused conv: contiguous input only".into(),
            ));
        };
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if channels != self.in_channels {
            return Err(candle_core::Error::Msg(format!(
                "fused conv: {channels} input channels, the weights take {}",
                self.in_channels
            )));
        }
        let dims = [
            batch,
            height,
            width,
            self.out_side(height)?,
            self.out_side(width)?,
        ];
        Ok((&data[start..end], dims))
    }

    /// Runs the convolution on contiguous NCHW `input`, adding `residual`
    /// (same shape as the output) when given. The whole batch is one matrix
    /// product: the unfolded images sit side by side, so deep layers with
    /// few output pixels (7×7 at 224²) still give the kernel wide matrices.
    pub(super) fn run(
        &self,
        input: &[f32],
        dims: [usize; 5],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let [batch, height, width, out_h, out_w] = dims;
        let n = out_h * out_w;
        if let (Some(forms), Some(tile)) =
            (&self.winograd, self.winograd_tile(batch, height, width))
        {
            return self
                .winograd_form(forms, tile)
                .run(input, [batch, height, width], residual);
        }
        if let Some(panels) = self.narrow_panels(batch, n) {
            return self.run_panels(panels, input, dims, residual);
        }
        if batch == 1
            && n >= SPLIT_BY_PIXELS_MIN
            && let Some(packed) = &self.packed
        {
            return self.run_packed(packed, input, dims, residual);
        }
        if batch > 1 && n >= WIDE_MAX_PIXELS {
            // Large planes already give the kernel wide matrices: one image
            // at a time keeps the unfolded input in cache.
            let plane_in = self.in_channels * height * width;
            let plane_out = self.out_channels * n;
            let mut out = Vec::with_capacity(batch * plane_out);
            for b in 0..batch {
                out.extend(self.run(
                    &input[b * plane_in..(b + 1) * plane_in],
                    [1, height, width, out_h, out_w],
                    residual.map(|r| &r[b * plane_out..(b + 1) * plane_out]),
                ));
            }
            return out;
        }
        let wide = batch * n;
        let plane_out = self.out_channels * n;
        let k = self.in_channels * self.kernel * self.kernel;

        // The product's layout is (out channels, batch · pixels); for one
        // image that is already NCHW.
        let mut product = vec![0f32; self.out_channels * wide];
        for (c, row) in product.chunks_exact_mut(wide).enumerate() {
            for b in 0..batch {
                let cell = &mut row[b * n..(b + 1) * n];
                match residual {
                    Some(r) => cell.copy_from_slice(&r[b * plane_out + c * n..][..n]),
                    None => cell.fill(0.0),
                }
                cell.iter_mut().for_each(|v| *v += self.bias[c]);
            }
        }
        let threads = threads_for(self.out_channels * wide * k);
        self.with_unfolded(input, batch, [height, width, out_h, out_w], |rhs| {
            matmul_accumulate(
                &mut product,
                &self.weights,
                rhs,
                (self.out_channels, wide, k),
                threads,
            );
        });
        if self.relu {
            product.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        if batch == 1 {
            return product;
        }
        let mut out = vec![0f32; batch * plane_out];
        for (c, row) in product.chunks_exact(wide).enumerate() {
            for b in 0..batch {
                out[b * plane_out + c * n..][..n].copy_from_slice(&row[b * n..(b + 1) * n]);
            }
        }
        out
    }

    /// One image with the weights in panels ([`narrow_gemm`], AVX-512 or
    /// AVX2): Y = W · unfold(x) + bias (+ residual) (ReLU), the input read
    /// in place ([`narrow_gemm::convolve`]; padded first, into this
    /// thread's buffer, when the convolution pads), the panels spread over
    /// the threads (each reads only its panels' weights, which is what
    /// bounds these layers). [`FusedConv::run`] sends what
    /// [`FusedConv::runs_narrow`] picks here; 1×1 convolutions go on to
    /// [`FusedConv::run_panels_unfolded`].
    fn run_panels(
        &self,
        panels: &OnceLock<PanelWeights>,
        input: &[f32],
        [_, height, width, out_h, out_w]: [usize; 5],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let (k, stride) = (self.kernel, self.stride);
        let depth = self.in_channels * k * k;
        if k == 1 {
            return self.run_panels_unfolded(
                panels,
                input,
                [height, width, out_h, out_w],
                residual,
            );
        }
        let weights = panels
            .get_or_init(|| PanelWeights::new(&self.tap_major_weights(), self.out_channels, depth));
        let (rows, n) = (self.out_channels, out_h * out_w);
        assert!(input.len() >= self.in_channels * height * width);
        assert!(residual.is_none_or(|r| r.len() >= rows * n));
        let epilogue = self.epilogue();
        let threads = threads_for(rows * n * depth);
        let mut out: Vec<f32> = Vec::with_capacity(rows * n);
        // Raw parts shared by the tasks, which write disjoint rows.
        let dst = out.spare_capacity_mut().as_mut_ptr() as usize;
        let skip = residual.map_or(0, |r| r.as_ptr() as usize);
        self.with_padded(input, [height, width], |pixels, [_, padded_w]| {
            let taps: Vec<usize> = (0..k * k).map(|t| (t / k) * padded_w + t % k).collect();
            let (pixels, plane) = (pixels.as_ptr() as usize, pixels.len() / self.in_channels);
            let work = |panel: usize| {
                let image = narrow_gemm::Image {
                    pixels: pixels as *const f32,
                    plane,
                    taps: &taps,
                    out_width: out_w,
                    row_step: stride * padded_w,
                    stride,
                };
                let output = narrow_gemm::Output {
                    dst: dst as *mut f32,
                    residual: skip as *const f32,
                    stride: n,
                    cols: n,
                };
                // SAFETY: the output's pixels read the padded planes only
                // inside them (out_side); Y and the residual hold rows × n
                // (asserted above), and each task writes only its panel's
                // rows; the CPU runs `narrow_gemm` (the caller checked).
                unsafe {
                    narrow_gemm::convolve(weights, panel..panel + 1, &image, output, epilogue);
                }
            };
            if threads > 1 && weights.panels() > 1 {
                (0..weights.panels()).into_par_iter().for_each(work);
            } else {
                (0..weights.panels()).for_each(work);
            }
        });
        // SAFETY: the panels cover every row, and each task wrote every
        // pixel of its rows.
        unsafe { out.set_len(rows * n) };
        out
    }

    /// [`FusedConv::run_panels`] for a 1×1 convolution: X is the input
    /// itself at stride 1, else its every other pixel (unfolded: a
    /// quarter of the input), as a matrix; reading the stride-2 pixels in
    /// place was slower (`oxbox bench --layers`, 1 Dec: 0.078 against
    /// 0.064 ms for layer 2's shortcut).
    fn run_panels_unfolded(
        &self,
        panels: &OnceLock<PanelWeights>,
        input: &[f32],
        dims: [usize; 4],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let [.., out_h, out_w] = dims;
        let k = self.in_channels;
        let weights = panels.get_or_init(|| PanelWeights::new(&self.weights, self.out_channels, k));
        let epilogue = self.epilogue();
        let threads = threads_for(self.out_channels * out_h * out_w * k);
        let multiply = |operands: Operands, panel: usize| {
            // SAFETY: X holds k rows and Y (and the residual) this
            // convolution's rows of the output's pixels (`product_by_rows`);
            // the CPU runs `narrow_gemm` (checked by the caller).
            unsafe { narrow_gemm::multiply(weights, panel..panel + 1, operands, epilogue) }
        };
        // SAFETY: the tasks are the panels, which cover every row; each
        // writes every column of its panel's rows and no other row
        // (`narrow_gemm::multiply`).
        unsafe {
            self.product_by_rows(input, dims, residual, (weights.panels(), threads), multiply)
        }
    }

    /// The weights in (out, tap, in) order: the depth order
    /// [`narrow_gemm::convolve`] reads the input in (tap by tap, each over
    /// every channel).
    fn tap_major_weights(&self) -> Vec<f32> {
        let (channels, taps) = (self.in_channels, self.kernel * self.kernel);
        let mut reordered = vec![0f32; self.weights.len()];
        for (o, filter) in self.weights.chunks_exact(channels * taps).enumerate() {
            for (c, taps_of_channel) in filter.chunks_exact(taps).enumerate() {
                for (t, &w) in taps_of_channel.iter().enumerate() {
                    reordered[(o * taps + t) * channels + c] = w;
                }
            }
        }
        reordered
    }

    /// Calls `f` with the image (C, H, W) `input` and its planes' (height,
    /// width): `input` itself when the convolution does not pad, else a
    /// copy with `padding` zeros around each plane, in this thread's
    /// scratch buffer.
    fn with_padded<R>(
        &self,
        input: &[f32],
        [height, width]: [usize; 2],
        f: impl FnOnce(&[f32], [usize; 2]) -> R,
    ) -> R {
        let p = self.padding;
        let plane_in = height * width;
        if p == 0 {
            return f(&input[..self.in_channels * plane_in], [height, width]);
        }
        let (padded_h, padded_w) = (height + 2 * p, width + 2 * p);
        let plane = padded_h * padded_w;
        // Every value is written (`pad_plane` writes the borders' zeros
        // too), so the buffer is only grown, not cleared.
        let pad = |(padded, src): (&mut [f32], &[f32])| {
            pad_plane(src, width, p, padded, padded_w);
        };
        with_scratch(&PADDED, |buffer| {
            let len = self.in_channels * plane;
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            let padded = &mut buffer[..len];
            // In parallel from 64 Ki values (256 KiB) up, plane by plane,
            // as the unfolding is (`im2col`).
            if len >= 1 << 16 && rayon::current_num_threads() > 1 {
                padded
                    .par_chunks_exact_mut(plane)
                    .zip(input.par_chunks_exact(plane_in))
                    .for_each(pad);
            } else {
                padded
                    .chunks_exact_mut(plane)
                    .zip(input.chunks_exact(plane_in))
                    .for_each(pad);
            }
            f(padded, [padded_h, padded_w])
        })
    }

    /// Y (out channels × output pixels) of one image, written by `tasks`
    /// tasks over the unfolded input (the 1×1 input itself when there is
    /// nothing to unfold), in parallel when `threads` > 1: task i runs
    /// `multiply(operands, i)`, the operands addressing all of X, Y and the
    /// residual, and multiplies the rows of W that are its own. Y is not
    /// zeroed first.
    ///
    /// # Safety
    /// The tasks write disjoint rows of Y and, together, every element.
    unsafe fn product_by_rows(
        &self,
        input: &[f32],
        [height, width, out_h, out_w]: [usize; 4],
        residual: Option<&[f32]>,
        (tasks, threads): (usize, usize),
        multiply: impl Fn(Operands, usize) + Sync,
    ) -> Vec<f32> {
        let (rows, n) = (self.out_channels, out_h * out_w);
        assert!(input.len() >= self.in_channels * height * width);
        assert!(residual.is_none_or(|r| r.len() >= rows * n));
        let mut out: Vec<f32> = Vec::with_capacity(rows * n);
        // Raw parts shared by the tasks, which write disjoint rows.
        let dst = out.spare_capacity_mut().as_mut_ptr() as usize;
        let skip = residual.map_or(0, |r| r.as_ptr() as usize);
        self.with_unfolded(input, 1, [height, width, out_h, out_w], |rhs| {
            let rhs = rhs.as_ptr() as usize;
            let work = |task: usize| {
                let operands = Operands {
                    rhs: rhs as *const f32,
                    rhs_stride: n,
                    cols: n,
                    dst: dst as *mut f32,
                    residual: skip as *const f32,
                    dst_stride: n,
                };
                multiply(operands, task);
            };
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(work);
            } else {
                (0..tasks).for_each(work);
            }
        });
        // SAFETY: the tasks wrote every element (the caller's contract).
        unsafe { out.set_len(rows * n) };
        out
    }

    /// The bias and ReLU every product of this convolution ends with.
    fn epilogue(&self) -> Epilogue<'_> {
        Epilogue {
            bias: Some(&self.bias),
            relu: self.relu,
        }
    }

    /// One image with the packed weights: Y = W · unfold(x) + bias (+
    /// residual) (ReLU), the epilogue applied as each product is stored.
    fn run_packed(
        &self,
        packed: &OnceLock<PackedWeights>,
        input: &[f32],
        [_, height, width, out_h, out_w]: [usize; 5],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let n = out_h * out_w;
        let k = self.in_channels * self.kernel * self.kernel;
        let rows = self.out_channels;
        let weights =
            packed.get_or_init(|| PackedWeights::new(&self.weights, self.out_channels, k));
        let threads = threads_for(rows * n * k);
        let epilogue = self.epilogue();
        let direct = self.kernel == 1 && self.stride == 1 && self.padding == 0;
        if !direct && threads > 1 && n >= SPLIT_BY_PIXELS_MIN {
            // Not zeroed first (the stem's output is 3 MiB): the product's
            // first pass over the depth writes every element.
            let mut out: Vec<f32> = Vec::with_capacity(rows * n);
            assert!(input.len() >= self.in_channels * height * width);
            assert!(residual.is_none_or(|r| r.len() >= rows * n));
            // Raw parts shared by the tasks, which write disjoint elements.
            let dst = out.spare_capacity_mut().as_mut_ptr() as usize;
            let skip = residual.map_or(0, |r| r.as_ptr() as usize);
            let at = |ptr: usize, offset: usize| {
                if ptr == 0 {
                    0
                } else {
                    ptr + offset * size_of::<f32>()
                }
            };
            // Output rows per task: the unfolded rows fit in L2, at least
            // two tasks per thread.
            let per_task = (UNFOLDED_PER_TASK / (k * out_w).max(1))
                .clamp(1, out_h.div_ceil(2 * threads).max(1));
            let tasks = out_h.div_ceil(per_task);
            (0..tasks).into_par_iter().for_each(|task| {
                let first = task * per_task;
                let lines = first..(first + per_task).min(out_h);
                let cols = lines.len() * out_w;
                with_scratch(&COLUMNS, |buffer| {
                    // Grown only (every value is written below): a last,
                    // shorter task would otherwise make the next call zero
                    // what it regrows.
                    if buffer.len() < k * cols {
                        buffer.resize(k * cols, 0.0);
                    }
                    let columns = &mut buffer[..k * cols];
                    for (row, line) in columns.chunks_exact_mut(cols).enumerate() {
                        self.unfold_row(input, [height, width, out_w], row, lines.clone(), line);
                    }
                    let operands = Operands {
                        rhs: columns.as_ptr(),
                        rhs_stride: cols,
                        cols,
                        dst: at(dst, first * out_w) as *mut f32,
                        residual: at(skip, first * out_w) as *const f32,
                        dst_stride: n,
                    };
                    // SAFETY: `columns` holds k rows of `cols`; Y and the
                    // residual (rows × n, asserted above) hold rows ×
                    // columns first·out_w .. + cols, which only this task
                    // writes.
                    unsafe {
                        packed_gemm::multiply(weights, 0..weights.blocks(), operands, epilogue);
                    };
                });
            });
            // SAFETY: the tasks cover every output row and every row block
            // of the weights, and the first pass over the depth writes each
            // element of its block.
            unsafe { out.set_len(rows * n) };
            return out;
        }
        // Row blocks per task: about two tasks per thread.
        let per_task = weights.blocks().div_ceil(2 * threads).max(1);
        let tasks = (weights.blocks().div_ceil(per_task), threads);
        let multiply = |operands: Operands, task: usize| {
            let first = task * per_task;
            // SAFETY: X holds k rows (the unfolded input, or the 1×1 input)
            // and Y (and the residual) this convolution's rows of the
            // output's pixels (`product_by_rows`).
            unsafe { packed_gemm::multiply(weights, first..first + per_task, operands, epilogue) }
        };
        let dims = [height, width, out_h, out_w];
        // SAFETY: the tasks cover every row block, each writes every column
        // of its blocks' rows and no other row, and the first pass over the
        // depth writes each element.
        unsafe { self.product_by_rows(input, dims, residual, tasks, multiply) }
    }

    /// Calls `f` with the right-hand side of the convolution's product for
    /// `batch` images: the input itself for a 1×1 stride-1 unpadded
    /// convolution of one image, else the images unfolded (im2col) into
    /// this thread's scratch buffer, (k, batch · pixels).
    fn with_unfolded<R>(
        &self,
        input: &[f32],
        batch: usize,
        [height, width, out_h, out_w]: [usize; 4],
        f: impl FnOnce(&[f32]) -> R,
    ) -> R {
        if batch == 1 && self.kernel == 1 && self.stride == 1 && self.padding == 0 {
            return f(input);
        }
        let k = self.in_channels * self.kernel * self.kernel;
        let plane_in = self.in_channels * height * width;
        with_scratch(&COLUMNS, |columns| {
            columns.resize(k * batch * out_h * out_w, 0.0);
            for b in 0..batch {
                let image = &input[b * plane_in..(b + 1) * plane_in];
                self.im2col(image, [height, width, out_h, out_w], columns, b, batch);
            }
            f(columns)
        })
    }

    /// Row `row` (channel, ky, kx) of the unfolded image for output rows
    /// `lines`, into `out` (`lines.len()` · `out_w` values), zero outside
    /// the padded border.
    fn unfold_row(
        &self,
        image: &[f32],
        [height, width, out_w]: [usize; 3],
        row: usize,
        lines: Range<usize>,
        out: &mut [f32],
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let channel = row / (k * k);
        let (ky, kx) = ((row / k) % k, row % k);
        let plane = &image[channel * height * width..(channel + 1) * height * width];
        // ix = ox·s + kx − p is inside the row for ox in first..last (the
        // same for every line): zeros around, every s-th value between.
        let first = p.saturating_sub(kx).div_ceil(s).min(out_w);
        let last = (width + p)
            .saturating_sub(kx)
            .div_ceil(s)
            .min(out_w)
            .max(first);
        let count = last - first;
        let from = (first * s + kx).saturating_sub(p);
        for (oy, line) in lines.zip(out.chunks_exact_mut(out_w)) {
            let iy = (oy * s + ky).wrapping_sub(p);
            if iy >= height || count == 0 {
                line.fill(0.0);
                continue;
            }
            let src = &plane[iy * width..(iy + 1) * width];
            line[..first].fill(0.0);
            line[last..].fill(0.0);
            let line = &mut line[first..last];
            match s {
                1 => line.copy_from_slice(&src[from..from + count]),
                2 => copy_even(line, &src[from..=from + 2 * (count - 1)]),
                _ => {
                    for (v, x) in line.iter_mut().zip(src[from..].iter().step_by(s)) {
                        *v = *x;
                    }
                }
            }
        }
    }

    /// Unfolds `image` (C, H, W) into image `slot` of `columns`
    /// (C·k·k, batch · OH·OW), zero outside the padded border.
    pub(super) fn im2col(
        &self,
        image: &[f32],
        [height, width, out_h, out_w]: [usize; 4],
        columns: &mut [f32],
        slot: usize,
        batch: usize,
    ) {
        let k = self.kernel;
        let n = out_h * out_w;
        let fill = |(row, out): (usize, &mut [f32])| {
            let out = &mut out[slot * n..(slot + 1) * n];
            self.unfold_row(image, [height, width, out_w], row, 0..out_h, out);
        };
        // In parallel from 32 Ki values (128 KiB) up: the deep layers'
        // stride-2 unfoldings (110–230 Ki values at 224²) left the other
        // core idle while one copied.
        if n * k * k * self.in_channels >= PARALLEL_MIN_WORK / 32 {
            columns.par_chunks_mut(batch * n).enumerate().for_each(fill);
        } else {
            columns.chunks_mut(batch * n).enumerate().for_each(fill);
        }
    }
}

/// `dst[i] = src[2·i]` (`src` holds 2·`dst.len()` − 1 values or more):
/// a stride-2 convolution's unfolding. On x86-64, four values per two
/// loads and one shuffle (SSE2, the baseline); the compiler leaves the
/// element loop scalar.
fn copy_even(dst: &mut [f32], src: &[f32]) {
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    #[cfg(target_arch = "x86_64")]
    let done = {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_shuffle_ps, _mm_storeu_ps};
        let mut done = 0;
        for (four, eight) in dst.chunks_exact_mut(4).zip(src.chunks_exact(8)) {
            // SAFETY: `eight` holds 8 floats and `four` 4 (unaligned
            // loads and store); SSE2 is part of the x86-64 baseline.
            unsafe {
                let low = _mm_loadu_ps(eight.as_ptr());
                let high = _mm_loadu_ps(eight.as_ptr().add(4));
                _mm_storeu_ps(
                    four.as_mut_ptr(),
                    _mm_shuffle_ps::<0b10_00_10_00>(low, high),
                );
            }
            done += 4;
        }
        done
    };
    for (i, v) in dst.iter_mut().enumerate().skip(done) {
        *v = src[2 * i];
    }
}

/// The f32 values of a contiguous CPU tensor; an error naming `op`
/// otherwise. What every custom op here reads its inputs with.
pub(super) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op}: contiguous f32 tensors only"),
    }
}

/// Runs `f` on the f32 values of CPU tensor `t` in place (made contiguous
/// first only when it is not): the backward passes read their inputs
/// this way instead of copying them into vectors.
///
/// # Errors
/// When `t` is not an f32 tensor on the CPU (the error names `op`).
pub(super) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: CPU tensors only");
    };
    f(contiguous_f32(cpu, layout, op)?)
}

/// `dst (m×n) += lhs (m×k) · rhs (k×n)`, all row-major and contiguous.
fn matmul_accumulate(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    gemm_strided(dst, (m, n, k), true, (lhs, (1, k)), (rhs, (1, n)), threads);
}

/// `dst (m×n) (+)= lhs (m×k) · rhs (k×n)`: dst row-major, each operand
/// with explicit (column stride, row stride), so transposed operands need
/// no copy. Accumulates into dst when `accumulate`.
///
/// With several threads and enough rows, the rows of dst are split into
/// one band per thread, each a single-threaded product: every thread then
/// reads only its share of lhs (the weights), which is what bounds the
/// deep layers, and the bands need no synchronisation (gemm's own
/// threading splits the columns, which scaled poorly at these sizes).
pub(super) fn gemm_strided(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (lhs, (lhs_cs, lhs_rs)): (&[f32], (usize, usize)),
    (rhs, (rhs_cs, rhs_rs)): (&[f32], (usize, usize)),
    threads: usize,
) {
    /// Rows per band at least (the gemm micro-kernel's height is 16).
    const MIN_BAND: usize = 32;
    let span = |cs: usize, rs: usize, rows: usize, cols: usize| {
        rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs + 1
    };
    assert!(
        dst.len() >= m * n
            && lhs.len() >= span(lhs_cs, lhs_rs, m, k)
            && rhs.len() >= span(rhs_cs, rhs_rs, k, n)
    );
    if m == 0 || n == 0 {
        return;
    }
    if threads > 1 && m >= 2 * MIN_BAND {
        let band = m.div_ceil(threads).next_multiple_of(16).max(MIN_BAND);
        dst[..m * n]
            .par_chunks_mut(band * n)
            .enumerate()
            .for_each(|(i, rows)| {
                let first = i * band;
                let count = rows.len() / n;
                gemm_strided(
                    rows,
                    (count, n, k),
                    accumulate,
                    (&lhs[first * lhs_rs..], (lhs_cs, lhs_rs)),
                    (rhs, (rhs_cs, rhs_rs)),
                    1,
                );
            });
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element addressed by (row, col) with the given strides
    // lies inside its slice (asserted above); dst is borrowed mutably, so it
    // aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl CustomOp1 for FusedConv {
    fn name(&self) -> &'static str {
        "fused-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (input, dims) = self.input(storage, layout)?;
        let out = self.run(input, dims, None);
        let shape = Shape::from((dims[0], self.out_channels, dims[3], dims[4]));
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp2 for FusedConv {
    fn name(&self) -> &'static str {
        "fused-conv-residual"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (input, dims) = self.input(storage, layout)?;
        let shape = Shape::from((dims[0], self.out_channels, dims[3], dims[4]));
        let skip = match (residual, residual_layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) if residual_layout.shape() == &shape => {
                &data[start..end]
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "fused conv: residual must be contiguous f32 {shape:?}, got {:?}",
                    residual_layout.shape()
                )));
            }
        };
        let out = self.run(input, dims, Some(skip));
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};
    use candle_nn::{Conv2d, Conv2dConfig};

    /// `count` deterministic values in [-1, 1] (the kernels' test inputs).
    pub(crate) fn values(count: usize, seed: u32) -> Vec<f32> {
        (0..count)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// max |got − want| / max |want|: the error relative to the output's
    /// scale.
    fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
        let scalar =
            |t: candle_core::Result<Tensor>| t.and_then(|t| t.to_scalar::<f32>()).expect("scalar");
        let diff = scalar((got - want).and_then(|d| d.abs()).and_then(|d| d.max_all()));
        let scale = scalar(want.abs().and_then(|w| w.max_all()));
        diff / scale.max(1e-6)
    }

    /// One geometry, every kernel path that applies (the chosen one and
    /// im2col + gemm), against candle's conv2d + bias, plain and with
    /// residual + ReLU. Returns whether the chosen path was Winograd.
    fn check_against_candle(
        (batch, cin, cout, k, stride, padding, height, width): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        seed: u32,
    ) -> bool {
        let case = format!("{batch}x{cin}x{height}x{width} -> {cout}, k{k} s{stride} p{padding}");
        // Weights at the scale of a trained, folded ResNet (He init).
        let scale = (2.0 / (cin * k * k) as f32).sqrt();
        let weights: Vec<f32> = values(cout * cin * k * k, seed)
            .into_iter()
            .map(|w| w * scale)
            .collect();
        let bias = values(cout, 100 + seed);
        let x = Tensor::from_vec(
            values(batch * cin * height * width, 7 + seed),
            (batch, cin, height, width),
            &Device::Cpu,
        )
        .expect("input");
        let w = Tensor::from_vec(weights.clone(), (cout, cin, k, k), &Device::Cpu).expect("w");
        let b = Tensor::from_vec(bias.clone(), cout, &Device::Cpu).expect("bias");
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let expected = Conv2d::new(w, Some(b), cfg).forward(&x).expect("conv");
        let residual = Tensor::from_vec(
            values(expected.elem_count(), 50 + seed),
            expected.shape(),
            &Device::Cpu,
        )
        .expect("residual");
        let with_residual = (&expected + &residual)
            .and_then(|y| y.relu())
            .expect("relu");
        let plain = FusedConv::new(
            weights.clone(),
            bias.clone(),
            (cout, cin, k),
            stride,
            padding,
            false,
        )
        .expect("op");
        let fused =
            FusedConv::new(weights, bias, (cout, cin, k), stride, padding, true).expect("op");
        let winograd = plain.uses_winograd(batch, height, width);
        for (path, plain, fused) in [
            ("chosen", plain.clone(), fused.clone()),
            (
                "im2col",
                plain.clone().without_winograd(),
                fused.clone().without_winograd(),
            ),
            ("gemm", plain.plain_gemm(), fused.plain_gemm()),
        ] {
            let got = x.apply_op1_no_bwd(&plain).expect("fused");
            assert_eq!(got.dims(), expected.dims(), "{case}");
            let err = relative_error(&got, &expected);
            assert!(err < 1e-4, "{case} ({path}): relative error {err}");
            let got = x
                .apply_op2_no_bwd(&residual, &fused)
                .expect("fused residual");
            let err = relative_error(&got, &with_residual);
            assert!(
                err < 1e-4,
                "{case} ({path}, residual, relu): relative error {err}"
            );
        }
        winograd
    }

    /// Every kernel/stride/padding the ResNets use, on small and odd
    /// sides, batches of 1 to 3.
    #[test]
    fn copy_even_takes_every_other_value_at_every_length() {
        for len in 1..40 {
            let src: Vec<f32> = (0..2 * len - 1).map(|i| i as f32).collect();
            let mut dst = vec![-1f32; len];
            copy_even(&mut dst, &src);
            let want: Vec<f32> = (0..len).map(|i| (2 * i) as f32).collect();
            assert_eq!(dst, want, "length {len}");
        }
    }

    #[test]
    fn fused_conv_equals_candle_conv() {
        let cases = [
            (2, 1, 8, 7, 2, 3, 37, 37),
            (2, 4, 8, 1, 1, 0, 6, 6),
            (2, 8, 16, 3, 1, 1, 19, 19),
            (2, 8, 16, 3, 2, 1, 20, 20),
            (2, 16, 16, 1, 1, 0, 9, 9),
            (2, 16, 32, 1, 2, 0, 11, 11),
            (2, 64, 64, 3, 1, 1, 56, 56),
            // Winograd edge cases: one pixel, a single partial tile,
            // tiles overhanging the border, rectangles, batches split
            // into several passes.
            (1, 3, 5, 3, 1, 1, 1, 1),
            (3, 6, 4, 3, 1, 1, 3, 5),
            (2, 16, 8, 3, 1, 1, 7, 7),
            (3, 8, 8, 3, 1, 1, 13, 10),
            (2, 4, 4, 3, 1, 1, 70, 66),
            // Packed weights at batch 1: split by output rows (a partial
            // last task and column block), split by output channels (a
            // partial last row block and column block), 1×1 in place.
            (1, 3, 10, 7, 2, 3, 61, 45),
            (1, 24, 40, 3, 2, 1, 29, 29),
            (1, 40, 20, 1, 1, 0, 30, 30),
            // Small planes at batch 1 with whole panels of 32 output
            // channels (`narrow_gemm` on AVX-512 and AVX2): unfolded 3×3
            // and 1×1 stride 2, 1×1 in place, 3×3 without padding.
            (1, 16, 32, 3, 2, 1, 15, 15),
            (1, 8, 64, 1, 2, 0, 9, 9),
            (1, 32, 32, 1, 1, 0, 7, 7),
            (1, 4, 32, 3, 1, 0, 11, 11),
        ];
        for (i, &case) in cases.iter().enumerate() {
            check_against_candle(case, i as u32);
        }
    }

    /// Every convolution geometry of ResNet-18 at 224², at full size and
    /// batch 1, on the path the network runs and on im2col + gemm; and
    /// the 3×3 stride-1 ones at batch 2.
    #[test]
    fn every_resnet18_geometry_equals_candle_conv() {
        let mut seen = std::collections::BTreeSet::new();
        let mut winograd = Vec::new();
        for (i, (_, [cin, cout, k, stride], side)) in
            super::super::conv_bench::layers(super::super::Backbone::Resnet18, 224)
                .into_iter()
                .enumerate()
        {
            if !seen.insert((cin, cout, k, stride, side)) {
                continue;
            }
            let batches: &[usize] = if k == 3 && stride == 1 { &[1, 2] } else { &[1] };
            for &batch in batches {
                let geometry = (batch, cin, cout, k, stride, k / 2, side, side);
                if check_against_candle(geometry, i as u32) {
                    winograd.push((side, batch));
                }
            }
        }
        // 56², 28², 14² and 7², at batch 1 and 2; but 7² at batch 1 runs
        // in place with `narrow_gemm` on AVX-512 (`winograd_tile`; which
        // path ran is not asserted for it, as another test may cap the
        // vector instructions meanwhile; the "chosen" and "im2col" paths
        // above ran theirs).
        winograd.retain(|&geometry| geometry != (7, 1));
        let want = [(56, 1), (56, 2), (28, 1), (28, 2), (14, 1), (14, 2), (7, 2)];
        assert_eq!(winograd, want, "geometries that ran Winograd");
    }

    #[test]
    fn wrong_channels_and_small_inputs_are_errors() {
        let op =
            FusedConv::new(vec![0.0; 8 * 3 * 9], vec![0.0; 8], (8, 3, 3), 1, 0, false).expect("op");
        let x = Tensor::zeros((1, 2, 8, 8), candle_core::DType::F32, &Device::Cpu).expect("x");
        assert!(x.apply_op1_no_bwd(&op).is_err());
        let x = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).expect("x");
        assert!(x.apply_op1_no_bwd(&op).is_err());
        assert!(FusedConv::new(vec![0.0; 5], vec![0.0; 8], (8, 3, 3), 1, 0, false).is_err());
    }
}
