//! One client connection, from its HTTP request to its last frame.
//!
//! A chat connection is served by two threads, after a first one has
//! started it:
//!
//! ```text
//!   client ──request──▶ first thread (tc-conn-N): HTTP, subscribe, join, 101, welcome
//!                          │ hands over (see `handoff`), ends
//!   client ──frames──▶ reader thread (tc-read-N) ──publish──▶ broker
//!   client ◀─frames─── subscriber thread (tc-sub-N) ◀─events── broker
//!                both write through the one socket::Writer
//! ```
//!
//! * The **first thread** (`tc-conn-N`) does what a connection does once: it
//!   reads the HTTP request, starts the subscriber thread, has the join
//!   announced ([`announce`]), sends the `101`, the history and who is in the
//!   room ([`welcome`]). Then it starts the reader thread and ends; the
//!   reader thread joins it. [`handoff`] explains why: the start is deep and
//!   allocates a lot, and a thread that ends takes that memory with it.
//! * The **reader thread** ([`reader`]) blocks in `WebSocket::read`. It
//!   publishes what the client says, answers pings, pings a quiet client, and
//!   replies to the client's close. When a hand-off cannot be made, the first
//!   thread is the reader thread.
//! * The **subscriber thread** ([`subscriber`]) blocks in
//!   [`Subscription::run`](crate::broker::Subscription::run) and writes every
//!   chat message from someone else to the client, batching what arrives
//!   together. With a shared subscription, the room's dispatcher writes to a
//!   client that keeps up itself, and the subscriber thread catches up when
//!   it falls behind (*direct delivery*, see [`subscriber`]).
//!
//! They coordinate through crossbeam channels and one shared [`Conn`]:
//!
//! * `ready` and `go`: the start-up handshake. The subscriber says "ready"
//!   once subscribed; the first thread then sends the `101`, the history and
//!   the presence frame, and says "go" (with the history's message ids). So a
//!   connected client is already subscribed, and no live frame can precede
//!   the `101` or the history.
//! * `reader_done`: the reader drops its sender when it stops reading; the
//!   subscriber uses it to wait (bounded) for a close handshake to finish.
//! * [`Conn::end`]: the first thread to decide *why* the connection ends records
//!   an [`Ending`]; the other thread is then woken — the subscriber by its
//!   [`Canceller`], the reader by a close frame or by shutting the socket down.
//!
//! Whoever ends first, both threads end, the Redis subscription is dropped and
//! the socket is closed. `docs/ARCHITECTURE.md` walks through every case.
//!
//! The echo endpoint (`--echo-endpoint`, for the Autobahn conformance suite)
//! runs the same reader code with a handler that sends each message back, on
//! the first thread, and no subscriber thread.

pub mod announce;
pub mod handoff;
pub mod liveness;
pub mod per_ip;
mod rate;
mod reader;
mod sched;
pub mod socket;
mod subscriber;
pub mod welcome;

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tungstenite::http::StatusCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::broker::{Broker, BrokerError, Canceller};
use crate::config::Limits;
use crate::http::{self, Member, Outcome, Target};
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Kind, Room};
use reader::{ChatHandler, EchoHandler};
use socket::Writer;
use subscriber::Start;

/// What every session shares: created once by the server, passed by `Arc`.
pub struct Context {
    /// Where messages are published and subscribed.
    pub broker: Arc<dyn Broker>,
    /// Per-connection limits.
    pub limits: Limits,
    /// The server's counters.
    pub metrics: Arc<Metrics>,
    /// De-duplicates warnings about junk payloads (see [`JunkLog`]).
    pub junk: JunkLog,
    /// Publishes joins and leaves, coalesced per room.
    pub announcer: announce::Announcer,
    /// Hands connections from their first thread to their reader thread.
    pub handoffs: handoff::Handoffs,
    /// Bounds how many welcomes (history reads and sends) run at once.
    pub welcomes: welcome::Welcomes,
    /// Connections per client address (`--max-connections-per-ip`).
    pub per_ip: Arc<per_ip::PerIp>,
    /// Recent `GET /members` answers.
    pub members: http::MembersCache,
    /// Debug builds only: a chat message with exactly this text makes the
    /// reader thread panic (set by `THREADCHAT_TEST_PANIC`; tests use it to
    /// check that a panic closes only its own connection).
    pub panic_trigger: Option<String>,
}

