//! Routing and the handlers: one function per route, each returning a
//! complete response (JSON, the metrics text, or a problem).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::json;

use super::AppState;
use super::problem::Problem;
use crate::dicom::DicomFile;
use crate::pipeline::{PipelineError, PredictionReport};
use crate::plugins::PluginError;
use crate::plugins::manifest::SignatureStatus;
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
            Route::Other => "other",
        }
    }

    fn method(self) -> Option<Method> {
        match self {
            Route::Predict | Route::Reload => Some(Method::POST),
            Route::Other => None,
            _ => Some(Method::GET),
        }
    }

    /// Liveness and readiness answer without the token (probes).
    fn needs_token(self) -> bool {
        !matches!(self, Route::Health | Route::Ready)
    }
}

type HttpResponse = Response<Full<Bytes>>;

/// Answers one request.
pub async fn handle(state: Arc<AppState>, request: Request<Incoming>) -> HttpResponse {
    let route = Route::of(request.uri().path());
    let response = dispatch(&state, route, request).await;
    state
        .metrics
        .request(route.label(), response.status().as_u16());
    response
}

async fn dispatch(state: &Arc<AppState>, route: Route, request: Request<Incoming>) -> HttpResponse {
    let Some(method) = route.method() else {
        return Problem::not_found(request.uri().path()).into_response();
    };
    if request.method() != method {
        return Problem::method_not_allowed(method.as_str()).into_response();
    }
    if route.needs_token()
        && let Some(token) = &state.token
        && !token.accepts(
            request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    {
        return Problem::unauthorized("send Authorization: Bearer <token from server.token_file>")
            .into_response();
    }
    match route {
        Route::Health => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        Route::Ready => ready(state),
        Route::Model => model(state),
        Route::Plugins => plugins(state),
        Route::Metrics => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(state.metrics.encode())))
            .unwrap_or_else(|_| Problem::internal("metrics").into_response()),
        Route::OpenApi => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())))
            .unwrap_or_else(|_| Problem::internal("openapi").into_response()),
        Route::Predict => predict(state, request).await,
        Route::Reload => reload(state).await,
        Route::Other => Problem::not_found(request.uri().path()).into_response(),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Problem::internal("response").into_response()),
        Err(e) => Problem::internal(format!("serialising the response: {e}")).into_response(),
    }
}

