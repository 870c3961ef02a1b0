//! The HTTP side of a connection: reading the request head, answering plain
//! requests, and accepting the WebSocket upgrade.
//!
//! Why not `tungstenite::accept_hdr`? It can only say yes to an upgrade or fail;
//! it cannot answer `GET /` with a page, or tell a client *why* its nickname
//! was refused. So we read the request head ourselves (with `httparse`, bounded
//! in size and in time), route it, and for an upgrade let tungstenite build the
//! `101 Switching Protocols` answer (`create_response`). Any bytes the client
//! sent after the head are handed on to the WebSocket, so nothing is lost.

use crate::net::Stream;
use std::io::{self, Write};

use tungstenite::http::{self, StatusCode};

use crate::config::Limits;

mod answer;
mod checks;
mod head;
mod outcome;
#[cfg(test)]
mod tests;

use crate::protocol::{Format, Member, Nickname, Resume, Room, query_value};
use answer::respond;
pub use answer::{
    HTML, JSON, answer, answer_with, answer_with_headers, is_disconnect, refuse, refuse_full,
    refuse_upgraded,
};
use checks::{
    check_host, check_origin, check_upgrade_request, forwarded_client, websocket_response,
};
use head::{HeadError, RequestHead, read_head};
pub use outcome::{Outcome, Refusal, Target, Upgrade};

/// A request read from a client (see [`read_request`]).
#[derive(Debug)]
pub struct Request {
    head: RequestHead,
    /// Bytes the client sent after the head.
    leftover: Vec<u8>,
}

impl Request {
    /// The path, without the query string.
    pub fn path(&self) -> &str {
        self.head.path()
    }

    /// The query string (after `?`), or "".
    pub fn query(&self) -> &str {
        self.head.query()
    }

    /// Whether the request's `Host` is one this server answers to (see
    /// `--allowed-host`); why not, if not.
    pub fn check_host(&self, allowed: &[String]) -> Result<(), String> {
        check_host(&self.head, allowed)
    }

    /// The token the client presents, if any: `?token=…` (what a browser
    /// can send), else an `Authorization: Bearer …` header.
    #[cfg(feature = "tokens")]
    pub fn bearer_token(&self) -> Result<Option<String>, String> {
        if let Some(token) = query_param(self.query(), "token")? {
            return Ok(Some(token));
        }
        let Some(value) = self.head.header("Authorization") else {
            return Ok(None);
        };
        let value = std::str::from_utf8(value).map_err(|_| "Authorization is not text")?;
        match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("Bearer") => {
                Ok(Some(token.trim().to_owned()))
            }
            _ => Err("Authorization must be `Bearer TOKEN`".into()),
        }
    }
}

/// The decoded value of `key` in a query string, if present.
pub fn query_param(query: &str, key: &str) -> Result<Option<String>, String> {
    query_value(query, key).map_err(|e| format!("{key} {e}"))
}

/// The room named by `?room=` (the default room without it).
pub fn room_param(query: &str) -> Result<Room, String> {
    match query_param(query, "room")? {
        None => Ok(Room::global()),
        Some(name) => Room::parse(&name).map_err(|e| format!("room name {e}")),
    }
}

/// The frame format a chat request asks for, even one refused for
/// something else: its refusal is told in that format.
pub fn requested_format(query: &str) -> Format {
    match query_param(query, "format") {
        Ok(Some(format)) if format == "text" => Format::Text,
        _ => Format::Json,
    }
}

/// Reads `/chat/{nickname}?room=…&format=…`.
fn member(segment: &str, query: &str) -> Result<Member, String> {
    let nickname = Nickname::from_path_segment(segment).map_err(|e| format!("nickname {e}"))?;
    let format = match query_param(query, "format")?.as_deref() {
        None | Some("json") => Format::Json,
        Some("text") => Format::Text,
        Some(other) => {
            // Quoted back, so cut: the query can be kilobytes.
            let shown: String = other.chars().take(20).collect();
            return Err(format!("unknown format {shown:?}: use json or text"));
        }
    };
    Ok(Member {
        nickname,
        room: room_param(query)?,
        format,
        resume: resume_param(query)?,
        #[cfg(feature = "tokens")]
        identity: None,
    })
}

/// `?since=OFFSET&epoch=EPOCH`: where a reconnecting client left off. Both
/// or neither.
fn resume_param(query: &str) -> Result<Option<Resume>, String> {
    match (query_param(query, "since")?, query_param(query, "epoch")?) {
        (None, None) => Ok(None),
        (Some(since), Some(epoch)) => {
            let since = since
                .parse()
                .map_err(|_| format!("since must be a number (an offset), not {since:?}"))?;
            let plausible = !epoch.is_empty()
                && epoch.len() <= MAX_EPOCH_CHARS
                && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
            if !plausible {
                return Err(format!("epoch {epoch:?} is not one this server gave out"));
            }
            Ok(Some(Resume { since, epoch }))
        }
        _ => Err("since and epoch go together: give both or neither".into()),
    }
}

