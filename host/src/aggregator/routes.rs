//! The aggregator's HTTP API (`host/api/aggregator-openapi.json`): one
//! function per route, each answering a complete response; refusals are
//! RFC 9457 problems whose `type` is `urn:oxbox:problem:<slug>` with the
//! slugs below (documented in the OpenAPI document).
//!
//! | route                                   | answers |
//! |-----------------------------------------|---------|
//! | `GET /v1/task`                          | 200 signed [`RoundTask`] |
//! | `GET /v1/models/{digest}/model.toml`    | 200 the package file |
//! | `GET /v1/models/{digest}/weights.safetensors` | 200 the package file |
//! | `GET /v1/models/{digest}/record`        | 200 signed [`crate::federation::protocol::GlobalModelRecord`] |
//! | `POST /v1/statistics`                   | 201 accepted, 200 identical already accepted |
//! | `POST /v1/updates`                      | 201 / 200 `{"missing": [sha256…]}` |
//! | `PUT /v1/shards/{sha256}`               | 201 stored, 200 already stored |
//! | `GET /v1/status`, `/metrics`, `/healthz`, `/openapi.json` | |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde::Serialize;
use serde_json::json;

use super::store::{DeclaredShard, Offer, StoredDocument};
use super::{Aggregator, AggregatorError};
use crate::federation::protocol::{FORMAT, Phase, RoundTask, UpdateManifest};
use crate::federation::signed::{SIGNATURE_HEADER, SignedDocument};
use crate::federation::stats::SiteStatistics;
use crate::federation::{FederationError, shards};
use crate::http::Problem;
use crate::http::body::{BodyLimits, read_body};
use crate::http::response::{self, HttpResponse};

/// The OpenAPI 3.1 document of this API (`GET /openapi.json`).
pub const OPENAPI: &str = include_str!("../../api/aggregator-openapi.json");

/// The largest update manifest or statistics document, bytes.
pub const MAX_DOCUMENT_BYTES: u64 = 4 * 1024 * 1024;

/// Time for a document's body to arrive.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Time for a shard's body to arrive.
const SHARD_TIMEOUT: Duration = Duration::from_secs(300);

/// The aggregator's own problems.
pub mod problems {
    use hyper::StatusCode;

    use crate::http::Problem;

    /// 400 `missing-signature`: no or a malformed `Oxbox-Signature` line.
    pub fn missing_signature(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "missing-signature",
            "Missing or malformed signature",
            detail,
        )
    }
    /// 400 `malformed-document`: not the expected document in canonical
    /// JSON, or values that make no sense (a shard list out of order).
    pub fn malformed_document(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-document",
            "Malformed document",
            detail,
        )
    }
    /// 403 `unknown-key`: signed by a key no enrolled site has.
    pub fn unknown_key() -> Problem {
        Problem::new(
            StatusCode::FORBIDDEN,
            "unknown-key",
            "Key not enrolled",
            "the document is signed by a key no enrolled site has",
        )
    }
    /// 403 `bad-signature`: the signature does not verify over the body.
    pub fn bad_signature() -> Problem {
        Problem::new(
            StatusCode::FORBIDDEN,
            "bad-signature",
            "Signature does not verify",
            "the signature does not verify over the exact body bytes",
        )
    }
    /// 403 `site-key-mismatch`: an enrolled key, but not the one enrolled
    /// for the site id the document names.
    pub fn site_key_mismatch(site: &str) -> Problem {
        Problem::new(
            StatusCode::FORBIDDEN,
            "site-key-mismatch",
            "Key not enrolled for this site",
            format!("the document names site {site:?}, which is not enrolled with the signing key"),
        )
    }
    /// 409 `wrong-job`: the document names another job.
    pub fn wrong_job(job: &str) -> Problem {
        Problem::new(
            StatusCode::CONFLICT,
            "wrong-job",
            "Wrong federation job",
            format!("this aggregator runs job {job:?}"),
        )
    }
    /// 409 `round-not-open`: not for the open round and phase (a replay
    /// of an old round, an upload after the round closed, statistics
    /// outside the statistics phase).
    pub fn round_not_open(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::CONFLICT,
            "round-not-open",
            "Round not open",
            detail,
        )
    }
    /// 409 `stale-base-model`: an update against another model than the
    /// current global one.
    pub fn stale_base_model(current: &str) -> Problem {
        Problem::new(
            StatusCode::CONFLICT,
            "stale-base-model",
            "Update against a stale model",
            format!("the current global model is {current}; fetch it and train again"),
        )
    }
    /// 409 `conflicting-document`: the site already sent a different
    /// document for this round.
    pub fn conflicting_document(what: &str) -> Problem {
        Problem::new(
            StatusCode::CONFLICT,
            "conflicting-document",
            "A different document was already accepted",
            format!("this site already has a different {what} for this round"),
        )
    }
    /// 413 `upload-limit`: the manifest declares more than a site may send
    /// in one round.
    pub fn upload_limit(declared: u64, limit: u64) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload-limit",
            "Upload over the per-site, per-round limit",
            format!(
                "the manifest declares {declared} bytes; aggregator.max_upload_mib_per_site_round allows {limit}"
            ),
        )
    }
    /// 422 `statistics-refused`: statistics that break the job's rules (a
    /// bucket under the minimum count, features not the model's).
    pub fn statistics_refused(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "statistics-refused",
            "Statistics refused",
            detail,
        )
    }
    /// 404 `shard-not-declared`: no accepted manifest of the open round
    /// declares this digest.
    pub fn shard_not_declared() -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            "shard-not-declared",
            "Shard not declared",
            "no accepted update manifest of the open round declares this sha256",
        )
    }
    /// 413 `shard-too-large`: the body is larger than the declared size
    /// (reading stopped one byte past it; nothing was stored).
    pub fn shard_too_large(declared: u64) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "shard-too-large",
            "Shard larger than declared",
            format!("the manifest declares {declared} bytes for this shard"),
        )
    }
    /// 422 `shard-size-mismatch`: fewer bytes than declared.
    pub fn shard_size_mismatch(declared: u64, got: usize) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "shard-size-mismatch",
            "Shard size differs from the declared size",
            format!("{got} bytes, the manifest declares {declared}"),
        )
    }
    /// 422 `shard-digest-mismatch`: the bytes do not hash to the digest.
    pub fn shard_digest_mismatch() -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "shard-digest-mismatch",
            "Shard bytes do not match their digest",
            "the body's sha256 is not the one in the path",
        )
    }
    /// 422 `malformed-shard`: the bytes are not an update shard, or carry
    /// tensors the manifest does not declare for it.
    pub fn malformed_shard(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed-shard",
            "Malformed shard",
            detail,
        )
    }
    /// 422 `incomplete-update`: with this last shard, the update's shards
    /// would not cover each declared tensor exactly once (nothing stored;
    /// the update never counts).
    pub fn incomplete_update(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "incomplete-update",
            "Update does not cover its tensors",
            detail,
        )
    }
    /// 404 `unknown-model`: no published model with this digest.
    pub fn unknown_model() -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-model",
            "Unknown model",
            "no published global model has this digest",
        )
    }
}