/// One connection's shared state: known to the server (to stop it) and to
/// both of the connection's threads.
pub struct Conn {
    /// Sequence number within this process; names the threads.
    pub seq: u64,
    /// Identity on the wire, for echo suppression.
    pub id: ConnId,
    /// The client's address, for the log.
    pub peer: SocketAddr,
    /// The socket; `shutdown()` on it wakes any thread blocked on it.
    stream: Arc<TcpStream>,
    /// Why the connection ends; the first to set it wins.
    ending: OnceLock<Ending>,
    /// Stops the subscriber thread; set once it exists.
    canceller: OnceLock<Canceller>,
    /// This connection's place in its address's count (see [`per_ip`]):
    /// taken by the accept loop, or, through a trusted proxy, once the
    /// forwarded address is known (never both). Given back when the `Conn`
    /// is dropped, with the socket: when the connection's last thread ends.
    slot: OnceLock<per_ip::Slot>,
}

/// Why a connection ended, as logged in its "left" line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The client sent a close frame.
    ClientClosed(Option<CloseCode>),
    /// The TCP connection failed or was closed without a close frame.
    ConnectionLost(String),
    /// The server closed the connection because of what the client did (or
    /// did not do): a protocol violation, a limit, flooding, silence.
    Refused {
        /// The close code sent.
        code: CloseCode,
        /// The reason sent.
        reason: String,
    },
    /// The client did not read fast enough: a write blocked past the write
    /// timeout, or it fell too far behind the room.
    TooSlow(String),
    /// A write to the client failed (it went away).
    WriteFailed(String),
    /// The relay failed for this connection and could not be restored.
    RelayFailed(BrokerError),
    /// A thread serving the connection panicked.
    Panicked,
    /// The client was silent (not even a pong) for the idle timeout.
    TimedOut,
    /// The server is shutting down.
    ServerShutdown,
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::ClientClosed(Some(code)) => {
                write!(f, "closed by the client ({})", u16::from(*code))
            }
            Ending::ClientClosed(None) => write!(f, "closed by the client"),
            Ending::ConnectionLost(why) => write!(f, "connection lost ({why})"),
            Ending::Refused { code, reason } => {
                write!(
                    f,
                    "closed by the server with {}: {reason}",
                    u16::from(*code)
                )
            }
            Ending::TooSlow(why) => write!(f, "too slow, closed with 1008 ({why})"),
            Ending::WriteFailed(why) => write!(f, "could not be written to ({why})"),
            Ending::RelayFailed(e) => write!(f, "chat relay failed ({e})"),
            Ending::Panicked => write!(f, "server error (a thread panicked)"),
            Ending::TimedOut => write!(f, "timed out (no response to pings)"),
            Ending::ServerShutdown => write!(f, "server shutting down"),
        }
    }
}

impl Ending {
    /// The close frame the server sends for an ending that the subscriber
    /// thread (or the server) decides, if it sends one.
    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::ServerShutdown => (CloseCode::Away, "server shutting down"),
            Ending::RelayFailed(_) => (CloseCode::Error, "chat relay unavailable"),
            Ending::TooSlow(_) => (CloseCode::Policy, "too slow: not reading messages"),
            Ending::Panicked => (CloseCode::Error, "server error"),
            _ => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }

    /// What the rest of the room is told: "left", and why when it was not
    /// the client's own choice.
    fn leave_text(&self) -> String {
        match self {
            Ending::ClientClosed(_) => "left".into(),
            Ending::ConnectionLost(_) | Ending::WriteFailed(_) => "left (connection lost)".into(),
            Ending::TimedOut => "left (timed out)".into(),
            Ending::TooSlow(_) => "left (disconnected: too slow)".into(),
            Ending::Refused { reason, .. } => format!("left (disconnected: {reason})"),
            Ending::RelayFailed(_) => "left (chat relay failed)".into(),
            Ending::Panicked => "left (server error)".into(),
            Ending::ServerShutdown => "left (server shutting down)".into(),
        }
    }

    /// The ending for a failed write to the client.
    fn from_write_error(e: &tungstenite::Error) -> Ending {
        match e {
            tungstenite::Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ending::TooSlow("a write blocked past --write-timeout".into())
            }
            // The client went away: the same as the reader seeing it go.
            tungstenite::Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ending::ConnectionLost(io.to_string())
            }
            other => Ending::WriteFailed(other.to_string()),
        }
    }
}

