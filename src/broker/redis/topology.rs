//! Where Redis is: one server, a master that Redis Sentinel names, or the
//! masters of a Redis Cluster (`cluster.rs`).
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
//! The answer is kept for [`FRESH_FOR`], so that a thousand clients joining
//! at once ask the sentinels once, not a thousand times; and a failed
//! connection only marks it stale, asked again at most every
//! [`ASK_AT_MOST_EVERY`], so that a thousand subscriptions lost at once do
//! not ask a thousand times either.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Client;

use super::ASK_AT_MOST_EVERY;
use super::cluster::{Cluster, Redirect, Route};
use super::keys;
use crate::broker::BrokerError;
use crate::config::RedisTarget;
use crate::protocol::Room;

/// How long an answer from the sentinels is used without asking again
/// (unless a connection fails first).
pub(super) const FRESH_FOR: Duration = Duration::from_secs(1);
/// How long one sentinel, or a master being checked, may take to answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

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

/// What the sentinels answered last.
struct Found {
    address: String,
    client: Client,
    /// When they answered.
    at: Instant,
    /// A connection to it failed since.
    stale: bool,
}

/// The sentinels of one master, and the master they named last.
pub struct Sentinels {
    /// `host:port` of each sentinel, asked in order.
    addresses: Vec<String>,
    /// The master's name in the sentinels' configuration.
    master_name: String,
    /// For the master: password and database (from the URL).
    password: Option<String>,
    db: i64,
    /// The master found last.
    found: Mutex<Option<Found>>,
    /// How many times the sentinels announced a new master.
    moves: AtomicU64,
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
            } => Ok(Topology::Sentinel(Sentinels {
                addresses: sentinels.clone(),
                master_name: master.clone(),
                password: password.clone(),
                db: *db,
                found: Mutex::new(None),
                moves: AtomicU64::new(0),
            })),
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
    /// at most every [`ASK_AT_MOST_EVERY`]; a cluster's map stays stale
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
    /// most every [`ASK_AT_MOST_EVERY`].
    pub fn forget(&self) {
        match self {
            Topology::Single(..) => {}
            Topology::Sentinel(sentinels) => {
                if let Some(found) = &mut *sentinels.found.lock().unwrap_or_else(|p| p.into_inner())
                {
                    found.stale = true;
                }
            }
            Topology::Cluster(cluster) => cluster.forget(),
        }
    }

    /// The sentinels announced a new master: forget the old one, and tell
    /// every connection opened before now to reopen (see [`moves`]). A
    /// master that a failover keeps alive stays writable for seconds
    /// before the sentinels demote it; a publisher still connected to it
    /// would publish to nobody.
    ///
    /// [`moves`]: Self::moves
    pub fn moved(&self) {
        if let Topology::Sentinel(sentinels) = self {
            // Not merely stale: nobody may connect to the old master again.
            *sentinels.found.lock().unwrap_or_else(|p| p.into_inner()) = None;
            sentinels.moves.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// How many times the master moved so far: a connection opened at an
    /// older count is to the old master.
    pub fn moves(&self) -> u64 {
        match self {
            Topology::Single(..) | Topology::Cluster(_) => 0,
            Topology::Sentinel(sentinels) => sentinels.moves.load(Ordering::SeqCst),
        }
    }

    /// What was found, for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Topology::Single(_, url) => format!("Redis at {}", super::redact(url)),
            Topology::Sentinel(sentinels) => {
                let master = sentinels
                    .master()
                    .map(|(address, _)| address)
                    .unwrap_or_else(|e| format!("unknown ({e})"));
                format!(
                    "Redis Sentinel: master {:?} at {master}, {} sentinel(s): {}",
                    sentinels.master_name,
                    sentinels.addresses.len(),
                    sentinels.addresses.join(", ")
                )
            }
            Topology::Cluster(cluster) => cluster.describe(),
        }
    }
}

impl Sentinels {
    /// `host:port` of each sentinel.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The master's name in the sentinels' configuration.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The master's address and a client for it: the last one found if it
    /// is fresh, else asked of the sentinels.
    pub(super) fn master(&self) -> Result<(String, Client), BrokerError> {
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = &*found {
            let age = last.at.elapsed();
            if age < ASK_AT_MOST_EVERY || (age < FRESH_FOR && !last.stale) {
                return Ok((last.address.clone(), last.client.clone()));
            }
        }
        let (address, client) = self.ask()?;
        log::debug!(
            "the sentinels name {address} as master {:?}",
            self.master_name
        );
        *found = Some(Found {
            address: address.clone(),
            client: client.clone(),
            at: Instant::now(),
            stale: false,
        });
        Ok((address, client))
    }

    /// Asks each sentinel in turn for the master, until one names a server
    /// that says it is a master.
    fn ask(&self) -> Result<(String, Client), BrokerError> {
        let mut reasons = Vec::new();
        for sentinel in &self.addresses {
            match self.ask_one(sentinel) {
                Ok(found) => return Ok(found),
                Err(reason) => reasons.push(format!("{sentinel}: {reason}")),
            }
        }
        Err(BrokerError::Connect {
            url: format!(
                "redis+sentinel://{}/{}",
                self.addresses.join(","),
                self.master_name
            ),
            reason: format!(
                "no sentinel named a master for {:?} ({})",
                self.master_name,
                reasons.join("; ")
            ),
        })
    }

    fn ask_one(&self, sentinel: &str) -> Result<(String, Client), String> {
        let client = Client::open(format!("redis://{sentinel}")).map_err(|e| e.to_string())?;
        let mut con = client
            .get_connection_with_timeout(SENTINEL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        con.set_read_timeout(Some(SENTINEL_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query(&mut con)
            .map_err(|e| e.to_string())?;
        let (host, port) = named.ok_or("does not know this master")?;
        let address = format!("{host}:{port}");
        let auth = match &self.password {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        let master = Client::open(format!("redis://{auth}{address}/{}", self.db))
            .map_err(|e| e.to_string())?;
        let mut con = master
            .get_connection_with_timeout(SENTINEL_TIMEOUT)
            .map_err(|e| format!("master {address}: {e}"))?;
        con.set_read_timeout(Some(SENTINEL_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query(&mut con)
            .map_err(|e| format!("master {address}: {e}"))?;
        match role.first() {
            Some(redis::Value::BulkString(role)) if role == b"master" => Ok((address, master)),
            _ => Err(format!("{address} is not a master (yet)")),
        }
    }
}
