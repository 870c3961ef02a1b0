//! Command-line options, and the validated [`Config`] the rest of the program
//! trusts.
//!
//! Parsing happens in two steps, as in ripgrep: clap turns the command line
//! (with `THREADCHAT_*` environment variables as fallbacks) into raw [`Args`];
//! [`Config::from_args`] then checks every value and fills in computed defaults,
//! so no other module ever sees an unchecked option. Errors are a
//! [`ConfigError`] whose text is one line a person can act on.

use std::path::PathBuf;
use std::time::Duration;

mod args;
mod ceiling;
mod error;
mod redis_target;
#[cfg(feature = "tls")]
mod redis_tls;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "tokens")]
mod tokens;

#[cfg(feature = "tls")]
pub use crate::tls::Certificates;
pub use args::{Args, LogLevel, Subscriptions};
pub use ceiling::{MAX_STARTING, THREADS_PER_CONNECTION, connection_ceiling};
pub use error::ConfigError;
pub use redis_target::{BrokerChoice, DEFAULT_REDIS_URL, NO_REDIS_HA, NO_TLS, RedisTarget};
use redis_target::{redis_target, tls_options};
#[cfg(feature = "tls")]
pub use redis_tls::{RedisTls, RedisTlsArgs, install_crypto_provider};
#[cfg(feature = "tls")]
pub use tls::TlsArgs;
#[cfg(feature = "tokens")]
pub use tokens::{AUTH_SECRET_ENV, Command, TokenArgs, Tokens, auth_secret};

/// Limits, timeouts and policies that protect one connection from another.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most simultaneous chat connections.
    pub max_connections: usize,
    /// Largest client message (and frame), in bytes.
    pub max_message_size: usize,
    /// Longest a client may take to send its HTTP request head.
    pub handshake_timeout: Duration,
    /// Longest one write to a client may block before the client is dropped.
    pub write_timeout: Duration,
    /// After the server sends a close frame, how long it waits for the reply.
    pub close_grace: Duration,
    /// Average messages per second a client may send; `None`: unlimited.
    pub rate_limit: Option<f64>,
    /// Burst allowance above the rate.
    pub rate_burst: u32,
    /// Silence after which a client is pinged.
    pub ping_interval: Duration,
    /// Silence after which a client is closed.
    pub idle_timeout: Duration,
    /// Browser origins allowed besides the server's own (`*`: any).
    pub allowed_origins: Vec<String>,
    /// Whether `/echo` is served (conformance testing only).
    pub echo_endpoint: bool,
    /// Longest a client may take to finish a message it has begun.
    pub message_timeout: Duration,
    /// Most frames in one message.
    pub max_fragments: usize,
    /// Most connections from one address; `None`: no limit.
    pub max_connections_per_ip: Option<usize>,
    /// Reverse proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// One connection per nickname in a room (`--unique-nicknames`).
    pub unique_nicknames: bool,
    /// With unique nicknames, most held per address; `None`: no limit.
    pub max_nicknames_per_ip: Option<usize>,
    /// Rooms one address may create per minute; `None`: no limit.
    pub new_rooms_per_minute: Option<u32>,
    /// Most connections in their start at once (`--max-starting`).
    pub max_starting: usize,
    /// Most connections from one address in their start; `None`: no limit.
    pub max_starting_per_ip: Option<usize>,
    /// Host names answered besides IP literals and `localhost`, lower-case
    /// (`*`: any).
    pub allowed_hosts: Vec<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// With a key configured, the tokens clients must present (the
    /// `tokens` feature).
    #[cfg(feature = "tokens")]
    pub tokens: Option<Tokens>,
    /// With `--tls-cert`, the certificate clients are served with (the
    /// `tls` feature).
    #[cfg(feature = "tls")]
    pub tls: Option<std::sync::Arc<crate::tls::Certificates>>,
    /// Host (name or address) to listen on.
    pub host: String,
    /// Port to listen on; 0 lets the OS pick.
    pub port: u16,
    /// Where messages are relayed.
    pub broker: BrokerChoice,
    /// Log verbosity.
    pub log_level: log::LevelFilter,
    /// Optional log file (appended to).
    pub log_file: Option<PathBuf>,
    /// Per-connection limits.
    pub limits: Limits,
    /// Chat messages kept per room.
    pub history: usize,
    /// Bytes of stored messages kept per room.
    pub history_bytes: usize,
    /// How long a room's state outlives its last use.
    pub room_ttl: Duration,
    /// Most bytes held for rooms nobody is in (`--idle-rooms-bytes`).
    pub idle_rooms_bytes: usize,
    /// Replicas that must have a message before its sender is told it was
    /// delivered (`--wait-replicas`).
    pub wait_replicas: usize,
    /// How clients subscribe to Redis.
    pub subscriptions: Subscriptions,
    /// File descriptors each connection holds (its socket, and with
    /// per-client subscriptions its Redis connection): with
    /// [`THREADS_PER_CONNECTION`], what `max_connections` connections'
    /// budget of threads and descriptors is made of.
    pub fds_per_connection: usize,
}

