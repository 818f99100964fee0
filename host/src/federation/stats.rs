//! The federated statistics round: each site's aggregate EMR statistics
//! (never a value, never a bucket under the minimum count), combined into
//! one global normalisation so that every site normalises identically.

use serde::{Deserialize, Serialize};

use crate::model::package::EmrFeature;

/// Default smallest count a histogram bucket (or a feature's moments) may
/// describe.
pub const DEFAULT_MIN_COUNT: u64 = 10;

/// Buckets of the coarse histogram, evenly over the feature's plausible
/// range.
pub const HISTOGRAM_BUCKETS: usize = 10;

/// One feature's statistics at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureStatistics {
    /// Canonical name.
    pub name: String,
    /// Cases with a value.
    pub count: u64,
    /// Cases without.
    pub missing: u64,
    /// Σ v (values clamped to the plausible range); absent when `count` is
    /// under the minimum count.
    pub sum: Option<f64>,
    /// Σ v².
    pub sum_squares: Option<f64>,
    /// Σ v³ (for the skewness that decides the log transform).
    pub sum_cubes: Option<f64>,
    /// Σ ln(1 + v) (non-negative features).
    pub log_sum: Option<f64>,
    /// Σ ln(1 + v)².
    pub log_sum_squares: Option<f64>,
    /// Counts in [`HISTOGRAM_BUCKETS`] even buckets over [min, max]; a
    /// bucket under the minimum count is sent as 0 and counted in
    /// `suppressed`.
    pub histogram: Vec<u64>,
    /// Values in suppressed buckets.
    pub suppressed: u64,
}

/// A site's signed statistics document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteStatistics {
    /// [`super::protocol::FORMAT`].
    pub format: u32,
    /// The federation job.
    pub job: String,
    /// The site id.
    pub site: String,
    /// The minimum count applied.
    pub min_count: u64,
    /// Per feature of the model, in its order.
    pub features: Vec<FeatureStatistics>,
}

/// The histogram bucket of `v` (already clamped to [min, max]).
fn bucket(spec: &EmrFeature, v: f64) -> usize {
    let width = spec.max - spec.min;
    if width.is_nan() || width <= 0.0 {
        return 0;
    }
    let b = ((v - spec.min) / width * HISTOGRAM_BUCKETS as f64).floor();
    (b.max(0.0) as usize).min(HISTOGRAM_BUCKETS - 1)
}

/// A site's statistics over its training cases' canonical features
/// (`cases[i]` = (name, value) pairs as the plugins produced them).
///
/// Values are the ones [`crate::train::data::fit_normalisation`] uses:
/// finite, clamped to the feature's plausible range. A feature with fewer
/// than `min_count` values sends its counts only (no sums); a histogram
/// bucket with fewer than `min_count` values (but not none) is sent as 0
/// and its values are counted in `suppressed`. The log sums are sent only
/// for features that cannot be negative (`min ≥ 0`).
pub fn site_statistics(
    job: &str,
    site: &str,
    emr: &[EmrFeature],
    cases: &[Vec<(String, Option<f64>)>],
    min_count: u64,
) -> SiteStatistics {
    let features = emr
        .iter()
        .map(|spec| {
            let values: Vec<f64> = cases
                .iter()
                .filter_map(|case| {
                    case.iter()
                        .find(|(n, _)| *n == spec.name)
                        .and_then(|(_, v)| *v)
                })
                .filter(|v| v.is_finite())
                .map(|v| v.clamp(spec.min, spec.max))
                .collect();
            let count = values.len() as u64;
            let mut histogram = vec![0u64; HISTOGRAM_BUCKETS];
            for v in &values {
                histogram[bucket(spec, *v)] += 1;
            }
            let mut suppressed = 0;
            for b in histogram.iter_mut() {
                if *b > 0 && *b < min_count {
                    suppressed += *b;
                    *b = 0;
                }
            }
            let moments = count >= min_count && count > 0;
            let sum = |f: &dyn Fn(f64) -> f64| moments.then(|| values.iter().map(|v| f(*v)).sum());
            let logs = moments && spec.min >= 0.0;
            let log_sum =
                |f: &dyn Fn(f64) -> f64| logs.then(|| values.iter().map(|v| f(v.ln_1p())).sum());
            FeatureStatistics {
                name: spec.name.clone(),
                count,
                missing: cases.len() as u64 - count,
                sum: sum(&|v| v),
                sum_squares: sum(&|v| v * v),
                sum_cubes: sum(&|v| v * v * v),
                log_sum: log_sum(&|l| l),
                log_sum_squares: log_sum(&|l| l * l),
                histogram,
                suppressed,
            }
        })
        .collect();
    SiteStatistics {
        format: super::protocol::FORMAT,
        job: job.to_string(),
        site: site.to_string(),
        min_count,
        features,
    }
}

