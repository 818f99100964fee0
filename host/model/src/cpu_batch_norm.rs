//! Batch normalisation in training mode on the CPU, with the residual add
//! and the ReLU that follow it fused in, forward and backward each in one
//! pass per channel, as a candle custom op; and the stem's 3×3 stride-2
//! max pooling with its backward pass.
//!
//! candle-nn's training batch norm is a chain of broadcast tensor
//! operations (transpose, mean, subtract, square, divide, scale, shift) and
//! as many again backwards, each allocating a full-size tensor; at 224² they
//! took most of a training step. Here:
//! - forward: per channel mean μ and biased variance σ² over batch and
//!   pixels, y = relu(γ (x − μ)/√(σ² + ε) + β + r) (the residual r and the
//!   ReLU when the unit has them); the batch statistics are kept for the
//!   running averages and the backward pass;
//! - backward: g = dy where y > 0 (dy without a ReLU), dr = g; with
//!   x̂ = (x − μ)/√(σ² + ε) and M values per channel, dβ = Σ g,
//!   dγ = Σ g·x̂, dx = γ/(M√(σ² + ε)) · (M·g − dβ − x̂·dγ). The add and the
//!   ReLU were candle operations before, two more full-size tensors each
//!   way.
//!
//! Tested against candle-nn's batch norm, candle's add and ReLU, and their
//! gradients.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_conv::{contiguous_f32, with_f32};

/// Per-channel batch statistics: (mean, biased variance).
pub type BatchStatistics = Vec<(f64, f64)>;

/// The backward pass's values: dx, d(γ, β) and, with a residual, dr.
type Gradients = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// The training batch norm over (B, C, H, W), optionally followed by a
/// residual add and a ReLU in the same pass: y = relu(γ x̂ + β + r).
#[derive(Debug, Clone)]
pub struct TrainBatchNorm {
    eps: f64,
    relu: bool,
    statistics: Arc<Mutex<BatchStatistics>>,
}

