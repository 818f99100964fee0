//! TLS (rustls, ring provider) for oxbox servers and their clients.
//!
//! Two functions, both from PEM files:
//! - [`acceptor`]: the server side, from a certificate chain (leaf first)
//!   and its private key (PKCS#8, PKCS#1 or SEC1); pass it to
//!   [`crate::server::serve_with_tls`].
//! - [`connector`]: the client side, trusting exactly the certificates in
//!   one PEM file (the CA that issued the server's certificate, or a
//!   self-signed server certificate made with `basicConstraints =
//!   CA:FALSE`), never the system's roots. [`server_name`] turns the host
//!   of a URL into the name the certificate is checked against (a DNS
//!   name, or an IP address that must be in its `subjectAltName`).
//!
//! Only TLS 1.2 and 1.3 with rustls's safe defaults; no client
//! certificates (sites prove who they are by signing what they send).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the certificate or key (for example a key that does
    /// not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A host that cannot name a server certificate.
    #[error("{host:?} is not a DNS name or IP address a certificate can name")]
    ServerName {
        /// The host, as given.
        host: String,
    },
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE block".to_owned()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: a TLS acceptor presenting the certificate chain in
/// `certificate` (PEM, leaf first) with the private key in `private_key`
/// (PEM).
///
/// # Errors
/// [`TlsError::Pem`] for an unreadable or empty file, [`TlsError::Config`]
/// when rustls refuses them (a key that does not match the certificate).
pub fn acceptor(certificate: &Path, private_key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(certificate)?;
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|e| TlsError::Pem {
        path: private_key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client side: a TLS connector that trusts only the certificates in
/// `trusted` (PEM: a CA certificate, or the server's own self-signed
/// certificate).
///
/// # Errors
/// [`TlsError::Pem`] for an unreadable or empty file, [`TlsError::Config`]
/// for a certificate rustls cannot use as a trust anchor.
pub fn connector(trusted: &Path) -> Result<TlsConnector, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(trusted)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: trusted.to_path_buf(),
            reason: format!("not usable as a trust anchor: {e}"),
        })?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a server's certificate is checked against, from a URL's host
/// (`aggregator.example.org`, `127.0.0.1`, `[::1]`).
///
/// # Errors
/// [`TlsError::ServerName`].
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName {
        host: host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_pem_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let Err(err) = connector(&empty) else {
            panic!("an empty PEM was accepted");
        };
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let Err(err) = acceptor(&dir.path().join("absent.pem"), &empty) else {
            panic!("a missing certificate was accepted");
        };
        assert!(err.to_string().contains("absent.pem"), "{err}");
    }

    #[test]
    fn server_names_from_url_hosts() {
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("aggregator.example.org").is_ok());
        assert!(server_name("bad host").is_err());
    }
}
