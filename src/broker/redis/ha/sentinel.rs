//! Redis Sentinel: the master that the sentinels name (`--redis
//! redis+sentinel://h1:p1,h2:p2/NAME`), checked with `ROLE` (during a
//! failover a sentinel may still name the old one). `nodes.rs` says how a
//! failover is followed; `failover.rs` hears of it at once.
//!
//! The answer is kept for [`FRESH_FOR`], so that a thousand clients
//! joining at once ask the sentinels once; a failed connection only marks
//! it stale, asked again at most every [`ASK_AT_MOST_EVERY`].
//!
//! The sentinels watch the master; they do not carry the chat. When none
//! of them answers at all, the master they named last is used as long as
//! it says it is one (`ROLE`): a sentinel outage alone refuses no client.
//! (A sentinel that answers is believed: during a failover, its new master
//! is waited for, never the old one used.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Client;

use super::failover::Watcher;
use crate::broker::error::BrokerError;
use crate::broker::redis::job::Route;
use crate::broker::redis::link::Link;
use crate::broker::redis::nodes::{Follower, Nodes};
use crate::broker::redis::outage::cut;
use crate::broker::redis::settings::ASK_AT_MOST_EVERY;
use crate::broker::redis::sockets::SubscriptionSockets;

/// How long an answer from the sentinels is used without asking again
/// (unless a connection fails first).
pub const FRESH_FOR: Duration = Duration::from_secs(1);
/// How long one sentinel, or a master being checked, may take to answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// How the sentinels and the master are reached (TLS to both, with
    /// `rediss+sentinel://`).
    link: Link,
    /// The master found last.
    found: Mutex<Option<Found>>,
    /// How many times the sentinels announced a new master.
    moves: AtomicU64,
}

impl Sentinels {
    /// The sentinels at `addresses`, watching `master` (whose password and
    /// database these are). Nothing is connected yet.
    pub fn new(
        addresses: &[String],
        master: &str,
        password: Option<&str>,
        db: i64,
        link: Link,
    ) -> Result<Sentinels, BrokerError> {
        Ok(Sentinels {
            addresses: addresses.to_vec(),
            master_name: master.to_owned(),
            password: password.map(str::to_owned),
            db,
            link,
            found: Mutex::new(None),
            moves: AtomicU64::new(0),
        })
    }

    /// The master found may be out of date: the next [`master`](Self::master)
    /// asks again.
    pub fn forget(&self) {
        if let Some(found) = &mut *self.found.lock().unwrap_or_else(|p| p.into_inner()) {
            found.stale = true;
        }
    }

    /// The sentinels announced a new master: forget the old one, and tell
    /// every connection opened before now to reopen (see
    /// `Nodes::moves`). A master that a failover keeps alive stays
    /// writable for seconds before the sentinels demote it; a publisher
    /// still connected to it would publish to nobody.
    pub fn moved(&self) {
        // Not merely stale: nobody may connect to the old master again.
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.moves.fetch_add(1, Ordering::SeqCst);
    }