/// Answers one request.
pub async fn handle(
    aggregator: Arc<Aggregator>,
    _peer: SocketAddr,
    request: Request<Incoming>,
) -> HttpResponse {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let result = match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => Ok(response::json(StatusCode::OK, &json!({"status": "ok"}))),
        (["openapi.json"] | ["v1", "openapi.json"], &Method::GET) => {
            Ok(response::static_json(OPENAPI))
        }
        (["metrics"], &Method::GET) => Ok(response::openmetrics(aggregator.metrics.encode())),
        (["v1", "status"], &Method::GET) => status(&aggregator).await,
        (["v1", "task"], &Method::GET) => task(&aggregator).await,
        (["v1", "models", digest, file], &Method::GET) => {
            model_file(&aggregator, digest, file).await
        }
        (["v1", "statistics"], &Method::POST) => post_statistics(&aggregator, request).await,
        (["v1", "updates"], &Method::POST) => post_update(&aggregator, request).await,
        (["v1", "shards", sha], &Method::PUT) => {
            let sha = (*sha).to_owned();
            put_shard(&aggregator, &sha, request).await
        }
        (
            ["healthz"]
            | ["openapi.json"]
            | ["v1", "openapi.json"]
            | ["metrics"]
            | ["v1", "status"]
            | ["v1", "task"]
            | ["v1", "models", _, _],
            _,
        ) => Err(Problem::method_not_allowed("GET")),
        (["v1", "statistics"] | ["v1", "updates"], _) => Err(Problem::method_not_allowed("POST")),
        (["v1", "shards", _], _) => Err(Problem::method_not_allowed("PUT")),
        _ => Err(Problem::not_found(&path)),
    };
    match result {
        Ok(response) => response,
        Err(problem) => {
            if problem.status != 404 && problem.status != 405 {
                tracing::info!(
                    "{method} {} refused: {} {}",
                    route_label(&segments),
                    problem.status,
                    problem.kind
                );
                let slug = problem
                    .kind
                    .rsplit(':')
                    .next()
                    .unwrap_or("other")
                    .to_owned();
                aggregator
                    .metrics
                    .refused
                    .get_or_create(&super::RefusalLabels { reason: slug })
                    .inc();
            }
            problem.into_response()
        }
    }
}