impl TrainBatchNorm {
    /// A batch norm with `eps`, followed by a ReLU when `relu`: one per
    /// forward call (its backward pass reads the statistics the forward
    /// pass kept).
    pub fn new(eps: f64, relu: bool) -> Self {
        Self {
            eps,
            relu,
            statistics: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Normalises `x` with the batch's statistics, scales by `gamma` and
    /// shifts by `beta` (both (C)), adds `residual` (x's shape) when given
    /// and applies the ReLU when the op has one; returns y and the
    /// statistics.
    ///
    /// # Errors
    /// On shape mismatches or non-f32 tensors.
    pub fn forward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, BatchStatistics)> {
        // γ and β as one (2C) operand: with the residual the op has three.
        let scale_shift = Tensor::cat(&[gamma, beta], 0)?;
        let x = x.contiguous()?;
        let y = match residual {
            Some(r) => x.apply_op3(&scale_shift, &r.contiguous()?, self.clone())?,
            None => x.apply_op2(&scale_shift, self.clone())?,
        };
        let statistics = self.statistics()?;
        Ok((y, statistics))
    }

    /// The statistics of the last forward pass.
    fn statistics(&self) -> Result<BatchStatistics> {
        self.statistics
            .lock()
            .map(|s| s.clone())
            .map_err(|_| candle_core::Error::Msg("batch norm statistics lock poisoned".into()))
    }

    /// The forward pass on contiguous values: `scale_shift` is γ then β.
    fn run(
        &self,
        x: &[f32],
        (batch, channels, plane): (usize, usize, usize),
        scale_shift: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        if scale_shift.len() != 2 * channels
            || x.len() != batch * channels * plane
            || residual.is_some_and(|r| r.len() != x.len())
        {
            candle_core::bail!(
                "training batch norm: {channels} channels, {} scales and shifts",
                scale_shift.len()
            );
        }
        let (gamma, beta) = scale_shift.split_at(channels);
        let statistics = channel_statistics(x, (batch, channels, plane));
        let relu = self.relu;
        let finish = move |v: f32| if relu { v.max(0.0) } else { v };
        // Plane i's scale and shift (channel i mod channels).
        let coefficients = |i: usize| {
            let c = i % channels;
            let (mean, var) = statistics[c];
            let scale = f64::from(gamma[c]) / (var + self.eps).sqrt();
            let shift = f64::from(beta[c]) - mean * scale;
            (scale as f32, shift as f32)
        };
        let y = match residual {
            Some(r) => by_planes(x.len(), plane, |i, out| {
                let (scale, shift) = coefficients(i);
                let range = i * plane..(i + 1) * plane;
                for ((o, &v), &k) in out.iter_mut().zip(&x[range.clone()]).zip(&r[range]) {
                    *o = finish(v * scale + shift + k);
                }
            }),
            None => by_planes(x.len(), plane, |i, out| {
                let (scale, shift) = coefficients(i);
                for (o, &v) in out.iter_mut().zip(&x[i * plane..(i + 1) * plane]) {
                    *o = finish(v * scale + shift);
                }
            }),
        };
        if let Ok(mut slot) = self.statistics.lock() {
            *slot = statistics;
        }
        Ok(y)
    }

    /// The backward pass: dx, d(γ, β) and, with a residual, dr, from x,
    /// y (for the ReLU's mask), γ and dy. With g = dy masked by y > 0 (dy
    /// without a ReLU): dr = g and the batch norm's gradients of g, one
    /// pass per channel for the sums and one for dx.
    fn gradients(
        &self,
        (xs, ys, dy): (&[f32], &[f32], &[f32]),
        (batch, channels, plane): (usize, usize, usize),
        gamma: &[f32],
        residual: bool,
    ) -> Result<Gradients> {
        let statistics = self.statistics()?;
        if statistics.len() != channels || gamma.len() < channels {
            candle_core::bail!("training batch norm: backward pass without its forward pass");
        }
        let relu = self.relu;
        let count = (batch * plane) as f64;
        // dr = g, written once and read back below (with a residual).
        let mut grad_residual = if residual {
            let dr = by_planes(dy.len(), plane, |i, out| {
                let range = i * plane..(i + 1) * plane;
                if relu {
                    for ((o, &g), &y) in out.iter_mut().zip(&dy[range.clone()]).zip(&ys[range]) {
                        *o = if y <= 0.0 { 0.0 } else { g };
                    }
                } else {
                    out.copy_from_slice(&dy[range]);
                }
            });
            Some(dr)
        } else {
            None
        };
        // g over one plane (from `start`): dr's values, or dy masked.
        let plane_g = |start: usize| {
            let range = start..start + plane;
            match &grad_residual {
                Some(dr) => PlaneGradient::Masked(&dr[range]),
                None if relu => PlaneGradient::Relu(&dy[range.clone()], &ys[range]),
                None => PlaneGradient::Masked(&dy[range]),
            }
        };
        // Per channel: inverse std, Σ g, Σ g·x̂.
        let sums: Vec<(f64, f64, f64)> = (0..channels)
            .into_par_iter()
            .map(|c| {
                let (mean, var) = statistics[c];
                let inv_std = 1.0 / (var + self.eps).sqrt();
                let (mut sum_g, mut sum_gx) = (0.0, 0.0);
                for b in 0..batch {
                    let start = (b * channels + c) * plane;
                    let (g, gx) = plane_g(start).sums(&xs[start..start + plane]);
                    sum_g += g;
                    sum_gx += gx;
                }
                // Σ g·x̂ = (Σ g·x − μ Σ g) / σ.
                (inv_std, sum_g, (sum_gx - mean * sum_g) * inv_std)
            })
            .collect();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(plane).enumerate().for_each(|(i, out)| {
            let c = i % channels;
            let (mean, _) = statistics[c];
            let (inv_std, sum_g, sum_g_xhat) = sums[c];
            let k = f64::from(gamma[c]) * inv_std / count;
            let start = i * plane;
            // dx = k (M g − Σg − x̂ Σg·x̂) = a·g + b·(x − μ) + d.
            let coefficients = [
                (k * count) as f32,
                (-k * sum_g_xhat * inv_std) as f32,
                (-k * sum_g) as f32,
                mean as f32,
            ];
            plane_g(start).input_gradient(&xs[start..start + plane], coefficients, out);
        });
        let mut scale_shift = Vec::with_capacity(2 * channels);
        scale_shift.extend(sums.iter().map(|s| s.2 as f32));
        scale_shift.extend(sums.iter().map(|s| s.1 as f32));
        Ok((dx, scale_shift, grad_residual.take()))
    }

    /// The backward pass on tensors: (dx, d(γ, β), dr).
    fn backward(
        &self,
        x: &Tensor,
        scale_shift: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        residual: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (batch, channels, height, width) = x.dims4()?;
        let dims = (batch, channels, height * width);
        let (dx, dss, dr) = with_f32(x, "training batch norm", |xs| {
            with_f32(y, "training batch norm", |ys| {
                with_f32(grad, "training batch norm", |dy| {
                    with_f32(scale_shift, "training batch norm", |gamma| {
                        self.gradients((xs, ys, dy), dims, gamma, residual)
                    })
                })
            })
        })?;
        let device = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), device)?,
            Tensor::from_vec(dss, 2 * channels, device)?,
            dr.map(|dr| Tensor::from_vec(dr, x.shape(), device))
                .transpose()?,
        ))
    }
}

