//! The CPU training kernel of the image branch: a convolution (no bias;
//! batch norm follows it) with a backward pass, as a candle custom op.
//!
//! candle 0.11 computes a CPU convolution's input gradient with a direct
//! transposed convolution, which made a training step of the tiny backbone
//! at 224² cost ~3 s for 32 cases. Here every image is unfolded once
//! (im2col, the inference kernel's code) and the three products are `gemm`
//! calls:
//! - forward:  Y = W · cols;
//! - weights:  dW += dY · colsᵀ (summed over the batch); for 3×3 stride-1
//!   convolutions on planes the forward pass runs in the Winograd domain,
//!   there instead, over the whole batch
//!   ([`super::winograd::weight_gradient`]);
//! - input:    dcols = Wᵀ · dY, folded back onto the image (col2im); for
//!   3×3 stride-1 convolutions instead dX = dY ⊛ flip(W)ᵀ, the forward
//!   kernel (Winograd) over the whole batch.
//!
//! The im2col products of the backward pass run over groups of images
//! (their columns side by side, up to 8 MiB), so the deep layers' few
//! output pixels still make wide products. The backward pass reads its
//! operands in place and computes no input gradient where nothing upstream
//! needs one (the stem's image).
//!
//! Tested against candle's own convolution and its gradients.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_conv::{FusedConv, contiguous_f32, gemm_strided, with_f32};

/// A convolution's geometry: kernel k×k, stride, zero padding.
#[derive(Debug, Clone, Copy)]
struct TrainableConv {
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// Convolves `x` (B, C, H, W) with `weight` (O, C, k, k), recording a
/// backward pass: what training runs on the CPU in place of
/// `candle_nn::Conv2d`.
///
/// # Errors
/// On shape mismatches or non-f32 tensors.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    if kh != kw {
        candle_core::bail!("trainable conv: square kernels only, got {kh}x{kw}");
    }
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        TrainableConv {
            kernel: kh,
            stride,
            padding,
        },
    )
}

impl TrainableConv {
    /// The inference kernel with these weights and no bias.
    fn kernel_for(&self, weights: &[f32], out: usize, channels: usize) -> Result<FusedConv> {
        FusedConv::new(
            weights.to_vec(),
            vec![0.0; out],
            (out, channels, self.kernel),
            self.stride,
            self.padding,
            false,
        )
    }

