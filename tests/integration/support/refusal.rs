//! How the server refuses a chat, as a client sees it.
//!
//! A valid WebSocket upgrade the server will not take (a bad name, a bad
//! token, a cap) is accepted, told why in one `error` frame, and closed
//! with code 4000 + the HTTP status; a plain HTTP request gets the status
//! itself. [`Refusal`] is either, reduced to what a user reads: the status
//! and the reason.

use std::io::Read;

use serde_json::Value;
use tungstenite::Message;

/// A refused chat: the HTTP status (from the close code, 4000 + it, when
/// the refusal came over WebSocket) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

impl Refusal {
    /// The refusal in a WebSocket's first two messages, if they are one:
    /// an `error` frame, then a close with a code in the 4000s whose reason
    /// is how the error's message begins (a close reason is at most 123
    /// bytes). Anything else is no refusal.
    pub fn from_messages(first: &Message, second: Option<&Message>) -> Option<Refusal> {
        let Message::Text(text) = first else {
            return None;
        };
        let frame: Value = serde_json::from_str(text.as_str()).ok()?;
        if frame["type"] != "error" {
            return None;
        }
        let reason = frame["message"].as_str()?.to_owned();
        let Some(Message::Close(Some(close))) = second else {
            panic!("an error frame before the welcome, not followed by a close: {second:?}");
        };
        let code = u16::from(close.code);
        assert!(
            (4000..5000).contains(&code),
            "refused with close code {code}"
        );
        assert!(
            reason.starts_with(close.reason.as_str()),
            "close reason {:?} is not the start of the error {reason:?}",
            close.reason
        );
        Some(Refusal {
            status: code - 4000,
            reason,
        })
    }

    /// The refusal in the bytes a server sent after a `101` head (its
    /// frames, unmasked), or `None` if its first frame is no error.
    pub fn from_frames(mut bytes: impl Read) -> Option<Refusal> {
        let first = read_frame(&mut bytes)?;
        if !is_error(&first) {
            return None;
        }
        let second = read_frame(&mut bytes);
        Refusal::from_messages(&first, second.as_ref())
    }
}

/// Whether `message` is an `error` frame (which, first, is a refusal's).
pub fn is_error(message: &Message) -> bool {
    let Message::Text(text) = message else {
        return false;
    };
    serde_json::from_str::<Value>(text.as_str()).is_ok_and(|frame| frame["type"] == "error")
}

/// One unfragmented server frame (text or close) from `bytes`, if whole.
fn read_frame(bytes: &mut impl Read) -> Option<Message> {
    let mut head = [0u8; 2];
    bytes.read_exact(&mut head).ok()?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            bytes.read_exact(&mut n).ok()?;
            u64::from(u16::from_be_bytes(n))
        }
        127 => {
            let mut n = [0u8; 8];
            bytes.read_exact(&mut n).ok()?;
            u64::from_be_bytes(n)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    bytes.read_exact(&mut payload).ok()?;
    match head[0] & 0x0f {
        1 => Some(Message::text(String::from_utf8(payload).ok()?)),
        8 if payload.len() >= 2 => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = String::from_utf8(payload[2..].to_vec()).ok()?;
            Some(Message::Close(Some(tungstenite::protocol::CloseFrame {
                code: code.into(),
                reason: reason.into(),
            })))
        }
        _ => Some(Message::binary(payload)),
    }
}