/// The gradient reaching a batch norm's output over one plane: as it is
/// (no ReLU, or already masked), or dy with the ReLU's mask (y > 0).
enum PlaneGradient<'a> {
    Masked(&'a [f32]),
    Relu(&'a [f32], &'a [f32]),
}

impl PlaneGradient<'_> {
    /// (Σ g, Σ g·x) over the plane `xs`.
    fn sums(&self, xs: &[f32]) -> (f64, f64) {
        fn sums(g: impl Iterator<Item = f32>, xs: &[f32]) -> (f64, f64) {
            // SUM_LANES running sums each: independent additions.
            let (mut sum_g, mut sum_gx) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
            for (i, (g, &v)) in g.zip(xs).enumerate() {
                let lane = i % SUM_LANES;
                sum_g[lane] += f64::from(g);
                sum_gx[lane] += f64::from(g) * f64::from(v);
            }
            (sum_g.iter().sum(), sum_gx.iter().sum())
        }
        match *self {
            PlaneGradient::Masked(g) => sums(g.iter().copied(), xs),
            PlaneGradient::Relu(dy, ys) => sums(relu_masked(dy, ys), xs),
        }
    }

    /// out = a·g + b·(x − μ) + d for `[a, b, d, μ]`.
    fn input_gradient(&self, xs: &[f32], [a, b, d, mean]: [f32; 4], out: &mut [f32]) {
        fn fill(
            g: impl Iterator<Item = f32>,
            xs: &[f32],
            [a, b, d, mean]: [f32; 4],
            out: &mut [f32],
        ) {
            for ((o, g), &v) in out.iter_mut().zip(g).zip(xs) {
                *o = a * g + b * (v - mean) + d;
            }
        }
        match *self {
            PlaneGradient::Masked(g) => fill(g.iter().copied(), xs, [a, b, d, mean], out),
            PlaneGradient::Relu(dy, ys) => fill(relu_masked(dy, ys), xs, [a, b, d, mean], out),
        }
    }
}

/// `len` values computed plane by plane in parallel (`plane` values each,
/// plane i's written by `fill(i, plane)`) into a new buffer. Each plane is
/// zeroed just before its `fill`, while it is in cache, not in a pass of
/// its own over the whole buffer (a training step's activations are
/// hundreds of MiB); `fill` runs on a plain slice, so its loop vectorises
/// (writing through an iterator of values kept it scalar, and batch
/// norm's passes are a tenth of a training step).
///
/// # Panics
/// When `len` is not whole planes.
fn by_planes(len: usize, plane: usize, fill: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    assert!(
        plane > 0 && len.is_multiple_of(plane),
        "{len} values in planes of {plane}"
    );
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, chunk)| {
            for slot in chunk.iter_mut() {
                slot.write(0.0);
            }
            // SAFETY: every element of `chunk` was initialised just above,
            // and MaybeUninit<f32> has f32's layout.
            let chunk = unsafe { &mut *(std::ptr::from_mut(chunk) as *mut [f32]) };
            fill(i, chunk);
        });
    // SAFETY: the chunks cover 0..len, and each was initialised in full
    // (zeroed, then filled) above.
    unsafe { out.set_len(len) };
    out
}

