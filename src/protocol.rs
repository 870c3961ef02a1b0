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
//! * [`Incoming`] — a payload from the room, parsed and encoded once for all
//!   the clients it goes to.
//!
//! The wire formats are described for humans in `docs/PROTOCOL.md`.

use std::fmt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tungstenite::Utf8Bytes;

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

/// Why a nickname or room name was refused. The `Display` text completes a
/// sentence ("nickname is empty") sent to the client as the body of the
/// HTTP 400 answer, so it is written for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty (`/chat/`).
    #[error("is empty")]
    Empty,
    /// More than [`MAX_NICKNAME_CHARS`] characters.
    #[error("is longer than {MAX_NICKNAME_CHARS} characters")]
    TooLong,
    /// A `%` not followed by two hex digits.
    #[error("has a malformed percent-escape")]
    BadEscape,
    /// Percent-decoding produced bytes that are not UTF-8.
    #[error("is not valid UTF-8 once percent-decoded")]
    NotUtf8,
    /// A control character (including newline and tab).
    #[error("contains a control character")]
    ControlCharacter,
    /// Leading or trailing white space.
    #[error("starts or ends with white space")]
    OuterWhitespace,
    /// An invisible or look-alike character: a Unicode format character
    /// (zero-width space, bidi override, …), white space other than the
    /// plain space, or a blank-looking filler.
    #[error("contains an invisible or look-alike character (U+{0:04X})")]
    Invisible(u32),
    /// A name the server uses for its own frames.
    #[error("is reserved for the server")]
    Reserved,
}

/// The rule nicknames and room names share: 1 to [`MAX_NICKNAME_CHARS`]
/// characters, no control characters, no invisible characters (see
/// [`is_invisible`]), no white space at either end.
fn validate_name(raw: &str) -> Result<(), NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.chars().count() > MAX_NICKNAME_CHARS {
        return Err(NameError::TooLong);
    }
    if raw.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    if let Some(c) = raw.chars().find(|&c| is_invisible(c)) {
        return Err(NameError::Invisible(c.into()));
    }
    if raw.trim() != raw {
        return Err(NameError::OuterWhitespace);
    }
    Ok(())
}

/// Characters a name may not contain because they cannot be seen, or make
/// one name look like another: `alice` followed by a zero-width space is
/// not `alice`, yet reads the same; a right-to-left override turns
/// `evil\u{202E}txt.exe` around on screen.
///
/// * Unicode *format* characters (general category Cf): zero-width
///   spaces and joiners, bidi embeddings, overrides and isolates, the
///   byte-order mark, invisible operators, tags.
/// * White space other than the plain space (no-break, ideographic,
///   line and paragraph separators): it looks like a space and is not one.
/// * Blank-looking fillers (Hangul fillers, the Braille blank).
/// * Variation selectors, which change a glyph without being one.
pub fn is_invisible(c: char) -> bool {
    (c != ' ' && c.is_whitespace())
        || matches!(c,
            '\u{00AD}' // soft hyphen
            | '\u{034F}' // combining grapheme joiner
            | '\u{061C}' // Arabic letter mark
            | '\u{0600}'..='\u{0605}'
            | '\u{06DD}' | '\u{070F}' | '\u{0890}' | '\u{0891}' | '\u{08E2}'
            | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' // Hangul fillers
            | '\u{17B4}' | '\u{17B5}' // Khmer inherent vowels
            | '\u{180B}'..='\u{180F}' // Mongolian selectors and vowel separator
            | '\u{200B}'..='\u{200F}' // zero-width space, joiners, LRM, RLM
            | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{206F}' // word joiner, invisible operators, isolates
            | '\u{2800}' // Braille blank
            | '\u{FE00}'..='\u{FE0F}' // variation selectors
            | '\u{FEFF}' // byte-order mark
            | '\u{FFF9}'..='\u{FFFB}' // interlinear annotation
            | '\u{110BD}' | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}' // tags and variation selectors supplement
        )
}

impl Nickname {
    /// Validates an already-decoded nickname. Besides the shared rule, the
    /// server's own name ([`SERVER_NICKNAME`], in any case) is refused: a
    /// client called `server` could pass its words off as the server's.
    pub fn parse(raw: &str) -> Result<Nickname, NameError> {
        Nickname::check(raw)?;
        Ok(Nickname(raw.to_owned()))
    }

    /// Whether `raw` is a valid nickname, without making one (no
    /// allocation: it runs on every subscriber thread for the names in
    /// every coalesced join).
    pub fn check(raw: &str) -> Result<(), NameError> {
        validate_name(raw)?;
        if raw.eq_ignore_ascii_case(SERVER_NICKNAME) {
            return Err(NameError::Reserved);
        }
        Ok(())
    }

