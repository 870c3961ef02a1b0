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

use clap::{Parser, ValueEnum};

use crate::broker::SubscriptionMode;

/// The command line, exactly as clap parses it.
#[derive(Debug, Parser)]
#[command(
    name = "threadchat",
    version,
    about = "A WebSocket chat server that relays every message through Redis pub/sub, \
             built with plain threads and blocking I/O.",
    after_help = "Chat with: websocat -E ws://127.0.0.1:8000/chat/alice\n\
                  Every option can also be set through the environment variable shown."
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "THREADCHAT_HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on (0 picks a free port and logs it).
    #[arg(long, env = "THREADCHAT_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Redis to relay through: a host ("localhost"), host:port
    /// ("10.0.0.5:6380"), or a URL ("redis://:secret@host:6379/2").
    /// Without it, Redis on localhost:6379 is used if it answers; otherwise
    /// messages are relayed in-process (a single instance only).
    #[arg(long, env = "THREADCHAT_REDIS", value_name = "HOST[:PORT]|URL")]
    pub redis: Option<String>,

    /// Relay messages in-process even if a Redis is reachable (a single
    /// instance only; handy for trying threadchat without Redis).
    #[arg(long, conflicts_with = "redis")]
    pub in_process: bool,

    /// How much to log.
    #[arg(long, env = "THREADCHAT_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Also append the log to this file.
    #[arg(long, env = "THREADCHAT_LOG_FILE", value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Most simultaneous chat connections; past it, new clients get HTTP 503.
    /// The default is computed from the kernel's limits (vm.max_map_count and
    /// the open-file limit) so the process can never hit them.
    #[arg(long, env = "THREADCHAT_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest chat message a client may send, in bytes; a bigger one closes
    /// that client's connection with code 1009.
    #[arg(long, env = "THREADCHAT_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024, value_name = "BYTES")]
    pub max_message_size: usize,

    /// Messages per second a client may send, on average (0: no limit).
    /// Excess messages are refused with an error notice; a client that keeps
    /// flooding is closed with code 1008.
    #[arg(
        long,
        env = "THREADCHAT_RATE_LIMIT",
        default_value_t = 20.0,
        value_name = "PER_SECOND"
    )]
    pub rate_limit: f64,

    /// Messages a client may send in a burst above --rate-limit.
    #[arg(
        long,
        env = "THREADCHAT_RATE_BURST",
        default_value_t = 40,
        value_name = "MESSAGES"
    )]
    pub rate_burst: u32,

    /// Seconds a write to a client may block (its buffers full because it
    /// stopped reading) before the client is closed with code 1008.
    #[arg(
        long,
        env = "THREADCHAT_WRITE_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    pub write_timeout: f64,

    /// Seconds of silence from a client before the server pings it.
    #[arg(
        long,
        env = "THREADCHAT_PING_INTERVAL",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub ping_interval: f64,

    /// Seconds of silence (no frame, not even a pong) after which a client is
    /// closed with code 1008.
    #[arg(
        long,
        env = "THREADCHAT_IDLE_TIMEOUT",
        default_value_t = 60.0,
        value_name = "SECONDS"
    )]
    pub idle_timeout: f64,

    /// Seconds a client may take to send its HTTP request head (then 408).
    #[arg(
        long,
        env = "THREADCHAT_HANDSHAKE_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    pub handshake_timeout: f64,

    /// A browser origin allowed to open chat connections, e.g.
    /// "https://chat.example.com" (repeatable; "*" allows any). Same-origin
    /// pages and clients that send no Origin (websocat, scripts) are always
    /// allowed.
    #[arg(
        long = "allow-origin",
        env = "THREADCHAT_ALLOW_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub allow_origins: Vec<String>,

    /// Chat messages kept per room and sent to each client that joins
    /// (0: no history). Kept in Redis, or in memory with the in-process relay.
    #[arg(
        long,
        env = "THREADCHAT_HISTORY",
        default_value_t = 50,
        value_name = "MESSAGES"
    )]
    pub history: usize,

    /// Most bytes of stored messages kept per room; the oldest messages go
    /// first (a message bigger than this on its own is delivered but not
    /// kept). Bounds what every joiner is sent, too.
    #[arg(
        long,
        env = "THREADCHAT_HISTORY_BYTES",
        default_value_t = 256 * 1024,
        value_name = "BYTES"
    )]
    pub history_bytes: usize,

    /// Seconds a room's state (history, member list) outlives its last use
    /// (a message, a join or leave, or members still in it). Then it expires,
    /// in Redis and in-process alike.
    #[arg(
        long,
        env = "THREADCHAT_ROOM_TTL",
        default_value_t = 86_400.0,
        value_name = "SECONDS"
    )]
    pub room_ttl: f64,

    /// Seconds a client may take to finish a message it has begun sending
    /// (all its frames); a client that trickles is closed with code 1008.
    #[arg(
        long,
        env = "THREADCHAT_MESSAGE_TIMEOUT",
        default_value_t = 20.0,
        value_name = "SECONDS"
    )]
    pub message_timeout: f64,

    /// Most frames one message may be split into (fragments); more closes
    /// the client with code 1008.
    #[arg(
        long,
        env = "THREADCHAT_MAX_FRAGMENTS",
        default_value_t = 256,
        value_name = "N"
    )]
    pub max_fragments: usize,

    /// Most simultaneous connections from one IP address (0: no limit);
    /// past it, HTTP 503. Behind a reverse proxy, see --trusted-proxy.
    #[arg(
        long,
        env = "THREADCHAT_MAX_CONNECTIONS_PER_IP",
        default_value_t = 100,
        value_name = "N"
    )]
    pub max_connections_per_ip: usize,

    /// The address of a reverse proxy whose X-Forwarded-For (the address it
    /// appended, the last one) and X-Forwarded-Proto are believed: its
    /// clients are counted by their own address for
    /// --max-connections-per-ip, and the proxy itself is not (repeatable).
    #[arg(
        long = "trusted-proxy",
        env = "THREADCHAT_TRUSTED_PROXY",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<std::net::IpAddr>,

    /// How clients subscribe to Redis: `per-client` (each client its own
    /// SUBSCRIBE connection; Redis fans out) or `shared` (one SUBSCRIBE per
    /// room per process; this process fans out). See docs/PERFORMANCE.md.
    #[arg(
        long,
        env = "THREADCHAT_SUBSCRIPTIONS",
        value_enum,
        default_value_t = Subscriptions::PerClient
    )]
    pub subscriptions: Subscriptions,

    /// Serve a WebSocket echo endpoint at /echo, for the Autobahn conformance
    /// suite. Off by default: it is not part of the chat.
    #[arg(long)]
    pub echo_endpoint: bool,
}

