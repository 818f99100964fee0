//! Statistics for clinical evaluation and for the synthetic cohort's
//! ground truth: the ROC AUC (Mann–Whitney, ties counted half) with its
//! DeLong confidence interval, the ROC curve, sensitivity and specificity at
//! an operating point, calibration (expected calibration error and the
//! reliability diagram's bins), and the standard normal distribution
//! function.

/// Area under the ROC curve of `scores` for binary `labels` (true =
/// positive): the probability that a random positive scores above a random
/// negative, ties counting one half. `None` when either class is empty.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Sum of the positives' mid-ranks (half-integers: the sum is exact in
    // any order).
    let rank_sum: f64 = midranks(scores)
        .iter()
        .zip(labels)
        .filter(|&(_, &positive)| positive)
        .map(|(rank, _)| rank)
        .sum();
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Mid-ranks (1-based, ties averaged) of `values`.
fn midranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = mid;
        }
        i = j + 1;
    }
    ranks
}

/// An AUC with its DeLong standard error and 95 % confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AucEstimate {
    /// The AUC.
    pub auc: f64,
    /// DeLong standard error.
    pub se: f64,
    /// Lower end of the 95 % CI (clamped to [0, 1]).
    pub ci_low: f64,
    /// Upper end of the 95 % CI (clamped to [0, 1]).
    pub ci_high: f64,
    /// Positives.
    pub positives: usize,
    /// Negatives.
    pub negatives: usize,
}

/// The AUC with DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988;
/// the mid-rank algorithm of Sun & Xu 2014). `None` when a class is empty.
pub fn auc_delong(scores: &[f64], labels: &[bool]) -> Option<AucEstimate> {
    let positives: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(s, _)| *s)
        .collect();
    let negatives: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| !**l)
        .map(|(s, _)| *s)
        .collect();
    let (m, n) = (positives.len(), negatives.len());
    if m == 0 || n == 0 {
        return None;
    }
    let all: Vec<f64> = positives.iter().chain(&negatives).copied().collect();
    let ranks_all = midranks(&all);
    let ranks_pos = midranks(&positives);
    let ranks_neg = midranks(&negatives);
    let v10: Vec<f64> = (0..m)
        .map(|i| (ranks_all[i] - ranks_pos[i]) / n as f64)
        .collect();
    let v01: Vec<f64> = (0..n)
        .map(|j| 1.0 - (ranks_all[m + j] - ranks_neg[j]) / m as f64)
        .collect();
    let auc = v10.iter().sum::<f64>() / m as f64;
    let variance = |v: &[f64]| {
        if v.len() < 2 {
            return 0.0;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64
    };
    let se = (variance(&v10) / m as f64 + variance(&v01) / n as f64).sqrt();
    Some(AucEstimate {
        auc,
        se,
        ci_low: (auc - 1.959_964 * se).max(0.0),
        ci_high: (auc + 1.959_964 * se).min(1.0),
        positives: m,
        negatives: n,
    })
}

