//! Routing and the handlers: one function per route, each returning a
//! complete response (JSON, the metrics text, or a problem).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::AppState;
use super::admission::{self, AdmissionError, Reservation};
use super::problem::{Problem, ServeProblems};
use super::reload::Refusal;
use crate::config::LimitsConfig;
use crate::dicom::{DicomFile, ImageHeader};
use crate::http::body::read_body;
use crate::http::predict_body::{CaseBody, body_kind, parse_json, parse_multipart, split_case};
use crate::http::response::{self, HttpResponse};
use crate::pipeline::{Pipeline, PipelineError, PredictionReport, PreparedCase};
use crate::plugins::{PluginError, PluginSet};
use crate::store::new_request_id;

/// The OpenAPI 3.1 document of this API (`GET /v1/openapi.json`).
pub const OPENAPI: &str = include_str!("../../api/openapi.json");

/// The routes, as metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Ready,
    Model,
    Plugins,
    Metrics,
    OpenApi,
    Predict,
    Reload,
    ModelReload,
    Emr,
    StudyResult,
    Other,
}

impl Route {
    fn of(path: &str) -> Self {
        match path {
            "/v1/health" => Route::Health,
            "/v1/ready" => Route::Ready,
            "/v1/model" => Route::Model,
            "/v1/plugins" => Route::Plugins,
            "/metrics" => Route::Metrics,
            "/v1/openapi.json" => Route::OpenApi,
            "/v1/predict" => Route::Predict,
            "/v1/admin/plugins/reload" => Route::Reload,
            "/v1/admin/model/reload" => Route::ModelReload,
            "/v1/emr" => Route::Emr,
            _ if study_uid_of(path).is_some() => Route::StudyResult,
            _ => Route::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Health => "/v1/health",
            Route::Ready => "/v1/ready",
            Route::Model => "/v1/model",
            Route::Plugins => "/v1/plugins",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/v1/openapi.json",
            Route::Predict => "/v1/predict",
            Route::Reload => "/v1/admin/plugins/reload",
            Route::ModelReload => "/v1/admin/model/reload",
            Route::Emr => "/v1/emr",
            Route::StudyResult => "/v1/studies/{study_instance_uid}/result",
            Route::Other => "other",
        }
    }

    fn method(self) -> Option<Method> {
        match self {
            Route::Predict | Route::Reload | Route::ModelReload | Route::Emr => Some(Method::POST),
            Route::Other => None,
            _ => Some(Method::GET),
        }
    }

    /// Liveness and readiness answer without the token (probes); the EMR
    /// route checks its own token (`dicom.emr_token_file`).
    fn needs_token(self) -> bool {
        !matches!(self, Route::Health | Route::Ready | Route::Emr)
    }
}

/// The Study Instance UID of a `/v1/studies/{uid}/result` path.
fn study_uid_of(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/studies/")?
        .strip_suffix("/result")
        .filter(|uid| !uid.is_empty() && !uid.contains('/'))
}

/// Answers one request from `peer`.
pub async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> HttpResponse {
    let route = Route::of(request.uri().path());
    let response = dispatch(&state, peer, route, request).await;
    state
        .metrics
        .request(route.label(), response.status().as_u16());
    response
}

