//! Writing plain HTTP answers (and refusals) so that the client reads them:
//! complete responses, then a lingering close; and the refusal of a
//! WebSocket upgrade, which a WebSocket client can only read as WebSocket.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::net::Stream;

use tungstenite::http::StatusCode;

use super::outcome::Outcome;

/// Answers with `status` and a plain-text `body`, then closes our side.
pub fn answer(stream: &Stream, status: StatusCode, body: &str) -> io::Result<Outcome> {
    respond(stream, status, body)?;
    Ok(Outcome::Answered(status))
}

/// Answers with `status` and a `body` of `content_type`, then closes our side.
pub fn answer_with(
    stream: &Stream,
    status: StatusCode,
    content_type: &str,
    body: &str,
) -> io::Result<Outcome> {
    answer_with_headers(stream, status, content_type, "", body)
}

/// Like [`answer_with`], with extra header lines (each ending in `\r\n`).
pub fn answer_with_headers(
    stream: &Stream,
    status: StatusCode,
    content_type: &str,
    headers: &str,
    body: &str,
) -> io::Result<Outcome> {
    write_response(stream, status, content_type, headers, body)?;
    linger_close(stream);
    Ok(Outcome::Answered(status))
}

/// The `Content-Type` of plain text.
pub const PLAIN_TEXT: &str = "text/plain; charset=utf-8";
/// The `Content-Type` of a web page.
pub const HTML: &str = "text/html; charset=utf-8";
/// The `Content-Type` of JSON.
pub const JSON: &str = "application/json";

/// Writes a complete plain-text response, then closes our side.
pub(super) fn respond(stream: &Stream, status: StatusCode, body: &str) -> io::Result<()> {
    write_plain(stream, status, body)?;
    linger_close(stream);
    Ok(())
}

/// Ends a connection after an HTTP answer without losing the answer: send
/// FIN, then read (and discard) what the client still sends until it closes
/// too. Closing a socket with unread input sends RST instead, and an RST can
/// destroy the response before the client has read it.
///
/// At most [`LINGER`] in all, and [`MAX_DRAIN`] bytes: a client that goes
/// on sending (a byte now and then) would otherwise keep this thread, and
/// the start place it holds, for as long as it likes.
pub(super) fn linger_close(stream: &Stream) {
    if stream.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained < MAX_DRAIN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// How long [`linger_close`] waits for the client to close, at most.
const LINGER: Duration = Duration::from_secs(1);

/// How much of what the client still sends [`linger_close`] reads, at most.
const MAX_DRAIN: usize = 64 * 1024;

pub(super) fn write_plain(stream: &Stream, status: StatusCode, body: &str) -> io::Result<()> {
    write_response_with(stream, status, PLAIN_TEXT, &format!("{body}\n"))
}

pub(super) fn write_response_with(
    stream: &Stream,
    status: StatusCode,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    write_response(stream, status, content_type, "", body)
}

fn write_response(
    stream: &Stream,
    status: StatusCode,
    content_type: &str,
    headers: &str,
    body: &str,
) -> io::Result<()> {
    let response = response(status, content_type, headers, body);
    (&*stream).write_all(response.as_bytes())?;
    (&*stream).flush()
}

/// A complete response, as text.
fn response(status: StatusCode, content_type: &str, headers: &str, body: &str) -> String {
    let mut extra = headers.to_owned();
    if status == StatusCode::UPGRADE_REQUIRED {
        extra.push_str("Upgrade: websocket\r\nConnection: Upgrade, close\r\n");
    } else {
        extra.push_str("Connection: close\r\n");
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        extra.push_str("Allow: GET\r\n");
    }
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

/// Answers with an error status instead of upgrading, and closes.
pub fn refuse(stream: &Stream, status: StatusCode, body: &str) -> io::Result<()> {
    respond(stream, status, body)
}

/// Refuses a valid upgrade so that a WebSocket client can show why: accepts
/// it (`response`, the `101`), sends `frame` (the reason as an `error`
/// frame, in the client's format), and closes with code 4000 + `status`
/// (4401 for 401, and so on: the 4000s are for applications) and the reason,
/// cut to what a close frame holds. A browser reads the code and reason in
/// its `close` event; websocat prints the frame.
///
/// Nothing else reaches the client: the connection was never a chat.
pub fn refuse_upgraded(
    stream: &Stream,
    response: &tungstenite::http::Response<()>,
    status: StatusCode,
    frame: &str,
    reason: &str,
) -> io::Result<()> {
    use tungstenite::protocol::CloseFrame;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut out = Vec::with_capacity(256 + frame.len() + reason.len());
    tungstenite::handshake::server::write_response(&mut out, response).map_err(io::Error::other)?;
    let to_bytes = io::Error::other;
    Frame::message(frame.to_owned(), OpCode::Data(Data::Text), true)
        .format(&mut out)
        .map_err(to_bytes)?;
    let close = CloseFrame {
        code: (4000 + status.as_u16()).into(),
        reason: crate::protocol::truncate(reason, MAX_CLOSE_REASON).into(),
    };
    Frame::close(Some(close))
        .format(&mut out)
        .map_err(to_bytes)?;
    (&*stream).write_all(&out)?;
    linger_close(stream);
    Ok(())
}

/// Bytes a close frame's reason may have (125 of payload, less the code).
const MAX_CLOSE_REASON: usize = 123;

/// Answers 503 on a connection the server has no room for, without reading
/// its request and without waiting for it: this runs on the accept loop.
///
/// On a TLS port (`tls`) there is no answer a client can read without a
/// handshake, and a handshake costs the CPU the accept loop must not spend
/// on a connection it refuses: the client gets a TLS alert instead
/// (`internal_error`, readable before any handshake), and the log says why.
pub fn refuse_full(stream: &TcpStream, why: &str, tls: bool) {
    // A fresh socket's send buffer is empty, so this cannot block for long;
    // the timeout is a backstop for the accept loop.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let answer = if tls {
        INTERNAL_ERROR_ALERT.to_vec()
    } else {
        let body = format!("{why}\n");
        response(StatusCode::SERVICE_UNAVAILABLE, PLAIN_TEXT, "", &body).into_bytes()
    };
    let _ = (&*stream).write_all(&answer);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Discard whatever part of the request has already arrived, without
    // waiting for more, so closing does not turn into an RST that could
    // destroy the answer.
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        while matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// A TLS alert record: content type 21 (alert), version 3.3 (TLS 1.2, as
/// TLS 1.3 writes it), length 2, fatal (2), `internal_error` (80).
const INTERNAL_ERROR_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 80];

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
