//! Federated learning, the site's and the aggregator's shared maths and
//! formats: weight tensors as plain data, privacy filters, safetensors
//! shards, signed canonical documents, statistics and federated averaging.
//!
//! Everything here is a pure function over tensors and bytes: no network,
//! no files, no clock. HTTP is one transport ([`crate::aggregator`] on the
//! server side, [`client`] and [`site`] on the site side); a later one can
//! join an existing federation engine with the same functions.
//!
//! The way of one round's update, on the site:
//! global weights → local training → [`tensors::difference`] (Δ = local −
//! global) → [`filters::apply`] (exclude, percentile, clip, noise) →
//! [`shards::encode`] (safetensors shards ≤ `shard_mib`) →
//! [`protocol::UpdateManifest`] → [`signed::SignedDocument::sign`].
//! On the aggregator: [`signed::SignedDocument::verify`] →
//! [`shards::decode`] → [`aggregate::RunningAverage`] → new global.

pub mod aggregate;
pub mod client;
pub mod filters;
pub mod protocol;
pub mod shards;
pub mod signed;
pub mod site;
pub mod stats;
pub mod tensors;

/// Errors of the federation maths and formats.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// Bytes that should be a document, a shard or a tensor are not.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being read (`update manifest`, `shard 3`, …).
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// Tensors that should match (names, shapes) do not.
    #[error("tensor {name}: {reason}")]
    Mismatch {
        /// The tensor.
        name: String,
        /// How it differs.
        reason: String,
    },
    /// A filter's parameters are out of range.
    #[error("privacy filter {filter}: {reason}")]
    Filter {
        /// The filter kind.
        filter: &'static str,
        /// Why.
        reason: String,
    },
    /// A signature does not verify, or is by a key that is not expected.
    #[error("signature: {0}")]
    Signature(String),
}