async fn dispatch(
    state: &Arc<AppState>,
    peer: SocketAddr,
    route: Route,
    request: Request<Incoming>,
) -> HttpResponse {
    let Some(method) = route.method() else {
        return Problem::not_found(request.uri().path()).into_response();
    };
    if request.method() != method {
        return Problem::method_not_allowed(method.as_str()).into_response();
    }
    // The admin routes need the token everywhere, loopback included: a
    // server without one refuses them.
    if route == Route::Reload && state.token.is_none() {
        // Debug only, and counted: any local client can send these.
        tracing::debug!("plugin reload from {peer} refused: no server.token_file configured");
        state.metrics.reload_refused("no_token");
        return Problem::admin_needs_token().into_response();
    }
    if route == Route::ModelReload && state.token.is_none() {
        tracing::debug!("model reload from {peer} refused: no server.token_file configured");
        state.metrics.model_reload_refused("no_token");
        return Problem::admin_needs_token().into_response();
    }
    if route.needs_token()
        && let Some(token) = &state.token
        && let Some(problem) = token.refusal(request.headers(), "server.token_file")
    {
        return problem.into_response();
    }
    match route {
        Route::Health => response::json(StatusCode::OK, &json!({ "status": "ok" })),
        Route::Ready => ready(state),
        Route::Model => model(state),
        Route::Plugins => plugins(state),
        Route::Metrics => {
            let budget = &state.budget;
            state
                .metrics
                .memory(budget.capacity(), budget.in_use(), budget.peak());
            let text = state.metrics.encode();
            let federation = crate::federation::site::saved_counters(state.data_dir());
            response::openmetrics(match federation {
                Some(counters) => with_federation_counters(
                    text,
                    &crate::federation::site::openmetrics_families(&counters),
                ),
                None => text,
            })
        }
        Route::OpenApi => response::static_json(OPENAPI),
        Route::Predict => predict(state, request).await,
        Route::Reload => reload(state, peer).await,
        Route::ModelReload => model_reload(state, peer).await,
        Route::Emr => emr(state, request).await,
        Route::StudyResult => study_result(state, request.uri().path()),
        Route::Other => Problem::not_found(request.uri().path()).into_response(),
    }
}

/// Ready when the model is loaded (it is, once the server listens), the
/// inference thread serves (and its forward pass has not panicked on the
/// last attempts in a row) and no plugin is quarantined.
fn ready(state: &AppState) -> HttpResponse {
    let served = state.served();
    if let Some(reason) = served.batcher.unready() {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            reason,
        );
        p.retry_after = Some(60);
        return p.into_response();
    }
    let plugins = state.plugins.current();
    let quarantined: Vec<String> = plugins
        .plugins()
        .iter()
        .filter(|p| p.is_quarantined())
        .map(|p| format!("{} {}", p.name(), p.version()))
        .collect();
    if quarantined.is_empty() {
        response::json(
            StatusCode::OK,
            &json!({
                "ready": true,
                "model_digest": served.pipeline.model().package().digest,
                "plugins": plugins.plugins().len(),
            }),
        )
    } else {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            format!(
                "quarantined plugin(s): {}; fix and reload (SIGHUP or POST /v1/admin/plugins/reload)",
                quarantined.join(", ")
            ),
        );
        p.retry_after = Some(60);
        p.into_response()
    }
}

/// The server's exposition with the site's federation counters (written by
/// `oxbox federate` on this box) inserted before its closing `# EOF`.
fn with_federation_counters(text: String, families: &str) -> String {
    match text.strip_suffix("# EOF\n") {
        Some(head) => format!("{head}{families}# EOF\n"),
        None => text,
    }
}

/// The served model; `federation` (job, round, aggregator) when it came
/// from a federation round.
fn model(state: &AppState) -> HttpResponse {
    let served = state.served();
    let package = served.pipeline.model().package();
    let manifest = &package.manifest;
    let mut body = json!({
        "model": served.pipeline.model_identity(),
        "input_size": manifest.input_size,
        "architecture": manifest.architecture,
        "emr": manifest.emr,
        "outputs": ["p_o2_any", "p_o2_high_flow_or_niv", "p_ventilation_or_death", "exam_score"],
        "horizons": ["24h", "72h"],
    });
    if let (Some(federation), Some(object)) = (&manifest.federation, body.as_object_mut()) {
        object.insert("federation".to_owned(), json!(federation));
    }
    response::json(StatusCode::OK, &body)
}

fn plugins(state: &AppState) -> HttpResponse {
    let set = state.plugins.current();
    let list: Vec<serde_json::Value> = set
        .plugins()
        .iter()
        .zip(set.signatures())
        .map(|(p, signature)| {
            json!({
                "name": p.name(),
                "version": p.version(),
                "sha256": p.sha256(),
                "hooks": p.hooks().iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                "signed_by": signature.trusted_key(),
                "signature": signature,
                "consecutive_faults": p.consecutive_faults(),
                "quarantined": p.is_quarantined(),
            })
        })
        .collect();
    response::json(StatusCode::OK, &json!({ "plugins": list }))
}

