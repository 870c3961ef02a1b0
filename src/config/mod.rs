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
#[cfg(feature = "tls")]
pub use redis_tls::{RedisTls, RedisTlsArgs, install_crypto_provider};
#[cfg(feature = "tls")]
pub use tls::TlsArgs;
#[cfg(feature = "tokens")]
pub use tokens::{AUTH_SECRET_ENV, Command, TokenArgs, Tokens, auth_secret};

/// Where messages are relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// This Redis; failing to reach it at start is an error.
    Redis(RedisTarget),
    /// Redis on localhost:6379 if it answers, otherwise in-process.
    Auto,
    /// In-process, by request.
    InProcess,
}

/// Where Redis is, as `--redis` says, and (with `rediss`) the TLS every
/// connection to it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, by its URL (`redis://…`, `rediss://…`, or a Unix socket).
    Server {
        /// The URL.
        url: String,
        /// With `rediss://`, the certificates to trust and show.
        #[cfg(feature = "tls")]
        tls: Option<RedisTls>,
    },
    /// Sentinels, asked in turn where a master is.
    Sentinel {
        /// `host:port` of each sentinel.
        sentinels: Vec<String>,
        /// The master's name in the sentinels' configuration.
        master: String,
        /// The master's password, if it has one.
        password: Option<String>,
        /// The master's database number.
        db: i64,
        /// With `rediss+sentinel://`: TLS to the sentinels and the master.
        #[cfg(feature = "tls")]
        tls: Option<RedisTls>,
    },
    /// A Redis Cluster, found through any of its seed nodes.
    Cluster {
        /// `host:port` of each seed node, asked in turn for the slot map.
        seeds: Vec<String>,
        /// The nodes' password, if they have one.
        password: Option<String>,
        /// With `rediss+cluster://`: TLS to every node.
        #[cfg(feature = "tls")]
        tls: Option<RedisTls>,
    },
}

impl RedisTarget {
    /// The target as a URL, for messages (a server's password included:
    /// the broker redacts it).
    pub fn url(&self) -> String {
        let s = if self.tls().is_some() { "s" } else { "" };
        match self {
            RedisTarget::Server { url, .. } => url.clone(),
            RedisTarget::Sentinel {
                sentinels, master, ..
            } => format!("redis{s}+sentinel://{}/{master}", sentinels.join(",")),
            RedisTarget::Cluster { seeds, .. } => {
                format!("redis{s}+cluster://{}", seeds.join(","))
            }
        }
    }

