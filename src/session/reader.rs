//! The reader thread's loop: read frames until the connection ends.
//!
//! Control frames are handled here, the same for every endpoint: pings get
//! pongs (through the one writer), a close gets its reply, protocol errors
//! close the connection with the right code. Data messages go to a
//! [`Handler`]: [`ChatHandler`] publishes them to the room, [`EchoHandler`]
//! sends them back (the Autobahn conformance endpoint).
//!
//! **Keepalive.** The socket's read timeout is the ping interval. A read that
//! times out means the client has been silent that long: the reader pings it,
//! and closes it (1008) once it has been silent for the idle timeout — not
//! even a pong. This is not polling: an active client never times out, and an
//! idle one costs one wake-up per ping interval (30 s by default).

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Bytes, Error as WsError, Message};

use super::admission::Lease;
use super::conn::{Conn, Ending};
use super::context::Context;
use super::liveness::Stalled;
use super::rate::{SharedLimiter, Verdict};
use super::socket::{ReadSide, Writer};
use crate::broker::{BrokerError, MemberChange, Receipt};
use crate::protocol::Member;
use crate::protocol::truncate;
use crate::protocol::{ChatMessage, ClientFrame, ServerFrame, clean_message};

/// What a [`Handler`] wants after a data message.
pub(super) enum Next {
    /// Keep reading.
    Continue,
    /// Close the connection with this code and reason (a close handshake).
    Refuse(CloseCode, String),
    /// The connection is over (the close, if any, is already dealt with).
    End(Ending),
}

/// What to do with the client's data messages.
pub(super) trait Handler {
    /// Handles one text or binary message.
    fn on_message(&mut self, message: Message, writer: &Writer) -> Next;

    /// Whether [`settle`](Self::settle) has anything to do.
    fn unsettled(&self) -> bool {
        false
    }

    /// When the handler must act even if the client says nothing (a
    /// token's expiry): the reader wakes then, and calls
    /// [`on_deadline`](Self::on_deadline).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The [`deadline`](Self::deadline) has passed.
    fn on_deadline(&mut self, _writer: &Writer) -> Next {
        Next::Continue
    }

    /// Called when the client has sent nothing more yet, before the reader
    /// blocks waiting for it: finish what was left for later.
    fn settle(&mut self, _writer: &Writer) -> Next {
        Next::Continue
    }
}