/// The route without its variable parts (no digests in the log).
fn route_label(segments: &[&str]) -> &'static str {
    match segments {
        ["v1", "statistics"] => "/v1/statistics",
        ["v1", "updates"] => "/v1/updates",
        ["v1", "shards", _] => "/v1/shards/{sha256}",
        ["v1", "models", _, _] => "/v1/models/{digest}/{file}",
        _ => "other",
    }
}

fn internal(e: &AggregatorError) -> Problem {
    tracing::error!("aggregator: {e}");
    Problem::internal("the aggregator failed; see its log")
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    aggregator: &Arc<Aggregator>,
    f: impl FnOnce(&Aggregator) -> Result<T, AggregatorError> + Send + 'static,
) -> Result<T, Problem> {
    let a = Arc::clone(aggregator);
    match tokio::task::spawn_blocking(move || f(&a)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(internal(&e)),
        Err(e) => {
            tracing::error!("aggregator task: {e}");
            Err(Problem::internal("the aggregator failed; see its log"))
        }
    }
}

fn signed_response(status: StatusCode, document: &StoredDocument) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, document.signature.as_str())
        .body(Full::new(Bytes::from(document.body.clone())))
        .unwrap_or_else(|_| Problem::internal("building the response").into_response())
}

fn bytes_response(content_type: &'static str, body: Bytes) -> HttpResponse {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .unwrap_or_else(|_| Problem::internal("building the response").into_response())
}

async fn task(aggregator: &Arc<Aggregator>) -> Result<HttpResponse, Problem> {
    let document = blocking(aggregator, |a| {
        let (_, state) = a
            .store
            .state()?
            .ok_or_else(|| AggregatorError::Corrupt("the job has not started".to_owned()))?;
        let received = match state.phase {
            Phase::Statistics => a.store.statistics_sites()?,
            Phase::Training => match &state.closing {
                Some(frozen) => frozen.clone(),
                None => a.store.complete_updates(state.round)?,
            },
            Phase::Finished => Vec::new(),
        };
        let task = RoundTask {
            format: FORMAT,
            job: a.config.job.id.clone(),
            phase: state.phase,
            round: state.round,
            rounds: a.config.job.rounds,
            global_model: state.global_model,
            global_round: state.global_round,
            training: a.config.job.training.clone(),
            received,
        };
        let signed = SignedDocument::sign(&task, a.key())?;
        Ok(StoredDocument {
            signature: signed.signature_line(),
            body: signed.body,
        })
    })
    .await?;
    Ok(signed_response(StatusCode::OK, &document))
}

fn valid_hex_digest(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

async fn model_file(
    aggregator: &Arc<Aggregator>,
    digest: &str,
    file: &str,
) -> Result<HttpResponse, Problem> {
    if !valid_hex_digest(digest) {
        return Err(problems::unknown_model());
    }
    let digest = digest.to_owned();
    match file {
        "record" => {
            let model = blocking(aggregator, move |a| a.store.model(&digest)).await?;
            let model = model.ok_or_else(problems::unknown_model)?;
            Ok(signed_response(StatusCode::OK, &model.record))
        }
        "model.toml" | "weights.safetensors" => {
            let cached = blocking(aggregator, move |a| a.cached_model(&digest)).await?;
            let cached = cached.ok_or_else(problems::unknown_model)?;
            Ok(if file == "model.toml" {
                bytes_response("application/toml", cached.manifest)
            } else {
                bytes_response("application/octet-stream", cached.weights)
            })
        }
        _ => Err(Problem::not_found(&format!("/v1/models/{{digest}}/{file}"))),
    }
}

/// A verified document: its parsed value, its stored form and its size.
struct Verified<T> {
    value: T,
    stored: StoredDocument,
    body_len: usize,
}

/// Reads a signed document's body and checks its signature against the
/// enrolled keys: unknown key, bad signature, then the document itself.
async fn read_signed<T: serde::de::DeserializeOwned + Serialize>(
    aggregator: &Arc<Aggregator>,
    request: Request<Incoming>,
    what: &str,
) -> Result<(Verified<T>, [u8; 32]), Problem> {
    let line = request
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| problems::missing_signature("no Oxbox-Signature header"))?;
    let limits = BodyLimits {
        max_bytes: MAX_DOCUMENT_BYTES,
        max_bytes_setting: "the aggregator's document limit",
        timeout: DOCUMENT_TIMEOUT,
        timeout_setting: "the aggregator's document timeout",
    };
    let body = read_body(request, &limits, |_| Ok(()))
        .await?
        .into_contiguous();
    let signed = SignedDocument::from_parts(body.to_vec(), &line)
        .map_err(|e| problems::missing_signature(e.to_string()))?;
    if aggregator.config.site_by_key(&signed.key).is_none() {
        return Err(problems::unknown_key());
    }
    let value: T = signed.verify(&[signed.key], what).map_err(|e| match e {
        FederationError::Signature(_) => problems::bad_signature(),
        other => problems::malformed_document(other.to_string()),
    })?;
    let stored = StoredDocument {
        signature: signed.signature_line(),
        body: signed.body,
    };
    let body_len = stored.body.len();
    Ok((
        Verified {
            value,
            stored,
            body_len,
        },
        signed.key,
    ))
}

