//! An update as safetensors shards of bounded size, and back.
//!
//! A tensor is cut into chunks that fit; a chunk is stored dense (entry
//! `NAME@OFFSET`, F32) or, when at most half its entries are non-zero (after
//! `percentile`), sparse (`NAME@OFFSET.indices`, U32 relative to OFFSET, and
//! `NAME@OFFSET.values`, F32; the number of positions each sparse chunk
//! covers is in the header's `__metadata__` as one entry
//! `"lengths": "NAME@OFFSET=LEN,…"`, sorted, so a shard's bytes are a
//! function of the update alone).
//! Shapes travel in the update manifest ([`crate::protocol::TensorInfo`]),
//! not in the shards.
//!
//! Decoding trusts nothing: a shard is refused (never a panic) for a
//! header over [`MAX_HEADER_BYTES`], a dtype or shape other than the ones
//! above, a name that is not `NAME@OFFSET[.indices|.values]` with a
//! canonical decimal offset, a sparse chunk without its partner or its
//! length, indices not strictly ascending or outside the chunk, chunks of
//! one tensor that overlap, or a non-finite value.

use crate::FederationError;
use crate::tensors::Tensors;

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

/// Smallest shard size [`encode`] accepts: 64 KiB.
pub const MIN_SHARD_BYTES: usize = 64 * 1024;

/// Largest safetensors header a shard may have: 1 MiB, room for thousands
/// of chunk entries; a hostile shard cannot make the decoder parse more.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// Longest tensor name a shard may carry.
pub const MAX_NAME_BYTES: usize = 512;

const INDICES_SUFFIX: &str = ".indices";
const VALUES_SUFFIX: &str = ".values";
/// Header bytes besides the entries: the length prefix, braces, the
/// `__metadata__` object with its `lengths` key and alignment padding.
const HEADER_BASE: usize = 8 + 2 + 30 + 8;
/// The `__metadata__` key of the sparse chunks' lengths.
const LENGTHS_KEY: &str = "lengths";
/// An upper bound on one entry's header bytes besides its JSON-quoted
/// name: `:{"dtype":"F32","shape":[N],"data_offsets":[A,B]},` with
/// 20-digit numbers.
const ENTRY_OVERHEAD: usize = 110;
/// An upper bound on one sparse chunk's item in `lengths` besides its
/// quoted key: `=N,` with a 20-digit N.
const LEN_OVERHEAD: usize = 25;

/// Whether `name` may be a tensor name in a shard: 1 to
/// [`MAX_NAME_BYTES`] bytes of ASCII letters, digits and `._-/:`.
pub fn valid_tensor_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
}

/// A raw safetensors entry (U32 or F32, 1-D).
struct RawView {
    dtype: safetensors::Dtype,
    shape: [usize; 1],
    bytes: Vec<u8>,
}

impl safetensors::View for RawView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
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

impl RawView {
    fn f32(values: &[f32]) -> Self {
        Self {
            dtype: safetensors::Dtype::F32,
            shape: [values.len()],
            bytes: crate::tensors::f32_bytes(values),
        }
    }

    fn u32(values: &[u32]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Self {
            dtype: safetensors::Dtype::U32,
            shape: [values.len()],
            bytes,
        }
    }
}

/// A shard being filled.
#[derive(Default)]
struct Builder {
    entries: Vec<(String, RawView)>,
    lengths: std::collections::BTreeMap<String, usize>,
    tensors: Vec<String>,
    /// Upper bound on the shard's size so far.
    size: usize,
}

impl Builder {
    fn new() -> Self {
        Self {
            size: HEADER_BASE,
            ..Self::default()
        }
    }

    fn note_tensor(&mut self, name: &str) {
        if self.tensors.last().map(String::as_str) != Some(name) {
            self.tensors.push(name.to_string());
        }
    }

    fn finish(self, index: u32, max_bytes: usize) -> Result<Shard, FederationError> {
        let lengths = (!self.lengths.is_empty()).then(|| {
            let joined: Vec<String> = self
                .lengths
                .iter()
                .map(|(key, len)| format!("{key}={len}"))
                .collect();
            std::collections::HashMap::from([(LENGTHS_KEY.to_string(), joined.join(","))])
        });
        let bytes = safetensors::serialize(self.entries, lengths).map_err(|e| {
            FederationError::Malformed {
                what: format!("shard {index}"),
                reason: e.to_string(),
            }
        })?;
        if bytes.len() > max_bytes || bytes.len() > self.size {
            // The size bound is an invariant of the estimate above.
            return Err(FederationError::Malformed {
                what: format!("shard {index}"),
                reason: format!(
                    "{} bytes exceed the bound {} (limit {max_bytes})",
                    bytes.len(),
                    self.size
                ),
            });
        }
        Ok(Shard {
            index,
            bytes,
            tensors: self.tensors,
        })
    }
}

