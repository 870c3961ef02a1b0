//! A connection's start, on its start thread: the HTTP request and, for a
//! chat, everything up to its welcome — subscribe, get on the member list,
//! have the join announced, send the `101`, the history and who is here.
//!
//! Each step that must be undone is a guard ([`SubscriberThread`],
//! [`Membership`]): a step that fails returns early with `?`, and what was
//! done before it is undone as the guards drop.

use std::net::Shutdown;
use std::sync::Arc;
use std::time::Instant;

use tungstenite::http::StatusCode;

use super::admission::Refusal;
use super::chat::{Chat, Membership, Open, SubscriberThread};
use super::conn::{Conn, SessionError};
use super::context::Context;
use super::outbox::Welcomed;
use super::socket::{self, Writer};
use super::{liveness, route, welcome};
use crate::http::{self, Outcome, Target};
use crate::net::Stream;
use crate::protocol::{Format, Member, ServerFrame};

/// What a connection's start leaves for the rest of its life.
pub(super) enum Started {
    /// Answered with plain HTTP, or abandoned by the client: nothing more.
    Done,
    /// An echo connection, upgraded (`--echo-endpoint`).
    Echo {
        writer: Arc<Writer>,
        reader: Box<socket::ReadSide>,
    },
    /// A chat connection, welcomed, with its subscriber thread running.
    Chat(Box<Chat>),
}

/// The kernel's send buffer for a client socket, in bytes (Linux doubles it
/// for its own bookkeeping). Left to itself, Linux grows it up to 4 MB, and
/// a client that stops reading soaks up seconds of the room's traffic into
/// kernel memory before any write blocks and `--write-timeout` starts
/// counting. 256 KiB is far more than a chat connection needs in flight, and
/// makes a client that falls behind fall behind where the write deadline
/// sees it (`docs/PERFORMANCE.md`, scenario e).
const SEND_BUFFER: usize = 256 * 1024;

/// The connection's start: the HTTP request and, for a chat connection,
/// everything up to its welcome (see [`start_chat`]).
pub(super) fn start(conn: &Arc<Conn>, ctx: &Arc<Context>) -> Result<Started, SessionError> {
    // Shorter than `--handshake-timeout` when many connections are starting.
    let head_timeout = conn.pass.head_timeout();
    let head_timeout = head_timeout.unwrap_or(ctx.limits.handshake_timeout);
    // A TLS handshake and the request head share that time.
    let deadline = Instant::now() + head_timeout;
    let Some(stream) = open(conn, ctx, deadline) else {
        conn.pass.request_read();
        return Ok(Started::Done);
    };
    conn.opened(&stream);
    let head_timeout = deadline.saturating_duration_since(Instant::now());
    let served = route::serve(&stream, ctx, head_timeout);
    // Read and answered (or routed to the upgrade): no longer starting.
    conn.pass.request_read();
    let upgrade = match served? {
        Outcome::Upgrade(upgrade) => upgrade,
        Outcome::Answered(status) => {
            log::debug!("{}: answered HTTP {status}", conn.peer);
            return Ok(Started::Done);
        }
        Outcome::Abandoned => return Ok(Started::Done),
    };
    let http::Upgrade {
        target,
        response,
        leftover,
        forwarded_for,
    } = *upgrade;
    if let Target::Refused { refusal, format } = &target {
        // Counted, and summed up in the log: an operator sees rejected
        // tokens without a line per attempt.
        let why = match refusal.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Refusal::Token,
            _ => Refusal::BadRequest,
        };
        ctx.admission
            .refused(why, &cut_who(&format!("{}: {}", conn.peer, refusal.reason)));
        refuse(&stream, &response, refusal, *format);
        return Ok(Started::Done);
    }
    // Admission's say (caps, the user's connections, a new room, the
    // nickname): what it grants stays on the connection's pass.
    let (pass, member) = (&conn.pass, target.member());
    let admitted = ctx
        .admission
        .admit(pass, conn.peer, forwarded_for, member, &conn.id);
    if let Err(refusal) = admitted {
        let format = member.map_or(Format::Json, |member| member.format);
        refuse(&stream, &response, &refusal, format);
        return Ok(Started::Done);
    }
    conn.stream.set_nodelay(true)?;
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
    let (writer, reader) = socket::split(stream.clone(), leftover, limits)?;
    let writer = Arc::new(writer);
    match target {
        Target::Chat(member) => {
            let format = member.format;
            match start_chat(conn, ctx, member, &stream, &response, writer, reader) {
                Ok(chat) => Ok(Started::Chat(Box::new(chat))),
                Err(e) => {
                    refuse_relay(conn, &stream, &response, &e, format);
                    // While Redis is away every client that tries is one of
                    // these: summed up in the log, not a line each.
                    if let SessionError::Relay(why) = &e {
                        let who = cut_who(&format!("{}: {why}", conn.peer));
                        ctx.admission.refused(Refusal::RelayDown, &who);
                        return Ok(Started::Done);
                    }
                    Err(e)
                }
            }
        }
        Target::Echo => {
            http::accept(&stream, &response)?;
            conn.upgraded(&writer);
            Ok(Started::Echo {
                writer,
                reader: Box::new(reader),
            })
        }
        Target::Refused { .. } => unreachable!("refused before the split"),
    }
}

