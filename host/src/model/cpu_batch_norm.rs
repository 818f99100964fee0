//! Batch normalisation in training mode on the CPU, forward and backward
//! each in one pass per channel, as a candle custom op; and the stem's 3×3
//! stride-2 max pooling with its backward pass.
//!
//! candle-nn's training batch norm is a chain of broadcast tensor
//! operations (transpose, mean, subtract, square, divide, scale, shift) and
//! as many again backwards, each allocating a full-size tensor; at 224² they
//! took most of a training step. Here:
//! - forward: per channel mean μ and biased variance σ² over batch and
//!   pixels, y = γ (x − μ)/√(σ² + ε) + β; the batch statistics are kept for
//!   the running averages;
//! - backward: with x̂ = (x − μ)/√(σ² + ε) and M values per channel,
//!   dβ = Σ dy, dγ = Σ dy·x̂, dx = γ/(M√(σ² + ε)) · (M·dy − dβ − x̂·dγ).
//!
//! Tested against candle-nn's batch norm and its gradients.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_conv::contiguous_f32;

/// Per-channel batch statistics: (mean, biased variance).
pub type BatchStatistics = Vec<(f64, f64)>;

/// The training batch norm over (B, C, H, W).
#[derive(Debug, Clone)]
pub struct TrainBatchNorm {
    eps: f64,
    statistics: Arc<Mutex<BatchStatistics>>,
}

impl TrainBatchNorm {
    /// A batch norm with `eps`.
    pub fn new(eps: f64) -> Self {
        Self {
            eps,
            statistics: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Normalises `x` with the batch's statistics, then scales by `gamma`
    /// and shifts by `beta` (both (C)); returns y and the statistics.
    ///
    /// # Errors
    /// On shape mismatches or non-f32 tensors.
    pub fn forward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
    ) -> Result<(Tensor, BatchStatistics)> {
        let y =
            x.contiguous()?
                .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, self.clone())?;
        let statistics =
            self.statistics.lock().map(|s| s.clone()).map_err(|_| {
                candle_core::Error::Msg("batch norm statistics lock poisoned".into())
            })?;
        Ok((y, statistics))
    }
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
                .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>())
                .sum();
            let mean = sum / count;
            let squares: f64 = planes()
                .map(|p| {
                    p.iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                })
                .sum();
            (mean, squares / count)
        })
        .collect()
}

