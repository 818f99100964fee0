//! The HTTP/1.1 plumbing every oxbox server shares (hyper 1 on tokio): the
//! inference endpoint (`oxbox serve`) today, the federation aggregator next.
//!
//! - [`server`]: binding, the runtime, the accept loop with
//!   `max_connections`, the header timeout and read-buffer limit per
//!   connection, and the graceful drain on SIGINT/SIGTERM;
//! - [`body`]: reading a request body under a size limit and a timeout,
//!   with a hook that admits each chunk as it arrives;
//! - [`problem`]: RFC 9457 problem details (`application/problem+json`)
//!   with `Retry-After` and extra headers, and the generic problems (400,
//!   401, 404, 405, 408, 413, 415, 500);
//! - [`auth`]: the bearer token, read from a file only its owner can read
//!   and compared by digest;
//! - [`response`]: JSON and OpenMetrics responses;
//! - [`tls`]: rustls server acceptor and client connector from PEM files.
//!
//! This module depends on no other module of the crate (no plugins, DICOM,
//! pipeline, model, store, `serve` or the aggregator): a unit test below reads its sources
//! and fails on any path from the crate root that leaves it. What a server
//! does with a request (routes, admission, the model) is the caller's
//! handler.

pub mod auth;
pub mod body;
pub mod problem;
pub mod response;
pub mod server;
pub mod tls;

pub use auth::{BearerToken, TokenError};
pub use body::{Body, BodyLimits};
pub use problem::{PROBLEM_JSON, Problem};
pub use response::HttpResponse;
pub use server::{ConnectionLimits, HttpError, ShutdownSignals};

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The layering, proven on the sources: nothing under `src/http` names
    /// another module of the crate, so the aggregator can use it without
    /// linking plugins, DICOM or the pipeline.
    #[test]
    fn the_http_module_uses_no_other_module_of_the_crate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("src/http") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        assert!(files.len() >= 6, "sources not found: {files:?}");
        // Spelt in pieces so that this test's own text does not match.
        let crate_path = concat!("crate", "::");
        let outside = [concat!("super", "::super"), concat!("oxbox", "::")];
        let mut offending = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read");
            for (n, line) in text.lines().enumerate() {
                let leaves_crate_path = line
                    .match_indices(crate_path)
                    .any(|(at, _)| !line[at + crate_path.len()..].starts_with("http"));
                if leaves_crate_path || outside.iter().any(|o| line.contains(o)) {
                    offending.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            offending.is_empty(),
            "src/http must not use other modules of the crate (plugins, dicom, pipeline, model, serve, ...):\n{}",
            offending.join("\n")
        );
    }
}
