//! The DICOM listener's side of the server: received instances are parsed
//! by the same bounded parser as an HTTP upload (under the same memory
//! budget), handed to [`crate::studies`] to keep or decline, and claimed
//! studies are inferred through the same plugins, permits and inference
//! thread as `POST /v1/predict` ([`super::routes::infer_study`]), audited
//! alike. A sweeper task retries studies refused for load, gives up on
//! studies whose record does not come, and applies the retention.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dicom_dictionary_std::tags;

use super::AppState;
use crate::dicom::{DicomFile, ImageHeader};
use crate::dimse::message::status;
use crate::dimse::scp::{Congestion, InstanceSink, ReceivedInstance};
use crate::studies::{self, Claimed, ImageAttributes, Received, Studies, fingerprint};

/// The warning an image-only result carries (`dicom.image_only`).
pub const IMAGE_ONLY_WARNING: &str =
    "inferred image only: no EMR record came within dicom.emr_wait_s (every EMR feature missing)";

/// How often the sweeper runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// The listener's sink: parses, checks and stores instances; starts the
/// inference of studies whose record is here.
pub struct StudySink {
    state: Arc<AppState>,
    studies: Arc<Studies>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for StudySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StudySink")
    }
}

impl StudySink {
    /// A sink storing into `studies`, inferring on `runtime`.
    pub fn new(
        state: Arc<AppState>,
        studies: Arc<Studies>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            state,
            studies,
            runtime,
        }
    }

    fn handle(&self, instance: ReceivedInstance) -> Result<u16, (u16, &'static str)> {
        let ReceivedInstance {
            bytes,
            mut reservation,
            sop_class_uid,
            sop_instance_uid,
            ..
        } = instance;
        let limits = &self.state.limits;
        let started = Instant::now();
        let scanned = DicomFile::scan_bytes(&bytes, limits)
            .map_err(|_| (status::CANNOT_UNDERSTAND, "invalid"))?;
        reservation
            .grow(scanned.footprint().parsed_bytes())
            .map_err(|_| (status::OUT_OF_RESOURCES, "memory"))?;
        let file = scanned
            .parse()
            .map_err(|_| (status::CANNOT_UNDERSTAND, "invalid"))?;
        let object: &dicom_object::InMemDicomObject = file.object();
        let text = |tag: dicom_core::Tag| {
            object
                .get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let header =
            ImageHeader::read(&file).map_err(|_| (status::CANNOT_UNDERSTAND, "invalid"))?;
        if text(tags::SOP_INSTANCE_UID).as_deref() != Some(sop_instance_uid.as_str())
            || header.sop_class_uid.as_deref() != Some(sop_class_uid.as_str())
        {
            return Err((status::DATA_SET_MISMATCH, "mismatch"));
        }
        let image = ImageAttributes {
            study_uid: text(tags::STUDY_INSTANCE_UID).unwrap_or_default(),
            sop_instance_uid,
            accession: text(tags::ACCESSION_NUMBER),
            modality: header.modality.clone(),
            body_part: header.body_part_examined.clone(),
            view_position: header.view_position.clone(),
        };
        if !crate::dimse::message::is_uid(&image.study_uid) {
            return Err((status::CANNOT_UNDERSTAND, "invalid"));
        }
        if self.studies.wanted(&image) {
            // An image the rule wants must be one the ingest takes.
            header
                .accept(limits)
                .map_err(|_| (status::CANNOT_UNDERSTAND, "invalid"))?;
            match self.studies.has_room(bytes.len() as u64) {
                Ok(true) => {}
                Ok(false) => return Err((status::OUT_OF_RESOURCES, "disk")),
                Err(e) => {
                    tracing::warn!("dicom: {e}");
                    return Err((status::OUT_OF_RESOURCES, "disk"));
                }
            }
        }
        drop(file);
        let parsed = started.elapsed();
        let received = self.studies.receive(&image, &bytes).map_err(|e| {
            tracing::warn!("dicom: storing an instance failed: {e}");
            (status::OUT_OF_RESOURCES, "storage")
        })?;
        tracing::debug!(
            "dicom: study {}: instance parsed in {:.1} ms, kept (written, synced, recorded) in {:.1} ms",
            fingerprint(&image.study_uid),
            parsed.as_secs_f64() * 1e3,
            (started.elapsed() - parsed).as_secs_f64() * 1e3
        );
        // The inference reserves what it keeps of the data set.
        drop(reservation);
        let metrics = &self.state.metrics;
        match received {
            Received::Ignored => metrics.dicom_instance("ignored"),
            Received::Duplicate => metrics.dicom_instance("duplicate"),
            Received::Stored(claimed) => {
                metrics.dicom_instance("stored");
                tracing::info!(
                    "dicom: study {} stored{}",
                    fingerprint(&image.study_uid),
                    if claimed.is_some() {
                        ", its EMR record was waiting"
                    } else {
                        ", waiting for its EMR record"
                    }
                );
                if let Some(claimed) = claimed {
                    metrics.study_matched();
                    // The data set is still in memory: the inference takes
                    // it rather than reading back the file just written.
                    let mut bytes = bytes;
                    bytes.shrink_to_fit();
                    spawn_inference(
                        &self.runtime,
                        &self.state,
                        &self.studies,
                        claimed,
                        Some(Bytes::from(bytes)),
                    );
                }
            }
        }
        Ok(status::SUCCESS)
    }
}

