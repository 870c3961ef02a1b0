//! Names that come from a URL: nicknames and rooms (validated and
//! percent-decoded once), and the connection ids that tell clients apart.
//!
//! **Nicknames people cannot mistake.** A nickname is shown to others, so
//! besides being one visible line it may not pass for the server: not
//! `server` (nor a look-alike), starting with a letter or digit so as
//! never to start like a server line of the text format, not containing
//! the `": "` that ends a name in a chat line (see [`forges_a_line`]). With `--unique-nicknames` two names are the
//! same name when they read the same ([`readings`]), and a name that mixes
//! scripts ([`mixes_scripts`]) is refused.

use std::fmt;

use unicode_normalization::UnicodeNormalization;
use unicode_security::MixedScript;
use unicode_security::mixed_script::AugmentedScriptSet;

/// The nickname that server notices and errors carry.
pub const SERVER_NICKNAME: &str = "server";

/// The Redis channel of the one chat room, as named by the original app.
pub const GLOBAL_ROOM: &str = "global_room";

/// The longest nickname accepted, in characters (Unicode scalar values).
pub const MAX_NICKNAME_CHARS: usize = 32;

/// The longest summary nickname of a coalesced join or leave accepted from
/// a payload, in characters: three names ("alice, bob and carol") or two
/// and a count ("alice, bob and 48 others").
pub const MAX_SUMMARY_CHARS: usize = 3 * MAX_NICKNAME_CHARS + 32;

/// What the text format (`?format=text`) starts the server's own lines
/// with: `* ` (joins, leaves, notices, presence), `! ` (errors), `[`
/// (`[history]`, `[recovered]`). A nickname starts with a letter or digit
/// that does not read as one of these, so that a chat line (`name: text`)
/// never starts as a server line does.
pub const SERVER_LINE_LEADS: [char; 3] = ['*', '!', '['];

/// What ends the nickname in a chat line of the text format (`bob: hi`);
/// a nickname may not contain it, so the first one in a line is the end of
/// the name.
pub const NAME_SEPARATOR: &str = ": ";

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
    /// A name the server uses for its own frames (or a look-alike).
    #[error("is reserved for the server")]
    Reserved,
    /// Does not start with a letter or digit, or starts with one that
    /// reads as a server line's mark: it could pass for a server line.
    #[error(
        "starts with {0:?}: a nickname starts with a letter or digit, so that it never looks \
         like the server's own lines (which start with `*`, `!` or `[`)"
    )]
    ServerLine(char),
    /// Contains the `": "` that ends a name in a chat line.
    #[error("contains \": \", which ends a name in a chat line")]
    Separator,
    /// A coalesced join's summary that does not start with its first name.
    #[error("does not start with the first name it summarises")]
    NotASummary,
    /// Mixes scripts, as look-alikes do (Latin `a` beside Cyrillic `а`);
    /// refused with `--unique-nicknames`.
    #[error(
        "mixes letters of different scripts (such as Latin and Cyrillic), as look-alike names do"
    )]
    MixedScripts,
}

