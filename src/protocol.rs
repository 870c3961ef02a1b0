//! The chat protocol: what a client may send, what the server sends back, and
//! the JSON that travels over Redis between instances.
//!
//! Everything that crosses a boundary is parsed here into a typed value, once.
//! The rest of the program never looks at raw JSON or raw path segments:
//!
//! * [`Nickname`] — a validated, percent-decoded nickname from `/chat/{nickname}`.
//! * [`ConnId`] — an identity for one WebSocket connection, unique across every
//!   instance sharing a Redis, used to suppress echo of a client's own messages.
//! * [`message_text`] — what a client's text frame means: the `"message"` of a
//!   JSON object (the original Python app's clients send
//!   `{"nickname": "alice", "message": "hi"}`), or the frame's text itself.
//! * [`ChatMessage`] — the payload published on the Redis channel. It is a
//!   superset of what the original app publishes, so the two interoperate.
//! * [`ServerFrame`] — every JSON text frame the server sends to a client.
//!
//! The wire formats are described for humans in `docs/PROTOCOL.md`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The Redis channel of the one chat room, as named by the original app.
pub const GLOBAL_ROOM: &str = "global_room";

/// The longest nickname accepted, in characters (Unicode scalar values).
pub const MAX_NICKNAME_CHARS: usize = 32;

/// A nickname that has passed validation.
///
/// Built only by [`Nickname::parse`], so holding one proves it is 1 to
/// [`MAX_NICKNAME_CHARS`] characters long, contains no control characters and
/// does not start or end with white space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nickname(String);

/// Why a nickname was refused. The `Display` text is sent to the client as the
/// body of the HTTP 400 answer, so it is written for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicknameError {
    /// The path segment is empty (`/chat/`).
    #[error("nickname is empty")]
    Empty,
    /// More than [`MAX_NICKNAME_CHARS`] characters.
    #[error("nickname is longer than {MAX_NICKNAME_CHARS} characters")]
    TooLong,
    /// A `%` not followed by two hex digits.
    #[error("nickname has a malformed percent-escape")]
    BadEscape,
    /// Percent-decoding produced bytes that are not UTF-8.
    #[error("nickname is not valid UTF-8 once percent-decoded")]
    NotUtf8,
    /// A control character (including newline and tab).
    #[error("nickname contains a control character")]
    ControlCharacter,
    /// Leading or trailing white space.
    #[error("nickname starts or ends with white space")]
    OuterWhitespace,
}

impl Nickname {
    /// Validates an already-decoded nickname.
    pub fn parse(raw: &str) -> Result<Nickname, NicknameError> {
        if raw.is_empty() {
            return Err(NicknameError::Empty);
        }
        if raw.chars().count() > MAX_NICKNAME_CHARS {
            return Err(NicknameError::TooLong);
        }
        if raw.chars().any(char::is_control) {
            return Err(NicknameError::ControlCharacter);
        }
        if raw.trim() != raw {
            return Err(NicknameError::OuterWhitespace);
        }
        Ok(Nickname(raw.to_owned()))
    }

    /// Percent-decodes a URL path segment (`Joe%20Doe` is "Joe Doe"), then
    /// validates it with [`Nickname::parse`].
    pub fn from_path_segment(segment: &str) -> Result<Nickname, NicknameError> {
        Nickname::parse(&percent_decode(segment)?)
    }