/// Ready when the model is loaded (it is, once the server listens) and no
/// plugin is quarantined.
fn ready(state: &AppState) -> HttpResponse {
    let plugins = state.plugins.current();
    let quarantined: Vec<String> = plugins
        .plugins()
        .iter()
        .filter(|p| p.is_quarantined())
        .map(|p| format!("{} {}", p.name(), p.version()))
        .collect();
    if quarantined.is_empty() {
        json_response(
            StatusCode::OK,
            &json!({
                "ready": true,
                "model_digest": state.pipeline.model().package().digest,
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

fn model(state: &AppState) -> HttpResponse {
    let package = state.pipeline.model().package();
    let manifest = &package.manifest;
    json_response(
        StatusCode::OK,
        &json!({
            "model": state.pipeline.model_identity(),
            "input_size": manifest.input_size,
            "architecture": manifest.architecture,
            "emr": manifest.emr,
            "outputs": ["p_o2_any", "p_o2_high_flow_or_niv", "p_ventilation_or_death", "exam_score"],
            "horizons": ["24h", "72h"],
        }),
    )
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
                "signed_by": match signature {
                    SignatureStatus::Verified { key } => Some(key.clone()),
                    SignatureStatus::Unsigned => None,
                },
                "consecutive_faults": p.consecutive_faults(),
                "quarantined": p.is_quarantined(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "plugins": list }))
}

async fn reload(state: &Arc<AppState>) -> HttpResponse {
    let registry = Arc::clone(&state.plugins);
    match tokio::task::spawn_blocking(move || registry.reload()).await {
        Ok(Ok(count)) => {
            tracing::info!("plugins reloaded over HTTP: {count} plugin(s)");
            plugins(state)
        }
        Ok(Err(e)) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reload-failed",
            "Plugin reload failed",
            format!("{e}; the running plugins stay in place"),
        )
        .into_response(),
        Err(e) => Problem::internal(format!("reload task: {e}")).into_response(),
    }
}

/// The two ways a prediction request can carry its case.
enum CaseBody {
    /// `multipart/form-data`: a `dicom` part and an `emr` part.
    Multipart { dicom: Option<Bytes>, emr: Bytes },
    /// `application/json`: `{"emr": {...}}`.
    Json(serde_json::Value),
}

async fn predict(state: &Arc<AppState>, request: Request<Incoming>) -> HttpResponse {
    let request_id = new_request_id();
    let Ok(_permit) = Arc::clone(&state.permits).try_acquire_owned() else {
        return Problem::overloaded(state.settings.max_concurrent)
            .for_request(&request_id)
            .into_response();
    };
    state.metrics.in_flight().inc();
    let started = Instant::now();
    let outcome = predict_case(state, &request_id, request).await;
    state.metrics.in_flight().dec();
    let (response, audit) = match outcome {
        Ok(report) => {
            let t = report.timings_ms;
            for (stage, ms) in [
                ("decode", t.decode),
                ("plugins", t.plugins),
                ("inference", t.inference),
            ] {
                state.metrics.stage(stage, ms);
            }
            state
                .metrics
                .stage("total", started.elapsed().as_secs_f64() * 1e3);
            let audit = report.audit_record();
            let mut response = json_response(StatusCode::OK, &report);
            if let Ok(value) = header::HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-request-id", value);
            }
            (response, audit)
        }
        Err(problem) => {
            let audit = state.pipeline.refused_record(
                &request_id,
                &state.plugins.current(),
                problem.status < 500,
            );
            (problem.for_request(&request_id).into_response(), audit)
        }
    };
    let log = Arc::clone(&state.audit);
    let written = tokio::task::spawn_blocking(move || match log.lock() {
        Ok(log) => log.record(&audit).map_err(|e| e.to_string()),
        Err(_) => Err("audit log lock poisoned".to_owned()),
    })
    .await;
    match written {
        Ok(Ok(())) => response,
        // A prediction that cannot be audited is not given out.
        Ok(Err(e)) => Problem::internal(format!("audit log: {e}"))
            .for_request(&request_id)
            .into_response(),
        Err(e) => Problem::internal(format!("audit task: {e}"))
            .for_request(&request_id)
            .into_response(),
    }
}

async fn predict_case(
    state: &Arc<AppState>,
    request_id: &str,
    request: Request<Incoming>,
) -> Result<PredictionReport, Problem> {
    let body = read_case(state, request).await?;
    let (dicom, emr) = match body {
        CaseBody::Multipart { dicom, emr } => {
            let emr: serde_json::Value = serde_json::from_slice(&emr)
                .map_err(|e| Problem::malformed(format!("the emr part is not JSON: {e}")))?;
            (dicom, emr)
        }
        CaseBody::Json(mut value) => {
            let Some(object) = value.as_object_mut() else {
                return Err(Problem::malformed(
                    "the JSON body must be an object {\"emr\": {...}}",
                ));
            };
            if let Some(key) = object.keys().find(|k| k.as_str() != "emr") {
                return Err(Problem::malformed(format!(
                    "unknown key {key:?} in the JSON body; it takes {{\"emr\": {{...}}}} (send a radiograph as multipart/form-data)"
                )));
            }
            let Some(emr) = object.remove("emr") else {
                return Err(Problem::malformed("the JSON body has no \"emr\" object"));
            };
            (None, emr)
        }
    };
    if !emr.is_object() {
        return Err(Problem::malformed(
            "the EMR record must be a JSON object of the site's fields",
        ));
    }

    // Decode and plugins: CPU work, off the async threads.
    let pipeline = Arc::clone(&state.pipeline);
    let plugins = state.plugins.current();
    let limits = state.limits.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let file = dicom
            .as_deref()
            .map(|bytes| DicomFile::from_bytes(bytes, &limits))
            .transpose()?;
        pipeline.prepare(file.as_ref(), &emr, &plugins)
    })
    .await
    .map_err(|e| Problem::internal(format!("prediction task: {e}")))?;
    let mut case = match prepared {
        Ok(case) => case,
        Err(e) => {
            count_plugin_fault(state, &e);
            tracing::info!(request_id, "prediction refused: {}", category(&e));
            return Err(Problem::from_pipeline(&e));
        }
    };
    let output = state
        .batcher
        .infer(std::mem::take(&mut case.input))
        .await
        .map_err(|e| match e {
            super::batcher::BatchError::Model(e) => {
                Problem::from_pipeline(&PipelineError::Model(e))
            }
            super::batcher::BatchError::Stopped => {
                let mut p = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting-down",
                    "Shutting down",
                    "the server is shutting down",
                );
                p.retry_after = Some(5);
                p
            }
        })?;
    state.metrics.stage("queue", output.queue_ms);
    Ok(state
        .pipeline
        .report(request_id, case, output.prediction, output.inference_ms))
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
/// reading, and while reading), body timeout, media type.
async fn read_case(state: &AppState, request: Request<Incoming>) -> Result<CaseBody, Problem> {
    let max = state.settings.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(Problem::too_large(max));
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mime: mime::Mime = content_type.parse().map_err(|_| {
        Problem::unsupported_media_type(format!(
            "Content-Type {content_type:?}: send multipart/form-data (dicom + emr parts) or application/json"
        ))
    })?;
    let kind = match (mime.type_(), mime.subtype()) {
        (mime::MULTIPART, mime::FORM_DATA) => {
            let boundary = mime
                .get_param(mime::BOUNDARY)
                .map(|b| b.as_str().to_owned())
                .ok_or_else(|| Problem::malformed("multipart/form-data without a boundary"))?;
            Some(boundary)
        }
        (mime::APPLICATION, mime::JSON) => None,
        _ => {
            return Err(Problem::unsupported_media_type(format!(
                "Content-Type {}: send multipart/form-data (dicom + emr parts) or application/json",
                mime.essence_str()
            )));
        }
    };
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let timeout = state.settings.body_timeout;
    let body =
        match tokio::time::timeout(timeout, Limited::new(request.into_body(), limit).collect())
            .await
        {
            Err(_) => return Err(Problem::body_timeout(timeout.as_millis() as u64)),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Problem::too_large(max));
            }
            Ok(Err(e)) => return Err(Problem::malformed(format!("reading the body: {e}"))),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
    match kind {
        None => serde_json::from_slice(&body)
            .map(CaseBody::Json)
            .map_err(|e| Problem::malformed(format!("the body is not JSON: {e}"))),
        Some(boundary) => parse_multipart(body, boundary).await,
    }
}