/// Reads until the connection ends; returns why.
pub(super) fn read_loop(
    reader: &mut ReadSide,
    writer: &Writer,
    conn: &Conn,
    ctx: &Context,
    handler: &mut dyn Handler,
) -> Ending {
    let limits = &ctx.limits;
    // Reads wait at most the ping interval (`socket::split` set it).
    let mut last_heard = Instant::now();
    loop {
        // About to block for the client (at least as far as the kernel
        // knows): the handler must not leave anything waiting meanwhile.
        if handler.unsettled() && !reader.get_ref().has_input() {
            let next = handler.settle(writer);
            if let Some(ending) = act_on(next, reader, writer, ctx) {
                return ending;
            }
        }
        if let Some(deadline) = handler.deadline() {
            if Instant::now() >= deadline {
                let next = handler.on_deadline(writer);
                if let Some(ending) = act_on(next, reader, writer, ctx) {
                    return ending;
                }
            }
            reader.get_mut().wake_by(handler.deadline());
        }
        let message = match reader.read() {
            Ok(message) => {
                last_heard = Instant::now();
                message
            }
            // A message begun and not finished in time, or in too many
            // frames: the stream is mid-frame, so fail the connection.
            Err(WsError::Io(e)) if Stalled::from_io(&e).is_some() => {
                let reason = Stalled::from_io(&e).map(ToString::to_string);
                return fail(
                    writer,
                    conn,
                    ctx,
                    CloseCode::Policy,
                    &reason.unwrap_or_default(),
                );
            }
            Err(WsError::Io(e)) if is_timeout(&e) => {
                // Woken for the handler's deadline, not for silence.
                if handler
                    .deadline()
                    .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    continue;
                }
                // Mid-message: not silent. The message's own deadline
                // (`--message-timeout`) ends a trickle, with its reason.
                if reader.get_ref().message_open() {
                    continue;
                }
                if last_heard.elapsed() >= limits.idle_timeout {
                    let reason = format!(
                        "idle timeout: no data or pong for {}s",
                        limits.idle_timeout.as_secs_f64()
                    );
                    close_by_server(reader, writer, ctx, CloseCode::Policy, &reason);
                    return Ending::TimedOut;
                }
                if let Err(e) = writer.send(Message::Ping(Bytes::new())) {
                    return Ending::from_write_error(&e);
                }
                continue;
            }
            Err(e) => return read_error(e, writer, conn, ctx),
        };
        match message {
            Message::Text(_) | Message::Binary(_) => {
                let next = handler.on_message(message, writer);
                if let Some(ending) = act_on(next, reader, writer, ctx) {
                    return ending;
                }
            }
            Message::Ping(data) => {
                if let Err(e) = writer.send(Message::Pong(data)) {
                    return Ending::from_write_error(&e);
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

/// Carries out what a handler asked for; `Some` when the connection ends.
fn act_on(next: Next, reader: &mut ReadSide, writer: &Writer, ctx: &Context) -> Option<Ending> {
    match next {
        Next::Continue => None,
        Next::Refuse(code, reason) => {
            let reason = close_by_server(reader, writer, ctx, code, &reason);
            Some(Ending::Refused { code, reason })
        }
        Next::End(ending) => Some(ending),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Turns a read error into an ending. When the client broke the protocol,
/// the connection is *failed* (RFC 6455 section 7.1.7): the close frame with
/// the right code is sent, then the TCP connection is closed at once. There
/// is no waiting for a close reply: the stream can no longer be trusted (and
/// if the offending frame was itself a close, no other reply will come).
fn read_error(e: WsError, writer: &Writer, conn: &Conn, ctx: &Context) -> Ending {
    use tungstenite::error::ProtocolError;
    let (code, reason) = match e {
        WsError::Utf8(_) => (CloseCode::Invalid, "text is not valid UTF-8".to_owned()),
        WsError::Capacity(_) => (
            CloseCode::Size,
            format!(
                "message too big (limit {} bytes)",
                ctx.limits.max_message_size
            ),
        ),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            return Ending::ConnectionLost("closed without a close frame".into());
        }
        WsError::Protocol(p) => (CloseCode::Protocol, p.to_string()),
        WsError::Io(e) => return Ending::ConnectionLost(e.to_string()),
        other => return Ending::ConnectionLost(other.to_string()),
    };
    fail(writer, conn, ctx, code, &reason)
}

/// Fails the connection (RFC 6455 section 7.1.7): the close frame with
/// `code`, then FIN at once, without waiting for a reply.
fn fail(writer: &Writer, conn: &Conn, ctx: &Context, code: CloseCode, reason: &str) -> Ending {
    ctx.metrics.protocol_closes.inc();
    let reason = truncate(reason, 120);
    let _ = writer.close(Some(CloseFrame {
        code,
        reason: reason.clone().into(),
    }));
    // FIN after the close frame; the socket is closed when the session ends.
    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
    Ending::Refused { code, reason }
}

/// Closes the connection because of what the client did, though it speaks the
/// protocol correctly (a binary frame, flooding, silence): sends the close
/// frame, then waits (at most `close_grace`) for the client's close reply so
/// the close handshake completes. Returns the reason as sent.
fn close_by_server(
    reader: &mut ReadSide,
    writer: &Writer,
    ctx: &Context,
    code: CloseCode,
    reason: &str,
) -> String {
    ctx.metrics.protocol_closes.inc();
    let reason = truncate(reason, 120);
    let frame = CloseFrame {
        code,
        reason: reason.clone().into(),
    };
    if writer.close(Some(frame)).is_ok() {
        let deadline = Instant::now() + ctx.limits.close_grace;
        // Reads wait no later than the deadline (a timeout then).
        reader.get_mut().wake_by(Some(deadline));
        loop {
            if Instant::now() >= deadline {
                break;
            }
            match reader.read() {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    reason
}

/// Publishes the client's messages to its room, within its rate limit.
///
/// **Pipelining.** Waiting for Redis's answer to each message before reading
/// the next would let a client send one message per Redis round trip. So a
/// message's [`Receipt`] is kept, and the handler goes on reading while the
/// client has more to say. Receipts are settled — failures reported to the
/// client — when the client pauses (the reader calls
/// [`settle`](Handler::settle) before blocking), or when [`PUBLISH_WINDOW`]
/// are outstanding. A client that sends one message at a time still hears
/// about a failure before the reader waits for its next message; order is
/// kept by the broker (a room's messages take one lane).
pub(super) struct ChatHandler<'a> {
    member: &'a Member,
    conn: &'a Conn,
    ctx: &'a Context,
    limiter: Option<Limiter>,
    /// Messages sent so far: numbers each message's id.
    sent: u64,
    /// Published messages whose answer has not been looked at, oldest first.
    in_flight: VecDeque<InFlight>,
    /// With tokens, the connection lives until its token expires (leeway
    /// included), unless the client renews the lease with a fresh one.
    lease: Option<Lease<'a>>,
}

/// A connection's rate limiter, shared with its user's or its address's
/// other connections.
#[derive(Debug)]
struct Limiter(SharedLimiter);

impl Limiter {
    fn check(&mut self, now: Instant) -> Verdict {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).check(now)
    }
}

/// The most messages of one client published and not yet answered.
const PUBLISH_WINDOW: usize = 64;

/// A published message waiting for the relay's answer.
struct InFlight {
    receipt: Receipt,
    /// The start of the message, to say which one failed.
    preview: String,
}

impl<'a> ChatHandler<'a> {
    pub(super) fn new(member: &'a Member, conn: &'a Conn, ctx: &'a Context) -> Self {
        ChatHandler {
            member,
            conn,
            ctx,
            limiter: conn.pass.limiter().map(Limiter),
            sent: 0,
            in_flight: VecDeque::new(),
            lease: ctx.admission.lease(member),
        }
    }

    /// A `{"type": "token"}` frame: a fresh token for this connection. It
    /// must be valid and for the same user and room; then the connection
    /// lives until the new one expires. A token that is not is refused
    /// with an error frame, and the old one still runs out.
    fn refresh(&mut self, token: &str, writer: &Writer) -> Next {
        let Some(lease) = &mut self.lease else {
            return self.error(writer, "this server does not use tokens");
        };
        match lease.renew(token, self.member) {
            Ok(left) => {
                let text = format!("token refreshed: valid for {} more seconds", left.as_secs());
                let frame = ServerFrame::notice(&text).render(self.member.format);
                match writer.send(Message::text(frame)) {
                    Ok(()) => Next::Continue,
                    Err(e) => Next::End(Ending::from_write_error(&e)),
                }
            }
            Err(reason) => self.error(writer, &format!("your new token was refused: {reason}")),
        }
    }

    /// Waits for the oldest `count` receipts and tells the client about the
    /// messages that failed (in one error frame, however many).
    ///
    /// The words are exact: "not delivered" only when the relay refused the
    /// message or never got it; when Redis did not answer in time, the
    /// message may have gone out all the same (a paused Redis carries it
    /// out later), and the client is told just that, so that it does not
    /// resend a message the room may already have.
    fn wait_for(&mut self, count: usize, writer: &Writer) -> Next {
        let Some((n, preview, e)) = self.collect(count) else {
            return Next::Continue;
        };
        let fate = if e.is_uncertain() {
            "may or may not have been delivered"
        } else {
            "not delivered"
        };
        let text = match n {
            1 if e.is_uncertain() => format!("your message \"{preview}\" {fate}: {e}"),
            1 => format!("your message \"{preview}\" was {fate}: {e}"),
            n if e.is_uncertain() => {
                format!("{n} of your messages {fate}, starting with \"{preview}\": {e}")
            }
            n => format!("{n} of your messages were {fate}, starting with \"{preview}\": {e}"),
        };
        self.error(writer, &text)
    }

    /// After the connection ended: waits for the answers still due, so the
    /// counts are right. There is no one left to tell about failures.
    pub(super) fn finish(&mut self) {
        self.collect(self.in_flight.len());
    }

    /// Waits for the oldest `count` answers and counts them; returns how
    /// many failed, with the first failure's preview and error.
    fn collect(&mut self, count: usize) -> Option<(usize, String, BrokerError)> {
        let mut failed: Option<(usize, String, BrokerError)> = None;
        for message in self.in_flight.drain(..count) {
            match message.receipt.wait() {
                Ok(()) => {
                    self.ctx.metrics.messages_received.inc();
                }
                Err(e) => {
                    self.ctx.metrics.publish_errors.inc();
                    match &mut failed {
                        Some((n, _, _)) => *n += 1,
                        None => failed = Some((1, message.preview, e)),
                    }
                }
            }
        }
        failed
    }

    /// Takes one frame from the rate limit: `None` if it may go on, else
    /// what to do instead — tell the client the first time over the limit
    /// (`what` says what became of the frame), then drop quietly, and
    /// close a client that keeps flooding.
    fn spend(&mut self, what: &str, writer: &Writer) -> Option<Next> {
        let limiter = self.limiter.as_mut()?;
        match limiter.check(Instant::now()) {
            Verdict::Allowed => None,
            Verdict::Refused { first } => {
                self.ctx.metrics.rate_limited.inc();
                if !first {
                    return Some(Next::Continue);
                }
                let limits = &self.ctx.limits;
                let text = format!(
                    "rate limit: at most {} messages per second (bursts of {}); {what}",
                    limits.rate_limit.unwrap_or_default(),
                    limits.rate_burst
                );
                Some(self.error(writer, &text))
            }
            Verdict::Flooding => {
                self.ctx.metrics.rate_limited.inc();
                Some(Next::Refuse(
                    CloseCode::Policy,
                    "flooding: too many messages over the rate limit".into(),
                ))
            }
        }
    }

    /// Tells the client something went wrong with what it sent.
    fn error(&self, writer: &Writer, text: &str) -> Next {
        let frame = ServerFrame::error(text).render(self.member.format);
        match writer.send(Message::text(frame)) {
            Ok(()) => Next::Continue,
            Err(e) => Next::End(Ending::from_write_error(&e)),
        }
    }
}

impl Handler for ChatHandler<'_> {
    fn deadline(&self) -> Option<Instant> {
        self.lease.as_ref().map(Lease::expires)
    }

    fn on_deadline(&mut self, _writer: &Writer) -> Next {
        Next::Refuse(
            CloseCode::Policy,
            "token expired: send {\"type\": \"token\", \"token\": …} before it does".into(),
        )
    }

    fn on_message(&mut self, message: Message, writer: &Writer) -> Next {
        let text = match message {
            Message::Text(text) => text,
            _ => {
                return Next::Refuse(
                    CloseCode::Unsupported,
                    "binary frames are not supported; send text".into(),
                );
            }
        };
        // Only a connection on a token's lease reads token frames (with
        // tokens, every chat connection is): elsewhere that text is a chat
        // message like any other.
        let body = match ClientFrame::parse(text.as_str(), self.lease.is_some()) {
            ClientFrame::Chat(body) => body,
            ClientFrame::TokenRefresh(token) => {
                // A refresh is a frame like a message: it takes from the
                // same budget (checking a signature costs more than a
                // publish).
                if let Some(refused) = self.spend("this token was not read", writer) {
                    return refused;
                }
                return self.refresh(&token, writer);
            }
        };
        let body = match clean_message(&body) {
            Ok(body) => body,
            Err(e) => return self.error(writer, &e.to_string()),
        };
        if body.is_empty() {
            return Next::Continue;
        }
        if self.ctx.panic_trigger.as_deref() == Some(&*body) {
            panic!("panic requested by THREADCHAT_TEST_PANIC");
        }
        if let Some(refused) = self.spend("this message was not delivered", writer) {
            return refused;
        }
        if self.in_flight.len() >= PUBLISH_WINDOW {
            let next = self.wait_for(1, writer);
            if !matches!(next, Next::Continue) {
                return next;
            }
        }
        self.sent += 1;
        let mut preview = truncate(&body, 40);
        if preview.len() < body.len() {
            preview.push('…');
        }
        let chat = ChatMessage::new(
            &self.member.nickname,
            &self.conn.id,
            self.sent,
            body.into_owned(),
        );
        let receipt =
            self.ctx
                .broker
                .publish(&self.member.room, chat.to_payload(), MemberChange::None);
        self.in_flight.push_back(InFlight { receipt, preview });
        Next::Continue
    }

    fn unsettled(&self) -> bool {
        !self.in_flight.is_empty()
    }

    fn settle(&mut self, writer: &Writer) -> Next {
        self.wait_for(self.in_flight.len(), writer)
    }
}

/// Sends every data message back as it came (the `/echo` endpoint).
pub(super) struct EchoHandler;

impl Handler for EchoHandler {
    fn on_message(&mut self, message: Message, writer: &Writer) -> Next {
        match writer.send(message) {
            Ok(()) => Next::Continue,
            Err(e) => Next::End(Ending::from_write_error(&e)),
        }
    }
}
