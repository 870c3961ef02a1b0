//! Why a configuration was refused: one variant per kind of bad value, its
//! text the whole message `main` prints.

/// An option value that cannot be used. The text is the whole error message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--redis` is not a host, host:port or supported URL.
    #[error("invalid --redis {value:?}: {reason}")]
    Redis {
        /// What was given.
        value: String,
        /// Why it is not usable.
        reason: String,
    },
    /// A `--redis-ca`, `--redis-cert` or `--redis-key` file that cannot be
    /// used, or those options without a `rediss://` URL.
    #[error("{0}")]
    RedisTls(String),
    /// A duration option out of its range.
    #[error(
        "invalid {option} {value}: seconds between 0.01 and 86400 \
         (--room-ttl: 1 to 2592000; --idle-timeout at least --ping-interval)"
    )]
    Seconds {
        /// The option's name.
        option: &'static str,
        /// What was given.
        value: f64,
    },
    /// A negative or non-finite `--rate-limit`.
    #[error("invalid --rate-limit {0}: messages per second, 0 for no limit")]
    Rate(f64),
    /// A key for tokens that cannot be read or used.
    #[error("{0}")]
    Auth(String),
    /// A certificate or key for TLS that cannot be read or used.
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(String),
    /// A numeric option out of its range.
    #[error("invalid {option} {value}: {reason}")]
    Range {
        /// The option's name, e.g. `--max-connections`.
        option: &'static str,
        /// What was given.
        value: usize,
        /// The allowed range.
        reason: String,
    },
}
