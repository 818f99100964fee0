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

use serde::{Deserialize, Serialize};

use super::FederationError;
use super::tensors::Tensors;

/// One privacy filter, as configured (`[[federation.filters]]`, `kind = …`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Filter {
    /// Drop tensors by parameter group or name pattern.
    Exclude {
        /// Parameter group names (`image_backbone`, `batch_norm_statistics`,
        /// `emr_branch`, `fusion`, `head`).
        #[serde(default)]
        groups: Vec<String>,
        /// Name patterns, `*` matching any run of characters.
        #[serde(default)]
        patterns: Vec<String>,
    },
    /// Keep the largest `percent` % of |Δ| per tensor, zero the rest.
    Percentile {
        /// Share kept, in (0, 100].
        percent: f64,
    },
    /// Scale the update to an L2 norm of at most `max_norm`.
    Clip {
        /// The bound, > 0.
        max_norm: f64,
    },
    /// Add N(0, sigma²) to every shared entry.
    Noise {
        /// Standard deviation, ≥ 0.
        sigma: f64,
    },
}

/// What one filter did, as recorded in the update manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedFilter {
    /// The filter and its parameters.
    pub filter: Filter,
    /// Tensors it removed (`exclude`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// Entries non-zero after it.
    pub nonzero: u64,
    /// L2 norm of the update after it.
    pub norm: f64,
}

/// A source of standard normal draws (for `noise`): the box seeds one from
/// the system's random generator; tests pass a fixed one.
pub trait NormalSource {
    /// One draw from N(0, 1).
    fn next_normal(&mut self) -> f64;
}

/// Checks every filter's parameters (at configuration time).
///
/// # Errors
/// [`FederationError::Filter`] naming the filter and the bad parameter.
pub fn validate(filters: &[Filter]) -> Result<(), FederationError> {
    let _ = filters;
    todo!("federation maths")
}

/// Applies `filters` in order to `update`, in place.
///
/// # Errors
/// [`FederationError::Filter`] for bad parameters.
pub fn apply(
    filters: &[Filter],
    update: &mut Tensors,
    noise: &mut dyn NormalSource,
) -> Result<Vec<AppliedFilter>, FederationError> {
    let _ = (filters, update, noise);
    todo!("federation maths")
}
