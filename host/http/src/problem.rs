//! Errors as RFC 9457 problem details (`application/problem+json`): an HTTP
//! status, a stable `type` (`urn:oxbox:problem:<slug>`), a title and a
//! detail, with `Retry-After` and extra headers where they apply. The
//! problems every server answers live here; a server adds its own
//! constructors (`impl Problem` in its module) for its own refusals.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};
use serde::Serialize;

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The `type` of an overload refusal (503 with `Retry-After`).
const OVERLOADED: &str = "urn:oxbox:problem:overloaded";

/// One problem: what went wrong, for the client (never patient data: the
/// detail comes from checks that name tags, fields and limits, not values).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:oxbox:problem:<slug>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What exactly is wrong with this request.
    pub detail: String,
    /// The request id (also in the audit log), when one was assigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Seconds after which a retry may succeed (also sent as Retry-After).
    #[serde(skip)]
    pub retry_after: Option<u32>,
    /// Extra headers (`WWW-Authenticate`, `Allow`).
    #[serde(skip)]
    pub headers: Vec<(header::HeaderName, String)>,
    /// What the server log and the audit record say about it, when the
    /// detail may quote the input (a plugin's message, a schema error): a
    /// redacted text naming the cause without its values. Not sent to the
    /// client, which gets the detail.
    #[serde(skip)]
    pub reason: Option<String>,
}

impl Problem {
    /// A problem of kind `slug` with `status`, `title` and `detail`.
    pub fn new(
        status: StatusCode,
        slug: &str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("urn:oxbox:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            request_id: None,
            retry_after: None,
            headers: Vec::new(),
            reason: None,
        }
    }

    /// 400: the request is malformed.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail,
        )
    }

    /// 413: the body is larger than `limit_bytes`, which the config key
    /// `setting` (in MiB) sets.
    pub fn too_large(limit_bytes: u64, setting: &str) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Request body too large",
            format!(
                "the body exceeds {setting} ({} MiB)",
                limit_bytes / (1024 * 1024)
            ),
        )
    }

    /// 415: a media type the route does not take.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
    }

    /// Whether this is an overload refusal (503 `overloaded`), which
    /// servers neither audit nor log per request (a flood must not grow
    /// either).
    pub fn is_overloaded(&self) -> bool {
        self.status == 503 && self.kind == OVERLOADED
    }

    /// 401: no or a wrong bearer token (with `WWW-Authenticate`).
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        let mut p = Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        );
        p.headers.push((
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"oxbox\"".to_owned(),
        ));
        p
    }

    /// 404: no such route (every oxbox server describes its routes at
    /// `/v1/openapi.json`).
    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no route {path:?}; see /v1/openapi.json"),
        )
    }

    /// 405: the route exists with other methods (with `Allow`).
    pub fn method_not_allowed(allowed: &str) -> Self {
        let mut p = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("this route takes {allowed}"),
        );
        p.headers.push((header::ALLOW, allowed.to_owned()));
        p
    }

    /// 408: the body did not arrive within `ms` milliseconds, which the
    /// config key `setting` sets.
    pub fn body_timeout(ms: u64, setting: &str) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "Request body timeout",
            format!("the body did not arrive within {setting} ({ms} ms)"),
        )
    }

    /// 500: the box failed (not the input's fault).
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
            "Internal error",
            detail,
        )
    }

    /// What to log and audit for this problem: the redacted
    /// [`reason`](Self::reason) when there is one, else its title (fixed
    /// text).
    pub fn audit_reason(&self) -> String {
        self.reason.clone().unwrap_or_else(|| self.title.to_owned())
    }

    /// With the request id.
    pub fn for_request(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id.to_owned());
        self
    }

    /// The HTTP response: the JSON body, `Content-Type:
    /// application/problem+json`, `Retry-After` when set, and the extra
    /// headers.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut builder = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, PROBLEM_JSON);
        if let Some(seconds) = self.retry_after {
            builder = builder.header(header::RETRY_AFTER, seconds.to_string());
        }
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| {
                let mut fallback = Response::new(Full::new(Bytes::new()));
                *fallback.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                fallback
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_renders_as_problem_json_with_retry_after_and_its_headers() {
        let mut p = Problem::method_not_allowed("POST").for_request("req-1");
        p.retry_after = Some(7);
        p.reason = Some("internal only".to_owned());
        let response = p.into_response();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header(header::CONTENT_TYPE).as_deref(), Some(PROBLEM_JSON));
        assert_eq!(header(header::RETRY_AFTER).as_deref(), Some("7"));
        assert_eq!(header(header::ALLOW).as_deref(), Some("POST"));
        let mut p = Problem::method_not_allowed("POST").for_request("req-1");
        p.reason = Some("internal only".to_owned());
        let body: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&p).expect("json")).expect("parse");
        assert_eq!(
            body,
            serde_json::json!({
                "type": "urn:oxbox:problem:method-not-allowed",
                "title": "Method not allowed",
                "status": 405,
                "detail": "this route takes POST",
                "request_id": "req-1",
            })
        );
    }

    #[test]
    fn limits_are_named_by_their_config_key() {
        let p = Problem::too_large(64 * 1024 * 1024, "server.max_body_mib");
        assert_eq!(
            (p.status, p.detail.as_str()),
            (413, "the body exceeds server.max_body_mib (64 MiB)")
        );
        let p = Problem::body_timeout(1500, "server.body_timeout_ms");
        assert_eq!(
            (p.status, p.detail.as_str()),
            (
                408,
                "the body did not arrive within server.body_timeout_ms (1500 ms)"
            )
        );
        assert!(!Problem::internal("x").is_overloaded());
    }
}
