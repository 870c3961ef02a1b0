//! The accept loop: one blocking `TcpListener::accept`, a thread per
//! connection, and an orderly shutdown.
//!
//! Startup is split so tests can bind port 0 and ask which port they got
//! (zero2prod's pattern): [`Server::bind`] binds, [`Server::local_addr`] tells,
//! [`Server::run`] serves until [`ShutdownHandle::shutdown`] is called.
//!
//! **Bounds.** At most `max_connections` connections exist at once, counting
//! those still in their HTTP handshake. Past it, the accept loop itself writes
//! `503 Service Unavailable` and closes: no thread is spent on the refused.
//!
//! **Thread lifecycle.** Every connection thread is named and its `JoinHandle`
//! kept. A finishing connection sends its number on the `done` channel; the
//! accept loop joins it the next time it wakes. At shutdown the loop stops
//! accepting, asks every connection to close (1001), waits a grace period,
//! cuts the sockets of any that have not finished, and joins them all.
//!
//! **Waking `accept`.** A thread blocked in `accept()` cannot be interrupted
//! portably. [`ShutdownHandle::shutdown`] sets a flag and connects to the
//! listener itself; the loop wakes, sees the flag and leaves (tiny-http's trick).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use socket2::{Domain, Socket, Type};

use crate::broker::Broker;
use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::session::announce::Announcer;
use crate::session::handoff::{FIRST_THREAD_STACK_SIZE, Handoffs};
use crate::session::per_ip::PerIp;
use crate::session::welcome::Welcomes;
use crate::session::{self, Conn, Context, JunkLog, SessionError};

