//! The JSON published on a room's channel, shared with the original app
//! (received, it becomes an [`Incoming`](super::incoming::Incoming)).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::names::{ConnId, NameError, Nickname};

/// What happens in a room, as published on its Redis channel: a chat
/// message, or someone joining or leaving.
///
/// `nickname` and `message` are what the original app's subscribers need
/// (they forward any payload whose nickname is not their client's own). The other
/// fields are threadchat's additions; payloads from the original app lack
/// them, so they are optional when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// What kind of event; absent (a chat message) in the original's payloads.
    #[serde(rename = "type", default, skip_serializing_if = "Kind::is_chat")]
    pub kind: Kind,
    /// Who said it, joined or left.
    pub nickname: String,
    /// What they said (or "joined", "left (timed out)").
    pub message: String,
    /// The sending connection, so it can skip its own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn: Option<String>,
    /// A unique id: for chat messages `{conn}:{n}` (history and live
    /// delivery overlap at a join, and this removes the duplicates); for a
    /// coalesced join or leave `{first conn}:join` or `:leave` (so each
    /// joiner can skip the one that announced it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When the sending server received it: milliseconds since the Unix
    /// epoch. The sender's claim, shown to clients and used for the latency
    /// histogram only: it never decides anything (a payload is evidence,
    /// not authority; see [`Incoming::waiting_since`](super::incoming::Incoming::waiting_since)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// For a coalesced join or leave: who it is about, at most
    /// [`GROUP_LIST`] of them (and `nickname` is a summary for people, e.g.
    /// "alice, bob and 48 others").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nicknames: Vec<String>,
    /// For a coalesced join or leave: how many it is about (more than
    /// `nicknames` lists, in a storm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Its place in the room's log, written by the relay as it records and
    /// publishes the payload (see [`with_place`]); absent in the original
    /// app's payloads, which are therefore not recoverable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The log's epoch (see [`At`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<EpochName>,
    /// Proof that the place was given by the log, not written by whoever
    /// published (see [`tagged_by`](Self::tagged_by)); Redis only. Never
    /// passed on to clients.
    #[serde(
        default,
        deserialize_with = "lenient_tag",
        skip_serializing_if = "Option::is_none"
    )]
    pub tag: Option<Tag>,
}

/// A place's tag as it appears in a payload (16 hex digits), read once
/// into the number it spells: every connection compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(pub u64);

impl Serialize for Tag {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:016x}", self.0))
    }
}

/// Reads a payload's `tag`: a string that is not 16 hex digits reads as no
/// tag (its place is then not passed on), not as a broken payload.
fn lenient_tag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Tag>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Option<Tag>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a string")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Option<Tag>, E> {
            let hex = text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit());
            Ok(hex
                .then(|| u64::from_str_radix(text, 16).ok())
                .flatten()
                .map(Tag))
        }
    }
    deserializer.deserialize_str(Visitor)
}

/// An epoch as it appears in a payload: up to [`MAX_EPOCH`] letters and
/// digits, kept inline. Every subscriber parses every payload it receives
/// (with per-client subscriptions, a payload is parsed once per client):
/// an epoch in a `String` would cost each of them an allocation more per
/// message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EpochName {
    len: u8,
    bytes: [u8; MAX_EPOCH],
}

/// Longest epoch a payload may carry (threadchat's are 12 characters).
pub const MAX_EPOCH: usize = 16;