/// JSON-quoted length of a header key.
fn quoted_len(key: &str) -> usize {
    // Keys are valid tensor names plus `@digits` and a suffix: no escapes.
    key.len() + 2
}

/// Encodes `update` as shards of at most `max_bytes` bytes each
/// (`shard_mib` × 2²⁰; at least 64 KiB).
///
/// Tensors go in name order; one bigger than the room left is split into
/// chunks across shards. A chunk is stored sparse when that is smaller
/// (at most half its entries non-zero), else dense.
///
/// # Errors
/// [`FederationError::Malformed`] when a tensor's values and shape
/// disagree, a value is not finite, a name is not a valid tensor name
/// ([`valid_tensor_name`]) or `max_bytes` is under [`MIN_SHARD_BYTES`].
pub fn encode(update: &Tensors, max_bytes: usize) -> Result<Vec<Shard>, FederationError> {
    if max_bytes < MIN_SHARD_BYTES {
        return Err(FederationError::Malformed {
            what: "shard size".to_string(),
            reason: format!("{max_bytes} bytes, at least {MIN_SHARD_BYTES} needed"),
        });
    }
    // The header stays within what decode accepts.
    let max_header = MAX_HEADER_BYTES.min(max_bytes);
    let mut shards = Vec::new();
    let mut builder = Builder::new();
    let mut header = HEADER_BASE;
    for (name, tensor) in update {
        let malformed = |reason: String| FederationError::Malformed {
            what: format!("tensor {name}"),
            reason,
        };
        if !valid_tensor_name(name) {
            return Err(malformed("not a valid tensor name".to_string()));
        }
        if !tensor.is_consistent() {
            return Err(malformed(format!(
                "shape {:?} but {} values",
                tensor.shape,
                tensor.values.len()
            )));
        }
        if !crate::tensors::all_finite(&tensor.values) {
            return Err(malformed("holds a non-finite value".to_string()));
        }
        let values = &tensor.values;
        let mut offset = 0usize;
        loop {
            let key = format!("{name}@{offset}");
            let dense_header = quoted_len(&key) + ENTRY_OVERHEAD;
            let sparse_header = quoted_len(&format!("{key}{INDICES_SUFFIX}"))
                + quoted_len(&format!("{key}{VALUES_SUFFIX}"))
                + 2 * ENTRY_OVERHEAD
                + quoted_len(&key)
                + LEN_OVERHEAD;
            let remaining = values.len() - offset;
            let room = max_bytes.saturating_sub(builder.size);
            let header_room = max_header.saturating_sub(header);
            // Dense: as many values as fit.
            let dense_len = if dense_header <= header_room {
                (room.saturating_sub(dense_header) / 4).min(remaining)
            } else {
                0
            };
            // Sparse: as many positions as the non-zero values that fit cover.
            let (sparse_len, sparse_nonzero) = if sparse_header <= header_room {
                let budget = room.saturating_sub(sparse_header) / 8;
                let (len, nonzero) = sparse_prefix(&values[offset..], budget);
                if room < sparse_header {
                    (0, 0)
                } else {
                    (len, nonzero)
                }
            } else {
                (0, 0)
            };
            let use_sparse = sparse_len > dense_len
                || (sparse_len == dense_len && sparse_len > 0 && 2 * sparse_nonzero <= sparse_len);
            let fits_empty = remaining == 0 && dense_header <= header_room && dense_header <= room;
            if !use_sparse && dense_len == 0 && !fits_empty {
                // Nothing of it fits here: the next shard.
                if builder.entries.is_empty() {
                    return Err(malformed(format!(
                        "does not fit a shard of {max_bytes} bytes"
                    )));
                }
                let full = std::mem::replace(&mut builder, Builder::new());
                shards.push(full.finish(shards.len() as u32, max_bytes)?);
                header = HEADER_BASE;
                continue;
            }
            builder.note_tensor(name);
            let len = if use_sparse {
                let chunk = &values[offset..offset + sparse_len];
                // Compacted without branches: each value is written at the
                // next free place, which advances only past a non-zero one.
                let mut indices = vec![0u32; sparse_nonzero + 1];
                let mut kept = vec![0f32; sparse_nonzero + 1];
                let mut next = 0usize;
                for (i, v) in chunk.iter().enumerate() {
                    indices[next] = i as u32;
                    kept[next] = *v;
                    next += usize::from(*v != 0.0);
                }
                indices.truncate(next);
                kept.truncate(next);
                builder
                    .entries
                    .push((format!("{key}{INDICES_SUFFIX}"), RawView::u32(&indices)));
                builder
                    .entries
                    .push((format!("{key}{VALUES_SUFFIX}"), RawView::f32(&kept)));
                builder.lengths.insert(key, sparse_len);
                builder.size += sparse_header + 8 * kept.len();
                header += sparse_header;
                sparse_len
            } else {
                let chunk = &values[offset..offset + dense_len];
                builder.entries.push((key, RawView::f32(chunk)));
                builder.size += dense_header + 4 * dense_len;
                header += dense_header;
                dense_len
            };
            offset += len;
            if offset == values.len() {
                break;
            }
        }
    }
    if !builder.entries.is_empty() || shards.is_empty() {
        shards.push(builder.finish(shards.len() as u32, max_bytes)?);
    }
    Ok(shards)
}