/// One reload at a time, at most one per `server.reload_min_interval_s`,
/// each audited (the token was checked by [`dispatch`]). The reload runs in
/// a task of its own: a client that disconnects does not cut it short.
async fn reload(state: &Arc<AppState>, peer: SocketAddr) -> HttpResponse {
    let turn = match state.reloads.try_begin() {
        Ok(turn) => turn,
        Err(Refusal::InProgress) => {
            tracing::debug!("plugin reload from {peer} refused: another is running");
            state.metrics.reload_refused("in_progress");
            return Problem::reload_in_progress().into_response();
        }
        Err(Refusal::TooSoon { retry_after_s }) => {
            tracing::debug!("plugin reload from {peer} refused: rate limited");
            state.metrics.reload_refused("rate_limited");
            return Problem::reload_rate_limited(
                retry_after_s,
                state.settings.reload_min_interval.as_secs(),
            )
            .into_response();
        }
    };
    let outcome = match super::reload::reload(state, turn, format!("http {peer}")).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!("plugin reload: {e}");
            return Problem::internal(
                "the reload task failed; see the server log and GET /v1/plugins",
            )
            .into_response();
        }
    };
    match (outcome.result, outcome.audit_error) {
        (_, Some(e)) => Problem::internal(format!(
            "the reload ran but could not be audited ({e}); see GET /v1/plugins"
        ))
        .into_response(),
        (Ok(_), None) => plugins(state),
        (Err(failure), None) => Problem::reload_failed(&failure).into_response(),
    }
}

/// One model reload at a time, at most one per
/// `server.reload_min_interval_s`, each audited (the token was checked by
/// [`dispatch`]); in a task of its own, as the plugin reload. Answers the
/// model served afterwards (`GET /v1/model`'s body), or 422 when the
/// package did not load (the running model stays).
async fn model_reload(state: &Arc<AppState>, peer: SocketAddr) -> HttpResponse {
    let turn = match state.model_reloads.try_begin() {
        Ok(turn) => turn,
        Err(Refusal::InProgress) => {
            tracing::debug!("model reload from {peer} refused: another is running");
            state.metrics.model_reload_refused("in_progress");
            return Problem::model_reload_in_progress().into_response();
        }
        Err(Refusal::TooSoon { retry_after_s }) => {
            tracing::debug!("model reload from {peer} refused: rate limited");
            state.metrics.model_reload_refused("rate_limited");
            return Problem::model_reload_rate_limited(
                retry_after_s,
                state.settings.reload_min_interval.as_secs(),
            )
            .into_response();
        }
    };
    let outcome = match super::model_reload::reload(state, turn, format!("http {peer}")).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!("model reload: {e}");
            return Problem::internal(
                "the model reload task failed; see the server log and GET /v1/model",
            )
            .into_response();
        }
    };
    match (outcome.result, outcome.audit_error) {
        (_, Some(e)) => Problem::internal(format!(
            "the model reload ran but could not be audited ({e}); see GET /v1/model"
        ))
        .into_response(),
        (Ok(_), None) => model(state),
        (Err(failure), None) => Problem::model_reload_failed(&failure).into_response(),
    }
}