    /// Percent-decodes a URL path segment (`Joe%20Doe` is "Joe Doe"), then
    /// validates it with [`Nickname::parse`].
    pub fn from_path_segment(segment: &str) -> Result<Nickname, NameError> {
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

/// Decodes `%XX` escapes in a URL path segment (a `+` stays a plus).
///
/// `percent-encoding` decodes; what it would pass through silently, a `%`
/// not followed by two hex digits, is refused here, so that a mistyped URL
/// gets a clear error rather than a nickname with a `%` in it.
pub fn percent_decode(segment: &str) -> Result<String, NameError> {
    check_escapes(segment)?;
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| NameError::NotUtf8)
}

/// The decoded value of `key` in a query string (`a=1&b=x+y%21`), if it is
/// there: `form_urlencoded` splits and decodes, `+` is a space.
pub fn query_value(query: &str, key: &str) -> Result<Option<String>, NameError> {
    check_escapes(query)?;
    let Some((_, value)) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == key) else {
        return Ok(None);
    };
    // `form_urlencoded` replaces bytes that are not UTF-8 with U+FFFD.
    if value.contains(char::REPLACEMENT_CHARACTER) {
        return Err(NameError::NotUtf8);
    }
    Ok(Some(value.into_owned()))
}

/// Refuses a `%` that is not followed by two hex digits.
fn check_escapes(text: &str) -> Result<(), NameError> {
    let bytes = text.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if well_formed {
        Ok(())
    } else {
        Err(NameError::BadEscape)
    }
}

/// A chat room: the default room of the original app, or a named one.
///
/// Each room is its own Redis channel. The default room is the original's
/// channel `global_room`; a named room `lobby` is `threadchat:room:lobby`, so
/// room names can never collide with other keys or channels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Room(String);

impl Room {
    /// The name of the default room, and its channel (as in the original).
    pub const DEFAULT: &'static str = GLOBAL_ROOM;

    /// The original app's single room.
    pub fn global() -> Room {
        Room(GLOBAL_ROOM.to_owned())
    }

    /// Validates a decoded room name (the same rule as nicknames).
    pub fn parse(raw: &str) -> Result<Room, NameError> {
        validate_name(raw)?;
        Ok(Room(raw.to_owned()))
    }

    /// The room's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The Redis channel its messages travel on.
    pub fn channel(&self) -> String {
        if self.0 == GLOBAL_ROOM {
            GLOBAL_ROOM.to_owned()
        } else {
            format!("threadchat:room:{}", self.0)
        }
    }

    /// The Redis key of its message history.
    pub fn history_key(&self) -> String {
        format!("threadchat:history:{}", self.0)
    }

    /// The Redis key of its history's size in bytes (kept beside the list,
    /// so that the history can be bounded in bytes without reading it).
    pub fn history_bytes_key(&self) -> String {
        format!("threadchat:history-bytes:{}", self.0)
    }

    /// The Redis key of its member list.
    pub fn members_key(&self) -> String {
        format!("threadchat:members:{}", self.0)
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How frames are written to a client: JSON (the default, and the
/// original's) or plain lines for people in a terminal (`?format=text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One JSON object per frame.
    #[default]
    Json,
    /// One line of text per frame: `bob: hello`, `* carol joined`.
    Text,
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

    /// The instance part of a connection id as found on the wire (the text
    /// before the last `-`), if it has one.
    pub fn instance_of(conn: &str) -> Option<&str> {
        conn.rsplit_once('-').map(|(instance, _)| instance)
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
/// ```
/// use threadchat::protocol::{clean_message, MessageError};
/// assert_eq!(clean_message("two\r\nlines").unwrap(), "two\nlines");
/// assert_eq!(clean_message("\x1b[2J"), Err(MessageError::ControlCharacter(0x1b)));
/// ```
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

/// What happens in a room, as published on its Redis channel: a chat
/// message, or someone joining or leaving.
///
/// `nickname` and `message` are what the original app's readers need (they
/// forward any payload whose nickname is not their client's own). The other
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
    /// When the sending server received it: milliseconds since the Unix epoch.
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
}

/// Most nicknames a coalesced join or leave lists.
///
/// Every member of a room gets every announcement — with per-client
/// subscriptions each parses its own copy — and during a join storm an
/// announcement used to list hundreds of names. Parsing and passing them on
/// was most of what a storm cost: with 5,000 clients joining at once,
/// per-client subscriptions took 6.0–6.4 s and 67–73 KiB per client with
/// full lists, 4.5–5.5 s and 53 KiB with at most 20 (a shared subscription:
/// 31–32 KiB, now 27–28). A person reads "alice, bob and 198 others"
/// anyway; `count` keeps member counts right, and `GET /members` lists
/// everyone.
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
/// plausible nickname; lists are cut to what the server itself sends.
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
    /// The nickname is empty, too long, or has control characters.
    #[error("implausible nickname")]
    BadNickname,
}

/// The longest `"nickname"` accepted in a payload, in characters: a
/// nickname, or the summary of a coalesced join ("alice, bob and 48
/// others").
const MAX_PAYLOAD_NICKNAME_CHARS: usize = 2 * MAX_NICKNAME_CHARS + 32;

/// The largest payload accepted from a room's channel, for clients whose
/// messages may be `max_message` bytes: what threadchat itself publishes
/// for such a message (JSON escaping at most doubles the text, see
/// [`clean_message`]) and its other fields. Anything bigger is skipped
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
        let nickname = &message.nickname;
        if nickname.is_empty()
            || nickname.chars().count() > MAX_PAYLOAD_NICKNAME_CHARS
            || nickname.chars().any(|c| c.is_control() || is_invisible(c))
        {
            return Err(PayloadError::BadNickname);
        }
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

    /// True when this message was sent by connection `me`. (A coalesced
    /// join has no `conn`: its joiners skip it by [`id`](Self::id).)
    pub fn is_from(&self, me: &ConnId) -> bool {
        self.conn.as_deref() == Some(me.as_str())
    }
}

/// "alice", "alice and bob", "alice, bob and carol", "alice, bob and 48 others".
fn summarize(nicknames: &[String]) -> String {
    match nicknames {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [a, b, c] => format!("{a}, {b} and {c}"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} others", rest.len()),
    }
}

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
    pub fn oversized(len: usize) -> Incoming {
        Incoming {
            message: Err(Junk {
                error: PayloadError::TooBig(len),
                payload: Vec::new(),
            }),
            json: OnceLock::new(),
            text: OnceLock::new(),
        }
    }

