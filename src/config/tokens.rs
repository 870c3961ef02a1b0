//! The `tokens` feature's options: the `--auth-*` flags,
//! `--max-connections-per-user`, and `threadchat token`, checked into
//! [`Tokens`]. Built without the feature, none of them exist (clap
//! refuses them as it refuses any unknown argument).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::error::ConfigError;
use crate::auth::Auth;

/// Token authentication's options, as clap parses them (part of
/// [`Args`](super::args::Args)).
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Require a token (a JWT) on every chat connection and `/members`,
    /// signed with the HMAC secret (HS256) in this file. The secret may
    /// also come from the environment variable THREADCHAT_AUTH_SECRET;
    /// never on the command line, where `ps` shows it. At least 32 bytes.
    #[arg(
        long,
        env = "THREADCHAT_AUTH_SECRET_FILE",
        value_name = "FILE",
        conflicts_with = "auth_public_key",
        global = true
    )]
    pub auth_secret_file: Option<PathBuf>,

    /// Require a token signed with the private half of this public key
    /// (PEM): an RSA key takes RS256 tokens, an Ed25519 key EdDSA tokens.
    #[arg(
        long,
        env = "THREADCHAT_AUTH_PUBLIC_KEY",
        value_name = "FILE",
        global = true
    )]
    pub auth_public_key: Option<PathBuf>,

    /// With authentication on, most connections one user (a token's
    /// name) may hold on this instance (0: no limit). Its messages share
    /// one --rate-limit across them.
    #[arg(
        long,
        env = "THREADCHAT_MAX_CONNECTIONS_PER_USER",
        default_value_t = 10,
        value_name = "N"
    )]
    pub max_connections_per_user: usize,

    /// With authentication on, the `aud` every token must carry (one of
    /// its values, if a list): tokens a shared identity provider minted
    /// for other services are refused. `threadchat token` writes it too.
    #[arg(
        long,
        env = "THREADCHAT_AUTH_AUDIENCE",
        value_name = "AUD",
        global = true
    )]
    pub auth_audience: Option<String>,

    /// With authentication on, the `iss` every token must carry.
    /// `threadchat token` writes it too.
    #[arg(
        long,
        env = "THREADCHAT_AUTH_ISSUER",
        value_name = "ISS",
        global = true
    )]
    pub auth_issuer: Option<String>,

    /// Clock difference allowed on a token's `exp` and `nbf`, in seconds
    /// (at most 86400).
    #[arg(
        long,
        env = "THREADCHAT_AUTH_LEEWAY",
        default_value_t = 30,
        value_name = "SECS"
    )]
    pub auth_leeway: u64,
}

/// Commands besides serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a token for NAME, signed with the configured key (the HMAC
    /// secret from --auth-secret-file, given before or after `token`, or
    /// THREADCHAT_AUTH_SECRET; or --private-key), to try authentication
    /// with websocat. It carries the server's --auth-audience and
    /// --auth-issuer (on either side of `token`, or from their
    /// environment variables), so the server it is configured like
    /// accepts it.
    Token {
        /// Who the token says the holder is (its `sub`).
        name: String,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        lifetime: u64,
        /// A room the token may join (repeat for more; without it, any).
        #[arg(long = "room", value_name = "ROOM")]
        rooms: Vec<String>,
        /// Sign with this PEM private key (RSA: RS256; Ed25519: EdDSA)
        /// instead of the HMAC secret.
        #[arg(long, value_name = "FILE")]
        private_key: Option<PathBuf>,
    },
}

/// Token authentication, checked: on when a key is configured.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The key tokens are checked against.
    pub auth: Arc<Auth>,
    /// Most connections per user; `None`: no limit.
    pub max_connections_per_user: Option<usize>,
}

/// Token authentication as `args` configure it: `None` without a key.
pub(super) fn tokens(args: &TokenArgs) -> Result<Option<Tokens>, ConfigError> {
    Ok(auth(args)?.map(|auth| Tokens {
        auth: Arc::new(auth),
        max_connections_per_user: (args.max_connections_per_user > 0)
            .then_some(args.max_connections_per_user),
    }))
}

/// The environment variable that may hold the HMAC secret itself.
pub const AUTH_SECRET_ENV: &str = "THREADCHAT_AUTH_SECRET";

/// The HMAC secret for tokens: from `--auth-secret-file` (trailing
/// newlines dropped), else from [`AUTH_SECRET_ENV`]; `None` if neither.
pub fn auth_secret(file: Option<&Path>) -> Result<Option<Vec<u8>>, ConfigError> {
    if let Some(file) = file {
        let mut secret = std::fs::read(file).map_err(|e| {
            ConfigError::Auth(format!(
                "cannot read --auth-secret-file {}: {e}",
                file.display()
            ))
        })?;
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        return Ok(Some(secret));
    }
    Ok(std::env::var_os(AUTH_SECRET_ENV)
        .filter(|s| !s.is_empty())
        .map(|s| s.into_encoded_bytes()))
}

/// The key tokens are checked against, if authentication is on.
fn auth(args: &TokenArgs) -> Result<Option<Auth>, ConfigError> {
    let auth = key(args)?;
    if auth.is_none() && (args.auth_audience.is_some() || args.auth_issuer.is_some()) {
        return Err(ConfigError::Auth(
            "--auth-audience and --auth-issuer need a key: \
             --auth-secret-file or --auth-public-key"
                .into(),
        ));
    }
    let nonempty = |value: &Option<String>, flag: &str| match value.as_deref() {
        Some("") => Err(ConfigError::Auth(format!("{flag} is empty"))),
        other => Ok(other.map(str::to_owned)),
    };
    let audience = nonempty(&args.auth_audience, "--auth-audience")?;
    let issuer = nonempty(&args.auth_issuer, "--auth-issuer")?;
    Ok(auth.map(|auth| auth.expecting(audience.as_deref(), issuer.as_deref())))
}

/// The key tokens are checked against, if one is configured.
fn key(args: &TokenArgs) -> Result<Option<Auth>, ConfigError> {
    if args.auth_leeway > crate::auth::MAX_LEEWAY {
        return Err(ConfigError::Auth(format!(
            "--auth-leeway {} is more than a day ({} seconds)",
            args.auth_leeway,
            crate::auth::MAX_LEEWAY
        )));
    }
    let leeway = Duration::from_secs(args.auth_leeway);
    if let Some(file) = &args.auth_public_key {
        let pem = std::fs::read(file).map_err(|e| {
            ConfigError::Auth(format!(
                "cannot read --auth-public-key {}: {e}",
                file.display()
            ))
        })?;
        return Auth::public_key(&pem, leeway)
            .map(Some)
            .map_err(|e| ConfigError::Auth(format!("--auth-public-key {}: {e}", file.display())));
    }
    match auth_secret(args.auth_secret_file.as_deref())? {
        Some(secret) => Auth::hmac(&secret, leeway)
            .map(Some)
            .map_err(ConfigError::Auth),
        None => Ok(None),
    }
}
