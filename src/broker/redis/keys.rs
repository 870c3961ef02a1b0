//! The names of the Redis keys threadchat keeps. A room's channel name is
//! part of the protocol (`Room::channel`); these are the Redis broker's own.

use crate::protocol::Room;

/// The key of a room's message history (a list).
pub(super) fn history(room: &Room) -> String {
    format!("threadchat:history:{}", room.name())
}

/// The key of a room's history size in bytes (kept beside the list, so that
/// the history can be bounded in bytes without reading it).
pub(super) fn history_bytes(room: &Room) -> String {
    format!("threadchat:history-bytes:{}", room.name())
}

/// The key of a room's member list (a hash: connection id → nickname).
pub(super) fn members(room: &Room) -> String {
    format!("threadchat:members:{}", room.name())
}

/// The key that says an instance is alive.
pub(super) fn instance(instance: &str) -> String {
    format!("threadchat:instance:{instance}")
}