/// The rule nicknames and room names share: 1 to `max` characters
/// ([`MAX_NICKNAME_CHARS`] but for a summary), no control characters, no
/// invisible characters (see [`is_invisible`]), no white space at either
/// end.
fn validate_name(raw: &str, max: usize) -> Result<(), NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.chars().count() > max {
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

/// Whether a nickname would pass for the server: refused if it does not
/// start with a letter or digit (Unicode alphanumeric), if it is
/// [`SERVER_NICKNAME`] (also once its accents are dropped: `SERVEŔ`), if
/// it contains [`NAME_SEPARATOR`], or if one of its [`readings`] starts
/// with one of [`SERVER_LINE_LEADS`] or is (with its accents dropped)
/// `server`: `ｓｅｒｖｅｒ`, `ѕerver`, `ꜱᴇʀᴠᴇʀ`, `serveṙ` are refused
/// too.
///
/// This is the smallest rule that makes every server line of the text
/// format unforgeable: a chat line is `name: text` (or `[history] name:
/// text`), a server line starts with `*`, `!` or `[`; with a name that
/// cannot start so, nor hold `": "`, the first characters of a line say
/// who wrote it. A letter or digit first, rather than "not `*`, `!` or
/// `[`": there are hundreds of symbols that look like one of them (`✱`,
/// `❗`, `⁅`, `〔`, `⟦`) and no list of them to trust; so no nickname
/// starts with punctuation, a symbol or an emoji (`_bob` neither).
pub fn forges_a_line(raw: &str) -> Result<(), NameError> {
    if let Some(first) = raw.chars().next()
        && !first.is_alphanumeric()
    {
        return Err(NameError::ServerLine(first));
    }
    let check = |name: &str| {
        if name.eq_ignore_ascii_case(SERVER_NICKNAME) {
            return Err(NameError::Reserved);
        }
        if let Some(lead) = name
            .chars()
            .next()
            .filter(|c| SERVER_LINE_LEADS.contains(c))
        {
            return Err(NameError::ServerLine(lead));
        }
        if name.contains(NAME_SEPARATOR) {
            return Err(NameError::Separator);
        }
        Ok(())
    };
    check(raw)?;
    // ASCII reads as itself where it matters (see the tests), so only
    // other text is read again.
    if !raw.is_ascii() {
        for reading in readings(raw) {
            check(&reading).map_err(|e| match e {
                // Name the character as typed, not its reading.
                NameError::ServerLine(_) => {
                    NameError::ServerLine(raw.chars().next().unwrap_or_default())
                }
                e => e,
            })?;
            if without_marks(&reading) == SERVER_NICKNAME {
                return Err(NameError::Reserved);
            }
        }
    }
    Ok(())
}

/// The ways a name can be read, to compare names by: two names read the
/// same when they share a reading. Sorted, one or two.
///
/// A reading is Unicode NFKC (full-width and other compatibility forms
/// become plain ones), small capitals as capitals (`ᴀʟɪᴄᴇ` is `ALICE`),
/// case folded (upper-casing then lower-casing, so `ß` is `ss`; the dot of
/// a Turkish `İ` is dropped), then the UTS #39 confusables skeleton
/// (Cyrillic `а` is Latin `a`, `0` is `O`), lower-cased once more.
///
/// A capital `I` is read two ways: as an `i` (`ALICE` reads `alice`), and
/// as the `l` it is drawn like in many fonts (`aIice` reads `alice`). So
/// there are two readings: case folded first, and the skeleton taken
/// first, then case folded and the skeleton taken again. `Alice`, `ALICE`,
/// `aIice`, `ALİCE`, `ᴀʟɪᴄᴇ`, `аlice` and `ａｌｉｃｅ` all read `alice`.
///
/// Never shown to anyone: a claimed nickname is held under each of its
/// readings (`--unique-nicknames`).
pub fn readings(name: &str) -> Vec<String> {
    let mut plain = String::with_capacity(name.len());
    for c in name.nfkc() {
        match small_capital(c) {
            Some(capital) => plain.push_str(capital),
            None => plain.push(c),
        }
    }
    let confusables_first: String = unicode_security::skeleton(&plain).collect();
    let mut readings = vec![read_folded(&plain), read_folded(&confusables_first)];
    readings.sort();
    readings.dedup();
    readings
}

/// `text` case folded, then its UTS #39 skeleton, lower-cased.
fn read_folded(text: &str) -> String {
    let mut folded = String::with_capacity(text.len());
    for c in text
        .chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
    {
        // `İ` lower-cases to `i` and a combining dot above: the dot the
        // `i` has anyway.
        if c == '\u{0307}' && folded.ends_with(['i', 'j']) {
            continue;
        }
        folded.push(c);
    }
    unicode_security::skeleton(&folded)
        .flat_map(char::to_lowercase)
        .collect()
}

/// A reading without its combining marks (accents, dots): what is left to
/// compare with [`SERVER_NICKNAME`], which an accent over a letter does not
/// make another name to the eye. (A skeleton is in NFD: the marks are
/// apart from their letters.)
fn without_marks(reading: &str) -> String {
    reading
        .nfd()
        .filter(|&c| !unicode_normalization::char::is_combining_mark(c))
        .collect()
}

/// The Latin small capitals (`ᴀ`, `ʟ`, `ꜱ`) as the capitals they are drawn
/// as; the UTS #39 confusables leave most of them alone.
fn small_capital(c: char) -> Option<&'static str> {
    Some(match c {
        'ᴀ' => "A",
        'ᴁ' => "AE",
        'ʙ' => "B",
        'ᴄ' => "C",
        'ᴅ' => "D",
        'ᴇ' => "E",
        'ꜰ' => "F",
        'ɢ' => "G",
        'ʜ' => "H",
        'ɪ' | '\u{A7AE}' => "I",
        'ᴊ' => "J",
        'ᴋ' => "K",
        'ʟ' => "L",
        'ᴍ' => "M",
        'ɴ' => "N",
        'ᴏ' => "O",
        'ɶ' => "OE",
        'ᴘ' => "P",
        'ꞯ' => "Q",
        'ʀ' => "R",
        'ꜱ' => "S",
        'ᴛ' => "T",
        'ᴜ' => "U",
        'ᴠ' => "V",
        'ᴡ' => "W",
        'ʏ' => "Y",
        'ᴢ' => "Z",
        _ => return None,
    })
}

