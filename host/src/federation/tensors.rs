//! Weights and updates as plain `f32` data, by name: what filters,
//! shards and averaging work on, independent of candle and of a device.

use std::collections::BTreeMap;

use super::FederationError;

/// One tensor: its shape and its values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor32 {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub values: Vec<f32>,
}

/// Named tensors, in name order: a model's weights, or an update (Δ).
pub type Tensors = BTreeMap<String, Tensor32>;

/// Reads a safetensors file's bytes (F32 tensors only).
///
/// # Errors
/// [`FederationError::Malformed`] naming `what`.
pub fn from_safetensors(bytes: &[u8], what: &str) -> Result<Tensors, FederationError> {
    let _ = (bytes, what);
    todo!("federation maths")
}

/// Writes tensors as one safetensors file (F32).
///
/// # Errors
/// [`FederationError::Malformed`] when a shape and its values disagree.
pub fn to_safetensors(tensors: &Tensors) -> Result<Vec<u8>, FederationError> {
    let _ = tensors;
    todo!("federation maths")
}

/// Δ = `local` − `global`, tensor by tensor.
///
/// # Errors
/// [`FederationError::Mismatch`] when names or shapes differ.
pub fn difference(local: &Tensors, global: &Tensors) -> Result<Tensors, FederationError> {
    let _ = (local, global);
    todo!("federation maths")
}

/// Converts candle tensors (any device) to [`Tensors`].
///
/// # Errors
/// On tensor errors (a non-F32 tensor is converted).
pub fn from_candle(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<Tensors, candle_core::Error> {
    let _ = tensors;
    todo!("federation maths")
}

/// Converts [`Tensors`] to candle tensors on `device`.
///
/// # Errors
/// On tensor errors.
pub fn to_candle(
    tensors: &Tensors,
    device: &candle_core::Device,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>, candle_core::Error> {
    let _ = (tensors, device);
    todo!("federation maths")
}
