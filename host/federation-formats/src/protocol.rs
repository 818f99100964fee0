//! The documents sites and the aggregator exchange. Each travels as one
//! canonical JSON encoding ([`crate::signed::canonical_json`]) signed over
//! its exact bytes ([`crate::signed::SignedDocument`]).

use serde::{Deserialize, Serialize};

/// Version of these formats.
pub const FORMAT: u32 = 1;

/// Shape of one tensor of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorInfo {
    /// Name, as in the model's weights.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
}

/// One shard as the manifest declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// 0-based position.
    pub index: u32,
    /// sha256 of its bytes, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Tensors it holds chunks of.
    pub tensors: Vec<String>,
}

/// A site's signed update for one round: what it trained on, which
/// filters it applied and which shards carry the Δ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateManifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The federation job.
    pub job: String,
    /// The round (1-based).
    pub round: u64,
    /// The site id (as enrolled).
    pub site: String,
    /// Digest of the global model the Δ is against.
    pub base_model: String,
    /// Training cases behind the update (the FedAvg weight).
    pub samples: u64,
    /// The privacy filters, in the order applied.
    pub filters: Vec<AppliedFilter>,
    /// Every tensor the update carries (excluded ones are absent).
    pub tensors: Vec<TensorInfo>,
    /// The shards.
    pub shards: Vec<ShardInfo>,
}

/// What the aggregator asks of the sites now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Sites send their EMR statistics (`SiteStatistics` (`oxbox::federation::stats`)).
    Statistics,
    /// Sites train from the global model and send updates.
    Training,
    /// The job is done: the last global model is final.
    Finished,
}

/// Training settings every site uses in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSettings {
    /// Local epochs per round.
    pub epochs: usize,
    /// Cases per optimizer step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// FedProx's proximal coefficient μ (0 = plain FedAvg); applied on the site.
    #[serde(default)]
    pub proximal_mu: f64,
}

/// The aggregator's signed task: the open round and the global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundTask {
    /// [`FORMAT`].
    pub format: u32,
    /// The federation job.
    pub job: String,
    /// What the sites do now.
    pub phase: Phase,
    /// The open round (0 during the statistics phase).
    pub round: u64,
    /// Last round of the job.
    pub rounds: u64,
    /// Digest of the current global model package.
    pub global_model: String,
    /// The round the global model came from (0: the starting model).
    pub global_round: u64,
    /// How sites train.
    pub training: TrainingSettings,
    /// Sites whose complete update the open round already has.
    pub received: Vec<String>,
}

/// The aggregator's signed record of a published global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalModelRecord {
    /// [`FORMAT`].
    pub format: u32,
    /// The federation job.
    pub job: String,
    /// The round that produced it (0: the starting model, with the
    /// federated normalisation).
    pub round: u64,
    /// Package digest (`oxbox::model::package::PackageBytes::digest`).
    pub digest: String,
    /// The global model it was aggregated from (none for round 0).
    pub previous: Option<String>,
    /// Sites and sample counts that went into it.
    pub contributions: Vec<Contribution>,
}

/// One site's share of an aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution {
    /// Site id.
    pub site: String,
    /// Its training cases.
    pub samples: u64,
}

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

impl Filter {
    /// The filter's kind as configured (`exclude`, `percentile`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Filter::Exclude { .. } => "exclude",
            Filter::Percentile { .. } => "percentile",
            Filter::Clip { .. } => "clip",
            Filter::Noise { .. } => "noise",
        }
    }
}
