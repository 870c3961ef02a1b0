//! One client connection, from its HTTP request to its last frame.
//!
//! A connection is served by two threads:
//!
//! ```text
//!   client ──frames──▶ reader thread (tc-conn-N) ──publish──▶ broker
//!   client ◀─frames─── subscriber thread (tc-sub-N) ◀─events── broker
//!                both write through the one socket::Writer
//! ```
//!
//! * The **reader thread** is the connection's own thread: it reads the HTTP
//!   request, upgrades, starts the subscriber thread, then blocks in
//!   `WebSocket::read`. It publishes what the client says, answers pings, and
//!   replies to the client's close.
//! * The **subscriber thread** blocks in [`Subscription::run`] and writes every
//!   chat message from someone else to the client.
//!
//! They coordinate through crossbeam channels and one shared [`Conn`]:
//!
//! * `ready`: the subscriber says "subscribed" before the reader reads a single
//!   frame, so nothing the client sends can be published before it can hear
//!   the answers.
//! * `reader_done`: the reader drops its sender when it stops reading; the
//!   subscriber uses it to wait (bounded) for a close handshake to finish.
//! * [`Conn::end`]: the first thread to decide *why* the connection ends records
//!   an [`Ending`]; the other thread is then woken — the subscriber by its
//!   [`Canceller`], the reader by a close frame or by shutting the socket down.
//!
//! Whoever ends first, both threads end, the Redis subscription is dropped and
//! the socket is closed. `docs/ARCHITECTURE.md` walks through every case.

pub mod socket;

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message};

use crate::broker::{Broker, BrokerError, Canceller, Event, Subscription};
use crate::config::Limits;
use crate::http::{self, Outcome};
use crate::protocol::{ChatMessage, ConnId, GLOBAL_ROOM, Nickname, ServerFrame, message_text};
use socket::{Reader, Writer};

/// What every session shares: created once by the server, passed by `Arc`.
pub struct Context {
    /// Where messages are published and subscribed.
    pub broker: Arc<dyn Broker>,
    /// Per-connection limits.
    pub limits: Limits,
    /// De-duplicates warnings about junk payloads (see [`JunkLog`]).
    pub junk: JunkLog,
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
    /// The socket; `shutdown()` on it wakes any thread blocked reading it.
    stream: Arc<TcpStream>,
    /// Why the connection ends; the first to set it wins.
    ending: OnceLock<Ending>,
    /// Stops the subscriber thread; set once it exists.
    canceller: OnceLock<Canceller>,
}

/// Why a connection ended, as logged in its "left" line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The client sent a close frame.
    ClientClosed(Option<CloseCode>),
    /// The TCP connection failed or was closed without a close frame.
    ConnectionLost(String),
    /// The server closed the connection because of what the client sent.
    Refused {
        /// The close code sent.
        code: CloseCode,
        /// The reason sent.
        reason: String,
    },
    /// A write to the client failed or timed out (it went away or stopped
    /// reading).
    WriteFailed(String),
    /// The relay failed for this connection.
    RelayFailed(BrokerError),
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
            Ending::WriteFailed(why) => write!(f, "could not be written to ({why})"),
            Ending::RelayFailed(e) => write!(f, "chat relay failed ({e})"),
            Ending::ServerShutdown => write!(f, "server shutting down"),
        }
    }
}

impl Ending {
    /// The close frame the server sends for this ending, if it sends one.
    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::ServerShutdown => (CloseCode::Away, "server shutting down"),
            Ending::RelayFailed(_) => (CloseCode::Error, "chat relay unavailable"),
            _ => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }
}

