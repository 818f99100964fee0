//! The network's small layers at inference on the CPU — the EMR branch's
//! cross layers and MLP, the fusion MLP and the ordinal head's score and
//! thresholds — as plain loops over weights copied once, when a model is
//! folded for inference ([`super::net::ExamNet::fold_batch_norm`]).
//!
//! Each layer is a product of a few hundred weights by a vector per case.
//! Through candle every layer was several operations (a matrix product
//! that packs its right-hand side first, a broadcast add, a ReLU, each
//! with its own allocation), and everything after the image branch took
//! 0.33–0.43 ms of a ResNet-18 forward pass of 10–12 ms (1 Dec, AMD EPYC,
//! timed inside the pass): more than a 1×1 convolution of layer 3. The
//! arithmetic is candle-nn's `Linear` (y = W x + b, W stored out × in),
//! each sum in f32 in the order of the inputs.

use candle_core::{Result, Tensor};
use candle_nn::Linear;

/// A dense layer: y = W x + b, W row-major (outputs × inputs).
#[derive(Debug, Clone)]
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl Dense {
    /// The weights and bias of `layer` (f32, on any device).
    fn of(layer: &Linear) -> Result<Self> {
        let (outputs, inputs) = layer.weight().dims2()?;
        let weight = layer
            .weight()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let bias = match layer.bias() {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1()?,
            None => vec![0.0; outputs],
        };
        if bias.len() != outputs {
            candle_core::bail!("dense head: {} biases for {outputs} outputs", bias.len());
        }
        Ok(Self {
            weight,
            bias,
            inputs,
        })
    }

    /// W x + b into `y` (cleared first), ReLU'd when `relu`.
    ///
    /// # Errors
    /// When `x` is not as long as the layer's inputs.
    fn apply(&self, x: &[f32], relu: bool, y: &mut Vec<f32>) -> Result<()> {
        if x.len() != self.inputs {
            candle_core::bail!(
                "dense head: a layer takes {} inputs, got {}",
                self.inputs,
                x.len()
            );
        }
        y.clear();
        y.extend(
            self.weight
                .chunks_exact(self.inputs.max(1))
                .zip(&self.bias)
                .map(|(row, b)| {
                    let sum = row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + b;
                    if relu { sum.max(0.0) } else { sum }
                }),
        );
        Ok(())
    }
}

/// The EMR branch, the fusion MLP and the ordinal head of an
/// [`super::net::ExamNet`], for inference on the CPU.
#[derive(Debug, Clone)]
pub struct DenseHead {
    cross: Vec<Dense>,
    deep: Vec<Dense>,
    fusion: Vec<Dense>,
    score: Dense,
    /// θ (horizons × thresholds), row-major.
    thresholds: Vec<f32>,
    /// θ's shape: (horizons, thresholds per horizon).
    shape: (usize, usize),
}

impl DenseHead {
    /// The layers' weights, copied: the EMR branch's `cross` and `deep`
    /// layers, the `fusion` layers, the `score` layer and the ordinal
    /// `thresholds` (horizons × thresholds).
    ///
    /// # Errors
    /// When a tensor has the wrong rank or cannot be read, or the score
    /// layer's outputs are not the thresholds' horizons.
    pub fn new(
        cross: &[Linear],
        deep: &[Linear],
        fusion: &[Linear],
        score: &Linear,
        thresholds: &Tensor,
    ) -> Result<Self> {
        let all = |layers: &[Linear]| layers.iter().map(Dense::of).collect::<Result<Vec<_>>>();
        let shape = thresholds.dims2()?;
        let score = Dense::of(score)?;
        if score.bias.len() != shape.0 {
            candle_core::bail!(
                "dense head: {} scores for {} horizons",
                score.bias.len(),
                shape.0
            );
        }
        Ok(Self {
            cross: all(cross)?,
            deep: all(deep)?,
            fusion: all(fusion)?,
            score,
            thresholds: thresholds
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            shape,
        })
    }

    /// Cumulative logits (B, horizons, thresholds), s − θₖ, from the image
    /// features (B, F) when the network has an image branch, the
    /// normalised EMR `values` (B, E) and `missing` (B, E): what
    /// [`super::net::ExamNet::forward`] computes after the image branch.
    ///
    /// # Errors
    /// On shapes that do not fit the layers.
    pub fn forward(
        &self,
        image_features: Option<&Tensor>,
        values: &Tensor,
        missing: &Tensor,
    ) -> Result<Tensor> {
        let values = values.to_vec2::<f32>()?;
        let missing = missing.to_vec2::<f32>()?;
        let image = image_features.map(Tensor::to_vec2::<f32>).transpose()?;
        let batch = values.len();
        if missing.len() != batch || image.as_ref().is_some_and(|i| i.len() != batch) {
            candle_core::bail!("dense head: the inputs' batch sizes differ");
        }
        let (horizons, steps) = self.shape;
        let mut logits = Vec::with_capacity(batch * horizons * steps);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for case in 0..batch {
            // x0 = [values, missing]; cross layers x ← x0 ⊙ (W x + b) + x.
            let x0: Vec<f32> = values[case].iter().chain(&missing[case]).copied().collect();
            let mut x = x0.clone();
            for layer in &self.cross {
                layer.apply(&x, false, &mut a)?;
                for ((xi, ti), x0i) in x.iter_mut().zip(&a).zip(&x0) {
                    *xi += x0i * ti;
                }
            }
            // The MLP beside them, from x0.
            let mut h = x0;
            for layer in &self.deep {
                layer.apply(&h, true, &mut a)?;
                std::mem::swap(&mut h, &mut a);
            }
            // [image features, cross, deep] → the fusion MLP → the score.
            let mut fused: Vec<f32> = match &image {
                Some(image) => image[case].clone(),
                None => Vec::new(),
            };
            fused.extend_from_slice(&x);
            fused.extend_from_slice(&h);
            for layer in &self.fusion {
                layer.apply(&fused, true, &mut b)?;
                std::mem::swap(&mut fused, &mut b);
            }
            // One score per horizon (checked in `new`), minus its θs.
            self.score.apply(&fused, false, &mut a)?;
            for (s, theta) in a.iter().zip(self.thresholds.chunks_exact(steps.max(1))) {
                logits.extend(theta.iter().map(|t| s - t));
            }
        }
        Tensor::from_vec(logits, (batch, horizons, steps), &candle_core::Device::Cpu)
    }
}