async fn parse_multipart(body: Bytes, boundary: String) -> Result<CaseBody, Problem> {
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut dicom = None;
    let mut emr = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(Problem::malformed(format!("multipart body: {e}"))),
        };
        let name = field.name().unwrap_or("").to_owned();
        let media = field.content_type().map(|m| m.essence_str().to_owned());
        let slot = match name.as_str() {
            "dicom" => {
                if let Some(m) = media.as_deref()
                    && m != "application/dicom"
                    && m != "application/octet-stream"
                {
                    return Err(Problem::unsupported_media_type(format!(
                        "the dicom part is {m}; send application/dicom"
                    )));
                }
                &mut dicom
            }
            "emr" => {
                if let Some(m) = media.as_deref()
                    && m != "application/json"
                {
                    return Err(Problem::unsupported_media_type(format!(
                        "the emr part is {m}; send application/json"
                    )));
                }
                &mut emr
            }
            other => {
                return Err(Problem::malformed(format!(
                    "unexpected multipart part {other:?}; send \"dicom\" and \"emr\""
                )));
            }
        };
        if slot.is_some() {
            return Err(Problem::malformed(format!("the {name} part appears twice")));
        }
        let bytes = field
            .bytes()
            .await
            .map_err(|e| Problem::malformed(format!("multipart part {name}: {e}")))?;
        *slot = Some(bytes);
    }
    let emr = emr.ok_or_else(|| Problem::malformed("the multipart body has no emr part"))?;
    Ok(CaseBody::Multipart { dicom, emr })
}