/// Counts a prediction in the in-flight gauge while alive (also when the
/// client goes away and the request's future is dropped).
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn predict(state: &Arc<AppState>, request: Request<Incoming>) -> HttpResponse {
    let request_id = new_request_id();
    let started = Instant::now();
    // The body first, under its timeout, size limit and the memory budget,
    // and before a prediction permit: a client trickling its body holds
    // memory only for what it has sent, and no permit.
    let mut reservation = state.budget.reservation();
    // The model this request runs on, to its end (a reload meanwhile
    // serves later requests).
    let served = state.served();
    let received = read_case(state, request, &mut reservation).await;
    let receive_ms = ms_since(started);
    let outcome = match received {
        Err(problem) => Err(problem),
        Ok(body) => {
            let Ok(permit) = Arc::clone(&state.permits).try_acquire_owned() else {
                state.metrics.admission_refused("requests");
                return Problem::overloaded(state.settings.max_concurrent)
                    .for_request(&request_id)
                    .into_response();
            };
            let _in_flight = InFlight::new(state.metrics.in_flight());
            predict_case(state, &served, &request_id, body, reservation, permit).await
        }
    };
    let mut timings = None;
    let (response, audit) = match outcome {
        Ok(report) => {
            let t = report.timings_ms;
            state.metrics.stage("receive", receive_ms);
            for (stage, ms) in t.stages() {
                state.metrics.stage(stage, ms);
            }
            timings = Some(t);
            let audit = report.audit_record();
            let mut response = response::json(StatusCode::OK, &report);
            if let Ok(value) = header::HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-request-id", value);
            }
            (response, audit)
        }
        // Overload is not a refusal of the case: not audited (as the
        // permit overload above), so a flood cannot grow the database.
        Err(problem) if problem.is_overloaded() => {
            return problem.for_request(&request_id).into_response();
        }
        Err(problem) => {
            let audit = served.pipeline.refused_record(
                &request_id,
                &state.plugins.current(),
                problem.status < 500,
                &problem.audit_reason(),
            );
            (problem.for_request(&request_id).into_response(), audit)
        }
    };
    let log = Arc::clone(&state.audit);
    let audit_started = Instant::now();
    let written = tokio::task::spawn_blocking(move || match log.lock() {
        Ok(log) => log.record(&audit).map_err(|e| e.to_string()),
        Err(_) => Err("audit log lock poisoned".to_owned()),
    })
    .await;
    match written {
        Ok(Ok(())) => {
            let audit_ms = ms_since(audit_started);
            let total_ms = ms_since(started);
            let mut response = response;
            if let Some(t) = timings.filter(|_| response.status() == StatusCode::OK) {
                state.metrics.stage("audit", audit_ms);
                state.metrics.stage("total", total_ms);
                if state.settings.server_timing {
                    let value = server_timing(receive_ms, &t, audit_ms, total_ms);
                    if let Ok(value) = header::HeaderValue::from_str(&value) {
                        response.headers_mut().insert("server-timing", value);
                    }
                }
            }
            response
        }
        // A prediction that cannot be audited is not given out.
        Ok(Err(e)) => Problem::internal(format!("audit log: {e}"))
            .for_request(&request_id)
            .into_response(),
        Err(e) => Problem::internal(format!("audit task: {e}"))
            .for_request(&request_id)
            .into_response(),
    }
}

