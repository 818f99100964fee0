//! Privacy filters: what of a site's update (Δ) leaves the box. Applied
//! in the configured order; each records what it did in the update
//! manifest.
//!
//! - `exclude`: drops whole tensors by parameter group
//!   ([`crate::model::ParameterGroup`]) or by name pattern (`*` matches any
//!   run of characters). Excluding `batch_norm_statistics` gives FedBN: each
//!   site keeps its own batch-norm statistics.
//! - `percentile`: per tensor, keeps only the largest `percent` % of |Δ|
//!   and zeroes the rest (EXAM's partial weight sharing); shards then carry
//!   the kept entries sparsely.
//! - `clip`: scales the whole update down to an L2 norm of at most
//!   `max_norm`.
//! - `noise`: adds Gaussian noise of standard deviation `sigma` to every
//!   entry that is shared (after `percentile`, only the kept ones). With a
//!   preceding `clip`, `sigma / max_norm` is the noise multiplier of the
//!   Gaussian mechanism.

use super::FederationError;
use super::tensors::Tensors;

pub use oxbox_federation_formats::protocol::{AppliedFilter, Filter};

/// A source of standard normal draws (for `noise`): the box seeds one from
/// the system's random generator; tests pass a fixed one.
pub trait NormalSource {
    /// One draw from N(0, 1).
    fn next_normal(&mut self) -> f64;
}

impl NormalSource for crate::rng::Pcg {
    fn next_normal(&mut self) -> f64 {
        self.normal()
    }
}

/// A [`NormalSource`] seeded from the system's random generator (for the
/// `noise` filter on a site: draws nobody can reproduce).
///
/// # Errors
/// [`FederationError::Filter`] when the system generator fails.
pub fn system_normal_source() -> Result<crate::rng::Pcg, FederationError> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| FederationError::Filter {
            filter: "noise",
            reason: "the system random generator failed".to_string(),
        })?;
    let (a, b) = seed.split_at(8);
    let word = |bytes: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(bytes);
        u64::from_le_bytes(w)
    };
    Ok(crate::rng::Pcg::new(word(a), word(b)))
}

/// Checks a filter's parameters (ranges, known parameter groups).
fn check(filter: &Filter) -> Result<(), FederationError> {
    let bad = |reason: String| {
        Err(FederationError::Filter {
            filter: filter.kind(),
            reason,
        })
    };
    match filter {
        Filter::Exclude { groups, patterns } => {
            if groups.is_empty() && patterns.is_empty() {
                return bad("names neither groups nor patterns".to_string());
            }
            if let Some(g) = groups
                .iter()
                .find(|g| crate::model::ParameterGroup::from_name(g).is_none())
            {
                let known: Vec<&str> = crate::model::ParameterGroup::ALL
                    .iter()
                    .map(|g| g.as_str())
                    .collect();
                return bad(format!(
                    "unknown parameter group {g:?} (known: {})",
                    known.join(", ")
                ));
            }
            if patterns.iter().any(|p| p.is_empty()) {
                return bad("an empty name pattern".to_string());
            }
        }
        Filter::Percentile { percent } => {
            if !(percent.is_finite() && *percent > 0.0 && *percent <= 100.0) {
                return bad(format!("percent = {percent}, must be in (0, 100]"));
            }
        }
        Filter::Clip { max_norm } => {
            if !(max_norm.is_finite() && *max_norm > 0.0) {
                return bad(format!("max_norm = {max_norm}, must be finite and > 0"));
            }
        }
        Filter::Noise { sigma } => {
            if !(sigma.is_finite() && *sigma >= 0.0) {
                return bad(format!("sigma = {sigma}, must be finite and >= 0"));
            }
        }
    }
    Ok(())
}

