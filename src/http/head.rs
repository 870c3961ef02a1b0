//! Reading a request head: bounded in size and in time, parsed with
//! `httparse`, keeping whatever the client sent after it.

use crate::net::Stream;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use super::answer::is_disconnect;

/// Longest request head accepted, in bytes; a longer one gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted; more gets 431.
pub(super) const MAX_HEADERS: usize = 48;

/// A parsed request head: only what routing and the handshake need.
#[derive(Debug)]
pub(super) struct RequestHead {
    pub(super) method: String,
    /// The minor version: `HTTP/1.1` is 1, `HTTP/1.0` is 0.
    pub(super) version: u8,
    /// The request target as sent, e.g. `/chat/Joe%20Doe?x=1`.
    pub(super) target: String,
    pub(super) headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    pub(super) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every line of header `name`, in order, joined with `, ` (RFC 9110
    /// section 5.3: a list header sent on several lines is one list);
    /// `None` without any such line or if one is not text.
    pub(super) fn header_list(&self, name: &str) -> Option<String> {
        let mut lines = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| std::str::from_utf8(v).ok());
        let mut joined = lines.next()??.to_owned();
        for line in lines {
            joined.push_str(", ");
            joined.push_str(line?);
        }
        Some(joined)
    }

    /// The path part of the target, without the query string.
    pub(super) fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }

    /// The query string (after `?`, before `#`), or "".
    pub(super) fn query(&self) -> &str {
        let without_fragment = self.target.split('#').next().unwrap_or("");
        without_fragment.split_once('?').map_or("", |(_, q)| q)
    }
}

/// Why no usable request head was read.
#[derive(Debug)]
pub(super) enum HeadError {
    /// The client closed the connection (or reset it) first.
    Closed,
    /// The head was not complete within the handshake timeout.
    Timeout,
    /// The head is larger than [`MAX_HEAD_BYTES`] or has too many headers.
    TooLarge,
    /// Not HTTP/1.x.
    Malformed(httparse::Error),
    /// HTTP/1.x, but a request no server may act on (the reason).
    Invalid(&'static str),
    /// Another I/O error.
    Io(io::Error),
}

/// Reads until the end of the request head, within the size limit and
/// `timeout`.
///
/// The time limit covers the whole head, not each read: a client trickling one
/// byte every few seconds (slowloris) is still cut off on time.
pub(super) fn read_head(
    stream: &Stream,
    timeout: Duration,
) -> Result<(RequestHead, Vec<u8>), HeadError> {
    let deadline = Instant::now() + timeout;
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
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, Vec<u8>)>, HeadError> {
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
    // RFC 9112 section 3.2: a request with more than one Host line is
    // answered 400. Which one would count is anyone's guess, and a proxy
    // in front may have checked the other.
    let hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Host"))
        .count();
    if hosts > 1 {
        return Err(HeadError::Invalid(
            "a request has one Host header, not several",
        ));
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
