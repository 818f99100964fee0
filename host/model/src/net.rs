//! The EXAM-style network, in candle: pure model code (no files, no device
//! choice). `ExamNet::new(cfg, vb)` takes any `VarBuilder` — memory-mapped
//! safetensors for inference, a `VarMap` for training — and `forward` takes
//! a `train` flag (batch statistics and their running averages in training,
//! running statistics in inference).
//!
//! - image branch: ResNet-18 / ResNet-34 (or a `tiny` ResNet for tests),
//!   1-channel input, global average pooling → a feature vector;
//! - EMR branch: per-feature normalisation with missing-value indicators,
//!   then a Deep & Cross network (cross layers beside an MLP), as in EXAM;
//! - fusion MLP → a cumulative-logit (ordinal) head per horizon: one score
//!   s and increasing thresholds θ₁ < … < θ₄, P(level ≥ k) = σ(s − θₖ), so
//!   the probabilities are non-increasing in k by construction.

use candle_core::{D, Module, ModuleT, Result, Tensor};
use candle_nn::{
    BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder, batch_norm, conv2d_no_bias, linear,
};

use super::cpu_batch_norm::TrainBatchNorm;
use super::cpu_conv::FusedConv;
use super::dense_head::DenseHead;
use super::stem_pool::StemPool;

/// Batch-norm epsilon.
const BN_EPS: f64 = 1e-5;
use super::package::{Architecture, Backbone};

/// The network's parameters by part, as privacy filters and FedBN name
/// them: every variable of [`ExamNet`] is in exactly one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParameterGroup {
    /// The image branch's convolutions and batch-norm scales and shifts
    /// (`image.…`).
    ImageBackbone,
    /// Batch-norm running means and variances (`…running_mean`,
    /// `…running_var`): excluded from sharing, FedBN.
    BatchNormStatistics,
    /// The EMR branch: cross layers and MLP (`emr.…`).
    EmrBranch,
    /// The fusion layers (`fusion.…`).
    Fusion,
    /// The ordinal head: score and thresholds (`head.…`).
    Head,
}

impl ParameterGroup {
    /// Every group.
    pub const ALL: [ParameterGroup; 5] = [
        ParameterGroup::ImageBackbone,
        ParameterGroup::BatchNormStatistics,
        ParameterGroup::EmrBranch,
        ParameterGroup::Fusion,
        ParameterGroup::Head,
    ];

    /// The group's name in configurations (`image_backbone`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ParameterGroup::ImageBackbone => "image_backbone",
            ParameterGroup::BatchNormStatistics => "batch_norm_statistics",
            ParameterGroup::EmrBranch => "emr_branch",
            ParameterGroup::Fusion => "fusion",
            ParameterGroup::Head => "head",
        }
    }

    /// The group called `name` ([`ParameterGroup::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == name)
    }

    /// The group of the variable called `variable` (a name in the weights
    /// file); `None` for a name the network does not have.
    pub fn of(variable: &str) -> Option<Self> {
        if variable.ends_with(".running_mean") || variable.ends_with(".running_var") {
            return Some(ParameterGroup::BatchNormStatistics);
        }
        let (prefix, _) = variable.split_once('.')?;
        match prefix {
            "image" => Some(ParameterGroup::ImageBackbone),
            "emr" => Some(ParameterGroup::EmrBranch),
            "fusion" => Some(ParameterGroup::Fusion),
            "head" => Some(ParameterGroup::Head),
            _ => None,
        }
    }
}

/// Thresholds per horizon: P(≥1) … P(≥4) (the fourth, death, feeds the
/// exam score).
pub const THRESHOLDS: usize = 4;
/// Horizons: 24 h and 72 h.
pub const HORIZONS: usize = 2;

/// Convolution followed by batch norm and, when `relu`, a ReLU (after the
/// residual, if one is added). For inference the batch norm is folded into
/// the convolution, and on the CPU the whole unit runs as one fused kernel
/// ([`FusedConv`]).
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    relu: bool,
    folded: Option<Conv2d>,
    fused: Option<FusedConv>,
}

