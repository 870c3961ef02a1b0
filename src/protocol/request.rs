//! What a chat connection's request says: who joins which room, and how
//! they want their frames (`/chat/{nickname}?room=…&format=…&since=…`).

use super::names::{Nickname, Room};

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

/// Who joins which room, and how they want their frames: what a chat
/// connection's request says (`/chat/{nickname}?room=…&format=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// From the path: `/chat/{nickname}`.
    pub nickname: Nickname,
    /// From `?room=`; the original's `global_room` without it.
    pub room: Room,
    /// From `?format=text`; JSON without it.
    pub format: Format,
    /// From `?since=…&epoch=…`: a client reconnecting, and what it has.
    pub resume: Option<Resume>,
    /// With authentication on, who the client's token says it is.
    #[cfg(feature = "tokens")]
    pub identity: Option<crate::auth::Identity>,
}

/// Where a reconnecting client left off: the last offset it saw of its
/// room's log, and that log's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The offset of the last message it saw.
    pub since: u64,
    /// The epoch that offset belongs to.
    pub epoch: String,
}
