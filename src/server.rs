//! The accept loop: one blocking `TcpListener::accept`, a thread per
//! connection, and an orderly shutdown.
//!
//! Startup is split so tests can bind port 0 and ask which port they got
//! (zero2prod's pattern): [`Server::build`] connects the relay and binds, [`Server::local_addr`] tells,
//! [`Server::run`] serves until [`ShutdownHandle::shutdown`] is called.
//!
//! **Bounds.** At most `max_connections` connections exist at once, counting
//! those still in their HTTP handshake, and each reserves its threads and
//! descriptors from the process's budget (`crate::capacity`), which
//! rooms' shared feeds draw on too. Past either, the accept loop itself
//! writes `503 Service Unavailable` and closes: no thread is spent on the
//! refused. The same goes for an address past its connection cap, or with
//! too many connections still in their start (`session::admission`); except
//! that a connection refused for its address's caps gets its 503 a second
//! later, held without a thread, so that reconnecting at once cannot make
//! the refusals a flood. Refusals are counted and their log lines summed up
//! (`session::admission`).
//!
//! **Thread lifecycle.** Every connection thread is named and its `JoinHandle`
//! kept. The accept loop starts a connection's start thread and joins it
//! once it has handed the connection to its reader thread (a
//! `Report::Reading`); the reader thread's handle is kept until the
//! connection is over (`Report::Done`), and joined then. While a start
//! thread may be waiting to be joined, `accept` waits at most
//! `REAP_INTERVAL`; otherwise it blocks for as long as it likes. At most
//! `--max-starting` connections start at once. At shutdown the loop stops
//! accepting, asks every connection to close (1001), waits a grace period,
//! cuts the sockets of any that have not finished, and joins them all.
//!
//! **Waking `accept`.** A thread blocked in `accept()` cannot be interrupted
//! portably. [`ShutdownHandle::shutdown`] sets a flag and connects to the
//! listener itself; the loop wakes, sees the flag and leaves (tiny-http's trick).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use socket2::{Domain, Socket, Type};

use crate::broker::{self, Broker, BrokerError};
use crate::capacity::{Capacity, Cost, Reservation};
use crate::config::Config;
use crate::config::THREADS_PER_CONNECTION;
use crate::http;
use crate::metrics::Metrics;
use crate::session::admission::{Held, Pass, Refusal};
use crate::session::{self, Conn, Context, Report, START_STACK_SIZE};

/// A bound, not yet running, chat server.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    ctx: Arc<Context>,
    /// The budget of threads and descriptors each connection reserves from.
    capacity: Arc<Capacity>,
    /// What one connection reserves.
    connection_cost: Cost,
    shutdown: ShutdownHandle,
    /// Random per process: makes connection ids unique across instances.
    instance: u64,
}

