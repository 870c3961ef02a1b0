//! The Redis broker: one `SUBSCRIBE` connection per chat connection (or, in
//! shared mode, per room), and a small shared pool of publishing connections.
//!
//! **Subscribing.** By default each chat connection's subscriber thread opens
//! its own Redis connection and blocks reading it, as the design asks. With
//! `--subscriptions shared` a room's listener thread does that once for all the
//! room's clients on this instance, and its dispatcher fans out over their
//! queues (`SharedFeeds` below, and [`fanout`](super::fanout)).
//!
//! A subscription is read by hand ([`pubsub`]) rather than
//! with the `redis` crate's `PubSub`, whose blocking `get_message` cannot be
//! interrupted and cannot tell whether more messages are already buffered.
//! Owning the socket, [`Canceller::cancel`](crate::broker::subscription::Canceller::cancel) sets a flag and shuts the socket
//! down: the blocked read returns at once. The listener checks the flag only
//! after its socket is registered with the canceller and `SUBSCRIBE` is
//! acknowledged, so a cancel can never fall in a gap. (`CLIENT KILL` would
//! need admin rights, and a read timeout would poll.) A quiet subscription
//! is never pinged: the heartbeat thread checks Redis once for all of them
//! (`listener::SubscriptionSockets`).
//!
//! **Where Redis is** ([`Topology`]): one server, a master that Redis
//! Sentinel names (`ha/failover.rs` follows a failover), or the masters of
//! a Redis Cluster (`cluster.rs`: a room lives on the master of its slot,
//! its subscriptions use sharded pub/sub there, and publishers keep a
//! connection per master). Every connection asks it where to go each time
//! it (re)connects. Sentinel and Cluster are the `redis-ha` Cargo feature
//! (`ha/`, on by default).
//!
//! **Publishing.** Opening a Redis connection per client for publishing would
//! double Redis's client count. Instead [`POOL_SIZE`] publisher threads each
//! own one connection and a bounded job queue (a *lane*). A publisher takes
//! every job that is waiting (up to [`MAX_PIPELINE`]) and sends them as one
//! pipeline — one round trip for many messages. A room's messages always
//! take the same lane, and Redis answers one connection's commands in order,
//! so messages reach the room in the order they were queued: a client may
//! have many on their way without any overtaking another.
//! [`Broker::publish`] returns a [`Receipt`] at once; the answer arrives on
//! it when the pipeline has been answered.
//!
//! The same pool runs every other command (history, member lists, health
//! checks), on any lane: a job is a short list of commands and, when the
//! caller waits, a channel for the answer.
//!
//! **Rooms' state in Redis** (key names in [`keys`]). A room's *log* is a
//! list bounded in count and in bytes, with its size in bytes kept in a key
//! beside it and its position (epoch, last offset given, first still held)
//! in a hash. Every chat message, join and leave is given the next offset,
//! logged, and published by one Lua script (`LOG_AND_PUBLISH`, in
//! `scripts.rs`): Redis runs a script whole or not at all, so an event is
//! logged *and* published, or neither — and when Redis refuses writes
//! (`maxmemory` with `noeviction`), the sender is told so truthfully. The
//! same script changes the member list (a hash, connection id → nickname)
//! for a join or a leave, so the list agrees with the log at every offset.
//! A publisher sends a run of one room's events that wait next to each
//! other on its lane as one call of the script (`coalesce.rs`): one
//! `EVALSHA` per message made Redis read too few messages per turn of its
//! event loop. Every instance refreshes a key `threadchat:instance:{id}`
//! (30 s expiry) every 10 s from its heartbeat thread; members whose
//! instance key has expired — the instance crashed or was killed — are
//! left out of member lists and removed (`members.rs`). Every per-room key expires `--room-ttl` after its last use:
//! each message and join refreshes it, and the heartbeat refreshes the keys
//! of rooms that have members on this instance, so only abandoned rooms
//! expire.
//!
//! **Queries** (history, member lists, joins, health checks) have a
//! connections and threads of their own (`tc-query-0` and `-1`, taken in
//! turn), so a flood of them never queues in front of a `PUBLISH`. Two, as
//! for publishing: during a join storm every joiner makes a few queries in a
//! row, and one connection makes them wait for each other.
//!
//! **Shutdown.** Dropping the [`RedisBroker`] stops the heartbeat and drops
//! the job senders; each publisher's `recv()` then fails, it leaves its loop,
//! and the drop joins it.