/// Milliseconds since `t`, to the microsecond.
fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// The `Server-Timing` header of a prediction (`server.server_timing`):
/// each stage's duration in milliseconds, nothing else.
fn server_timing(
    receive_ms: f64,
    t: &crate::pipeline::Timings,
    audit_ms: f64,
    total_ms: f64,
) -> String {
    std::iter::once(("receive", receive_ms))
        .chain(t.stages())
        .chain([("audit", audit_ms), ("total", total_ms)])
        .map(|(stage, ms)| format!("{stage};dur={ms:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The problem for an admission refusal, counted in the metrics.
fn admission_problem(state: &AppState, e: AdmissionError) -> Problem {
    match e {
        AdmissionError::Busy { .. } => {
            state.metrics.admission_refused("memory");
            Problem::overloaded_memory(e.to_string())
        }
        AdmissionError::TooLarge { .. } => {
            state.metrics.admission_refused("too_large");
            Problem::case_too_large(e.to_string())
        }
    }
}

/// Decodes, runs the plugins and infers one case. `permit` (one of
/// `server.max_concurrent_requests`) moves into the blocking decode-and-
/// plugins work and is held through inference: a client that goes away
/// mid-request frees it only when that work has ended, so no more than the
/// configured number of decodes and plugin calls ever run at once.
async fn predict_case(
    state: &Arc<AppState>,
    served: &super::Served,
    request_id: &str,
    body: CaseBody,
    mut reservation: Reservation,
    permit: OwnedSemaphorePermit,
) -> Result<PredictionReport, Problem> {
    if let CaseBody::Multipart { emr, .. } = &body {
        reservation
            .grow((emr.len() as u64).saturating_mul(admission::JSON_EXPANSION))
            .map_err(|e| admission_problem(state, e))?;
    }
    let (dicom, emr) = split_case(body).map_err(|p| *p)?;

    // Decode and plugins: CPU work, off the async threads. The file is
    // parsed and its header read here, so that the decode is admitted
    // against the memory budget before any pixel buffer exists.
    let pipeline = Arc::clone(&served.pipeline);
    let plugins = state.plugins.current();
    let limits = state.limits.clone();
    let admit_state = Arc::clone(state);
    let prepared = tokio::task::spawn_blocking(move || {
        let prepared = prepare_case(
            &admit_state,
            &pipeline,
            &plugins,
            &limits,
            dicom,
            &emr,
            reservation,
        );
        // Handed back to be held through inference; dropped here with the
        // result if the request has gone away.
        (prepared, permit)
    })
    .await
    .map_err(|e| Problem::internal(format!("prediction task: {e}")))?;
    let (prepared, _permit) = prepared;
    let mut case = match prepared {
        Ok(case) => case,
        Err(Admitted::Refused(problem)) => {
            // Overload is counted in the metrics and not audited; at the
            // default level it is not logged per request either, so a flood
            // cannot grow the log. A case too large for the budget is (its
            // detail holds sizes only).
            if problem.is_overloaded() {
                tracing::debug!(
                    request_id,
                    "prediction refused at admission: {}",
                    problem.detail
                );
            } else {
                tracing::info!(
                    request_id,
                    "prediction refused at admission: {}",
                    problem.detail
                );
            }
            return Err(*problem);
        }
        Err(Admitted::Failed(e)) => {
            count_plugin_fault(state, &e);
            // The redacted text: the plugin and field at fault, never a
            // value (the plugin's own message may quote one). Bad input at
            // info, a failure of the box at warn; load (every sandbox busy:
            // a 503 the plugin host has already warned about) and a
            // quarantined plugin (warned about once, when it was
            // quarantined; in GET /v1/plugins and the metrics since) at
            // debug, so that neither grows the log per request.
            if matches!(
                e,
                PipelineError::Plugin(PluginError::Busy { .. } | PluginError::Quarantined { .. })
            ) {
                tracing::debug!(
                    request_id,
                    "prediction refused ({}): {}",
                    category(&e),
                    e.redacted()
                );
            } else if e.is_bad_input() {
                tracing::info!(
                    request_id,
                    "prediction refused ({}): {}",
                    category(&e),
                    e.redacted()
                );
            } else {
                tracing::warn!(
                    request_id,
                    "prediction failed ({}): {}",
                    category(&e),
                    e.redacted()
                );
            }
            return Err(Problem::from_pipeline(&e));
        }
    };
    let output = served
        .batcher
        .infer(std::mem::take(&mut case.input))
        .await
        .map_err(|e| Problem::from_batch(e, served.batcher.stopped()))?;
    Ok(served.pipeline.report(
        request_id,
        case,
        output.prediction,
        output.queue_ms,
        output.inference_ms,
    ))
}

/// The blocking half of a prediction: parses the DICOM part (admitted by
/// the scan's [`Footprint`](crate::dicom::scan::Footprint): the inflated
/// size of a deflated data set, and its node count), admits the decode from
/// the image header, then decodes and runs the plugins. The reservation is
/// given back when this returns.
fn prepare_case(
    state: &AppState,
    pipeline: &Pipeline,
    plugins: &Arc<PluginSet>,
    limits: &LimitsConfig,
    dicom: Option<Bytes>,
    emr: &serde_json::Value,
    mut reservation: Reservation,
) -> Result<PreparedCase, Admitted> {
    let refused = |e| Admitted::Refused(Box::new(admission_problem(state, e)));
    let parse_started = Instant::now();
    let file = match dicom.as_deref() {
        None => None,
        Some(bytes) => {
            let scanned =
                DicomFile::scan_bytes(bytes, limits).map_err(|e| Admitted::Failed(e.into()))?;
            reservation
                .grow(scanned.footprint().parsed_bytes())
                .map_err(refused)?;
            let file = scanned.parse().map_err(|e| Admitted::Failed(e.into()))?;
            if pipeline.model().uses_image() {
                let header = ImageHeader::read(&file).map_err(|e| Admitted::Failed(e.into()))?;
                let geometry = header
                    .accept(limits)
                    .map_err(|e| Admitted::Failed(e.into()))?;
                let estimate = admission::decode_estimate(
                    &geometry,
                    header.pixel_data_encapsulated,
                    pipeline.model().package().manifest.input_size,
                    plugins.preprocesses_images(),
                );
                reservation.grow(estimate).map_err(refused)?;
            }
            Some(file)
        }
    };
    let parse = parse_started.elapsed();
    let prepared = pipeline
        .prepare(file.as_ref(), emr, plugins)
        .map(|mut case| {
            if file.is_some() {
                case.add_parse_time(parse);
            }
            case
        })
        .map_err(Admitted::Failed);
    // The file, the body and the decode buffers are gone: give the budget
    // back.
    drop(file);
    drop(dicom);
    drop(reservation);
    prepared
}

/// How the decode-and-plugins step ended without a case.
enum Admitted {
    /// Refused at admission (memory budget).
    Refused(Box<Problem>),
    /// The pipeline refused or failed.
    Failed(PipelineError),
}

/// The error's kind, for logs (never its text: it may echo the input).
fn category(e: &PipelineError) -> &'static str {
    match e {
        PipelineError::Dicom(_) => "radiograph refused",
        PipelineError::Record(_) => "malformed EMR record",
        PipelineError::Plugin(p) if p.is_rejection() => "plugin rejection",
        PipelineError::Plugin(_) => "plugin failure",
        PipelineError::Model(_) => "model",
        PipelineError::NotCanonical { .. } => "EMR record not canonical",
    }
}

fn count_plugin_fault(state: &AppState, e: &PipelineError) {
    if let PipelineError::Plugin(
        PluginError::Fault { plugin, .. } | PluginError::Quarantined { plugin, .. },
    ) = e
    {
        state.metrics.plugin_fault(plugin);
    }
}

/// Reads and splits the body: size limit (from Content-Length before
/// reading, and while reading), body timeout, media type, and the memory
/// budget (grown by each chunk as it arrives, and by the multipart
/// parser's copy).
async fn read_case(
    state: &AppState,
    request: Request<Incoming>,
    reservation: &mut Reservation,
) -> Result<CaseBody, Problem> {
    let limits = &state.settings.body;
    if let Some(problem) = limits.declared_too_large(request.headers()) {
        return Err(problem);
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let kind = body_kind(&content_type).map_err(|p| *p)?;
    // Each chunk is reserved as it arrives; refused at admission, the rest
    // of the body is read and dropped, and the client gets the 503.
    let body = read_body(request, limits, |chunk| {
        reservation
            .grow(chunk.len() as u64)
            .map_err(|e| Box::new(admission_problem(state, e)))
    })
    .await?;
    let received = body.len as u64;
    match kind {
        None => {
            // One contiguous copy of the text (exactly its size), then the
            // parsed value.
            reservation
                .grow(
                    received
                        .saturating_mul(admission::JSON_EXPANSION)
                        .saturating_add(received),
                )
                .map_err(|e| admission_problem(state, e))?;
            parse_json(&body.into_contiguous()).map_err(|p| *p)
        }
        Some(boundary) => {
            // The parser copies the chunks into its own buffer.
            reservation
                .grow(received)
                .map_err(|e| admission_problem(state, e))?;
            parse_multipart(body, boundary).await
        }
    }
}

/// Runs one received study's case (its stored Part 10 file and the EMR
/// record's JSON text) as `POST /v1/predict` runs a multipart upload: the
/// same memory budget (the file and the record reserved as a body), the
/// same permits, plugins, inference thread and audit record.
///
/// # Errors
/// The [`Problem`] the HTTP route would answer (overload included: the
/// caller retries later).
pub(crate) async fn infer_study(
    state: &Arc<AppState>,
    dicom: Bytes,
    emr: Bytes,
) -> Result<PredictionReport, Problem> {
    let request_id = new_request_id();
    let mut reservation = state.budget.reservation();
    reservation
        .grow(dicom.len() as u64 + emr.len() as u64)
        .map_err(|e| admission_problem(state, e))?;
    let served = state.served();
    let Ok(permit) = Arc::clone(&state.permits).try_acquire_owned() else {
        state.metrics.admission_refused("requests");
        return Err(Problem::overloaded(state.settings.max_concurrent));
    };
    let outcome = {
        let _in_flight = InFlight::new(state.metrics.in_flight());
        let body = CaseBody::Multipart {
            dicom: Some(dicom),
            emr,
        };
        predict_case(state, &served, &request_id, body, reservation, permit).await
    };
    if matches!(&outcome, Err(problem) if problem.is_overloaded()) {
        return outcome;
    }
    let audit = match &outcome {
        Ok(report) => report.audit_record(),
        Err(problem) => served.pipeline.refused_record(
            &request_id,
            &state.plugins.current(),
            problem.status < 500,
            &problem.audit_reason(),
        ),
    };
    let log = Arc::clone(&state.audit);
    let written = tokio::task::spawn_blocking(move || match log.lock() {
        Ok(log) => log.record(&audit).map_err(|e| e.to_string()),
        Err(_) => Err("audit log lock poisoned".to_owned()),
    })
    .await;
    match written {
        Ok(Ok(())) => outcome,
        Ok(Err(e)) => Err(Problem::internal(format!("audit log: {e}"))),
        Err(e) => Err(Problem::internal(format!("audit task: {e}"))),
    }
}

/// Largest `POST /v1/emr` body, bytes: a record is a few kilobytes.
const MAX_EMR_BODY_BYTES: u64 = 1024 * 1024;

/// `POST /v1/emr`: `{"accession_number": "...", "emr": {...}}`, the
/// site's record keyed by the accession number of its radiograph; needs
/// `dicom.emr_token_file`'s token (loopback included). Answers whether the
/// record completed a waiting study (`matched`) or waits for its image.
async fn emr(state: &Arc<AppState>, request: Request<Incoming>) -> HttpResponse {
    let Some(dicom) = &state.dicom else {
        return Problem::not_found("/v1/emr (the DICOM listener is off: [dicom] enabled = false)")
            .into_response();
    };
    if let Some(problem) = dicom
        .emr_token
        .refusal(request.headers(), "dicom.emr_token_file")
    {
        return problem.into_response();
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !content_type
        .parse::<mime::Mime>()
        .is_ok_and(|m| m.essence_str() == "application/json")
    {
        return Problem::unsupported_media_type(format!(
            "Content-Type {content_type:?}: send application/json {{\"accession_number\": ..., \"emr\": {{...}}}}"
        ))
        .into_response();
    }
    let limits = crate::http::BodyLimits {
        max_bytes: MAX_EMR_BODY_BYTES.min(state.settings.body.max_bytes),
        ..state.settings.body
    };
    if let Some(problem) = limits.declared_too_large(request.headers()) {
        return problem.into_response();
    }
    let mut reservation = state.budget.reservation();
    let body = match read_body(request, &limits, |chunk| {
        reservation
            .grow(chunk.len() as u64)
            .map_err(|e| Box::new(admission_problem(state, e)))
    })
    .await
    {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let parsed: serde_json::Value = match serde_json::from_slice(&body.into_contiguous()) {
        Ok(value) => value,
        Err(e) => return Problem::malformed(format!("the body is not JSON: {e}")).into_response(),
    };
    drop(reservation);
    let Some(object) = parsed.as_object() else {
        return Problem::malformed(
            "the body must be an object {\"accession_number\": ..., \"emr\": {...}}",
        )
        .into_response();
    };
    if let Some(key) = object
        .keys()
        .find(|k| k.as_str() != "accession_number" && k.as_str() != "emr")
    {
        return Problem::malformed(format!(
            "unknown key {key:?}; the body is {{\"accession_number\": ..., \"emr\": {{...}}}}"
        ))
        .into_response();
    }
    let Some(accession) = object
        .get("accession_number")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|a| crate::studies::is_accession_number(a))
    else {
        return Problem::malformed(
            "accession_number must be the radiograph's Accession Number (0008,0050): 1 to 16 printable characters, no backslash",
        )
        .into_response();
    };
    let Some(record) = object.get("emr").filter(|r| r.is_object()) else {
        return Problem::malformed("emr must be a JSON object of the site's fields")
            .into_response();
    };
    let record = record.to_string();
    let studies = Arc::clone(&dicom.studies);
    let key = accession.to_owned();
    let claimed = tokio::task::spawn_blocking(move || studies.record(&key, &record)).await;
    let claimed = match claimed {
        Ok(Ok(claimed)) => claimed,
        Ok(Err(e)) => {
            tracing::warn!("emr: {e}");
            return Problem::internal("the record could not be stored; see the server log")
                .into_response();
        }
        Err(e) => return Problem::internal(format!("emr task: {e}")).into_response(),
    };
    state.metrics.emr_record();
    let matched: Vec<String> = claimed.iter().map(|c| c.study_uid.clone()).collect();
    tracing::info!(
        "emr: record {} received, {} waiting studies matched",
        crate::studies::fingerprint(accession),
        matched.len()
    );
    let runtime = tokio::runtime::Handle::current();
    for study in claimed {
        state.metrics.study_matched();
        super::studies::spawn_inference(&runtime, state, &dicom.studies, study, None);
    }
    let status = if matched.is_empty() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    response::json(
        status,
        &json!({
            "matched": !matched.is_empty(),
            "study_instance_uids": matched,
        }),
    )
}

/// `GET /v1/studies/{study_instance_uid}/result`: the study's state, and
/// its prediction once inferred.
fn study_result(state: &Arc<AppState>, path: &str) -> HttpResponse {
    let Some(dicom) = &state.dicom else {
        return Problem::not_found(path).into_response();
    };
    let Some(uid) = study_uid_of(path) else {
        return Problem::not_found(path).into_response();
    };
    let row = match dicom.studies.get(uid) {
        Ok(Some(row)) => row,
        Ok(None) => return Problem::not_found(path).into_response(),
        Err(e) => {
            tracing::warn!("study result: {e}");
            return Problem::internal("the studies database failed; see the server log")
                .into_response();
        }
    };
    let mut body = json!({
        "study_instance_uid": uid,
        "state": row.state,
        "image_only": row.image_only,
        "received_at_ms": row.received_at_ms,
    });
    if let Some(object) = body.as_object_mut() {
        if let Some(result) = row
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        {
            object.insert("result".to_owned(), result);
        }
        if let Some(reason) = row.reason {
            object.insert("reason".to_owned(), json!(reason));
        }
        if row.state == crate::studies::StudyState::Waiting {
            let deadline = row.received_at_ms
                + i64::try_from(dicom.studies.emr_wait().as_millis()).unwrap_or(i64::MAX);
            let left_s = (deadline - crate::studies::now_ms()).max(0) / 1000;
            object.insert("waits_until_ms".to_owned(), json!(deadline));
            object.insert("waits_for_s".to_owned(), json!(left_s));
        }
    }
    response::json(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    use super::with_federation_counters;

    #[test]
    fn federation_counters_go_before_the_one_closing_eof() {
        let text = "# TYPE a counter\na_total 1\n# EOF\n".to_owned();
        let merged = with_federation_counters(text, "# TYPE b counter\nb_total 2\n");
        assert_eq!(
            merged,
            "# TYPE a counter\na_total 1\n# TYPE b counter\nb_total 2\n# EOF\n"
        );
        assert_eq!(merged.matches("# EOF").count(), 1);
    }
}
