//! Closing a round and publishing the new global model.
//!
//! - Start of the job: the start model's package is copied under
//!   `models/<digest>/` with a signed round-0 record.
//! - Statistics round: the sites' statistics → [`stats::combine`] → the
//!   start model with the federated EMR normalisation (same weights).
//! - Training round: each frozen site's update, in site-id order, streamed
//!   shard by shard from disk through [`shards::decode`] into one
//!   [`RunningAverage`] (memory: one sum per tensor, whatever the number
//!   of sites) → the new weights.
//!
//! The new package is written under `models/<digest>/` (each file
//! atomically), its [`GlobalModelRecord`] signed, and the record committed
//! together with the next round in one transaction. The result is a pure
//! function of the frozen set and the stored bytes: after a crash the same
//! close is done again and gives the same digest.

use std::time::Instant;

use super::rounds::{self, RoundState};
use super::store::{PublishedModel, StoredDocument};
use super::{Aggregator, AggregatorError};
use crate::federation::aggregate::RunningAverage;
use crate::federation::protocol::{Contribution, FORMAT, GlobalModelRecord, Phase, UpdateManifest};
use crate::federation::signed::SignedDocument;
use crate::federation::stats::{self, SiteStatistics};
use crate::federation::{shards, tensors};
use crate::model::package::{ModelManifest, ModelProvenance, PackageBytes};

fn sign_record(
    aggregator: &Aggregator,
    record: &GlobalModelRecord,
) -> Result<StoredDocument, AggregatorError> {
    let signed = SignedDocument::sign(record, aggregator.key())?;
    Ok(StoredDocument {
        signature: signed.signature_line(),
        body: signed.body,
    })
}

/// Starts the job: publishes the start model and opens the first round.
///
/// # Errors
/// [`AggregatorError`] for an unusable start model.
pub fn start_job(aggregator: &Aggregator) -> Result<(), AggregatorError> {
    let job = &aggregator.config.job;
    let bytes = PackageBytes::read(&job.start_model)?;
    let package = bytes.package(&job.start_model)?;
    let digest = package.digest;
    bytes.write(&aggregator.store.model_dir(&digest))?;
    let record = GlobalModelRecord {
        format: FORMAT,
        job: job.id.clone(),
        round: 0,
        digest: digest.clone(),
        previous: None,
        contributions: Vec::new(),
    };
    let model = PublishedModel {
        digest: digest.clone(),
        round: 0,
        previous: None,
        record: sign_record(aggregator, &record)?,
        contributions: 0,
        aggregate_seconds: 0.0,
    };
    let state = RoundState::start(job.statistics, &digest, super::now());
    aggregator.store.start(&job.id, &state, &model)?;
    tracing::info!(
        "job {} started from model {digest} ({} phase)",
        job.id,
        if job.statistics {
            "statistics"
        } else {
            "training"
        }
    );
    Ok(())
}