impl ConvBn {
    fn new(
        (cin, cout, kernel, stride): (usize, usize, usize, usize),
        relu: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: kernel / 2,
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d_no_bias(cin, cout, kernel, cfg, vb.pp("conv"))?,
            bn: batch_norm(cout, BN_EPS, vb.pp("bn"))?,
            relu,
            folded: None,
            fused: None,
        })
    }

    fn fold(&mut self) -> Result<()> {
        let folded = self.conv.absorb_bn(&self.bn)?;
        if folded.weight().device().is_cpu() {
            let (cout, cin, kernel, _) = folded.weight().dims4()?;
            let bias = match folded.bias() {
                Some(b) => b.to_vec1::<f32>()?,
                None => vec![0.0; cout],
            };
            let cfg = self.conv.config();
            self.fused = Some(FusedConv::new(
                folded.weight().flatten_all()?.to_vec1::<f32>()?,
                bias,
                (cout, cin, kernel),
                cfg.stride,
                cfg.padding,
                self.relu,
            )?);
        }
        self.folded = Some(folded);
        Ok(())
    }

    /// The fused kernel as it was before Winograd and packed weights:
    /// im2col + `gemm` (tests compare the two).
    #[cfg(test)]
    fn plain_gemm(&mut self) {
        self.fused = self.fused.take().map(FusedConv::plain_gemm);
    }

    /// Batch norm in training mode with the fused CPU kernel, updating the
    /// running statistics as candle-nn does (momentum, unbiased variance).
    /// The residual (when given) and the ReLU (when the unit has one) run
    /// in the same kernel, forward and backward.
    fn train_batch_norm(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (gamma, beta) = self
            .bn
            .weight_and_bias()
            .ok_or_else(|| candle_core::Error::Msg("batch norm without scale and shift".into()))?;
        let (y, statistics) =
            TrainBatchNorm::new(BN_EPS, self.relu).forward(x, gamma, beta, residual)?;
        let (b, _, h, w) = x.dims4()?;
        let count = (b * h * w) as f64;
        let unbiased = count / (count - 1.0).max(1.0);
        let m = self.bn.momentum();
        let update = |running: &Tensor, batch: Vec<f32>| -> Result<()> {
            let n = batch.len();
            let batch = Tensor::from_vec(batch, n, running.device())?;
            let next = ((running * (1.0 - m))? + (batch * m)?)?;
            candle_core::Var::from_tensor(running)?.set(&next)
        };
        update(
            self.bn.running_mean(),
            statistics.iter().map(|s| s.0 as f32).collect(),
        )?;
        update(
            self.bn.running_var(),
            statistics.iter().map(|s| (s.1 * unbiased) as f32).collect(),
        )?;
        Ok(y)
    }

    /// conv → BN (+ `residual`) (→ ReLU).
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>, train: bool) -> Result<Tensor> {
        if let (Some(op), false, true) = (&self.fused, train, x.device().is_cpu()) {
            let x = x.contiguous()?;
            return match residual {
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, op),
                None => x.apply_op1_no_bwd(op),
            };
        }
        // On the CPU, training convolves with the gemm kernel that has a
        // fast backward pass, then normalises with the fused batch norm;
        // elsewhere candle's own.
        if train && x.device().is_cpu() {
            let cfg = self.conv.config();
            let conv =
                super::cpu_conv_grad::conv2d(x, self.conv.weight(), cfg.stride, cfg.padding)?;
            return self.train_batch_norm(&conv, residual);
        }
        let mut y = match (&self.folded, train) {
            (Some(folded), false) => folded.forward(x)?,
            _ => self.bn.forward_t(&self.conv.forward(x)?, train)?,
        };
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if self.relu { y.relu() } else { Ok(y) }
    }
}

/// A ResNet basic block: two 3×3 conv-BN, a projection shortcut when the
/// shape changes.
#[derive(Debug, Clone)]
struct BasicBlock {
    a: ConvBn,
    b: ConvBn,
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = (stride != 1 || cin != cout)
            .then(|| ConvBn::new((cin, cout, 1, stride), false, vb.pp("shortcut")))
            .transpose()?;
        Ok(Self {
            a: ConvBn::new((cin, cout, 3, stride), true, vb.pp("a"))?,
            b: ConvBn::new((cout, cout, 3, 1), true, vb.pp("b"))?,
            shortcut,
        })
    }

    fn fold(&mut self) -> Result<()> {
        self.a.fold()?;
        self.b.fold()?;
        self.shortcut.as_mut().map(ConvBn::fold).transpose()?;
        Ok(())
    }

    #[cfg(test)]
    fn plain_gemm(&mut self) {
        self.a.plain_gemm();
        self.b.plain_gemm();
        if let Some(s) = &mut self.shortcut {
            s.plain_gemm();
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.a.forward(x, None, train)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x, None, train)?,
            None => x.clone(),
        };
        self.b.forward(&h, Some(&skip), train)
    }
}

