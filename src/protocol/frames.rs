//! What the server sends a client: [`ServerFrame`]s, as JSON or (for
//! `?format=text`) as one line of text each.

use serde::Serialize;

use super::names::{SERVER_NICKNAME, is_invisible};
use super::payload::{ChatMessage, Kind};
use super::request::Format;

/// At most `max` bytes of `s`, cut at a character boundary: a close
/// frame's reason must fit in a 125-byte control frame, and a log line in
/// its width.
pub fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Makes text safe to show as one line in a terminal (`?format=text`):
/// a newline becomes `↵`, so a multi-line message stays visibly one message
/// and cannot forge lines of its own (`\n* alice left`); other control
/// characters become their visible Unicode pictures (ESC is `␛`), so no
/// escape sequence reaches the terminal; invisible and bidi characters
/// are shown as `<U+202E>`. Tab stays a tab.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c != '\t' && (c.is_control() || is_invisible(c) && c != ' ');
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            '\n' => out.push('↵'),
            '\u{0}'..='\u{1f}' => {
                out.push(char::from_u32(0x2400 + u32::from(c)).unwrap_or('\u{FFFD}'))
            }
            '\u{7f}' => out.push('␡'),
            c if needs(c) => out.push_str(&format!("<U+{:04X}>", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether a frame is live or sent again: from the history a joiner gets,
/// or recovered for a client that reconnected (`?since=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Happening now.
    Live,
    /// From the room's history, sent at join.
    History,
    /// Missed while disconnected, sent at reconnect.
    Recovered,
}

/// A frame sent by the server to a client.
///
/// Every variant has string `"nickname"` and `"message"` fields, so a client
/// written for the original app can print any frame it gets, and a `"type"`
/// field saying what the frame is. [`ServerFrame::render`] writes it as JSON
/// or, for `?format=text`, as one line for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// Someone else said something.
    Chat {
        /// Who said it.
        nickname: &'a str,
        /// What they said.
        message: &'a str,
        /// When their server received it (ms since the Unix epoch), if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        ts: Option<u64>,
        /// Where it is in the room's log (absent for a payload published by
        /// something other than threadchat, e.g. the original app).
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// The log's epoch, with `offset`.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// True for messages from the room's history, sent at join.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        history: bool,
        /// True for messages a reconnecting client missed, sent again.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        recovered: bool,
    },
    /// Someone (or, coalesced, several people) joined the room.
    Join(MemberEvent<'a>),
    /// Someone (or, coalesced, several people) left the room.
    Leave(MemberEvent<'a>),
    /// Who is in the room (sent once, right after joining).
    Presence {
        /// Always `"server"`.
        nickname: &'a str,
        /// The list, for a person.
        message: &'a str,
        /// The room.
        room: &'a str,
        /// Nicknames (one per connection, sorted): everyone's, or in a big
        /// room the first [`PRESENCE_LIST`] or so (`GET /members` lists all).
        members: &'a [String],
        /// How many connections are in the room.
        count: usize,
        /// The point of the room's log this list reflects: a join or leave
        /// at or before it is already counted here.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// The log's epoch, with `offset`.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
    },
    /// Sent to a client that connected with `?since=…&epoch=…`, after what
    /// it missed: whether that was everything.
    Recovery {
        /// Always `"server"`.
        nickname: &'a str,
        /// What happened, for a person.
        message: &'a str,
        /// True when every message after `since` was sent again; false
        /// when the log no longer reaches back that far or was reset (the
        /// latest history was sent instead).
        complete: bool,
        /// Where the room's log stands now, if it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// The log's epoch, with `offset`.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
    },
    /// News from the server about the connection (e.g. the relay was lost
    /// and restored).
    Notice {
        /// Always `"server"`.
        nickname: &'a str,
        /// The news, for a person.
        message: &'a str,
    },
    /// Something went wrong with what this client did (the connection stays open).
    Error {
        /// Always `"server"`.
        nickname: &'a str,
        /// What went wrong, for a person.
        message: &'a str,
    },
}

/// A join or a leave: what [`ServerFrame::Join`] and [`ServerFrame::Leave`]
/// carry, besides their `"type"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberEvent<'a> {
    /// Who (a summary when several).
    pub nickname: &'a str,
    /// "joined"; or "left", with the reason in parentheses when it was not
    /// their choice (for one person).
    pub message: &'a str,
    /// When (ms since the Unix epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// When several joined or left at once: who (at most
    /// [`GROUP_LIST`](super::payload::GROUP_LIST)).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub nicknames: &'a [String],
    /// When several joined or left at once: how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Where it is in the room's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The log's epoch, with `offset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<&'a str>,
    /// True for an event a reconnecting client missed, sent again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

/// Most nicknames listed in a presence frame.
pub const PRESENCE_LIST: usize = 100;

impl<'a> ServerFrame<'a> {
    /// A notice from the server.
    pub fn notice(message: &'a str) -> ServerFrame<'a> {
        ServerFrame::Notice {
            nickname: SERVER_NICKNAME,
            message,
        }
    }

    /// An error about what the client did.
    pub fn error(message: &'a str) -> ServerFrame<'a> {
        ServerFrame::Error {
            nickname: SERVER_NICKNAME,
            message,
        }
    }

    /// The frame for a room event; `history` marks replayed chat messages.
    pub fn from_event(event: &'a ChatMessage, replay: Replay) -> ServerFrame<'a> {
        let (nickname, message, ts) = (event.nickname.as_str(), event.message.as_str(), event.ts);
        let (nicknames, count) = (event.nicknames.as_slice(), event.count);
        let at = event.at();
        let recovered = replay == Replay::Recovered;
        let member_event = || MemberEvent {
            nickname,
            message,
            ts,
            nicknames,
            count,
            offset: at.map(|at| at.offset),
            epoch: at.map(|at| at.epoch),
            recovered,
        };
        match event.kind {
            Kind::Join => ServerFrame::Join(member_event()),
            Kind::Leave => ServerFrame::Leave(member_event()),
            // `Other` never gets this far (`from_payload` refuses it).
            Kind::Chat | Kind::Other => ServerFrame::Chat {
                nickname,
                message,
                ts,
                offset: at.map(|at| at.offset),
                epoch: at.map(|at| at.epoch),
                history: replay == Replay::History,
                recovered,
            },
        }
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a frame of strings and integers always serializes")
    }

    /// The frame as exactly one line for a person (`?format=text`), with
    /// line breaks and control characters shown, never sent raw (see
    /// [`one_line`]).
    pub fn to_text(&self) -> String {
        let line = self.text_line();
        match one_line(&line) {
            std::borrow::Cow::Borrowed(_) => line,
            std::borrow::Cow::Owned(escaped) => escaped,
        }
    }

    fn text_line(&self) -> String {
        match self {
            ServerFrame::Chat {
                nickname,
                message,
                history: true,
                ..
            } => format!("[history] {nickname}: {message}"),
            ServerFrame::Chat {
                nickname,
                message,
                recovered: true,
                ..
            } => format!("[recovered] {nickname}: {message}"),
            ServerFrame::Chat {
                nickname, message, ..
            } => format!("{nickname}: {message}"),
            ServerFrame::Join(event) | ServerFrame::Leave(event) => {
                let tag = if event.recovered { "[recovered] " } else { "" };
                format!("{tag}* {} {}", event.nickname, event.message)
            }
            ServerFrame::Presence { message, .. }
            | ServerFrame::Notice { message, .. }
            | ServerFrame::Recovery { message, .. } => {
                format!("* {message}")
            }
            ServerFrame::Error { message, .. } => format!("! {message}"),
        }
    }

    /// The frame in the client's format.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => self.to_json(),
            Format::Text => self.to_text(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    /// Never inside a character: a close reason must stay UTF-8.
    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate(&"é".repeat(100), 123), "é".repeat(61));
        assert_eq!(truncate("abc", 0), "");
    }
}
