//! Liveness means complete messages: a client that has begun a message must
//! finish it within `--message-timeout`, in at most `--max-fragments`
//! frames.
//!
//! The idle timeout alone cannot see a trickling client. tungstenite's
//! `read()` returns only complete messages, and a socket read timeout only
//! fires when *nothing* arrives: one byte of a never-finished frame every
//! few seconds, or an empty continuation frame every few seconds, kept a
//! connection open forever, and two million empty fragments made one
//! "message". So the reader's byte stream passes through a [`FrameWatch`]
//! on its way to tungstenite: it follows the frame headers (2 to 14
//! bytes: FIN bit, opcode, length, mask) and skips the payloads, so it
//! always knows whether a message is open, since when, and in how many
//! frames. The socket half that feeds it ([`ReadHalf`](super::socket::ReadHalf))
//! shortens its read timeout to the open message's deadline, and fails the
//! read with a [`Stalled`] error once the deadline passes or a message has
//! too many frames; the reader closes the connection with 1008.
//!
//! Only what arrives is watched; tungstenite still checks everything else
//! about the frames.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

/// Why the watch stopped a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stalled {
    /// A message (or a control frame) begun was not finished in time.
    Unfinished(Duration),
    /// A message came in more frames than allowed.
    TooManyFragments(usize),
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stalled::Unfinished(limit) => write!(
                f,
                "message not finished within {}s (--message-timeout)",
                limit.as_secs_f64()
            ),
            Stalled::TooManyFragments(limit) => {
                write!(f, "message in more than {limit} frames (--max-fragments)")
            }
        }
    }
}

impl std::error::Error for Stalled {}

impl Stalled {
    /// As an I/O error, to travel through tungstenite's `read()`.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The `Stalled` inside an I/O error, if that is what it is.
    pub fn from_io(e: &io::Error) -> Option<&Stalled> {
        e.get_ref()?.downcast_ref()
    }
}

/// The limits a [`FrameWatch`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest a begun message may take.
    pub message_timeout: Duration,
    /// Most frames in one message.
    pub max_fragments: usize,
}

/// Follows the frames in a client's byte stream.
#[derive(Debug)]
pub struct FrameWatch {
    limits: Limits,
    /// Where in the current frame the next byte falls.
    at: Position,
    /// A data message is open (its last frame has not ended).
    in_message: bool,
    /// Frames of the open data message so far.
    fragments: usize,
    /// When what is open now began; `None` between messages.
    since: Option<Instant>,
    /// A limit broken already: every later check fails with it.
    failed: Option<Stalled>,
}

#[derive(Debug)]
enum Position {
    /// In a frame header: the bytes so far.
    Header { bytes: [u8; 14], have: usize },
    /// In a frame's payload: bytes left, and whether the frame ends a data
    /// message.
    Payload { left: u64, ends_message: bool },
}

const HEADER_START: Position = Position::Header {
    bytes: [0; 14],
    have: 0,
};

impl FrameWatch {
    /// A watch at the start of a stream.
    pub fn new(limits: Limits) -> FrameWatch {
        FrameWatch {
            limits,
            at: HEADER_START,
            in_message: false,
            fragments: 0,
            since: None,
            failed: None,
        }
    }

