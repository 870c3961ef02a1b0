//! A payload from a room, parsed once and encoded once per format for all
//! the clients of this instance it goes to.

use std::sync::OnceLock;
use std::time::Instant;

use tungstenite::Utf8Bytes;

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
/// clone is a reference-count increment, not a copy.
#[derive(Debug)]
pub struct Incoming {
    /// The parsed message, or why the payload is not one.
    message: Result<ChatMessage, Junk>,
    /// Since when it has been waiting here for its clients (see
    /// [`waiting_since`](Self::waiting_since)).
    since: Instant,
    /// The live frame in each format, encoded on first use.
    json: OnceLock<Utf8Bytes>,
    text: OnceLock<Utf8Bytes>,
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
        Incoming {
            message: Err(Junk {
                error: PayloadError::TooBig(len),
                payload: Vec::new(),
            }),
            since,
            json: OnceLock::new(),
            text: OnceLock::new(),
        }
    }

    /// Parses a payload read from a room's channel, waiting here since
    /// `since` (see [`waiting_since`](Self::waiting_since)).
    pub fn parse(payload: &[u8], since: Instant) -> Incoming {
        Incoming {
            message: ChatMessage::from_payload(payload).map_err(|error| Junk {
                error,
                payload: payload.to_vec(),
            }),
            since,
            json: OnceLock::new(),
            text: OnceLock::new(),
        }
    }

    /// The frame a client gets for this live message without its place in
    /// the log (see `session::outbox`'s `Expect`): rendered for this one
    /// client, since it is rare. Never inlined: inlined into the subscriber
    /// thread's path it pushed that thread's stack onto a third page, which
    /// stays resident for the client's whole life (see PERFORMANCE).
    #[cold]
    #[inline(never)]
    pub fn frame_without_place(&self, format: Format) -> Option<Utf8Bytes> {
        let mut message = self.message.as_ref().ok()?.clone();
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
        self.message.as_ref()
    }

    /// The frame a client gets for this live message, in its format; `None`
    /// for junk. Encoded by the first caller, shared by the rest.
    pub fn frame(&self, format: Format) -> Option<Utf8Bytes> {
        let message = self.message.as_ref().ok()?;
        let cell = match format {
            Format::Json => &self.json,
            Format::Text => &self.text,
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
