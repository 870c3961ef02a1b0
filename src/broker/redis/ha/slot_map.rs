//! Redis Cluster's slot map: which master serves each slot, asked of the
//! seed nodes with `CLUSTER SLOTS`, and kept up to date as slots move.
//! `cluster.rs` says how threadchat routes by it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Client;

use super::slots::SLOTS;
use crate::broker::error::BrokerError;
use crate::broker::redis::link::Link;
use crate::broker::redis::settings::ASK_AT_MOST_EVERY;

/// How long one node may take to answer `CLUSTER SLOTS`.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// Which master serves each slot.
#[derive(Clone)]
pub struct SlotMap {
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
    /// How every node is reached (TLS to all, with `rediss+cluster://`).
    link: Link,
    known: Mutex<Option<Known>>,
}

impl Cluster {
    /// The cluster that `seeds` belong to; its slot map is asked at once,
    /// so that a wrong address, a Redis without cluster mode or a cluster
    /// that does not serve every slot is an error at start.
    pub(super) fn connect(
        seeds: &[String],
        password: Option<&str>,
        link: Link,
    ) -> Result<Cluster, BrokerError> {
        let cluster = Cluster {
            seeds: seeds.to_vec(),
            password: password.map(str::to_owned),
            link,
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

    /// The address of the master of `slot` (any master: `None`), and a
    /// client for it.
    pub(super) fn node(&self, slot: Option<u16>) -> Result<(String, Client), BrokerError> {
        self.with_master(slot, |found| found.clone())
    }

    /// The address of the master of `slot` (what a publisher groups its
    /// jobs by: no client is made).
    pub(super) fn address(&self, slot: Option<u16>) -> Result<String, BrokerError> {
        self.with_master(slot, |(address, _)| address.clone())
    }

    /// `take` of the master of `slot` (its address and client).
    fn with_master<T>(
        &self,
        slot: Option<u16>,
        take: impl FnOnce(&(String, Client)) -> T,
    ) -> Result<T, BrokerError> {
        let map = self.map()?;
        let found = match slot {
            Some(slot) => map.master(slot),
            None => map.masters.first(),
        };
        found.map(take).ok_or_else(|| self.no_master(slot))
    }

    /// A client for the node at `address` (an `ASK` names one that may not
    /// be in the map).
    pub(super) fn client(&self, address: &str) -> Result<Client, BrokerError> {
        self.client_for(address).map_err(|e| self.error(e))
    }

    /// The address of each master.
    pub(super) fn masters(&self) -> Result<Vec<String>, BrokerError> {
        let map = self.map()?;
        Ok(map
            .ranges()
            .into_iter()
            .map(|(address, _)| address.to_owned())
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
            "Redis Cluster: {} master(s): {}{}",
            masters.len(),
            masters.join(", "),
            self.link.describe()
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
            .map_err(|e| self.link.explain(&e))?;
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
        self.link
            .client(address, self.password.as_deref(), None)
            .map_err(|e| e.to_string())
    }

    /// How every node is reached.
    pub(super) fn link(&self) -> &Link {
        &self.link
    }

    fn no_master(&self, slot: Option<u16>) -> BrokerError {
        BrokerError::Redis(match slot {
            Some(slot) => {
                format!("no master serves slot {slot} of the Redis Cluster right now")
            }
            None => "the Redis Cluster has no master right now".to_owned(),
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