impl Config {
    /// Whether clients are served over TLS with a certificate that signed
    /// itself (`--tls-cert`), which a client must be told to trust.
    pub fn is_self_signed_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.as_ref().is_some_and(|certs| certs.self_signed());
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Whether every chat connection must present a token (a key is
    /// configured; the `tokens` feature).
    pub fn requires_tokens(&self) -> bool {
        #[cfg(feature = "tokens")]
        return self.tokens.is_some();
        #[cfg(not(feature = "tokens"))]
        false
    }

    /// Whether clients are served over TLS (`--tls-cert`).
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Validates raw arguments into a configuration.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        #[cfg(feature = "tls")]
        if args.redis_tls.any()
            && !matches!(&args.redis, Some(url) if url.trim().starts_with("rediss"))
        {
            return Err(ConfigError::RedisTls(
                "--redis-ca, --redis-cert and --redis-key are for Redis over TLS: \
                 give --redis a rediss://, rediss+sentinel:// or rediss+cluster:// URL"
                    .into(),
            ));
        }
        let broker = match (&args.redis, args.in_process) {
            (_, true) => BrokerChoice::InProcess,
            (Some(value), false) => BrokerChoice::Redis(redis_target(value, &tls_options(&args))?),
            (None, false) => BrokerChoice::Auto,
        };

        // A client's own Redis subscription is a second descriptor.
        let fds_per_connection = match (&broker, args.subscriptions) {
            (BrokerChoice::InProcess, _) | (_, Subscriptions::Shared) => 1,
            _ => 2,
        };
        let ceiling = connection_ceiling(fds_per_connection);
        let max_connections = match args.max_connections {
            None => ceiling,
            Some(0) => {
                return Err(ConfigError::Range {
                    option: "--max-connections",
                    value: 0,
                    reason: "must be at least 1".into(),
                });
            }
            Some(n) if n > ceiling => {
                return Err(ConfigError::Range {
                    option: "--max-connections",
                    value: n,
                    reason: format!(
                        "this machine's limits allow at most {ceiling} \
                         (raise vm.max_map_count and the open-file limit; see docs/OPERATIONS.md)"
                    ),
                });
            }
            Some(n) => n,
        };

        if args.history > 10_000 {
            return Err(ConfigError::Range {
                option: "--history",
                value: args.history,
                reason: "at most 10000 messages per room".into(),
            });
        }
        if !(16..=16 * 1024 * 1024).contains(&args.max_message_size) {
            return Err(ConfigError::Range {
                option: "--max-message-size",
                value: args.max_message_size,
                reason: "must be between 16 bytes and 16 MiB".into(),
            });
        }

        let seconds = |option: &'static str, value: f64| {
            if value.is_finite() && (0.01..=86_400.0).contains(&value) {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(ConfigError::Seconds { option, value })
            }
        };
        let ping_interval = seconds("--ping-interval", args.ping_interval)?;
        let idle_timeout = seconds("--idle-timeout", args.idle_timeout)?;
        if idle_timeout < ping_interval {
            return Err(ConfigError::Seconds {
                option: "--idle-timeout",
                value: args.idle_timeout,
            });
        }
        if !(1024..=64 * 1024 * 1024).contains(&args.history_bytes) {
            return Err(ConfigError::Range {
                option: "--history-bytes",
                value: args.history_bytes,
                reason: "must be between 1 KiB and 64 MiB".into(),
            });
        }
        if args.wait_replicas > 16 {
            return Err(ConfigError::Range {
                option: "--wait-replicas",
                value: args.wait_replicas,
                reason: "must be at most 16".into(),
            });
        }
        if args.idle_rooms_bytes < 64 * 1024 {
            return Err(ConfigError::Range {
                option: "--idle-rooms-bytes",
                value: args.idle_rooms_bytes,
                reason: "must be at least 64 KiB".into(),
            });
        }
        if !(1..=1_000_000).contains(&args.max_fragments) {
            return Err(ConfigError::Range {
                option: "--max-fragments",
                value: args.max_fragments,
                reason: "must be between 1 and 1000000".into(),
            });
        }
        let room_ttl = if args.room_ttl.is_finite() && (1.0..=2_592_000.0).contains(&args.room_ttl)
        {
            Duration::from_secs_f64(args.room_ttl)
        } else {
            return Err(ConfigError::Seconds {
                option: "--room-ttl",
                value: args.room_ttl,
            });
        };
        let rate_limit = match args.rate_limit {
            0.0 => None,
            r if r.is_finite() && r > 0.0 => Some(r),
            r => return Err(ConfigError::Rate(r)),
        };