impl Conn {
    /// State for connection number `seq` of instance `instance`.
    pub fn new(instance: u64, seq: u64, peer: SocketAddr, stream: Arc<TcpStream>) -> Conn {
        Conn {
            seq,
            id: ConnId::new(instance, seq),
            peer,
            stream,
            ending: OnceLock::new(),
            canceller: OnceLock::new(),
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
            // Still in the HTTP handshake: nothing to say goodbye on.
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
    /// The subscriber thread panicked.
    #[error("the subscriber thread panicked")]
    SubscriberPanicked,
}

impl SessionError {
    /// True for errors that only mean the client went away: not worth more
    /// than a debug line.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, SessionError::Io(e) if http::is_disconnect(e))
    }
}

/// Serves one accepted connection to its end. Runs on the connection's own
/// thread; returns when both of the connection's threads are done.
pub fn run(conn: &Arc<Conn>, ctx: &Arc<Context>) -> Result<(), SessionError> {
    let (nickname, response, leftover) = match http::serve(&conn.stream, &ctx.limits)? {
        Outcome::Upgrade {
            nickname,
            response,
            leftover,
        } => (nickname, response, leftover),
        Outcome::Answered(status) => {
            log::debug!("{}: answered HTTP {status}", conn.peer);
            return Ok(());
        }
        Outcome::Abandoned => return Ok(()),
    };
    conn.stream
        .set_write_timeout(Some(ctx.limits.write_timeout))?;
    conn.stream.set_nodelay(true)?;
    let (writer, mut reader) = socket::split(
        Arc::clone(&conn.stream),
        leftover,
        ctx.limits.max_message_size,
    );
    let writer = Arc::new(writer);

    let subscription = match ctx.broker.subscribe(GLOBAL_ROOM, &conn.id) {
        Ok(subscription) => subscription,
        Err(e) => {
            refuse_upgrade(conn);
            return Err(e.into());
        }
    };
    conn.set_canceller(subscription.canceller());

    // The start-up handshake between the two threads: the subscriber says
    // `ready` once subscribed, then waits for `go`, sent after the `101`
    // answer. So a client that is "connected" is already subscribed, and no
    // chat frame can reach the socket before the `101`.
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let (reader_done_tx, reader_done_rx) = crossbeam_channel::bounded::<()>(0);
    let start = Start {
        ready: ready_tx,
        go: go_rx,
    };
    let subscriber = {
        let (conn, ctx, writer) = (Arc::clone(conn), Arc::clone(ctx), Arc::clone(&writer));
        thread::Builder::new()
            .name(format!("tc-sub-{}", conn.seq))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                subscriber_thread(subscription, &conn, &ctx, &writer, start, reader_done_rx)
            })
    };
    let subscriber = match subscriber {
        Ok(handle) => handle,
        Err(e) => {
            refuse_upgrade(conn);
            return Err(SessionError::Spawn(e));
        }
    };

    let upgraded = ready_rx.recv().is_ok() && http::accept(&conn.stream, &response).is_ok();
    if upgraded {
        let _ = go_tx.send(());
        log::info!("{nickname} joined from {} ({})", conn.peer, conn.id);
        let ending = read_loop(&mut reader, &writer, conn, ctx, &nickname);
        conn.end(ending);
    } else {
        refuse_upgrade(conn);
    }

    // Whoever ended first, make sure the other side ends too, then wait.
    drop(go_tx);
    drop(reader_done_tx);
    if let Some(canceller) = conn.canceller.get() {
        canceller.cancel();
    }
    let joined = subscriber.join();
    let _ = conn.stream.shutdown(Shutdown::Both);

    if joined.is_err() {
        return Err(SessionError::SubscriberPanicked);
    }
    if upgraded {
        let ending = conn
            .ending()
            .cloned()
            .unwrap_or(Ending::ConnectionLost("?".into()));
        log::info!("{nickname} left ({}): {ending}", conn.peer);
        return Ok(());
    }
    match conn.ending() {
        Some(Ending::RelayFailed(e)) => Err(SessionError::Relay(e.clone())),
        _ => Ok(()),
    }
}

/// Answers an upgrade request with 503 instead of 101: the chat relay could
/// not take this client.
fn refuse_upgrade(conn: &Conn) {
    let _ = http::refuse(
        &conn.stream,
        tungstenite::http::StatusCode::SERVICE_UNAVAILABLE,
        "chat relay unavailable; try again later",
    );
    let _ = conn.stream.shutdown(Shutdown::Both);
}

/// The subscriber thread's half of the start-up handshake (see [`run`]).
struct Start {
    /// Sent to once subscribed.
    ready: Sender<()>,
    /// Received from once the client has its `101`; disconnected if not.
    go: Receiver<()>,
}

/// The subscriber thread: deliver everyone else's messages until told to stop.
fn subscriber_thread(
    subscription: Subscription,
    conn: &Conn,
    ctx: &Context,
    writer: &Writer,
    start: Start,
    reader_done: Receiver<()>,
) {
    let mut start = Some(start);
    let mut upgraded = false;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        subscription.run(|event| match event {
            Event::Subscribed => match start.take() {
                Some(start) if start.ready.send(()).is_ok() && start.go.recv().is_ok() => {
                    upgraded = true;
                    ControlFlow::Continue(())
                }
                Some(_) => ControlFlow::Break(()),
                None => ControlFlow::Continue(()),
            },
            Event::Message(payload) => deliver(payload, conn, ctx, writer),
        })
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            log::error!("{}: chat relay failed: {e}", conn.id);
            conn.end(Ending::RelayFailed(e));
        }
        Err(_) => {
            log::error!(
                "{}: subscriber thread panicked; closing the connection",
                conn.id
            );
            conn.end(Ending::ConnectionLost("server error".into()));
            let _ = conn.stream.shutdown(Shutdown::Both);
            return;
        }
    }

    // If the reader is still reading, this thread ended first: say goodbye
    // (when there is something to say), give the client a moment to answer
    // the close, then cut the socket so the reader wakes up. (Before the
    // upgrade there is no reader yet; the connection thread answers HTTP.)
    if !upgraded {
        return;
    }
    if let Err(crossbeam_channel::TryRecvError::Empty) = reader_done.try_recv() {
        if let Some(frame) = conn.ending().and_then(Ending::close_frame)
            && writer.close(Some(frame)).is_ok()
        {
            let _ = reader_done.recv_timeout(ctx.limits.close_grace);
        }
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
}

