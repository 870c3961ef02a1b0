//! The HTTP side of a connection: reading the request head, answering plain
//! requests, and accepting the WebSocket upgrade.
//!
//! Why not `tungstenite::accept_hdr`? It can only say yes to an upgrade or fail;
//! it cannot answer `GET /` with a page, or tell a client *why* its nickname
//! was refused. So we read the request head ourselves (with `httparse`, bounded
//! in size and in time), route it, and for an upgrade let tungstenite build the
//! `101 Switching Protocols` answer (`create_response`). Any bytes the client
//! sent after the head are handed on to the WebSocket, so nothing is lost.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use tungstenite::handshake::server::{create_response, write_response};
use tungstenite::http::{self, StatusCode};

use crate::config::Limits;
use crate::protocol::{Format, Nickname, Room, percent_decode};
use crate::session::Context;

/// Longest request head accepted, in bytes; a longer one gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted; more gets 431.
const MAX_HEADERS: usize = 48;

/// How the HTTP exchange ended.
#[derive(Debug)]
pub enum Outcome {
    /// The request is a valid upgrade to `/chat/{nickname}`. Nothing has been
    /// answered yet: the caller sends `response` with [`accept`] once it is
    /// ready to chat, or refuses with [`refuse`]. `leftover` holds bytes the
    /// client sent after the head (the start of its first WebSocket frame, if
    /// it did not wait for the answer).
    Upgrade {
        /// What the client connects to.
        target: Target,
        /// The `101 Switching Protocols` answer to send.
        response: http::Response<()>,
        /// Bytes read past the request head.
        leftover: Vec<u8>,
    },
    /// A plain HTTP answer was sent (a page, or an error status).
    Answered(StatusCode),
    /// The client went away (or sent nothing in time) before a request head
    /// could be read; nothing, or a 408, was sent.
    Abandoned,
}

/// What an upgraded connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A chat room.
    Chat(Member),
    /// The echo endpoint (`--echo-endpoint`, for conformance testing).
    Echo,
}

/// Who joins which room, and how they want their frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// From the path: `/chat/{nickname}`.
    pub nickname: Nickname,
    /// From `?room=`; the original's `global_room` without it.
    pub room: Room,
    /// From `?format=text`; JSON without it.
    pub format: Format,
}

/// A parsed request head: only what routing and the handshake need.
#[derive(Debug)]
struct RequestHead {
    method: String,
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
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return percent_decode(v, true)
                .map(Some)
                .map_err(|e| format!("{key} {e}"));
        }
    }
    Ok(None)
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

/// `GET /members?room=…`: who is in a room, as JSON.
fn members(stream: &TcpStream, ctx: &Context, query: &str) -> io::Result<Outcome> {
    let room = match room_param(query) {
        Ok(room) => room,
        Err(reason) => return answer(stream, StatusCode::BAD_REQUEST, &reason),
    };
    match ctx.broker.members(&room) {
        Ok(members) => {
            let body = serde_json::json!({
                "room": room.name(),
                "count": members.len(),
                "members": members,
            });
            answer_with(stream, StatusCode::OK, JSON, &body.to_string())
        }
        Err(e) => answer(stream, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
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
                PROMETHEUS_TEXT,
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
    if let Err(reason) = check_origin(&head, &limits.allowed_origins) {
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
    let response = match websocket_response(&head) {
        Ok(response) => response,
        Err(reason) => return answer(stream, StatusCode::BAD_REQUEST, &reason),
    };
    Ok(Outcome::Upgrade {
        target,
        response,
        leftover,
    })
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
/// itself (the origin's host is the request's `Host`), and `--allow-origin`.
fn check_origin(head: &RequestHead, allowed: &[String]) -> Result<(), String> {
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
    let origin_host = origin.split_once("://").map(|(_, host)| host);
    let host = head.header("Host").map(String::from_utf8_lossy);
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host.trim()) => Ok(()),
        _ => Err(format!(
            "origin {origin} is not allowed (start the server with --allow-origin {origin})"
        )),
    }
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
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

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
pub fn refuse_full(stream: &TcpStream) {
    // A fresh socket's send buffer is empty, so this cannot block for long;
    // the timeout is a backstop for the accept loop.
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(200)));
    let _ = write_plain(
        stream,
        StatusCode::SERVICE_UNAVAILABLE,
        "server full; try again later",
    );
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
        assert!(check_origin(&head_with(&[("Host", "h:1")]), &none).is_ok());
        let same = head_with(&[
            ("Host", "chat.example:8000"),
            ("Origin", "http://chat.example:8000"),
        ]);
        assert!(check_origin(&same, &none).is_ok());
        let other = head_with(&[
            ("Host", "chat.example:8000"),
            ("Origin", "https://evil.example"),
        ]);
        assert!(
            check_origin(&other, &none)
                .unwrap_err()
                .contains("--allow-origin")
        );
        assert!(check_origin(&other, &["https://evil.example".into()]).is_ok());
        assert!(check_origin(&other, &["*".into()]).is_ok());
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
                let _ = check_origin(&head, &[]);
                let _ = websocket_response(&head);
            }
        }
    }
}
