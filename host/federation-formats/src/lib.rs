//! The federation's formats: what crosses the network between a site and
//! the aggregator, and how each side checks it.
//!
//! - [`tensors`]: weight tensors as plain data (names, shapes, f32 values),
//!   their difference and the checks on them;
//! - [`shards`]: an update's tensors as safetensors shards of bounded size,
//!   dense or sparse chunks, and their decoding under the manifest's shapes;
//! - [`protocol`]: the documents (update manifest, round task, global model
//!   record, the privacy filters as recorded);
//! - [`signed`]: canonical JSON and the Ed25519 signature over a
//!   document's exact bytes.
//!
//! Everything here is a pure function over bytes and tensors (no network,
//! files or clock), and depends on no other part of oxbox but its signing
//! keys: the fuzz targets (`host/fuzz`) build it without the model, the
//! plugin runtime or the servers.

pub mod protocol;
pub mod shards;
pub mod signed;
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