/// Stops a running [`Server`] from any thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    /// Where to connect to wake the accept loop.
    wake_addr: SocketAddr,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound (in use, not local, no permission…).
    // The OS error is the source: printed once, by the error chain.
    #[error("cannot listen on {addr}")]
    Bind {
        /// What we tried to bind.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The chat relay could not be set up (Redis unreachable, say).
    #[error(transparent)]
    Relay(#[from] BrokerError),
    /// A thread the server needs could not be started.
    #[error("cannot start the {0} thread: {1}")]
    Spawn(&'static str, io::Error),
}

/// Connections the kernel queues for `accept` (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). std's `TcpListener::bind` asks
/// for 128: when thousands of clients reconnect at once (a restart, a
/// network blip) the extra ones are dropped and retry only after a second.
const ACCEPT_BACKLOG: i32 = 4096;

/// A listening `TcpListener` on the first of `addrs` that works, with a
/// deep accept queue.
fn listen(addrs: &[SocketAddr]) -> io::Result<TcpListener> {
    let mut last_error = io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on");
    for addr in addrs {
        let attempt = (|| {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&(*addr).into())?;
            socket.listen(ACCEPT_BACKLOG)?;
            Ok(TcpListener::from(socket))
        })();
        match attempt {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

impl Server {
    /// Sets up everything `config` describes: the chat relay (connecting to
    /// Redis, or in-process), then the listening socket.
    pub fn build(config: &Config) -> Result<Server, ServerError> {
        let metrics = Arc::new(Metrics::default());
        // `max_connections` connections' worth of threads and descriptors:
        // the ceiling's own terms (see `config::connection_ceiling`).
        let connections = config.limits.max_connections;
        let capacity = Capacity::new(Cost::new(
            connections.saturating_mul(THREADS_PER_CONNECTION),
            connections.saturating_mul(config.fds_per_connection),
        ));
        let settings = broker::Settings {
            instance: broker::random_u64(),
            history: config.history,
            history_bytes: config.history_bytes,
            room_ttl: config.room_ttl,
            max_payload: crate::protocol::max_payload(config.limits.max_message_size),
            subscriptions: config.subscriptions,
            capacity: Arc::clone(&capacity),
            idle_rooms_bytes: config.idle_rooms_bytes,
            wait_replicas: config.wait_replicas,
        };
        let broker = broker::connect(&config.broker, &settings, &metrics)?;
        Server::bind(config, broker, metrics, capacity)
    }

    /// What relays the messages, for a person ("Redis at …, per-client
    /// subscriptions").
    pub fn relay(&self) -> String {
        self.ctx.broker.describe()
    }

    /// Binds the listening socket described by `config`.
    fn bind(
        config: &Config,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        capacity: Arc<Capacity>,
    ) -> Result<Server, ServerError> {
        let addr = format!("{}:{}", config.host, config.port);
        let bind_err = |source| ServerError::Bind {
            addr: addr.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(bind_err)?.collect();
        let listener = listen(&addrs).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let wake_addr = match local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local_addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local_addr.port())
            }
            _ => local_addr,
        };
        Ok(Server {
            instance: broker.instance(),
            listener,
            local_addr,
            capacity,
            connection_cost: Cost::new(THREADS_PER_CONNECTION, config.fds_per_connection),
            ctx: Arc::new(
                Context::new(config, broker, metrics)
                    .map_err(|e| ServerError::Spawn("announcer", e))?,
            ),
            shutdown: ShutdownHandle {
                requested: Arc::new(AtomicBool::new(false)),
                wake_addr,
            },
        })
    }

    /// The address actually bound (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops [`run`](Self::run).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Accepts and serves connections until shut down; returns once every
    /// connection thread has been joined.
    pub fn run(self) {
        let (reports_tx, reports) = crossbeam_channel::unbounded();
        let mut registry = Registry {
            active: HashMap::new(),
            starting: 0,
            reports,
        };
        let mut reaping = false;
        let mut held = Held::new(self.ctx.is_tls());
        let mut next_seq: u64 = 0;
        let mut backoff = Duration::from_millis(10);

        loop {
            // Start threads waiting to be joined, or refused connections
            // waiting for their answer: wake up for them.
            let waking = registry.starting > 0 || !held.is_empty();
            if reaping != waking {
                reaping = waking;
                let wait = reaping.then_some(REAP_INTERVAL);
                if let Err(e) = socket2::SockRef::from(&self.listener).set_read_timeout(wait) {
                    log::warn!("cannot set the accept timeout: {e}");
                }
            }
            let accepted = self.listener.accept();
            if self.shutdown.requested.load(Ordering::SeqCst) {
                break;
            }
            registry.reap();
            held.answer_due();
            while registry.starting >= self.ctx.limits.max_starting {
                registry.wait_for_one();
            }
            let (stream, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Usually out of file descriptors: wait for some to be
                    // released rather than spin (mini-redis does the same).
                    log::error!("accept failed: {e}; retrying in {backoff:?}");
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let open = registry.active.len();
            let (pass, reserved) = match self.admit(peer, open) {
                Ok(slots) => slots,
                Err((reason, why)) => {
                    let hint = if reason.is_held() && peer.ip().is_loopback() {
                        " (behind a reverse proxy on this host? pass --trusted-proxy)"
                    } else {
                        ""
                    };
                    let ctx = &self.ctx;
                    ctx.admission.refused(reason, &format!("{peer}{hint}"));
                    if reason.is_held() {
                        // Each held connection takes the descriptor of a
                        // connection the server has room for.
                        held.refuse(stream, why, ctx.limits.max_connections.saturating_sub(open));
                    } else {
                        http::refuse_full(&stream, why, self.ctx.is_tls());
                    }
                    continue;
                }
            };
            next_seq += 1;
            let conn = Arc::new(Conn::new(self.instance, next_seq, peer, stream, pass));
            match spawn_start(Arc::clone(&conn), Arc::clone(&self.ctx), reports_tx.clone()) {
                Ok(start) => registry.add(&conn, start, reserved),
                Err(e) => {
                    let who = format!("{peer} ({e})");
                    self.ctx.admission.refused(Refusal::NoThread, &who);
                    conn.force_close();
                }
            }
        }

        registry.close_all(self.ctx.limits.close_grace + Duration::from_secs(1));
        // Every connection's threads are joined: nobody else holds the
        // context now.
        match Arc::try_unwrap(self.ctx) {
            Ok(ctx) => ctx.shut_down(),
            Err(_) => log::warn!("a connection outlived shutdown"),
        }
        log::info!("stopped");
    }
}

impl Server {
    /// Whether a connection from `peer`, with `open` connections open, may
    /// be served: its pass from admission and its share of the budget, or
    /// why not and what to answer.
    fn admit(
        &self,
        peer: SocketAddr,
        open: usize,
    ) -> Result<(Pass, Reservation), (Refusal, &'static str)> {
        if open >= self.ctx.limits.max_connections {
            return Err((Refusal::ServerFull, "server full; try again later"));
        }
        // Rooms' feeds draw on the same budget (shared subscriptions).
        let reserved = self
            .capacity
            .reserve(self.connection_cost)
            .ok_or((Refusal::ServerFull, "server full; try again later"))?;
        let pass = self.ctx.admission.arrive(peer.ip())?;
        Ok((pass, reserved))
    }
}

impl ShutdownHandle {
    /// Asks the server to stop. Returns at once; [`Server::run`] returns when
    /// every connection is closed.
    pub fn shutdown(&self) {
        if !self.requested.swap(true, Ordering::SeqCst) {
            // Wake the accept loop. If this fails, the loop is not blocked in
            // accept (it will see the flag on its next turn anyway).
            let _ = TcpStream::connect_timeout(&self.wake_addr, Duration::from_secs(1));
        }
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// How long `accept` waits while a start thread may be waiting to be
/// joined (it has ended, or is about to: see the module doc).
const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// A live connection's threads, as far as the accept loop knows them.
struct Entry {
    /// Weak: a connection's state, and with it its socket and its place in
    /// its address's count, goes when its last thread ends, not when this
    /// loop next wakes to join it.
    conn: Weak<Conn>,
    /// The start thread, until joined.
    start: Option<JoinHandle<()>>,
    /// The reader thread, once the start has handed over to it.
    reader: Option<JoinHandle<()>>,
    /// The connection's share of the budget, given back once its threads
    /// are joined (with the entry).
    _reserved: Reservation,
}

/// The live connections, owned by the accept loop.
struct Registry {
    active: HashMap<u64, Entry>,
    /// Entries whose start thread is not joined yet.
    starting: usize,
    /// What the connections' threads report.
    reports: Receiver<Report>,
}

impl Registry {
    fn add(&mut self, conn: &Arc<Conn>, start: JoinHandle<()>, reserved: Reservation) {
        let entry = Entry {
            conn: Arc::downgrade(conn),
            start: Some(start),
            reader: None,
            _reserved: reserved,
        };
        self.active.insert(conn.seq, entry);
        self.starting += 1;
    }

    /// Acts on every report so far.
    fn reap(&mut self) {
        while let Ok(report) = self.reports.try_recv() {
            self.act_on(report);
        }
    }

    /// Waits for one report and acts on it.
    fn wait_for_one(&mut self) {
        if let Ok(report) = self.reports.recv() {
            self.act_on(report);
        }
    }

    /// Joins the threads that have ended, keeps the reader threads' handles.
    /// (A start thread reports last thing before it ends, so joining it
    /// waits a moment at most. Panics are caught inside the threads.)
    fn act_on(&mut self, report: Report) {
        match report {
            Report::Reading(seq, reader) => match self.active.get_mut(&seq) {
                Some(entry) => {
                    self.starting -= usize::from(entry.start.is_some());
                    if let Some(start) = entry.start.take() {
                        let _ = start.join();
                    }
                    entry.reader = Some(reader);
                }
                // The reader was quicker: it reported the connection over
                // (and its start thread was joined then).
                None => {
                    let _ = reader.join();
                }
            },
            Report::Done(seq) => {
                let Some(entry) = self.active.remove(&seq) else {
                    return;
                };
                if let Some(start) = entry.start {
                    self.starting -= 1;
                    let _ = start.join();
                }
                if let Some(reader) = entry.reader {
                    let _ = reader.join();
                }
            }
        }
    }

    /// The connections still alive.
    fn live(&self) -> impl Iterator<Item = Arc<Conn>> + '_ {
        self.active
            .values()
            .filter_map(|entry| entry.conn.upgrade())
    }

    /// Closes every connection: politely first, by force after `grace`, and
    /// joins all their threads.
    fn close_all(mut self, grace: Duration) {
        self.reap();
        if !self.active.is_empty() {
            log::info!("shutting down: closing {} connection(s)", self.active.len());
        }
        for conn in self.live() {
            conn.stop_for_shutdown();
        }
        self.wait(Some(Instant::now() + grace));
        for conn in self.live() {
            conn.force_close();
        }
        // Every connection reports when it is over, however it ends; with
        // their sockets shut down, that is now.
        self.wait(None);
    }

    /// Acts on reports until every connection is over, or `deadline` passes.
    fn wait(&mut self, deadline: Option<Instant>) {
        while !self.active.is_empty() {
            let report = match deadline {
                Some(deadline) => self.reports.recv_deadline(deadline).ok(),
                None => self.reports.recv().ok(),
            };
            match report {
                Some(report) => self.act_on(report),
                None => break,
            }
        }
    }
}

/// Starts a connection's start thread (see [`session::run`]).
fn spawn_start(
    conn: Arc<Conn>,
    ctx: Arc<Context>,
    reports: Sender<Report>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("tc-start-{}", conn.seq))
        .stack_size(START_STACK_SIZE)
        .spawn(move || session::run(conn, ctx, reports))
}
