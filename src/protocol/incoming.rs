//! A payload from a room, parsed once and encoded once per format for all
//! the clients of this instance it goes to.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tungstenite::Utf8Bytes;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use super::frames::{Replay, ServerFrame};
use super::payload::{ChatMessage, PayloadError};
use super::request::Format;

/// A payload received from a room, parsed once and rendered at most once
/// per [`Format`], then shared (by `Arc`) with every client it goes to.
///
/// With a shared subscription (or the in-process broker) one `Incoming`
/// reaches every client of the room on this instance: the JSON is parsed once
/// and each outgoing frame is encoded once, however many clients there are.
/// [`Incoming::frame`] hands out the encoded frame as a [`Utf8Bytes`], whose
/// clone is a reference-count increment, not a copy. With per-client
/// subscriptions each client reads its own copy of the payload, and each
/// reader makes its own `Incoming` (its own [`waiting_since`]), but the
/// parsing and encoding, the [`Parsed`] part, can still be shared: see
/// `broker::redis::parse_once`.
///
/// [`waiting_since`]: Self::waiting_since
#[derive(Debug)]
pub struct Incoming {
    /// The message and its frames, possibly shared with other readers of
    /// the same payload.
    parsed: Arc<Parsed>,
    /// Since when it has been waiting here for its clients (see
    /// [`waiting_since`](Self::waiting_since)).
    since: Instant,
}

/// A payload parsed, and its live frame encoded on first use in each
/// format: the part of an [`Incoming`] that does not depend on who read it.
#[derive(Debug)]
pub struct Parsed {
    /// The parsed message, or why the payload is not one.
    message: Result<ChatMessage, Junk>,
    /// The live frame in each format, encoded on first use.
    json: OnceLock<Utf8Bytes>,
    text: OnceLock<Utf8Bytes>,
    /// The JSON frame as it goes on the wire: a WebSocket text frame,
    /// header and all (see [`Incoming::wire_frame`]).
    wire: OnceLock<Box<[u8]>>,
}

impl Parsed {
    /// Parses a payload read from a room's channel.
    pub fn parse(payload: &[u8]) -> Parsed {
        Parsed::new(ChatMessage::from_payload(payload).map_err(|error| Junk {
            error,
            payload: payload.to_vec(),
        }))
    }

    fn new(message: Result<ChatMessage, Junk>) -> Parsed {
        Parsed {
            message,
            json: OnceLock::new(),
            text: OnceLock::new(),
            wire: OnceLock::new(),
        }
    }
}

/// A payload that is not a chat message, kept so it can be reported.
#[derive(Debug)]
pub struct Junk {
    /// Why it was rejected.
    pub error: PayloadError,
    /// The payload itself.
    pub payload: Vec<u8>,
}

impl Incoming {
    /// A payload skipped unread because it is `len` bytes, over the limit.
    pub fn oversized(len: usize, since: Instant) -> Incoming {
        let junk = Junk {
            error: PayloadError::TooBig(len),
            payload: Vec::new(),
        };
        Incoming::from_parsed(Arc::new(Parsed::new(Err(junk))), since)
    }

    /// Parses a payload read from a room's channel, waiting here since
    /// `since` (see [`waiting_since`](Self::waiting_since)).
    pub fn parse(payload: &[u8], since: Instant) -> Incoming {
        Incoming::from_parsed(Arc::new(Parsed::parse(payload)), since)
    }

    /// A payload parsed already (perhaps for another reader), waiting here
    /// since `since`.
    pub fn from_parsed(parsed: Arc<Parsed>, since: Instant) -> Incoming {
        Incoming { parsed, since }
    }

    /// A copy of this message for another dispatcher thread of the same
    /// room: parsed already, its frames encoded again on first use and
    /// shared only by that thread's clients. Each write takes a reference
    /// to a frame (an atomic count); two cores counting on one frame pass
    /// its cache line between them at every write (`broker::redis::shared`
    /// has the numbers). `None` for junk, which is never written.
    pub fn copy_for_another_thread(&self) -> Option<Incoming> {
        let message = self.parsed.message.as_ref().ok()?.clone();
        Some(Incoming::from_parsed(
            Arc::new(Parsed::new(Ok(message))),
            self.since,
        ))
    }

    /// The frame a client gets for this live message without its place in
    /// the log (see `session::outbox`'s `Expect`): rendered for this one
    /// client, since it is rare. Never inlined: inlined into the subscriber
    /// thread's path it pushed that thread's stack onto a third page, which
    /// stays resident for the client's whole life (see PERFORMANCE).
    #[cold]
    #[inline(never)]
    pub fn frame_without_place(&self, format: Format) -> Option<Utf8Bytes> {
        let mut message = self.parsed.message.as_ref().ok()?.clone();
        (message.offset, message.epoch) = (None, None);
        Some(
            ServerFrame::from_event(&message, Replay::Live)
                .render(format)
                .into(),
        )
    }

    /// Since when this message has been waiting on this instance, by this
    /// instance's own clock: how far behind the room a client that takes it
    /// now is. Whoever receives it sets it — the in-process relay when it
    /// is published, a listener when it reads it from Redis (a listener
    /// that has been behind Redis since before then gives the moment it
    /// fell behind: see `RedisListener`). Never the payload's own `ts`,
    /// which anyone who can publish can forge, and another instance's
    /// clock can step.
    pub fn waiting_since(&self) -> Instant {
        self.since
    }

    /// The chat message, or the junk it turned out to be.
    pub fn message(&self) -> Result<&ChatMessage, &Junk> {
        self.parsed.message.as_ref()
    }

    /// The live JSON frame as a server writes it on the wire: a WebSocket
    /// text frame (unmasked, final), header and all, encoded by
    /// tungstenite on first use. A room's dispatcher writes these bytes to
    /// each client as they are (see `session::direct`): no frame is
    /// encoded, and no buffer shared, per client. `None` for junk.
    pub fn wire_frame(&self) -> Option<&[u8]> {
        // Read first: the common case takes no reference to anything.
        if let Some(wire) = self.parsed.wire.get() {
            return Some(wire);
        }
        let text = self.frame(Format::Json)?;
        let wire = self.parsed.wire.get_or_init(|| {
            let mut wire = Vec::with_capacity(text.len() + 10);
            let frame = Frame::message(text, OpCode::Data(Data::Text), true);
            // Writing to a `Vec` cannot fail.
            let _ = frame.format(&mut wire);
            wire.into()
        });
        Some(wire)
    }

    /// The frame a client gets for this live message, in its format; `None`
    /// for junk. Encoded by the first caller, shared by the rest.
    pub fn frame(&self, format: Format) -> Option<Utf8Bytes> {
        let parsed = &*self.parsed;
        let message = parsed.message.as_ref().ok()?;
        let cell = match format {
            Format::Json => &parsed.json,
            Format::Text => &parsed.text,
        };
        Some(
            cell.get_or_init(|| {
                ServerFrame::from_event(message, Replay::Live)
                    .render(format)
                    .into()
            })
            .clone(),
        )
    }
}