    /// Parses a payload read from a room's channel.
    pub fn parse(payload: &[u8]) -> Incoming {
        Incoming {
            message: ChatMessage::from_payload(payload).map_err(|error| Junk {
                error,
                payload: payload.to_vec(),
            }),
            json: OnceLock::new(),
            text: OnceLock::new(),
        }
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
                ServerFrame::from_event(message, false)
                    .render(format)
                    .into()
            })
            .clone(),
        )
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        /// True for messages from the room's history, sent at join.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        history: bool,
    },
    /// Someone (or, coalesced, several people) joined the room.
    Join {
        /// Who (a summary when several).
        nickname: &'a str,
        /// Always "joined".
        message: &'a str,
        /// When (ms since the Unix epoch).
        #[serde(skip_serializing_if = "Option::is_none")]
        ts: Option<u64>,
        /// When several joined at once: who (at most [`GROUP_LIST`]).
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        nicknames: &'a [String],
        /// When several joined at once: how many.
        #[serde(skip_serializing_if = "Option::is_none")]
        count: Option<usize>,
    },
    /// Someone (or, coalesced, several people) left the room.
    Leave {
        /// Who (a summary when several).
        nickname: &'a str,
        /// "left", with the reason in parentheses when it was not their
        /// choice (for one person).
        message: &'a str,
        /// When (ms since the Unix epoch).
        #[serde(skip_serializing_if = "Option::is_none")]
        ts: Option<u64>,
        /// When several left at once: who (at most [`GROUP_LIST`]).
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        nicknames: &'a [String],
        /// When several left at once: how many.
        #[serde(skip_serializing_if = "Option::is_none")]
        count: Option<usize>,
    },
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