mod cluster;
mod coalesce;
#[cfg(feature = "redis-ha")]
mod ha;
#[cfg(not(feature = "redis-ha"))]
#[path = "without_ha.rs"]
mod ha;
mod heartbeat;
mod idle;
mod keys;
mod listener;
mod members;
mod place_keys;
mod publisher;
mod pubsub;
mod scripts;
mod shared;
mod topology;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::fanout::Fanout;
use super::{
    Broker, BrokerError, Log, Mark, MemberChange, Place, PlaceKey, Presence, Receipt, Settings,
    Subscription, random_u64,
};
use crate::config::{RedisTarget, Subscriptions};
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Room};
use cluster::Route;
use coalesce::{Event, ScriptSettings};
use heartbeat::keep_alive;
use listener::{RedisListener, SubscriptionSockets};
use publisher::{Job, Publisher, Reply};
use shared::{SharedFeeds, dispatchers_per_room};
pub use topology::Topology;

/// Publisher threads (and so publishing connections) per process.
pub const POOL_SIZE: usize = 2;
/// Most `PUBLISH` commands sent in one pipeline.
pub const MAX_PIPELINE: usize = 256;
/// Jobs each publisher queues before `publish` blocks (back-pressure on the
/// clients that are sending).
const QUEUE_CAPACITY: usize = 1024;
/// How long a publisher or a new subscription waits to connect.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a publishing connection waits for Redis to answer.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a Redis Cluster may send one job or subscription
/// elsewhere (`MOVED`, `ASK`, `TRYAGAIN`) before it counts as failed.
pub(super) const MAX_REDIRECTS: usize = 5;
/// Longest back-off between attempts to restore a lost subscription.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Relays through Redis.
pub struct RedisBroker {
    /// Where Redis is (one server, or a master named by sentinels): asked
    /// afresh by every connection that opens or reopens.
    topology: Arc<Topology>,
    url: String,
    /// One sender per publisher thread. Dropping them stops the publishers.
    lanes: Vec<Sender<Job>>,
    /// The query threads' queues (see the module doc).
    queries: Vec<Sender<Job>>,
    /// Round-robin lane choice.
    next_lane: AtomicUsize,
    /// The publisher threads and the query threads, joined on drop.
    publishers: Vec<JoinHandle<()>>,
    /// Rooms with members on this instance, and how many: the heartbeat
    /// keeps their keys from expiring.
    local_rooms: Arc<Mutex<HashMap<Room, usize>>>,
    /// Dropped to stop the heartbeat thread.
    heartbeat_stop: Option<Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// In shared-subscription mode, the rooms' feeds.
    shared: Option<Arc<SharedFeeds>>,
    /// Every subscription's socket, for the heartbeat to restart them all.
    subscriptions: Arc<SubscriptionSockets>,
    /// With Sentinel, the thread that hears of failovers (`ha/failover.rs`).
    watcher: Option<ha::Watcher>,
    /// The thread that keeps rooms nobody is in under their budget
    /// (`idle.rs`).
    idle: Option<idle::IdleRooms>,
    /// Each room's place key, as last read (`place_keys.rs`).
    place_keys: place_keys::PlaceKeys,
}

