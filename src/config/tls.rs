//! The `tls` feature's options for clients: `--tls-cert` and `--tls-key`,
//! read and checked into [`Certificates`] at start. Built without the
//! feature, the flags do not exist (clap refuses them as any unknown one).

use std::path::PathBuf;
use std::sync::Arc;

use super::error::ConfigError;
use crate::tls::Certificates;

/// TLS options, as clap parses them (part of [`Args`](super::args::Args)).
#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    /// Serve `wss://` and `https://` (TLS 1.2 and 1.3) with this
    /// certificate chain (PEM, the server's certificate first). Read again
    /// on SIGHUP, without dropping a connection.
    #[arg(
        long,
        env = "THREADCHAT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "THREADCHAT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// The certificates `args` name, read and checked (`None`: plain `ws://`).
pub fn certificates(args: &TlsArgs) -> Result<Option<Arc<Certificates>>, ConfigError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    Certificates::load(cert, key)
        .map(|certs| Some(Arc::new(certs)))
        .map_err(|e| ConfigError::Tls(e.to_string()))
}