/// The longest prefix of `values` holding at most `budget` non-zero
/// values (zeros after the last of them included), and how many it holds.
/// Counted block by block (a count the compiler vectorises); only the
/// block where the budget runs out is walked value by value.
fn sparse_prefix(values: &[f32], budget: usize) -> (usize, usize) {
    const BLOCK: usize = 4096;
    let mut nonzero = 0usize;
    let mut start = 0usize;
    for block in values.chunks(BLOCK) {
        let n = block.iter().filter(|v| **v != 0.0).count();
        if nonzero + n > budget {
            for (i, v) in block.iter().enumerate() {
                if *v != 0.0 {
                    if nonzero == budget {
                        return (start + i, nonzero);
                    }
                    nonzero += 1;
                }
            }
        }
        nonzero += n;
        start += block.len();
    }
    (values.len(), nonzero)
}

/// Parses a canonical decimal (no sign, no leading zero but for `0`).
fn parse_offset(text: &str) -> Option<usize> {
    if text.is_empty()
        || text.len() > 19
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return None;
    }
    text.parse().ok()
}

/// Parses `KEY=LEN,…` with keys strictly ascending.
fn parse_lengths(text: &str) -> Option<std::collections::BTreeMap<String, usize>> {
    let mut lengths = std::collections::BTreeMap::new();
    let mut previous: Option<&str> = None;
    for item in text.split(',') {
        let (key, len) = item.split_once('=')?;
        if previous.is_some_and(|p| p >= key) {
            return None;
        }
        previous = Some(key);
        lengths.insert(key.to_string(), parse_offset(len)?);
    }
    Some(lengths)
}

/// What a header key names.
enum Part {
    Dense,
    Indices,
    Values,
}

/// Splits `NAME@OFFSET[.indices|.values]`.
fn parse_key(key: &str) -> Option<(&str, usize, Part)> {
    let (name, rest) = key.rsplit_once('@')?;
    let (offset, part) = if let Some(o) = rest.strip_suffix(INDICES_SUFFIX) {
        (o, Part::Indices)
    } else if let Some(o) = rest.strip_suffix(VALUES_SUFFIX) {
        (o, Part::Values)
    } else {
        (rest, Part::Dense)
    };
    if !valid_tensor_name(name) {
        return None;
    }
    Some((name, parse_offset(offset)?, part))
}