/// One coordinator step (see [`Aggregator::step`]).
pub(super) fn step(aggregator: &Aggregator) -> Result<bool, AggregatorError> {
    let Some((job, state)) = aggregator.store.state()? else {
        return Ok(false);
    };
    if state.phase == Phase::Finished {
        return Ok(false);
    }
    let state = match state.closing {
        Some(_) => state,
        None => {
            let complete = match state.phase {
                Phase::Statistics => aggregator.store.statistics_sites()?,
                _ => aggregator.store.complete_updates(state.round)?,
            };
            let config = &aggregator.config;
            if !rounds::should_close(
                config.sites.len(),
                complete.len(),
                config.job.min_sites,
                config.job.max_wait,
                state.opened_at,
                super::now(),
            ) {
                return Ok(false);
            }
            let frozen = RoundState {
                closing: Some(complete),
                ..state
            };
            aggregator.store.freeze(&job, &frozen)?;
            frozen
        }
    };
    let started = Instant::now();
    let (bytes, record) = match state.phase {
        Phase::Statistics => combine_statistics(aggregator, &state)?,
        _ => average_updates(aggregator, &state)?,
    };
    let digest = record.digest.clone();
    let dir = aggregator.store.model_dir(&digest);
    bytes.package(&dir)?;
    bytes.write(&dir)?;
    let seconds = started.elapsed().as_secs_f64();
    let model = PublishedModel {
        digest: digest.clone(),
        round: record.round,
        previous: record.previous.clone(),
        contributions: record.contributions.len() as u64,
        record: sign_record(aggregator, &record)?,
        aggregate_seconds: seconds,
    };
    let next = state.after_close(&digest, aggregator.config.job.rounds, super::now());
    aggregator.store.commit_round(&job, &model, &next)?;
    aggregator.metrics.rounds_closed.inc();
    aggregator
        .metrics
        .round
        .set(i64::try_from(next.round).unwrap_or(i64::MAX));
    aggregator
        .metrics
        .last_aggregation_ms
        .set(i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX));
    tracing::info!(
        "round {} closed with {} site(s) in {seconds:.3} s: global model {digest}",
        state.round,
        model.contributions
    );
    if !aggregator.config.keep_uploads && state.phase == Phase::Training {
        aggregator.store.delete_shards_except(next.round)?;
    }
    Ok(true)
}

/// The statistics round: the start model with the federated
/// normalisation.
fn combine_statistics(
    aggregator: &Aggregator,
    state: &RoundState,
) -> Result<(PackageBytes, GlobalModelRecord), AggregatorError> {
    let frozen = state.closing.clone().unwrap_or_default();
    let mut sites = Vec::new();
    let mut contributions = Vec::new();
    for (site, document) in aggregator.store.statistics()? {
        if !frozen.contains(&site) {
            continue;
        }
        let statistics: SiteStatistics = serde_json::from_slice(&document.body)
            .map_err(|e| AggregatorError::Corrupt(format!("stored statistics of {site}: {e}")))?;
        let cases = statistics
            .features
            .iter()
            .map(|f| f.count + f.missing)
            .max()
            .unwrap_or(0);
        contributions.push(Contribution {
            site: site.clone(),
            samples: cases,
        });
        sites.push(statistics);
    }
    let start = PackageBytes::read(&aggregator.store.model_dir(&state.global_model))?;
    let text = std::str::from_utf8(&start.manifest)
        .map_err(|_| AggregatorError::Corrupt("start model.toml is not UTF-8".to_owned()))?;
    let mut manifest: ModelManifest = toml::from_str(text)
        .map_err(|e| AggregatorError::Corrupt(format!("start model.toml: {}", e.message())))?;
    manifest.emr = stats::combine(&manifest.emr, &sites);
    manifest.federation = Some(provenance(aggregator, 0));
    let manifest = toml::to_string(&manifest)
        .map_err(|e| AggregatorError::Corrupt(format!("writing model.toml: {e}")))?;
    let bytes = PackageBytes {
        manifest: manifest.into_bytes(),
        weights: start.weights,
    };
    let record = GlobalModelRecord {
        format: FORMAT,
        job: aggregator.config.job.id.clone(),
        round: 0,
        digest: bytes.digest(),
        previous: Some(state.global_model.clone()),
        contributions,
    };
    Ok((bytes, record))
}