impl Conn {
    /// State for connection number `seq` of instance `instance`, holding
    /// `slot` in its address's count.
    pub fn new(
        instance: u64,
        seq: u64,
        peer: SocketAddr,
        stream: TcpStream,
        slot: Option<per_ip::Slot>,
    ) -> Conn {
        Conn {
            seq,
            id: ConnId::new(instance, seq),
            peer,
            stream: Arc::new(stream),
            ending: OnceLock::new(),
            canceller: OnceLock::new(),
            slot: slot.map(OnceLock::from).unwrap_or_default(),
        }
    }

    /// Records why the connection ends, unless a reason is already recorded.
    pub fn end(&self, ending: Ending) {
        let _ = self.ending.set(ending);
    }

    /// Why the connection ended (or is ending), if decided.
    pub fn ending(&self) -> Option<&Ending> {
        self.ending.get()
    }

    /// Asks the connection to end because the server is shutting down. The
    /// subscriber thread sends the close frame (1001) and the reader thread
    /// finishes the close handshake. Returns at once.
    pub fn stop_for_shutdown(&self) {
        self.end(Ending::ServerShutdown);
        match self.canceller.get() {
            Some(canceller) => canceller.cancel(),
            // Still in the HTTP exchange, or an echo connection: nothing to
            // cancel, so cut the socket.
            None => self.force_close(),
        }
    }

    /// Shuts the socket down: any blocked read or write on it returns at once.
    pub fn force_close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(canceller) = self.canceller.get() {
            canceller.cancel();
        }
    }

    fn set_canceller(&self, canceller: Canceller) {
        let _ = self.canceller.set(canceller.clone());
        // A shutdown may have been requested while the canceller was unset.
        if self.ending() == Some(&Ending::ServerShutdown) {
            canceller.cancel();
        }
    }

    fn cancel_subscription(&self) {
        if let Some(canceller) = self.canceller.get() {
            canceller.cancel();
        }
    }

    /// Makes blocked writes give up quickly (before a last, best-effort close
    /// frame to a client that is not reading).
    fn shorten_write_timeout(&self) {
        let _ = self
            .stream
            .set_write_timeout(Some(Duration::from_millis(50)));
    }
}

/// Errors that end a session and are worth a log line of their own.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Socket I/O failed during the HTTP exchange.
    #[error("HTTP exchange failed: {0}")]
    Io(#[from] io::Error),
    /// The relay could not subscribe this connection.
    #[error("could not join the chat relay: {0}")]
    Relay(#[from] BrokerError),
    /// The OS would not start the subscriber thread.
    #[error("could not start the subscriber thread: {0}")]
    Spawn(io::Error),
    /// A thread serving the connection panicked (and the connection was
    /// closed).
    #[error("a thread serving it panicked; closed it")]
    Panicked,
}

impl SessionError {
    /// True for errors that only mean the client went away: not worth more
    /// than a debug line.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, SessionError::Io(e) if http::is_disconnect(e))
    }
}

/// What a connection's threads tell the server about it.
pub trait Reports: Send + Sync {
    /// The first thread handed connection `seq` to the reader thread
    /// `reader`, and is ending (the reader thread joins it).
    fn handed_off(&self, seq: u64, reader: JoinHandle<()>);

    /// The connection is over, and why. Called once, on whichever thread it
    /// ended on, with that thread's own handle if it holds it (a first thread
    /// that did not hand off does), for the server to join. The one place
    /// the connection's errors are logged.
    fn finished(
        &self,
        conn: &Conn,
        result: Result<(), SessionError>,
        thread: Option<JoinHandle<()>>,
    );
}

/// Serves one accepted connection, on its first thread (`tc-conn-N`): does
/// the connection's start here and, for a chat, hands the rest to a new
/// reader thread (see [`handoff`]). `own` brings this thread's own handle
/// (the accept loop sends it once the thread is started); it goes to
/// whoever must join this thread. Both threads tell `reports` how it goes.
pub fn run(
    conn: Arc<Conn>,
    ctx: Arc<Context>,
    reports: Arc<dyn Reports>,
    own: &Receiver<JoinHandle<()>>,
) {
    let result = match start(&conn, &ctx) {
        Ok(Started::Chat(chat)) => return hand_off(conn, ctx, chat, reports, own),
        Ok(Started::Echo { writer, mut reader }) => {
            let ending = reader::read_loop(&mut reader, &writer, &conn, &ctx, &mut EchoHandler);
            conn.end(ending);
            Ok(())
        }
        Ok(Started::Done) => Ok(()),
        Err(e) => Err(e),
    };
    reports.finished(&conn, result, own.recv().ok());
}