    /// How many times the master moved so far.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::SeqCst)
    }

    /// The master and the sentinels, for the start-up log.
    pub fn describe(&self) -> String {
        let master = self
            .master()
            .map(|(address, _)| address)
            .unwrap_or_else(|e| format!("unknown ({e})"));
        // The sentinels themselves are in the URL given: listed here, they
        // would stretch the line past what a person reads.
        format!(
            "Redis Sentinel: master {:?} at {master}, {} sentinel(s){}",
            self.master_name,
            self.addresses.len(),
            self.link.describe()
        )
    }

    /// The master's address and a client for it: the last one found if it
    /// is fresh, else asked of the sentinels (or, if none answers, the
    /// last one found, if it is still a master: see the module doc).
    pub fn master(&self) -> Result<(String, Client), BrokerError> {
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = &*found {
            let age = last.at.elapsed();
            if age < ASK_AT_MOST_EVERY || (age < FRESH_FOR && !last.stale) {
                return Ok((last.address.clone(), last.client.clone()));
            }
        }
        let (address, client) = match self.ask() {
            Ok(named) => named,
            Err(why) => match self.kept(found.as_ref(), &why) {
                Some(kept) => kept,
                None => return Err(self.no_master(&why)),
            },
        };
        log::debug!("master {:?} is at {address}", self.master_name);
        *found = Some(Found {
            address: address.clone(),
            client: client.clone(),
            at: Instant::now(),
            stale: false,
        });
        Ok((address, client))
    }

    /// The master found `last`, if no sentinel answered at all (`why`) and
    /// it still says it is one (see the module doc).
    fn kept(&self, last: Option<&Found>, why: &[NoMaster]) -> Option<(String, Client)> {
        let last = last?;
        if !why.iter().all(|no| matches!(no, NoMaster::Silent(_))) {
            return None;
        }
        let client = self.check(&last.address).ok()?;
        Some((last.address.clone(), client))
    }

    /// Asks each sentinel in turn for the master, until one names a server
    /// that says it is a master; else says why each did not.
    fn ask(&self) -> Result<(String, Client), Vec<NoMaster>> {
        let mut why = Vec::new();
        for sentinel in &self.addresses {
            match self.ask_one(sentinel) {
                Ok(found) => return Ok(found),
                Err(no) => why.push(no),
            }
        }
        Err(why)
    }

    /// The error for sentinels that named no master, for `why`: short, as
    /// it may be logged for every client refused. Each reason is said once
    /// (every sentinel may give the same), without the sentinels' addresses
    /// (they are in the URL given).
    fn no_master(&self, why: &[NoMaster]) -> BrokerError {
        let mut reasons: Vec<&str> = Vec::new();
        for no in why {
            if !reasons.contains(&no.reason()) {
                reasons.push(no.reason());
            }
        }
        BrokerError::Connect {
            url: format!("{:?}", self.master_name),
            reason: format!(
                "no master found ({} asked: {})",
                why.len(),
                cut(&reasons.join("; "), 70)
            ),
        }
    }

    fn ask_one(&self, sentinel: &str) -> Result<(String, Client), NoMaster> {
        let client = self
            .link
            .client(sentinel, None, None)
            .map_err(|e| NoMaster::Silent(e.to_string()))?;
        let mut con = client
            .get_connection_with_timeout(SENTINEL_TIMEOUT)
            .map_err(|e| NoMaster::Silent(self.link.explain(&e)))?;
        con.set_read_timeout(Some(SENTINEL_TIMEOUT))
            .map_err(|e| NoMaster::Silent(e.to_string()))?;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query(&mut con)
            .map_err(|e| NoMaster::Silent(e.to_string()))?;
        let (host, port) = named.ok_or(NoMaster::Answered("does not know this master".into()))?;
        let address = format!("{host}:{port}");
        let master = self.check(&address).map_err(NoMaster::Answered)?;
        Ok((address, master))
    }

    /// A client for the server at `address`, if it says it is a master.
    fn check(&self, address: &str) -> Result<Client, String> {
        let master = self
            .link
            .client(address, self.password.as_deref(), Some(self.db))
            .map_err(|e| e.to_string())?;
        let mut con = master
            .get_connection_with_timeout(SENTINEL_TIMEOUT)
            .map_err(|e| format!("master {address}: {}", self.link.explain(&e)))?;
        con.set_read_timeout(Some(SENTINEL_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query(&mut con)
            .map_err(|e| format!("master {address}: {e}"))?;
        match role.first() {
            Some(redis::Value::BulkString(role)) if role == b"master" => Ok(master),
            _ => Err(format!("{address} is not a master (yet)")),
        }
    }
}

/// Why a sentinel gave no master.
enum NoMaster {
    /// It did not answer: down, unreachable, or refusing the question.
    Silent(String),
    /// It answered, but knows no such master, or names one that does not
    /// say it is a master (yet: a failover under way).
    Answered(String),
}

impl NoMaster {
    fn reason(&self) -> &str {
        match self {
            NoMaster::Silent(reason) | NoMaster::Answered(reason) => reason,
        }
    }
}

impl Nodes for Sentinels {
    fn node(&self, _route: &Route) -> Result<(String, Client), BrokerError> {
        self.master()
    }

    fn client(&self, _address: &str) -> Result<Client, BrokerError> {
        self.master().map(|(_, client)| client)
    }

    fn link(&self) -> &Link {
        &self.link
    }

    fn masters(&self) -> Result<Vec<Route>, BrokerError> {
        Ok(vec![Route::Any])
    }

    fn unreachable(&self, _address: &str) {
        Sentinels::forget(self);
    }

    fn forget(&self) {
        Sentinels::forget(self);
    }

    fn moves(&self) -> u64 {
        Sentinels::moves(self)
    }

    /// The watcher that hears of a failover the moment it happens.
    fn follow(
        self: Arc<Self>,
        subscriptions: &Arc<SubscriptionSockets>,
    ) -> Result<Option<Follower>, BrokerError> {
        let addresses = self.addresses.clone();
        let master_name = self.master_name.clone();
        let link = self.link.clone();
        let moved = Box::new(move || self.moved());
        let watcher = Watcher::start(addresses, master_name, link, moved, subscriptions)?;
        Ok(Some(Box::new(watcher)))
    }

    fn describe(&self) -> String {
        Sentinels::describe(self)
    }
}
