//! The site's HTTP transport to the aggregator: one request at a time over
//! hyper 1's HTTP/1.1 client (TLS through rustls when the URL is
//! `https://`), behind a blocking API on a small runtime of its own.
//!
//! It trusts nothing it receives: answers are read up to a stated size,
//! signed documents come back unverified ([`SignedDocument`]: the caller
//! verifies them against the aggregator's key before using them), and a
//! refusal carries only the problem's type, status and detail — never a
//! body the site sent. What it sends is what the site signed: documents
//! and shard bytes, nothing else.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use super::signed::{SIGNATURE_HEADER, SignedDocument};

/// Largest answer to a task, record or upload request (a signed JSON
/// document).
pub const MAX_DOCUMENT_BYTES: u64 = 1 << 20;

/// Why a request to the aggregator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The aggregator URL is not usable.
    #[error("aggregator URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The TLS trust store could not be built.
    #[error("TLS trust store {path}: {reason}")]
    Tls {
        /// The PEM file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The connection failed or broke (worth retrying).
    #[error("{what}: {reason}")]
    Transport {
        /// The request (`GET /v1/task`).
        what: String,
        /// Why.
        reason: String,
    },
    /// No complete answer within the request timeout (worth retrying).
    #[error("{what}: no answer within {seconds} s")]
    Timeout {
        /// The request.
        what: String,
        /// The timeout.
        seconds: u64,
    },
    /// The answer is larger than it may be.
    #[error("{what}: answer over {limit} bytes")]
    TooLarge {
        /// The request.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// The aggregator answered with an error status.
    #[error("{what}: {status} {problem}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Refused {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The problem's `type` (or the status's reason).
        problem: String,
        /// The problem's `detail`, if any.
        detail: String,
    },
    /// The answer is not what the API promises.
    #[error("{what}: unexpected answer: {reason}")]
    Protocol {
        /// The request.
        what: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// Whether trying again later may succeed: transport failures,
    /// timeouts, 5xx and 429 answers.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } | ClientError::Timeout { .. } => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A parsed base URL: `http(s)://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatorUrl {
    /// `https://`.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (default 80 / 443).
    pub port: u16,
    /// Path prefix without a trailing `/` (usually empty).
    pub prefix: String,
}

impl AggregatorUrl {
    /// Parses `text`; plain `http://` only to a loopback host (the update
    /// is signed, but the site's traffic should still not be readable on a
    /// network).
    ///
    /// # Errors
    /// A sentence saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: hyper::Uri = text
            .parse()
            .map_err(|e| format!("not a URL ({e}); write e.g. \"https://aggregator:7400\""))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("use an http:// or https:// URL".to_owned()),
        };
        let authority = uri.authority().ok_or_else(|| "no host".to_owned())?.clone();
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not accepted".to_owned());
        }
        if uri.query().is_some() {
            return Err("no query string, please".to_owned());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("no host".to_owned());
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if !tls && !is_loopback(&host) {
            return Err(
                "plain http:// only to a loopback address: use https:// (and federation.tls_ca)"
                    .to_owned(),
            );
        }
        Ok(Self {
            tls,
            host,
            port,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One answer.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// The `Oxbox-Signature` header, if any.
    pub signature: Option<String>,
    /// The `Retry-After` header in seconds, if any (the delay form only).
    pub retry_after_s: Option<u64>,
    /// Its body.
    pub body: Vec<u8>,
}

/// A blocking HTTP client for one aggregator (or one local `oxbox serve`).
pub struct AggregatorClient {
    url: AggregatorUrl,
    runtime: tokio::runtime::Runtime,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
}

impl std::fmt::Debug for AggregatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregatorClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl AggregatorClient {
    /// A client of `url`, trusting the certificates in `tls_ca` (PEM) for
    /// `https://`; every request must be done within `timeout`.
    ///
    /// # Errors
    /// [`ClientError::Url`], [`ClientError::Tls`].
    pub fn new(url: &str, tls_ca: Option<&Path>, timeout: Duration) -> Result<Self, ClientError> {
        let parsed = AggregatorUrl::parse(url).map_err(|reason| ClientError::Url {
            url: url.to_owned(),
            reason,
        })?;
        let tls = if parsed.tls {
            let ca = tls_ca.ok_or_else(|| ClientError::Url {
                url: url.to_owned(),
                reason: "https:// needs a trusted certificate (federation.tls_ca)".to_owned(),
            })?;
            Some(tls_connector(ca)?)
        } else {
            None
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Transport {
                what: "client runtime".to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            url: parsed,
            runtime,
            tls,
            timeout,
        })
    }

    /// The base URL.
    pub fn url(&self) -> &AggregatorUrl {
        &self.url
    }

    /// Sends one request: `body` with its content type and optional
    /// signature line, `bearer` token; the answer's body read up to
    /// `max_body` bytes. Any status comes back (no error for 4xx/5xx).
    ///
    /// # Errors
    /// [`ClientError::Transport`], [`ClientError::Timeout`],
    /// [`ClientError::TooLarge`].
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str, Option<&str>)>,
        bearer: Option<&str>,
        max_body: u64,
    ) -> Result<Answer, ClientError> {
        let what = format!("{method} {path}");
        let future = self.exchange(method, path, body, bearer, max_body, &what);
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, future).await })
            .map_err(|_| ClientError::Timeout {
                what: what.clone(),
                seconds: self.timeout.as_secs(),
            })?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str, Option<&str>)>,
        bearer: Option<&str>,
        max_body: u64,
        what: &str,
    ) -> Result<Answer, ClientError> {
        let transport = |reason: String| ClientError::Transport {
            what: what.to_owned(),
            reason,
        };
        let authority = self.url.authority();
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| transport(format!("connecting to {authority}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url.prefix))
            .header(header::HOST, authority.as_str());
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some((bytes, content_type, signature)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                if let Some(line) = signature {
                    request = request.header(SIGNATURE_HEADER, line);
                }
                bytes
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| transport(e.to_string()))?;
        let response = match &self.tls {
            Some(connector) => {
                let name = crate::http::tls::server_name(&self.url.host)
                    .map_err(|e| transport(e.to_string()))?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| transport(format!("TLS handshake: {e}")))?;
                round_trip(TokioIo::new(stream), request, &transport).await?
            }
            None => round_trip(TokioIo::new(stream), request, &transport).await?,
        };
        let status = response.status();
        let signature = response
            .headers()
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after_s = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Err(ClientError::TooLarge {
                what: what.to_owned(),
                limit: max_body,
            });
        }
        let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ClientError::TooLarge {
                        what: what.to_owned(),
                        limit: max_body,
                    }
                } else {
                    transport(format!("reading the answer: {e}"))
                }
            })?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            signature,
            retry_after_s,
            body,
        })
    }

    /// Sends a request and turns any non-2xx answer into
    /// [`ClientError::Refused`].
    fn expect_success(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str, Option<&str>)>,
        max_body: u64,
    ) -> Result<Answer, ClientError> {
        let what = format!("{method} {path}");
        let answer = self.send(method, path, body, None, max_body)?;
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(refusal(&what, &answer))
        }
    }

    /// `GET /v1/task`: the aggregator's signed round task (unverified).
    ///
    /// # Errors
    /// As [`AggregatorClient::send`], [`ClientError::Refused`], and
    /// [`ClientError::Protocol`] without a signature line.
    pub fn task(&self) -> Result<SignedDocument, ClientError> {
        self.signed_document("/v1/task")
    }

    /// `GET /v1/models/{digest}/record`: the signed record of a global
    /// model (unverified); `None` when the aggregator has none (404).
    ///
    /// # Errors
    /// As [`AggregatorClient::task`].
    pub fn model_record(&self, digest: &str) -> Result<Option<SignedDocument>, ClientError> {
        match self.signed_document(&format!("/v1/models/{}/record", path_segment(digest)?)) {
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            other => other.map(Some),
        }
    }

    fn signed_document(&self, path: &str) -> Result<SignedDocument, ClientError> {
        let what = format!("GET {path}");
        let answer = self.expect_success(Method::GET, path, None, MAX_DOCUMENT_BYTES)?;
        let line = answer.signature.ok_or_else(|| ClientError::Protocol {
            what: what.clone(),
            reason: format!("no {SIGNATURE_HEADER} header"),
        })?;
        SignedDocument::from_parts(answer.body, &line).map_err(|e| ClientError::Protocol {
            what,
            reason: e.to_string(),
        })
    }

    /// `GET /v1/models/{digest}/{file}`: one file of a global model
    /// package, at most `max_bytes` (the caller checks the digest).
    ///
    /// # Errors
    /// As [`AggregatorClient::send`], [`ClientError::Refused`].
    pub fn model_file(
        &self,
        digest: &str,
        file: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/models/{}/{file}", path_segment(digest)?);
        Ok(self
            .expect_success(Method::GET, &path, None, max_bytes)?
            .body)
    }

    /// `POST /v1/statistics`: the site's signed statistics; `true` when
    /// newly accepted (201), `false` when already accepted (200).
    ///
    /// # Errors
    /// As [`AggregatorClient::send`], [`ClientError::Refused`].
    pub fn send_statistics(&self, document: &SignedDocument) -> Result<bool, ClientError> {
        let line = document.signature_line();
        let answer = self.expect_success(
            Method::POST,
            "/v1/statistics",
            Some((
                Bytes::from(document.body.clone()),
                "application/json",
                Some(&line),
            )),
            MAX_DOCUMENT_BYTES,
        )?;
        Ok(answer.status == StatusCode::CREATED)
    }

    /// `POST /v1/updates`: the site's signed update manifest; the sha256
    /// of each shard the aggregator still lacks.
    ///
    /// # Errors
    /// As [`AggregatorClient::send`], [`ClientError::Refused`],
    /// [`ClientError::Protocol`] for an answer without `missing`.
    pub fn send_manifest(&self, document: &SignedDocument) -> Result<Vec<String>, ClientError> {
        let what = "POST /v1/updates";
        let line = document.signature_line();
        let answer = self.expect_success(
            Method::POST,
            "/v1/updates",
            Some((
                Bytes::from(document.body.clone()),
                "application/json",
                Some(&line),
            )),
            MAX_DOCUMENT_BYTES,
        )?;
        #[derive(serde::Deserialize)]
        struct Missing {
            missing: Vec<String>,
        }
        serde_json::from_slice::<Missing>(&answer.body)
            .map(|m| m.missing)
            .map_err(|e| ClientError::Protocol {
                what: what.to_owned(),
                reason: e.to_string(),
            })
    }

    /// `PUT /v1/shards/{sha256}`: one shard's bytes; `true` when newly
    /// stored (201), `false` when the aggregator already had it (200).
    ///
    /// # Errors
    /// As [`AggregatorClient::send`], [`ClientError::Refused`].
    pub fn put_shard(&self, sha256: &str, bytes: Bytes) -> Result<bool, ClientError> {
        let path = format!("/v1/shards/{}", path_segment(sha256)?);
        let answer = self.expect_success(
            Method::PUT,
            &path,
            Some((bytes, "application/octet-stream", None)),
            MAX_DOCUMENT_BYTES,
        )?;
        Ok(answer.status == StatusCode::CREATED)
    }
}

