//! Weights and updates as plain `f32` data, by name: what filters,
//! shards and averaging work on, independent of candle and of a device.

use std::collections::BTreeMap;

use crate::FederationError;

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

/// A tensor as safetensors sees it: F32 values as little-endian bytes.
struct F32View {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for F32View {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `values` as little-endian bytes.
pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    // Into a buffer of the final size, four bytes at a time: the compiler
    // makes this a straight copy on little-endian machines.
    let mut bytes = vec![0u8; values.len() * 4];
    for (out, v) in bytes.chunks_exact_mut(4).zip(values) {
        out.copy_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Little-endian bytes as `f32` values (`bytes.len()` a multiple of 4).
pub(crate) fn f32_values(bytes: &[u8]) -> Vec<f32> {
    let mut values = vec![0f32; bytes.len() / 4];
    for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    values
}

impl Tensor32 {
    /// Number of values the shape calls for (`None` on overflow).
    pub fn expected_len(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Whether the shape and the number of values agree.
    pub fn is_consistent(&self) -> bool {
        self.expected_len() == Some(self.values.len())
    }
}

/// Reads a safetensors file's bytes (F32 tensors only).
///
/// # Errors
/// [`FederationError::Malformed`] naming `what`.
pub fn from_safetensors(bytes: &[u8], what: &str) -> Result<Tensors, FederationError> {
    let malformed = |reason: String| FederationError::Malformed {
        what: what.to_string(),
        reason,
    };
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| malformed(format!("not a safetensors file: {e}")))?;
    let mut tensors = Tensors::new();
    for (name, view) in file.iter() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(malformed(format!(
                "tensor {name} is {:?}, expected F32",
                view.dtype()
            )));
        }
        tensors.insert(
            name.to_string(),
            Tensor32 {
                shape: view.shape().to_vec(),
                values: f32_values(view.data()),
            },
        );
    }
    Ok(tensors)
}

/// Writes tensors as one safetensors file (F32).
///
/// # Errors
/// [`FederationError::Malformed`] when a shape and its values disagree.
pub fn to_safetensors(tensors: &Tensors) -> Result<Vec<u8>, FederationError> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !tensor.is_consistent() {
            return Err(FederationError::Malformed {
                what: format!("tensor {name}"),
                reason: format!(
                    "shape {:?} but {} values",
                    tensor.shape,
                    tensor.values.len()
                ),
            });
        }
        views.push((
            name.as_str(),
            F32View {
                shape: tensor.shape.clone(),
                bytes: f32_bytes(&tensor.values),
            },
        ));
    }
    safetensors::serialize(views, None).map_err(|e| FederationError::Malformed {
        what: "tensors".to_string(),
        reason: e.to_string(),
    })
}

/// Puts a site's `kept` tensors (what its filters kept at home, FedBN's
/// batch-norm statistics) in place of the same-named, same-shaped tensors
/// of `base` (a global model's weights); a kept tensor the base lacks, or
/// of another shape, is passed over. Returns how many were put in place.
pub fn overlay(base: &mut Tensors, kept: Tensors) -> usize {
    let mut replaced = 0;
    for (name, tensor) in kept {
        if let Some(slot) = base.get_mut(&name)
            && slot.shape == tensor.shape
        {
            *slot = tensor;
            replaced += 1;
        }
    }
    replaced
}

