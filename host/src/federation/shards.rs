//! An update as safetensors shards of bounded size, and back.
//!
//! A tensor is cut into chunks that fit; a chunk is stored dense (entry
//! `NAME@OFFSET`, F32) or, when at most half its entries are non-zero (after
//! `percentile`), sparse (`NAME@OFFSET.indices`, U32 relative to OFFSET, and
//! `NAME@OFFSET.values`, F32). Shapes travel in the update manifest
//! ([`super::protocol::TensorInfo`]), not in the shards.

use super::FederationError;
use super::tensors::Tensors;

/// One encoded shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// 0-based position.
    pub index: u32,
    /// The safetensors bytes.
    pub bytes: Vec<u8>,
    /// Names of the tensors it holds chunks of, in order.
    pub tensors: Vec<String>,
}

/// A chunk's values.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkValues {
    /// Every value from the offset on.
    Dense(Vec<f32>),
    /// Non-zero values at `indices` (relative to the offset, ascending).
    Sparse {
        /// Positions, relative to the chunk's offset.
        indices: Vec<u32>,
        /// Their values.
        values: Vec<f32>,
    },
}

/// A piece of one tensor, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The tensor.
    pub tensor: String,
    /// Offset of the first value in the flattened tensor.
    pub offset: usize,
    /// Number of flattened positions the chunk covers.
    pub len: usize,
    /// Its values.
    pub values: ChunkValues,
}

/// Encodes `update` as shards of at most `max_bytes` bytes each
/// (`shard_mib` × 2²⁰; at least 64 KiB).
///
/// # Errors
/// [`FederationError::Malformed`] when a tensor's values and shape disagree.
pub fn encode(update: &Tensors, max_bytes: usize) -> Result<Vec<Shard>, FederationError> {
    let _ = (update, max_bytes);
    todo!("federation maths")
}

/// Decodes one shard's bytes into chunks, checking every entry (dtype,
/// names, sparse indices ascending and within the chunk).
///
/// # Errors
/// [`FederationError::Malformed`] naming the shard.
pub fn decode(bytes: &[u8], index: u32) -> Result<Vec<Chunk>, FederationError> {
    let _ = (bytes, index);
    todo!("federation maths")
}
