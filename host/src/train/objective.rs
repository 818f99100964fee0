//! What training minimises and how the result is calibrated:
//! - the ordinal loss: binary cross-entropy on every cumulative logit
//!   s − θₖ (P(level ≥ k)), both horizons, with per-threshold class weights
//!   so that rare levels (ventilation, death) still shape the score;
//! - threshold recalibration: class weights shift the thresholds (the
//!   probabilities would be too high), so after training each θₖ is refit
//!   without weights on the validation split, keeping the learned score s.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::net::{HORIZONS, THRESHOLDS};

/// How positive and negative cases of each threshold are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeighting {
    /// Every case weighs 1.
    None,
    /// The rarer class weighs √(majority / minority), at most 10.
    Sqrt,
    /// The rarer class weighs majority / minority, at most 10.
    Balanced,
}

/// (weight of a positive, weight of a negative) per horizon and threshold.
pub type ClassWeights = [[(f32, f32); THRESHOLDS]; HORIZONS];

/// Class weights from the training split's levels.
pub fn class_weights(levels: &[[u8; HORIZONS]], weighting: ClassWeighting) -> ClassWeights {
    let mut weights = [[(1f32, 1f32); THRESHOLDS]; HORIZONS];
    for (h, row) in weights.iter_mut().enumerate() {
        for (k, slot) in row.iter_mut().enumerate() {
            let positives = levels.iter().filter(|l| usize::from(l[h]) > k).count() as f64;
            let negatives = levels.len() as f64 - positives;
            if positives == 0.0 || negatives == 0.0 {
                continue;
            }
            let ratio = |a: f64, b: f64| {
                let r = (a / b).max(1.0);
                let w = match weighting {
                    ClassWeighting::None => 1.0,
                    ClassWeighting::Sqrt => r.sqrt(),
                    ClassWeighting::Balanced => r,
                };
                w.min(10.0) as f32
            };
            *slot = (ratio(negatives, positives), ratio(positives, negatives));
        }
    }
    weights
}

/// Targets and weights (B, HORIZONS, THRESHOLDS) for a batch's levels.
pub fn targets(levels: &[[u8; HORIZONS]], weights: &ClassWeights) -> (Vec<f32>, Vec<f32>) {
    let mut y = Vec::with_capacity(levels.len() * HORIZONS * THRESHOLDS);
    let mut w = Vec::with_capacity(y.capacity());
    for l in levels {
        for h in 0..HORIZONS {
            for (k, &(positive, negative)) in weights[h].iter().enumerate() {
                let is_positive = usize::from(l[h]) > k;
                y.push(if is_positive { 1.0 } else { 0.0 });
                w.push(if is_positive { positive } else { negative });
            }
        }
    }
    (y, w)
}