    /// W' (channels, out, k, k) with W'[c][o][y][x] = W[o][c][k−1−y][k−1−x]:
    /// the weights of the convolution that maps dY to dX when the stride is
    /// 1 and the padding keeps the size.
    fn flipped_transposed(&self, weights: &[f32], out: usize, channels: usize) -> Vec<f32> {
        let k2 = self.kernel * self.kernel;
        let mut flipped = vec![0f32; weights.len()];
        for o in 0..out {
            for c in 0..channels {
                let src = &weights[(o * channels + c) * k2..][..k2];
                let dst = &mut flipped[(c * out + o) * k2..][..k2];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        }
        flipped
    }

    /// Adds image `slot`'s columns of `dcols` (C·k·k, images · OH·OW)
    /// back onto `image` (C, H, W): the adjoint of im2col.
    fn col2im(
        &self,
        dcols: &[f32],
        (slot, images): (usize, usize),
        image: &mut [f32],
        [height, width, out_h, out_w]: [usize; 4],
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let n = out_h * out_w;
        image
            .par_chunks_mut(height * width)
            .enumerate()
            .for_each(|(channel, plane)| {
                for ky in 0..k {
                    for kx in 0..k {
                        let row =
                            &dcols[(channel * k * k + ky * k + kx) * images * n + slot * n..][..n];
                        for oy in 0..out_h {
                            let iy = (oy * s + ky).wrapping_sub(p);
                            if iy >= height {
                                continue;
                            }
                            let line = &mut plane[iy * width..(iy + 1) * width];
                            for (ox, g) in row[oy * out_w..(oy + 1) * out_w].iter().enumerate() {
                                let ix = (ox * s + kx).wrapping_sub(p);
                                if ix < width {
                                    line[ix] += g;
                                }
                            }
                        }
                    }
                }
            });
    }
}

/// The im2col columns of a group of images hold at most about this many
/// floats (8 MiB; small in tests, so that they run partial groups).
const GROUP_FLOATS: usize = if cfg!(test) { 1500 } else { 1 << 21 };

/// Threads for a product of this size: all of them for large ones.
fn threads_for(m: usize, n: usize, k: usize) -> usize {
    if m * n * k >= 1 << 18 {
        rayon::current_num_threads()
    } else {
        1
    }
}

impl CustomOp2 for TrainableConv {
    fn name(&self) -> &'static str {
        "trainable-conv"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(x, x_layout, "trainable conv input")?;
        let weights = contiguous_f32(w, w_layout, "trainable conv weights")?;
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        let (out, in_channels, _, _) = w_layout.shape().dims4()?;
        if in_channels != channels {
            candle_core::bail!(
                "trainable conv: {channels} input channels, the weights take {in_channels}"
            );
        }
        let conv = self.kernel_for(weights, out, channels)?;
        let (out_h, out_w) = (conv.out_side(height)?, conv.out_side(width)?);
        let y = conv.run(input, [batch, height, width, out_h, out_w], None);
        Ok((CpuStorage::F32(y), Shape::from((batch, out, out_h, out_w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (batch, channels, height, width) = x.dims4()?;
        let (out, _, _, _) = w.dims4()?;
        let (_, _, out_h, out_w) = grad.dims4()?;
        // The input's gradient only where something upstream needs it
        // (not for the stem, whose input is the image).
        let input_gradient = x.track_op();
        let (grad_input, grad_weights) = with_f32(x, "trainable conv input", |input| {
            with_f32(w, "trainable conv weights", |weights| {
                with_f32(grad, "trainable conv gradient", |grad_out| {
                    self.gradients(
                        (input, weights, grad_out),
                        [batch, channels, height, width, out, out_h, out_w],
                        input_gradient,
                    )
                })
            })
        })?;
        let grad_input = match grad_input {
            Some(g) => Some(Tensor::from_vec(g, x.shape(), x.device())?),
            None => None,
        };
        Ok((
            grad_input,
            Some(Tensor::from_vec(grad_weights, w.shape(), w.device())?),
        ))
    }
}

impl TrainableConv {
    /// The input gradient (when `input_gradient`) and the weight gradient
    /// of contiguous NCHW `input` (batch, channels, height, width),
    /// `weights` (out, channels, k, k) and `grad_out` (batch, out, out_h,
    /// out_w).
    fn gradients(
        &self,
        (input, weights, grad_out): (&[f32], &[f32], &[f32]),
        [batch, channels, height, width, out, out_h, out_w]: [usize; 7],
        input_gradient: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let conv = self.kernel_for(weights, out, channels)?;
        let (k, n) = (channels * self.kernel * self.kernel, out_h * out_w);
        let plane = channels * height * width;
        // The weight gradient of a 3×3 stride-1 convolution in the
        // Winograd domain, over the whole batch, when the forward pass
        // runs there; else im2col + gemm over groups of images (below).
        let winograd = conv.winograd_tile(batch, height, width);
        let mut grad_weights = match winograd {
            Some(tile) => super::winograd::weight_gradient(
                tile,
                input,
                grad_out,
                [batch, height, width],
                (out, channels),
            ),
            None => vec![0f32; out * k],
        };
        // A 3×3 stride-1 padding-1 convolution's input gradient is the same
        // convolution of dY with the flipped, transposed weights: the
        // forward kernel (Winograd where it pays) for the whole batch.
        let same_size = self.kernel == 3 && self.stride == 1 && self.padding == 1;
        let mut grad_input = if !input_gradient {
            Vec::new()
        } else if same_size {
            let flipped = self.flipped_transposed(weights, out, channels);
            let adjoint = self.kernel_for(&flipped, channels, out)?;
            adjoint.run(grad_out, [batch, out_h, out_w, height, width], None)
        } else {
            vec![0f32; batch * plane]
        };
        if winograd.is_some() {
            return Ok((input_gradient.then_some(grad_input), grad_weights));
        }
        // im2col + gemm over groups of images: the group's columns side by
        // side, (k, images · n), so that the deep layers' few output pixels
        // (7×7 at 224²) still make wide products.
        let fold_back = input_gradient && !same_size;
        let group = (GROUP_FLOATS / (k * n).max(1)).clamp(1, batch.max(1));
        let mut columns = vec![0f32; k * group * n];
        let mut dy = vec![0f32; out * group * n];
        let mut grad_columns = vec![0f32; if fold_back { k * group * n } else { 0 }];
        for first in (0..batch).step_by(group) {
            let images = group.min(batch - first);
            let wide = images * n;
            let (columns, dy) = (&mut columns[..k * wide], &mut dy[..out * wide]);
            for slot in 0..images {
                let image = &input[(first + slot) * plane..][..plane];
                conv.im2col(image, [height, width, out_h, out_w], columns, slot, images);
            }
            // dY of the group as (out, images · n).
            for (o, row) in dy.chunks_exact_mut(wide).enumerate() {
                for (slot, cell) in row.chunks_exact_mut(n).enumerate() {
                    cell.copy_from_slice(&grad_out[((first + slot) * out + o) * n..][..n]);
                }
            }
            // dW (O×K) += dY (O×W) · colsᵀ (W×K): colsᵀ[i][j] = cols[j·W + i].
            gemm_strided(
                &mut grad_weights,
                (out, k, wide),
                true,
                (dy, (1, wide)),
                (columns, (wide, 1)),
                threads_for(out, k, wide),
            );
            if !fold_back {
                continue;
            }
            // dcols (K×W) = Wᵀ (K×O) · dY (O×W): Wᵀ[j][o] = W[o·K + j].
            let grad_columns = &mut grad_columns[..k * wide];
            gemm_strided(
                grad_columns,
                (k, wide, out),
                false,
                (weights, (k, 1)),
                (dy, (1, wide)),
                threads_for(k, wide, out),
            );
            for slot in 0..images {
                self.col2im(
                    grad_columns,
                    (slot, images),
                    &mut grad_input[(first + slot) * plane..][..plane],
                    [height, width, out_h, out_w],
                );
            }
        }
        Ok((input_gradient.then_some(grad_input), grad_weights))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    #[test]
    fn forward_and_gradients_equal_candle_conv() {
        // (in, out, kernel, stride, padding, side, batch): the ResNet
        // shapes. Three images where the tests' small groups of images
        // then run whole, partial and single-image groups.
        for (cin, cout, kernel, stride, padding, side, batch) in [
            (1, 4, 7, 2, 3, 20, 3),
            (3, 5, 3, 1, 1, 9, 3),
            (3, 5, 3, 2, 1, 10, 3),
            (4, 6, 1, 2, 0, 8, 3),
            // Weight gradient in the Winograd domain: F(4×4) over a
            // batch, and F(2×2) (a small plane with many channels).
            (4, 8, 3, 1, 1, 14, 2),
            (160, 8, 3, 1, 1, 7, 2),
        ] {
            let cpu = &Device::Cpu;
            let x0 = Tensor::randn(0f32, 1.0, (batch, cin, side, side), cpu).expect("x");
            let w0 = Tensor::randn(0f32, 0.3, (cout, cin, kernel, kernel), cpu).expect("w");
            let probe = Tensor::randn(0f32, 1.0, (batch, cout, side, side), cpu).expect("probe");
            let run = |ours: bool| {
                let x = Var::from_tensor(&x0).expect("x var");
                let w = Var::from_tensor(&w0).expect("w var");
                let y = if ours {
                    conv2d(x.as_tensor(), w.as_tensor(), stride, padding)
                } else {
                    x.as_tensor().conv2d(w.as_tensor(), padding, stride, 1, 1)
                }
                .expect("conv");
                let (_, _, oh, ow) = y.dims4().expect("dims");
                // A loss that weighs every output differently.
                let weights = probe
                    .narrow(2, 0, oh)
                    .and_then(|p| p.narrow(3, 0, ow))
                    .expect("probe");
                let grads = (&y * weights)
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward");
                let gx = grads.get(x.as_tensor()).expect("dx").clone();
                let gw = grads.get(w.as_tensor()).expect("dw").clone();
                (y, gx, gw)
            };
            let (y, gx, gw) = run(true);
            let (y_ref, gx_ref, gw_ref) = run(false);
            let case = format!("{cin}->{cout} k{kernel} s{stride} p{padding}");
            assert_eq!(y.dims(), y_ref.dims(), "{case}");
            assert!(max_diff(&y, &y_ref) < 1e-4, "forward {case}");
            assert!(max_diff(&gx, &gx_ref) < 1e-3, "input gradient {case}");
            assert!(max_diff(&gw, &gw_ref) < 1e-3, "weight gradient {case}");
        }
    }

    /// An input nothing upstream needs the gradient of (the stem's image):
    /// no input gradient, the weight gradient as candle's.
    #[test]
    fn constant_input_gets_no_gradient() {
        let cpu = &Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 20, 20), cpu).expect("x");
        let w0 = Tensor::randn(0f32, 0.3, (4, 1, 7, 7), cpu).expect("w");
        let run = |ours: bool| {
            let w = Var::from_tensor(&w0).expect("w var");
            let y = if ours {
                conv2d(&x, w.as_tensor(), 2, 3)
            } else {
                x.conv2d(w.as_tensor(), 3, 2, 1, 1)
            }
            .expect("conv");
            let grads = y
                .sqr()
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            // candle's own convolution stores one regardless.
            assert!(!ours || grads.get(&x).is_none(), "an input gradient");
            grads.get(w.as_tensor()).expect("dw").clone()
        };
        assert!(max_diff(&run(true), &run(false)) < 1e-3);
    }
}