/// Longest epoch accepted in `?epoch=` (the server's are 12 characters).
const MAX_EPOCH_CHARS: usize = crate::protocol::MAX_EPOCH;

/// Reads one HTTP request head on a fresh connection, within `timeout`.
/// When none can be read (the client left, was too slow, sent too much or
/// garbage, or not a GET) the client has been answered: the `Err` says how.
pub fn read_request(
    stream: &Stream,
    timeout: std::time::Duration,
) -> io::Result<Result<Request, Outcome>> {
    let (head, leftover) = match read_head(stream, timeout) {
        Ok(parsed) => parsed,
        Err(HeadError::Closed) => return Ok(Err(Outcome::Abandoned)),
        Err(HeadError::Timeout) => {
            // Best effort: a client that sends nothing may not read either.
            let _ = respond(
                stream,
                StatusCode::REQUEST_TIMEOUT,
                "request head not received in time",
            );
            return Ok(Err(Outcome::Abandoned));
        }
        Err(HeadError::TooLarge) => {
            return answer(
                stream,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large",
            )
            .map(Err);
        }
        Err(HeadError::Malformed(e)) => {
            return answer(
                stream,
                StatusCode::BAD_REQUEST,
                &format!("malformed request: {e}"),
            )
            .map(Err);
        }
        Err(HeadError::Invalid(reason)) => {
            return answer(stream, StatusCode::BAD_REQUEST, reason).map(Err);
        }
        Err(HeadError::Io(e)) => return Err(e),
    };
    if head.method != "GET" {
        return answer(
            stream,
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported",
        )
        .map(Err);
    }
    Ok(Ok(Request { head, leftover }))
}

/// The chat target of a path, if it is one: `Some` for `/chat/{nickname}`
/// (with the member it names, or why that is not valid), `None` otherwise.
pub fn chat_target(path: &str, query: &str) -> Option<Result<Member, String>> {
    let segment = path.strip_prefix("/chat/").filter(|s| !s.contains('/'))?;
    Some(member(segment, query))
}

/// Checks that `request` is a valid WebSocket upgrade to `target`; answers
/// the client when it is not, and otherwise answers nothing yet (see
/// [`Upgrade`]).
pub fn upgrade(
    stream: &Stream,
    request: Request,
    target: Target,
    limits: &Limits,
) -> io::Result<Outcome> {
    let Request { head, leftover } = request;
    // Forwarding headers count only from a proxy we were told to trust.
    let proxied = !limits.trusted_proxies.is_empty()
        && stream
            .peer_addr()
            .is_ok_and(|peer| limits.trusted_proxies.contains(&peer.ip()));
    let scheme = match head.header("X-Forwarded-Proto") {
        _ if stream.is_tls() => "https",
        Some(proto) if proxied && proto.eq_ignore_ascii_case(b"https") => "https",
        _ => "http",
    };
    if let Err(reason) = check_origin(&head, scheme, &limits.allowed_origins) {
        return answer(stream, StatusCode::FORBIDDEN, &reason);
    }
    // Not a WebSocket client: a refusal is said in plain HTTP, as is being
    // one.
    let plain_refusal = match &target {
        Target::Refused { refusal, .. } => Some(refusal),
        _ => None,
    };
    if head.header("Upgrade").is_none() {
        if let Some(refusal) = plain_refusal {
            return answer(stream, refusal.status, &refusal.reason);
        }
        return answer(
            stream,
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket endpoint; connect with a WebSocket client, \
             e.g. websocat ws://HOST:PORT/chat/NICKNAME",
        );
    }
    if let Err(reason) = check_upgrade_request(&head) {
        if let Some(refusal) = plain_refusal {
            return answer(stream, refusal.status, &refusal.reason);
        }
        return answer(stream, StatusCode::BAD_REQUEST, reason);
    }
    let forwarded_for = if proxied {
        match forwarded_client(&head) {
            Some(ip) => Some(ip),
            None => {
                return answer(
                    stream,
                    StatusCode::BAD_REQUEST,
                    "a request through the trusted proxy must carry X-Forwarded-For",
                );
            }
        }
    } else {
        None
    };
    let response = match websocket_response(&head) {
        Ok(response) => response,
        Err(reason) => return answer(stream, StatusCode::BAD_REQUEST, &reason),
    };
    Ok(Outcome::Upgrade(Box::new(Upgrade {
        target,
        response,
        leftover,
        forwarded_for,
    })))
}

/// Sends the `101 Switching Protocols` answer: from here on, the socket
/// speaks WebSocket.
pub fn accept(stream: &Stream, response: &http::Response<()>) -> io::Result<()> {
    let mut out = Vec::with_capacity(256);
    tungstenite::handshake::server::write_response(&mut out, response).map_err(io::Error::other)?;
    (&*stream).write_all(&out)
}
