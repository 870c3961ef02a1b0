//! The HTTP side of a connection: reading the request head, answering plain
//! requests, and accepting the WebSocket upgrade.
//!
//! Why not `tungstenite::accept_hdr`? It can only say yes to an upgrade or fail;
//! it cannot answer `GET /` with a page, or tell a client *why* its nickname
//! was refused. So we read the request head ourselves (with `httparse`, bounded
//! in size and in time), route it, and for an upgrade let tungstenite build the
//! `101 Switching Protocols` answer (`create_response`). Any bytes the client
//! sent after the head are handed on to the WebSocket, so nothing is lost.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Instant;

use tungstenite::handshake::server::{create_response, write_response};
use tungstenite::http::{self, StatusCode};

use crate::broker::{BrokerError, Presence};
use crate::config::Limits;
use crate::protocol::{Format, Member, Nickname, Room, query_value};
use crate::session::Context;

/// Longest request head accepted, in bytes; a longer one gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted; more gets 431.
const MAX_HEADERS: usize = 48;

/// How the HTTP exchange ended.
#[derive(Debug)]
pub enum Outcome {
    /// The request is a valid upgrade (see [`Upgrade`]). Boxed: it is
    /// much bigger than the other outcomes.
    Upgrade(Box<Upgrade>),
    /// A plain HTTP answer was sent (a page, or an error status).
    Answered(StatusCode),
    /// The client went away (or sent nothing in time) before a request head
    /// could be read; nothing, or a 408, was sent.
    Abandoned,
}

/// A valid upgrade request to `/chat/{nickname}` (or `/echo`). Nothing has
/// been answered yet: the caller sends `response` with [`accept`] once it is
/// ready to chat, or refuses with [`refuse`].
#[derive(Debug)]
pub struct Upgrade {
    /// What the client connects to.
    pub target: Target,
    /// The `101 Switching Protocols` answer to send.
    pub response: http::Response<()>,
    /// Bytes the client sent after the head (the start of its first
    /// WebSocket frame, if it did not wait for the answer).
    pub leftover: Vec<u8>,
    /// The client's address as a trusted reverse proxy forwarded it
    /// (`X-Forwarded-For`), when the request came through one.
    pub forwarded_for: Option<IpAddr>,
}

/// What an upgraded connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A chat room.
    Chat(Member),
    /// The echo endpoint (`--echo-endpoint`, for conformance testing).
    Echo,
}

/// A parsed request head: only what routing and the handshake need.
#[derive(Debug)]
struct RequestHead {
    method: String,
    /// The minor version: `HTTP/1.1` is 1, `HTTP/1.0` is 0.
    version: u8,
    /// The request target as sent, e.g. `/chat/Joe%20Doe?x=1`.
    target: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The path part of the target, without the query string.
    fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }

    /// The query string (after `?`, before `#`), or "".
    fn query(&self) -> &str {
        let without_fragment = self.target.split('#').next().unwrap_or("");
        without_fragment.split_once('?').map_or("", |(_, q)| q)
    }
}

/// The decoded value of `key` in a query string, if present.
fn query_param(query: &str, key: &str) -> Result<Option<String>, String> {
    query_value(query, key).map_err(|e| format!("{key} {e}"))
}

/// The room named by `?room=` (the default room without it).
fn room_param(query: &str) -> Result<Room, String> {
    match query_param(query, "room")? {
        None => Ok(Room::global()),
        Some(name) => Room::parse(&name).map_err(|e| format!("room name {e}")),
    }
}

/// Reads `/chat/{nickname}?room=…&format=…`.
fn member(segment: &str, query: &str) -> Result<Member, String> {
    let nickname = Nickname::from_path_segment(segment).map_err(|e| format!("nickname {e}"))?;
    let format = match query_param(query, "format")?.as_deref() {
        None | Some("json") => Format::Json,
        Some("text") => Format::Text,
        Some(other) => return Err(format!("unknown format {other:?}: use json or text")),
    };
    Ok(Member {
        nickname,
        room: room_param(query)?,
        format,
    })
}