/// Delivers one payload from the room to this client, unless it is junk or
/// the client's own message.
fn deliver(payload: &[u8], conn: &Conn, ctx: &Context, writer: &Writer) -> ControlFlow<()> {
    let msg = match ChatMessage::from_payload(payload) {
        Ok(msg) => msg,
        Err(e) => {
            ctx.junk.report(payload, &e);
            return ControlFlow::Continue(());
        }
    };
    if msg.is_from(&conn.id) {
        return ControlFlow::Continue(());
    }
    match writer.send(Message::text(ServerFrame::from(&msg).to_json())) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            conn.end(Ending::WriteFailed(e.to_string()));
            ControlFlow::Break(())
        }
    }
}

/// The reader thread's loop: returns why the connection ends.
fn read_loop(
    reader: &mut Reader,
    writer: &Writer,
    conn: &Conn,
    ctx: &Context,
    nickname: &Nickname,
) -> Ending {
    loop {
        let message = match reader.read() {
            Ok(message) => message,
            Err(e) => return read_error(e, reader, writer, conn, ctx),
        };
        match message {
            Message::Text(text) => {
                let body = message_text(text.as_str());
                if body.is_empty() {
                    continue;
                }
                let chat = ChatMessage::new(nickname, &conn.id, body.into_owned());
                if let Err(e) = ctx.broker.publish(GLOBAL_ROOM, chat.to_payload()) {
                    let text = format!("your message was not delivered: {e}");
                    let notice = ServerFrame::Error {
                        nickname: "server",
                        message: &text,
                    };
                    if let Err(e) = writer.send(Message::text(notice.to_json())) {
                        return Ending::WriteFailed(e.to_string());
                    }
                }
            }
            Message::Binary(_) => {
                return close_by_server(
                    reader,
                    writer,
                    conn,
                    ctx,
                    CloseCode::Unsupported,
                    "binary frames are not supported; send text",
                );
            }
            Message::Ping(data) => {
                if let Err(e) = writer.send(Message::Pong(data)) {
                    return Ending::WriteFailed(e.to_string());
                }
            }
            Message::Close(frame) => {
                // Echo the client's code (tungstenite already replaced an
                // invalid one with 1002), as RFC 6455 section 5.5.1 suggests.
                let code = frame.as_ref().map(|f| f.code);
                let reply = frame.map(|f| CloseFrame {
                    code: f.code,
                    reason: "".into(),
                });
                let _ = writer.close(reply);
                return Ending::ClientClosed(code);
            }
            Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// Turns a read error into an ending, closing with the right code when the
/// client broke the protocol.
fn read_error(
    e: WsError,
    reader: &mut Reader,
    writer: &Writer,
    conn: &Conn,
    ctx: &Context,
) -> Ending {
    use tungstenite::error::ProtocolError;
    match e {
        WsError::Utf8(_) => close_by_server(
            reader,
            writer,
            conn,
            ctx,
            CloseCode::Invalid,
            "text frame is not valid UTF-8",
        ),
        WsError::Capacity(_) => {
            let reason = format!(
                "message too big (limit {} bytes)",
                ctx.limits.max_message_size
            );
            close_by_server(reader, writer, conn, ctx, CloseCode::Size, &reason)
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Ending::ConnectionLost("closed without a close frame".into())
        }
        WsError::Protocol(p) => close_by_server(
            reader,
            writer,
            conn,
            ctx,
            CloseCode::Protocol,
            &p.to_string(),
        ),
        WsError::Io(e) => Ending::ConnectionLost(e.to_string()),
        other => Ending::ConnectionLost(other.to_string()),
    }
}

/// Closes the connection because of what the client sent: sends the close
/// frame, then waits (at most `close_grace`) for the client's close reply so
/// the close handshake completes.
fn close_by_server(
    reader: &mut Reader,
    writer: &Writer,
    conn: &Conn,
    ctx: &Context,
    code: CloseCode,
    reason: &str,
) -> Ending {
    let reason = truncate(reason, 120);
    let frame = CloseFrame {
        code,
        reason: reason.clone().into(),
    };
    if writer.close(Some(frame)).is_ok() {
        let deadline = Instant::now() + ctx.limits.close_grace;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || conn.stream.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match reader.read() {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    Ending::Refused { code, reason }
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

/// Warns about payloads on the room that are not chat messages — once per
/// payload, not once per connection that sees it (with per-client Redis
/// subscriptions, every connection sees every payload).
#[derive(Default)]
pub struct JunkLog {
    /// Hash of the payload last warned about.
    last: AtomicU64,
}

impl JunkLog {
    /// Reports a skipped payload.
    pub fn report(&self, payload: &[u8], error: &dyn std::error::Error) {
        let mut hasher = DefaultHasher::new();
        payload.hash(&mut hasher);
        let hash = hasher.finish();
        if self.last.swap(hash, Ordering::Relaxed) != hash {
            let preview = String::from_utf8_lossy(&payload[..payload.len().min(80)]);
            log::warn!("skipped a payload on {GLOBAL_ROOM}: {error}: {preview:?}");
        }
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
    }
}