/// The image branch: a ResNet with 1-channel input.
#[derive(Debug, Clone)]
pub struct ImageBranch {
    stem: ConvBn,
    /// The stem's convolution and max pool as one kernel, once folded
    /// (inference on AVX2 or AVX-512 CPUs).
    stem_pool: Option<StemPool>,
    blocks: Vec<BasicBlock>,
    features: usize,
}

impl ImageBranch {
    /// Builds the backbone's layers under `vb`.
    ///
    /// # Errors
    /// When a weight is missing or has the wrong shape.
    pub fn new(backbone: Backbone, vb: VarBuilder) -> Result<Self> {
        let (widths, depths): ([usize; 4], [usize; 4]) = match backbone {
            Backbone::Tiny => ([8, 16, 32, 64], [1, 1, 1, 1]),
            Backbone::Resnet18 => ([64, 128, 256, 512], [2, 2, 2, 2]),
            Backbone::Resnet34 => ([64, 128, 256, 512], [3, 4, 6, 3]),
        };
        let stem = ConvBn::new((1, widths[0], 7, 2), true, vb.pp("stem"))?;
        let mut blocks = Vec::new();
        let mut cin = widths[0];
        for (stage, (&cout, &depth)) in widths.iter().zip(&depths).enumerate() {
            for i in 0..depth {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    cin,
                    cout,
                    stride,
                    vb.pp(format!("layer{}.{i}", stage + 1)),
                )?);
                cin = cout;
            }
        }
        Ok(Self {
            stem,
            stem_pool: None,
            blocks,
            features: cin,
        })
    }

    /// Width of the feature vector (512 for ResNet-18/34).
    pub fn features(&self) -> usize {
        self.features
    }

    fn fold(&mut self) -> Result<()> {
        self.stem.fold()?;
        self.stem_pool = self.stem.fused.as_ref().and_then(FusedConv::stem_pool);
        self.blocks.iter_mut().try_for_each(BasicBlock::fold)
    }

    /// (B, 1, S, S) → (B, features).
    ///
    /// # Errors
    /// On shape mismatches.
    pub fn forward(&self, image: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.stem_and_pool(image, train)?;
        for block in &self.blocks {
            x = block.forward(&x, train)?;
        }
        x.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// The stem (7×7 stride-2 conv-BN-ReLU) and the 3×3 stride-2 max pool
    /// after it (padding 1). At inference on AVX2 and AVX-512 CPUs one
    /// kernel ([`StemPool`]) does both.
    fn stem_and_pool(&self, image: &Tensor, train: bool) -> Result<Tensor> {
        if let (Some(stem_pool), false, true) = (&self.stem_pool, train, image.device().is_cpu())
            && StemPool::available()
        {
            return image.contiguous()?.apply_op1_no_bwd(stem_pool);
        }
        let x = self.stem.forward(image, None, train)?;
        // 3×3 max pool, stride 2, padding 1: after ReLU every value is ≥ 0,
        // so zero padding equals −∞ padding. On the CPU one parallel pass
        // that reads the padding as zeros (the same values and gradients).
        if x.device().is_cpu() {
            let pool = super::cpu_batch_norm::MaxPool3x3Stride2 { padding: 1 };
            let x = x.contiguous()?;
            if train {
                x.apply_op1(pool)
            } else {
                x.apply_op1_no_bwd(&pool)
            }
        } else {
            stem_pool_padded(&x, train)
        }
    }
}

/// The stem's 3×3 stride-2 max pooling with one row and column of zeros
/// around the plane, from candle's operations (non-CPU devices).
fn stem_pool_padded(x: &Tensor, train: bool) -> Result<Tensor> {
    let x = x
        .pad_with_zeros(D::Minus1, 1, 1)?
        .pad_with_zeros(D::Minus2, 1, 1)?;
    // candle's pooling kernel has no gradient for overlapping windows:
    // training takes the elementwise maximum of the nine strided views.
    if train {
        max_pool_3x3_stride_2(&x)
    } else {
        x.max_pool2d_with_stride(3, 2)
    }
}

/// The EMR branch: normalised values with missing indicators, then a Deep &
/// Cross network.
#[derive(Debug, Clone)]
pub struct EmrBranch {
    cross: Vec<Linear>,
    deep: Vec<Linear>,
    inputs: usize,
}