async fn round_trip<T>(
    io: TokioIo<T>,
    request: Request<Full<Bytes>>,
    transport: &dyn Fn(String) -> ClientError,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| transport(format!("HTTP handshake: {e}")))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| transport(e.to_string()))
}

/// A digest as one path segment: hex only.
fn path_segment(digest: &str) -> Result<&str, ClientError> {
    if !digest.is_empty() && digest.len() <= 128 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest)
    } else {
        Err(ClientError::Protocol {
            what: "digest".to_owned(),
            reason: "not a hex digest".to_owned(),
        })
    }
}

/// A non-2xx answer as [`ClientError::Refused`]: the problem's type and
/// detail when it is problem+json (each cut to 300 characters).
fn refusal(what: &str, answer: &Answer) -> ClientError {
    #[derive(serde::Deserialize, Default)]
    struct Problem {
        #[serde(default, rename = "type")]
        kind: String,
        #[serde(default)]
        title: String,
        #[serde(default)]
        detail: String,
    }
    let problem: Problem = serde_json::from_slice(&answer.body).unwrap_or_default();
    let cut = |s: &str| s.chars().take(300).collect::<String>();
    let name = if !problem.kind.is_empty() {
        problem.kind
    } else if !problem.title.is_empty() {
        problem.title
    } else {
        answer
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_owned()
    };
    ClientError::Refused {
        what: what.to_owned(),
        status: answer.status.as_u16(),
        problem: cut(&name),
        detail: cut(&problem.detail),
    }
}