        if !(1..=MAX_STARTING).contains(&args.max_starting) {
            return Err(ConfigError::Range {
                option: "--max-starting",
                value: args.max_starting,
                reason: format!("must be between 1 and {MAX_STARTING}"),
            });
        }
        let mut allowed_hosts: Vec<String> = args
            .allowed_hosts
            .iter()
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        // The name given to listen on is one the server answers to.
        if args.host.parse::<std::net::IpAddr>().is_err() {
            allowed_hosts.push(args.host.trim_end_matches('.').to_ascii_lowercase());
        }

        Ok(Config {
            #[cfg(feature = "tokens")]
            tokens: tokens::tokens(&args.tokens)?,
            #[cfg(feature = "tls")]
            tls: tls::certificates(&args.tls)?,
            host: args.host,
            port: args.port,
            broker,
            log_level: args.log_level.into(),
            log_file: args.log_file,
            history: args.history,
            history_bytes: args.history_bytes,
            room_ttl,
            idle_rooms_bytes: args.idle_rooms_bytes,
            wait_replicas: args.wait_replicas,
            subscriptions: args.subscriptions,
            fds_per_connection,
            limits: Limits {
                max_connections,
                max_message_size: args.max_message_size,
                handshake_timeout: seconds("--handshake-timeout", args.handshake_timeout)?,
                write_timeout: seconds("--write-timeout", args.write_timeout)?,
                close_grace: Duration::from_secs(2),
                rate_limit,
                rate_burst: args.rate_burst.max(1),
                ping_interval,
                idle_timeout,
                allowed_origins: args
                    .allow_origins
                    .iter()
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect(),
                echo_endpoint: args.echo_endpoint,
                message_timeout: seconds("--message-timeout", args.message_timeout)?,
                max_fragments: args.max_fragments,
                max_connections_per_ip: (args.max_connections_per_ip > 0)
                    .then_some(args.max_connections_per_ip),
                trusted_proxies: args.trusted_proxies,
                unique_nicknames: args.unique_nicknames,
                max_nicknames_per_ip: (args.max_nicknames_per_ip > 0)
                    .then_some(args.max_nicknames_per_ip),
                new_rooms_per_minute: (args.new_rooms_per_minute > 0)
                    .then_some(args.new_rooms_per_minute),
                max_starting: args.max_starting,
                max_starting_per_ip: (args.max_starting_per_ip > 0)
                    .then_some(args.max_starting_per_ip),
                allowed_hosts,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_is_positive() {
        assert!(connection_ceiling(2) >= 1);
        assert!(connection_ceiling(1) >= connection_ceiling(2));
    }
}
