//! Update shards as the aggregator decodes them (`shards::decode`, and
//! `header_size` + `ranges` on the header alone). Input starting with 0xFF
//! is instead read as f32 values for an encode → decode round trip, which
//! must give back every value (equal as f32; that mode reaches the decoder
//! with valid shards of every chunking the encoder makes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxbox_federation_formats::shards::{self, ChunkValues, MIN_SHARD_BYTES};
use oxbox_federation_formats::tensors::{Tensor32, Tensors};

fuzz_target!(|data: &[u8]| {
    if let Some((&0xFF, rest)) = data.split_first() {
        round_trip(rest);
        return;
    }
    let decoded = shards::decode(data, 0);
    if let Ok(size) = shards::header_size(data, 0)
        && let Some(header) = data.get(..size)
        && let Ok(ranges) = shards::ranges(header, 0)
        && let Ok(chunks) = &decoded
    {
        // The header alone describes the chunks decode found.
        assert_eq!(ranges.len(), chunks.len());
        for (range, chunk) in ranges.iter().zip(chunks) {
            assert_eq!(*range, chunk.range());
        }
    }
});

/// Two tensors from the input's values (zeros kept, so sparse chunks
/// appear; non-finite values replaced: the encoder refuses them).
fn round_trip(bytes: &[u8]) {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .map(|v| if v.is_finite() { v } else { 0.0 })
        .collect();
    let (a, b) = values.split_at(values.len() / 2);
    let mut update = Tensors::new();
    update.insert(
        "layer.a".to_string(),
        Tensor32 {
            shape: vec![a.len()],
            values: a.to_vec(),
        },
    );
    update.insert(
        "layer.b/w".to_string(),
        Tensor32 {
            shape: vec![b.len()],
            values: b.to_vec(),
        },
    );
    let encoded = shards::encode(&update, MIN_SHARD_BYTES).expect("a finite update encodes");
    let mut back: Tensors = Tensors::new();
    for shard in &encoded {
        for chunk in shards::decode(&shard.bytes, shard.index).expect("an encoded shard decodes") {
            let tensor = back
                .entry(chunk.tensor.clone())
                .or_insert_with(|| Tensor32 {
                    shape: update[&chunk.tensor].shape.clone(),
                    values: vec![0.0; update[&chunk.tensor].values.len()],
                });
            match chunk.values {
                ChunkValues::Dense(v) => {
                    tensor.values[chunk.offset..chunk.offset + v.len()].copy_from_slice(&v)
                }
                ChunkValues::Sparse { indices, values } => {
                    for (i, v) in indices.iter().zip(values) {
                        tensor.values[chunk.offset + *i as usize] = v;
                    }
                }
            }
        }
    }
    for (name, tensor) in &update {
        let got = back.get(name).map_or(&[][..], |t| &t.values[..]);
        let want = &tensor.values[..];
        if want.is_empty() {
            continue;
        }
        assert_eq!(got.len(), want.len(), "{name}");
        // Equal values; a -0.0 may come back as 0.0 (a sparse chunk keeps
        // only the non-zero entries, and -0.0 == 0.0 to FedAvg as well).
        for (g, w) in got.iter().zip(want) {
            assert!(g == w, "{name}: {g} came back for {w}");
        }
    }
}
