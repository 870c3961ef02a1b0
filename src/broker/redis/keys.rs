//! The names of the Redis keys and channels threadchat keeps.
//!
//! Every key of a room carries the room's *hash tag*
//! (`threadchat:{lobby}:log`): Redis Cluster puts keys with the same tag in
//! the same slot, so one script can touch all of a room's keys, and a room
//! lives on one shard while rooms spread over all of them. On a cluster the
//! room's channel is a shard channel with the same tag
//! (`threadchat:room:{lobby}`, see [`shard_channel`]), so the script may
//! `SPUBLISH` on it; on one Redis it is the protocol's `Room::channel`,
//! which the original app shares.

use crate::protocol::Room;

/// The hash tag of a room: its name, with `%`, `{` and `}` written as
/// `%25`, `%7B` and `%7D`. A `}` in the tag would end it early (room `}x`
/// would give its keys an empty tag, and so different slots), and escaping
/// `%` too keeps two rooms from ever sharing a tag.
pub(super) fn tag(room: &Room) -> String {
    let name = room.name();
    if !name.contains(['%', '{', '}']) {
        return name.to_owned();
    }
    let mut tag = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    tag
}

/// The key of a room's log (a list of payloads, each with its place).
pub(super) fn log(room: &Room) -> String {
    format!("threadchat:{{{}}}:log", tag(room))
}

/// The key of a room's log size in bytes (kept beside the list, so that
/// the log can be bounded in bytes without reading it).
pub(super) fn log_bytes(room: &Room) -> String {
    format!("threadchat:{{{}}}:log-bytes", tag(room))
}

/// The key of a room's log position (a hash: `epoch`, `last` offset given,
/// `first` offset still held, and the `run` id of the Redis that wrote it).
pub(super) fn meta(room: &Room) -> String {
    format!("threadchat:{{{}}}:meta", tag(room))
}

/// The key of a room's member list (a hash: connection id → nickname).
pub(super) fn members(room: &Room) -> String {
    format!("threadchat:{{{}}}:members", tag(room))
}

/// The keys of a room's log script, in its `KEYS` order.
pub(super) fn of_script(room: &Room) -> [String; 4] {
    [log(room), log_bytes(room), meta(room), members(room)]
}

/// The key of a room's claimed nicknames (`--unique-nicknames`: a hash,
/// nickname → connection id).
pub(super) fn nicknames(room: &Room) -> String {
    format!("threadchat:{{{}}}:nicknames", tag(room))
}

/// Every key of a room, for refreshing their time to live.
pub(super) fn to_refresh(room: &Room) -> [String; 5] {
    [
        log(room),
        log_bytes(room),
        meta(room),
        members(room),
        nicknames(room),
    ]
}

/// The channel of `room`: its shard channel on a cluster (`sharded`),
/// otherwise the protocol's channel.
pub(super) fn channel(room: &Room, sharded: bool) -> String {
    if sharded {
        shard_channel(room)
    } else {
        room.channel()
    }
}

/// A room's shard channel on a Redis Cluster: in its keys' slot. The
/// original's `global_room` keeps its name (`global_room` hashes like the
/// tag `{global_room}`, so it is in its keys' slot already).
fn shard_channel(room: &Room) -> String {
    if *room == Room::global() {
        room.channel()
    } else {
        format!("threadchat:room:{{{}}}", tag(room))
    }
}

/// The keys of the index of idle rooms (see `idle.rs`): a sorted set
/// (room → when it was left), a hash (room → its bytes) and their total.
/// One hash tag, so one script changes all three on a cluster.
pub(super) fn idle_rooms() -> [String; 3] {
    ["lru", "sizes", "total"].map(|part| format!("threadchat:{{idle-rooms}}:{part}"))
}

/// The key that says an instance is alive.
pub(super) fn instance(instance: &str) -> String {
    format!("threadchat:instance:{instance}")
}
