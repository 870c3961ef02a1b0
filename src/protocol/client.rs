//! What a client's text frame says, and what of it may be published.

use serde::Deserialize;

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
/// `{"nickname":"mallory","message":"hi"}` is "hi"; `hello there\n` is
/// "hello there"; `{"text":"hi"}` is itself (see the tests).
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

/// The token in a client's `{"type": "token", "token": "…"}` frame (a
/// fresh token, sent before the one it connected with expires), if the
/// frame is one.
pub fn token_refresh(frame: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct TokenFrame {
        #[serde(rename = "type")]
        kind: String,
        token: String,
    }
    // Cheap pre-check so chat messages never go through this parser.
    if !frame.trim_start().starts_with('{') || !frame.contains("\"token\"") {
        return None;
    }
    serde_json::from_str::<TokenFrame>(frame)
        .ok()
        .filter(|f| f.kind == "token")
        .map(|f| f.token)
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