/// Whether a name mixes letters of scripts that are not used together
/// (UTS #39 mixed-script detection): `pаypal` with a Cyrillic `а` does;
/// digits, spaces and punctuation belong to every script and do not count.
/// Latin beside Han, Kana or Hangul is allowed, as Japanese, Chinese and
/// Korean names mix them (UTS #39 "highly restrictive").
pub fn mixes_scripts(name: &str) -> bool {
    if name.is_single_script() {
        return false;
    }
    let latin = AugmentedScriptSet::for_char('a');
    let mut rest = AugmentedScriptSet::default();
    for c in name.chars() {
        let set = AugmentedScriptSet::for_char(c);
        let mut shared = set;
        shared.intersect_with(latin);
        if shared.is_empty() {
            rest.intersect_with(set);
        }
    }
    !(rest.hanb || rest.jpan || rest.kore)
}

impl Nickname {
    /// Validates an already-decoded nickname. Besides the shared rule, a
    /// name that would pass for the server is refused (see
    /// [`forges_a_line`]): a client called `server` could pass its words
    /// off as the server's.
    pub fn parse(raw: &str) -> Result<Nickname, NameError> {
        Nickname::check(raw)?;
        Ok(Nickname(raw.to_owned()))
    }

    /// Whether `raw` is a valid nickname, without making one. It runs on
    /// every subscriber thread for every payload's nickname: an ASCII name
    /// (the usual) is checked without allocating.
    pub fn check(raw: &str) -> Result<(), NameError> {
        validate_name(raw, MAX_NICKNAME_CHARS)?;
        forges_a_line(raw)
    }

    /// Whether `raw` may stand as the summary nickname of a coalesced join
    /// or leave from a payload ("alice, bob and 48 others"), whose first
    /// listed name is `first`: up to [`MAX_SUMMARY_CHARS`] long, it starts
    /// with `first`, itself a valid nickname (so the summary starts as a
    /// nickname may). A summary made of valid nicknames always passes.
    pub fn check_summary(raw: &str, first: &str) -> Result<(), NameError> {
        validate_name(raw, MAX_SUMMARY_CHARS)?;
        Nickname::check(first)?;
        if !raw.starts_with(first) {
            return Err(NameError::NotASummary);
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
    /// The original app's single room.
    pub fn global() -> Room {
        Room(GLOBAL_ROOM.to_owned())
    }

    /// Validates a decoded room name (the shared rule of nicknames).
    pub fn parse(raw: &str) -> Result<Room, NameError> {
        validate_name(raw, MAX_NICKNAME_CHARS)?;
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
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity of one WebSocket connection, unique across all instances that
/// share a Redis: a random per-process instance id plus a per-process counter,
/// e.g. `3f9c2a71d0b4e856-17`.
///
/// Every published [`ChatMessage`](super::ChatMessage) carries its sender's `ConnId`; a receiving
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
