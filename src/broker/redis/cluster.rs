//! Redis Cluster: which master holds a room, and how threadchat follows
//! it when it moves.
//!
//! A cluster splits its keys into 16,384 *slots* and gives each master a
//! share of them. A key's slot is the CRC16 of its hash tag (the part in
//! `{…}`), so every key of a room, and its shard channel, is in one slot
//! (`keys.rs`), on one master. The `redis` crate's synchronous
//! `ClusterConnection` routes ordinary commands but has no pub/sub, so
//! threadchat routes by itself, with what every cluster client keeps: the
//! *slot map*, asked of any node with `CLUSTER SLOTS`.
//!
//! * **Subscriptions** connect to the master of their room's slot and use
//!   *sharded* pub/sub (`SSUBSCRIBE`; the log script `SPUBLISH`es): a
//!   room's messages stay on its shard, where classic `PUBLISH` would be
//!   copied to every node of the cluster.
//! * **Publishers and queries** keep a connection per master, and send
//!   each job to the master of its [`Route`].
//!
//! **When a slot moves** (a resharding, a failover), the old master
//! answers commands for it with a redirection ([`Redirect`]): `MOVED` (the
//! slot is elsewhere now: the map is updated at once for that slot, and
//! marked stale), `ASK` (this one command goes to the node that is
//! importing the slot, after `ASKING`), `TRYAGAIN` (keys of one command are
//! split between the two nodes for a moment: wait, and send it again). A
//! shard channel's subscribers are sent `sunsubscribe` by the server, and a
//! master that dies drops every connection. Either way the subscription is
//! lost, its clients are told, and its reconnection asks where the slot is
//! now — the same path, and the same notices, as a Redis restart.
//!
//! A stale map is asked again at most every
//! `ha::ASK_AT_MOST_EVERY`, so that thousands of
//! subscriptions lost at once ask once.
//!
//! This file is what every Redis connection speaks, in every build: a
//! job's [`Route`], a [`Redirect`] in a reply (one server never sends
//! one). The slot map that routes by them (`ha/slot_map.rs`) is the
//! `redis-ha` feature.

use super::keys;
use crate::protocol::Room;

/// How many hash slots a cluster has.
pub(super) const SLOTS: usize = 16_384;

/// The hash slot of a key, as the cluster computes it: CRC16 (XMODEM) of
/// its hash tag — the part between the first `{` and the next `}`, if that
/// is not empty — or else of the whole key, modulo 16,384.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), bit by bit:
/// keys are short, and a table would be 512 bytes to read for a few.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Where a job's commands must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Anywhere (a `PING`); on a cluster, any master.
    Any,
    /// On the master of this slot (every command of the job is in it).
    Slot(u16),
}

impl Route {
    /// Where a room's keys and channel are.
    pub(super) fn room(room: &Room) -> Route {
        Route::Slot(slot(keys::tag(room).as_bytes()))
    }

    /// Where one key is.
    pub(super) fn key(key: &str) -> Route {
        Route::Slot(slot(key.as_bytes()))
    }
}

/// A cluster's answer that a command belongs elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Redirect {
    /// `MOVED slot host:port`: the slot is served there now.
    Moved(u16, String),
    /// `ASK slot host:port`: the slot is being moved there; send this
    /// command there, after `ASKING`.
    Ask(String),
    /// `TRYAGAIN`: the command's keys are split between the two nodes of
    /// a move in progress.
    TryAgain,
}

impl Redirect {
    /// The redirection an error reply carries (`code` is its first word).
    pub(super) fn of(code: &str, details: &str) -> Option<Redirect> {
        let mut words = details.split_whitespace();
        let mut target = || {
            let slot = words.next()?.parse().ok()?;
            Some((slot, words.next()?.to_owned()))
        };
        match code {
            "MOVED" => target().map(|(slot, address)| Redirect::Moved(slot, address)),
            "ASK" => target().map(|(_, address)| Redirect::Ask(address)),
            "TRYAGAIN" => Some(Redirect::TryAgain),
            _ => None,
        }
    }

    /// The redirection in a reply, if it is one.
    pub(super) fn in_value(value: &redis::Value) -> Option<Redirect> {
        match value {
            redis::Value::ServerError(e) => Redirect::of(e.code(), e.details().unwrap_or("")),
            _ => None,
        }
    }

    /// The redirection in an error read by hand (`pubsub.rs` writes a
    /// server's error reply as `Redis answered: CODE details`).
    pub(super) fn in_message(message: &str) -> Option<Redirect> {
        let reply = message.split("Redis answered: ").nth(1)?;
        let (code, details) = reply.split_once(' ').unwrap_or((reply, ""));
        Redirect::of(code, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values the cluster specification and `CLUSTER KEYSLOT` give.
    #[test]
    fn slots_are_the_clusters() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{lobby}"), 10294);
        assert_eq!(slot(b"threadchat:{lobby}:log"), 10294);
        assert_eq!(slot(b"global_room"), 6151);
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(slot(b"{}x"), crc16(b"{}x") % 16384);
        assert_eq!(slot(b"a{b}c{d}"), slot(b"b"));
    }

    #[test]
    fn redirections_are_read() {
        assert_eq!(
            Redirect::of("MOVED", "10294 127.0.0.1:7102"),
            Some(Redirect::Moved(10294, "127.0.0.1:7102".into()))
        );
        assert_eq!(
            Redirect::in_message("Redis answered: ASK 1 h:2"),
            Some(Redirect::Ask("h:2".into()))
        );
        assert_eq!(Redirect::of("TRYAGAIN", ""), Some(Redirect::TryAgain));
        assert_eq!(Redirect::of("ERR", "MOVED 1 h:2"), None);
        assert_eq!(Redirect::of("MOVED", "x"), None);
    }
}