/// The connection as the HTTP exchange will speak on it: the socket itself,
/// or, on a TLS port, the TLS session after its handshake (by `deadline`).
/// `None` when there is nothing more to do: the handshake failed, or the
/// client spoke plain HTTP to the TLS port and was told so.
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
fn open(conn: &Conn, ctx: &Context, deadline: Instant) -> Option<Stream> {
    #[cfg(feature = "tls")]
    if let Some(config) = &ctx.tls {
        use crate::tls::{HandshakeError, Session};
        let tcp = Arc::clone(&conn.stream);
        return match Session::handshake(tcp, Arc::clone(config), deadline) {
            Ok(session) => Some(Stream::Tls(Arc::new(session))),
            Err(HandshakeError::NotTls) => {
                let plain = Stream::Plain(Arc::clone(&conn.stream));
                let _ = http::refuse(
                    &plain,
                    StatusCode::BAD_REQUEST,
                    "this port speaks TLS: use https:// or wss://",
                );
                None
            }
            Err(e) => {
                ctx.metrics.tls_handshake_failures.inc();
                log::debug!("{}: TLS handshake failed: {e}", conn.peer);
                None
            }
        };
    }
    Some(Stream::Plain(Arc::clone(&conn.stream)))
}

/// A chat connection's start: subscribe, join, upgrade, welcome.
///
/// Nothing is answered until the subscription is live (so the history, read
/// after it, leaves no gap: see [`welcome`]) and the client is on the member
/// list, and the room is told before the client gets its `101`: once
/// connected, everyone already knows.
fn start_chat(
    conn: &Arc<Conn>,
    ctx: &Arc<Context>,
    member: Member,
    stream: &Stream,
    response: &tungstenite::http::Response<()>,
    writer: Arc<Writer>,
    reader: socket::ReadSide,
) -> Result<Chat, SessionError> {
    let subscription = ctx.broker.subscribe(&member.room, &conn.id)?;
    conn.set_canceller(subscription.canceller());
    let mut subscriber = SubscriberThread::start(conn, ctx, &member, &writer, subscription)?;
    subscriber.wait_until_subscribed()?;
    // The end of the room's log now (the *mark*): the welcome sends the log
    // up to here, and whatever comes after reaches the client live.
    let mark = ctx.broker.log_end(&member.room);
    let (membership, own_join) = Membership::join(conn, ctx, &member)?;
    http::accept(stream, response)?;
    conn.upgraded(&writer);

    let mark = welcome::welcome(conn, ctx, &member, &writer, mark);
    // Nobody is told of their own arrival.
    subscriber.go(Welcomed {
        mark,
        skip: own_join.into_iter().collect(),
    });
    let open = Open::count(ctx);
    ctx.metrics.connections_total.inc();
    log::info!(
        "{} joined {} from {} ({})",
        member.nickname,
        member.room,
        conn.peer,
        conn.id
    );
    Ok(Chat {
        conn: Arc::clone(conn),
        ctx: Arc::clone(ctx),
        writer,
        reader,
        subscriber,
        membership,
        open,
    })
}

/// Refuses an upgrade with 503: the chat relay could not take this client
/// (or the process has no budget left for its room).
fn refuse_relay(
    conn: &Conn,
    stream: &Stream,
    response: &tungstenite::http::Response<()>,
    error: &SessionError,
    format: Format,
) {
    let reason = match error {
        SessionError::Relay(full @ crate::broker::BrokerError::Full(_)) => {
            format!("{full}; try again later")
        }
        _ => "chat relay unavailable; try again later".to_owned(),
    };
    let refusal = http::Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason);
    refuse(stream, response, &refusal, format);
    let _ = conn.stream.shutdown(Shutdown::Both);
}

/// Refuses a valid upgrade: the client is told why in an `error` frame and
/// the close (see [`http::refuse_upgraded`]).
fn refuse(
    stream: &Stream,
    response: &tungstenite::http::Response<()>,
    refusal: &http::Refusal,
    format: Format,
) {
    let frame = ServerFrame::error(&refusal.reason).render(format);
    let _ = http::refuse_upgraded(stream, response, refusal.status, &frame, &refusal.reason);
}

/// A refused client and why, short enough for the refusal's log line to
/// stay under 200 characters.
fn cut_who(who: &str) -> String {
    if who.len() <= 90 {
        return who.to_owned();
    }
    crate::protocol::truncate(who, 87) + "…"
}
