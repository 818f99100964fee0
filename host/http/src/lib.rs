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
//! - [`tls`]: rustls server acceptor and client connector from PEM files;
//! - [`predict_body`]: a prediction request's body (multipart or JSON) split
//!   into the radiograph's bytes and the EMR record.
//!
//! This crate depends on no other oxbox crate (no plugins, DICOM, pipeline,
//! model, store, `serve` or the aggregator), and the compiler holds it to
//! that. What a server does with a request (routes, admission, the model)
//! is the caller's handler.

pub mod auth;
pub mod body;
pub mod predict_body;
pub mod problem;
pub mod response;
pub mod server;
pub mod tls;

pub use auth::{BearerToken, TokenError};
pub use body::{Body, BodyLimits};
pub use problem::{PROBLEM_JSON, Problem};
pub use response::HttpResponse;
pub use server::{ConnectionLimits, HttpError, ShutdownSignals};