/// Whether `name` matches `pattern`, where `*` matches any run of
/// characters (also none) and every other character itself.
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(split) => split,
        None => return name.is_empty(),
    };
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        // No `*`: the whole name must be the pattern.
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(at) => tail = &tail[at + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

/// Number of entries the `percentile` filter keeps of `n`: ⌈percent % of
/// n⌉, where a product within 1e-9 of a whole number counts as that number
/// (10 % of 30 is 3, not 4 by a rounding error), at most `n`.
pub fn percentile_keep(percent: f64, n: usize) -> usize {
    let exact = percent * n as f64 / 100.0;
    let nearest = exact.round();
    let k = if (exact - nearest).abs() <= 1e-9 * nearest.max(1.0) {
        nearest
    } else {
        exact.ceil()
    };
    (k.max(0.0) as usize).min(n)
}

/// Checks every filter's parameters (at configuration time).
///
/// # Errors
/// [`FederationError::Filter`] naming the filter and the bad parameter.
pub fn validate(filters: &[Filter]) -> Result<(), FederationError> {
    filters.iter().try_for_each(check)
}

fn nonzero(update: &Tensors) -> u64 {
    update
        .values()
        .map(|t| t.values.iter().filter(|v| **v != 0.0).count() as u64)
        .sum()
}

/// L2 norm of every value of `update`.
pub fn l2_norm(update: &Tensors) -> f64 {
    update
        .values()
        .flat_map(|t| t.values.iter())
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

/// Keeps the `keep` largest |v| of `values` (ties: the lower position
/// wins), zeroing the rest.
fn keep_largest(values: &mut [f32], keep: usize) {
    let n = values.len();
    if keep >= n {
        return;
    }
    if keep == 0 {
        values.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    // A total order: larger |v| first, then lower position first. For
    // non-negative floats the bit patterns order as the values do, so the
    // keep-th largest |v| is found by selecting among plain integers
    // (contiguous, no indirection); then every value above it is kept, and
    // of those equal to it the first ones in position order.
    let magnitude = |v: f32| v.abs().to_bits();
    let mut magnitudes: Vec<u32> = values.iter().map(|v| magnitude(*v)).collect();
    let (_, threshold, _) = magnitudes.select_nth_unstable_by(keep - 1, |a, b| b.cmp(a));
    let threshold = *threshold;
    drop(magnitudes);
    let above = values.iter().filter(|v| magnitude(**v) > threshold).count();
    let equal = values
        .iter()
        .filter(|v| magnitude(**v) == threshold)
        .count();
    let mut ties = keep - above;
    if ties == equal {
        // Every value at the threshold is kept: one comparison per value,
        // without branches.
        for v in values.iter_mut() {
            *v = if magnitude(*v) < threshold { 0.0 } else { *v };
        }
        return;
    }
    for v in values.iter_mut() {
        let m = magnitude(*v);
        if m > threshold {
            continue;
        }
        if m == threshold && ties > 0 {
            ties -= 1;
            continue;
        }
        *v = 0.0;
    }
}

/// Applies `filters` in order to `update`, in place.
///
/// `noise` perturbs every entry that is shared: all of them, or after a
/// `percentile` filter only the non-zero (kept) ones, so the update stays
/// as sparse as `percentile` made it.
///
/// # Errors
/// [`FederationError::Filter`] for bad parameters,
/// [`FederationError::Mismatch`] for a tensor whose shape and values
/// disagree or that holds a non-finite value.
pub fn apply(
    filters: &[Filter],
    update: &mut Tensors,
    noise: &mut dyn NormalSource,
) -> Result<Vec<AppliedFilter>, FederationError> {
    validate(filters)?;
    for (name, tensor) in update.iter() {
        if !tensor.is_consistent() {
            return Err(FederationError::Mismatch {
                name: name.clone(),
                reason: format!(
                    "shape {:?} but {} values",
                    tensor.shape,
                    tensor.values.len()
                ),
            });
        }
        if !super::tensors::all_finite(&tensor.values) {
            return Err(FederationError::Mismatch {
                name: name.clone(),
                reason: "holds a non-finite value".to_string(),
            });
        }
    }
    let mut sparse = false;
    let mut applied = Vec::with_capacity(filters.len());
    for filter in filters {
        let mut excluded = Vec::new();
        match filter {
            Filter::Exclude { groups, patterns } => {
                let groups: Vec<crate::model::ParameterGroup> = groups
                    .iter()
                    .filter_map(|g| crate::model::ParameterGroup::from_name(g))
                    .collect();
                excluded = update
                    .keys()
                    .filter(|name| {
                        crate::model::ParameterGroup::of(name).is_some_and(|g| groups.contains(&g))
                            || patterns.iter().any(|p| matches_pattern(p, name))
                    })
                    .cloned()
                    .collect();
                for name in &excluded {
                    update.remove(name);
                }
            }
            Filter::Percentile { percent } => {
                for tensor in update.values_mut() {
                    let keep = percentile_keep(*percent, tensor.values.len());
                    keep_largest(&mut tensor.values, keep);
                }
                sparse = true;
            }
            Filter::Clip { max_norm } => {
                let norm = l2_norm(update);
                if norm > *max_norm {
                    let scale = max_norm / norm;
                    for v in update.values_mut().flat_map(|t| t.values.iter_mut()) {
                        *v = (f64::from(*v) * scale) as f32;
                    }
                }
            }
            Filter::Noise { sigma } => {
                if *sigma > 0.0 {
                    for v in update.values_mut().flat_map(|t| t.values.iter_mut()) {
                        if !sparse || *v != 0.0 {
                            *v = (f64::from(*v) + sigma * noise.next_normal()) as f32;
                        }
                    }
                }
            }
        }
        applied.push(AppliedFilter {
            filter: filter.clone(),
            excluded,
            nonzero: nonzero(update),
            norm: l2_norm(update),
        });
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::tensors::Tensor32;
    use crate::rng::Pcg;

    fn tensor(values: Vec<f32>) -> Tensor32 {
        Tensor32 {
            shape: vec![values.len()],
            values,
        }
    }

    fn update() -> Tensors {
        let mut u = Tensors::new();
        u.insert(
            "image.stem.conv.weight".into(),
            tensor(vec![0.5, -3.0, 1.0, 2.0, -0.25]),
        );
        u.insert("image.stem.bn.running_mean".into(), tensor(vec![1.0, 1.0]));
        u.insert("image.stem.bn.running_var".into(), tensor(vec![2.0, 2.0]));
        u.insert("emr.mlp.0.weight".into(), tensor(vec![4.0, -4.0, 0.0, 1.0]));
        u.insert("head.threshold_base".into(), tensor(vec![0.1, 0.2, 0.3]));
        u
    }

    /// A source that must not be called.
    struct NoDraws;
    impl NormalSource for NoDraws {
        fn next_normal(&mut self) -> f64 {
            panic!("no noise expected")
        }
    }

    #[test]
    fn validate_rejects_bad_parameters() {
        let bad = [
            Filter::Percentile { percent: 0.0 },
            Filter::Percentile { percent: 100.5 },
            Filter::Percentile { percent: f64::NAN },
            Filter::Clip { max_norm: 0.0 },
            Filter::Clip {
                max_norm: f64::INFINITY,
            },
            Filter::Noise { sigma: -1.0 },
            Filter::Noise { sigma: f64::NAN },
            Filter::Exclude {
                groups: vec!["batchnorm".into()],
                patterns: vec![],
            },
            Filter::Exclude {
                groups: vec![],
                patterns: vec![],
            },
            Filter::Exclude {
                groups: vec![],
                patterns: vec![String::new()],
            },
        ];
        for f in bad {
            let err = validate(std::slice::from_ref(&f)).expect_err("must be refused");
            assert!(
                matches!(&err, FederationError::Filter { filter, .. } if *filter == f.kind()),
                "{f:?}: {err}"
            );
            let mut u = update();
            assert!(apply(&[f], &mut u, &mut NoDraws).is_err());
            assert_eq!(u, update(), "a refused filter leaves the update alone");
        }
        validate(&[
            Filter::Percentile { percent: 100.0 },
            Filter::Clip { max_norm: 1.0 },
            Filter::Noise { sigma: 0.0 },
            Filter::Exclude {
                groups: vec!["batch_norm_statistics".into()],
                patterns: vec!["head.*".into()],
            },
        ])
        .expect("valid");
    }

    #[test]
    fn filters_parse_from_toml() {
        #[derive(serde::Deserialize)]
        struct Config {
            filters: Vec<Filter>,
        }
        let c: Config = toml::from_str(
            "[[filters]]\nkind = \"percentile\"\npercent = 10\n\
             [[filters]]\nkind = \"exclude\"\ngroups = [\"batch_norm_statistics\"]\n",
        )
        .expect("parse");
        assert_eq!(c.filters[0], Filter::Percentile { percent: 10.0 });
        assert!(
            toml::from_str::<Config>("[[filters]]\nkind = \"clip\"\nmax = 1.0\n").is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn patterns_match_runs_of_characters() {
        assert!(matches_pattern("head.*", "head.threshold_base"));
        assert!(matches_pattern("*.running_mean", "image.a.bn.running_mean"));
        assert!(matches_pattern("image.*.bn.*", "image.layer1.bn.weight"));
        assert!(matches_pattern("*", "anything"));
        assert!(matches_pattern("exact", "exact"));
        assert!(!matches_pattern("exact", "exactly"));
        assert!(!matches_pattern("head.*", "image.head.x"));
        assert!(!matches_pattern("a*a", "a"));
        assert!(matches_pattern("a*a", "aa"));
        assert!(!matches_pattern("*.bias", "emr.weight"));
    }

    #[test]
    fn exclude_by_group_and_pattern_gives_fedbn() {
        let mut u = update();
        let applied = apply(
            &[Filter::Exclude {
                groups: vec!["batch_norm_statistics".into()],
                patterns: vec!["head.*".into()],
            }],
            &mut u,
            &mut NoDraws,
        )
        .expect("apply");
        assert_eq!(
            u.keys().cloned().collect::<Vec<_>>(),
            vec!["emr.mlp.0.weight", "image.stem.conv.weight"]
        );
        assert_eq!(
            applied[0].excluded,
            vec![
                "head.threshold_base",
                "image.stem.bn.running_mean",
                "image.stem.bn.running_var"
            ]
        );
        assert_eq!(applied[0].nonzero, 8);
        let expected = l2_norm(&u);
        assert!((applied[0].norm - expected).abs() < 1e-12);
    }

    #[test]
    fn percentile_keeps_exactly_the_largest_with_ties_to_the_lower_position() {
        assert_eq!(percentile_keep(10.0, 30), 3);
        assert_eq!(percentile_keep(10.0, 31), 4);
        assert_eq!(percentile_keep(10.0, 1), 1);
        assert_eq!(percentile_keep(100.0, 7), 7);
        assert_eq!(percentile_keep(33.3, 1000), 333);
        let mut u = Tensors::new();
        u.insert("t".into(), tensor(vec![1.0, -2.0, 2.0, 0.5, -2.0, 3.0]));
        // 40 % of 6 = 2.4 → 3 kept: 3.0, then the first two of the three |2|.
        let applied = apply(
            &[Filter::Percentile { percent: 40.0 }],
            &mut u,
            &mut NoDraws,
        )
        .expect("apply");
        assert_eq!(u["t"].values, vec![0.0, -2.0, 2.0, 0.0, 0.0, 3.0]);
        assert_eq!(applied[0].nonzero, 3);
    }

    #[test]
    fn percentile_on_random_tensors_keeps_ceil_p_of_n_and_the_largest() {
        let mut rng = Pcg::new(7, 1);
        for round in 0..200 {
            let n = 1 + rng.below(300);
            // Coarse values make ties frequent.
            let values: Vec<f32> = (0..n).map(|_| (rng.below(9) as f32 - 4.0) * 0.5).collect();
            let percent = [1.0, 5.0, 10.0, 25.0, 50.0, 99.0, 100.0][round % 7];
            let mut u = Tensors::new();
            u.insert("t".into(), tensor(values.clone()));
            apply(&[Filter::Percentile { percent }], &mut u, &mut NoDraws).expect("apply");
            let keep = percentile_keep(percent, n);
            // Direct computation: stable sort by |v| descending.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|a, b| values[*b].abs().total_cmp(&values[*a].abs()));
            let mut expected = vec![0.0f32; n];
            for &i in &order[..keep] {
                expected[i] = values[i];
            }
            assert_eq!(u["t"].values, expected, "n = {n}, percent = {percent}");
        }
    }

    #[test]
    fn clip_bounds_the_norm_and_leaves_small_updates() {
        let mut u = update();
        let before = l2_norm(&u);
        let applied =
            apply(&[Filter::Clip { max_norm: 1.0 }], &mut u, &mut NoDraws).expect("apply");
        assert!(before > 1.0);
        assert!((l2_norm(&u) - 1.0).abs() < 1e-6);
        assert!((applied[0].norm - 1.0).abs() < 1e-6);
        // Direction kept.
        let scale = u["emr.mlp.0.weight"].values[0] / 4.0;
        assert!((u["emr.mlp.0.weight"].values[1] - (-4.0 * scale)).abs() < 1e-6);
        let mut small = update();
        apply(&[Filter::Clip { max_norm: 1e6 }], &mut small, &mut NoDraws).expect("apply");
        assert_eq!(small, update());
    }

    #[test]
    fn noise_perturbs_only_shared_entries_with_the_given_sigma() {
        // Dense: every entry moves; the perturbation has the right spread.
        let mut u = Tensors::new();
        u.insert("t".into(), tensor(vec![0.0; 20_000]));
        let mut rng = Pcg::new(3, 3);
        apply(&[Filter::Noise { sigma: 0.5 }], &mut u, &mut rng).expect("apply");
        let v = &u["t"].values;
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
        let sd = (v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64)
            .sqrt();
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((sd - 0.5).abs() < 0.02, "sd {sd}");
        // After percentile, zeros stay zero.
        let mut u = update();
        let applied = apply(
            &[
                Filter::Percentile { percent: 50.0 },
                Filter::Noise { sigma: 0.1 },
            ],
            &mut u,
            &mut Pcg::new(5, 5),
        )
        .expect("apply");
        assert_eq!(applied[0].nonzero, applied[1].nonzero);
        assert_eq!(u["image.stem.conv.weight"].values[0], 0.0);
        assert_eq!(u["image.stem.conv.weight"].values[4], 0.0);
        assert_ne!(u["image.stem.conv.weight"].values[1], -3.0);
        // The same seed gives the same noise.
        let mut again = update();
        apply(
            &[
                Filter::Percentile { percent: 50.0 },
                Filter::Noise { sigma: 0.1 },
            ],
            &mut again,
            &mut Pcg::new(5, 5),
        )
        .expect("apply");
        assert_eq!(u, again);
    }

    #[test]
    fn apply_refuses_non_finite_updates() {
        let mut u = update();
        u.get_mut("head.threshold_base").expect("t").values[1] = f32::NAN;
        assert!(matches!(
            apply(&[Filter::Clip { max_norm: 1.0 }], &mut u, &mut NoDraws),
            Err(FederationError::Mismatch { name, .. }) if name == "head.threshold_base"
        ));
    }

    #[test]
    fn system_source_draws() {
        let mut a = system_normal_source().expect("system random");
        let mut b = system_normal_source().expect("system random");
        assert_ne!(a.next_normal(), b.next_normal());
    }
}