/// Hands a started chat to a new reader thread, or, if that cannot be done,
/// reads on this thread.
fn hand_off(
    conn: Arc<Conn>,
    ctx: Arc<Context>,
    chat: Box<Chat>,
    reports: Arc<dyn Reports>,
    own: &Receiver<JoinHandle<()>>,
) {
    let (seq, context) = (conn.seq, Arc::clone(&ctx));
    let handed = Handed {
        conn,
        ctx,
        chat,
        reports: Arc::clone(&reports),
    };
    let Ok(me) = own.recv() else {
        // Without its own handle this thread cannot be joined by a reader
        // thread; it stays on as the reader (never happens in practice).
        handed.read_and_finish(None);
        return;
    };
    let name = format!("tc-read-{seq}");
    match context
        .handoffs
        .hand_off(name, me, handed, |handed| handed.read_and_finish(None))
    {
        Ok(reader) => reports.handed_off(seq, reader),
        Err((me, handed)) => handed.read_and_finish(Some(me)),
    }
}

/// What a reader thread is handed.
struct Handed {
    conn: Arc<Conn>,
    ctx: Arc<Context>,
    /// The chat, started.
    chat: Box<Chat>,
    /// Where to report the end.
    reports: Arc<dyn Reports>,
}

impl Handed {
    /// The reader thread's body: the rest of the chat, then its report
    /// (with `thread`, the calling thread's own handle, if it holds it).
    fn read_and_finish(self, thread: Option<JoinHandle<()>>) {
        let Handed {
            conn,
            ctx,
            chat,
            reports,
        } = self;
        let result = panic::catch_unwind(AssertUnwindSafe(|| stay(&conn, &ctx, chat)))
            .unwrap_or_else(|_| {
                conn.force_close();
                Err(SessionError::Panicked)
            });
        reports.finished(&conn, result, thread);
    }
}

/// What a connection's start leaves for its reader thread.
enum Started {
    /// Answered with plain HTTP, or abandoned by the client: nothing more.
    Done,
    /// An echo connection, upgraded.
    Echo {
        writer: Arc<Writer>,
        reader: Box<socket::Reader>,
    },
    /// A chat connection whose subscriber thread is running. Boxed: it is
    /// handed from thread to thread.
    Chat(Box<Chat>),
}

/// A chat connection after its start, upgraded or not.
struct Chat {
    member: Member,
    writer: Arc<Writer>,
    reader: socket::Reader,
    /// The subscriber thread; joined last.
    subscriber: JoinHandle<()>,
    /// The start-up "go", until it is sent (then dropped at once: an idle
    /// connection keeps no channel it no longer needs). Dropped unsent, it
    /// tells the subscriber that the client did not get that far.
    go: Option<Sender<HashSet<String>>>,
    /// Dropped when the reader stops reading (see the module doc).
    reader_done: Sender<()>,
    /// On the room's member list (so it must leave it).
    joined: bool,
    /// Has its `101`, its history and who is in the room.
    upgraded: bool,
}