/// dy where y > 0, else 0: the gradient through a ReLU from its output.
fn relu_masked<'a>(dy: &'a [f32], ys: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
    dy.iter()
        .zip(ys)
        .map(|(&g, &y)| if y > 0.0 { g } else { 0.0 })
}

/// Running sums per reduction: a sum over a plane adds into this many
/// accumulators in turn, so the additions do not wait on each other
/// (one f64 chain per plane bounded the batch norm's passes).
const SUM_LANES: usize = 8;

/// The sum of `values` over [`SUM_LANES`] accumulators.
fn lane_sum(values: impl Iterator<Item = f64>) -> f64 {
    let mut sums = [0f64; SUM_LANES];
    for (i, v) in values.enumerate() {
        sums[i % SUM_LANES] += v;
    }
    sums.iter().sum()
}

/// Mean and biased variance of each channel of contiguous NCHW `x`.
fn channel_statistics(
    x: &[f32],
    (batch, channels, plane): (usize, usize, usize),
) -> BatchStatistics {
    let count = (batch * plane) as f64;
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let planes = || (0..batch).map(move |b| &x[(b * channels + c) * plane..][..plane]);
            let sum: f64 = planes()
                .map(|p| lane_sum(p.iter().map(|&v| f64::from(v))))
                .sum();
            let mean = sum / count;
            let squares: f64 = planes()
                .map(|p| lane_sum(p.iter().map(|&v| (f64::from(v) - mean).powi(2))))
                .sum();
            (mean, squares / count)
        })
        .collect()
}

impl CustomOp2 for TrainBatchNorm {
    fn name(&self) -> &'static str {
        "train-batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        scale_shift: &CpuStorage,
        scale_shift_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        let y = self.run(
            contiguous_f32(x, x_layout, "training batch norm")?,
            (batch, channels, height * width),
            contiguous_f32(scale_shift, scale_shift_layout, "training batch norm")?,
            None,
        )?;
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale_shift: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dss, _) = self.backward(x, scale_shift, y, grad, false)?;
        Ok((Some(dx), Some(dss)))
    }
}

impl CustomOp3 for TrainBatchNorm {
    fn name(&self) -> &'static str {
        "train-batch-norm-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        scale_shift: &CpuStorage,
        scale_shift_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        if residual_layout.shape() != x_layout.shape() {
            candle_core::bail!(
                "training batch norm: residual {:?} for input {:?}",
                residual_layout.shape(),
                x_layout.shape()
            );
        }
        let y = self.run(
            contiguous_f32(x, x_layout, "training batch norm")?,
            (batch, channels, height * width),
            contiguous_f32(scale_shift, scale_shift_layout, "training batch norm")?,
            Some(contiguous_f32(
                residual,
                residual_layout,
                "training batch norm",
            )?),
        )?;
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale_shift: &Tensor,
        _residual: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dss, dr) = self.backward(x, scale_shift, y, grad, true)?;
        Ok((Some(dx), Some(dss), dr))
    }
}

/// 3×3 max pooling, stride 2, over contiguous NCHW f32, with `padding`
/// rows and columns of zeros around the plane (as if padded with zeros
/// first, without the copy); the gradient goes to each window's first
/// maximum in row-major order (as candle's pooling picks it), none to the
/// padding.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool3x3Stride2 {
    /// Zero rows and columns on every side (0 or 1).
    pub padding: usize,
}

impl MaxPool3x3Stride2 {
    fn sides(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (h, w) = (h + 2 * self.padding, w + 2 * self.padding);
        if h < 3 || w < 3 {
            candle_core::bail!("max pool 3x3: input {h}x{w} is too small");
        }
        Ok(((h - 3) / 2 + 1, (w - 3) / 2 + 1))
    }

