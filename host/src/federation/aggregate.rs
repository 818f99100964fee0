//! Federated averaging over (sparse, partial) updates, as a running
//! weighted sum: memory is one sum per tensor, whatever the number of
//! sites; chunks are added as they are read from disk.
//!
//! new = global + Σᵢ nᵢ Δᵢ / Σᵢ nᵢ per tensor, where the sums run over the
//! sites whose update carries that tensor (a tensor a site excluded, as
//! FedBN's batch-norm statistics, is averaged over the others, and stays
//! the global's when no site sent it).

use super::FederationError;
use std::collections::BTreeMap;

use super::shards::{Chunk, ChunkValues};
use super::tensors::Tensors;

/// The running sum of one tensor.
#[derive(Debug)]
struct Slot {
    shape: Vec<usize>,
    /// Σ nᵢ Δᵢ, flattened.
    sum: Vec<f32>,
    /// Σ nᵢ over the updates that carried the tensor.
    weight: u64,
}

/// The update being added: its weight and, per tensor it declared, the
/// ranges its chunks covered so far (sorted, disjoint).
#[derive(Debug)]
struct Open {
    samples: u64,
    covered: BTreeMap<String, Vec<(usize, usize)>>,
}

/// The running sum of one round.
#[derive(Debug)]
pub struct RunningAverage {
    slots: BTreeMap<String, Slot>,
    open: Option<Open>,
    updates: u64,
}