/// How clients subscribe to Redis, as accepted by `--subscriptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Subscriptions {
    /// One Redis subscription per client (the default).
    PerClient,
    /// One Redis subscription per room per process.
    Shared,
}

impl From<Subscriptions> for SubscriptionMode {
    fn from(mode: Subscriptions) -> Self {
        match mode {
            Subscriptions::PerClient => SubscriptionMode::PerClient,
            Subscriptions::Shared => SubscriptionMode::Shared,
        }
    }
}

/// Log verbosity, as accepted by `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// Joins, leaves, start-up and shutdown (the default).
    Info,
    /// Also per-connection details.
    Debug,
    /// Everything, including per-message tracing.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

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
    pub subscriptions: SubscriptionMode,
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
            subscriptions: args.subscriptions.into(),
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
            "redis" | "redis+unix" | "unix" => value.to_owned(),
            "rediss" => return Err(fail("TLS (rediss://) is not built into threadchat")),
            _ => return Err(fail("expected a host, host:port, or a redis:// URL")),
        }
    } else {
        format!("redis://{value}")
    };
    redis::Client::open(url.as_str()).map_err(|e| fail(&e.to_string()))?;
    Ok(url)
}

/// Threads each chat connection uses (its reader and its subscriber).
pub const THREADS_PER_CONNECTION: usize = 2;

/// Most connections in their start at once. A starting connection has a
/// third thread (its start thread, until the accept loop has joined it), so
/// the ceiling keeps room for this many; past it, the accept loop waits for
/// a start to finish before it accepts more (the kernel queues the rest).
pub const MAX_STARTING: usize = 1024;
/// Memory maps one thread costs on Linux (its stack, guard page and glibc's
/// bookkeeping); measured, see docs/ARCHITECTURE.md.
const MAPS_PER_THREAD: usize = 4;
/// The most connections this process can hold, each holding
/// `fds_per_connection` file descriptors (its socket and, with per-client
/// Redis subscriptions, its subscriber's Redis connection), without hitting:
///
/// * the kernel's memory-map limit, `vm.max_map_count` (past it a Rust
///   process *aborts* when it spawns a thread);
/// * the open-file limit (past it `accept` fails);
/// * the system's thread limits, `kernel.threads-max` and `kernel.pid_max`
///   (past them spawning a thread fails, and the client gets a 503).
pub fn connection_ceiling(fds_per_connection: usize) -> usize {
    let max_maps = read_number("/proc/sys/vm/max_map_count").unwrap_or(65_530);
    let max_files = open_file_limit().unwrap_or(1024);
    let max_threads = read_number("/proc/sys/kernel/threads-max")
        .unwrap_or(usize::MAX)
        .min(read_number("/proc/sys/kernel/pid_max").unwrap_or(32_768));
    // Leave room for the start threads (see `MAX_STARTING`), and for
    // everything else the process (and the machine) maps, opens and runs.
    let by_maps = max_maps.saturating_sub(2_000 + MAX_STARTING * MAPS_PER_THREAD)
        / (THREADS_PER_CONNECTION * MAPS_PER_THREAD);
    let by_files = max_files.saturating_sub(100) / fds_per_connection.max(1);
    let by_threads = max_threads.saturating_sub(2_000 + MAX_STARTING) / THREADS_PER_CONNECTION;
    by_maps.min(by_files).min(by_threads).max(1)
}

fn read_number(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The soft open-file limit, read from `/proc/self/limits` (no libc needed).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
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