/// A training round: FedAvg of the frozen updates, streamed from disk.
fn average_updates(
    aggregator: &Aggregator,
    state: &RoundState,
) -> Result<(PackageBytes, GlobalModelRecord), AggregatorError> {
    let frozen = state.closing.clone().unwrap_or_default();
    // The global package as the downloads hold it in memory (no second
    // copy of its weights read from disk).
    let cached = aggregator
        .cached_model(&state.global_model)?
        .ok_or_else(|| {
            AggregatorError::Corrupt(format!(
                "global model {} is not published",
                state.global_model
            ))
        })?;
    let global = tensors::from_safetensors(&cached.weights, "the global model's weights")?;
    let manifest_bytes = cached.manifest.to_vec();
    drop(cached);
    let mut updates = Vec::new();
    for site in &frozen {
        let document = aggregator
            .store
            .manifest(state.round, site)?
            .ok_or_else(|| {
                AggregatorError::Corrupt(format!("round {}: no manifest of {site}", state.round))
            })?;
        let mut manifest: UpdateManifest = serde_json::from_slice(&document.body)
            .map_err(|e| AggregatorError::Corrupt(format!("stored manifest of {site}: {e}")))?;
        manifest.shards.sort_by_key(|s| s.index);
        updates.push((site.clone(), manifest));
    }
    let mut sum = RunningAverage::new(&global);
    let mut contributions = Vec::new();
    // Two stages on two threads: one reads each shard from disk and checks
    // its hash, the other decodes it into the sum; the same order, the
    // same result, as one after the other.
    std::thread::scope(|scope| -> Result<(), AggregatorError> {
        let (send, receive) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, AggregatorError>>(2);
        let updates = &updates;
        scope.spawn(move || {
            for info in updates.iter().flat_map(|(_, m)| &m.shards) {
                let read = read_verified_shard(aggregator, &info.sha256);
                let failed = read.is_err();
                if send.send(read).is_err() || failed {
                    return;
                }
            }
        });
        for (site, manifest) in updates {
            if !aggregator.test_delay().is_zero() {
                std::thread::sleep(aggregator.test_delay());
            }
            let names: Vec<String> = manifest.tensors.iter().map(|t| t.name.clone()).collect();
            sum.begin_update(&names, manifest.samples)?;
            for info in &manifest.shards {
                let bytes = receive.recv().map_err(|_| {
                    AggregatorError::Corrupt("the shard reader stopped".to_owned())
                })??;
                for chunk in shards::decode(&bytes, info.index)? {
                    sum.add(&chunk)?;
                }
            }
            contributions.push(Contribution {
                site: site.clone(),
                samples: manifest.samples,
            });
        }
        Ok(())
    })?;
    let new = sum.finish(global)?;
    let weights = tensors::to_safetensors(&new)?;
    drop(new);
    let text = std::str::from_utf8(&manifest_bytes)
        .map_err(|_| AggregatorError::Corrupt("global model.toml is not UTF-8".to_owned()))?;
    let mut model: ModelManifest = toml::from_str(text)
        .map_err(|e| AggregatorError::Corrupt(format!("global model.toml: {}", e.message())))?;
    model.version = format!("{}-round-{}", aggregator.config.job.id, state.round);
    model.trained = true;
    model.federation = Some(provenance(aggregator, state.round));
    let manifest = toml::to_string(&model)
        .map_err(|e| AggregatorError::Corrupt(format!("writing model.toml: {e}")))?;
    let bytes = PackageBytes {
        manifest: manifest.into_bytes(),
        weights,
    };
    let record = GlobalModelRecord {
        format: FORMAT,
        job: aggregator.config.job.id.clone(),
        round: state.round,
        digest: bytes.digest(),
        previous: Some(state.global_model.clone()),
        contributions,
    };
    Ok((bytes, record))
}

/// The stored shard `sha256`, checked to hash to its name.
fn read_verified_shard(aggregator: &Aggregator, sha256: &str) -> Result<Vec<u8>, AggregatorError> {
    let path = aggregator.store.shard_path(sha256);
    let bytes = std::fs::read(&path).map_err(|source| AggregatorError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if sha256_hex(&bytes) != sha256 {
        return Err(AggregatorError::Corrupt(format!(
            "{} does not hash to its name",
            path.display()
        )));
    }
    Ok(bytes)
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The `[federation]` table of a published model: which job and round it
/// came from, and which aggregator key signed it (`GET /v1/model` on the
/// sites shows it).
fn provenance(aggregator: &Aggregator, round: u64) -> ModelProvenance {
    ModelProvenance {
        job: aggregator.config.job.id.clone(),
        round,
        aggregator: aggregator.public_hex(),
    }
}