/// `GET /members?room=…&limit=…`: who is in a room, as JSON: how many, and
/// the sorted nicknames of at most `limit` of them (100 by default,
/// [`MAX_MEMBERS_LIMIT`] at most), `truncated` when that is not everyone.
///
/// Cheap by design, because anyone can ask as often as they like: the list
/// is bounded (a room of 10,000 used to answer 370 KB, built from a full
/// `HGETALL` for every request), answers are cached for
/// [`MEMBERS_CACHE_TTL`] (see [`MembersCache`]), and with Redis the
/// question goes over a query connection, never queued behind a
/// `PUBLISH`.
fn members(stream: &TcpStream, ctx: &Context, query: &str) -> io::Result<Outcome> {
    let room = match room_param(query) {
        Ok(room) => room,
        Err(reason) => return answer(stream, StatusCode::BAD_REQUEST, &reason),
    };
    let limit = match query_param(query, "limit") {
        Ok(None) => DEFAULT_MEMBERS_LIMIT,
        Ok(Some(n)) => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_MEMBERS_LIMIT).contains(&n) => n,
            _ => {
                let reason = format!("limit must be a number from 1 to {MAX_MEMBERS_LIMIT}");
                return answer(stream, StatusCode::BAD_REQUEST, &reason);
            }
        },
        Err(reason) => return answer(stream, StatusCode::BAD_REQUEST, &reason),
    };
    match ctx
        .members
        .get(&room, limit, || ctx.broker.presence(&room, limit))
    {
        Ok(body) => answer_with(stream, StatusCode::OK, JSON, &body),
        Err(e) => answer(stream, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Names a `/members` answer lists unless asked for more.
pub const DEFAULT_MEMBERS_LIMIT: usize = 100;
/// Most names a `/members` answer lists.
pub const MAX_MEMBERS_LIMIT: usize = 1000;
/// How long a `/members` answer is served again without asking the relay.
pub const MEMBERS_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most answers kept in the cache.
const MEMBERS_CACHE_ENTRIES: usize = 1024;

/// Recent `/members` answers, by room and limit.
///
/// One lock is held while an answer is made, so fifty requests arriving
/// together ask the relay once, and the other forty-nine are served the
/// answer it gave. At most `MEMBERS_CACHE_ENTRIES` answers are kept;
/// stale ones are dropped when a new one is added.
#[derive(Default)]
pub struct MembersCache {
    answers: std::sync::Mutex<Answers>,
}

/// `/members` answers by (room, limit): when each was made, and its JSON.
type Answers = HashMap<(Room, usize), (Instant, std::sync::Arc<str>)>;

/// The JSON of a `/members` answer, keys in the documented order.
#[derive(serde::Serialize)]
struct MembersAnswer<'a> {
    room: &'a str,
    count: usize,
    members: &'a [String],
    truncated: bool,
}

impl MembersCache {
    /// The answer for `room` and `limit`, from the cache or from `ask`.
    pub fn get(
        &self,
        room: &Room,
        limit: usize,
        ask: impl FnOnce() -> Result<Presence, BrokerError>,
    ) -> Result<std::sync::Arc<str>, BrokerError> {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (room.clone(), limit);
        if let Some((at, body)) = answers.get(&key)
            && at.elapsed() < MEMBERS_CACHE_TTL
        {
            return Ok(std::sync::Arc::clone(body));
        }
        let presence = ask()?;
        let body: std::sync::Arc<str> = serde_json::to_string(&MembersAnswer {
            room: room.name(),
            count: presence.count,
            members: &presence.nicknames,
            truncated: presence.count > presence.nicknames.len(),
        })
        .expect("strings and numbers always serialize")
        .into();
        if answers.len() >= MEMBERS_CACHE_ENTRIES {
            answers.retain(|_, (at, _)| at.elapsed() < MEMBERS_CACHE_TTL);
            if answers.len() >= MEMBERS_CACHE_ENTRIES {
                answers.clear();
            }
        }
        answers.insert(key, (Instant::now(), std::sync::Arc::clone(&body)));
        Ok(body)
    }
}

/// Why no usable request head was read.
#[derive(Debug)]
enum HeadError {
    /// The client closed the connection (or reset it) first.
    Closed,
    /// The head was not complete within the handshake timeout.
    Timeout,
    /// The head is larger than [`MAX_HEAD_BYTES`] or has too many headers.
    TooLarge,
    /// Not HTTP/1.x.
    Malformed(httparse::Error),
    /// Another I/O error.
    Io(io::Error),
}

/// Reads one HTTP request on a fresh connection and answers it, unless it is
/// a valid WebSocket upgrade (see [`Outcome::Upgrade`]).
pub fn serve(stream: &TcpStream, ctx: &Context) -> io::Result<Outcome> {
    let limits = &ctx.limits;
    let (head, leftover) = match read_head(stream, limits) {
        Ok(parsed) => parsed,
        Err(HeadError::Closed) => return Ok(Outcome::Abandoned),
        Err(HeadError::Timeout) => {
            // Best effort: a client that sends nothing may not read either.
            let _ = respond(
                stream,
                StatusCode::REQUEST_TIMEOUT,
                "request head not received in time",
            );
            return Ok(Outcome::Abandoned);
        }
        Err(HeadError::TooLarge) => {
            return answer(
                stream,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large",
            );
        }
        Err(HeadError::Malformed(e)) => {
            return answer(
                stream,
                StatusCode::BAD_REQUEST,
                &format!("malformed request: {e}"),
            );
        }
        Err(HeadError::Io(e)) => return Err(e),
    };

    if head.method != "GET" {
        return answer(
            stream,
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported",
        );
    }
    let path = head.path();
    let query = head.query();
    let target = match path {
        "/" => return answer_with(stream, StatusCode::OK, HTML, INDEX_HTML),
        "/healthz" => {
            return match ctx.broker.health() {
                Ok(()) => answer(stream, StatusCode::OK, "ok"),
                Err(reason) => answer(stream, StatusCode::SERVICE_UNAVAILABLE, &reason),
            };
        }
        "/metrics" => {
            return answer_with(
                stream,
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                &ctx.metrics.render(),
            );
        }
        "/members" => return members(stream, ctx, query),
        "/echo" if limits.echo_endpoint => Target::Echo,
        _ => {
            let Some(segment) = path.strip_prefix("/chat/").filter(|s| !s.contains('/')) else {
                return answer(
                    stream,
                    StatusCode::NOT_FOUND,
                    "not found; chat at /chat/{nickname}",
                );
            };
            match member(segment, query) {
                Ok(member) => Target::Chat(member),
                Err(reason) => return answer(stream, StatusCode::BAD_REQUEST, &reason),
            }
        }
    };
    // Forwarding headers count only from a proxy we were told to trust.
    let proxied = !limits.trusted_proxies.is_empty()
        && stream
            .peer_addr()
            .is_ok_and(|peer| limits.trusted_proxies.contains(&peer.ip()));
    let scheme = match head.header("X-Forwarded-Proto") {
        Some(proto) if proxied && proto.eq_ignore_ascii_case(b"https") => "https",
        _ => "http",
    };
    if let Err(reason) = check_origin(&head, scheme, &limits.allowed_origins) {
        return answer(stream, StatusCode::FORBIDDEN, &reason);
    }
    if head.header("Upgrade").is_none() {
        return answer(
            stream,
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket endpoint; connect with a WebSocket client, \
             e.g. websocat ws://HOST:PORT/chat/NICKNAME",
        );
    }
    if let Err(reason) = check_upgrade_request(&head) {
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

/// What an upgrade request must be beyond what tungstenite checks:
/// HTTP/1.1 (RFC 6455 section 4.1), with a `Host`, and without a body (the
/// bytes after the head are the client's first frames, not a body someone
/// could smuggle past the server).
fn check_upgrade_request(head: &RequestHead) -> Result<(), &'static str> {
    if head.version < 1 {
        return Err("a WebSocket upgrade needs HTTP/1.1");
    }
    if head
        .header("Host")
        .is_none_or(|h| h.trim_ascii().is_empty())
    {
        return Err("a WebSocket upgrade needs a Host header");
    }
    let has_body = head.header("Transfer-Encoding").is_some()
        || head
            .header("Content-Length")
            .is_some_and(|len| len.trim_ascii() != b"0");
    if has_body {
        return Err("a WebSocket upgrade has no body (Content-Length or Transfer-Encoding)");
    }
    Ok(())
}

/// The client's address as the trusted proxy saw it: the last entry of
/// `X-Forwarded-For` (the one that proxy appended; entries before it were
/// written by the client and prove nothing).
fn forwarded_client(head: &RequestHead) -> Option<IpAddr> {
    let value = std::str::from_utf8(head.header("X-Forwarded-For")?).ok()?;
    let last = value.rsplit(',').next()?.trim();
    last.parse()
        .ok()
        .or_else(|| last.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// Sends the `101 Switching Protocols` answer: from here on, the socket
/// speaks WebSocket.
pub fn accept(stream: &TcpStream, response: &http::Response<()>) -> io::Result<()> {
    let mut out = Vec::with_capacity(256);
    write_response(&mut out, response).map_err(io::Error::other)?;
    (&*stream).write_all(&out)
}

/// Reads until the end of the request head, within the size and time limits.
///
/// The time limit covers the whole head, not each read: a client trickling one
/// byte every few seconds (slowloris) is still cut off on time.
fn read_head(stream: &TcpStream, limits: &Limits) -> Result<(RequestHead, Vec<u8>), HeadError> {
    let deadline = Instant::now() + limits.handshake_timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(HeadError::Timeout);
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(HeadError::Io)?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_disconnect(&e) => return Err(HeadError::Closed),
            Err(e) => return Err(HeadError::Io(e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(parsed) = parse_head(&buf)? {
            stream.set_read_timeout(None).map_err(HeadError::Io)?;
            return Ok(parsed);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Parses a complete head out of `buf`, or says more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, Vec<u8>)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let head = RequestHead {
        method: req.method.unwrap_or_default().to_owned(),
        version: req.version.unwrap_or(1),
        target: req.path.unwrap_or_default().to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_owned()))
            .collect(),
    };
    Ok(Some((head, buf[len..].to_vec())))
}

/// The browser-origin policy. Browsers send `Origin` with every WebSocket
/// request, and any page on the web can open one to any server: without this
/// check, a malicious page could chat in the user's name. Allowed: requests
/// without `Origin` (websocat, scripts, servers), pages served by this server
/// itself, and `--allow-origin`.
///
/// "Served by this server" means the same scheme, host and port: the
/// origin's scheme is `scheme` (`http`, or what a trusted proxy says), its
/// host and port those of the request's `Host` (a port left out is the
/// scheme's default). `https://chat.example` is not `http://chat.example`,
/// nor `http://chat.example:8080`.
fn check_origin(head: &RequestHead, scheme: &str, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = head.header("Origin") else {
        return Ok(());
    };
    let origin = String::from_utf8_lossy(origin);
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let host = head.header("Host").map(String::from_utf8_lossy);
    let same = match (origin.split_once("://"), host) {
        (Some((origin_scheme, origin_host)), Some(host)) => {
            origin_scheme.eq_ignore_ascii_case(scheme)
                && host_and_port(origin_host, scheme) == host_and_port(host.trim(), scheme)
        }
        _ => false,
    };
    if same {
        return Ok(());
    }
    Err(format!(
        "origin {origin} is not allowed (start the server with --allow-origin {origin})"
    ))
}

/// `host[:port]` as (lower-case host, port), the port defaulting to the
/// scheme's; `None` if the port is not a number.
fn host_and_port(authority: &str, scheme: &str) -> Option<(String, u16)> {
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    // An IPv6 literal is bracketed: `[::1]:8000`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// Lets tungstenite check the upgrade headers and compute
/// `Sec-WebSocket-Accept`; its error becomes the 400's reason.
fn websocket_response(head: &RequestHead) -> Result<http::Response<()>, String> {
    let mut builder = http::Request::builder()
        .method(head.method.as_str())
        .uri(head.target.as_str())
        .version(http::Version::HTTP_11);
    for (name, value) in &head.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let request = builder
        .body(())
        .map_err(|e| format!("malformed request: {e}"))?;
    create_response(&request).map_err(|e| format!("not a valid WebSocket upgrade: {e}"))
}

fn answer(stream: &TcpStream, status: StatusCode, body: &str) -> io::Result<Outcome> {
    respond(stream, status, body)?;
    Ok(Outcome::Answered(status))
}

fn answer_with(
    stream: &TcpStream,
    status: StatusCode,
    content_type: &str,
    body: &str,
) -> io::Result<Outcome> {
    write_response_with(stream, status, content_type, body)?;
    linger_close(stream);
    Ok(Outcome::Answered(status))
}

const PLAIN_TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";

/// Writes a complete plain-text response, then closes our side.
fn respond(stream: &TcpStream, status: StatusCode, body: &str) -> io::Result<()> {
    write_plain(stream, status, body)?;
    linger_close(stream);
    Ok(())
}

/// Ends a connection after an HTTP answer without losing the answer: send
/// FIN, then read (and discard) what the client still sends until it closes
/// too. Closing a socket with unread input sends RST instead, and an RST can
/// destroy the response before the client has read it.
fn linger_close(stream: &TcpStream) {
    const MAX_DRAIN: usize = 64 * 1024;
    if stream.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained < MAX_DRAIN {
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn write_plain(stream: &TcpStream, status: StatusCode, body: &str) -> io::Result<()> {
    write_response_with(stream, status, PLAIN_TEXT, &format!("{body}\n"))
}

fn write_response_with(
    stream: &TcpStream,
    status: StatusCode,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let mut extra = String::new();
    if status == StatusCode::UPGRADE_REQUIRED {
        extra.push_str("Upgrade: websocket\r\nConnection: Upgrade, close\r\n");
    } else {
        extra.push_str("Connection: close\r\n");
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        extra.push_str("Allow: GET\r\n");
    }
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    (&*stream).write_all(response.as_bytes())?;
    (&*stream).flush()
}

/// Answers with an error status instead of upgrading, and closes.
pub fn refuse(stream: &TcpStream, status: StatusCode, body: &str) -> io::Result<()> {
    respond(stream, status, body)
}

/// Answers 503 on a connection the server has no room for, without reading
/// its request and without waiting for it: this runs on the accept loop.
pub fn refuse_full(stream: &TcpStream, why: &str) {
    // A fresh socket's send buffer is empty, so this cannot block for long;
    // the timeout is a backstop for the accept loop.
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(200)));
    let _ = write_plain(stream, StatusCode::SERVICE_UNAVAILABLE, why);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Discard whatever part of the request has already arrived, without
    // waiting for more, so closing does not turn into an RST that could
    // destroy the answer.
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        while matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// True for errors that just mean the peer went away.
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// The web client: one self-contained page (HTML, CSS and JavaScript),
/// embedded in the binary.
const INDEX_HTML: &str = include_str!("web/index.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_head_asks_for_more() {
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bytes_after_the_head_are_kept() {
        let (head, rest) =
            parse_head(b"GET /chat/a?x=1 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x80")
                .unwrap()
                .unwrap();
        assert_eq!(head.path(), "/chat/a");
        assert_eq!(head.header("upgrade"), Some(&b"websocket"[..]));
        assert_eq!(rest, b"\x81\x80");
    }

    fn head_with(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            version: 1,
            target: "/chat/a".into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn origin_policy() {
        let none: Vec<String> = vec![];
        let http = "http";
        assert!(check_origin(&head_with(&[("Host", "h:1")]), http, &none).is_ok());
        let same = head_with(&[
            ("Host", "chat.example:8000"),
            ("Origin", "http://chat.example:8000"),
        ]);
        assert!(check_origin(&same, http, &none).is_ok());
        let other = head_with(&[
            ("Host", "chat.example:8000"),
            ("Origin", "https://evil.example"),
        ]);
        assert!(
            check_origin(&other, http, &none)
                .unwrap_err()
                .contains("--allow-origin")
        );
        assert!(check_origin(&other, http, &["https://evil.example".into()]).is_ok());
        assert!(check_origin(&other, http, &["*".into()]).is_ok());
    }

    #[test]
    fn origin_compares_scheme_host_and_port() {
        let none: Vec<String> = vec![];
        let check = |host: &str, origin: &str, scheme: &str| {
            check_origin(
                &head_with(&[("Host", host), ("Origin", origin)]),
                scheme,
                &none,
            )
            .is_ok()
        };
        assert!(check("chat.example", "http://chat.example:80", "http"));
        assert!(check("Chat.Example:80", "http://chat.example", "http"));
        assert!(!check(
            "chat.example:8000",
            "https://chat.example:8000",
            "http"
        ));
        assert!(!check(
            "chat.example:8000",
            "http://chat.example:8001",
            "http"
        ));
        assert!(!check("chat.example:8000", "http://chat.example", "http"));
        assert!(check("chat.example", "https://chat.example", "https"));
        assert!(check("[::1]:8000", "http://[::1]:8000", "http"));
        assert!(!check("[::1]:8000", "http://[::1]", "http"));
    }

    #[test]
    fn upgrades_need_http_1_1_a_host_and_no_body() {
        let mut head = head_with(&[("Host", "h")]);
        assert!(check_upgrade_request(&head).is_ok());
        head.version = 0;
        assert!(check_upgrade_request(&head).is_err());
        assert!(check_upgrade_request(&head_with(&[])).is_err());
        assert!(
            check_upgrade_request(&head_with(&[("Host", "h"), ("Content-Length", "5")])).is_err()
        );
        assert!(
            check_upgrade_request(&head_with(&[("Host", "h"), ("Content-Length", "0")])).is_ok()
        );
        assert!(
            check_upgrade_request(&head_with(&[
                ("Host", "h"),
                ("Transfer-Encoding", "chunked")
            ]))
            .is_err()
        );
    }

    #[test]
    fn the_proxy_appends_the_last_forwarded_address() {
        let head = head_with(&[("X-Forwarded-For", "6.6.6.6, 10.0.0.7")]);
        assert_eq!(forwarded_client(&head), Some("10.0.0.7".parse().unwrap()));
        assert_eq!(forwarded_client(&head_with(&[])), None);
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn too_many_headers_is_too_large() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            req.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        assert!(matches!(parse_head(&req), Err(HeadError::TooLarge)));
    }
}

/// Hostile input never panics: arbitrary bytes give a head, "need more", or
/// an error.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_head(&bytes);
        }

        #[test]
        fn arbitrary_headers_never_panic(
            target in "/[ -~]{0,64}",
            headers in proptest::collection::vec(("[!-9;-~]{1,16}", proptest::collection::vec(any::<u8>(), 0..32)), 0..60),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut request = format!("GET {target} HTTP/1.1\r\n").into_bytes();
            for (name, value) in &headers {
                request.extend_from_slice(name.as_bytes());
                request.extend_from_slice(b": ");
                request.extend_from_slice(value);
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(&rest);
            if let Ok(Some((head, _))) = parse_head(&request) {
                let _ = head.path();
                let _ = check_origin(&head, "http", &[]);
                let _ = check_upgrade_request(&head);
                let _ = forwarded_client(&head);
                let _ = websocket_response(&head);
            }
        }
    }
}