/// A bound, not yet running, chat server.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    ctx: Arc<Context>,
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
    /// Binds the listening socket described by `config`.
    pub fn bind(
        config: &Config,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
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
            ctx: Arc::new(Context {
                announcer: Announcer::start(Arc::clone(&broker))
                    .map_err(|e| ServerError::Spawn("announcer", e))?,
                broker,
                limits: config.limits.clone(),
                metrics,
                junk: JunkLog::default(),
                handoffs: Handoffs::default(),
                welcomes: Welcomes::default(),
                per_ip: PerIp::new(config.limits.max_connections_per_ip),
                members: http::MembersCache::default(),
                panic_trigger: test_panic_trigger(),
            }),
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
            reports,
        };
        let max = self.ctx.limits.max_connections;
        let mut next_seq: u64 = 0;
        let mut backoff = Duration::from_millis(10);

        loop {
            let accepted = self.listener.accept();
            if self.shutdown.requested.load(Ordering::SeqCst) {
                break;
            }
            registry.reap();
            let (stream, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
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
            if registry.active.len() >= max {
                log::warn!("refused {peer}: {max} connections already open (--max-connections)");
                http::refuse_full(&stream, "server full; try again later");
                continue;
            }
            // A trusted proxy's clients are counted by the address it
            // forwards, once their request is read (see `session::per_ip`).
            let slot = if self.ctx.limits.trusted_proxies.contains(&peer.ip()) {
                None
            } else {
                match self.ctx.per_ip.take(peer.ip()) {
                    Some(slot) => slot,
                    None => {
                        let hint = if peer.ip().is_loopback() {
                            " (behind a reverse proxy on this host? pass --trusted-proxy)"
                        } else {
                            ""
                        };
                        log::warn!("refused {peer}: --max-connections-per-ip reached{hint}");
                        http::refuse_full(
                            &stream,
                            "too many connections from your address; try again later",
                        );
                        continue;
                    }
                }
            };
            next_seq += 1;
            let conn = Arc::new(Conn::new(self.instance, next_seq, peer, stream, slot));
            // Registered first: a report can come as soon as the thread runs.
            registry
                .active
                .insert(conn.seq, (Arc::downgrade(&conn), None));
            let started =
                spawn_connection(Arc::clone(&conn), Arc::clone(&self.ctx), reports_tx.clone());
            if let Err(e) = started {
                registry.active.remove(&conn.seq);
                log::error!("refused {peer}: cannot start a thread: {e}");
                conn.force_close();
            }
        }

        registry.close_all(self.ctx.limits.close_grace + Duration::from_secs(1));
        log::info!("stopped");
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

/// What a connection's threads tell the accept loop.
enum Report {
    /// Connection `seq` was handed to this reader thread.
    HandedOff(u64, JoinHandle<()>),
    /// Connection `seq` is over; join its threads (this one too, if given).
    Done(u64, Option<JoinHandle<()>>),
}

/// How a connection's threads report (see [`session::Reports`]).
struct Reporter(Sender<Report>);

impl session::Reports for Reporter {
    fn handed_off(&self, seq: u64, reader: JoinHandle<()>) {
        let _ = self.0.send(Report::HandedOff(seq, reader));
    }

    fn finished(
        &self,
        conn: &Conn,
        result: Result<(), SessionError>,
        thread: Option<JoinHandle<()>>,
    ) {
        match result {
            Ok(()) => {}
            Err(e) if e.is_disconnect() => log::debug!("{}: {e}", conn.peer),
            Err(e) => log::error!("{} ({}): {e}", conn.peer, conn.id),
        }
        // However the session ended, the client sees the socket close now
        // (the accept loop joins the threads only when it next wakes).
        conn.force_close();
        let _ = self.0.send(Report::Done(conn.seq, thread));
    }
}

/// The live connections, owned by the accept loop.
struct Registry {
    /// Each connection, with the handle of its reader thread once it has
    /// been handed one. (A first thread holds its own handle: see
    /// [`session::handoff`].) Weak: a connection's state, and with it its
    /// socket and its place in its address's count, goes when its last
    /// thread ends, not when this loop next wakes to join it.
    active: HashMap<u64, (Weak<Conn>, Option<JoinHandle<()>>)>,
    /// What the connections' threads report.
    reports: Receiver<Report>,
}

impl Registry {
    /// Acts on every report so far.
    fn reap(&mut self) {
        while let Ok(report) = self.reports.try_recv() {
            self.act_on(report);
        }
    }

    /// Keeps a reader thread's handle, or joins the threads of a connection
    /// that is over. Panics are caught inside the threads; nothing to report
    /// here.
    fn act_on(&mut self, report: Report) {
        match report {
            Report::HandedOff(seq, reader) => match self.active.get_mut(&seq) {
                Some((_, held)) => *held = Some(reader),
                // Not expected: a reader reports done only after this. If it
                // happens, the connection is over and the reader ending.
                None => {
                    let _ = reader.join();
                }
            },
            Report::Done(seq, thread) => {
                if let Some((_, Some(reader))) = self.active.remove(&seq) {
                    let _ = reader.join();
                }
                if let Some(thread) = thread {
                    let _ = thread.join();
                }
            }
        }
    }

    /// Closes every connection: politely first, by force after `grace`, and
    /// joins all their threads.
    fn close_all(mut self, grace: Duration) {
        self.reap();
        if !self.active.is_empty() {
            log::info!("shutting down: closing {} connection(s)", self.active.len());
        }
        for conn in self.active.values().filter_map(|(conn, _)| conn.upgrade()) {
            conn.stop_for_shutdown();
        }
        self.wait(Some(Instant::now() + grace));
        for conn in self.active.values().filter_map(|(conn, _)| conn.upgrade()) {
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

/// Starts a connection's first thread, and sends it its own handle (it
/// hands that to whoever must join it: see [`session::handoff`]).
fn spawn_connection(conn: Arc<Conn>, ctx: Arc<Context>, reports: Sender<Report>) -> io::Result<()> {
    let (own_tx, own) = crossbeam_channel::bounded(1);
    let first = thread::Builder::new()
        .name(format!("tc-conn-{}", conn.seq))
        .stack_size(FIRST_THREAD_STACK_SIZE)
        .spawn(move || {
            let reporter: Arc<dyn session::Reports> = Arc::new(Reporter(reports));
            let served = panic::catch_unwind(AssertUnwindSafe(|| {
                session::run(Arc::clone(&conn), ctx, Arc::clone(&reporter), &own)
            }));
            if served.is_err() {
                // A panic in the connection's start.
                conn.force_close();
                reporter.finished(&conn, Err(SessionError::Panicked), own.try_recv().ok());
            }
        })?;
    let _ = own_tx.send(first);
    Ok(())
}

/// Debug builds only: the chat text that makes a reader thread panic, from
/// `THREADCHAT_TEST_PANIC` (tests check that a panic stays in its connection).
fn test_panic_trigger() -> Option<String> {
    if cfg!(debug_assertions) {
        std::env::var("THREADCHAT_TEST_PANIC").ok()
    } else {
        None
    }
}