    /// The nickname as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Nickname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decodes `%XX` escapes. `+` is left alone: in a URL *path* it means plus.
fn percent_decode(segment: &str) -> Result<String, NicknameError> {
    fn hex(digit: u8) -> Option<u8> {
        (digit as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = bytes.get(i + 1).copied().and_then(hex);
            let low = bytes.get(i + 2).copied().and_then(hex);
            match (high, low) {
                (Some(h), Some(l)) => out.push(h << 4 | l),
                _ => return Err(NicknameError::BadEscape),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| NicknameError::NotUtf8)
}

/// The identity of one WebSocket connection, unique across all instances that
/// share a Redis: a random per-process instance id plus a per-process counter,
/// e.g. `3f9c2a71d0b4e856-17`.
///
/// Every published [`ChatMessage`] carries its sender's `ConnId`; a receiving
/// connection drops the message if the id is its own. Nicknames cannot do this
/// job: two people may both call themselves "carol", and each must see the
/// other's messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnId(String);

impl ConnId {
    /// Builds the id of connection number `seq` of the instance `instance`.
    pub fn new(instance: u64, seq: u64) -> ConnId {
        ConnId(format!("{instance:016x}-{seq}"))
    }

    /// The id as text, as it appears in the `"conn"` field on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Extracts the chat text from a client's text frame.
///
/// * A JSON object with a string `"message"` field: that string. Any
///   `"nickname"` the client put in the object is ignored — the server, never
///   the client, decides who is speaking.
/// * Anything else (plain words typed into websocat, JSON of another shape): the
///   frame's text itself.
///
/// One trailing line ending is removed first: websocat sends each typed line
/// with the `\n` of the Enter key, and the line should arrive as typed.
///
/// ```
/// use threadchat::protocol::message_text;
/// assert_eq!(message_text(r#"{"nickname":"mallory","message":"hi"}"#), "hi");
/// assert_eq!(message_text("hello there\n"), "hello there");
/// assert_eq!(message_text(r#"{"text":"hi"}"#), r#"{"text":"hi"}"#);
/// ```
pub fn message_text(frame: &str) -> std::borrow::Cow<'_, str> {
    /// Only the field we need; serde skips the rest without allocating it.
    #[derive(Deserialize)]
    struct ClientJson {
        message: String,
    }
    let frame = frame.strip_suffix('\n').unwrap_or(frame);
    let frame = frame.strip_suffix('\r').unwrap_or(frame);
    // Cheap pre-check so plain text never goes through the JSON parser.
    if frame.trim_start().starts_with('{')
        && let Ok(parsed) = serde_json::from_str::<ClientJson>(frame)
    {
        return std::borrow::Cow::Owned(parsed.message);
    }
    std::borrow::Cow::Borrowed(frame)
}

/// One chat message as published on the Redis channel.
///
/// `nickname` and `message` are what the original app's readers need. `conn`
/// and `ts` are threadchat's additions: payloads from the original app lack
/// them, so they are optional when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it (the sender connection's nickname).
    pub nickname: String,
    /// What they said.
    pub message: String,
    /// The sending connection, so it can skip its own message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn: Option<String>,
    /// When the sending server received it: milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

/// Why a payload found on the Redis channel is not a chat message.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not a JSON object with string `"nickname"` and `"message"` fields.
    #[error("not a chat message ({0})")]
    NotChatMessage(#[from] serde_json::Error),
}

impl ChatMessage {
    /// A message from connection `conn` named `nickname`, stamped now.
    pub fn new(nickname: &Nickname, conn: &ConnId, message: String) -> ChatMessage {
        ChatMessage {
            nickname: nickname.as_str().to_owned(),
            message,
            conn: Some(conn.as_str().to_owned()),
            ts: Some(unix_millis()),
        }
    }

    /// Parses a payload read from the Redis channel.
    pub fn from_payload(payload: &[u8]) -> Result<ChatMessage, PayloadError> {
        Ok(serde_json::from_slice(payload)?)
    }

    /// The JSON published on the Redis channel.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings and integers always serializes")
    }

    /// True when this message was sent by connection `me`.
    pub fn is_from(&self, me: &ConnId) -> bool {
        self.conn.as_deref() == Some(me.as_str())
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A JSON text frame sent by the server to a client.
///
/// Every variant has string `"nickname"` and `"message"` fields, so a client
/// written for the original app can print any frame it gets, and a `"type"`
/// field saying what the frame is.
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
    },
    /// News from the server about the room or the connection (e.g. the relay
    /// was lost and restored).
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

/// The nickname that server notices and errors carry.
pub const SERVER_NICKNAME: &str = "server";

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

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a frame of strings and integers always serializes")
    }
}

impl<'a> From<&'a ChatMessage> for ServerFrame<'a> {
    fn from(msg: &'a ChatMessage) -> Self {
        ServerFrame::Chat {
            nickname: &msg.nickname,
            message: &msg.message,
            ts: msg.ts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nickname_is_percent_decoded() {
        assert_eq!(
            Nickname::from_path_segment("Joe%20Doe").unwrap().as_str(),
            "Joe Doe"
        );
        assert_eq!(
            Nickname::from_path_segment("%C3%A9lodie").unwrap().as_str(),
            "élodie"
        );
        assert_eq!(Nickname::from_path_segment("a+b").unwrap().as_str(), "a+b");
    }

    #[test]
    fn nickname_rules() {
        use NicknameError::*;
        assert_eq!(Nickname::from_path_segment(""), Err(Empty));
        assert_eq!(Nickname::from_path_segment("%2"), Err(BadEscape));
        assert_eq!(Nickname::from_path_segment("%zz"), Err(BadEscape));
        assert_eq!(Nickname::from_path_segment("%FF"), Err(NotUtf8));
        assert_eq!(Nickname::from_path_segment("a%0Ab"), Err(ControlCharacter));
        assert_eq!(Nickname::from_path_segment("%20bob"), Err(OuterWhitespace));
        assert_eq!(Nickname::from_path_segment("bob%20"), Err(OuterWhitespace));
        assert_eq!(Nickname::parse(&"x".repeat(33)), Err(TooLong));
        assert!(Nickname::parse(&"é".repeat(32)).is_ok());
    }

    #[test]
    fn client_json_message_is_unwrapped() {
        assert_eq!(
            message_text(r#"{"nickname": "alice", "message": "hi"}"#),
            "hi"
        );
        assert_eq!(message_text(r#"  {"message": ""}"#), "");
    }

    #[test]
    fn one_line_ending_is_removed() {
        assert_eq!(message_text("hi\n"), "hi");
        assert_eq!(message_text("hi\r\n"), "hi");
        assert_eq!(message_text("hi\n\n"), "hi\n");
        assert_eq!(message_text("  indented  \n"), "  indented  ");
        assert_eq!(message_text("{\"message\": \"x\"}\n"), "x");
    }

    #[test]
    fn anything_else_is_the_text_itself() {
        for text in [
            "hello",
            "",
            "{not json",
            r#"{"message": 5}"#,
            r#"["message"]"#,
            "42",
            r#""quoted""#,
        ] {
            assert_eq!(message_text(text), text);
        }
    }

    #[test]
    fn chat_message_round_trips() {
        let nick = Nickname::parse("alice").unwrap();
        let conn = ConnId::new(0xabc, 7);
        let msg = ChatMessage::new(&nick, &conn, "hi \"there\"".into());
        let back = ChatMessage::from_payload(&msg.to_payload()).unwrap();
        assert_eq!(back, msg);
        assert!(back.is_from(&conn));
        assert!(!back.is_from(&ConnId::new(0xabc, 8)));
        assert_eq!(conn.as_str(), "0000000000000abc-7");
    }

    #[test]
    fn original_app_payloads_are_chat_messages() {
        let msg = ChatMessage::from_payload(br#"{"nickname": "bob", "message": "yo"}"#).unwrap();
        assert_eq!(msg.nickname, "bob");
        assert_eq!(msg.message, "yo");
        assert_eq!(msg.conn, None);
        assert!(!msg.is_from(&ConnId::new(1, 1)));
    }

    #[test]
    fn junk_payloads_are_errors() {
        for junk in [
            &b"junk"[..],
            b"",
            b"{}",
            br#"{"nickname": "bob"}"#,
            br#"{"nickname": 1, "message": "x"}"#,
            br#"[1,2]"#,
            b"\xff\xfe",
        ] {
            assert!(ChatMessage::from_payload(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn server_frames_keep_nickname_and_message() {
        let msg = ChatMessage {
            nickname: "bob".into(),
            message: "<b>hi</b>".into(),
            conn: Some("x".into()),
            ts: Some(5),
        };
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::from(&msg).to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "chat", "nickname": "bob", "message": "<b>hi</b>", "ts": 5})
        );
        let err = ServerFrame::error("nope");
        let json: serde_json::Value = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["nickname"], "server");
    }
}

/// Hostile input never panics: arbitrary input gives a value or an error.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn client_frames_never_panic(frame in any::<String>()) {
            let _ = message_text(&frame);
        }

        #[test]
        fn client_json_frames_never_panic(message in any::<String>(), extra in any::<String>()) {
            let frame = serde_json::json!({"message": message, "nickname": extra}).to_string();
            prop_assert_eq!(message_text(&frame), message);
        }

        #[test]
        fn redis_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ChatMessage::from_payload(&payload);
        }

        #[test]
        fn json_like_payloads_never_panic(payload in r#"\{("[a-z]{0,8}": ?("[^"]{0,8}"|[0-9]{1,5}|null|\[\]),? ?){0,4}\}"#) {
            let _ = ChatMessage::from_payload(payload.as_bytes());
        }

        #[test]
        fn path_segments_never_panic(segment in any::<String>()) {
            let _ = Nickname::from_path_segment(&segment);
        }

        #[test]
        fn percent_escapes_never_panic(segment in "(%[0-9a-fA-FzZ]{0,2}|[a-z ]){0,40}") {
            if let Ok(nickname) = Nickname::from_path_segment(&segment) {
                prop_assert!(Nickname::parse(nickname.as_str()).is_ok());
            }
        }

        #[test]
        fn chat_messages_round_trip(nickname in "[^\\p{Cc}]{1,32}", message in any::<String>()) {
            if let Ok(nickname) = Nickname::parse(&nickname) {
                let msg = ChatMessage::new(&nickname, &ConnId::new(7, 7), message);
                prop_assert_eq!(ChatMessage::from_payload(&msg.to_payload()).unwrap(), msg);
            }
        }
    }
}