/// Most nicknames listed in a presence frame.
pub const PRESENCE_LIST: usize = 100;

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

    /// The frame for a room event; `history` marks replayed chat messages.
    pub fn from_event(event: &'a ChatMessage, history: bool) -> ServerFrame<'a> {
        let (nickname, message, ts) = (event.nickname.as_str(), event.message.as_str(), event.ts);
        let (nicknames, count) = (event.nicknames.as_slice(), event.count);
        match event.kind {
            Kind::Join => ServerFrame::Join {
                nickname,
                message,
                ts,
                nicknames,
                count,
            },
            Kind::Leave => ServerFrame::Leave {
                nickname,
                message,
                ts,
                nicknames,
                count,
            },
            // `Other` never gets this far (`from_payload` refuses it).
            Kind::Chat | Kind::Other => ServerFrame::Chat {
                nickname,
                message,
                ts,
                history,
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
                history: false,
                ..
            } => format!("{nickname}: {message}"),
            ServerFrame::Chat {
                nickname, message, ..
            } => format!("[history] {nickname}: {message}"),
            ServerFrame::Join {
                nickname, message, ..
            }
            | ServerFrame::Leave {
                nickname, message, ..
            } => format!("* {nickname} {message}"),
            ServerFrame::Presence { message, .. } | ServerFrame::Notice { message, .. } => {
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
        use NameError::*;
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
        let msg = ChatMessage::new(&nick, &conn, 1, "hi \"there\"".into());
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
    fn events_and_unknown_types() {
        let nick = Nickname::parse("carol").unwrap();
        let join = ChatMessage::event(Kind::Join, &nick, &ConnId::new(1, 2), "joined");
        let payload = String::from_utf8(join.to_payload()).unwrap();
        assert!(payload.contains(r#""type":"join""#), "{payload}");
        assert_eq!(
            ServerFrame::from_event(&join, false).to_text(),
            "* carol joined"
        );
        assert!(matches!(
            ChatMessage::from_payload(br#"{"type":"poll","nickname":"x","message":"y"}"#),
            Err(PayloadError::UnknownType)
        ));
    }

    #[test]
    fn rooms_have_their_own_channels() {
        assert_eq!(Room::global().channel(), "global_room");
        assert_eq!(Room::parse("global_room").unwrap(), Room::global());
        assert_eq!(
            Room::parse("lobby").unwrap().channel(),
            "threadchat:room:lobby"
        );
        assert!(Room::parse(" lobby").is_err());
        assert_eq!(percent_decode("a+b%20c").unwrap(), "a+b c");
        let query = "format=text&room=a+b%20c";
        assert_eq!(
            query_value(query, "room").unwrap().as_deref(),
            Some("a b c")
        );
        assert_eq!(query_value(query, "limit").unwrap(), None);
        assert_eq!(query_value("room=%zz", "room"), Err(NameError::BadEscape));
        assert_eq!(query_value("room=%FF", "room"), Err(NameError::NotUtf8));
    }

    #[test]
    fn text_rendering() {
        let members = vec!["alice".to_owned(), "bob".to_owned()];
        let presence = ServerFrame::Presence {
            nickname: SERVER_NICKNAME,
            message: "in lobby: alice, bob",
            room: "lobby",
            members: &members,
            count: 2,
        };
        assert_eq!(presence.to_text(), "* in lobby: alice, bob");
        assert_eq!(ServerFrame::error("no").to_text(), "! no");
        let json: serde_json::Value = serde_json::from_str(&presence.to_json()).unwrap();
        assert_eq!(json["members"], serde_json::json!(["alice", "bob"]));
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
    fn coalesced_joins_summarise_and_list_everyone() {
        let names: Vec<Nickname> = ["ann", "bea", "cy", "dan"]
            .iter()
            .map(|n| Nickname::parse(n).unwrap())
            .collect();
        let names: Vec<String> = names.iter().map(|n| n.as_str().to_owned()).collect();
        let event = ChatMessage::group_event(Kind::Join, names, &ConnId::new(7, 0));
        assert_eq!(event.nickname, "ann, bea and 2 others");
        assert_eq!(event.message, "joined");
        assert_eq!(event.id.as_deref(), Some("0000000000000007-0:join"));
        assert!(!event.is_from(&ConnId::new(7, 0)));
        let frame = ServerFrame::from_event(&event, false);
        assert_eq!(frame.to_text(), "* ann, bea and 2 others joined");
        let json: serde_json::Value = serde_json::from_str(&frame.to_json()).unwrap();
        assert_eq!(
            json["nicknames"],
            serde_json::json!(["ann", "bea", "cy", "dan"])
        );
        assert_eq!(json["count"], 4);
        // A payload round trip keeps the lists.
        let back = ChatMessage::from_payload(&event.to_payload()).unwrap();
        assert_eq!(back, event);
        assert_eq!(summarize(&["a".into(), "b".into()]), "a and b");
    }

    #[test]
    fn a_storm_of_joins_lists_some_and_counts_all() {
        let names: Vec<String> = (0..30).map(|i| format!("n{i}")).collect();
        let event = ChatMessage::group_event(Kind::Join, names, &ConnId::new(7, 0));
        assert_eq!(event.nickname, "n0, n1 and 28 others");
        assert_eq!(event.nicknames.len(), GROUP_LIST);
        assert_eq!(event.count, Some(30));
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::from_event(&event, false).to_json()).unwrap();
        assert_eq!(json["count"], 30);
        assert_eq!(json["nicknames"].as_array().unwrap().len(), GROUP_LIST);
    }

    #[test]
    fn server_frames_keep_nickname_and_message() {
        let msg = ChatMessage {
            kind: Kind::Chat,
            nickname: "bob".into(),
            message: "<b>hi</b>".into(),
            conn: Some("x".into()),
            id: Some("x:1".into()),
            ts: Some(5),
            nicknames: Vec::new(),
            count: None,
        };
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::from_event(&msg, false).to_json()).unwrap();
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
                let msg = ChatMessage::new(&nickname, &ConnId::new(7, 7), 1, message);
                prop_assert_eq!(ChatMessage::from_payload(&msg.to_payload()).unwrap(), msg);
            }
        }
    }
}
