//! The command line, as clap parses it (with `THREADCHAT_*` environment
//! variables as fallbacks): raw, unchecked [`Args`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

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
    /// ("10.0.0.5:6380"), a URL ("redis://:secret@host:6379/2"), or
    /// sentinels and the master they watch
    /// ("redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster"), or seed
    /// nodes of a Redis Cluster ("redis+cluster://n1:7000,n2:7000").
    /// `rediss://`, `rediss+sentinel://`, `rediss+cluster://`: the same
    /// over TLS.
    /// Without it, Redis on localhost:6379 is used if it answers; otherwise
    /// messages are relayed in-process (a single instance only).
    #[arg(long, env = "THREADCHAT_REDIS", value_name = "HOST[:PORT]|URL")]
    pub redis: Option<String>,

    /// Redis over TLS (`rediss://`, the `tls` feature): `--redis-ca`,
    /// `--redis-cert`, `--redis-key`.
    #[cfg(feature = "tls")]
    #[command(flatten)]
    pub redis_tls: super::redis_tls::RedisTlsArgs,

    /// Relay messages in-process even if a Redis is reachable (a single
    /// instance only; handy for trying threadchat without Redis).
    #[arg(long, conflicts_with = "redis")]
    pub in_process: bool,

    /// A message counts as delivered only once this many of the Redis
    /// master's replicas have it (`WAIT`, up to 1 s): a sender is then never
    /// told "delivered" for a message a failover loses. 0: as soon as the
    /// master has it. Past 1 s (a replica down, say) its sender is told it
    /// may or may not have been delivered; see OPERATIONS.md.
    #[arg(
        long,
        env = "THREADCHAT_WAIT_REPLICAS",
        default_value_t = 0,
        value_name = "N",
        conflicts_with = "in_process"
    )]
    pub wait_replicas: usize,

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
    // This doc is also `--help`'s text, where `<…>` around the URL would show.
    #[allow(rustdoc::bare_urls)]
    pub allow_origins: Vec<String>,

    /// Entries of each room's log kept: chat messages, joins and leaves.
    /// Each client that joins is sent its chat messages (the history), and
    /// a client that reconnects with ?since= can recover what it missed
    /// from it (0: none kept). Kept in Redis, or in memory with the
    /// in-process relay.
    #[arg(
        long,
        env = "THREADCHAT_HISTORY",
        default_value_t = 50,
        value_name = "MESSAGES"
    )]
    pub history: usize,

    /// Most bytes of each room's log kept; the oldest entries go first (one
    /// bigger than this on its own is delivered but not kept). Bounds what
    /// every joiner is sent, too.
    #[arg(
        long,
        env = "THREADCHAT_HISTORY_BYTES",
        default_value_t = 256 * 1024,
        value_name = "BYTES"
    )]
    pub history_bytes: usize,

    /// Seconds a room's state (history, member list) outlives its last use
    /// (a message, a join or leave, or members still in it): so how long an
    /// empty room is kept for people who come back. Then it expires, in
    /// Redis and in-process alike.
    #[arg(
        long,
        env = "THREADCHAT_ROOM_TTL",
        default_value_t = 3_600.0,
        value_name = "SECONDS"
    )]
    pub room_ttl: f64,

    /// Most bytes held for rooms nobody is in (their logs), across all
    /// rooms; past it the least recently used empty rooms are forgotten
    /// first. A room with members is never forgotten.
    #[arg(
        long,
        env = "THREADCHAT_IDLE_ROOMS_BYTES",
        default_value_t = 64 * 1024 * 1024,
        value_name = "BYTES"
    )]
    pub idle_rooms_bytes: usize,

    /// Rooms one IP address may create per minute (a room is new when it
    /// has no log yet), with a burst of as many (0: no limit). Past it,
    /// joining a new room is refused with HTTP 429.
    #[arg(
        long,
        env = "THREADCHAT_NEW_ROOMS_PER_MINUTE",
        default_value_t = 30,
        value_name = "N"
    )]
    pub new_rooms_per_minute: u32,

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

    /// Most connections from one IP address (an IPv6 /64) that may be in
    /// their start at once: connected, their request head not yet read (0:
    /// no limit). Past it, HTTP 503 (after 1 s). Real clients send their head
    /// straight away; this bounds what silent connections from one host
    /// can hold.
    #[arg(
        long,
        env = "THREADCHAT_MAX_STARTING_PER_IP",
        default_value_t = 16,
        value_name = "N"
    )]
    pub max_starting_per_ip: usize,

    /// Most connections in their start at once (from 1 to 1024); past it,
    /// the server stops accepting until one has started. Once more than
    /// half are taken, new connections get 1 s (or --handshake-timeout, if
    /// shorter) to send their request head.
    #[arg(
        long,
        env = "THREADCHAT_MAX_STARTING",
        default_value_t = super::ceiling::MAX_STARTING,
        value_name = "N"
    )]
    pub max_starting: usize,

    /// A host name this server answers to, in the Host header of the page,
    /// an upgrade, /members and /metrics (repeatable, or comma-separated).
    /// IP literals, "localhost" and the --host name are always answered;
    /// "*" answers any Host (behind a proxy that rewrites it). Others get
    /// HTTP 421: this stops DNS rebinding.
    #[arg(
        long = "allowed-host",
        env = "THREADCHAT_ALLOWED_HOSTS",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

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

    /// Token authentication (the `tokens` feature).
    #[cfg(feature = "tokens")]
    #[command(flatten)]
    pub tokens: super::tokens::TokenArgs,

    /// TLS for clients (the `tls` feature).
    #[cfg(feature = "tls")]
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,

    /// A nickname may be used by one connection at a time in a room
    /// (across instances): a second one gets 409.
    #[arg(long, env = "THREADCHAT_UNIQUE_NICKNAMES")]
    pub unique_nicknames: bool,

    /// With --unique-nicknames, most nicknames one IP address may hold at
    /// once on this instance, across rooms (0: no limit); past it, HTTP
    /// 429. Behind a reverse proxy, see --trusted-proxy.
    #[arg(
        long,
        env = "THREADCHAT_MAX_NICKNAMES_PER_IP",
        default_value_t = 10,
        value_name = "N"
    )]
    pub max_nicknames_per_ip: usize,

    /// What to do instead of serving (`threadchat token NAME`; the
    /// `tokens` feature).
    #[cfg(feature = "tokens")]
    #[command(subcommand)]
    pub command: Option<super::tokens::Command>,

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Subscriptions {
    /// Each client has its own `SUBSCRIBE` connection (the design's
    /// default): one Redis connection per client, and Redis does the
    /// fan-out.
    #[default]
    PerClient,
    /// Each process has one `SUBSCRIBE` connection per room and fans out to
    /// its clients itself.
    Shared,
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