impl RedisBroker {
    /// Connects to the Redis `target` names (asking the sentinels, with
    /// Sentinel), checks that it answers `PING` within `timeout`, and starts
    /// the publisher threads.
    pub fn connect(
        target: &RedisTarget,
        timeout: Duration,
        settings: &Settings,
        metrics: &Arc<Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let url = target.url();
        let connect_err = |e: redis::RedisError| BrokerError::Connect {
            url: url.clone(),
            reason: e.to_string(),
        };
        let topology = Arc::new(Topology::new(target)?);
        // Every master answers (a cluster has several).
        for (address, route) in topology.masters()? {
            let mut con = topology
                .node(route)?
                .1
                .get_connection_with_timeout(timeout)
                .map_err(connect_err)?;
            con.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            redis::cmd("PING")
                .query::<String>(&mut con)
                .map_err(connect_err)?;
            // Sharded pub/sub came with Redis 7.
            if let Some(address) = address {
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query(&mut con)
                    .map_err(connect_err)?;
                let version = info
                    .lines()
                    .find_map(|line| line.strip_prefix("redis_version:"))
                    .unwrap_or("?");
                if version
                    .split('.')
                    .next()
                    .and_then(|major| major.parse::<u32>().ok())
                    < Some(7)
                {
                    return Err(BrokerError::Connect {
                        url: url.clone(),
                        reason: format!(
                            "{address} runs Redis {version}: a cluster needs Redis 7 or later \
                             (sharded pub/sub)"
                        ),
                    });
                }
            }
        }

        let mut lanes = Vec::with_capacity(POOL_SIZE + 1);
        let mut publishers = Vec::with_capacity(POOL_SIZE + 1);
        let names = (0..POOL_SIZE)
            .map(|lane| format!("tc-publish-{lane}"))
            .chain((0..POOL_SIZE).map(|lane| format!("tc-query-{lane}")));
        for name in names {
            let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
            let publisher = Publisher {
                topology: Arc::clone(&topology),
                opened_at_move: 0,
                connections: HashMap::new(),
                bounds: ScriptSettings {
                    history: settings.history,
                    history_bytes: settings.history_bytes,
                    room_ttl: settings.room_ttl,
                    sharded: topology.is_cluster(),
                },
            };
            let handle = thread::Builder::new()
                .name(name)
                .stack_size(crate::THREAD_STACK_SIZE)
                .spawn(move || publisher.run(rx))
                .map_err(|e| BrokerError::Redis(format!("cannot start a publisher thread: {e}")))?;
            lanes.push(tx);
            publishers.push(handle);
        }
        let queries = lanes.split_off(POOL_SIZE);
        let mut broker = RedisBroker {
            topology,
            url: url.to_owned(),
            lanes,
            queries,
            next_lane: AtomicUsize::new(0),
            publishers,
            local_rooms: Arc::default(),
            place_keys: Default::default(),
            heartbeat_stop: None,
            heartbeat: None,
            settings: settings.clone(),
            metrics: Arc::clone(metrics),
            shared: None,
            subscriptions: Arc::default(),
            watcher: None,
            idle: None,
        };
        if settings.subscriptions == Subscriptions::Shared {
            broker.shared = Some(Arc::new(SharedFeeds {
                fanout: Arc::new(Fanout::new(false, dispatchers_per_room())),
                feeds: Mutex::default(),
                topology: Arc::clone(&broker.topology),
                url: broker.url.clone(),
                metrics: Arc::clone(metrics),
                subscriptions: Arc::clone(&broker.subscriptions),
                max_payload: settings.max_payload,
                capacity: Arc::clone(&settings.capacity),
            }));
        }
        broker.start_heartbeat()?;
        broker.idle = Some(idle::IdleRooms::start(
            broker.queries.clone(),
            Arc::clone(&broker.local_rooms),
            settings.idle_rooms_bytes,
            settings.room_ttl,
        )?);
        broker.watcher = ha::Watcher::start(&broker.topology, &broker.subscriptions)?;
        Ok(broker)
    }

    /// Any lane, for commands whose order does not matter.
    fn lane(&self) -> &Sender<Job> {
        let n = self.next_lane.fetch_add(1, Ordering::Relaxed);
        &self.lanes[n % self.lanes.len()]
    }