/// The ROC curve: (false-positive rate, true-positive rate) at every
/// distinct threshold, from (0, 0) to (1, 1).
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let p = labels.iter().filter(|&&l| l).count().max(1) as f64;
    let n = labels.iter().filter(|&&l| !l).count().max(1) as f64;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut curve = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < order.len() {
        let threshold = scores[order[i]];
        while i < order.len() && scores[order[i]] == threshold {
            if labels[order[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        curve.push((fp / n, tp / p));
    }
    curve
}

/// Sensitivity and specificity when scores ≥ `threshold` are called
/// positive.
pub fn sensitivity_specificity(scores: &[f64], labels: &[bool], threshold: f64) -> (f64, f64) {
    let (mut tp, mut p, mut tn, mut n) = (0.0, 0.0, 0.0, 0.0);
    for (&s, &l) in scores.iter().zip(labels) {
        if l {
            p += 1.0;
            if s >= threshold {
                tp += 1.0;
            }
        } else {
            n += 1.0;
            if s < threshold {
                tn += 1.0;
            }
        }
    }
    (tp / f64::max(p, 1.0), tn / f64::max(n, 1.0))
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CalibrationBin {
    /// Lower edge of the predicted-probability bin.
    pub lower: f64,
    /// Upper edge.
    pub upper: f64,
    /// Cases in the bin.
    pub count: usize,
    /// Mean predicted probability in the bin.
    pub mean_predicted: f64,
    /// Observed share of positives in the bin.
    pub observed: f64,
}

/// Expected calibration error over `bins` equal-width bins of predicted
/// probability (weighted |observed − predicted|), and the bins.
pub fn calibration(
    probabilities: &[f64],
    labels: &[bool],
    bins: usize,
) -> (f64, Vec<CalibrationBin>) {
    let bins = bins.max(1);
    let mut acc = vec![(0usize, 0.0f64, 0usize); bins];
    for (&p, &l) in probabilities.iter().zip(labels) {
        let b = ((p.clamp(0.0, 1.0) * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += p;
        acc[b].2 += usize::from(l);
    }
    let total = probabilities.len().max(1) as f64;
    let mut ece = 0.0;
    let out = acc
        .iter()
        .enumerate()
        .map(|(i, &(count, sum, pos))| {
            let (mean, observed) = if count > 0 {
                (sum / count as f64, pos as f64 / count as f64)
            } else {
                (0.0, 0.0)
            };
            ece += count as f64 / total * (observed - mean).abs();
            CalibrationBin {
                lower: i as f64 / bins as f64,
                upper: (i + 1) as f64 / bins as f64,
                count,
                mean_predicted: mean,
                observed,
            }
        })
        .collect();
    (ece, out)
}

/// Φ(x), the standard normal distribution function (|error| < 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// erf(x), Abramowitz & Stegun 7.1.26.
fn erf(x: f64) -> f64 {
    let sign = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_pairs_and_ties() {
        assert_eq!(
            auc(&[0.1, 0.2, 0.3, 0.4], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auc(&[0.4, 0.3, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        // One tie between a positive and a negative: half a pair.
        assert_eq!(
            auc(&[0.1, 0.5, 0.5, 0.9], &[false, false, true, true]),
            Some(0.875)
        );
        assert_eq!(auc(&[0.5, 0.5], &[true, true]), None);
    }

    #[test]
    fn delong_agrees_with_the_plain_auc_and_has_a_sane_interval() {
        let scores = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.55, 0.3, 0.65];
        let labels = [
            false, false, true, true, true, false, true, false, false, true,
        ];
        let plain = auc(&scores, &labels).expect("auc");
        let delong = auc_delong(&scores, &labels).expect("delong");
        assert!((plain - delong.auc).abs() < 1e-12);
        assert!(delong.se > 0.0 && delong.ci_low < delong.auc && delong.auc < delong.ci_high);
        // Perfect separation: AUC 1, no variance.
        let perfect = auc_delong(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]).expect("p");
        assert_eq!((perfect.auc, perfect.se), (1.0, 0.0));
    }

    #[test]
    fn roc_sensitivity_and_calibration() {
        let scores = [0.1, 0.4, 0.6, 0.9];
        let labels = [false, true, false, true];
        let curve = roc_curve(&scores, &labels);
        assert_eq!(curve.first(), Some(&(0.0, 0.0)));
        assert_eq!(curve.last(), Some(&(1.0, 1.0)));
        assert_eq!(sensitivity_specificity(&scores, &labels, 0.5), (0.5, 0.5));
        let (ece, bins) = calibration(&[0.05, 0.05, 0.95, 0.95], &[false, false, true, true], 10);
        assert!((ece - 0.05).abs() < 1e-12, "{ece}");
        assert_eq!(bins.iter().map(|b| b.count).sum::<usize>(), 4);
    }

    #[test]
    fn normal_cdf_matches_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-1.0) - 0.158_655_25).abs() < 1e-6);
    }
}
