//! The names of the Redis keys threadchat keeps. A room's channel name is
//! part of the protocol (`Room::channel`); these are the Redis broker's own.
//!
//! Every key of a room carries the room's name as a *hash tag*
//! (`threadchat:{lobby}:log`): Redis Cluster puts keys with the same tag in
//! the same slot, so one script can touch all of a room's keys.

use crate::protocol::Room;

/// The key of a room's log (a list of payloads, each with its place).
pub(super) fn log(room: &Room) -> String {
    format!("threadchat:{{{}}}:log", room.name())
}

/// The key of a room's log size in bytes (kept beside the list, so that
/// the log can be bounded in bytes without reading it).
pub(super) fn log_bytes(room: &Room) -> String {
    format!("threadchat:{{{}}}:log-bytes", room.name())
}

/// The key of a room's log position (a hash: `epoch`, `last` offset given,
/// `first` offset still held).
pub(super) fn meta(room: &Room) -> String {
    format!("threadchat:{{{}}}:meta", room.name())
}

/// The key of a room's member list (a hash: connection id → nickname).
pub(super) fn members(room: &Room) -> String {
    format!("threadchat:{{{}}}:members", room.name())
}

/// Every key of a room, for refreshing their time to live.
pub(super) fn of_room(room: &Room) -> [String; 4] {
    [log(room), log_bytes(room), meta(room), members(room)]
}

/// The key that says an instance is alive.
pub(super) fn instance(instance: &str) -> String {
    format!("threadchat:instance:{instance}")
}