    /// The maximum of the window at (oy, ox) and its index within the
    /// plane (`None` for a padding zero).
    fn argmax(
        &self,
        plane: &[f32],
        (h, w): (usize, usize),
        oy: usize,
        ox: usize,
    ) -> (f32, Option<usize>) {
        let mut best = (f32::NEG_INFINITY, None);
        let mut first = true;
        for dy in 0..3 {
            let iy = (2 * oy + dy).wrapping_sub(self.padding);
            for dx in 0..3 {
                let ix = (2 * ox + dx).wrapping_sub(self.padding);
                let cell = if iy < h && ix < w {
                    let i = iy * w + ix;
                    (plane[i], Some(i))
                } else {
                    (0.0, None)
                };
                if first || cell.0 > best.0 {
                    best = cell;
                    first = false;
                }
            }
        }
        best
    }
}

impl MaxPool3x3Stride2 {
    /// The pooled planes of `planes` contiguous planes of height × width,
    /// in parallel by plane, and their sides.
    ///
    /// # Errors
    /// When a padded side is under 3, or `x` is shorter than the planes.
    pub fn run(&self, x: &[f32], [planes, h, w]: [usize; 3]) -> Result<(Vec<f32>, (usize, usize))> {
        let (oh, ow) = self.sides(h, w)?;
        if x.len() < planes * h * w {
            candle_core::bail!(
                "max pool 3x3: {} values for {planes} planes of {h}x{w}",
                x.len()
            );
        }
        let mut y = vec![0f32; planes * oh * ow];
        y.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each_init(Vec::new, |rows, (p, out)| {
                let plane = &x[p * h * w..(p + 1) * h * w];
                self.pool_plane(plane, (h, w), ow, rows, out);
            });
        Ok((y, (oh, ow)))
    }

    /// The window maxima of one plane into `out` (rows of `ow`), the
    /// same values as [`Self::argmax`]'s: per output row, the maximum of
    /// the three input rows (a row of padding counts as zeros) into
    /// `rows`, in padded columns (zeros in the padding), then of three
    /// columns of it, every second one. Both passes run on plain slices,
    /// with no test per element, so that they vectorise.
    fn pool_plane(
        &self,
        plane: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        rows: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let p = self.padding;
        // Padded columns 0 ..= 2·(ow − 1) + 2; input column ix at p + ix.
        let span = 2 * ow + 1;
        rows.clear();
        rows.resize(span, 0.0);
        let inside = p.min(span)..(p + w).min(span);
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let maxima = &mut rows[inside.clone()];
            maxima.fill(f32::NEG_INFINITY);
            let mut padding_row = false;
            for dy in 0..3 {
                let iy = (2 * oy + dy).wrapping_sub(p);
                if iy < h {
                    let line = &plane[iy * w..][..maxima.len()];
                    for (m, v) in maxima.iter_mut().zip(line) {
                        *m = m.max(*v);
                    }
                } else {
                    padding_row = true;
                }
            }
            if padding_row {
                maxima.iter_mut().for_each(|m| *m = m.max(0.0));
            }
            let (pairs, _) = rows[..2 * ow].as_chunks::<2>();
            for ((o, pair), next) in out_row
                .iter_mut()
                .zip(pairs)
                .zip(rows[2..].iter().step_by(2))
            {
                *o = f32::NEG_INFINITY.max(pair[0]).max(pair[1]).max(*next);
            }
        }
    }
}

