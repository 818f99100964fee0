//! Reading a request body: a size limit (checked on `Content-Length` before
//! reading and on every chunk while reading) and a timeout for the whole
//! body. The body is kept as the chunks hyper hands over, never in a buffer
//! sized from the declared length: a client that declares 64 MiB and sends
//! nothing holds nothing. A caller that accounts memory admits each chunk
//! as it arrives.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, HeaderMap};

use crate::problem::Problem;

/// The limits a body is read under, with the config keys that set them
/// (named in the problems a client gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest body, bytes.
    pub max_bytes: u64,
    /// The config key of the size limit, in MiB (`server.max_body_mib`).
    pub max_bytes_setting: &'static str,
    /// Time for the whole body to arrive.
    pub timeout: Duration,
    /// The config key of the timeout, in ms (`server.body_timeout_ms`).
    pub timeout_setting: &'static str,
}

impl BodyLimits {
    /// 413 [`Problem::too_large`] when the request declares a
    /// `Content-Length` over the limit (checked before anything is read),
    /// else `None`.
    pub fn declared_too_large(&self, headers: &HeaderMap) -> Option<Problem> {
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        declared
            .is_some_and(|len| len > self.max_bytes)
            .then(|| self.too_large())
    }

    fn too_large(&self) -> Problem {
        Problem::too_large(self.max_bytes, self.max_bytes_setting)
    }

    fn timed_out(&self) -> Problem {
        Problem::body_timeout(
            u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            self.timeout_setting,
        )
    }
}

/// A body as it arrived: its chunks and their total length.
#[derive(Debug, Default)]
pub struct Body {
    /// The chunks, in order (none empty).
    pub chunks: Vec<Bytes>,
    /// Their total length, bytes.
    pub len: usize,
}

impl Body {
    /// The body as one buffer of exactly [`len`](Self::len) bytes (no copy
    /// for a body that came in one chunk).
    pub fn into_contiguous(self) -> Bytes {
        if self.chunks.len() == 1 {
            return self.chunks.into_iter().next().unwrap_or_default();
        }
        let mut body = Vec::with_capacity(self.len);
        for chunk in self.chunks {
            body.extend_from_slice(&chunk);
        }
        Bytes::from(body)
    }
}

/// Reads `request`'s body under `limits`, offering each non-empty chunk
/// to `admit` before keeping it. Once `admit` refuses a chunk, nothing more
/// is kept (what was kept is dropped), but the rest of the body is still
/// read and discarded, within the same limits, so that the client gets the
/// refusal rather than a reset connection; the refusal is returned at the
/// end.
///
/// # Errors
/// 413 [`Problem::too_large`] (declared or received over the limit), 408
/// [`Problem::body_timeout`], 400 [`Problem::malformed`] when the
/// connection fails mid-body, or `admit`'s refusal.
pub async fn read_body(
    request: Request<Incoming>,
    limits: &BodyLimits,
    mut admit: impl FnMut(&Bytes) -> Result<(), Box<Problem>>,
) -> Result<Body, Problem> {
    if let Some(problem) = limits.declared_too_large(request.headers()) {
        return Err(problem);
    }
    let limit = usize::try_from(limits.max_bytes).unwrap_or(usize::MAX);
    let read = async {
        let mut incoming = request.into_body();
        let mut body = Body::default();
        let mut refused = None;
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| Problem::malformed(format!("reading the body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            body.len = body.len.saturating_add(data.len());
            if body.len > limit {
                return Err(limits.too_large());
            }
            if refused.is_some() || data.is_empty() {
                continue;
            }
            match admit(&data) {
                Ok(()) => body.chunks.push(data),
                Err(problem) => {
                    refused = Some(*problem);
                    body.chunks = Vec::new();
                }
            }
        }
        match refused {
            Some(problem) => Err(problem),
            None => Ok(body),
        }
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Err(_) => Err(limits.timed_out()),
        Ok(result) => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        max_bytes: 2 * 1024 * 1024,
        max_bytes_setting: "server.max_body_mib",
        timeout: Duration::from_secs(1),
        timeout_setting: "server.body_timeout_ms",
    };

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let mut headers = HeaderMap::new();
        assert!(LIMITS.declared_too_large(&headers).is_none());
        headers.insert(CONTENT_LENGTH, "2097152".parse().expect("value"));
        assert!(LIMITS.declared_too_large(&headers).is_none());
        headers.insert(CONTENT_LENGTH, "2097153".parse().expect("value"));
        let p = LIMITS.declared_too_large(&headers).expect("over the limit");
        assert_eq!(p.status, 413);
        assert!(
            p.detail.contains("server.max_body_mib (2 MiB)"),
            "{}",
            p.detail
        );
    }

    #[test]
    fn chunks_join_into_one_buffer_of_the_body_length() {
        let body = Body {
            chunks: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")],
            len: 5,
        };
        assert_eq!(body.into_contiguous(), Bytes::from_static(b"abcde"));
        assert!(Body::default().into_contiguous().is_empty());
    }
}