    /// When the open message must be finished by, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + self.limits.message_timeout)
    }

    /// Fails once the open message is past its deadline (or a limit was
    /// broken already).
    pub fn check(&self, now: Instant) -> Result<(), Stalled> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        match self.deadline() {
            Some(deadline) if now >= deadline => {
                Err(Stalled::Unfinished(self.limits.message_timeout))
            }
            _ => Ok(()),
        }
    }

    /// Takes in bytes as they arrive from the client.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Stalled> {
        while !bytes.is_empty() {
            if self.since.is_none() {
                self.since = Some(now);
            }
            match &mut self.at {
                Position::Payload { left, ends_message } => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    bytes = &bytes[take as usize..];
                    if *left == 0 {
                        let ends_message = *ends_message;
                        self.end_frame(ends_message);
                    }
                }
                Position::Header {
                    bytes: header,
                    have,
                } => {
                    header[*have] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    if let Some(length) = header_length(&header[..*have])
                        && *have == length
                    {
                        let header = *header;
                        self.start_frame(&header[..length])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A frame's header is complete.
    fn start_frame(&mut self, header: &[u8]) -> Result<(), Stalled> {
        let fin = header[0] & 0x80 != 0;
        let control = header[0] & 0x08 != 0;
        let payload = payload_length(header);
        let ends_message = !control && fin;
        if !control {
            self.in_message = true;
            self.fragments += 1;
            if self.fragments > self.limits.max_fragments {
                let stalled = Stalled::TooManyFragments(self.limits.max_fragments);
                self.failed = Some(stalled.clone());
                return Err(stalled);
            }
        }
        self.at = Position::Payload {
            left: payload,
            ends_message,
        };
        if payload == 0 {
            self.end_frame(ends_message);
        }
        Ok(())
    }

    /// A frame's payload is complete.
    fn end_frame(&mut self, ends_message: bool) {
        self.at = HEADER_START;
        if ends_message {
            self.in_message = false;
            self.fragments = 0;
        }
        if !self.in_message {
            self.since = None;
        }
    }
}

/// The whole header's length, once its first two bytes are known.
fn header_length(start: &[u8]) -> Option<usize> {
    let second = *start.get(1)?;
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// The payload length a complete header announces.
fn payload_length(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
        n => u64::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        message_timeout: Duration::from_secs(5),
        max_fragments: 3,
    };

    /// A masked frame, as a client sends it.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn whole_messages_leave_nothing_open() {
        let mut watch = FrameWatch::new(LIMITS);
        let now = Instant::now();
        for payload in [&b"hi"[..], &[7; 300], &[8; 70_000]] {
            watch.feed(&frame(true, 1, payload), now).unwrap();
            assert_eq!(watch.deadline(), None);
        }
    }

    #[test]
    fn a_begun_message_has_a_deadline_until_it_ends() {
        let mut watch = FrameWatch::new(LIMITS);
        let start = Instant::now();
        let bytes = frame(true, 1, b"hello");
        watch.feed(&bytes[..3], start).unwrap();
        assert_eq!(watch.deadline(), Some(start + LIMITS.message_timeout));
        // More bytes later do not move the deadline.
        watch
            .feed(&bytes[3..5], start + Duration::from_secs(2))
            .unwrap();
        assert!(watch.check(start + Duration::from_secs(4)).is_ok());
        assert!(watch.check(start + Duration::from_secs(5)).is_err());
        watch.feed(&bytes[5..], start).unwrap();
        assert_eq!(watch.deadline(), None);
    }

    #[test]
    fn pings_inside_a_fragmented_message_do_not_end_it() {
        let mut watch = FrameWatch::new(LIMITS);
        let now = Instant::now();
        watch.feed(&frame(false, 1, b"a"), now).unwrap();
        watch.feed(&frame(true, 9, b""), now).unwrap();
        assert!(watch.deadline().is_some());
        watch.feed(&frame(true, 0, b"b"), now).unwrap();
        assert_eq!(watch.deadline(), None);
    }

    #[test]
    fn too_many_fragments_are_refused() {
        let mut watch = FrameWatch::new(LIMITS);
        let now = Instant::now();
        watch.feed(&frame(false, 1, b""), now).unwrap();
        watch.feed(&frame(false, 0, b""), now).unwrap();
        watch.feed(&frame(false, 0, b""), now).unwrap();
        assert_eq!(
            watch.feed(&frame(false, 0, b""), now),
            Err(Stalled::TooManyFragments(3))
        );
    }

    #[test]
    fn stalled_travels_as_an_io_error() {
        let e = Stalled::TooManyFragments(3).into_io();
        assert_eq!(Stalled::from_io(&e), Some(&Stalled::TooManyFragments(3)));
        assert_eq!(Stalled::from_io(&io::Error::other("x")), None);
    }
}

/// Whatever arrives, the watch never panics.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut watch = FrameWatch::new(Limits { message_timeout: Duration::from_secs(1), max_fragments: 4 });
            for chunk in chunks {
                if watch.feed(&chunk, Instant::now()).is_err() {
                    break;
                }
            }
        }
    }
}
