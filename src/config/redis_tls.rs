//! `rediss://`: the certificates threadchat trusts and shows when it talks
//! to Redis over TLS (the `tls` feature), read once at start.
//!
//! Two kinds of connection reach Redis, and each is given the files in the
//! form it takes:
//!
//! * The subscriptions, which threadchat reads by hand
//!   (`broker/redis/pubsub`), take a rustls [`ClientConfig`] built here
//!   **once per process** and shared through an `Arc`: its roots are parsed
//!   once, and its session cache lets a reconnecting subscription resume
//!   its TLS session instead of a full handshake. With per-client
//!   subscriptions a join opens one, so this is the connection that counts.
//! * Every other connection (publishers, queries, the sentinels, the slot
//!   map) is the `redis` crate's, which takes the PEM bytes
//!   ([`redis::TlsCertificates`]) and builds a configuration of its own each
//!   time it connects. Those connections are few and long-lived.
//!
//! A file that cannot be read or parsed, a client certificate without its
//! key (or the other way round), or a key that does not match its
//! certificate is one [`ConfigError`] at start, never a failure on the
//! first connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::ConfigError;

/// The `--redis-*` TLS options, as clap parses them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisTlsArgs {
    /// With a `rediss://` URL: PEM file of the certificate authorities to
    /// trust for Redis (and its sentinels and cluster nodes), instead of the
    /// system's.
    #[arg(long, env = "THREADCHAT_REDIS_CA", value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,

    /// With a `rediss://` URL: PEM certificate (chain) threadchat shows to
    /// Redis, for a Redis that asks for one (`tls-auth-clients yes`). Needs
    /// --redis-key.
    #[arg(long, env = "THREADCHAT_REDIS_CERT", value_name = "FILE")]
    pub redis_cert: Option<PathBuf>,

    /// The private key (PEM) of --redis-cert.
    #[arg(long, env = "THREADCHAT_REDIS_KEY", value_name = "FILE")]
    pub redis_key: Option<PathBuf>,
}

impl RedisTlsArgs {
    /// Whether any option was given (they only mean something with TLS).
    pub fn any(&self) -> bool {
        self.redis_ca.is_some() || self.redis_cert.is_some() || self.redis_key.is_some()
    }
}

/// How every connection to Redis makes its TLS session: read and checked
/// once at start, then cloned cheaply (three `Arc`s).
#[derive(Clone)]
pub struct RedisTls {
    /// For the subscriptions read by hand: one configuration for the whole
    /// process (see the module doc).
    pub config: Arc<ClientConfig>,
    /// The same files for the `redis` crate's connections.
    pub certificates: Arc<redis::TlsCertificates>,
    /// The options these came from: two are the same if made of the same
    /// files.
    args: Arc<RedisTlsArgs>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.args.redis_ca)
            .field("cert", &self.args.redis_cert)
            .finish_non_exhaustive()
    }
}

impl PartialEq for RedisTls {
    fn eq(&self, other: &RedisTls) -> bool {
        self.args.redis_ca == other.args.redis_ca
            && self.args.redis_cert == other.args.redis_cert
            && self.args.redis_key == other.args.redis_key
    }
}

impl Eq for RedisTls {}

impl RedisTls {
    /// Reads and checks the files `args` name; without `--redis-ca`, the
    /// system's roots are trusted.
    pub fn load(args: &RedisTlsArgs) -> Result<RedisTls, ConfigError> {
        install_crypto_provider();
        let root_pem = args.redis_ca.as_deref().map(read).transpose()?;
        let roots = match (&root_pem, &args.redis_ca) {
            (Some(pem), Some(path)) => roots_from(pem, path)?,
            _ => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(format!("TLS for Redis: {e}")))?
            .with_root_certificates(roots);
        let (config, client_tls) = match (&args.redis_cert, &args.redis_key) {
            (None, None) => (builder.with_no_client_auth(), None),
            (Some(cert_path), Some(key_path)) => {
                let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
                let chain = CertificateDer::pem_slice_iter(&cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
                    .filter(|chain| !chain.is_empty())
                    .ok_or_else(|| not_pem(cert_path, "certificate"))?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|_| not_pem(key_path, "private key"))?;
                let config = builder.with_client_auth_cert(chain, key).map_err(|e| {
                    fail(format!(
                        "--redis-key {} does not go with --redis-cert {}: {e}",
                        key_path.display(),
                        cert_path.display()
                    ))
                })?;
                let client = redis::ClientTlsConfig {
                    client_cert: cert_pem,
                    client_key: key_pem,
                };
                (config, Some(client))
            }
            _ => {
                return Err(fail(
                    "--redis-cert and --redis-key go together: give both or neither".into(),
                ));
            }
        };
        Ok(RedisTls {
            config: Arc::new(config),
            certificates: Arc::new(redis::TlsCertificates {
                client_tls,
                root_cert: root_pem,
            }),
            args: Arc::new(args.clone()),
        })
    }
}

/// Makes the crate's provider (`tls::provider`, *ring*) the process's
/// default, for the TLS configurations that ask for the default (the
/// `redis` crate's). Safe to call any number of times, from any side: only
/// the first call installs it.
pub fn install_crypto_provider() {
    // An error only says that a provider is installed already.
    let _ = crate::tls::provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))
}

/// The certificates of a `--redis-ca` file, as trust anchors.
fn roots_from(pem: &[u8], path: &Path) -> Result<rustls::RootCertStore, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|_| not_pem(path, "certificate"))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("--redis-ca {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(not_pem(path, "certificate"));
    }
    Ok(roots)
}

/// The system's trusted roots (what the `redis` crate trusts too).
fn system_roots() -> Result<rustls::RootCertStore, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(fail(
            "no trusted certificate authorities found on this system: give --redis-ca FILE".into(),
        ));
    }
    Ok(roots)
}

fn not_pem(path: &Path, what: &str) -> ConfigError {
    fail(format!("{} holds no PEM {what}", path.display()))
}

fn fail(reason: String) -> ConfigError {
    ConfigError::RedisTls(reason)
}
