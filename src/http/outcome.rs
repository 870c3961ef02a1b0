//! What reading a request comes to: an upgrade to accept (and what for),
//! or a plain answer already sent, or nothing at all.

use std::net::IpAddr;

use tungstenite::http::{self, StatusCode};

use crate::protocol::{Format, Member};

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
/// been answered yet: the caller sends `response` with [`accept`](super::accept) once it is
/// ready to chat, or refuses with [`refuse`](super::answer::refuse).
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
    /// Nothing: the request is refused, and the refusal is told the way the
    /// client can read it. A WebSocket client cannot show an HTTP status's
    /// body (websocat prints "401 Unauthorized" and nothing more; a browser
    /// not even that), so a valid upgrade is accepted, told why in one
    /// `error` frame (in the `format` it asked for) and closed with code
    /// 4000 + the status (see [`refuse_upgraded`](super::refuse_upgraded)).
    /// A plain HTTP request gets the status and the reason as its body.
    Refused {
        /// Why, and the HTTP status that says so.
        refusal: Refusal,
        /// The frame format the client asked for.
        format: Format,
    },
}

/// A request refused: the HTTP status and the reason, for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status a plain HTTP answer has (a WebSocket client gets 4000 +
    /// it as the close code).
    pub status: StatusCode,
    /// Why, for the client.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `status`, saying `reason`.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

impl Target {
    /// Who joins which room, for a chat.
    pub fn member(&self) -> Option<&Member> {
        match self {
            Target::Chat(member) => Some(member),
            Target::Echo | Target::Refused { .. } => None,
        }
    }
}
