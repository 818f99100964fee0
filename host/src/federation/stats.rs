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

/// A site's statistics over its training cases' canonical features
/// (`cases[i]` = (name, value) pairs as the plugins produced them).
pub fn site_statistics(
    job: &str,
    site: &str,
    emr: &[EmrFeature],
    cases: &[Vec<(String, Option<f64>)>],
    min_count: u64,
) -> SiteStatistics {
    let _ = (job, site, emr, cases, min_count);
    todo!("federation maths")
}

/// The global normalisation: `emr` with mean, std and the log decision
/// refitted from every site's statistics pooled (the same rule as
/// [`crate::train::data::fit_normalisation`] on pooled values). A feature
/// whose pooled count is under two keeps its values.
pub fn combine(emr: &[EmrFeature], sites: &[SiteStatistics]) -> Vec<EmrFeature> {
    let _ = (emr, sites);
    todo!("federation maths")
}