    /// The lane that carries all of `room`'s messages, which keeps them in
    /// order.
    fn room_lane(&self, room: &Room) -> &Sender<Job> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(room.name());
        &self.lanes[hash as usize % self.lanes.len()]
    }

    /// Runs `cmds` (all for `route`) on a query connection and waits for
    /// their replies.
    fn run(&self, route: Route, cmds: Vec<redis::Cmd>) -> Result<Vec<redis::Value>, BrokerError> {
        self.run_each(vec![(route, cmds)])?
            .pop()
            .ok_or(BrokerError::Closed)
    }

    /// Runs each list of commands (each for its route: on a cluster they
    /// may be on different masters) as a job of its own on one query
    /// connection, and waits for all their replies.
    fn run_each(
        &self,
        jobs: Vec<(Route, Vec<redis::Cmd>)>,
    ) -> Result<Vec<Vec<redis::Value>>, BrokerError> {
        let n = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let queries = self.queries.get(n % POOL_SIZE).ok_or(BrokerError::Closed)?;
        let mut answers = Vec::with_capacity(jobs.len());
        for (route, cmds) in jobs {
            let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
            let job = Job::commands(route, cmds, Reply::Values(reply_tx));
            queries.send(job).map_err(|_| BrokerError::Closed)?;
            answers.push(reply_rx);
        }
        answers
            .into_iter()
            .map(|answer| answer.recv().map_err(|_| BrokerError::Closed)?)
            .collect()
    }

    /// Runs `cmds` in one `MULTI`/`EXEC` transaction on a query connection
    /// — Redis runs them with nothing in between — and reads their replies
    /// as `T` (a tuple, one element per command). They are all of `room`.
    fn transaction<T: redis::FromRedisValue>(
        &self,
        room: &Room,
        cmds: Vec<redis::Cmd>,
    ) -> Result<T, BrokerError> {
        let mut all = Vec::with_capacity(cmds.len() + 2);
        all.push(redis::cmd("MULTI"));
        all.extend(cmds);
        all.push(redis::cmd("EXEC"));
        from_value(self.run(Route::room(room), all)?.pop())
    }

    /// `PEXPIRE` for each of a room's keys: they live `--room-ttl` more.
    fn refresh(room: &Room, ttl: Duration) -> impl Iterator<Item = redis::Cmd> {
        let ttl = ttl.as_millis() as u64;
        keys::to_refresh(room).into_iter().map(move |key| {
            let mut pexpire = redis::cmd("PEXPIRE");
            pexpire.arg(key).arg(ttl);
            pexpire
        })
    }

    /// Runs `cmds` (all for `route`) without waiting (or caring) for the
    /// outcome.
    fn run_detached(&self, route: Route, cmds: Vec<redis::Cmd>) {
        let _ = self
            .lane()
            .try_send(Job::commands(route, cmds, Reply::None));
    }

    /// The oldest offset a room's log holds, from its position hash: with
    /// no log kept (`--history 0`) the script does not keep `first`, and
    /// it is always one past the last.
    fn first(&self, first: u64, last: u64) -> u64 {
        if self.settings.history == 0 {
            last + 1
        } else {
            first
        }
    }

    fn instance_id(&self) -> String {
        format!("{:016x}", self.settings.instance)
    }
}

impl Broker for RedisBroker {
    fn instance(&self) -> u64 {
        self.settings.instance
    }

    fn publish(&self, room: &Room, payload: Vec<u8>, change: MemberChange) -> Receipt {
        let (answer_tx, answer_rx) = crossbeam_channel::bounded(1);
        let event = Event {
            room: room.clone(),
            payload,
            change,
        };
        let job = Job::event(event, Reply::Done(answer_tx));
        // Blocks while the lane's queue is full: back-pressure on senders.
        match self.room_lane(room).send(job) {
            Ok(()) => Receipt::Pending(answer_rx),
            Err(_) => Receipt::Settled(Err(BrokerError::Closed)),
        }
    }

    fn log(&self, room: &Room) -> Result<Log, BrokerError> {
        let position = position(room);
        let mut entries = redis::cmd("LRANGE");
        entries.arg(keys::log(room)).arg(0).arg(-1);
        // Where the log begins, and what it holds, in one step.
        let ((epoch, first, last), entries): (LogPosition, Vec<Vec<u8>>) =
            self.transaction(room, vec![position, entries])?;
        let Some(epoch) = epoch else {
            return Ok(Log::default());
        };
        Ok(Log {
            epoch: Some(epoch),
            first: self.first(first.unwrap_or(1), last.unwrap_or(0)),
            entries,
        })
    }

    fn log_end(&self, room: &Room) -> Result<Option<Mark>, BrokerError> {
        let reply = self
            .run(Route::room(room), vec![position(room)])?
            .into_iter()
            .next();
        let (epoch, first, last): LogPosition = from_value(reply)?;
        Ok(epoch.zip(last).map(|(epoch, offset)| Mark {
            end: Place { offset, epoch },
            first: self.first(first.unwrap_or(1), offset),
        }))
    }

    fn place_key(&self, room: &Room, epoch: &str) -> PlaceKey {
        self.place_keys.get(room, epoch, || {
            let mut hmget = redis::cmd("HMGET");
            hmget.arg(keys::meta(room)).arg("epoch").arg("key");
            let reply = self.run(Route::room(room), vec![hmget]).ok()?;
            from_value(reply.into_iter().next()).ok()
        })
    }