/// Decodes one shard's bytes into chunks, checking every entry (dtype,
/// names, sparse indices ascending and within the chunk).
///
/// The chunks come in (tensor, offset) order.
///
/// # Errors
/// [`FederationError::Malformed`] naming the shard.
pub fn decode(bytes: &[u8], index: u32) -> Result<Vec<Chunk>, FederationError> {
    let malformed = |reason: String| FederationError::Malformed {
        what: format!("shard {index}"),
        reason,
    };
    header_size(bytes, index)?;
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| malformed(format!("not a safetensors file: {e}")))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| malformed(format!("not a safetensors file: {e}")))?;
    let lengths = match metadata.metadata() {
        None => std::collections::BTreeMap::new(),
        Some(map) => {
            if map.len() != 1 {
                return Err(malformed(format!(
                    "metadata has {} entries, expected only {LENGTHS_KEY:?}",
                    map.len()
                )));
            }
            let text = map
                .get(LENGTHS_KEY)
                .ok_or_else(|| malformed(format!("metadata without {LENGTHS_KEY:?}")))?;
            parse_lengths(text).ok_or_else(|| malformed("malformed sparse lengths".to_string()))?
        }
    };

    struct Sparse<'a> {
        indices: Option<safetensors::tensor::TensorView<'a>>,
        values: Option<safetensors::tensor::TensorView<'a>>,
    }
    let mut chunks = Vec::new();
    let mut sparse: std::collections::BTreeMap<(String, usize), Sparse<'_>> =
        std::collections::BTreeMap::new();
    for (key, view) in file.iter() {
        let (name, offset, part) =
            parse_key(key).ok_or_else(|| malformed(format!("entry {key:?}: not NAME@OFFSET")))?;
        if view.shape().len() != 1 {
            return Err(malformed(format!(
                "entry {key}: shape {:?}, expected one dimension",
                view.shape()
            )));
        }
        let expected = match part {
            Part::Indices => safetensors::Dtype::U32,
            Part::Dense | Part::Values => safetensors::Dtype::F32,
        };
        if view.dtype() != expected {
            return Err(malformed(format!(
                "entry {key}: {:?}, expected {expected:?}",
                view.dtype()
            )));
        }
        match part {
            Part::Dense => {
                if lengths.contains_key(key) {
                    return Err(malformed(format!("entry {key}: dense but has a length")));
                }
                let values = crate::tensors::f32_values(view.data());
                chunks.push(Chunk {
                    tensor: name.to_string(),
                    offset,
                    len: values.len(),
                    values: ChunkValues::Dense(values),
                });
            }
            Part::Indices | Part::Values => {
                let slot = sparse.entry((name.to_string(), offset)).or_insert(Sparse {
                    indices: None,
                    values: None,
                });
                match part {
                    Part::Indices => slot.indices = Some(view),
                    _ => slot.values = Some(view),
                }
            }
        }
    }
    let sparse_keys: std::collections::BTreeSet<String> = sparse
        .keys()
        .map(|(name, offset)| format!("{name}@{offset}"))
        .collect();
    if let Some(stray) = lengths.keys().find(|k| !sparse_keys.contains(*k)) {
        return Err(malformed(format!(
            "metadata {stray:?} names no sparse chunk"
        )));
    }
    for ((name, offset), parts) in sparse {
        let key = format!("{name}@{offset}");
        let (Some(indices), Some(values)) = (parts.indices, parts.values) else {
            return Err(malformed(format!(
                "sparse chunk {key} lacks its indices or its values"
            )));
        };
        let len = lengths
            .get(&key)
            .copied()
            .ok_or_else(|| malformed(format!("sparse chunk {key} has no valid length")))?;
        if indices.shape() != values.shape() {
            return Err(malformed(format!(
                "sparse chunk {key}: {} indices but {} values",
                indices.shape()[0],
                values.shape()[0]
            )));
        }
        let indices: Vec<u32> = indices
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let ascending = indices.windows(2).all(|w| w[0] < w[1]);
        let within = indices.last().is_none_or(|last| (*last as usize) < len);
        if !ascending || !within {
            return Err(malformed(format!(
                "sparse chunk {key}: indices not strictly ascending within its {len} positions"
            )));
        }
        chunks.push(Chunk {
            tensor: name,
            offset,
            len,
            values: ChunkValues::Sparse {
                indices,
                values: crate::tensors::f32_values(values.data()),
            },
        });
    }
    chunks.sort_by(|a, b| (&a.tensor, a.offset).cmp(&(&b.tensor, b.offset)));
    for chunk in &chunks {
        let finite = match &chunk.values {
            ChunkValues::Dense(v) | ChunkValues::Sparse { values: v, .. } => {
                v.iter().all(|x| x.is_finite())
            }
        };
        if !finite {
            return Err(malformed(format!(
                "chunk {}@{} holds a non-finite value",
                chunk.tensor, chunk.offset
            )));
        }
        if chunk.offset.checked_add(chunk.len).is_none() {
            return Err(malformed(format!(
                "chunk {}@{} ends past the largest offset",
                chunk.tensor, chunk.offset
            )));
        }
    }
    for pair in chunks.windows(2) {
        if pair[0].tensor == pair[1].tensor && pair[0].offset + pair[0].len > pair[1].offset {
            return Err(malformed(format!(
                "chunks {}@{} and @{} overlap",
                pair[0].tensor, pair[0].offset, pair[1].offset
            )));
        }
    }
    Ok(chunks)
}

/// The positions of one tensor a chunk covers (what a shard's header
/// alone says, without its values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRange {
    /// The tensor.
    pub tensor: String,
    /// Offset of the first position in the flattened tensor.
    pub offset: usize,
    /// Number of positions.
    pub len: usize,
}

impl Chunk {
    /// The positions this chunk covers.
    pub fn range(&self) -> ChunkRange {
        ChunkRange {
            tensor: self.tensor.clone(),
            offset: self.offset,
            len: self.len,
        }
    }
}

/// The size of a shard's header, its 8-byte length prefix included, from
/// that prefix (`prefix` holds at least the first 8 bytes).
///
/// # Errors
/// [`FederationError::Malformed`] for fewer than 8 bytes or a header over
/// [`MAX_HEADER_BYTES`].
pub fn header_size(prefix: &[u8], index: u32) -> Result<usize, FederationError> {
    let malformed = |reason: String| FederationError::Malformed {
        what: format!("shard {index}"),
        reason,
    };
    let prefix: [u8; 8] = prefix
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| malformed("shorter than a safetensors header".to_string()))?;
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_BYTES as u64 {
        return Err(malformed(format!(
            "header of {len} bytes, at most {MAX_HEADER_BYTES}"
        )));
    }
    Ok(8 + len as usize)
}

