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
//! A stale map is asked again at most every [`ASK_AT_MOST_EVERY`], so that
//! thousands of subscriptions lost at once ask once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Client;

use super::ASK_AT_MOST_EVERY;
use super::keys;
use crate::broker::BrokerError;
use crate::protocol::Room;

/// How many hash slots a cluster has.
pub(super) const SLOTS: usize = 16_384;
/// How long one node may take to answer `CLUSTER SLOTS`.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Which master serves each slot.
#[derive(Clone)]
pub(super) struct SlotMap {
    /// Each master's `host:port`, and a client for it.
    masters: Vec<(String, Client)>,
    /// Per slot, 1 + the index of its master in `masters` (0: nobody).
    owner: Box<[u16]>,
}

impl SlotMap {
    /// The master of `slot`.
    fn master(&self, slot: u16) -> Option<&(String, Client)> {
        let owner = *self.owner.get(usize::from(slot))?;
        self.masters.get(usize::from(owner).checked_sub(1)?)
    }

    /// Says `slot` is served by `address` now (a `MOVED`).
    fn set(&mut self, slot: u16, address: &str, client: Client) {
        let index = match self.masters.iter().position(|(a, _)| a == address) {
            Some(index) => index,
            None => {
                self.masters.push((address.to_owned(), client));
                self.masters.len() - 1
            }
        };
        if let Some(owner) = self.owner.get_mut(usize::from(slot)) {
            *owner = index as u16 + 1;
        }
    }

    /// Each master with the slot ranges it serves, in slot order.
    fn ranges(&self) -> Vec<(&str, Vec<(u16, u16)>)> {
        let mut ranges: Vec<(&str, Vec<(u16, u16)>)> = Vec::new();
        let mut start = 0;
        for slot in 1..=SLOTS {
            if slot < SLOTS && self.owner[slot] == self.owner[start] {
                continue;
            }
            if let Some((address, _)) = self.master(start as u16) {
                let range = (start as u16, slot as u16 - 1);
                match ranges.iter_mut().find(|(a, _)| a == address) {
                    Some((_, list)) => list.push(range),
                    None => ranges.push((address, vec![range])),
                }
            }
            start = slot;
        }
        ranges
    }

    /// The first slot that no master serves.
    fn first_unserved(&self) -> Option<usize> {
        self.owner.iter().position(|&owner| owner == 0)
    }
}

/// What was learnt of the cluster last.
struct Known {
    map: Arc<SlotMap>,
    at: Instant,
    /// A connection failed, or a slot moved, since.
    stale: bool,
    /// Masters that a connection failed to reach since one last did. While
    /// the map names one, it stays stale: the cluster has not yet promoted
    /// its replica (it takes the node timeout and an election), and the map
    /// is asked again until it has, rather than until the next failure.
    unreachable: Vec<String>,
}

/// A Redis Cluster: its seed nodes and the slot map asked of them.
pub struct Cluster {
    /// `host:port` of each seed node (from `--redis`).
    seeds: Vec<String>,
    /// The nodes' password, if any.
    password: Option<String>,
    known: Mutex<Option<Known>>,
}

impl Cluster {
    /// The cluster that `seeds` belong to; its slot map is asked at once,
    /// so that a wrong address, a Redis without cluster mode or a cluster
    /// that does not serve every slot is an error at start.
    pub(super) fn connect(
        seeds: &[String],
        password: Option<&str>,
    ) -> Result<Cluster, BrokerError> {
        let cluster = Cluster {
            seeds: seeds.to_vec(),
            password: password.map(str::to_owned),
            known: Mutex::new(None),
        };
        let map = cluster.map()?;
        if let Some(slot) = map.first_unserved() {
            return Err(cluster.error(format!(
                "slot {slot} is served by no master (is the cluster fully set up? \
                 `redis-cli --cluster check` tells)"
            )));
        }
        Ok(cluster)
    }

    /// The address of the master for `route`, and a client for it.
    pub(super) fn node(&self, route: Route) -> Result<(String, Client), BrokerError> {
        self.with_master(route, |found| found.clone())
    }