impl CustomOp1 for MaxPool3x3Stride2 {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "max pool 3x3")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (y, (oh, ow)) = self.run(x, [b * c, h, w])?;
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = self.sides(h, w)?;
        let dx = with_f32(x, "max pool 3x3", |xs| {
            with_f32(grad, "max pool 3x3", |dy| {
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(h * w).enumerate().for_each(|(p, out)| {
                    let plane = &xs[p * h * w..(p + 1) * h * w];
                    for oy in 0..oh {
                        for ox in 0..ow {
                            if let (_, Some(i)) = self.argmax(plane, (h, w), oy, ox) {
                                out[i] += dy[(p * oh + oy) * ow + ox];
                            }
                        }
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, ModuleT, Var};
    use candle_nn::BatchNorm;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    #[test]
    fn by_planes_writes_every_plane_in_place() {
        let values = by_planes(12, 4, |i, out| {
            for (j, o) in out.iter_mut().enumerate() {
                *o = (10 * i + j) as f32;
            }
        });
        let want: Vec<f32> = (0..3)
            .flat_map(|i| (0..4).map(move |j| (10 * i + j) as f32))
            .collect();
        assert_eq!(values, want);
        assert!(by_planes(0, 0, |_, _| {}).is_empty());
    }

    #[test]
    fn by_planes_leaves_zeros_where_a_plane_is_not_filled() {
        // Planes as large as a training step's, so that the buffer comes
        // from memory another allocation wrote first.
        let dirty = vec![7f32; 1 << 16];
        drop(dirty);
        let values = by_planes(1 << 16, 1 << 12, |i, out| {
            if i % 2 == 0 {
                out.fill(1.0);
            } else {
                out[0] = 2.0;
            }
        });
        for (i, plane) in values.chunks(1 << 12).enumerate() {
            if i % 2 == 0 {
                assert!(plane.iter().all(|&v| v == 1.0), "plane {i}");
            } else {
                assert_eq!(plane[0], 2.0, "plane {i}");
                assert!(plane[1..].iter().all(|&v| v == 0.0), "plane {i}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "in planes of")]
    fn by_planes_refuses_a_length_that_is_not_whole_planes() {
        by_planes(10, 4, |_, _| {});
    }

    /// The pooled values equal each window's maximum as the gradient
    /// finds it ([`MaxPool3x3Stride2::argmax`]), with and without
    /// padding, on odd and even sides and negative values.
    #[test]
    fn max_pool_equals_window_maxima() {
        let cpu = &Device::Cpu;
        for padding in [0, 1] {
            for (h, w) in [(7, 9), (112, 112), (3, 4), (4, 3)] {
                let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), cpu).expect("x");
                let op = MaxPool3x3Stride2 { padding };
                let y = x.apply_op1_no_bwd(&op).expect("pool");
                let (oh, ow) = op.sides(h, w).expect("sides");
                assert_eq!(y.dims(), &[2, 3, oh, ow]);
                let xs = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
                let ys = y.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("y");
                for p in 0..6 {
                    let plane = &xs[p * h * w..(p + 1) * h * w];
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let want = op.argmax(plane, (h, w), oy, ox).0;
                            assert_eq!(
                                ys[(p * oh + oy) * ow + ox],
                                want,
                                "padding {padding}, {h}x{w}, plane {p} at ({oy}, {ox})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The fused op (batch norm, then a residual add and a ReLU when
    /// asked) against candle-nn's batch norm followed by candle's add and
    /// ReLU: values and the gradients of x, γ, β and the residual.
    #[test]
    fn forward_gradients_and_statistics_equal_candle_nn() {
        let cpu = &Device::Cpu;
        let x0 = (Tensor::randn(0f32, 2.0, (3, 4, 5, 6), cpu).expect("x") + 1.5).expect("shift");
        let g0 = Tensor::new(&[0.5f32, 1.0, 1.5, -0.7], cpu).expect("gamma");
        let b0 = Tensor::new(&[0.1f32, -0.2, 0.0, 0.3], cpu).expect("beta");
        let r0 = Tensor::randn(0f32, 1.0, (3, 4, 5, 6), cpu).expect("residual");
        let probe = Tensor::randn(0f32, 1.0, (3, 4, 5, 6), cpu).expect("probe");
        let mut statistics = None;
        for (relu, with_residual) in [(false, false), (true, false), (false, true), (true, true)] {
            let case = format!("relu {relu}, residual {with_residual}");
            let run = |ours: bool| {
                let x = Var::from_tensor(&x0).expect("x");
                let g = Var::from_tensor(&g0).expect("g");
                let b = Var::from_tensor(&b0).expect("b");
                let r = Var::from_tensor(&r0).expect("r");
                let residual = with_residual.then_some(r.as_tensor());
                let (y, stats) = if ours {
                    let (y, stats) = TrainBatchNorm::new(1e-5, relu)
                        .forward(x.as_tensor(), g.as_tensor(), b.as_tensor(), residual)
                        .expect("ours");
                    (y, Some(stats))
                } else {
                    let bn = BatchNorm::new(
                        4,
                        Tensor::zeros(4, candle_core::DType::F32, cpu).expect("mean"),
                        Tensor::ones(4, candle_core::DType::F32, cpu).expect("var"),
                        g.as_tensor().clone(),
                        b.as_tensor().clone(),
                        1e-5,
                    )
                    .expect("bn");
                    let mut y = bn.forward_t(x.as_tensor(), true).expect("candle");
                    if let Some(r) = residual {
                        y = (y + r).expect("add");
                    }
                    if relu {
                        y = y.relu().expect("relu");
                    }
                    (y, None)
                };
                let grads = (&y * &probe)
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward");
                let get = |v: &Var| grads.get(v.as_tensor()).cloned();
                (y, [get(&x), get(&g), get(&b), get(&r)], stats)
            };
            let (y, grads, stats) = run(true);
            let (y_ref, grads_ref, _) = run(false);
            assert!(max_diff(&y, &y_ref) < 1e-4, "forward, {case}");
            for (name, (got, want)) in ["x", "scale", "shift", "residual"]
                .iter()
                .zip(grads.iter().zip(&grads_ref))
            {
                match (got, want) {
                    (Some(got), Some(want)) => {
                        assert!(max_diff(got, want) < 1e-3, "{name} gradient, {case}")
                    }
                    (None, None) => assert!(*name == "residual" && !with_residual),
                    _ => panic!("{name} gradient present in one only, {case}"),
                }
            }
            statistics = stats;
        }
        // The statistics are the batch's.
        let stats = statistics.expect("statistics");
        let values = x0
            .narrow(1, 2, 1)
            .and_then(|t| t.flatten_all())
            .expect("channel 2");
        let mean = values
            .mean_all()
            .and_then(|m| m.to_scalar::<f32>())
            .expect("mean");
        assert!((stats[2].0 - f64::from(mean)).abs() < 1e-4);
        let biased_variance = values
            .to_vec1::<f32>()
            .expect("values")
            .iter()
            .map(|&v| (f64::from(v) - stats[2].0).powi(2))
            .sum::<f64>()
            / 90.0;
        assert!(
            (stats[2].1 - biased_variance).abs() < 1e-4,
            "{} vs {biased_variance}",
            stats[2].1
        );
    }

    /// Pooling that reads the padding as zeros equals padding with zeros
    /// first: values, and gradients (ties with the padding included: half
    /// the inputs are zero, as after a ReLU).
    #[test]
    fn padded_max_pool_equals_pooling_the_padded_plane() {
        for (h, w) in [(112, 112), (9, 10), (1, 1), (2, 5)] {
            let x0 = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu)
                .and_then(|x| x.relu())
                .expect("x");
            let x = Var::from_tensor(&x0).expect("var");
            let fused = x.as_tensor().apply_op1(MaxPool3x3Stride2 { padding: 1 });
            let padded = x
                .as_tensor()
                .pad_with_zeros(3, 1, 1)
                .and_then(|p| p.pad_with_zeros(2, 1, 1))
                .and_then(|p| p.apply_op1(MaxPool3x3Stride2 { padding: 0 }));
            let (y, y_ref) = (fused.expect("fused"), padded.expect("padded"));
            assert_eq!(y.dims(), y_ref.dims(), "{h}x{w}");
            assert_eq!(max_diff(&y, &y_ref), 0.0, "{h}x{w}");
            // The same probe through both: the same input gradient.
            let probe = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu).expect("probe");
            let gradient = |y: &Tensor| {
                let grads = (y * &probe)
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward");
                grads.get(x.as_tensor()).expect("dx").clone()
            };
            let (g, g_ref) = (gradient(&y), gradient(&y_ref));
            assert_eq!(max_diff(&g, &g_ref), 0.0, "gradient {h}x{w}");
        }
    }
}