/// The connection's start: the HTTP request and, for a chat connection,
/// everything up to its welcome (see [`start_chat`]).
fn start(conn: &Arc<Conn>, ctx: &Arc<Context>) -> Result<Started, SessionError> {
    let (target, response, leftover) = match http::serve(&conn.stream, ctx)? {
        Outcome::Upgrade(upgrade) => {
            let http::Upgrade {
                target,
                response,
                leftover,
                forwarded_for,
            } = *upgrade;
            // Through a trusted proxy: count the client by its own address.
            if let Some(ip) = forwarded_for {
                match ctx.per_ip.take(ip) {
                    Some(slot) => {
                        if let Some(slot) = slot {
                            let _ = conn.slot.set(slot);
                        }
                    }
                    None => {
                        log::warn!("refused {ip} (via {}): --max-connections-per-ip", conn.peer);
                        let _ = http::refuse(
                            &conn.stream,
                            StatusCode::SERVICE_UNAVAILABLE,
                            "too many connections from your address; try again later",
                        );
                        return Ok(Started::Done);
                    }
                }
            }
            (target, response, leftover)
        }
        Outcome::Answered(status) => {
            log::debug!("{}: answered HTTP {status}", conn.peer);
            return Ok(Started::Done);
        }
        Outcome::Abandoned => return Ok(Started::Done),
    };
    conn.stream.set_nodelay(true)?;
    // A fixed send buffer (see `SEND_BUFFER`): what a client has not read
    // waits in its writer, under the write deadline, not for seconds in
    // the kernel.
    socket2::SockRef::from(&*conn.stream).set_send_buffer_size(SEND_BUFFER)?;
    let limits = socket::ReadLimits {
        max_message: ctx.limits.max_message_size,
        idle_wait: ctx.limits.ping_interval,
        write_timeout: ctx.limits.write_timeout,
        liveness: liveness::Limits {
            message_timeout: ctx.limits.message_timeout,
            max_fragments: ctx.limits.max_fragments,
        },
    };
    let (writer, reader) = socket::split(Arc::clone(&conn.stream), leftover, limits)?;
    let writer = Arc::new(writer);
    match target {
        Target::Chat(member) => start_chat(conn, ctx, member, response, writer, reader),
        Target::Echo => {
            http::accept(&conn.stream, &response)?;
            Ok(Started::Echo {
                writer,
                reader: Box::new(reader),
            })
        }
    }
}

/// The kernel's send buffer for a client socket, in bytes (Linux doubles
/// it for its own bookkeeping).
///
/// Left to itself, Linux grows a socket's send buffer up to
/// `net.ipv4.tcp_wmem`'s maximum, 4 MB by default: a client that stops
/// reading first soaks up seconds of the room's traffic into kernel memory
/// before any write blocks, and `--write-timeout` only starts counting
/// then. 256 KiB is still far more than a chat connection needs in flight
/// (at 100 ms round trip, 2.5 MB/s to one client), and makes a client that
/// falls behind fall behind where the write deadline sees it. Measured in
/// `make bench` scenario e: slow readers closed 12.8 s after the first
/// message with autotuning, against a `--write-timeout` of 10 s.
const SEND_BUFFER: usize = 256 * 1024;

/// A chat connection's start: subscribe, join, upgrade, welcome.
fn start_chat(
    conn: &Arc<Conn>,
    ctx: &Arc<Context>,
    member: Member,
    response: tungstenite::http::Response<()>,
    writer: Arc<Writer>,
    reader: socket::Reader,
) -> Result<Started, SessionError> {
    let Member { nickname, room, .. } = &member;
    let subscription = match ctx.broker.subscribe(room, &conn.id) {
        Ok(subscription) => subscription,
        Err(e) => {
            refuse_upgrade(conn);
            return Err(e.into());
        }
    };
    conn.set_canceller(subscription.canceller());

    // Zero-capacity: each side waits for the other anyway, and a
    // rendezvous channel is a fifth the size of a one-slot one. Whichever
    // thread drops a channel last frees it, and a long-lived thread keeps
    // what it frees in its malloc cache (see docs/PERFORMANCE.md).
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(0);
    let (go_tx, go_rx) = crossbeam_channel::bounded(0);
    let mut go = Some(go_tx);
    let (reader_done_tx, reader_done_rx) = crossbeam_channel::bounded::<()>(0);
    let start = Start {
        ready: ready_tx,
        go: go_rx,
    };
    let subscriber = {
        let outbox = subscriber::Outbox::new(
            Arc::clone(conn),
            Arc::clone(ctx),
            member.clone(),
            Arc::clone(&writer),
        );
        let outbox = Arc::new(outbox);
        thread::Builder::new()
            .name(format!("tc-sub-{}", conn.seq))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || subscriber::run(subscription, outbox, start, reader_done_rx))
    };
    let subscriber = match subscriber {
        Ok(handle) => handle,
        Err(e) => {
            refuse_upgrade(conn);
            return Err(SessionError::Spawn(e));
        }
    };

    // Nothing is answered until the subscription is live (so the history,
    // read after it, leaves no gap: see `welcome`) and the client is on the
    // member list.
    let subscribed = ready_rx.recv().is_ok();
    // The newest message in the history now: the welcome sends the history
    // up to here, and whatever comes after reaches the client live.
    let mark = subscribed.then(|| ctx.broker.history_mark(room));
    let joined = subscribed
        && match ctx.broker.join(room, &conn.id, nickname) {
            Ok(()) => true,
            Err(e) => {
                conn.end(Ending::RelayFailed(e));
                false
            }
        };
    // The room is told before the client gets its `101`: once connected,
    // everyone already knows.
    let own_join = joined
        .then(|| {
            ctx.announcer
                .announce_and_wait(announcement(conn, &member, Kind::Join, "joined"))
        })
        .flatten();
    let upgraded = joined && http::accept(&conn.stream, &response).is_ok();
    if upgraded {
        let mark = mark.unwrap_or(Ok(None));
        let mut skip = welcome::welcome(conn, ctx, &member, &writer, mark);
        // Nobody is told of their own arrival.
        skip.extend(own_join);
        if let Some(go) = go.take() {
            let _ = go.send(skip);
        }
        ctx.metrics.connections_open.inc();
        ctx.metrics.connections_total.inc();
        log::info!("{nickname} joined {room} from {} ({})", conn.peer, conn.id);
    }
    Ok(Started::Chat(Box::new(Chat {
        member,
        writer,
        reader,
        subscriber,
        go,
        reader_done: reader_done_tx,
        joined,
        upgraded,
    })))
}