impl RunningAverage {
    /// An empty sum over tensors shaped as `global`'s.
    pub fn new(global: &Tensors) -> Self {
        let slots = global
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    Slot {
                        shape: t.shape.clone(),
                        sum: vec![0.0; t.values.len()],
                        weight: 0,
                    },
                )
            })
            .collect();
        Self {
            slots,
            open: None,
            updates: 0,
        }
    }

    /// Updates begun so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Starts one site's update of `samples` cases carrying `tensors`
    /// (names): each counts that site's weight once. Ends the previous
    /// update first ([`RunningAverage::end_update`]).
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] for a tensor the global model lacks
    /// or one named twice, [`FederationError::Malformed`] for an update of
    /// no samples; and the previous update's errors.
    pub fn begin_update(
        &mut self,
        tensors: &[String],
        samples: u64,
    ) -> Result<(), FederationError> {
        self.end_update()?;
        if samples == 0 {
            return Err(FederationError::Malformed {
                what: "update".to_string(),
                reason: "trained on no samples".to_string(),
            });
        }
        let mut covered = BTreeMap::new();
        for name in tensors {
            if !self.slots.contains_key(name) {
                return Err(FederationError::Mismatch {
                    name: name.clone(),
                    reason: "not in the global model".to_string(),
                });
            }
            if covered.insert(name.clone(), Vec::new()).is_some() {
                return Err(FederationError::Mismatch {
                    name: name.clone(),
                    reason: "declared twice".to_string(),
                });
            }
        }
        for name in covered.keys() {
            if let Some(slot) = self.slots.get_mut(name) {
                slot.weight += samples;
            }
        }
        self.open = Some(Open { samples, covered });
        self.updates += 1;
        Ok(())
    }

    /// Adds one chunk of the current update, weighted by its samples.
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] for a chunk outside its tensor, one
    /// overlapping a chunk already added, or a tensor not declared by
    /// [`RunningAverage::begin_update`]. A refused chunk adds nothing.
    pub fn add(&mut self, chunk: &Chunk) -> Result<(), FederationError> {
        let mismatch = |reason: String| FederationError::Mismatch {
            name: chunk.tensor.clone(),
            reason,
        };
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| mismatch("a chunk outside an update".to_string()))?;
        let ranges = open
            .covered
            .get_mut(&chunk.tensor)
            .ok_or_else(|| mismatch("not declared by the update".to_string()))?;
        let slot = self
            .slots
            .get_mut(&chunk.tensor)
            .ok_or_else(|| mismatch("not in the global model".to_string()))?;
        let start = chunk.offset;
        let end = start
            .checked_add(chunk.len)
            .filter(|end| *end <= slot.sum.len())
            .ok_or_else(|| {
                mismatch(format!(
                    "chunk @{start} of {} values outside the tensor's {}",
                    chunk.len,
                    slot.sum.len()
                ))
            })?;
        match &chunk.values {
            ChunkValues::Dense(values) if values.len() != chunk.len => {
                return Err(mismatch(format!(
                    "chunk @{start}: {} values for {} positions",
                    values.len(),
                    chunk.len
                )));
            }
            ChunkValues::Sparse { indices, values } => {
                let ascending = indices.windows(2).all(|w| w[0] < w[1]);
                let within = indices.last().is_none_or(|i| (*i as usize) < chunk.len);
                if indices.len() != values.len() || !ascending || !within {
                    return Err(mismatch(format!(
                        "chunk @{start}: sparse indices inconsistent"
                    )));
                }
            }
            ChunkValues::Dense(_) => {}
        }
        // Ranges are disjoint and sorted: the new one goes where it fits.
        let at = ranges.partition_point(|(s, _)| *s < start);
        let clashes_before = at > 0 && ranges[at - 1].1 > start;
        let clashes_after = ranges.get(at).is_some_and(|(s, _)| *s < end);
        if chunk.len > 0 && (clashes_before || clashes_after) {
            return Err(mismatch(format!(
                "chunk @{start} overlaps one already added"
            )));
        }
        ranges.insert(at, (start, end));
        let weight = open.samples as f32;
        let target = &mut slot.sum[start..end];
        match &chunk.values {
            ChunkValues::Dense(values) => {
                for (s, v) in target.iter_mut().zip(values) {
                    *s += weight * v;
                }
            }
            ChunkValues::Sparse { indices, values } => {
                for (i, v) in indices.iter().zip(values) {
                    target[*i as usize] += weight * v;
                }
            }
        }
        Ok(())
    }

    /// Ends the current update (if any), checking that its chunks covered
    /// every position of every tensor it declared.
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] naming a tensor not fully covered.
    pub fn end_update(&mut self) -> Result<(), FederationError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        for (name, ranges) in open.covered {
            let len = self.slots.get(&name).map_or(0, |s| s.sum.len());
            let covered: usize = ranges.iter().map(|(s, e)| e - s).sum();
            if covered != len {
                return Err(FederationError::Mismatch {
                    name,
                    reason: format!("the update's chunks cover {covered} of {len} values"),
                });
            }
        }
        Ok(())
    }

    /// The new global weights: `global` plus the weighted mean Δ.
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] when `global` is not the one the sum
    /// was built for, or the last update is incomplete.
    pub fn finish(mut self, mut global: Tensors) -> Result<Tensors, FederationError> {
        self.end_update()?;
        if let Some(name) = self.slots.keys().find(|n| !global.contains_key(*n)) {
            return Err(FederationError::Mismatch {
                name: name.clone(),
                reason: "missing from the global weights".to_string(),
            });
        }
        for (name, tensor) in &global {
            match self.slots.get(name) {
                Some(slot)
                    if slot.shape == tensor.shape && slot.sum.len() == tensor.values.len() => {}
                _ => {
                    return Err(FederationError::Mismatch {
                        name: name.clone(),
                        reason: "not the global the average was built for".to_string(),
                    });
                }
            }
        }
        for (name, slot) in self.slots {
            if slot.weight == 0 {
                continue;
            }
            let scale = 1.0 / slot.weight as f64;
            if let Some(tensor) = global.get_mut(&name) {
                for (g, s) in tensor.values.iter_mut().zip(&slot.sum) {
                    *g = (f64::from(*g) + f64::from(*s) * scale) as f32;
                }
            }
        }
        Ok(global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::filters::{self, Filter};
    use crate::federation::shards;
    use crate::federation::tensors::Tensor32;
    use crate::rng::Pcg;

    fn random(rng: &mut Pcg, shape: &[usize]) -> Tensor32 {
        let n = shape.iter().product();
        Tensor32 {
            shape: shape.to_vec(),
            values: (0..n).map(|_| rng.gauss(0.0, 1.0) as f32).collect(),
        }
    }

    fn global(rng: &mut Pcg) -> Tensors {
        let mut g = Tensors::new();
        g.insert("image.conv.weight".into(), random(rng, &[40, 30, 3]));
        g.insert("image.bn.running_mean".into(), random(rng, &[40]));
        g.insert("emr.weight".into(), random(rng, &[20, 7]));
        g.insert("head.bias".into(), random(rng, &[4]));
        g
    }

    #[test]
    fn fedavg_over_filtered_sharded_updates_matches_a_direct_computation() {
        let mut rng = Pcg::new(1, 2);
        let g = global(&mut rng);
        let sites: Vec<(u64, Vec<Filter>)> = vec![
            (600, vec![]),
            (150, vec![Filter::Percentile { percent: 10.0 }]),
            (
                90,
                vec![Filter::Exclude {
                    groups: vec!["batch_norm_statistics".into()],
                    patterns: vec![],
                }],
            ),
            (
                250,
                vec![
                    Filter::Exclude {
                        groups: vec![],
                        patterns: vec!["head.*".into(), "*.running_mean".into()],
                    },
                    Filter::Percentile { percent: 30.0 },
                ],
            ),
        ];
        let mut average = RunningAverage::new(&g);
        let mut updates = Vec::new();
        for (samples, site_filters) in &sites {
            let mut delta: Tensors = g
                .iter()
                .map(|(n, t)| (n.clone(), random(&mut rng, &t.shape)))
                .collect();
            filters::apply(site_filters, &mut delta, &mut rng.clone()).expect("filters");
            let names: Vec<String> = delta.keys().cloned().collect();
            average.begin_update(&names, *samples).expect("begin");
            for shard in shards::encode(&delta, shards::MIN_SHARD_BYTES).expect("encode") {
                for chunk in shards::decode(&shard.bytes, shard.index).expect("decode") {
                    average.add(&chunk).expect("add");
                }
            }
            updates.push((*samples, delta));
        }
        assert_eq!(average.updates(), 4);
        let new = average.finish(g.clone()).expect("finish");

        // Direct: per tensor over the sites that carried it.
        for (name, tensor) in &g {
            let carriers: Vec<&(u64, Tensors)> = updates
                .iter()
                .filter(|(_, d)| d.contains_key(name))
                .collect();
            let total: u64 = carriers.iter().map(|(n, _)| n).sum();
            for (i, gv) in tensor.values.iter().enumerate() {
                let expected = if total == 0 {
                    f64::from(*gv)
                } else {
                    f64::from(*gv)
                        + carriers
                            .iter()
                            .map(|(n, d)| *n as f64 * f64::from(d[name].values[i]))
                            .sum::<f64>()
                            / total as f64
                };
                let got = f64::from(new[name].values[i]);
                assert!(
                    (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                    "{name}[{i}]: {got} vs {expected}"
                );
            }
        }
        // The head was sent by three sites; running means by two (the
        // FedBN site and the pattern site kept theirs).
        assert_ne!(new["image.bn.running_mean"], g["image.bn.running_mean"]);
    }

    #[test]
    fn tensors_no_site_sent_keep_the_global() {
        let mut rng = Pcg::new(3, 4);
        let g = global(&mut rng);
        let mut average = RunningAverage::new(&g);
        average
            .begin_update(&["head.bias".to_string()], 10)
            .expect("begin");
        average
            .add(&Chunk {
                tensor: "head.bias".into(),
                offset: 0,
                len: 4,
                values: ChunkValues::Dense(vec![1.0, 2.0, 3.0, 4.0]),
            })
            .expect("add");
        let new = average.finish(g.clone()).expect("finish");
        assert_eq!(new["emr.weight"], g["emr.weight"]);
        assert_eq!(new["image.bn.running_mean"], g["image.bn.running_mean"]);
        for (i, v) in new["head.bias"].values.iter().enumerate() {
            assert!((v - (g["head.bias"].values[i] + (i + 1) as f32)).abs() < 1e-6);
        }
    }

    #[test]
    fn refuses_strangers_overlaps_and_incomplete_updates() {
        let mut rng = Pcg::new(5, 6);
        let g = global(&mut rng);
        let dense = |tensor: &str, offset, len| Chunk {
            tensor: tensor.into(),
            offset,
            len,
            values: ChunkValues::Dense(vec![1.0; len]),
        };
        let mut average = RunningAverage::new(&g);
        // Chunk before any update.
        assert!(average.add(&dense("head.bias", 0, 4)).is_err());
        assert!(average.begin_update(&["nope".to_string()], 5).is_err());
        assert!(
            average
                .begin_update(&["head.bias".to_string(), "head.bias".to_string()], 5)
                .is_err()
        );
        assert!(average.begin_update(&["head.bias".to_string()], 0).is_err());
        average
            .begin_update(&["head.bias".to_string()], 5)
            .expect("begin");
        assert!(
            average.add(&dense("emr.weight", 0, 4)).is_err(),
            "undeclared"
        );
        assert!(
            average.add(&dense("head.bias", 2, 3)).is_err(),
            "past the end"
        );
        assert!(
            average.add(&dense("head.bias", usize::MAX, 1)).is_err(),
            "overflow"
        );
        average.add(&dense("head.bias", 1, 2)).expect("add");
        assert!(average.add(&dense("head.bias", 0, 2)).is_err(), "overlap");
        assert!(average.add(&dense("head.bias", 2, 1)).is_err(), "overlap");
        assert!(
            average
                .add(&Chunk {
                    tensor: "head.bias".into(),
                    offset: 0,
                    len: 1,
                    values: ChunkValues::Sparse {
                        indices: vec![1],
                        values: vec![1.0],
                    },
                })
                .is_err(),
            "index outside the chunk"
        );
        average.add(&dense("head.bias", 3, 1)).expect("add");
        // Position 0 never came: the update is incomplete.
        assert!(average.end_update().is_err());
        // A global with another shape.
        let mut average = RunningAverage::new(&g);
        let mut other = g.clone();
        other.get_mut("head.bias").expect("t").shape = vec![2, 2];
        assert!(average.end_update().is_ok());
        assert!(average.finish(other).is_err());
    }
}
