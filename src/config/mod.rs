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

pub use args::{Args, LogLevel, Subscriptions};
pub use ceiling::{MAX_STARTING, THREADS_PER_CONNECTION, connection_ceiling};

/// Where messages are relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// The Redis at this URL; failing to reach it at start is an error.
    Redis(String),
    /// Redis on localhost:6379 if it answers, otherwise in-process.
    Auto,
    /// In-process, by request.
    InProcess,
}

/// The URL tried when no `--redis` is given.
pub const DEFAULT_REDIS_URL: &str = "redis://localhost:6379";

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
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
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
    /// How clients subscribe to Redis.
    pub subscriptions: Subscriptions,
}

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

impl Config {
    /// Validates raw arguments into a configuration.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let broker = match (&args.redis, args.in_process) {
            (_, true) => BrokerChoice::InProcess,
            (Some(value), false) => BrokerChoice::Redis(redis_url(value)?),
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

        Ok(Config {
            host: args.host,
            port: args.port,
            broker,
            log_level: args.log_level.into(),
            log_file: args.log_file,
            history: args.history,
            history_bytes: args.history_bytes,
            room_ttl,
            subscriptions: args.subscriptions,
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
            },
        })
    }
}

/// Turns what the user gave `--redis` into a Redis URL, as the original app
/// did (`redis://{host}`), while also accepting full URLs.
fn redis_url(value: &str) -> Result<String, ConfigError> {
    let fail = |reason: &str| ConfigError::Redis {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(fail("empty"));
    }
    let url = if let Some((scheme, _)) = value.split_once("://") {
        match scheme {
            "redis" | "redis+unix" | "unix" | "redis+sentinel" => value.to_owned(),
            "rediss" => return Err(fail("TLS (rediss://) is not built into threadchat")),
            _ => return Err(fail("expected a host, host:port, or a redis:// URL")),
        }
    } else {
        format!("redis://{value}")
    };
    // A Sentinel URL is read (and checked) by the broker, which asks the
    // sentinels at start.
    if !url.starts_with("redis+sentinel://") {
        redis::Client::open(url.as_str()).map_err(|e| fail(&e.to_string()))?;
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_targets_like_the_original_and_urls() {
        assert_eq!(redis_url("localhost").unwrap(), "redis://localhost");
        assert_eq!(redis_url("10.1.2.3:6380").unwrap(), "redis://10.1.2.3:6380");
        assert_eq!(redis_url("redis://:pw@h:1/2").unwrap(), "redis://:pw@h:1/2");
        assert!(redis_url("").is_err());
        assert!(redis_url("http://x").is_err());
        assert!(redis_url("rediss://x").is_err());
        assert!(redis_url("host:notaport").is_err());
    }

    #[test]
    fn ceiling_is_positive() {
        assert!(connection_ceiling(2) >= 1);
        assert!(connection_ceiling(1) >= connection_ceiling(2));
    }
}