    /// The address of the master for `route` (what a publisher groups its
    /// jobs by: no client is made).
    pub(super) fn address(&self, route: Route) -> Result<String, BrokerError> {
        self.with_master(route, |(address, _)| address.clone())
    }

    /// `take` of the master for `route` (its address and client).
    fn with_master<T>(
        &self,
        route: Route,
        take: impl FnOnce(&(String, Client)) -> T,
    ) -> Result<T, BrokerError> {
        let map = self.map()?;
        let found = match route {
            Route::Slot(slot) => map.master(slot),
            Route::Any => map.masters.first(),
        };
        found.map(take).ok_or_else(|| self.no_master(route))
    }

    /// A client for the node at `address` (an `ASK` names one that may not
    /// be in the map).
    pub(super) fn client(&self, address: &str) -> Result<Client, BrokerError> {
        self.client_for(address).map_err(|e| self.error(e))
    }

    /// Each master, with one slot it serves (to reach it by [`Route`]).
    pub(super) fn masters(&self) -> Result<Vec<(String, Route)>, BrokerError> {
        let map = self.map()?;
        Ok(map
            .ranges()
            .into_iter()
            .map(|(address, ranges)| (address.to_owned(), Route::Slot(ranges[0].0)))
            .collect())
    }

    /// The map may be wrong (a subscription was told its slot moved): it
    /// is asked again (at most every [`ASK_AT_MOST_EVERY`]).
    pub(super) fn forget(&self) {
        if let Some(known) = &mut *self.lock() {
            known.stale = true;
        }
    }

    /// A connection to `address` failed: the map is asked again until it no
    /// longer names it as a master, or a connection reaches it.
    pub(super) fn unreachable(&self, address: &str) {
        if let Some(known) = &mut *self.lock() {
            known.stale = true;
            if !known.unreachable.iter().any(|a| a == address) {
                known.unreachable.push(address.to_owned());
            }
        }
    }

    /// A connection to `address` was made.
    pub(super) fn reached(&self, address: &str) {
        if let Some(known) = &mut *self.lock()
            && !known.unreachable.is_empty()
        {
            known.unreachable.retain(|a| a != address);
        }
    }

    /// A `MOVED`: `slot` is served by `address` now. The map says so at
    /// once (the next command for the slot goes there), and is asked again
    /// as a whole: a moved slot rarely moves alone.
    pub(super) fn moved(&self, slot: u16, address: &str) {
        let Ok(client) = self.client_for(address) else {
            return;
        };
        if let Some(known) = &mut *self.lock() {
            Arc::make_mut(&mut known.map).set(slot, address, client);
            known.stale = true;
        }
    }