impl EmrBranch {
    /// `features` EMR features; `cross_layers` cross layers; `deep` widths.
    ///
    /// # Errors
    /// When a weight is missing or has the wrong shape.
    pub fn new(
        features: usize,
        cross_layers: usize,
        deep: &[usize],
        vb: VarBuilder,
    ) -> Result<Self> {
        let inputs = 2 * features;
        let cross = (0..cross_layers)
            .map(|i| linear(inputs, inputs, vb.pp(format!("cross.{i}"))))
            .collect::<Result<_>>()?;
        let mut width = inputs;
        let mut layers = Vec::new();
        for (i, &w) in deep.iter().enumerate() {
            layers.push(linear(width, w, vb.pp(format!("deep.{i}")))?);
            width = w;
        }
        Ok(Self {
            cross,
            deep: layers,
            inputs,
        })
    }

    /// Width of the output: cross part plus deep part.
    pub fn features(&self) -> usize {
        self.inputs
            + self
                .deep
                .last()
                .map_or(self.inputs, |l| l.weight().dim(0).unwrap_or(0))
    }

    /// `values` (B, F) already normalised with 0 where missing, `missing`
    /// (B, F) 1 where missing → (B, features).
    ///
    /// # Errors
    /// On shape mismatches.
    pub fn forward(&self, values: &Tensor, missing: &Tensor) -> Result<Tensor> {
        let x0 = Tensor::cat(&[values, missing], 1)?;
        // Cross layers (DCN-v2): x_{l+1} = x0 ⊙ (W x_l + b) + x_l.
        let mut x = x0.clone();
        for layer in &self.cross {
            x = ((&x0 * layer.forward(&x)?)? + &x)?;
        }
        let mut h = x0;
        for layer in &self.deep {
            h = layer.forward(&h)?.relu()?;
        }
        Tensor::cat(&[&x, &h], 1)
    }
}

/// The whole network.
#[derive(Debug, Clone)]
pub struct ExamNet {
    image: Option<ImageBranch>,
    emr: EmrBranch,
    fusion: Vec<Linear>,
    score: Linear,
    threshold_base: Tensor,
    threshold_steps: Tensor,
    /// The EMR branch, fusion and head as plain loops, once folded for
    /// inference on the CPU.
    dense_head: Option<DenseHead>,
}

impl ExamNet {
    /// Builds the network described by `arch` for `emr_features` features.
    ///
    /// # Errors
    /// When a weight is missing or has the wrong shape.
    pub fn new(arch: &Architecture, emr_features: usize, vb: VarBuilder) -> Result<Self> {
        let image = (!arch.emr_only)
            .then(|| ImageBranch::new(arch.backbone, vb.pp("image")))
            .transpose()?;
        let emr = EmrBranch::new(
            emr_features,
            arch.cross_layers,
            &arch.deep_layers,
            vb.pp("emr"),
        )?;
        let mut width = emr.features() + image.as_ref().map_or(0, ImageBranch::features);
        let mut fusion = Vec::new();
        for (i, &w) in arch.fusion_layers.iter().enumerate() {
            fusion.push(linear(width, w, vb.pp(format!("fusion.{i}")))?);
            width = w;
        }
        let head = vb.pp("head");
        Ok(Self {
            image,
            emr,
            fusion,
            score: linear(width, HORIZONS, head.pp("score"))?,
            threshold_base: head.get(HORIZONS, "threshold_base")?,
            threshold_steps: head.get((HORIZONS, THRESHOLDS - 1), "threshold_steps")?,
            dense_head: None,
        })
    }

    /// Whether the network has an image branch.
    pub fn uses_image(&self) -> bool {
        self.image.is_some()
    }

    /// Folds every batch norm into its convolution, for inference; on the
    /// CPU also copies the layers after the image branch into a
    /// [`DenseHead`], which inference runs instead of candle's layers.
    /// The network is then for inference only: a later change to its
    /// variables does not reach the folded copies.
    ///
    /// # Errors
    /// On tensor errors.
    pub fn fold_batch_norm(&mut self) -> Result<()> {
        self.image.as_mut().map(ImageBranch::fold).transpose()?;
        if self.score.weight().device().is_cpu() {
            self.dense_head = Some(DenseHead::new(
                &self.emr.cross,
                &self.emr.deep,
                &self.fusion,
                &self.score,
                &self.thresholds()?,
            )?);
        }
        Ok(())
    }

    /// Whether inference runs the layers after the image branch as a
    /// [`DenseHead`] (folded, on the CPU).
    #[cfg(test)]
    pub(crate) fn runs_dense_head(&self) -> bool {
        self.dense_head.is_some()
    }

    /// The layers after the image branch through candle again.
    #[cfg(test)]
    pub(crate) fn without_dense_head(&mut self) {
        self.dense_head = None;
    }