impl EpochName {
    /// `text`, if it is a plausible epoch: 1 to [`MAX_EPOCH`] ASCII letters
    /// and digits.
    pub fn new(text: &str) -> Option<EpochName> {
        let plausible = !text.is_empty()
            && text.len() <= MAX_EPOCH
            && text.bytes().all(|b| b.is_ascii_alphanumeric());
        plausible.then(|| {
            let mut bytes = [0; MAX_EPOCH];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            EpochName {
                len: text.len() as u8,
                bytes,
            }
        })
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (see `new`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for EpochName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for EpochName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EpochName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = EpochName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "up to {MAX_EPOCH} letters and digits")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<EpochName, E> {
                EpochName::new(text).ok_or_else(|| E::custom("not a plausible epoch"))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// `payload` (a JSON object) with `"offset"` and `"epoch"` written in front
/// of its other fields: what the relay publishes and records. The Redis
/// broker does the same in its Lua script, byte for byte.
pub fn with_place(payload: &[u8], offset: u64, epoch: &str) -> Vec<u8> {
    let rest = payload.strip_prefix(b"{").unwrap_or(payload);
    let mut out = Vec::with_capacity(payload.len() + 48);
    out.extend_from_slice(format!("{{\"offset\":{offset},\"epoch\":\"{epoch}\",").as_bytes());
    out.extend_from_slice(rest);
    out
}

/// Most nicknames a coalesced join or leave lists.
///
/// Every member of a room gets every announcement — with per-client
/// subscriptions each parses its own copy — so during a join storm a list
/// of everyone would be most of what the storm costs (docs/PERFORMANCE.md
/// has the numbers). A person reads "alice, bob and 198 others" anyway;
/// `count` keeps member counts right, and `GET /members` lists everyone.
pub const GROUP_LIST: usize = 20;

/// The kinds of room events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A chat message.
    #[default]
    Chat,
    /// Someone joined the room.
    Join,
    /// Someone left the room.
    Leave,
    /// A type this version does not know: the payload is skipped.
    #[serde(other)]
    Other,
}

impl Kind {
    fn is_chat(&self) -> bool {
        *self == Kind::Chat
    }
}

/// Why a payload found on the Redis channel is not a chat message.
///
/// Whatever is on a room's channel is untrusted: anyone who can reach the
/// Redis (the original app's clients, in the interop set-up) can publish
/// there. A payload is delivered only if it is no bigger than threadchat
/// itself would publish, is a chat message, join or leave, and names a
/// nickname a client could take ([`Nickname::check`]: not `server` nor a
/// look-alike, starting with a letter or digit); lists are cut to what the
/// server itself sends.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not a JSON object with string `"nickname"` and `"message"` fields.
    #[error("not a chat message ({0})")]
    NotChatMessage(#[from] serde_json::Error),
    /// Bigger than the largest payload threadchat publishes; skipped
    /// unread.
    #[error("payload of {0} bytes is over the limit")]
    TooBig(usize),
    /// A `"type"` this version does not know.
    #[error("unknown type")]
    UnknownType,
    /// The nickname is one a client could not take (empty, too long,
    /// invisible characters, `server`, a server line's start, …).
    #[error("nickname not allowed: it {0}")]
    BadNickname(NameError),
}

/// The largest payload accepted from a room's channel, for clients whose
/// messages may be `max_message` bytes: what threadchat itself publishes
/// for such a message (JSON escaping at most doubles the text, see
/// [`clean_message`](super::client::clean_message)) and its other fields. Anything bigger is skipped
/// without being read into memory.
pub fn max_payload(max_message: usize) -> usize {
    2 * max_message + 4096
}

impl ChatMessage {
    /// Chat message number `seq` of connection `conn`, stamped now.
    pub fn new(nickname: &Nickname, conn: &ConnId, seq: u64, message: String) -> ChatMessage {
        ChatMessage {
            kind: Kind::Chat,
            nickname: nickname.as_str().to_owned(),
            message,
            conn: Some(conn.as_str().to_owned()),
            id: Some(format!("{conn}:{seq}")),
            ts: Some(unix_millis()),
            nicknames: Vec::new(),
            count: None,
            offset: None,
            epoch: None,
            tag: None,
        }
    }

    /// A join or leave event for connection `conn`, stamped now.
    pub fn event(kind: Kind, nickname: &Nickname, conn: &ConnId, message: &str) -> ChatMessage {
        ChatMessage {
            kind,
            nickname: nickname.as_str().to_owned(),
            message: message.to_owned(),
            conn: Some(conn.as_str().to_owned()),
            id: None,
            ts: Some(unix_millis()),
            nicknames: Vec::new(),
            count: None,
            offset: None,
            epoch: None,
            tag: None,
        }
    }

    /// One join or leave event for several connections at once (see
    /// `session::announce`), stamped now. `nickname` summarises them for
    /// people and for the original app's clients, which print
    /// `{nickname}: {message}`. `first` is the first connection's id: with
    /// the kind it makes the event's [`id`](Self::id), which the announcer
    /// hands back to each joiner so that it can skip its own arrival. (A
    /// list of every connection would do too, but it would be parsed by
    /// every recipient: in a join storm, most of the bytes of the storm.)
    pub fn group_event(kind: Kind, mut nicknames: Vec<String>, first: &ConnId) -> ChatMessage {
        let (nickname, count) = (summarize(&nicknames), nicknames.len());
        nicknames.truncate(GROUP_LIST);
        ChatMessage {
            kind,
            nickname,
            message: if kind == Kind::Join { "joined" } else { "left" }.to_owned(),
            conn: None,
            id: Some(Self::event_id(kind, first)),
            ts: Some(unix_millis()),
            nicknames,
            count: Some(count),
            offset: None,
            epoch: None,
            tag: None,
        }
    }

    /// The id of the join or leave event about `conn` and others; unique,
    /// since a connection joins once and leaves once.
    pub fn event_id(kind: Kind, conn: &ConnId) -> String {
        let kind = if kind == Kind::Join { "join" } else { "leave" };
        format!("{conn}:{kind}")
    }

    /// Parses a payload read from the Redis channel (or the history), and
    /// checks it (see [`PayloadError`]).
    pub fn from_payload(payload: &[u8]) -> Result<ChatMessage, PayloadError> {
        let mut message: ChatMessage = serde_json::from_slice(payload)?;
        if message.kind == Kind::Other {
            return Err(PayloadError::UnknownType);
        }
        // The rule a client's nickname obeys; the summary of a coalesced
        // join or leave ("alice, bob and 48 others", made of such names)
        // may be longer.
        let checked = if message.count.is_some() && message.kind != Kind::Chat {
            let first = message.nicknames.first().map_or("", String::as_str);
            Nickname::check_summary(&message.nickname, first)
        } else {
            Nickname::check(&message.nickname)
        };
        checked.map_err(PayloadError::BadNickname)?;
        message.nicknames.truncate(GROUP_LIST);
        message
            .nicknames
            .retain(|name| Nickname::check(name).is_ok());
        Ok(message)
    }

    /// The JSON published on the Redis channel.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings and integers always serializes")
    }

    /// Its place in the room's log, if it has one.
    pub fn at(&self) -> Option<At<'_>> {
        Some(At {
            offset: self.offset?,
            epoch: self.epoch.as_ref()?.as_str(),
        })
    }