impl InstanceSink for StudySink {
    fn accepting(&self) -> Result<(), Congestion> {
        match self.studies.has_room(0) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Congestion::DiskReserve),
            Err(e) => {
                tracing::warn!("dicom: {e}");
                Err(Congestion::DiskReserve)
            }
        }
    }

    fn store(&self, instance: ReceivedInstance) -> u16 {
        match self.handle(instance) {
            Ok(code) => code,
            Err((code, reason)) => {
                self.state.metrics.dicom_instance(reason);
                tracing::info!("dicom: instance refused ({reason}), status {code:#06x}");
                code
            }
        }
    }

    fn association(&self, outcome: &'static str) {
        self.state.metrics.dicom_association(outcome);
    }

    fn refused(&self, reason: &'static str) {
        self.state.metrics.dicom_instance(reason);
    }
}

/// Starts the inference of a claimed study on `runtime`; `instance`: its
/// Part 10 file when still in memory (else it is read from the data dir).
pub fn spawn_inference(
    runtime: &tokio::runtime::Handle,
    state: &Arc<AppState>,
    studies: &Arc<Studies>,
    claimed: Claimed,
    instance: Option<Bytes>,
) {
    let state = Arc::clone(state);
    let studies = Arc::clone(studies);
    runtime.spawn(async move { infer(&state, &studies, claimed, instance).await });
}

/// Infers a claimed study and records the outcome.
async fn infer(
    state: &Arc<AppState>,
    studies: &Arc<Studies>,
    claimed: Claimed,
    instance: Option<Bytes>,
) {
    let Claimed {
        study_uid,
        instance_path,
        record,
    } = claimed;
    let study = fingerprint(&study_uid);
    let image_only = record.is_none();
    let started = Instant::now();
    let path = instance_path.clone();
    let loaded = match instance {
        Some(bytes) => Ok(Ok(bytes)),
        None => {
            tokio::task::spawn_blocking(move || studies::read_instance(&path).map(Bytes::from))
                .await
        }
    };
    let bytes = match loaded {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            tracing::warn!("dicom: study {study}: {e}");
            finish(
                studies,
                &study_uid,
                Err("the stored instance could not be read"),
            );
            return;
        }
        Err(e) => {
            tracing::warn!("dicom: study {study}: read task: {e}");
            let _ = studies.requeue(&study_uid);
            return;
        }
    };
    let emr = Bytes::from(record.unwrap_or_else(|| "{}".to_owned()));
    let read = started.elapsed();
    match super::routes::infer_study(state, bytes, emr).await {
        Ok(mut report) => {
            if image_only {
                report.warnings.push(IMAGE_ONLY_WARNING.to_owned());
            }
            state
                .metrics
                .study_inferred(if image_only { "image_only" } else { "with_emr" });
            tracing::info!(
                request_id = report.request_id.as_str(),
                "dicom: study {study} inferred{}",
                if image_only { " (image only)" } else { "" }
            );
            let inferred = started.elapsed();
            if let Err(e) = studies.complete(&study_uid, &report) {
                tracing::warn!("dicom: study {study}: recording the result: {e}");
                return;
            }
            tracing::debug!(
                "dicom: study {study}: instance read in {:.1} ms, inferred in {:.1} ms, result recorded in {:.1} ms",
                read.as_secs_f64() * 1e3,
                (inferred - read).as_secs_f64() * 1e3,
                (started.elapsed() - inferred).as_secs_f64() * 1e3
            );
            // The result SR (and its C-STORE to the PACS, which retries)
            // runs on a blocking thread.
            let config = state.model_source.config.clone();
            let _ = tokio::task::spawn_blocking(move || {
                studies::on_result(&instance_path, &report, &config, image_only);
            })
            .await;
        }
        Err(problem) if problem.is_overloaded() => {
            tracing::debug!("dicom: study {study}: busy, retried at the next sweep");
            let _ = studies.requeue(&study_uid);
        }
        Err(problem) => {
            tracing::info!(
                "dicom: study {study} not inferred ({}): {}",
                problem.status,
                problem.title
            );
            state.metrics.study_failed();
            finish(studies, &study_uid, Err(&problem.audit_reason()));
        }
    }
}

fn finish(studies: &Studies, study_uid: &str, outcome: Result<(), &str>) {
    if let Err(reason) = outcome
        && let Err(e) = studies.fail(study_uid, reason)
    {
        tracing::warn!("dicom: study {}: {e}", fingerprint(study_uid));
    }
}

/// Every [`SWEEP_INTERVAL`]: the studies' periodic work, and inference of
/// what it claims.
pub async fn sweeper(state: Arc<AppState>, studies: Arc<Studies>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let runtime = tokio::runtime::Handle::current();
    loop {
        tick.tick().await;
        let sweeping = Arc::clone(&studies);
        let swept = match tokio::task::spawn_blocking(move || sweeping.sweep()).await {
            Ok(Ok(swept)) => swept,
            Ok(Err(e)) => {
                tracing::warn!("dicom: sweep: {e}");
                continue;
            }
            Err(e) => {
                tracing::warn!("dicom: sweep task: {e}");
                continue;
            }
        };
        let metrics = &state.metrics;
        metrics.studies_waiting(swept.waiting);
        for _ in 0..swept.expired {
            metrics.study_expired();
        }
        if swept.expired > 0 || swept.records_expired > 0 || swept.files_deleted > 0 {
            tracing::info!(
                "dicom: {} studies expired, {} EMR records expired unmatched, {} instances past retention deleted",
                swept.expired,
                swept.records_expired,
                swept.files_deleted
            );
        }
        for claimed in swept.claimed {
            spawn_inference(&runtime, &state, &studies, claimed, None);
        }
    }
}