/// The ranges of a shard's chunks, in (tensor, offset) order, read from its
/// header alone (the first [`header_size`] bytes; the values are not
/// read): for a shard [`decode`] has already accepted, as the
/// aggregator's stored ones, whose coverage is checked without reading
/// their values again.
///
/// # Errors
/// [`FederationError::Malformed`] for a header that is not a shard's.
pub fn ranges(header: &[u8], index: u32) -> Result<Vec<ChunkRange>, FederationError> {
    let malformed = |reason: String| FederationError::Malformed {
        what: format!("shard {index}"),
        reason,
    };
    let size = header_size(header, index)?;
    let json = header
        .get(8..size)
        .ok_or_else(|| malformed("header cut short".to_string()))?;
    let entries: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| malformed(format!("header: {e}")))?;
    let lengths = match entries.get("__metadata__") {
        None => std::collections::BTreeMap::new(),
        Some(metadata) => metadata
            .get(LENGTHS_KEY)
            .and_then(serde_json::Value::as_str)
            .and_then(parse_lengths)
            .ok_or_else(|| malformed("malformed sparse lengths".to_string()))?,
    };
    let mut out = Vec::new();
    for (key, entry) in &entries {
        if key == "__metadata__" {
            continue;
        }
        let (name, offset, part) =
            parse_key(key).ok_or_else(|| malformed(format!("entry {key:?}: not NAME@OFFSET")))?;
        let len = match part {
            Part::Values => continue,
            Part::Indices => lengths.get(&format!("{name}@{offset}")).copied(),
            Part::Dense => entry
                .get("shape")
                .and_then(|s| s.get(0))
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| usize::try_from(n).ok()),
        }
        .ok_or_else(|| malformed(format!("entry {key}: no length")))?;
        out.push(ChunkRange {
            tensor: name.to_string(),
            offset,
            len,
        });
    }
    out.sort_by(|a, b| (&a.tensor, a.offset).cmp(&(&b.tensor, b.offset)));
    Ok(out)
}