    fn enter(&self, room: &Room) -> Result<(), BrokerError> {
        let refresh = RedisBroker::refresh(room, self.settings.room_ttl).collect();
        self.run(Route::room(room), refresh)?;
        let mut rooms = self.local_rooms.lock().unwrap_or_else(|p| p.into_inner());
        let count = rooms.entry(room.clone()).or_default();
        *count += 1;
        if *count == 1
            && let Some(idle) = &self.idle
        {
            idle.entered(room);
        }
        Ok(())
    }

    fn exit(&self, room: &Room) {
        let mut rooms = self.local_rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = rooms.get_mut(room) {
            *count -= 1;
            if *count == 0 {
                rooms.remove(room);
                self.place_keys.forget(room);
                if let Some(idle) = &self.idle {
                    idle.left(room);
                }
            }
        }
    }

    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError> {
        self.room_presence(room, limit)
    }

    fn health(&self) -> Result<(), String> {
        // A write, not only a PING: a Redis at `maxmemory` answers PING but
        // refuses every message. (It refreshes this instance's liveness key,
        // which the heartbeat does anyway.)
        let key = keys::instance(&self.instance_id());
        match self.run(Route::key(&key), vec![keep_alive(&key)]) {
            Ok(_) => {}
            Err(BrokerError::Refused(e)) => return Err(format!("Redis refuses writes: {e}")),
            Err(e) => return Err(format!("Redis does not answer: {e}")),
        }
        match self.metrics.subscriptions_down.get() {
            0 => Ok(()),
            n => Err(format!("{n} subscription(s) are reconnecting to Redis")),
        }
    }

    fn subscribe(&self, room: &Room, conn: &ConnId) -> Result<Subscription, BrokerError> {
        if let Some(shared) = &self.shared {
            return shared.subscribe(room, conn);
        }
        let (listener, canceller) = RedisListener::new(
            &self.topology,
            &self.url,
            room,
            &self.metrics,
            &self.subscriptions,
            Subscriptions::PerClient,
            self.settings.max_payload,
        );
        Ok(Subscription::new(Box::new(listener), canceller))
    }

    fn claim_nickname(
        &self,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<bool, BrokerError> {
        self.claim(room, nickname, conn)
    }

    fn release_nickname(&self, room: &Room, nickname: &str, conn: &ConnId) {
        self.release(room, nickname, conn);
    }

    fn describe(&self) -> String {
        self.topology.describe()
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.watcher.take();
        // Shutdown by dropping senders: the heartbeat leaves its loop (after
        // queueing the deletion of its key), then each publisher leaves its.
        self.heartbeat_stop.take();
        if let Some(handle) = self.heartbeat.take() {
            let _ = handle.join();
        }
        // Before the lanes it uses are closed.
        self.idle.take();
        self.shared.take();
        self.lanes.clear();
        self.queries.clear();
        for handle in self.publishers.drain(..) {
            if handle.join().is_err() {
                log::error!("a Redis publisher thread panicked");
            }
        }
    }
}

/// Hides a password in a Redis URL before it is logged.
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// A secret key for a log epoch that starts (see `scripts::LOG_AND_PUBLISH`):
/// 128 random bits, in hex.
fn new_place_key() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// Reads a room log's position hash: its epoch, the first offset it holds,
/// the last offset given (see [`LogPosition`]).
fn position(room: &Room) -> redis::Cmd {
    let mut hmget = redis::cmd("HMGET");
    hmget
        .arg(keys::meta(room))
        .arg("epoch")
        .arg("first")
        .arg("last");
    hmget
}

/// A log's position hash, as [`position`] reads it.
type LogPosition = (Option<String>, Option<u64>, Option<u64>);

/// A reply, read as `T`.
fn from_value<T: redis::FromRedisValue>(reply: Option<redis::Value>) -> Result<T, BrokerError> {
    redis::from_redis_value(reply.unwrap_or(redis::Value::Nil))
        .map_err(|e| BrokerError::Redis(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("redis://:pw@host:1/2"), "redis://***@host:1/2");
        assert_eq!(redact("redis://host:1"), "redis://host:1");
    }
}