    /// The masters and their slots, for the start-up log.
    pub(super) fn describe(&self) -> String {
        let map = match self.map() {
            Ok(map) => map,
            Err(e) => return format!("Redis Cluster: unknown ({e})"),
        };
        let masters: Vec<String> = map
            .ranges()
            .into_iter()
            .map(|(address, ranges)| {
                let slots: Vec<String> = ranges
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                format!("{address} (slots {})", slots.join(","))
            })
            .collect();
        format!(
            "Redis Cluster: {} master(s): {}",
            masters.len(),
            masters.join(", ")
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot map: the last one, unless it is stale (and was asked more
    /// than [`ASK_AT_MOST_EVERY`] ago).
    fn map(&self) -> Result<Arc<SlotMap>, BrokerError> {
        let mut known = self.lock();
        if let Some(last) = &*known
            && (!last.stale || last.at.elapsed() < ASK_AT_MOST_EVERY)
        {
            return Ok(Arc::clone(&last.map));
        }
        // Ask the masters of the last map first, then the seeds, and those
        // that could not be reached last (a dead host may take the whole
        // timeout to say so).
        let unreachable = known
            .as_ref()
            .map(|k| k.unreachable.clone())
            .unwrap_or_default();
        let masters: Vec<String> = known
            .as_ref()
            .map(|k| k.map.masters.iter().map(|(a, _)| a.clone()).collect())
            .unwrap_or_default();
        let mut nodes: Vec<String> = Vec::new();
        for node in masters.iter().chain(&self.seeds) {
            if !unreachable.contains(node) && !nodes.contains(node) {
                nodes.push(node.clone());
            }
        }
        for node in &unreachable {
            if !nodes.contains(node) {
                nodes.push(node.clone());
            }
        }
        let mut reasons = Vec::new();
        for node in &nodes {
            match self.ask(node) {
                Ok(map) => {
                    let map = Arc::new(map);
                    // Unreachable masters that are masters no more are
                    // forgotten; one that still is keeps the map stale.
                    let mut unreachable = unreachable;
                    unreachable.retain(|a| map.masters.iter().any(|(m, _)| m == a));
                    *known = Some(Known {
                        map: Arc::clone(&map),
                        at: Instant::now(),
                        stale: !unreachable.is_empty(),
                        unreachable,
                    });
                    return Ok(map);
                }
                Err(reason) => reasons.push(format!("{node}: {reason}")),
            }
        }
        // Nobody answered: keep using the last map (its masters may come
        // back), asked again after the same pause.
        if let Some(last) = &mut *known {
            last.at = Instant::now();
            return Ok(Arc::clone(&last.map));
        }
        Err(self.error(format!(
            "no node answered CLUSTER SLOTS ({})",
            reasons.join("; ")
        )))
    }

    /// Asks one node for the slot map.
    fn ask(&self, node: &str) -> Result<SlotMap, String> {
        let client = self.client_for(node)?;
        let mut con = client
            .get_connection_with_timeout(NODE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        con.set_read_timeout(Some(NODE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut con)
            .map_err(|e| e.to_string())?;
        let host_of_node = node.rsplit_once(':').map_or(node, |(host, _)| host);
        let mut map = SlotMap {
            masters: Vec::new(),
            owner: vec![0; SLOTS].into_boxed_slice(),
        };
        for range in &ranges {
            let (start, end, address) = slot_range(range, host_of_node)
                .ok_or("a CLUSTER SLOTS reply threadchat cannot read")?;
            let client = self.client_for(&address)?;
            for slot in start..=end.min(SLOTS as u16 - 1) {
                map.set(slot, &address, client.clone());
            }
        }
        Ok(map)
    }

    fn client_for(&self, address: &str) -> Result<Client, String> {
        let auth = match &self.password {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        Client::open(format!("redis://{auth}{address}")).map_err(|e| e.to_string())
    }

    fn no_master(&self, route: Route) -> BrokerError {
        BrokerError::Redis(match route {
            Route::Slot(slot) => {
                format!("no master serves slot {slot} of the Redis Cluster right now")
            }
            Route::Any => "the Redis Cluster has no master right now".to_owned(),
        })
    }

    fn error(&self, reason: String) -> BrokerError {
        BrokerError::Connect {
            url: format!("redis+cluster://{}", self.seeds.join(",")),
            reason,
        }
    }
}

/// One entry of a `CLUSTER SLOTS` reply: `[start, end, [host, port, id,
/// …], replicas…]`, as (start, end, `host:port` of its master). An empty
/// host means the node that answered.
fn slot_range(range: &redis::Value, host_of_node: &str) -> Option<(u16, u16, String)> {
    use redis::Value;
    let Value::Array(items) = range else {
        return None;
    };
    let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
        (items.first(), items.get(1), items.get(2))
    else {
        return None;
    };
    let (Some(Value::BulkString(host)), Some(Value::Int(port))) = (master.first(), master.get(1))
    else {
        return None;
    };
    let host = match std::str::from_utf8(host).ok()? {
        "" | "?" => host_of_node,
        host => host,
    };
    Some((
        u16::try_from(*start).ok()?,
        u16::try_from(*end).ok()?,
        format!("{host}:{port}"),
    ))
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
