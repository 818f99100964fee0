//! The endpoint's own problems (RFC 9457, rendered by
//! [`crate::http::problem`]): overload and admission refusals, plugin
//! reloads, and the mapping of pipeline and inference failures to HTTP
//! statuses. The generic ones (400, 401, 404, 405, 408, 413, 415, 500)
//! are [`Problem`]'s own.

use hyper::StatusCode;

use super::batcher::BatchError;
use super::reload::ReloadFailure;
pub use crate::http::problem::{PROBLEM_JSON, Problem};
use crate::model::ModelError;
use crate::pipeline::PipelineError;
use crate::plugins::PluginError;

/// The endpoint's own problems, as constructors on [`Problem`] (the HTTP
/// crate knows nothing of plugins, the pipeline or the model).
pub trait ServeProblems {
    /// 503 with Retry-After: too many predictions in progress.
    fn overloaded(limit: usize) -> Self;

    /// 503 with Retry-After: the memory budget is in use by other requests
    /// (`detail` says how much this request needs).
    fn overloaded_memory(detail: impl Into<String>) -> Self;

    /// 413: one case whose estimated decoded size exceeds the whole memory
    /// budget; retrying cannot help.
    fn case_too_large(detail: impl Into<String>) -> Self;

    /// 403: an admin route on a server without `server.token_file`.
    fn admin_needs_token() -> Self;

    /// 409: another plugin reload is running.
    fn reload_in_progress() -> Self;

    /// 429 with Retry-After: a reload sooner than
    /// `server.reload_min_interval_s` after the previous one.
    fn reload_rate_limited(retry_after_s: u32, interval_s: u64) -> Self;

    /// 409: another model reload is running.
    fn model_reload_in_progress() -> Self;

    /// 429 with Retry-After: a model reload sooner than
    /// `server.reload_min_interval_s` after the previous one.
    fn model_reload_rate_limited(retry_after_s: u32, interval_s: u64) -> Self;

    /// 422: the model to serve did not load (unreadable, corrupted, not
    /// the digest its promotion named, weights that do not fit); the
    /// running model stays.
    fn model_reload_failed(detail: &str) -> Self;

    /// The problem for a pipeline failure: 422 for input the DICOM checks,
    /// the schema, a plugin or the model refused; 400 for an EMR record that
    /// is not a JSON object of scalars; 503 for a quarantined plugin and
    /// for a plugin call that found every sandbox busy (overloaded, with
    /// Retry-After); 500 for plugin faults and model failures.
    fn from_pipeline(error: &PipelineError) -> Self;

    /// The problem for a case the inference thread gave no prediction:
    /// the model's refusal as [`Problem::from_pipeline`]; 500 with a fixed
    /// detail for a forward pass that panicked (the panic's text, logged by
    /// the inference thread, may quote anything and is never sent) or a lost
    /// case; 503 with Retry-After once the thread has stopped
    /// (`stopped_reason`, from [`super::batcher::Batcher::stopped`]).
    fn from_batch(error: BatchError, stopped_reason: Option<String>) -> Self;

    /// The problem for a plugin reload that loaded no new set: 503
    /// overloaded with Retry-After when every sandbox was busy (load), 422
    /// reload-failed otherwise. Either way the running plugins stay.
    fn reload_failed(failure: &ReloadFailure) -> Self;
}