/// Pooled sums of one feature.
#[derive(Default)]
struct Pooled {
    n: f64,
    s1: f64,
    s2: f64,
    s3: f64,
    l1: f64,
    l2: f64,
    logs: bool,
}

/// Mean and sample standard deviation (n − 1) from the count, Σ v and Σ v².
fn mean_std(n: f64, s1: f64, s2: f64) -> (f64, f64) {
    let mean = s1 / n;
    let var = ((s2 - s1 * mean) / (n - 1.0).max(1.0)).max(0.0);
    (mean, var.sqrt())
}

/// The global normalisation: `emr` with mean, std and the log decision
/// refitted from every site's statistics pooled (the same rule as
/// [`crate::train::data::fit_normalisation`] on pooled values). A feature
/// whose pooled count is under two keeps its values.
///
/// Only sites that sent a feature's sums count towards it (a site under
/// the minimum count for a feature sends none).
pub fn combine(emr: &[EmrFeature], sites: &[SiteStatistics]) -> Vec<EmrFeature> {
    emr.iter()
        .map(|spec| {
            let mut pooled = Pooled {
                logs: true,
                ..Pooled::default()
            };
            for feature in sites
                .iter()
                .flat_map(|s| s.features.iter().filter(|f| f.name == spec.name))
            {
                let (Some(s1), Some(s2), Some(s3)) =
                    (feature.sum, feature.sum_squares, feature.sum_cubes)
                else {
                    continue;
                };
                pooled.n += feature.count as f64;
                pooled.s1 += s1;
                pooled.s2 += s2;
                pooled.s3 += s3;
                match (feature.log_sum, feature.log_sum_squares) {
                    (Some(l1), Some(l2)) => {
                        pooled.l1 += l1;
                        pooled.l2 += l2;
                    }
                    _ => pooled.logs = false,
                }
            }
            let mut out = spec.clone();
            if pooled.n < 2.0 {
                return out;
            }
            let n = pooled.n;
            let (mean, std) = mean_std(n, pooled.s1, pooled.s2);
            // A spread that is rounding error of the sums is none.
            let std = if std > 1e-9 * mean.abs().max(1.0) {
                std
            } else {
                0.0
            };
            let skewness = if std > 0.0 {
                // Σ (v − m)³ from the raw sums.
                let central3 = pooled.s3 - 3.0 * mean * pooled.s2 + 3.0 * mean * mean * pooled.s1
                    - n * mean.powi(3);
                central3 / std.powi(3) / n
            } else {
                0.0
            };
            let is_code = oxbox_emr_schema::feature(&spec.name).is_some_and(|f| f.integer);
            out.log = !is_code && spec.min >= 0.0 && skewness > 1.0 && pooled.logs;
            let (mean, std) = if out.log {
                mean_std(n, pooled.l1, pooled.l2)
            } else {
                (mean, std)
            };
            out.mean = mean;
            out.std = if std > 1e-6 { std } else { 1.0 };
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Pcg;
    use crate::train::data::{Example, fit_normalisation};

    fn spec(name: &str, min: f64, max: f64) -> EmrFeature {
        EmrFeature {
            name: name.to_string(),
            unit: String::new(),
            min,
            max,
            mean: 0.0,
            std: 1.0,
            log: false,
        }
    }

    fn emr() -> Vec<EmrFeature> {
        vec![
            // Right-skewed: the log decision is taken.
            spec("crp_mg_l", 0.0, 700.0),
            // Symmetric.
            spec("sodium_mmol_l", 90.0, 200.0),
            // A code: never log.
            spec("o2_device_at_triage", 0.0, 3.0),
            // Present at one case only: keeps its defaults.
            spec("ferritin_ng_ml", 0.0, 100_000.0),
        ]
    }

    fn cases(rng: &mut Pcg, n: usize, shift: f64) -> Vec<Vec<(String, Option<f64>)>> {
        (0..n)
            .map(|i| {
                let crp = rng.chance(0.9).then(|| (rng.gauss(2.5 + shift, 1.0)).exp());
                vec![
                    ("crp_mg_l".to_string(), crp),
                    (
                        "sodium_mmol_l".to_string(),
                        Some(rng.gauss(138.0 + shift, 4.0)),
                    ),
                    (
                        "o2_device_at_triage".to_string(),
                        Some(if rng.chance(0.15) { 3.0 } else { 0.0 }),
                    ),
                    ("ferritin_ng_ml".to_string(), (i == 0).then_some(300.0)),
                ]
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn combine_equals_fit_normalisation_on_the_pooled_values() {
        let mut rng = Pcg::new(21, 0);
        let a = cases(&mut rng, 180, 0.0);
        let b = cases(&mut rng, 70, 0.4);
        let stats = [
            site_statistics("job", "site-a", &emr(), &a, DEFAULT_MIN_COUNT),
            site_statistics("job", "site-b", &emr(), &b, DEFAULT_MIN_COUNT),
        ];
        let combined = combine(&emr(), &stats);

        let examples: Vec<Example> = a
            .iter()
            .chain(&b)
            .map(|features| Example {
                image: None,
                features: features.clone(),
                levels: [0, 0],
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let mut pooled = emr();
        fit_normalisation(&mut pooled, &refs);

        assert!(pooled[0].log, "crp is right-skewed");
        assert!(!pooled[1].log && !pooled[2].log);
        for (c, p) in combined.iter().zip(&pooled).take(3) {
            assert_eq!(c.log, p.log, "{}", c.name);
            assert!(
                close(c.mean, p.mean),
                "{}: {} vs {}",
                c.name,
                c.mean,
                p.mean
            );
            assert!(close(c.std, p.std), "{}: {} vs {}", c.name, c.std, p.std);
        }
        // ferritin: one value per site, under the minimum count: no site
        // describes it, so the defaults stay (where pooling the raw
        // values would have fitted them).
        assert_eq!(combined[3], emr()[3]);
        assert_ne!(pooled[3], emr()[3]);
    }

    #[test]
    fn small_counts_are_never_described() {
        let mut rng = Pcg::new(5, 5);
        let few = cases(&mut rng, 9, 0.0);
        let s = site_statistics("job", "site", &emr(), &few, 10);
        for f in &s.features {
            assert!(f.count < 10);
            assert_eq!(f.sum, None, "{}", f.name);
            assert_eq!(f.sum_squares, None);
            assert_eq!(f.sum_cubes, None);
            assert_eq!(f.log_sum, None);
            assert_eq!(f.log_sum_squares, None);
            assert!(
                f.histogram.iter().all(|b| *b == 0),
                "{}: {:?}",
                f.name,
                f.histogram
            );
            assert_eq!(f.suppressed, f.count);
            assert_eq!(f.count + f.missing, 9);
        }
        // Combining sites that all sent nothing keeps the defaults.
        assert_eq!(combine(&emr(), &[s]), emr());

        let many = cases(&mut rng, 400, 0.0);
        let s = site_statistics("job", "site", &emr(), &many, 10);
        for f in &s.features {
            assert!(
                f.histogram.iter().all(|b| *b == 0 || *b >= 10),
                "{}: {:?}",
                f.name,
                f.histogram
            );
            assert_eq!(
                f.histogram.iter().sum::<u64>() + f.suppressed,
                f.count,
                "{}",
                f.name
            );
        }
        assert!(s.features[1].sum.is_some() && s.features[1].log_sum.is_some());
    }

    #[test]
    fn values_are_clamped_and_non_finite_ones_missing() {
        let rows = vec![
            vec![("sodium_mmol_l".to_string(), Some(500.0))],
            vec![("sodium_mmol_l".to_string(), Some(f64::NAN))],
            vec![("sodium_mmol_l".to_string(), Some(100.0))],
            vec![],
        ];
        let s = site_statistics("job", "site", &emr()[1..2], &rows, 1);
        let f = &s.features[0];
        assert_eq!((f.count, f.missing), (2, 2));
        assert_eq!(f.sum, Some(300.0));
        assert_eq!(f.histogram[HISTOGRAM_BUCKETS - 1], 1);
        assert_eq!(f.histogram[0], 1);
    }
}