impl CustomOp3 for TrainBatchNorm {
    fn name(&self) -> &'static str {
        "train-batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        let (x, gamma, beta) = (
            contiguous_f32(x, x_layout, "training batch norm")?,
            contiguous_f32(gamma, gamma_layout, "training batch norm")?,
            contiguous_f32(beta, beta_layout, "training batch norm")?,
        );
        if gamma.len() != channels || beta.len() != channels {
            candle_core::bail!(
                "training batch norm: {channels} channels, {} scales",
                gamma.len()
            );
        }
        let plane = height * width;
        let statistics = channel_statistics(x, (batch, channels, plane));
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(plane).enumerate().for_each(|(i, out)| {
            let c = i % channels;
            let (mean, var) = statistics[c];
            let scale = f64::from(gamma[c]) / (var + self.eps).sqrt();
            let shift = f64::from(beta[c]) - mean * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            for (o, &v) in out.iter_mut().zip(&x[i * plane..(i + 1) * plane]) {
                *o = v * scale + shift;
            }
        });
        if let Ok(mut slot) = self.statistics.lock() {
            *slot = statistics;
        }
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, channels, height, width) = x.dims4()?;
        let plane = height * width;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gammas = gamma.to_vec1::<f32>()?;
        let statistics = channel_statistics(&xs, (batch, channels, plane));
        let count = (batch * plane) as f64;
        // Per channel: inverse std, Σ dy, Σ dy·x̂.
        let sums: Vec<(f64, f64, f64)> = (0..channels)
            .into_par_iter()
            .map(|c| {
                let (mean, var) = statistics[c];
                let inv_std = 1.0 / (var + self.eps).sqrt();
                let (mut sum_dy, mut sum_dy_xhat) = (0.0, 0.0);
                for b in 0..batch {
                    let start = (b * channels + c) * plane;
                    for (&g, &v) in dy[start..start + plane]
                        .iter()
                        .zip(&xs[start..start + plane])
                    {
                        let g = f64::from(g);
                        sum_dy += g;
                        sum_dy_xhat += g * (f64::from(v) - mean) * inv_std;
                    }
                }
                (inv_std, sum_dy, sum_dy_xhat)
            })
            .collect();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(plane).enumerate().for_each(|(i, out)| {
            let c = i % channels;
            let (mean, _) = statistics[c];
            let (inv_std, sum_dy, sum_dy_xhat) = sums[c];
            let k = f64::from(gammas[c]) * inv_std / count;
            let start = i * plane;
            for ((o, &g), &v) in out
                .iter_mut()
                .zip(&dy[start..start + plane])
                .zip(&xs[start..start + plane])
            {
                let xhat = (f64::from(v) - mean) * inv_std;
                *o = (k * (count * f64::from(g) - sum_dy - xhat * sum_dy_xhat)) as f32;
            }
        });
        let device = x.device();
        let dgamma: Vec<f32> = sums.iter().map(|s| s.2 as f32).collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dgamma, channels, device)?),
            Some(Tensor::from_vec(dbeta, channels, device)?),
        ))
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
    /// The window maxima of one plane into `out` (rows of `ow`), the
    /// same values as [`Self::argmax`]'s: per output row, the maximum of
    /// the three input rows (a row of padding counts as zeros) in
    /// `rows`, then of three columns of it, every second one.
    fn pool_plane(
        &self,
        plane: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        rows: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let p = self.padding;
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            rows.clear();
            rows.resize(w, f32::NEG_INFINITY);
            let mut padding_row = false;
            for dy in 0..3 {
                let iy = (2 * oy + dy).wrapping_sub(p);
                if iy < h {
                    for (m, v) in rows.iter_mut().zip(&plane[iy * w..(iy + 1) * w]) {
                        *m = m.max(*v);
                    }
                } else {
                    padding_row = true;
                }
            }
            if padding_row {
                rows.iter_mut().for_each(|m| *m = m.max(0.0));
            }
            for (ox, o) in out_row.iter_mut().enumerate() {
                let mut best = f32::NEG_INFINITY;
                for dx in 0..3 {
                    let ix = (2 * ox + dx).wrapping_sub(p);
                    best = best.max(if ix < w { rows[ix] } else { 0.0 });
                }
                *o = best;
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
        let (oh, ow) = self.sides(h, w)?;
        let mut y = vec![0f32; b * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each_init(Vec::new, |rows, (p, out)| {
                let plane = &x[p * h * w..(p + 1) * h * w];
                self.pool_plane(plane, (h, w), ow, rows, out);
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = self.sides(h, w)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
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

    #[test]
    fn forward_gradients_and_statistics_equal_candle_nn() {
        let cpu = &Device::Cpu;
        let x0 = (Tensor::randn(0f32, 2.0, (3, 4, 5, 6), cpu).expect("x") + 1.5).expect("shift");
        let g0 = Tensor::new(&[0.5f32, 1.0, 1.5, -0.7], cpu).expect("gamma");
        let b0 = Tensor::new(&[0.1f32, -0.2, 0.0, 0.3], cpu).expect("beta");
        let probe = Tensor::randn(0f32, 1.0, (3, 4, 5, 6), cpu).expect("probe");
        let run = |ours: bool| {
            let x = Var::from_tensor(&x0).expect("x");
            let g = Var::from_tensor(&g0).expect("g");
            let b = Var::from_tensor(&b0).expect("b");
            let (y, stats) = if ours {
                let (y, stats) = TrainBatchNorm::new(1e-5)
                    .forward(x.as_tensor(), g.as_tensor(), b.as_tensor())
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
                (bn.forward_t(x.as_tensor(), true).expect("candle"), None)
            };
            let grads = (&y * &probe)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let get = |v: &Var| grads.get(v.as_tensor()).expect("gradient").clone();
            (y, get(&x), get(&g), get(&b), stats)
        };
        let (y, dx, dg, db, stats) = run(true);
        let (y_ref, dx_ref, dg_ref, db_ref, _) = run(false);
        assert!(max_diff(&y, &y_ref) < 1e-4, "forward");
        assert!(max_diff(&dx, &dx_ref) < 1e-3, "input gradient");
        assert!(max_diff(&dg, &dg_ref) < 1e-3, "scale gradient");
        assert!(max_diff(&db, &db_ref) < 1e-3, "shift gradient");
        // The statistics are the batch's.
        let stats = stats.expect("statistics");
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
