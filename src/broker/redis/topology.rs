//! Where Redis is: one server, a master that Redis Sentinel names
//! (`ha/sentinel.rs`), or the masters of a Redis Cluster
//! (`ha/slot_map.rs`). Sentinel and Cluster are the `redis-ha` feature;
//! built without it, their types have no values and only one server is
//! possible, with the same code here.
//!
//! Every connection the broker opens — a publisher's, a query thread's, a
//! subscription's — asks [`Topology::node`] for the server to connect
//! to, each time it connects or reconnects (on a cluster: the master of
//! the slot its commands or its room's channel are in). With one server that is always
//! the same. With Sentinel (`--redis redis+sentinel://h1:p1,h2:p2/NAME`) it
//! is whichever server the sentinels say is the master of `NAME`, checked
//! with `ROLE` (during a failover a sentinel may still name the old one).
//!
//! **Following a failover needs nothing more.** A dead master drops every
//! connection, and a master that a failover turns into a replica has every
//! client connection killed by the sentinels (`CLIENT KILL TYPE normal` and
//! `TYPE pubsub`): either way each connection fails, [`Topology::forget`]
//! is called, and its reconnection (with back-off, and the same "lost" /
//! "reconnected" notices as a Redis restart) asks the sentinels again. A
//! write that a replica refuses (`READONLY`) makes the publisher forget its
//! connection and the master the same way.
//!
//! The answer is kept for a second, so that a thousand clients joining
//! at once ask the sentinels once, not a thousand times; and a failed
//! connection only marks it stale, asked again at most every
//! `ha::ASK_AT_MOST_EVERY`, so that a thousand subscriptions lost at once do
//! not ask a thousand times either.

use redis::Client;

use super::cluster::{Redirect, Route};
use super::ha::{Cluster, Sentinels};
use super::keys;
use crate::broker::BrokerError;
use crate::config::RedisTarget;
use crate::protocol::Room;

/// One Redis server, a master found through Sentinel, or the masters of a
/// Redis Cluster.
pub enum Topology {
    /// One server, always the same (and its URL, for the log).
    Single(Client, String),
    /// A master named by sentinels.
    Sentinel(Sentinels),
    /// The masters of a cluster, each serving some of the slots.
    Cluster(Cluster),
}

impl Topology {
    /// The topology `target` names. Nothing is connected yet.
    pub fn new(target: &RedisTarget) -> Result<Topology, BrokerError> {
        match target {
            RedisTarget::Server(url) => Client::open(url.as_str())
                .map(|client| Topology::Single(client, url.clone()))
                .map_err(|e| BrokerError::Connect {
                    url: super::redact(url),
                    reason: e.to_string(),
                }),
            RedisTarget::Sentinel {
                sentinels,
                master,
                password,
                db,
            } => {
                Sentinels::new(sentinels, master, password.as_deref(), *db).map(Topology::Sentinel)
            }
            RedisTarget::Cluster { seeds, password } => {
                Cluster::connect(seeds, password.as_deref()).map(Topology::Cluster)
            }
        }
    }

    /// The server to connect to now for commands that go to `route`, as
    /// its address and a client for it. Only a cluster has more than one.
    pub(super) fn node(&self, route: Route) -> Result<(String, Client), BrokerError> {
        match self {
            Topology::Single(client, url) => Ok((url.clone(), client.clone())),
            Topology::Sentinel(sentinels) => sentinels.master(),
            Topology::Cluster(cluster) => cluster.node(route),
        }
    }

    /// The address of the node for `route` on a cluster (what publishers
    /// group jobs by); `None` for one server or Sentinel's master, where
    /// every job goes to the same place.
    pub(super) fn cluster_address(&self, route: Route) -> Option<Result<String, BrokerError>> {
        match self {
            Topology::Cluster(cluster) => Some(cluster.address(route)),
            _ => None,
        }
    }

    /// A client for the server at `address` (where an `ASK` sends a
    /// command).
    pub(super) fn client(&self, address: &str) -> Result<Client, BrokerError> {
        match self {
            Topology::Cluster(cluster) => cluster.client(address),
            _ => self.node(Route::Any).map(|(_, client)| client),
        }
    }

    /// Every master, each with a route to it (and its address, on a
    /// cluster): what the heartbeat checks.
    pub(super) fn masters(&self) -> Result<Vec<(Option<String>, Route)>, BrokerError> {
        match self {
            Topology::Cluster(cluster) => Ok(cluster
                .masters()?
                .into_iter()
                .map(|(address, route)| (Some(address), route))
                .collect()),
            _ => Ok(vec![(None, Route::Any)]),
        }
    }

    /// True for a cluster: rooms use sharded pub/sub (`SSUBSCRIBE`,
    /// `SPUBLISH`).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Topology::Cluster(_))
    }

    /// The channel `room`'s messages travel on: on a cluster a shard
    /// channel in the room's slot, otherwise the protocol's channel.
    pub(super) fn channel(&self, room: &Room) -> String {
        keys::channel(room, self.is_cluster())
    }

    /// A cluster answered that a command belongs elsewhere: for a `MOVED`,
    /// the slot map says so from now on.
    pub(super) fn redirected(&self, redirect: &Redirect) {
        if let (Topology::Cluster(cluster), Redirect::Moved(slot, address)) = (self, redirect) {
            cluster.moved(*slot, address);
        }
    }

    /// A connection to `address` failed: the answer is stale, and the
    /// next [`node`](Self::node) asks the sentinels (or the cluster) again,
    /// at most every `ha::ASK_AT_MOST_EVERY`; a cluster's map stays stale
    /// while it names `address` as a master and nobody has reached it.
    pub(super) fn unreachable(&self, address: &str) {
        match self {
            Topology::Cluster(cluster) => cluster.unreachable(address),
            _ => self.forget(),
        }
    }

    /// A connection to `address` was made (see [`unreachable`](Self::unreachable)).
    pub(super) fn reached(&self, address: &str) {
        if let Topology::Cluster(cluster) = self {
            cluster.reached(address);
        }
    }

    /// What was found may be out of date (a server turned replica, a
    /// cluster's slot moved): the next [`node`](Self::node) asks again, at
    /// most every `ha::ASK_AT_MOST_EVERY`.
    pub fn forget(&self) {
        match self {
            Topology::Single(..) => {}
            Topology::Sentinel(sentinels) => sentinels.forget(),
            Topology::Cluster(cluster) => cluster.forget(),
        }
    }

    /// How many times the master moved so far: a connection opened at an
    /// older count is to the old master.
    pub fn moves(&self) -> u64 {
        match self {
            Topology::Single(..) | Topology::Cluster(_) => 0,
            Topology::Sentinel(sentinels) => sentinels.moves(),
        }
    }

    /// What was found, for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Topology::Single(_, url) => format!("Redis at {}", super::redact(url)),
            Topology::Sentinel(sentinels) => sentinels.describe(),
            Topology::Cluster(cluster) => cluster.describe(),
        }
    }
}