    /// One server at `url` (`redis://`: no TLS).
    pub fn server(url: &str) -> RedisTarget {
        RedisTarget::Server {
            url: url.to_owned(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// With `rediss`, how every connection makes its TLS session.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&RedisTls> {
        match self {
            RedisTarget::Server { tls, .. }
            | RedisTarget::Sentinel { tls, .. }
            | RedisTarget::Cluster { tls, .. } => tls.as_ref(),
        }
    }

    /// Without the `tls` feature there is never TLS.
    #[cfg(not(feature = "tls"))]
    pub fn tls(&self) -> Option<&std::convert::Infallible> {
        None
    }
}

/// Why `--redis redis+sentinel://…` or `redis+cluster://…` is refused by
/// a build without the `redis-ha` feature.
pub const NO_REDIS_HA: &str = "Sentinel and Cluster are not built into this threadchat: \
     build it with the `redis-ha` feature (on by default; `cargo build --features redis-ha`)";

/// Why `--redis rediss://…` is refused by a build without the `tls`
/// feature.
pub const NO_TLS: &str = "TLS (rediss://) is not built into this threadchat: \
     build it with the `tls` feature (on by default; `cargo build --features tls`)";

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

/// The `--redis-*` TLS options a `rediss` URL is read with (none without
/// the `tls` feature).
#[cfg(feature = "tls")]
type TlsOptions = RedisTlsArgs;
#[cfg(not(feature = "tls"))]
type TlsOptions = ();

#[cfg(feature = "tls")]
fn tls_options(args: &Args) -> TlsOptions {
    args.redis_tls.clone()
}

#[cfg(not(feature = "tls"))]
fn tls_options(_args: &Args) -> TlsOptions {}

/// The TLS a `rediss` URL asks for: the files of `options`, read now.
#[cfg(feature = "tls")]
type Tls = Option<RedisTls>;
#[cfg(not(feature = "tls"))]
type Tls = ();

/// Reads `--redis`: a host or host:port, as the original app took it
/// (`redis://{host}`); a `redis://` URL;
/// `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`; or
/// `redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT…]`. Each scheme with
/// `rediss` for `redis` is the same over TLS, with the files `options`
/// name.
#[cfg_attr(not(feature = "tls"), allow(clippy::let_unit_value))]
fn redis_target(value: &str, options: &TlsOptions) -> Result<RedisTarget, ConfigError> {
    let fail = |reason: &str| ConfigError::Redis {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(fail("empty"));
    }
    let Some((scheme, rest)) = value.split_once("://") else {
        let url = format!("redis://{value}");
        redis::Client::open(url.as_str()).map_err(|e| fail(&e.to_string()))?;
        return Ok(RedisTarget::server(&url));
    };
    // `rediss…` is `redis…` over TLS.
    let (scheme, over_tls) = match scheme.strip_prefix("rediss") {
        Some(topology) => (format!("redis{topology}"), true),
        None => (scheme.to_owned(), false),
    };
    if over_tls && !cfg!(feature = "tls") {
        return Err(fail(NO_TLS));
    }
    match scheme.as_str() {
        "redis" | "redis+unix" | "unix" => {}
        "redis+sentinel" | "redis+cluster" if !cfg!(feature = "redis-ha") => {
            return Err(fail(NO_REDIS_HA));
        }
        "redis+sentinel" | "redis+cluster" => {}
        _ => return Err(fail("expected a host, host:port, or a redis:// URL")),
    }
    let tls = tls_for(over_tls, options)?;
    match scheme.as_str() {
        "redis+sentinel" => sentinel_target(rest, tls).map_err(|reason| fail(&reason)),
        "redis+cluster" => cluster_target(rest, tls).map_err(|reason| fail(&reason)),
        _ => {
            let client = redis::Client::open(value).map_err(|e| fail(&e.to_string()))?;
            if let redis::ConnectionAddr::TcpTls { insecure: true, .. } =
                client.get_connection_info().addr()
            {
                return Err(fail(
                    "#insecure (no certificate check) is not supported: \
                     give the certificate authority with --redis-ca",
                ));
            }
            Ok(RedisTarget::Server {
                url: value.to_owned(),
                #[cfg(feature = "tls")]
                tls,
            })
        }
    }
}

/// Reads the TLS files if the URL asked for TLS.
#[cfg(feature = "tls")]
fn tls_for(over_tls: bool, options: &TlsOptions) -> Result<Tls, ConfigError> {
    over_tls.then(|| RedisTls::load(options)).transpose()
}

#[cfg(not(feature = "tls"))]
fn tls_for(_over_tls: bool, _options: &TlsOptions) -> Result<Tls, ConfigError> {
    Ok(())
}

/// The part of a Sentinel URL after `redis+sentinel://`.
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
fn sentinel_target(rest: &str, tls: Tls) -> Result<RedisTarget, String> {
    let (password, rest) = password_of(rest);
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (master, db) = path.split_once('/').unwrap_or((path, "0"));
    if master.is_empty() {
        return Err("a Sentinel URL names the master: redis+sentinel://HOST:PORT,…/MASTER".into());
    }
    let db = db
        .parse()
        .map_err(|_| format!("database {db:?} is not a number"))?;
    Ok(RedisTarget::Sentinel {
        sentinels: addresses(hosts, Some(26379), "sentinel")?,
        master: master.to_owned(),
        password,
        db,
        #[cfg(feature = "tls")]
        tls,
    })
}

/// The part of a Cluster URL after `redis+cluster://`: seed nodes, each
/// with its port (a cluster has one database, so there is no path).
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
fn cluster_target(rest: &str, tls: Tls) -> Result<RedisTarget, String> {
    let (password, rest) = password_of(rest);
    let hosts = rest.strip_suffix('/').unwrap_or(rest);
    if hosts.contains('/') {
        return Err("a cluster has one database: redis+cluster://HOST:PORT,… has no path".into());
    }
    Ok(RedisTarget::Cluster {
        seeds: addresses(hosts, None, "seed node")?,
        password,
        #[cfg(feature = "tls")]
        tls,
    })
}

/// Splits `[[USER]:PASSWORD@]REST` (an empty password is none).
fn password_of(rest: &str) -> (Option<String>, &str) {
    match rest.rsplit_once('@') {
        Some((auth, rest)) => {
            let password = auth.split_once(':').map_or(auth, |(_, p)| p);
            (Some(password.to_owned()).filter(|p| !p.is_empty()), rest)
        }
        None => (None, rest),
    }
}

/// `HOST:PORT,HOST:PORT,…` as a list (a missing port is `default_port`,
/// if there is one); at least one.
fn addresses(hosts: &str, default_port: Option<u16>, what: &str) -> Result<Vec<String>, String> {
    let mut addresses = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let address = match default_port {
            Some(port) if !host.contains(':') => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("{what} {host:?} is not HOST:PORT"));
        }
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(format!("no {what} address"));
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_targets_like_the_original_and_urls() {
        let server = |url: &str| Some(RedisTarget::server(url));
        let redis_target = |value: &str| redis_target(value, &Default::default());
        assert_eq!(redis_target("localhost").ok(), server("redis://localhost"));
        assert_eq!(
            redis_target("10.1.2.3:6380").ok(),
            server("redis://10.1.2.3:6380")
        );
        assert_eq!(
            redis_target("redis://:pw@h:1/2").ok(),
            server("redis://:pw@h:1/2")
        );
        assert!(redis_target("").is_err());
        assert!(redis_target("http://x").is_err());
        assert!(redis_target("host:notaport").is_err());
    }

    #[test]
    #[cfg(not(feature = "redis-ha"))]
    fn sentinel_and_cluster_urls_name_the_feature_they_need() {
        let redis_target = |value: &str| redis_target(value, &Default::default());
        for url in ["redis+sentinel://a:1/m", "redis+cluster://a:1,b:2"] {
            let error = redis_target(url).unwrap_err().to_string();
            assert!(error.contains("`redis-ha` feature"), "{error}");
        }
    }

    #[test]
    #[cfg(feature = "redis-ha")]
    fn sentinel_urls_are_read() {
        let redis_target = |value: &str| redis_target(value, &Default::default());
        assert_eq!(
            redis_target("redis+sentinel://:pw@a:1,b:2,c/mymaster/3").ok(),
            Some(RedisTarget::Sentinel {
                sentinels: vec!["a:1".into(), "b:2".into(), "c:26379".into()],
                master: "mymaster".into(),
                password: Some("pw".into()),
                db: 3,
                #[cfg(feature = "tls")]
                tls: None,
            })
        );
        for bad in [
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/",
            "redis+sentinel:///m",
            "redis+sentinel://a:x/m",
            "redis+sentinel://a:1/m/x",
        ] {
            assert!(redis_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(feature = "redis-ha")]
    fn cluster_urls_are_read() {
        let redis_target = |value: &str| redis_target(value, &Default::default());
        assert_eq!(
            redis_target("redis+cluster://:pw@a:1,b:2/").ok(),
            Some(RedisTarget::Cluster {
                seeds: vec!["a:1".into(), "b:2".into()],
                password: Some("pw".into()),
                #[cfg(feature = "tls")]
                tls: None,
            })
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://a",
            "redis+cluster://a:1/0",
            "redis+cluster://:7000",
            "redis+cluster://a:70000",
        ] {
            assert!(redis_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(not(feature = "tls"))]
    fn rediss_urls_name_the_feature_they_need() {
        for url in [
            "rediss://a:1",
            "rediss+sentinel://a:1/m",
            "rediss+cluster://a:1",
        ] {
            let error = redis_target(url, &()).unwrap_err().to_string();
            assert!(error.contains("`tls` feature"), "{error}");
        }
    }

    /// `rediss…` is `redis…` over TLS, with the files of `--redis-ca`
    /// (a CA made here).
    #[test]
    #[cfg(all(feature = "tls", feature = "redis-ha", target_os = "linux"))]
    fn rediss_urls_are_read() {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let file =
            std::env::temp_dir().join(format!("threadchat-config-ca-{}.pem", std::process::id()));
        std::fs::write(&file, ca.pem()).unwrap();
        let options = RedisTlsArgs {
            redis_ca: Some(file.clone()),
            ..RedisTlsArgs::default()
        };
        for (given, url) in [
            ("rediss://h:1/2", "rediss://h:1/2"),
            ("rediss+sentinel://a:1,b:2/m", "rediss+sentinel://a:1,b:2/m"),
            ("rediss+cluster://a:1,b:2", "rediss+cluster://a:1,b:2"),
        ] {
            let target = redis_target(given, &options).unwrap();
            assert!(target.tls().is_some(), "{given}");
            assert_eq!(target.url(), url);
        }
        assert!(
            redis_target("redis://h:1", &options)
                .unwrap()
                .tls()
                .is_none()
        );
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn ceiling_is_positive() {
        assert!(connection_ceiling(2) >= 1);
        assert!(connection_ceiling(1) >= connection_ceiling(2));
    }
}