impl ServeProblems for Problem {
    fn overloaded(limit: usize) -> Self {
        let mut p = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            format!(
                "{limit} predictions are in progress (server.max_concurrent_requests); retry shortly"
            ),
        );
        p.retry_after = Some(1);
        p
    }

    fn overloaded_memory(detail: impl Into<String>) -> Self {
        let mut p = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            format!("{}; retry shortly", detail.into()),
        );
        p.retry_after = Some(1);
        p
    }

    fn case_too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "case-too-large",
            "Case too large for this box",
            detail,
        )
    }

    fn admin_needs_token() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "admin-token-required",
            "Admin routes need a token",
            "the admin routes require a bearer token, on loopback too: set server.token_file \
             (e.g. `openssl rand -hex 32 > /etc/oxbox/token && chmod 600 /etc/oxbox/token`), \
             restart, and send Authorization: Bearer <token>; or reload with SIGHUP",
        )
    }

    fn reload_in_progress() -> Self {
        let mut p = Self::new(
            StatusCode::CONFLICT,
            "reload-in-progress",
            "Reload in progress",
            "another plugin reload is running; retry when it has finished",
        );
        p.retry_after = Some(1);
        p
    }

    fn reload_rate_limited(retry_after_s: u32, interval_s: u64) -> Self {
        let mut p = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many reloads",
            format!(
                "at most one plugin reload per {interval_s} s (server.reload_min_interval_s); retry in {retry_after_s} s"
            ),
        );
        p.retry_after = Some(retry_after_s);
        p
    }

    fn model_reload_in_progress() -> Self {
        let mut p = Self::new(
            StatusCode::CONFLICT,
            "reload-in-progress",
            "Reload in progress",
            "another model reload is running; retry when it has finished",
        );
        p.retry_after = Some(1);
        p
    }

    fn model_reload_rate_limited(retry_after_s: u32, interval_s: u64) -> Self {
        let mut p = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many reloads",
            format!(
                "at most one model reload per {interval_s} s (server.reload_min_interval_s); retry in {retry_after_s} s"
            ),
        );
        p.retry_after = Some(retry_after_s);
        p
    }

    fn model_reload_failed(detail: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "model-reload-failed",
            "Model reload failed",
            format!("{detail}; the running model stays in place"),
        )
    }

    fn from_pipeline(error: &PipelineError) -> Self {
        let mut problem = pipeline_problem(error);
        problem.reason = Some(error.redacted());
        problem
    }

    fn from_batch(error: BatchError, stopped_reason: Option<String>) -> Self {
        match error {
            BatchError::Model(e) => Self::from_pipeline(&PipelineError::Model(e)),
            BatchError::Panicked(_) => Self::internal(
                "the model's forward pass failed on this case (logged on the server); the inference thread carries on, retry the request",
            ),
            BatchError::Lost => Self::internal(format!(
                "{}; the inference thread carries on, retry the request",
                BatchError::Lost
            )),
            BatchError::Stopped => {
                let mut p = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting-down",
                    "Shutting down",
                    stopped_reason.unwrap_or_else(|| "the server is shutting down".to_owned()),
                );
                p.retry_after = Some(5);
                p
            }
        }
    }

    fn reload_failed(failure: &ReloadFailure) -> Self {
        match failure {
            ReloadFailure::Busy(e) => {
                let mut p = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "Overloaded",
                    format!("{e}; the running plugins stay in place"),
                );
                p.retry_after = Some(1);
                p
            }
            ReloadFailure::Failed(e) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload-failed",
                "Plugin reload failed",
                format!("{e}; the running plugins stay in place"),
            ),
        }
    }
}

fn pipeline_problem(error: &PipelineError) -> Problem {
    let unprocessable = |slug, title| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            slug,
            title,
            error.to_string(),
        )
    };
    match error {
        PipelineError::Dicom(_) => unprocessable("dicom-rejected", "Radiograph rejected"),
        PipelineError::Record(_) => Problem::malformed(error.to_string()),
        PipelineError::NotCanonical { .. } => unprocessable("emr-rejected", "EMR record rejected"),
        PipelineError::Plugin(PluginError::Quarantined { .. }) => {
            let mut p = Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "plugin-quarantined",
                "Site plugin quarantined",
                error.to_string(),
            );
            p.retry_after = Some(60);
            p
        }
        // Every sandbox busy for the call's whole wait: load, not a
        // fault of the plugin (never counted towards quarantine).
        PipelineError::Plugin(PluginError::Busy { .. }) => {
            let mut p = Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Overloaded",
                error.to_string(),
            );
            p.retry_after = Some(1);
            p
        }
        PipelineError::Plugin(e) if e.is_bad_input() => {
            unprocessable("plugin-rejected", "Rejected by a site plugin")
        }
        PipelineError::Plugin(_) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin-fault",
            "Site plugin failed",
            error.to_string(),
        ),
        PipelineError::Model(ModelError::Input(_)) => {
            unprocessable("model-input-rejected", "Input does not fit the model")
        }
        PipelineError::Model(_) => Problem::internal(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use hyper::header;

    use super::*;

    #[test]
    fn a_panicking_forward_pass_answers_500_without_the_panic_text() {
        let secret = "index out of bounds: patient DOE^JANE row 17";
        let p = Problem::from_batch(BatchError::Panicked(secret.to_owned()), None);
        assert_eq!(p.status, 500);
        assert!(!p.detail.contains("DOE"), "{}", p.detail);
        assert!(!p.detail.contains("index out of bounds"), "{}", p.detail);
        assert!(p.detail.contains("logged on the server"), "{}", p.detail);
        let body = String::from_utf8(serde_json::to_vec(&p).expect("json")).expect("utf-8");
        assert!(!body.contains("DOE"), "{body}");
        let stopped = Problem::from_batch(BatchError::Stopped, Some("gone".to_owned()));
        assert_eq!((stopped.status, stopped.retry_after), (503, Some(5)));
        assert_eq!(stopped.detail, "gone");
    }

    #[test]
    fn a_reload_that_finds_every_sandbox_busy_is_503_with_retry_after() {
        let busy = Problem::reload_failed(&ReloadFailure::Busy(
            "plugin x 1.0: all 32 sandboxes stayed busy for 250 ms; retry shortly".to_owned(),
        ));
        assert_eq!(busy.status, 503);
        assert_eq!(busy.kind, "urn:oxbox:problem:overloaded");
        assert_eq!(busy.retry_after, Some(1));
        let response = busy.into_response();
        assert_eq!(
            response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let failed =
            Problem::reload_failed(&ReloadFailure::Failed("configuration: bad".to_owned()));
        assert_eq!(failed.status, 422);
        assert_eq!(failed.kind, "urn:oxbox:problem:reload-failed");
        assert!(failed.detail.ends_with("the running plugins stay in place"));
    }
}