/// Reassembles whole tensors from every shard's chunks, given each
/// tensor's shape (the manifest's [`crate::protocol::TensorInfo`]):
/// positions no chunk covers are refused.
///
/// # Errors
/// [`FederationError::Mismatch`] for a chunk of an undeclared tensor, one
/// outside its tensor, or a tensor not fully covered.
pub fn assemble(
    shapes: &[crate::protocol::TensorInfo],
    chunks: impl IntoIterator<Item = Chunk>,
) -> Result<Tensors, FederationError> {
    let mut out = Tensors::new();
    let mut covered: std::collections::BTreeMap<String, Vec<(usize, usize)>> = Default::default();
    for info in shapes {
        let t = crate::tensors::Tensor32 {
            shape: info.shape.clone(),
            values: Vec::new(),
        };
        let len = t.expected_len().ok_or_else(|| FederationError::Mismatch {
            name: info.name.clone(),
            reason: "shape overflows".to_string(),
        })?;
        out.insert(
            info.name.clone(),
            crate::tensors::Tensor32 {
                shape: info.shape.clone(),
                values: vec![0.0; len],
            },
        );
        covered.insert(info.name.clone(), Vec::new());
    }
    for chunk in chunks {
        let mismatch = |reason: String| FederationError::Mismatch {
            name: chunk.tensor.clone(),
            reason,
        };
        let tensor = out
            .get_mut(&chunk.tensor)
            .ok_or_else(|| mismatch("not declared".to_string()))?;
        let end = chunk
            .offset
            .checked_add(chunk.len)
            .filter(|end| *end <= tensor.values.len())
            .ok_or_else(|| mismatch(format!("chunk @{} outside the tensor", chunk.offset)))?;
        let target = &mut tensor.values[chunk.offset..end];
        match &chunk.values {
            ChunkValues::Dense(v) if v.len() == chunk.len => target.copy_from_slice(v),
            ChunkValues::Sparse { indices, values }
                if indices.len() == values.len()
                    && indices.iter().all(|i| (*i as usize) < chunk.len) =>
            {
                for (i, v) in indices.iter().zip(values) {
                    target[*i as usize] = *v;
                }
            }
            _ => return Err(mismatch(format!("chunk @{} inconsistent", chunk.offset))),
        }
        if let Some(ranges) = covered.get_mut(&chunk.tensor) {
            ranges.push((chunk.offset, end));
        }
    }
    for (name, tensor) in &out {
        let mut ranges = covered.remove(name).unwrap_or_default();
        ranges.sort_unstable();
        let mut next = 0;
        for (start, end) in ranges {
            if start != next {
                return Err(FederationError::Mismatch {
                    name: name.clone(),
                    reason: format!("chunks overlap or leave a gap at {}", start.min(next)),
                });
            }
            next = end;
        }
        if next != tensor.values.len() {
            return Err(FederationError::Mismatch {
                name: name.clone(),
                reason: format!("chunks cover {next} of {} values", tensor.values.len()),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorInfo;
    use crate::tensors::Tensor32;
    use oxbox_rng::Pcg;

    fn infos(update: &Tensors) -> Vec<TensorInfo> {
        update
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    }

    fn round_trip(update: &Tensors, max_bytes: usize) -> Vec<Shard> {
        let shards = encode(update, max_bytes).expect("encode");
        let mut chunks = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            assert_eq!(shard.index as usize, i);
            assert!(
                shard.bytes.len() <= max_bytes,
                "shard {i}: {} > {max_bytes}",
                shard.bytes.len()
            );
            let decoded = decode(&shard.bytes, shard.index).expect("decode");
            let mut names: Vec<String> = decoded.iter().map(|c| c.tensor.clone()).collect();
            names.dedup();
            assert_eq!(names, shard.tensors, "shard {i} lists its tensors in order");
            chunks.extend(decoded);
        }
        let back = assemble(&infos(update), chunks).expect("assemble");
        assert_eq!(&back, update);
        shards
    }

    /// A random update: some dense tensors, some sparse, some empty.
    fn random_update(rng: &mut Pcg) -> Tensors {
        let mut update = Tensors::new();
        for t in 0..1 + rng.below(6) {
            let dims = 1 + rng.below(3);
            let shape: Vec<usize> = (0..dims).map(|_| rng.below(90)).collect();
            let n: usize = shape.iter().product();
            let density = [0.0, 0.05, 0.3, 0.5, 0.51, 1.0][rng.below(6)];
            let values = (0..n)
                .map(|_| {
                    if rng.chance(density) {
                        rng.gauss(0.0, 1.0) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            update.insert(
                format!("layer{t}.part_{}", rng.below(4)),
                Tensor32 { shape, values },
            );
        }
        update
    }

    #[test]
    fn the_sparse_prefix_is_the_value_by_value_one() {
        fn naive(values: &[f32], budget: usize) -> (usize, usize) {
            let mut nonzero = 0;
            for (i, v) in values.iter().enumerate() {
                if *v != 0.0 {
                    if nonzero == budget {
                        return (i, nonzero);
                    }
                    nonzero += 1;
                }
            }
            (values.len(), nonzero)
        }
        let mut rng = Pcg::new(8, 9);
        for _ in 0..200 {
            let n = rng.below(20_000);
            let density = [0.0, 0.01, 0.1, 0.5, 1.0][rng.below(5)];
            let values: Vec<f32> = (0..n)
                .map(|_| if rng.chance(density) { 1.0 } else { 0.0 })
                .collect();
            let budget = rng.below(n + 2);
            assert_eq!(sparse_prefix(&values, budget), naive(&values, budget));
        }
    }

    #[test]
    fn ranges_from_the_header_alone_are_the_decoded_chunks_ranges() {
        let mut rng = Pcg::new(5, 6);
        for _ in 0..40 {
            let update = random_update(&mut rng);
            for shard in encode(&update, MIN_SHARD_BYTES).expect("encode") {
                let want: Vec<ChunkRange> = decode(&shard.bytes, shard.index)
                    .expect("decode")
                    .iter()
                    .map(Chunk::range)
                    .collect();
                let size = header_size(&shard.bytes, shard.index).expect("header size");
                assert!(size <= shard.bytes.len());
                let got = ranges(&shard.bytes[..size], shard.index).expect("ranges");
                assert_eq!(got, want);
            }
        }
        assert!(header_size(&[1, 2, 3], 0).is_err());
        assert!(header_size(&u64::MAX.to_le_bytes(), 0).is_err());
        assert!(ranges(&[2, 0, 0, 0, 0, 0, 0, 0, b'{'], 0).is_err());
    }

    #[test]
    fn random_updates_round_trip_within_the_shard_size() {
        let mut rng = Pcg::new(12, 34);
        for _ in 0..150 {
            let update = random_update(&mut rng);
            let max_bytes = MIN_SHARD_BYTES + rng.below(40_000);
            round_trip(&update, max_bytes);
        }
    }

    #[test]
    fn a_tensor_bigger_than_a_shard_is_split_across_shards() {
        let n = 100_000; // 400 KB dense
        let mut update = Tensors::new();
        update.insert(
            "image.layer4.conv.weight".into(),
            Tensor32 {
                shape: vec![n],
                values: (0..n).map(|i| i as f32 + 1.0).collect(),
            },
        );
        update.insert(
            "head.bias".into(),
            Tensor32 {
                shape: vec![2],
                values: vec![1.0, 2.0],
            },
        );
        let shards = round_trip(&update, MIN_SHARD_BYTES);
        assert!(shards.len() >= 7, "{} shards", shards.len());
        let carrying = shards
            .iter()
            .filter(|s| s.tensors.iter().any(|t| t == "image.layer4.conv.weight"))
            .count();
        assert!(carrying >= 7);
        // Shards are full but for the last.
        for s in &shards[..shards.len() - 1] {
            assert!(s.bytes.len() > MIN_SHARD_BYTES - 512, "{}", s.bytes.len());
        }
        // Deterministic bytes.
        assert_eq!(encode(&update, MIN_SHARD_BYTES).expect("encode"), shards);
    }

    #[test]
    fn sparse_updates_are_stored_sparse_and_smaller() {
        let n = 50_000;
        let mut values = vec![0.0f32; n];
        for i in (0..n).step_by(10) {
            values[i] = 0.5 + i as f32;
        }
        let mut update = Tensors::new();
        update.insert(
            "emr.weight".into(),
            Tensor32 {
                shape: vec![n],
                values,
            },
        );
        let shards = round_trip(&update, 8 << 20);
        assert_eq!(shards.len(), 1);
        // 10 % non-zero: 8 bytes each, about a fifth of dense.
        assert!(
            shards[0].bytes.len() < n * 4 / 4,
            "{}",
            shards[0].bytes.len()
        );
        let chunks = decode(&shards[0].bytes, 0).expect("decode");
        assert!(matches!(
            &chunks[0].values,
            ChunkValues::Sparse { indices, .. } if indices.len() == n / 10
        ));
        assert_eq!(chunks[0].len, n);
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let mut update = Tensors::new();
        update.insert(
            "a@b".into(),
            Tensor32 {
                shape: vec![1],
                values: vec![1.0],
            },
        );
        assert!(encode(&update, MIN_SHARD_BYTES).is_err());
        let mut update = Tensors::new();
        update.insert(
            "a".into(),
            Tensor32 {
                shape: vec![1],
                values: vec![f32::NAN],
            },
        );
        assert!(encode(&update, MIN_SHARD_BYTES).is_err());
        let mut update = Tensors::new();
        update.insert(
            "a".into(),
            Tensor32 {
                shape: vec![2],
                values: vec![1.0],
            },
        );
        assert!(encode(&update, MIN_SHARD_BYTES).is_err());
        assert!(encode(&Tensors::new(), 1000).is_err());
    }

    fn raw_shard(
        entries: Vec<(&str, safetensors::Dtype, Vec<u8>, Vec<usize>)>,
        lengths: Option<&str>,
    ) -> Vec<u8> {
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = entries
            .iter()
            .map(|(name, dtype, bytes, shape)| {
                (
                    *name,
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                        .expect("view"),
                )
            })
            .collect();
        let meta = lengths
            .map(|l| std::collections::HashMap::from([(LENGTHS_KEY.to_string(), l.to_string())]));
        safetensors::serialize(views, meta).expect("serialize")
    }

    fn u32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn decode_refuses_hostile_shards() {
        use safetensors::Dtype::{F32, F64, U32};
        let good = raw_shard(
            vec![
                ("t@0", F32, f32s(&[1.0, 2.0]), vec![2]),
                ("t@2.indices", U32, u32s(&[0, 3]), vec![2]),
                ("t@2.values", F32, f32s(&[5.0, 6.0]), vec![2]),
            ],
            Some("t@2=4"),
        );
        let chunks = decode(&good, 0).expect("the well-formed shard decodes");
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].len, 4);

        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "wrong dtype",
                raw_shard(vec![("t@0", F64, vec![0; 8], vec![1])], None),
            ),
            (
                "indices as F32",
                raw_shard(
                    vec![
                        ("t@0.indices", F32, f32s(&[0.0]), vec![1]),
                        ("t@0.values", F32, f32s(&[1.0]), vec![1]),
                    ],
                    Some("t@0=1"),
                ),
            ),
            (
                "no offset",
                raw_shard(vec![("t", F32, f32s(&[1.0]), vec![1])], None),
            ),
            (
                "leading zero",
                raw_shard(vec![("t@01", F32, f32s(&[1.0]), vec![1])], None),
            ),
            (
                "sign",
                raw_shard(vec![("t@+1", F32, f32s(&[1.0]), vec![1])], None),
            ),
            (
                "bad name",
                raw_shard(vec![("t x@0", F32, f32s(&[1.0]), vec![1])], None),
            ),
            (
                "empty name",
                raw_shard(vec![("@0", F32, f32s(&[1.0]), vec![1])], None),
            ),
            (
                "two dims",
                raw_shard(vec![("t@0", F32, f32s(&[1.0; 4]), vec![2, 2])], None),
            ),
            (
                "NaN",
                raw_shard(vec![("t@0", F32, f32s(&[f32::NAN]), vec![1])], None),
            ),
            (
                "overlap",
                raw_shard(
                    vec![
                        ("t@0", F32, f32s(&[1.0, 2.0]), vec![2]),
                        ("t@1", F32, f32s(&[1.0]), vec![1]),
                    ],
                    None,
                ),
            ),
            (
                "index out of range",
                raw_shard(
                    vec![
                        ("t@0.indices", U32, u32s(&[0, 4]), vec![2]),
                        ("t@0.values", F32, f32s(&[1.0, 2.0]), vec![2]),
                    ],
                    Some("t@0=4"),
                ),
            ),
            (
                "indices not ascending",
                raw_shard(
                    vec![
                        ("t@0.indices", U32, u32s(&[2, 1]), vec![2]),
                        ("t@0.values", F32, f32s(&[1.0, 2.0]), vec![2]),
                    ],
                    Some("t@0=4"),
                ),
            ),
            (
                "repeated index",
                raw_shard(
                    vec![
                        ("t@0.indices", U32, u32s(&[1, 1]), vec![2]),
                        ("t@0.values", F32, f32s(&[1.0, 2.0]), vec![2]),
                    ],
                    Some("t@0=4"),
                ),
            ),
            (
                "values without indices",
                raw_shard(
                    vec![("t@0.values", F32, f32s(&[1.0]), vec![1])],
                    Some("t@0=4"),
                ),
            ),
            (
                "no length",
                raw_shard(
                    vec![
                        ("t@0.indices", U32, u32s(&[0]), vec![1]),
                        ("t@0.values", F32, f32s(&[1.0]), vec![1]),
                    ],
                    None,
                ),
            ),
            (
                "count mismatch",
                raw_shard(
                    vec![
                        ("t@0.indices", U32, u32s(&[0, 1]), vec![2]),
                        ("t@0.values", F32, f32s(&[1.0]), vec![1]),
                    ],
                    Some("t@0=4"),
                ),
            ),
            (
                "stray length",
                raw_shard(vec![("t@0", F32, f32s(&[1.0]), vec![1])], Some("t@0=1")),
            ),
            (
                "unsorted lengths",
                raw_shard(
                    vec![
                        ("a@0.indices", U32, u32s(&[0]), vec![1]),
                        ("a@0.values", F32, f32s(&[1.0]), vec![1]),
                        ("b@0.indices", U32, u32s(&[0]), vec![1]),
                        ("b@0.values", F32, f32s(&[1.0]), vec![1]),
                    ],
                    Some("b@0=1,a@0=1"),
                ),
            ),
            (
                "offset overflow",
                raw_shard(
                    vec![("t@18446744073709551615", F32, f32s(&[1.0]), vec![1])],
                    None,
                ),
            ),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("empty", Vec::new()),
            ("short", vec![1, 2, 3]),
            ("garbage header", {
                let mut b = 16u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{not json at all");
                b
            }),
            ("oversized header", {
                let mut b = ((MAX_HEADER_BYTES + 8) as u64).to_le_bytes().to_vec();
                b.extend(std::iter::repeat_n(b' ', MAX_HEADER_BYTES + 8));
                b
            }),
            (
                "header length past the end",
                u64::MAX.to_le_bytes().to_vec(),
            ),
        ];
        for (what, bytes) in cases {
            match decode(&bytes, 7) {
                Err(FederationError::Malformed { what: shard, .. }) => {
                    assert_eq!(shard, "shard 7", "{what}")
                }
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn decode_never_panics_on_mutated_shards() {
        let mut rng = Pcg::new(99, 1);
        for _ in 0..40 {
            let update = random_update(&mut rng);
            let shards = encode(&update, MIN_SHARD_BYTES).expect("encode");
            for shard in &shards {
                for _ in 0..25 {
                    let mut bytes = shard.bytes.clone();
                    match rng.below(3) {
                        0 => {
                            let at = rng.below(bytes.len());
                            bytes[at] ^= 1 << rng.below(8);
                        }
                        1 => bytes.truncate(rng.below(bytes.len())),
                        _ => {
                            let at = rng.below(bytes.len().min(200));
                            bytes[at] = rng.below(256) as u8;
                        }
                    }
                    // Either refused or decoded into in-bounds chunks.
                    if let Ok(chunks) = decode(&bytes, shard.index) {
                        for c in chunks {
                            if let ChunkValues::Sparse { indices, .. } = &c.values {
                                assert!(indices.iter().all(|i| (*i as usize) < c.len));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn assemble_refuses_gaps_overlaps_and_strangers() {
        let mut update = Tensors::new();
        update.insert(
            "t".into(),
            Tensor32 {
                shape: vec![4],
                values: vec![1.0; 4],
            },
        );
        let chunk = |offset, len| Chunk {
            tensor: "t".into(),
            offset,
            len,
            values: ChunkValues::Dense(vec![1.0; len]),
        };
        assert!(assemble(&infos(&update), [chunk(0, 2), chunk(2, 2)]).is_ok());
        assert!(assemble(&infos(&update), [chunk(0, 2)]).is_err());
        assert!(assemble(&infos(&update), [chunk(0, 2), chunk(1, 2), chunk(3, 1)]).is_err());
        assert!(assemble(&infos(&update), [chunk(0, 4), chunk(4, 1)]).is_err());
        let mut stranger = chunk(0, 4);
        stranger.tensor = "u".into();
        assert!(assemble(&infos(&update), [stranger]).is_err());
    }
}
