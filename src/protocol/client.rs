//! What a client's text frame says, and what of it may be published.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// What a client's text frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    /// Something to say to the room, not checked yet (see [`clean_message`]).
    ///
    /// * A JSON object with a string `"message"` field: that string. Any
    ///   `"nickname"` the client put in the object is ignored — the server,
    ///   never the client, decides who is speaking.
    /// * Anything else (plain words typed into websocat, JSON of another
    ///   shape): the frame's text itself.
    ///
    /// One trailing line ending is removed first: websocat sends each typed
    /// line with the `\n` of the Enter key, and the line should arrive as
    /// typed.
    ///
    /// `{"nickname":"mallory","message":"hi"}` is "hi"; `hello there\n` is
    /// "hello there"; `{"text":"hi"}` is itself (see the tests).
    Chat(Cow<'a, str>),
    /// A fresh token, sent before the one it connected with expires:
    /// `{"type": "token", "token": "…"}`. Only where tokens are read:
    /// elsewhere that text is a chat message like any other.
    TokenRefresh(String),
}

impl<'a> ClientFrame<'a> {
    /// Reads a client's text frame; `tokens` says whether this server reads
    /// token frames.
    pub fn parse(frame: &'a str, tokens: bool) -> ClientFrame<'a> {
        let frame = frame.strip_suffix('\n').unwrap_or(frame);
        let frame = frame.strip_suffix('\r').unwrap_or(frame);
        // Cheap pre-check so plain text never goes through the JSON parser.
        if frame.trim_start().starts_with('{')
            && let Ok(json) = serde_json::from_str::<ClientJson>(frame)
        {
            if tokens
                && let (Field::One(Some(kind)), Field::One(Some(token))) = (&json.kind, json.token)
                && kind == "token"
            {
                return ClientFrame::TokenRefresh(token);
            }
            if let Field::One(Some(message)) = json.message {
                return ClientFrame::Chat(Cow::Owned(message));
            }
        }
        ClientFrame::Chat(Cow::Borrowed(frame))
    }
}

/// The fields of a client's JSON frame that mean something; serde skips the
/// rest without allocating it.
#[derive(Default)]
struct ClientJson {
    kind: Field,
    token: Field,
    message: Field,
}

/// One field of [`ClientJson`]. A field counts only when it appears once,
/// as a string: `{"message": 5}` is a frame's text, not a message, and a
/// frame that says `"message"` twice says nothing as a message (but may
/// still be a token frame).
#[derive(Default)]
enum Field {
    /// Not there.
    #[default]
    Absent,
    /// Once: the string, or `None` for a value of another type.
    One(Option<String>),
    /// More than once.
    Repeated,
}

impl<'de> Deserialize<'de> for ClientJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ClientJsonVisitor)
    }
}

struct ClientJsonVisitor;

impl<'de> Visitor<'de> for ClientJsonVisitor {
    type Value = ClientJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ClientJson, A::Error> {
        let mut json = ClientJson::default();
        while let Some(key) = map.next_key::<Key>()? {
            let field = match key {
                Key::Type => &mut json.kind,
                Key::Token => &mut json.token,
                Key::Message => &mut json.message,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let value = match map.next_value::<StringOrOther>()? {
                StringOrOther::String(text) => Some(text),
                StringOrOther::Other(_) => None,
            };
            *field = match field {
                Field::Absent => Field::One(value),
                _ => Field::Repeated,
            };
        }
        Ok(json)
    }
}

/// A key of a client's JSON frame (read without allocating it).
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Type,
    Token,
    Message,
    #[serde(other)]
    Other,
}

/// A JSON value: a string, or of another type (skipped).
#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrOther {
    String(String),
    Other(IgnoredAny),
}

/// Why a client's chat message was refused (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A control character other than newline and tab: it has no place in
    /// chat text, would drive the terminals of `?format=text` readers
    /// (escape sequences) and costs six bytes a piece once JSON-escaped.
    #[error(
        "your message contains a control character (U+{0:04X}) and was not delivered; \
         only newline and tab are allowed"
    )]
    ControlCharacter(u32),
}

/// Checks the text of a client's message and gives it its stored form.
///
/// * `\r\n` and a lone `\r` become `\n`: a line break is a line break,
///   however the client's system spells it.
/// * Newline and tab are allowed; any other control character (C0, DEL,
///   C1) refuses the message. So the stored form is at most twice the text
///   (JSON escapes `"`, `\\` and newline with two bytes), never six times.
///
/// `two\r\nlines` is "two\nlines"; `\x1b[2J` (clear the screen) is refused.
pub fn clean_message(text: &str) -> Result<std::borrow::Cow<'_, str>, MessageError> {
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
    {
        return Err(MessageError::ControlCharacter(c.into()));
    }
    if !text.contains('\r') {
        return Ok(std::borrow::Cow::Borrowed(text));
    }
    Ok(std::borrow::Cow::Owned(
        text.replace("\r\n", "\n").replace('\r', "\n"),
    ))
}