fn check_site(aggregator: &Aggregator, key: &[u8; 32], site: &str) -> Option<Problem> {
    match aggregator.config.sites.iter().find(|s| s.id == site) {
        Some(enrolled) if &enrolled.public_key == key => None,
        _ => Some(problems::site_key_mismatch(site)),
    }
}

async fn post_statistics(
    aggregator: &Arc<Aggregator>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Problem> {
    let (doc, key) = read_signed::<SiteStatistics>(aggregator, request, "site statistics").await?;
    let statistics = doc.value;
    if let Some(problem) = check_site(aggregator, &key, &statistics.site) {
        return Err(problem);
    }
    if statistics.job != aggregator.config.job.id {
        return Err(problems::wrong_job(&aggregator.config.job.id));
    }
    if statistics.format != FORMAT {
        return Err(problems::malformed_document(format!(
            "format {} (this aggregator speaks {FORMAT})",
            statistics.format
        )));
    }
    let min_count = aggregator.config.job.min_count;
    if statistics.min_count < min_count {
        return Err(problems::statistics_refused(format!(
            "min_count {} is under the job's {min_count}",
            statistics.min_count
        )));
    }
    for f in &statistics.features {
        if let Some(bucket) = f.histogram.iter().find(|&&n| n > 0 && n < min_count) {
            return Err(problems::statistics_refused(format!(
                "feature {}: a histogram bucket of {bucket} is under the minimum count {min_count}",
                f.name
            )));
        }
        if f.count < min_count
            && (f.sum.is_some() || f.sum_squares.is_some() || f.sum_cubes.is_some())
        {
            return Err(problems::statistics_refused(format!(
                "feature {}: moments over {} values, under the minimum count {min_count}",
                f.name, f.count
            )));
        }
    }
    let site = statistics.site.clone();
    let stored = doc.stored;
    let len = doc.body_len;
    let offer = blocking(aggregator, move |a| {
        let Some((_, state)) = a.store.state()? else {
            return Ok(Err(problems::round_not_open("the job has not started")));
        };
        let start =
            crate::model::package::PackageBytes::read(&a.store.model_dir(&state.global_model))?;
        if !state.accepts(Phase::Statistics, 0) {
            // Resending the identical accepted document is harmless.
            if let Some((_, existing)) = a.store.statistics()?.into_iter().find(|(s, _)| s == &site)
                && existing.body == stored.body
            {
                return Ok(Ok(Offer::Identical));
            }
            return Ok(Err(problems::round_not_open(
                "statistics are taken only in the statistics phase",
            )));
        }
        let manifest = start
            .package(&a.store.model_dir(&state.global_model))?
            .manifest;
        let expected: Vec<&str> = manifest.emr.iter().map(|f| f.name.as_str()).collect();
        let got: Vec<&str> = statistics
            .features
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        if expected != got {
            return Ok(Err(problems::statistics_refused(format!(
                "features {got:?} are not the model's {expected:?}"
            ))));
        }
        Ok(Ok(a.store.offer_statistics(&site, &stored)?))
    })
    .await??;
    match offer {
        Offer::Inserted => {
            aggregator
                .metrics
                .accepted
                .get_or_create(&super::UploadLabels { kind: "statistics" })
                .inc();
            aggregator.wake.notify_one();
            Ok(response::json(
                StatusCode::CREATED,
                &json!({"accepted": true, "bytes": len}),
            ))
        }
        Offer::Identical => Ok(response::json(
            StatusCode::OK,
            &json!({"accepted": true, "bytes": len}),
        )),
        Offer::Different => Err(problems::conflicting_document("statistics document")),
    }
}

/// Checks a manifest's own consistency (before any state is consulted).
fn check_manifest(m: &UpdateManifest) -> Result<Vec<DeclaredShard>, Box<Problem>> {
    if m.format != FORMAT {
        return Err(Box::new(problems::malformed_document(format!(
            "format {} (this aggregator speaks {FORMAT})",
            m.format
        ))));
    }
    if m.shards.is_empty() {
        return Err(Box::new(problems::malformed_document(
            "the manifest declares no shard",
        )));
    }
    if m.samples == 0 {
        return Err(Box::new(problems::malformed_document(
            "samples must be at least 1",
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for t in &m.tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Box::new(problems::malformed_document(format!(
                "tensor {} declared twice",
                t.name
            ))));
        }
    }
    let mut digests = std::collections::BTreeSet::new();
    let mut declared = Vec::new();
    for (i, s) in m.shards.iter().enumerate() {
        if s.index as usize != i {
            return Err(Box::new(problems::malformed_document(
                "shard indices must be 0, 1, 2, … in order",
            )));
        }
        if !valid_hex_digest(&s.sha256) {
            return Err(Box::new(problems::malformed_document(format!(
                "shard {i}: sha256 must be 64 lowercase hex digits"
            ))));
        }
        if !digests.insert(s.sha256.as_str()) {
            return Err(Box::new(problems::malformed_document(format!(
                "shard {i}: the same sha256 twice"
            ))));
        }
        if s.bytes == 0 {
            return Err(Box::new(problems::malformed_document(format!(
                "shard {i}: declared size 0"
            ))));
        }
        if let Some(t) = s.tensors.iter().find(|t| !names.contains(t.as_str())) {
            return Err(Box::new(problems::malformed_document(format!(
                "shard {i}: tensor {t} is not in the manifest's tensors"
            ))));
        }
        declared.push(DeclaredShard {
            index: s.index,
            sha256: s.sha256.clone(),
            bytes: s.bytes,
        });
    }
    Ok(declared)
}

/// A problem when `manifest` names a tensor the global model lacks or
/// gives it another shape.
fn check_tensors(
    aggregator: &Aggregator,
    global: &str,
    manifest: &UpdateManifest,
) -> Result<Option<Problem>, AggregatorError> {
    let model = aggregator.cached_model(global)?.ok_or_else(|| {
        AggregatorError::Corrupt(format!("global model {global} is not published"))
    })?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&model.weights)
        .map_err(|e| AggregatorError::Corrupt(format!("global model {global}'s weights: {e}")))?;
    let shapes = metadata.tensors();
    for t in &manifest.tensors {
        match shapes.get(&t.name) {
            None => {
                return Ok(Some(problems::malformed_document(format!(
                    "tensor {} is not in the global model",
                    t.name
                ))));
            }
            Some(info) if info.shape != t.shape => {
                return Ok(Some(problems::malformed_document(format!(
                    "tensor {}: shape {:?}, the global model's is {:?}",
                    t.name, t.shape, info.shape
                ))));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

#[derive(Serialize)]
struct Missing {
    missing: Vec<String>,
}

async fn post_update(
    aggregator: &Arc<Aggregator>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Problem> {
    let (doc, key) = read_signed::<UpdateManifest>(aggregator, request, "update manifest").await?;
    let manifest = doc.value;
    if let Some(problem) = check_site(aggregator, &key, &manifest.site) {
        return Err(problem);
    }
    if manifest.job != aggregator.config.job.id {
        return Err(problems::wrong_job(&aggregator.config.job.id));
    }
    let declared = check_manifest(&manifest).map_err(|p| *p)?;
    let total: u64 = declared.iter().map(|s| s.bytes).sum();
    let limit = aggregator.config.max_upload_bytes;
    let stored = doc.stored;
    let outcome = blocking(aggregator, move |a| {
        let Some((_, state)) = a.store.state()? else {
            return Ok(Err(problems::round_not_open("the job has not started")));
        };
        if !state.accepts(Phase::Training, manifest.round) {
            return Ok(Err(problems::round_not_open(format!(
                "round {} is not open for updates (open: {} round {}{})",
                manifest.round,
                match state.phase {
                    Phase::Statistics => "statistics",
                    Phase::Training => "training",
                    Phase::Finished => "finished",
                },
                state.round,
                if state.closing.is_some() {
                    ", closing"
                } else {
                    ""
                }
            ))));
        }
        if manifest.base_model != state.global_model {
            return Ok(Err(problems::stale_base_model(&state.global_model)));
        }
        if total > limit {
            return Ok(Err(problems::upload_limit(total, limit)));
        }
        // Every tensor must be one of the global model's, with its shape:
        // what is accepted must aggregate.
        if let Some(problem) = check_tensors(a, &state.global_model, &manifest)? {
            return Ok(Err(problem));
        }
        let offer = a.store.offer_manifest(
            manifest.round,
            &manifest.site,
            &stored,
            manifest.samples,
            &declared,
        )?;
        if offer == Offer::Different {
            return Ok(Err(problems::conflicting_document("update manifest")));
        }
        let missing = a.store.missing(manifest.round, &manifest.site)?;
        Ok(Ok((offer, missing)))
    })
    .await??;
    let (offer, missing) = outcome;
    if missing.is_empty() {
        aggregator.wake.notify_one();
    }
    let status = if offer == Offer::Inserted {
        aggregator
            .metrics
            .accepted
            .get_or_create(&super::UploadLabels { kind: "manifest" })
            .inc();
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(response::json(status, &Missing { missing }))
}

async fn put_shard(
    aggregator: &Arc<Aggregator>,
    sha256: &str,
    request: Request<Incoming>,
) -> Result<HttpResponse, Problem> {
    if !valid_hex_digest(sha256) {
        return Err(problems::shard_not_declared());
    }
    let _slot = aggregator
        .shard_slots
        .acquire()
        .await
        .map_err(|_| Problem::internal("shutting down"))?;
    let sha = sha256.to_owned();
    let (round, declarations) = blocking(aggregator, move |a| {
        let Some((_, state)) = a.store.state()? else {
            return Ok((0, Vec::new()));
        };
        if !state.accepts(Phase::Training, state.round) {
            return Ok((state.round, Vec::new()));
        }
        Ok((state.round, a.store.declared(state.round, &sha)?))
    })
    .await?;
    let Some(declared) = declarations.iter().map(|d| d.2).min() else {
        return Err(problems::shard_not_declared());
    };
    let already = declarations.iter().all(|d| d.3);
    let limits = BodyLimits {
        max_bytes: declared,
        max_bytes_setting: "the shard's declared size",
        timeout: SHARD_TIMEOUT,
        timeout_setting: "the aggregator's shard timeout",
    };
    // Hashed as it arrives: no second pass over the bytes.
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let body = match read_body(request, &limits, |chunk| {
        hasher.update(chunk);
        Ok(())
    })
    .await
    {
        Ok(body) => body.into_contiguous(),
        Err(p) if p.status == 413 => return Err(problems::shard_too_large(declared)),
        Err(p) => return Err(p),
    };
    if body.len() as u64 != declared {
        return Err(problems::shard_size_mismatch(declared, body.len()));
    }
    if hex::encode(hasher.finish().as_ref()) != sha256 {
        return Err(problems::shard_digest_mismatch());
    }
    if already {
        return Ok(response::json(
            StatusCode::OK,
            &json!({"sha256": sha256, "bytes": declared}),
        ));
    }
    let sha = sha256.to_owned();
    let outcome = blocking(aggregator, move |a| {
        // Every manifest that declares it must agree on its tensors.
        let mut allowed = std::collections::BTreeMap::<String, usize>::new();
        for (site, index, _, _) in &declarations {
            if let Some(doc) = a.store.manifest(round, site)?
                && let Ok(m) = serde_json::from_slice::<UpdateManifest>(&doc.body)
                && let Some(info) = m.shards.iter().find(|s| s.index == *index)
            {
                for t in &info.tensors {
                    if let Some(t) = m.tensors.iter().find(|x| &x.name == t) {
                        allowed.insert(t.name.clone(), t.shape.iter().product());
                    }
                }
            }
        }
        let index = declarations.first().map(|d| d.1).unwrap_or(0);
        let chunks = match shards::decode(&body, index) {
            Ok(chunks) => chunks,
            Err(e) => return Ok(Err(problems::malformed_shard(e.to_string()))),
        };
        for c in &chunks {
            match allowed.get(&c.tensor) {
                None => {
                    return Ok(Err(problems::malformed_shard(format!(
                        "tensor {} is not declared for this shard",
                        c.tensor
                    ))));
                }
                Some(&len) if c.offset.saturating_add(c.len) > len => {
                    return Ok(Err(problems::malformed_shard(format!(
                        "a chunk of {} runs past its {len} values",
                        c.tensor
                    ))));
                }
                Some(_) => {}
            }
        }
        let body_ranges: Vec<shards::ChunkRange> =
            chunks.iter().map(shards::Chunk::range).collect();
        drop(chunks);
        // The last missing shard of a site's update completes it: the whole
        // update must then cover each of its tensors exactly once, or it
        // would not aggregate. A shard every declarer of which would be
        // incomplete is refused; one that completes a bad update but also
        // serves another site is stored, and the bad update rejected (so a
        // site cannot block another's shard by declaring its digest).
        let mut bad = Vec::new();
        let mut sites: Vec<&String> = declarations.iter().map(|d| &d.0).collect();
        sites.dedup();
        for site in &sites {
            let missing = a.store.missing(round, site)?;
            if missing.iter().all(|m| m == &sha)
                && let Some(problem) = check_update(a, round, site, &sha, &body_ranges)?
            {
                bad.push(((*site).clone(), problem));
            }
        }
        if bad.len() == sites.len()
            && let Some((_, problem)) = bad.first()
        {
            return Ok(Err(problem.clone()));
        }
        let written = a.store.store_shard(round, &sha, &body)?;
        for (site, problem) in bad {
            tracing::warn!(
                "round {round}: the update of {site} is rejected: {}",
                problem.detail
            );
            a.store.reject(round, &site, &problem.detail)?;
        }
        Ok(Ok(written))
    })
    .await??;
    aggregator.wake.notify_one();
    if outcome {
        aggregator.metrics.shard_bytes.inc_by(declared);
        aggregator
            .metrics
            .accepted
            .get_or_create(&super::UploadLabels { kind: "shard" })
            .inc();
        Ok(response::json(
            StatusCode::CREATED,
            &json!({"sha256": sha256, "bytes": declared}),
        ))
    } else {
        Ok(response::json(
            StatusCode::OK,
            &json!({"sha256": sha256, "bytes": declared}),
        ))
    }
}

/// Checks that `site`'s update for `round` (its stored shards, and the
/// chunk ranges `pending_ranges` of the shard `pending`, just decoded)
/// covers every position of each tensor it declares exactly once. A stored
/// shard was decoded and checked before it was stored: only its header is
/// read again here, for its chunks' ranges.
fn check_update(
    aggregator: &Aggregator,
    round: u64,
    site: &str,
    pending: &str,
    pending_ranges: &[shards::ChunkRange],
) -> Result<Option<Problem>, AggregatorError> {
    let Some(document) = aggregator.store.manifest(round, site)? else {
        return Ok(None);
    };
    let manifest: UpdateManifest = serde_json::from_slice(&document.body)
        .map_err(|e| AggregatorError::Corrupt(format!("stored manifest of {site}: {e}")))?;
    let sizes: std::collections::BTreeMap<&str, usize> = manifest
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.iter().product()))
        .collect();
    let mut covered: std::collections::BTreeMap<String, Vec<(usize, usize)>> =
        std::collections::BTreeMap::new();
    for info in &manifest.shards {
        let stored;
        let ranges: &[shards::ChunkRange] = if info.sha256 == pending {
            pending_ranges
        } else {
            let path = aggregator.store.shard_path(&info.sha256);
            let header = read_header(&path, info.index)?;
            stored = match shards::ranges(&header, info.index) {
                Ok(ranges) => ranges,
                Err(e) => return Ok(Some(problems::malformed_shard(e.to_string()))),
            };
            &stored
        };
        for c in ranges.iter().cloned() {
            if !info.tensors.contains(&c.tensor) || !sizes.contains_key(c.tensor.as_str()) {
                return Ok(Some(problems::malformed_shard(format!(
                    "shard {}: tensor {} is not declared for it",
                    info.index, c.tensor
                ))));
            }
            covered
                .entry(c.tensor)
                .or_default()
                .push((c.offset, c.offset.saturating_add(c.len)));
        }
    }
    for (name, size) in sizes {
        let mut ranges = covered.remove(name).unwrap_or_default();
        ranges.sort_unstable();
        let mut end = 0;
        for (from, to) in ranges {
            if from != end {
                return Ok(Some(problems::incomplete_update(format!(
                    "tensor {name}: positions from {end} are {}",
                    if from < end { "sent twice" } else { "missing" }
                ))));
            }
            end = to;
        }
        if end != size {
            return Ok(Some(problems::incomplete_update(format!(
                "tensor {name}: {end} of {size} positions sent"
            ))));
        }
    }
    Ok(None)
}

/// The header of the stored shard file `path` (its first
/// [`shards::header_size`] bytes).
fn read_header(path: &std::path::Path, index: u32) -> Result<Vec<u8>, AggregatorError> {
    use std::io::Read;
    let io = |source| AggregatorError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut header = vec![0u8; 8];
    file.read_exact(&mut header).map_err(io)?;
    let size = shards::header_size(&header, index)
        .map_err(|e| AggregatorError::Corrupt(format!("{}: {e}", path.display())))?;
    header.resize(size, 0);
    file.read_exact(&mut header[8..]).map_err(io)?;
    Ok(header)
}

/// `GET /v1/status`.
#[derive(Debug, Serialize)]
struct Status {
    job: String,
    phase: Phase,
    round: u64,
    rounds: u64,
    closing: bool,
    global_model: GlobalModelStatus,
    sites: Vec<SiteStatus>,
    closed_rounds: Vec<ClosedRound>,
}

#[derive(Debug, Serialize)]
struct GlobalModelStatus {
    digest: String,
    round: u64,
}

#[derive(Debug, Serialize)]
struct SiteStatus {
    id: String,
    seen: bool,
    last_seen: Option<u64>,
    statistics: bool,
    last_round_contributed: Option<u64>,
    bytes_received: Vec<RoundBytes>,
}

#[derive(Debug, Serialize)]
struct RoundBytes {
    round: u64,
    bytes: u64,
    complete: bool,
}

#[derive(Debug, Serialize)]
struct ClosedRound {
    round: u64,
    digest: String,
    contributions: u64,
    sites: Vec<String>,
    aggregate_seconds: f64,
}

async fn status(aggregator: &Arc<Aggregator>) -> Result<HttpResponse, Problem> {
    let status = blocking(aggregator, |a| {
        let (job, state) = a
            .store
            .state()?
            .ok_or_else(|| AggregatorError::Corrupt("the job has not started".to_owned()))?;
        let seen = a.store.seen()?;
        let bytes = a.store.bytes_per_site_round()?;
        let models = a.store.models()?;
        let statistics = a.store.statistics_sites()?;
        let mut closed_rounds = Vec::new();
        let mut contributed = std::collections::BTreeMap::<String, u64>::new();
        for m in &models {
            if m.previous.is_none() {
                continue;
            }
            let sites = serde_json::from_slice::<crate::federation::protocol::GlobalModelRecord>(
                &m.record.body,
            )
            .map(|r| {
                r.contributions
                    .into_iter()
                    .map(|c| c.site)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
            for s in &sites {
                let e = contributed.entry(s.clone()).or_insert(m.round);
                *e = (*e).max(m.round);
            }
            closed_rounds.push(ClosedRound {
                round: m.round,
                digest: m.digest.clone(),
                contributions: m.contributions,
                sites,
                aggregate_seconds: m.aggregate_seconds,
            });
        }
        let sites = a
            .config
            .sites
            .iter()
            .map(|s| {
                let last_seen = seen.iter().find(|(id, _)| id == &s.id).map(|(_, t)| *t);
                SiteStatus {
                    id: s.id.clone(),
                    seen: last_seen.is_some(),
                    last_seen,
                    statistics: statistics.contains(&s.id),
                    last_round_contributed: contributed.get(&s.id).copied(),
                    bytes_received: bytes
                        .iter()
                        .filter(|b| b.site == s.id)
                        .map(|b| RoundBytes {
                            round: b.round,
                            bytes: b.bytes,
                            complete: b.complete,
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Status {
            job,
            phase: state.phase,
            round: state.round,
            rounds: a.config.job.rounds,
            closing: state.closing.is_some(),
            global_model: GlobalModelStatus {
                digest: state.global_model,
                round: state.global_round,
            },
            sites,
            closed_rounds,
        })
    })
    .await?;
    Ok(response::json(StatusCode::OK, &status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::PROBLEM_JSON;

    #[test]
    fn problems_are_problem_json_with_their_types() {
        let r = problems::stale_base_model("abc").into_response();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(
            r.headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some(PROBLEM_JSON)
        );
        assert_eq!(
            problems::shard_too_large(3).kind,
            "urn:oxbox:problem:shard-too-large"
        );
    }

    #[test]
    fn the_openapi_document_names_every_problem_type() {
        for slug in [
            "missing-signature",
            "malformed-document",
            "unknown-key",
            "bad-signature",
            "site-key-mismatch",
            "wrong-job",
            "round-not-open",
            "stale-base-model",
            "conflicting-document",
            "upload-limit",
            "statistics-refused",
            "shard-not-declared",
            "shard-too-large",
            "shard-size-mismatch",
            "shard-digest-mismatch",
            "malformed-shard",
            "incomplete-update",
            "unknown-model",
        ] {
            assert!(
                OPENAPI.contains(&format!("urn:oxbox:problem:{slug}")),
                "{slug} undocumented"
            );
        }
    }

    #[test]
    fn manifests_with_disordered_or_duplicate_shards_are_malformed() {
        let mut m = UpdateManifest {
            format: FORMAT,
            job: "j".to_owned(),
            round: 1,
            site: "s".to_owned(),
            base_model: "b".to_owned(),
            samples: 3,
            filters: Vec::new(),
            tensors: vec![crate::federation::protocol::TensorInfo {
                name: "w".to_owned(),
                shape: vec![2],
            }],
            shards: vec![crate::federation::protocol::ShardInfo {
                index: 0,
                sha256: "a".repeat(64),
                bytes: 10,
                tensors: vec!["w".to_owned()],
            }],
        };
        assert!(check_manifest(&m).is_ok());
        m.shards.push(m.shards[0].clone());
        assert!(check_manifest(&m).is_err(), "index 0 twice");
        m.shards[1].index = 1;
        assert_eq!(
            check_manifest(&m).expect_err("dup").kind,
            "urn:oxbox:problem:malformed-document"
        );
        m.shards.pop();
        m.shards[0].tensors = vec!["x".to_owned()];
        assert!(check_manifest(&m).is_err(), "undeclared tensor");
    }
}
