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

use std::io;
use std::time::Instant;

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Bytes, Error as WsError, Message};

use super::rate::{RateLimiter, Verdict};
use super::socket::{Reader, Writer};
use super::{Conn, Context, Ending, truncate};
use crate::http::Member;
use crate::protocol::{ChatMessage, ServerFrame, message_text};

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
}

/// Reads until the connection ends; returns why.
pub(super) fn read_loop(
    reader: &mut Reader,
    writer: &Writer,
    conn: &Conn,
    ctx: &Context,
    handler: &mut dyn Handler,
) -> Ending {
    let limits = &ctx.limits;
    if let Err(e) = conn.stream.set_read_timeout(Some(limits.ping_interval)) {
        return Ending::ConnectionLost(e.to_string());
    }
    let mut last_heard = Instant::now();
    loop {
        let message = match reader.read() {
            Ok(message) => {
                last_heard = Instant::now();
                message
            }
            Err(WsError::Io(e)) if is_timeout(&e) => {
                if last_heard.elapsed() >= limits.idle_timeout {
                    let reason = format!(
                        "idle timeout: no data or pong for {}s",
                        limits.idle_timeout.as_secs_f64()
                    );
                    close_by_server(reader, writer, conn, ctx, CloseCode::Policy, &reason);
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
            Message::Text(_) | Message::Binary(_) => match handler.on_message(message, writer) {
                Next::Continue => {}
                Next::Refuse(code, reason) => {
                    let reason = close_by_server(reader, writer, conn, ctx, code, &reason);
                    return Ending::Refused { code, reason };
                }
                Next::End(ending) => return ending,
            },
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
    ctx.metrics.protocol_closes.inc();
    let reason = truncate(&reason, 120);
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
    reader: &mut Reader,
    writer: &Writer,
    conn: &Conn,
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
    reason
}

/// Publishes the client's messages to its room, within its rate limit.
pub(super) struct ChatHandler<'a> {
    member: &'a Member,
    conn: &'a Conn,
    ctx: &'a Context,
    limiter: Option<RateLimiter>,
    /// Messages sent so far: numbers each message's id.
    sent: u64,
}

impl<'a> ChatHandler<'a> {
    pub(super) fn new(member: &'a Member, conn: &'a Conn, ctx: &'a Context) -> Self {
        let limiter = ctx
            .limits
            .rate_limit
            .map(|rate| RateLimiter::new(rate, ctx.limits.rate_burst, Instant::now()));
        ChatHandler {
            member,
            conn,
            ctx,
            limiter,
            sent: 0,
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
        let body = message_text(text.as_str());
        if body.is_empty() {
            return Next::Continue;
        }
        if self.ctx.panic_trigger.as_deref() == Some(&*body) {
            panic!("panic requested by THREADCHAT_TEST_PANIC");
        }
        if let Some(limiter) = &mut self.limiter {
            match limiter.check(Instant::now()) {
                Verdict::Allowed => {}
                Verdict::Refused { first } => {
                    self.ctx.metrics.rate_limited.inc();
                    if !first {
                        return Next::Continue;
                    }
                    let limits = &self.ctx.limits;
                    let text = format!(
                        "rate limit: at most {} messages per second (bursts of {}); \
                         this message was not delivered",
                        limits.rate_limit.unwrap_or_default(),
                        limits.rate_burst
                    );
                    return self.error(writer, &text);
                }
                Verdict::Flooding => {
                    self.ctx.metrics.rate_limited.inc();
                    return Next::Refuse(
                        CloseCode::Policy,
                        "flooding: too many messages over the rate limit".into(),
                    );
                }
            }
        }
        self.sent += 1;
        let chat = ChatMessage::new(
            &self.member.nickname,
            &self.conn.id,
            self.sent,
            body.into_owned(),
        );
        match self
            .ctx
            .broker
            .publish(&self.member.room, chat.to_payload(), true)
        {
            Ok(()) => {
                self.ctx.metrics.messages_received.inc();
                Next::Continue
            }
            Err(e) => {
                self.ctx.metrics.publish_errors.inc();
                self.error(writer, &format!("your message was not delivered: {e}"))
            }
        }
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