/// The rest of a chat connection, on its reader thread: read until the end,
/// then leave.
fn stay(conn: &Arc<Conn>, ctx: &Arc<Context>, mut chat: Box<Chat>) -> Result<(), SessionError> {
    if chat.upgraded {
        let ending = read_until_the_end(conn, ctx, &chat.member, &chat.writer, &mut chat.reader);
        conn.end(ending);
    } else {
        refuse_upgrade(conn);
    }
    leave(conn, ctx, chat)
}

/// The reader thread's life: publish what the client says until the
/// connection ends; returns why it ended.
fn read_until_the_end(
    conn: &Arc<Conn>,
    ctx: &Arc<Context>,
    member: &Member,
    writer: &Writer,
    reader: &mut socket::Reader,
) -> Ending {
    let mut handler = ChatHandler::new(member, conn, ctx);
    // A panic here must not skip the clean-up in `leave` (which joins the
    // subscriber thread): catch it, record it, carry on.
    let ending = panic::catch_unwind(AssertUnwindSafe(|| {
        reader::read_loop(reader, writer, conn, ctx, &mut handler)
    }))
    .unwrap_or_else(|_| {
        ctx.metrics.panics.inc();
        log::error!(
            "{} ({}): reader thread panicked; closing it",
            conn.peer,
            conn.id
        );
        conn.shorten_write_timeout();
        let _ = writer.close(Ending::Panicked.close_frame());
        Ending::Panicked
    });
    handler.finish();
    ending
}

/// Ends a chat connection: makes sure both its threads end, takes it off
/// the member list and tells the room. Never inlined: its locals would
/// otherwise sit in the reader thread's frame all the while it reads (a
/// resting reader fits in two pages of stack; see `docs/PERFORMANCE.md`).
#[inline(never)]
fn leave(conn: &Arc<Conn>, ctx: &Arc<Context>, chat: Box<Chat>) -> Result<(), SessionError> {
    let Chat {
        member,
        subscriber,
        go,
        reader_done: reader_done_tx,
        joined,
        upgraded,
        ..
    } = *chat;
    let Member { nickname, room, .. } = &member;
    // Whoever ended first, make sure the other side ends too, then wait.
    drop(go);
    drop(reader_done_tx);
    conn.cancel_subscription();
    let _ = subscriber.join(); // Its panics are caught (and logged) inside.
    let _ = conn.stream.shutdown(Shutdown::Both);
    if joined && let Err(e) = ctx.broker.leave(room, &conn.id) {
        log::debug!(
            "{}: could not leave the member list of {room}: {e}",
            conn.id
        );
    }
    if joined && !upgraded {
        // Announced, but the 101 could not be sent: the client is gone.
        ctx.announcer.announce(announcement(
            conn,
            &member,
            Kind::Leave,
            "left (connection lost)",
        ));
    }

    if upgraded {
        ctx.metrics.connections_open.dec();
        let ending = conn
            .ending()
            .cloned()
            .unwrap_or(Ending::ConnectionLost("?".into()));
        ctx.announcer.announce(announcement(
            conn,
            &member,
            Kind::Leave,
            &ending.leave_text(),
        ));
        if let Ending::TooSlow(_) = ending {
            ctx.metrics.slow_client_closes.inc();
            log::warn!(
                "{nickname} ({}) was too slow and was disconnected",
                conn.peer
            );
        }
        log::info!("{nickname} left {room} ({}): {ending}", conn.peer);
        return Ok(());
    }
    match conn.ending() {
        Some(Ending::RelayFailed(e)) => Err(SessionError::Relay(e.clone())),
        _ => Ok(()),
    }
}