/// Weighted binary cross-entropy on logits, averaged over every element:
/// mean(w · (softplus(x) − y·x)), computed stably.
///
/// # Errors
/// On shape mismatches.
pub fn ordinal_loss(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let softplus = (logits.relu()? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    ((softplus - (targets * logits)?)? * weights)?.mean_all()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The unweighted maximum-likelihood threshold θ for scores `s` and labels
/// `y` under P(y) = σ(s − θ): the θ where the mean predicted probability
/// equals the observed rate (monotone in θ, found by bisection). `None`
/// with fewer than `min_each` positives or negatives.
pub fn fit_threshold(scores: &[f64], labels: &[bool], min_each: usize) -> Option<f64> {
    let positives = labels.iter().filter(|&&y| y).count();
    if positives < min_each || labels.len() - positives < min_each {
        return None;
    }
    let rate = positives as f64 / labels.len() as f64;
    let mean_p =
        |theta: f64| scores.iter().map(|s| sigmoid(s - theta)).sum::<f64>() / scores.len() as f64;
    let (lo_s, hi_s) = scores
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &s| {
            (a.min(s), b.max(s))
        });
    let (mut lo, mut hi) = (lo_s - 40.0, hi_s + 40.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        // mean_p falls as θ rises.
        if mean_p(mid) > rate {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(0.5 * (lo + hi))
}

/// Makes each horizon's thresholds strictly increasing (gap ≥ `gap`),
/// then returns the network's parametrisation: base θ₁ (HORIZONS) and
/// steps softplus⁻¹(θₖ₊₁ − θₖ) (HORIZONS, THRESHOLDS − 1).
pub fn threshold_parameters(
    thresholds: &[[f64; THRESHOLDS]; HORIZONS],
    gap: f64,
) -> (Vec<f32>, Vec<f32>) {
    let mut base = Vec::with_capacity(HORIZONS);
    let mut steps = Vec::with_capacity(HORIZONS * (THRESHOLDS - 1));
    for row in thresholds {
        base.push(row[0] as f32);
        let mut previous = row[0];
        for &theta in &row[1..] {
            let delta = (theta - previous).max(gap);
            // softplus⁻¹(d) = ln(eᵈ − 1); = d (to f32 precision) for large d.
            steps.push(if delta > 30.0 {
                delta
            } else {
                delta.exp_m1().ln()
            } as f32);
            previous += delta;
        }
    }
    (base, steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn loss_equals_the_formula_and_weights_count() {
        let logits = Tensor::new(&[[[2f32, -1.0]]], &Device::Cpu).expect("logits");
        let targets = Tensor::new(&[[[1f32, 0.0]]], &Device::Cpu).expect("targets");
        let weights = Tensor::new(&[[[3f32, 1.0]]], &Device::Cpu).expect("weights");
        let got = ordinal_loss(&logits, &targets, &weights)
            .and_then(|l| l.to_scalar::<f32>())
            .expect("loss");
        let bce = |x: f64, y: f64| -(y * sigmoid(x).ln() + (1.0 - y) * (1.0 - sigmoid(x)).ln());
        let want = (3.0 * bce(2.0, 1.0) + bce(-1.0, 0.0)) / 2.0;
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn class_weights_favour_the_rare_class_within_bounds() {
        // 90 at level 0, 9 at level 1, 1 at level 2 (24 h); all 0 at 72 h.
        let mut levels = vec![[0u8, 0]; 90];
        levels.extend(vec![[1u8, 0]; 9]);
        levels.push([2, 0]);
        let w = class_weights(&levels, ClassWeighting::Balanced);
        assert!((w[0][0].0 - 9.0).abs() < 1e-6, "{:?}", w[0][0]); // 90 / 10
        assert_eq!(w[0][0].1, 1.0);
        assert_eq!(w[0][1].0, 10.0, "99 / 1 is clipped to 10");
        assert_eq!(w[1][0], (1.0, 1.0), "no positives: unweighted");
        let s = class_weights(&levels, ClassWeighting::Sqrt);
        assert!((s[0][0].0 - 3.0).abs() < 1e-6);
        assert_eq!(
            class_weights(&levels, ClassWeighting::None)[0][1],
            (1.0, 1.0)
        );
        let (y, weights) = targets(&[[2, 0]], &w);
        assert_eq!(y, vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(weights[0], w[0][0].0);
    }

    #[test]
    fn refit_threshold_matches_the_observed_rate() {
        // Scores from a known model: P(y) = σ(s − 0.7).
        let mut rng = crate::rng::Pcg::new(5, 0);
        let scores: Vec<f64> = (0..20_000).map(|_| rng.gauss(0.0, 1.5)).collect();
        let labels: Vec<bool> = scores
            .iter()
            .map(|&s| rng.uniform() < sigmoid(s - 0.7))
            .collect();
        let theta = fit_threshold(&scores, &labels, 5).expect("enough of each");
        assert!((theta - 0.7).abs() < 0.06, "{theta}");
        assert_eq!(fit_threshold(&scores[..3], &labels[..3], 5), None);
    }

    #[test]
    fn threshold_parameters_round_trip_through_softplus() {
        let thresholds = [[-1.0, -0.3, 0.4, 1.1], [0.5, 0.2, 2.0, 40.0]];
        let (base, steps) = threshold_parameters(&thresholds, 1e-3);
        let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        assert_eq!(base, vec![-1.0, 0.5]);
        let mut theta = f64::from(base[0]);
        for (k, want) in thresholds[0][1..].iter().enumerate() {
            theta += softplus(f64::from(steps[k]));
            assert!((theta - want).abs() < 1e-5, "{theta} vs {want}");
        }
        // The second row's 0.2 after 0.5 is raised to keep the order.
        let second = 0.5 + softplus(f64::from(steps[3]));
        assert!((second - 0.501).abs() < 1e-4, "{second}");
        assert!((softplus(f64::from(steps[5])) - 38.0).abs() < 1e-3);
    }
}