/// A TLS connector trusting exactly the certificates in the PEM file
/// ([`crate::http::tls::connector`], shared with the aggregator).
fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, ClientError> {
    crate::http::tls::connector(ca).map_err(|e| ClientError::Tls {
        path: ca.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_plain_http_is_only_for_loopback() {
        let url = AggregatorUrl::parse("http://127.0.0.1:7400").expect("loopback");
        assert_eq!((url.tls, url.port, url.prefix.as_str()), (false, 7400, ""));
        let url = AggregatorUrl::parse("https://agg.example.org/fed/").expect("https");
        assert_eq!(
            (url.tls, url.port, url.prefix.as_str()),
            (true, 443, "/fed")
        );
        assert!(AggregatorUrl::parse("http://[::1]:80").is_ok());
        assert!(AggregatorUrl::parse("http://localhost:9").is_ok());
        for bad in [
            "http://10.0.0.1:7400",
            "ftp://127.0.0.1",
            "127.0.0.1:7400",
            "https://user:pw@agg.example.org",
            "not a url",
        ] {
            assert!(AggregatorUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_transport_failures_and_server_errors_are_retried() {
        let refused = |status| ClientError::Refused {
            what: "x".into(),
            status,
            problem: "p".into(),
            detail: String::new(),
        };
        assert!(refused(503).is_retryable());
        assert!(refused(429).is_retryable());
        assert!(!refused(409).is_retryable());
        assert!(!refused(400).is_retryable());
        assert!(
            ClientError::Transport {
                what: "x".into(),
                reason: "reset".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn a_refusal_names_the_problem_type_and_detail() {
        let answer = Answer {
            status: StatusCode::CONFLICT,
            signature: None,
            retry_after_s: None,
            body: br#"{"type":"stale-base-model","title":"t","detail":"round 3 is on abc"}"#
                .to_vec(),
        };
        let e = refusal("POST /v1/updates", &answer).to_string();
        assert_eq!(
            e,
            "POST /v1/updates: 409 stale-base-model: round 3 is on abc"
        );
        let answer = Answer {
            status: StatusCode::BAD_GATEWAY,
            signature: None,
            retry_after_s: None,
            body: b"<html>".to_vec(),
        };
        assert_eq!(
            refusal("GET /v1/task", &answer).to_string(),
            "GET /v1/task: 502 Bad Gateway"
        );
    }
}