/// What the room is told when this client joins or leaves (best effort: the
/// room may be unreachable, which the client has been told about already).
fn announcement(conn: &Conn, member: &Member, kind: Kind, text: &str) -> announce::Announcement {
    announce::Announcement {
        room: member.room.clone(),
        kind,
        nickname: member.nickname.clone(),
        conn: conn.id.clone(),
        text: text.to_owned(),
    }
}

/// Answers an upgrade request with 503 instead of 101: the chat relay could
/// not take this client.
fn refuse_upgrade(conn: &Conn) {
    let _ = http::refuse(
        &conn.stream,
        StatusCode::SERVICE_UNAVAILABLE,
        "chat relay unavailable; try again later",
    );
    let _ = conn.stream.shutdown(Shutdown::Both);
}

/// At most `max` bytes of `s`, cut at a character boundary (close reasons
/// must fit in a 125-byte control frame).
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Warns about payloads on a room that are not chat messages.
///
/// With per-client subscriptions every connection sees every payload, and
/// anyone who can reach the Redis can publish junk: the log must not grow
/// with either. So each distinct payload is counted once (the most recent
/// `JUNK_MEMORY` are remembered), and at most one warning is written per
/// [`JUNK_LOG_INTERVAL`]; the next warning says how many were not logged.
#[derive(Default)]
pub struct JunkLog {
    /// Junk is rare, so a lock on this path costs nothing in practice.
    state: Mutex<JunkState>,
}

#[derive(Default)]
struct JunkState {
    /// Hashes of the payloads seen most recently.
    recent: VecDeque<u64>,
    /// When the last warning was written.
    last_logged: Option<std::time::Instant>,
    /// Distinct payloads not logged since then.
    suppressed: u64,
}

/// How many junk payloads [`JunkLog`] remembers.
const JUNK_MEMORY: usize = 64;
/// At most one junk warning per this long.
pub const JUNK_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl JunkLog {
    /// Reports a skipped payload; returns true the first time this payload
    /// is reported (so that it is counted once).
    pub fn report(&self, room: &Room, payload: &[u8], error: &dyn std::error::Error) -> bool {
        let mut hasher = DefaultHasher::new();
        room.hash(&mut hasher);
        payload.hash(&mut hasher);
        error.to_string().hash(&mut hasher);
        let hash = hasher.finish();
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.recent.contains(&hash) {
                return false;
            }
            if state.recent.len() == JUNK_MEMORY {
                state.recent.pop_front();
            }
            state.recent.push_back(hash);
            if state
                .last_logged
                .is_some_and(|at| at.elapsed() < JUNK_LOG_INTERVAL)
            {
                state.suppressed += 1;
                return true;
            }
            state.last_logged = Some(std::time::Instant::now());
            std::mem::take(&mut state.suppressed)
        };
        let preview = String::from_utf8_lossy(&payload[..payload.len().min(80)]);
        let more = match suppressed {
            0 => String::new(),
            n => format!(" ({n} more skipped since the last report, not logged)"),
        };
        log::warn!(
            "skipped a payload on {}: {error}: {preview:?}{more}",
            room.channel()
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn endings_read_well() {
        assert_eq!(
            Ending::ClientClosed(Some(CloseCode::Normal)).to_string(),
            "closed by the client (1000)"
        );
        assert_eq!(
            Ending::ServerShutdown
                .close_frame()
                .map(|f| u16::from(f.code)),
            Some(1001)
        );
        assert_eq!(
            Ending::TooSlow("x".into())
                .close_frame()
                .map(|f| u16::from(f.code)),
            Some(1008)
        );
    }
}
