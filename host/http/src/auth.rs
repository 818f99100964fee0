//! The bearer token: read from a file only its owner can read
//! (`server.token_file`), compared by digest, and checked on the routes a
//! server protects (which ones is the server's choice).

use std::path::Path;

use hyper::header::{AUTHORIZATION, HeaderMap};
use ring::digest::{SHA256, digest};

use crate::problem::Problem;

/// Shortest token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 32;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It cannot be read.
    #[error("server.token_file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Its content or permissions are unsafe.
    #[error("server.token_file {path}: {reason}")]
    Unsafe {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The configured token, kept as its SHA-256 so comparisons take the same
/// time whatever the client sends.
#[derive(Clone)]
pub struct BearerToken {
    sha256: Vec<u8>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// Reads the token (surrounding whitespace trimmed): at least
    /// [`MIN_TOKEN_CHARS`] printable ASCII characters, in a file that only
    /// its owner can read.
    ///
    /// # Errors
    /// [`TokenError`].
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let shown = path.display().to_string();
        let unsafe_file = |reason: String| TokenError::Unsafe {
            path: shown.clone(),
            reason,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|source| TokenError::Io {
                path: shown.clone(),
                source,
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(unsafe_file(format!(
                    "mode {mode:o} lets others read it; chmod 600 it"
                )));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Io {
            path: shown.clone(),
            source,
        })?;
        let token = text.trim();
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(unsafe_file(format!(
                "the token must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)"
            )));
        }
        if !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(unsafe_file(
                "the token must be printable ASCII without spaces".to_owned(),
            ));
        }
        Ok(Self::new(token))
    }

    /// A token from its text.
    pub fn new(token: &str) -> Self {
        Self {
            sha256: digest(&SHA256, token.as_bytes()).as_ref().to_vec(),
        }
    }

    /// Whether an `Authorization` header value carries this token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(presented) = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
        else {
            return false;
        };
        digest(&SHA256, presented.trim_ascii()).as_ref() == self.sha256.as_slice()
    }

    /// The refusal for a request whose `Authorization` header is missing
    /// or carries another token, `None` when it carries this one: 401
    /// [`Problem::unauthorized`] (with `WWW-Authenticate`), whose detail
    /// tells the client to send the token from `setting` (the config key
    /// naming the token file).
    pub fn refusal(&self, headers: &HeaderMap, setting: &str) -> Option<Problem> {
        if self.accepts(headers.get(AUTHORIZATION).map(|v| v.as_bytes())) {
            None
        } else {
            Some(Problem::unauthorized(format!(
                "send Authorization: Bearer <token from {setting}>"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_accepted() {
        let token = BearerToken::new("0123456789abcdef0123456789abcdef");
        assert!(token.accepts(Some(b"Bearer 0123456789abcdef0123456789abcdef")));
        assert!(!token.accepts(Some(b"Bearer 0123456789abcdef0123456789abcdeX")));
        assert!(!token.accepts(Some(b"Basic 0123456789abcdef0123456789abcdef")));
        assert!(!token.accepts(Some(b"0123456789abcdef0123456789abcdef")));
        assert!(!token.accepts(None));
    }

    #[test]
    fn a_request_without_the_token_gets_401_with_www_authenticate() {
        let token = BearerToken::new("0123456789abcdef0123456789abcdef");
        let mut headers = HeaderMap::new();
        let refused = token
            .refusal(&headers, "server.token_file")
            .expect("no header: refused");
        assert_eq!(refused.status, 401);
        assert!(
            refused.detail.contains("server.token_file"),
            "{}",
            refused.detail
        );
        let response = refused.into_response();
        assert_eq!(
            response
                .headers()
                .get(hyper::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"oxbox\"")
        );
        headers.insert(
            AUTHORIZATION,
            "Bearer 0123456789abcdef0123456789abcdef"
                .parse()
                .expect("header value"),
        );
        assert!(token.refusal(&headers, "server.token_file").is_none());
    }

    #[test]
    fn short_or_shared_token_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "short\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = BearerToken::from_file(&path).expect_err("short");
        assert!(err.to_string().contains("at least 32"), "{err}");
        std::fs::write(&path, format!("{}\n", "a".repeat(40))).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = BearerToken::from_file(&path).expect_err("world-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let token = BearerToken::from_file(&path).expect("good");
        assert!(token.accepts(Some(format!("Bearer {}", "a".repeat(40)).as_bytes())));
    }
}
