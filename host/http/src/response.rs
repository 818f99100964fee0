//! Successful responses: JSON values, static JSON documents and the
//! OpenMetrics text exposition. Errors are [`Problem`]s.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

use crate::problem::Problem;

/// What every handler answers: a complete response with its body in
/// memory.
pub type HttpResponse = Response<Full<Bytes>>;

/// The media type of `GET /metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `value` as `application/json` with `status`; a 500 problem if it
/// cannot be serialised.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, "application/json", Bytes::from(body)),
        Err(e) => Problem::internal(format!("serialising the response: {e}")).into_response(),
    }
}

/// A JSON document compiled into the binary (an OpenAPI document), as
/// `application/json`.
pub fn static_json(document: &'static str) -> HttpResponse {
    with_body(
        StatusCode::OK,
        "application/json",
        Bytes::from_static(document.as_bytes()),
    )
}

/// A metrics exposition (the OpenMetrics text format).
pub fn openmetrics(text: String) -> HttpResponse {
    with_body(StatusCode::OK, OPENMETRICS, Bytes::from(text))
}

fn with_body(status: StatusCode, content_type: &'static str, body: Bytes) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .unwrap_or_else(|_| Problem::internal("building the response").into_response())
}
