//! The server's certificate: read from PEM files at start, checked, and
//! read again on `SIGHUP` without dropping anyone.
//!
//! A certificate that cannot serve (a file unreadable, a key that is not
//! the certificate's, a certificate expired or not yet valid) is one clear
//! error at start; on a reload it is logged and the old certificate stays.
//! Connections already open keep the session they made: a reload only
//! changes what the next handshakes present.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::validity::{self, Validity};

/// Why a certificate and key cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file cannot be read, or holds no PEM of the kind expected.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The certificate file holds no certificate.
    #[error("{path} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key is not the certificate's (or cannot sign).
    #[error("the key in {key} does not belong to the certificate in {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls found.
        reason: String,
    },
    /// The certificate has expired, or is not valid yet.
    #[error("the certificate in {path} {problem}")]
    NotValidNow {
        /// The file.
        path: PathBuf,
        /// Since or until when.
        problem: String,
    },
}

/// The certificate files, and what was last read from them.
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    /// Whether the certificate read at start signed itself.
    self_signed: bool,
    current: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// Reads and checks `cert` (the chain, leaf first) and `key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Certificates, CertError> {
        let provider = Arc::new(super::provider());
        let (current, period) = read(cert, key, &provider)?;
        Ok(Certificates {
            cert: cert.to_owned(),
            key: key.to_owned(),
            self_signed: period.self_issued,
            current: RwLock::new(Arc::new(current)),
            provider,
        })
    }

    /// Reads the files again; on success, the next handshakes present what
    /// they hold now. On failure nothing changes.
    pub fn reload(&self) -> Result<(), CertError> {
        let (fresh, _) = read(&self.cert, &self.key, &self.provider)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// The certificate file, for the log.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// Whether the certificate read at start signed itself (a client must
    /// be told to trust it: websocat's `-k`, a browser's exception).
    pub fn self_signed(&self) -> bool {
        self.self_signed
    }

    /// The TLS settings every handshake uses: TLS 1.2 and 1.3 (rustls's
    /// safe defaults), no client certificates, the certificate from `self`
    /// (read again on each reload), and `http/1.1` offered for ALPN (a
    /// WebSocket upgrade is HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

/// Reads a chain and its key, and checks that they can serve now.
fn read(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, validity::Period), CertError> {
    let unreadable = |path: &Path, reason: String| CertError::Read {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unreadable(cert, e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: cert.to_owned(),
        });
    };
    let valid = validity::of(leaf).map_err(|reason| unreadable(cert, reason))?;
    match valid.at(SystemTime::now()) {
        Validity::Current => {}
        other => {
            return Err(CertError::NotValidNow {
                path: cert.to_owned(),
                problem: other.to_string(),
            });
        }
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| unreadable(key, e.to_string()))?;
    let mismatch = |reason: String| CertError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let certified =
        CertifiedKey::from_der(chain, private, provider).map_err(|e| mismatch(e.to_string()))?;
    // `from_der` lets a key whose public half it cannot tell pass; an
    // unknown match is no match here.
    certified
        .keys_match()
        .map_err(|e| mismatch(e.to_string()))?;
    Ok((certified, valid))
}