    /// Every CPU convolution on im2col + `gemm`, none in the Winograd
    /// domain or with packed weights, and the layers after the image
    /// branch through candle: the kernels before those, the reference the
    /// fast kernels are tested against.
    #[cfg(test)]
    pub(crate) fn plain_gemm(&mut self) {
        self.dense_head = None;
        if let Some(image) = &mut self.image {
            image.stem.plain_gemm();
            image.stem_pool = None;
            image.blocks.iter_mut().for_each(BasicBlock::plain_gemm);
        }
    }

    /// Cumulative logits (B, HORIZONS, THRESHOLDS): s − θₖ per horizon.
    ///
    /// # Errors
    /// On shape mismatches, or an image missing for an image model.
    pub fn forward(
        &self,
        image: Option<&Tensor>,
        values: &Tensor,
        missing: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let features = match &self.image {
            Some(branch) => {
                let image = image
                    .ok_or_else(|| candle_core::Error::Msg("this model needs an image".into()))?;
                Some(branch.forward(image, train)?)
            }
            None => None,
        };
        if let (false, Some(head)) = (train, &self.dense_head) {
            return head.forward(features.as_ref(), values, missing);
        }
        let emr = self.emr.forward(values, missing)?;
        let mut h = match features {
            Some(features) => Tensor::cat(&[&features, &emr], 1)?,
            None => emr,
        };
        for layer in &self.fusion {
            h = layer.forward(&h)?.relu()?;
        }
        let score = self.score.forward(&h)?.unsqueeze(2)?; // (B, H, 1)
        score.broadcast_sub(&self.thresholds()?.unsqueeze(0)?)
    }

    /// The ordinal thresholds θ (HORIZONS, THRESHOLDS): θ₁ = base,
    /// θₖ₊₁ = θₖ + softplus(stepₖ), strictly increasing.
    ///
    /// # Errors
    /// On tensor errors.
    pub fn thresholds(&self) -> Result<Tensor> {
        let steps = softplus(&self.threshold_steps)?.cumsum(1)?; // (H, T−1)
        let base = self.threshold_base.unsqueeze(1)?; // (H, 1)
        Tensor::cat(&[&base, &steps.broadcast_add(&base)?], 1)
    }

    /// P(level ≥ k) for k = 1..3 per horizon: (B, HORIZONS, THRESHOLDS).
    ///
    /// # Errors
    /// As [`ExamNet::forward`].
    pub fn probabilities(
        &self,
        image: Option<&Tensor>,
        values: &Tensor,
        missing: &Tensor,
    ) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.forward(image, values, missing, false)?)
    }
}

/// 3×3 max pooling with stride 2 (no padding) with a gradient: the same
/// values as `max_pool2d_with_stride(3, 2)`. On the CPU a kernel with its
/// own backward pass; elsewhere the maximum of nine strided views, built
/// from operations candle can differentiate.
///
/// # Errors
/// On tensor errors.
pub fn max_pool_3x3_stride_2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x
            .contiguous()?
            .apply_op1(super::cpu_batch_norm::MaxPool3x3Stride2 { padding: 0 });
    }
    let (b, c, h, w) = x.dims4()?;
    if h < 3 || w < 3 {
        candle_core::bail!("max pool 3x3: input {h}x{w} is too small");
    }
    let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
    // Rows (or columns) offset, offset + 2, …: 2·n values from `offset`
    // (zero-padded at the end when they run past), every second one.
    let every_second = |t: &Tensor, dim: usize, offset: usize, n: usize| -> Result<Tensor> {
        let len = t.dim(dim)?;
        let t = if offset + 2 * n > len {
            t.pad_with_zeros(dim, 0, offset + 2 * n - len)?
        } else {
            t.clone()
        };
        let t = t.narrow(dim, offset, 2 * n)?;
        let mut shape = t.dims().to_vec();
        shape[dim] = n;
        shape.insert(dim + 1, 2);
        t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
    };
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = every_second(x, 2, dy, oh)?;
        for dx in 0..3 {
            let view = every_second(&rows, 3, dx, ow)?;
            out = Some(match out {
                Some(m) => m.maximum(&view)?,
                None => view,
            });
        }
    }
    out.map(|t| t.reshape((b, c, oh, ow)))
        .unwrap_or_else(|| candle_core::bail!("max pool: no window"))
}

/// softplus(x) = log(1 + eˣ) = max(x, 0) + log(1 + e^(−|x|)), stable.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}