/// Δ = `local` − `global`, tensor by tensor.
///
/// # Errors
/// [`FederationError::Mismatch`] when names or shapes differ.
pub fn difference(local: &Tensors, global: &Tensors) -> Result<Tensors, FederationError> {
    if let Some(name) = global.keys().find(|n| !local.contains_key(*n)) {
        return Err(FederationError::Mismatch {
            name: name.clone(),
            reason: "in the global model but not in the local one".to_string(),
        });
    }
    let mut delta = Tensors::new();
    for (name, l) in local {
        let g = global.get(name).ok_or_else(|| FederationError::Mismatch {
            name: name.clone(),
            reason: "in the local model but not in the global one".to_string(),
        })?;
        if l.shape != g.shape || !l.is_consistent() || !g.is_consistent() {
            return Err(FederationError::Mismatch {
                name: name.clone(),
                reason: format!("local shape {:?}, global shape {:?}", l.shape, g.shape),
            });
        }
        delta.insert(
            name.clone(),
            Tensor32 {
                shape: l.shape.clone(),
                values: l.values.iter().zip(&g.values).map(|(a, b)| a - b).collect(),
            },
        );
    }
    Ok(delta)
}

/// Whether every value is finite (one pass without early exit, which the
/// compiler vectorises).
pub fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tensors {
        let mut t = Tensors::new();
        t.insert(
            "head.weight".into(),
            Tensor32 {
                shape: vec![2, 3],
                values: vec![1.0, -2.5, 0.0, 3.25, f32::MIN_POSITIVE, -0.0],
            },
        );
        t.insert(
            "emr.bias".into(),
            Tensor32 {
                shape: vec![1],
                values: vec![7.0],
            },
        );
        t.insert(
            "empty".into(),
            Tensor32 {
                shape: vec![0],
                values: vec![],
            },
        );
        t
    }

    #[test]
    fn overlay_replaces_only_same_named_same_shaped_tensors() {
        let mut base = sample();
        let mut kept = Tensors::new();
        let own = Tensor32 {
            shape: vec![1],
            values: vec![-1.0],
        };
        kept.insert("emr.bias".into(), own.clone());
        kept.insert(
            "head.weight".into(),
            Tensor32 {
                shape: vec![6],
                values: vec![0.0; 6],
            },
        );
        kept.insert("not.in.base".into(), own.clone());
        assert_eq!(overlay(&mut base, kept), 1);
        assert_eq!(base["emr.bias"], own);
        assert_eq!(base["head.weight"], sample()["head.weight"]);
        assert!(!base.contains_key("not.in.base"));
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let t = sample();
        let bytes = to_safetensors(&t).expect("encode");
        let back = from_safetensors(&bytes, "weights").expect("decode");
        assert_eq!(back, t);
        // Bitwise too (-0.0 stays -0.0).
        assert_eq!(back["head.weight"].values[5].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn safetensors_refuses_garbage_and_other_dtypes() {
        assert!(matches!(
            from_safetensors(b"not safetensors", "weights"),
            Err(FederationError::Malformed { what, .. }) if what == "weights"
        ));
        let bytes = safetensors::serialize(
            [(
                "x",
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &[0u8; 8])
                    .expect("view"),
            )],
            None,
        )
        .expect("serialize");
        let err = from_safetensors(&bytes, "weights").expect_err("I64 refused");
        assert!(err.to_string().contains("expected F32"), "{err}");
    }

    #[test]
    fn to_safetensors_refuses_inconsistent_shapes() {
        let mut t = sample();
        t.get_mut("emr.bias").expect("tensor").values.push(1.0);
        assert!(to_safetensors(&t).is_err());
    }

    #[test]
    fn difference_subtracts_and_checks_names_and_shapes() {
        let global = sample();
        let mut local = sample();
        local.get_mut("emr.bias").expect("tensor").values[0] = 9.5;
        let d = difference(&local, &global).expect("difference");
        assert_eq!(d["emr.bias"].values, vec![2.5]);
        assert!(d["head.weight"].values.iter().all(|v| *v == 0.0));
        let mut other = sample();
        other.get_mut("emr.bias").expect("tensor").shape = vec![1, 1];
        assert!(matches!(
            difference(&other, &global),
            Err(FederationError::Mismatch { name, .. }) if name == "emr.bias"
        ));
        let mut fewer = sample();
        fewer.remove("empty");
        assert!(difference(&fewer, &global).is_err());
        assert!(difference(&global, &fewer).is_err());
    }
}