    /// Whether its tag proves its place was given by the log whose epoch
    /// has `key`: the tag is the first 16 hex digits of the SHA-1 of
    /// `{key}:{epoch}:{offset}`, which the log's Lua script writes in
    /// (`broker::redis::scripts`) and only the log's keeper knows how to.
    pub fn tagged_by(&self, key: &str) -> bool {
        let (Some(at), Some(tag)) = (self.at(), &self.tag) else {
            return false;
        };
        place_tag(key, at) == *tag
    }

    /// True when this message was sent by connection `me`. (A coalesced
    /// join has no `conn`: its joiners skip it by [`id`](Self::id).)
    pub fn is_from(&self, me: &ConnId) -> bool {
        self.conn.as_deref() == Some(me.as_str())
    }
}

/// "alice", "alice and bob", "alice, bob and carol", "alice, bob and 48 others".
pub(super) fn summarize(nicknames: &[String]) -> String {
    match nicknames {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [a, b, c] => format!("{a}, {b} and {c}"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} others", rest.len()),
    }
}

/// A place in a room's log: an offset within an epoch. Offsets count up by
/// one per chat message, join or leave; the epoch changes when the log is
/// lost (Redis flushed or replaced), and offsets then start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct At<'a> {
    /// The position in the log, from 1.
    pub offset: u64,
    /// Which log.
    pub epoch: &'a str,
}

/// The tag the log whose epoch has `key` gives place `at`: the first 16
/// hex digits of the SHA-1 of `{key}:{epoch}:{offset}` (see
/// [`ChatMessage::tagged_by`]).
pub fn place_tag(key: &str, at: At<'_>) -> Tag {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b":");
    sha.update(at.epoch.as_bytes());
    sha.update(b":");
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut n = at.offset;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    sha.update(&digits[start..]);
    let digest = sha.digest().bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Tag(u64::from_be_bytes(first))
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
