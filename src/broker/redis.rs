//! The Redis broker: one `SUBSCRIBE` connection per chat connection (or, in
//! shared mode, per room), and a small shared pool of publishing connections.
//!
//! **Subscribing.** By default each chat connection's subscriber thread opens
//! its own Redis connection and blocks reading it, as the design asks. With
//! `--subscriptions shared` a room's reader thread does that once for all the
//! room's clients on this instance, and its dispatcher fans out over their
//! queues (`SharedFeeds` below, and [`fanout`](super::fanout)).
//!
//! A subscription is read by hand ([`pubsub`](super::pubsub)) rather than
//! with the `redis` crate's `PubSub`, whose blocking `get_message` cannot be
//! interrupted and cannot tell whether more messages are already buffered.
//! Owning the socket, [`Canceller::cancel`] sets a flag and shuts the socket
//! down: the blocked read returns at once. The listener checks the flag only
//! after its socket is registered with the canceller and `SUBSCRIBE` is
//! acknowledged, so a cancel can never fall in a gap. (An earlier version
//! published on a private wake channel per connection; `CLIENT KILL` would
//! need admin rights, and a read timeout would poll.) A quiet subscription
//! is never pinged: the heartbeat thread checks Redis once for all of them
//! (`Subscriptions` below).
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
//! **Rooms' state in Redis.** A room's history is a list bounded in count
//! and in bytes, with its size in bytes kept in a key beside it. A chat
//! message is appended and published by one Lua script
//! (`RECORD_AND_PUBLISH`, in `broker/scripts.rs`): Redis runs a script whole or not at all, so a
//! message is either recorded *and* published, or neither — and when Redis
//! refuses writes (`maxmemory` with `noeviction`), the sender is told so
//! truthfully. The message is in the history before anyone can receive it.
//! A room's members are a hash, connection id → nickname. Every instance
//! refreshes a key `threadchat:instance:{id}` (30 s expiry) every 10 s from
//! its heartbeat thread; members whose instance key has expired — the
//! instance crashed or was killed — are left out of member lists and
//! removed. Every per-room key expires `--room-ttl` after its last use:
//! each message and join refreshes it, and the heartbeat refreshes the keys
//! of rooms that have members on this instance, so only abandoned rooms
//! expire.
//!
//! **Queries** (history, member lists, joins, health checks) have a
//! connections and threads of their own (`tc-query-0` and `-1`, taken in
//! turn), so a flood of them never queues in front of a `PUBLISH`. Two, as
//! for publishing: during a join storm every joiner makes a few queries in a
//! row, and with one connection the storm's welcomes took longer, and idle
//! clients cost about 1 KiB more (docs/PERFORMANCE.md).
//!
//! **Shutdown.** Dropping the [`RedisBroker`] stops the heartbeat and drops
//! the job senders; each publisher's `recv()` then fails, it leaves its loop,
//! and the drop joins it.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use redis::{Client, Connection};

use super::fanout::{Fanout, FanoutListener, Source};
use super::pubsub::{PubSubConnection, Push};
use super::scripts::{HISTORY_MARK, RECORD_AND_PUBLISH, SCRIPTS, is_no_script, sha_of};
use super::{
    Backoff, Broker, BrokerError, Canceller, Event, Flow, Listen, Presence, Receipt, Settings,
    StopSignal, Subscription, SubscriptionMode,
};
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Incoming, Nickname, Room};

/// Publisher threads (and so publishing connections) per process.
pub const POOL_SIZE: usize = 2;
/// Most `PUBLISH` commands sent in one pipeline.
pub const MAX_PIPELINE: usize = 256;
/// Jobs each publisher queues before `publish` blocks (back-pressure on the
/// clients that are sending).
const QUEUE_CAPACITY: usize = 1024;
/// How long a publisher or a new subscription waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a publishing connection waits for Redis to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest back-off between attempts to restore a lost subscription.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Relays through Redis.
pub struct RedisBroker {
    client: Client,
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
    subscriptions: Arc<Subscriptions>,
}

/// Every subscription socket of a broker (weakly: a listener's `Current`),
/// so that one failed liveness check restarts them all.
///
/// Why one check per process and not one per subscription: a subscription
/// connection is silent while its room is, and a paused Redis (or a
/// half-open connection to it) looks just like a quiet room. Checking each
/// subscription with its own PING cost a wake-up per client every few
/// seconds — 1.9% of a core for 5,000 idle per-client subscriptions. All of
/// a process's subscriptions go to the same Redis, so the heartbeat thread
/// checks it once every [`HEARTBEAT`] for all of them; when Redis does not
/// answer, it shuts every subscription socket down, and each listener
/// reconnects as after any loss. A single connection that dies silently
/// while Redis is fine is the kernel's business: subscription sockets have
/// TCP keepalive (see `pubsub::PubSubConnection::connect`).
#[derive(Default)]
struct Subscriptions(Mutex<Tracked>);

#[derive(Default)]
struct Tracked {
    currents: Vec<std::sync::Weak<CurrentSocket>>,
    /// Forget ended listeners when the list reaches this length (amortised).
    prune_at: usize,
}

impl Subscriptions {
    fn track(&self, current: &Current) {
        let mut tracked = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if tracked.currents.len() >= tracked.prune_at {
            tracked.currents.retain(|c| c.strong_count() > 0);
            tracked.prune_at = (tracked.currents.len() * 2).max(64);
        }
        tracked.currents.push(Arc::downgrade(current));
    }

    /// Shuts down every live subscription's socket; returns how many.
    fn restart_all(&self) -> usize {
        let tracked = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut restarted = 0;
        for current in tracked.currents.iter().filter_map(|c| c.upgrade()) {
            if current.shut_down() {
                restarted += 1;
            }
        }
        restarted
    }
}

/// Commands waiting for a publisher thread.
struct Job {
    cmds: Vec<redis::Cmd>,
    reply: Reply,
}

/// The outcome of one job: its commands' replies, or why it failed. An
/// error reply to any of its commands fails the job (and only that job).
fn job_result(values: Vec<redis::Value>) -> Result<Vec<redis::Value>, BrokerError> {
    match values.iter().find_map(|v| match v {
        redis::Value::ServerError(e) => Some(e),
        _ => None,
    }) {
        Some(e) => Err(BrokerError::Refused(e.to_string())),
        None => Ok(values),
    }
}

/// Who is waiting for a [`Job`]'s answer.
enum Reply {
    /// Nobody: fire-and-forget (heartbeats, clean-ups).
    None,
    /// A caller that wants the replies, one per command.
    Values(Sender<Result<Vec<redis::Value>, BrokerError>>),
    /// A publisher's [`Receipt`]: only success or failure.
    Done(Sender<Result<(), BrokerError>>),
}

impl Reply {
    fn send(self, result: Result<Vec<redis::Value>, BrokerError>) {
        // The caller may have given up waiting; that is fine.
        match self {
            Reply::None => {}
            Reply::Values(tx) => {
                let _ = tx.send(result);
            }
            Reply::Done(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
        }
    }
}

/// How long an instance's liveness key lives without a refresh.
const INSTANCE_TTL_SECS: u64 = 30;
/// How often the heartbeat refreshes it (more often when `--room-ttl` is
/// shorter than three of these).
const HEARTBEAT: Duration = Duration::from_secs(10);

fn instance_key(instance: &str) -> String {
    format!("threadchat:instance:{instance}")
}

/// Marks an instance alive for [`INSTANCE_TTL_SECS`] more.
fn keep_alive(key: &str) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(key).arg(1).arg("EX").arg(INSTANCE_TTL_SECS);
    set
}

impl RedisBroker {
    /// Connects to the Redis at `url`, checks that it answers `PING` within
    /// `timeout`, and starts the publisher threads.
    pub fn connect(
        url: &str,
        timeout: Duration,
        settings: &Settings,
        metrics: &Arc<Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let connect_err = |e: redis::RedisError| BrokerError::Connect {
            url: url.to_owned(),
            reason: e.to_string(),
        };
        let client = Client::open(url).map_err(connect_err)?;
        let mut con = client
            .get_connection_with_timeout(timeout)
            .map_err(connect_err)?;
        con.set_read_timeout(Some(timeout)).map_err(connect_err)?;
        redis::cmd("PING")
            .query::<String>(&mut con)
            .map_err(connect_err)?;

        let mut lanes = Vec::with_capacity(POOL_SIZE + 1);
        let mut publishers = Vec::with_capacity(POOL_SIZE + 1);
        let names = (0..POOL_SIZE)
            .map(|lane| format!("tc-publish-{lane}"))
            .chain((0..POOL_SIZE).map(|lane| format!("tc-query-{lane}")));
        for name in names {
            let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
            let publisher = Publisher {
                client: client.clone(),
                connection: None,
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
            client,
            url: url.to_owned(),
            lanes,
            queries,
            next_lane: AtomicUsize::new(0),
            publishers,
            local_rooms: Arc::default(),
            heartbeat_stop: None,
            heartbeat: None,
            settings: settings.clone(),
            metrics: Arc::clone(metrics),
            shared: None,
            subscriptions: Arc::default(),
        };
        if settings.subscriptions == SubscriptionMode::Shared {
            broker.shared = Some(Arc::new(SharedFeeds {
                fanout: Arc::new(Fanout::new(false, dispatchers_per_room())),
                feeds: Mutex::default(),
                client: broker.client.clone(),
                url: broker.url.clone(),
                metrics: Arc::clone(metrics),
                subscriptions: Arc::clone(&broker.subscriptions),
                max_payload: settings.max_payload,
            }));
        }
        broker.start_heartbeat()?;
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

    /// Runs `cmds` on a query connection and waits for their replies.
    fn run(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<redis::Value>, BrokerError> {
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let job = Job {
            cmds,
            reply: Reply::Values(reply_tx),
        };
        let n = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let queries = self.queries.get(n % POOL_SIZE).ok_or(BrokerError::Closed)?;
        queries.send(job).map_err(|_| BrokerError::Closed)?;
        reply_rx.recv().map_err(|_| BrokerError::Closed)?
    }

    /// `PEXPIRE` for each of a room's keys: they live `--room-ttl` more.
    fn refresh(room: &Room, ttl: Duration) -> impl Iterator<Item = redis::Cmd> {
        let ttl = ttl.as_millis() as u64;
        [
            room.members_key(),
            room.history_key(),
            room.history_bytes_key(),
        ]
        .into_iter()
        .map(move |key| {
            let mut pexpire = redis::cmd("PEXPIRE");
            pexpire.arg(key).arg(ttl);
            pexpire
        })
    }

    /// Runs `cmds` without waiting (or caring) for the outcome.
    fn run_detached(&self, cmds: Vec<redis::Cmd>) {
        let _ = self.lane().try_send(Job {
            cmds,
            reply: Reply::None,
        });
    }

    fn instance_id(&self) -> String {
        format!("{:016x}", self.settings.instance)
    }

    /// Starts the thread that keeps this instance's liveness key fresh and
    /// checks that Redis answers (see [`Subscriptions`]).
    fn start_heartbeat(&mut self) -> Result<(), BrokerError> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let lane = self.lanes[0].clone();
        let key = instance_key(&self.instance_id());
        let subscriptions = Arc::clone(&self.subscriptions);
        let local_rooms = Arc::clone(&self.local_rooms);
        let room_ttl = self.settings.room_ttl;
        // Rooms in use must be refreshed well within their time to live.
        let every = HEARTBEAT.min(room_ttl / 3);
        let handle = thread::Builder::new()
            .name("tc-heartbeat".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                loop {
                    // Rooms in use here do not expire.
                    let mut cmds = vec![keep_alive(&key)];
                    let rooms: Vec<Room> = {
                        let rooms = local_rooms.lock().unwrap_or_else(|p| p.into_inner());
                        rooms.keys().cloned().collect()
                    };
                    for room in &rooms {
                        cmds.extend(RedisBroker::refresh(room, room_ttl));
                    }
                    let _ = lane.try_send(Job {
                        cmds,
                        reply: Reply::None,
                    });
                    // Is Redis there? A PING fails only when the connection
                    // does (an error reply to SET, say out of memory, would
                    // not mean the subscriptions are dead). A paused Redis
                    // is noticed by the publisher's I/O timeout.
                    let (answer_tx, answer) = crossbeam_channel::bounded(1);
                    let ping = Job {
                        cmds: vec![redis::cmd("PING")],
                        reply: Reply::Values(answer_tx),
                    };
                    if lane.try_send(ping).is_ok() {
                        crossbeam_channel::select! {
                            recv(answer) -> answer => if let Ok(Err(e)) = answer {
                                let n = subscriptions.restart_all();
                                log::warn!(
                                    "Redis did not answer the heartbeat ({e}); \
                                     restarting {n} subscription(s)"
                                );
                            },
                            recv(stop_rx) -> _ => break,
                        }
                    }
                    // Shutdown by dropping the sender: recv fails at once.
                    if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) =
                        stop_rx.recv_timeout(every)
                    {
                        break;
                    }
                }
                // Gone on purpose: no need to wait for the key to expire.
                let mut del = redis::cmd("DEL");
                del.arg(&key);
                let _ = lane.try_send(Job {
                    cmds: vec![del],
                    reply: Reply::None,
                });
            })
            .map_err(|e| BrokerError::Redis(format!("cannot start the heartbeat thread: {e}")))?;
        self.heartbeat_stop = Some(stop_tx);
        self.heartbeat = Some(handle);
        Ok(())
    }
}

impl Broker for RedisBroker {
    fn instance(&self) -> u64 {
        self.settings.instance
    }

    fn publish(&self, room: &Room, payload: Vec<u8>, record: bool) -> Receipt {
        let settings = &self.settings;
        let cmd = if record && settings.history > 0 {
            let mut eval = redis::cmd("EVALSHA");
            eval.arg(sha_of(RECORD_AND_PUBLISH))
                .arg(2)
                .arg(room.history_key())
                .arg(room.history_bytes_key())
                .arg(payload)
                .arg(settings.history)
                .arg(settings.history_bytes)
                .arg(settings.room_ttl.as_millis() as u64)
                .arg(room.channel());
            eval
        } else {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(room.channel()).arg(payload);
            publish
        };
        let (answer_tx, answer_rx) = crossbeam_channel::bounded(1);
        let job = Job {
            cmds: vec![cmd],
            reply: Reply::Done(answer_tx),
        };
        // Blocks while the lane's queue is full: back-pressure on senders.
        match self.room_lane(room).send(job) {
            Ok(()) => Receipt::Pending(answer_rx),
            Err(_) => Receipt::Settled(Err(BrokerError::Closed)),
        }
    }

    fn history(&self, room: &Room) -> Result<Vec<Vec<u8>>, BrokerError> {
        if self.settings.history == 0 {
            return Ok(Vec::new());
        }
        let mut lrange = redis::cmd("LRANGE");
        lrange.arg(room.history_key()).arg(0).arg(-1);
        let replies = self.run(vec![lrange])?;
        redis::from_redis_value(replies.into_iter().next().unwrap_or(redis::Value::Nil))
            .map_err(|e| BrokerError::Redis(e.to_string()))
    }

    fn history_mark(&self, room: &Room) -> Result<Option<String>, BrokerError> {
        if self.settings.history == 0 {
            return Ok(None);
        }
        let mut eval = redis::cmd("EVALSHA");
        eval.arg(sha_of(HISTORY_MARK))
            .arg(1)
            .arg(room.history_key());
        let replies = self.run(vec![eval])?;
        redis::from_redis_value(replies.into_iter().next().unwrap_or(redis::Value::Nil))
            .map_err(|e| BrokerError::Redis(e.to_string()))
    }

    fn join(&self, room: &Room, conn: &ConnId, nickname: &Nickname) -> Result<(), BrokerError> {
        let mut hset = redis::cmd("HSET");
        hset.arg(room.members_key())
            .arg(conn.as_str())
            .arg(nickname.as_str());
        let mut cmds = vec![hset];
        cmds.extend(RedisBroker::refresh(room, self.settings.room_ttl));
        self.run(cmds)?;
        let mut rooms = self.local_rooms.lock().unwrap_or_else(|p| p.into_inner());
        *rooms.entry(room.clone()).or_default() += 1;
        Ok(())
    }

    fn leave(&self, room: &Room, conn: &ConnId) -> Result<(), BrokerError> {
        {
            let mut rooms = self.local_rooms.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = rooms.get_mut(room) {
                *count -= 1;
                if *count == 0 {
                    rooms.remove(room);
                }
            }
        }
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(room.members_key()).arg(conn.as_str());
        let mut cmds = vec![hdel];
        cmds.extend(RedisBroker::refresh(room, self.settings.room_ttl));
        self.run(cmds).map(|_| ())
    }

    fn members(&self, room: &Room) -> Result<Vec<String>, BrokerError> {
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(room.members_key());
        let reply = self.run(vec![hgetall])?.into_iter().next();
        let entries: Vec<(String, String)> =
            redis::from_redis_value(reply.unwrap_or(redis::Value::Nil))
                .map_err(|e| BrokerError::Redis(e.to_string()))?;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Which instances are alive? One EXISTS per distinct instance.
        let mut instances: Vec<&str> = entries
            .iter()
            .filter_map(|(conn, _)| ConnId::instance_of(conn))
            .collect();
        instances.sort_unstable();
        instances.dedup();
        let checks = instances
            .iter()
            .map(|i| {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(instance_key(i));
                exists
            })
            .collect();
        let alive: Vec<bool> = self
            .run(checks)?
            .into_iter()
            .map(|v| redis::from_redis_value::<bool>(v).unwrap_or(false))
            .collect();
        let is_alive = |conn: &str| {
            ConnId::instance_of(conn)
                .and_then(|i| instances.binary_search(&i).ok())
                .is_some_and(|n| alive[n])
        };
        let (live, ghosts): (Vec<_>, Vec<_>) = entries.iter().partition(|(conn, _)| is_alive(conn));
        if !ghosts.is_empty() {
            // Members of instances that died: clean them up for everyone.
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(room.members_key());
            for (conn, _) in &ghosts {
                hdel.arg(conn);
            }
            self.run_detached(vec![hdel]);
        }
        let mut members: Vec<String> = live.into_iter().map(|(_, n)| n.clone()).collect();
        members.sort();
        Ok(members)
    }

    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError> {
        let mut hlen = redis::cmd("HLEN");
        hlen.arg(room.members_key());
        let reply = self.run(vec![hlen])?.into_iter().next();
        let count: usize = redis::from_redis_value(reply.unwrap_or(redis::Value::Nil))
            .map_err(|e| BrokerError::Redis(e.to_string()))?;
        if count <= limit {
            // Small room: the exact list, without members of dead instances.
            let nicknames = self.members(room)?;
            return Ok(Presence {
                count: nicknames.len(),
                nicknames,
            });
        }
        // Big room: the count, and a sample of names from one HSCAN step
        // (members of dead instances are cleaned up by full listings).
        let mut hscan = redis::cmd("HSCAN");
        hscan.arg(room.members_key()).arg(0).arg("COUNT").arg(limit);
        let reply = self.run(vec![hscan])?.into_iter().next();
        let (_cursor, entries): (String, Vec<(String, String)>) =
            redis::from_redis_value(reply.unwrap_or(redis::Value::Nil))
                .map_err(|e| BrokerError::Redis(e.to_string()))?;
        let mut nicknames: Vec<String> = entries.into_iter().map(|(_, n)| n).collect();
        nicknames.sort();
        nicknames.truncate(limit);
        Ok(Presence { count, nicknames })
    }

    fn health(&self) -> Result<(), String> {
        // A write, not only a PING: a Redis at `maxmemory` answers PING but
        // refuses every message. (It refreshes this instance's liveness key,
        // which the heartbeat does anyway.)
        match self.run(vec![keep_alive(&instance_key(&self.instance_id()))]) {
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
            &self.client,
            &self.url,
            room.channel(),
            &self.metrics,
            &self.subscriptions,
            false,
            self.settings.max_payload,
        );
        Ok(Subscription::new(Box::new(listener), canceller))
    }

    fn describe(&self) -> String {
        format!("Redis at {}", redact(&self.url))
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        // Shutdown by dropping senders: the heartbeat leaves its loop (after
        // queueing the deletion of its key), then each publisher leaves its.
        self.heartbeat_stop.take();
        if let Some(handle) = self.heartbeat.take() {
            let _ = handle.join();
        }
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

/// Shared-subscription mode: one Redis subscription per room per process,
/// held by the room's *reader thread* (`tc-room-N`). Its *dispatcher
/// threads* (`tc-fan-N-S`, one per core, up to [`MAX_DISPATCHERS`]) each
/// hand what the reader received to their shard of the room's clients here,
/// batching whatever arrived together: a message to a big room is written
/// on every core at once.
///
/// The first client of a room starts its feed; the last one to leave stops
/// it and joins its thread. A client arriving while the feed is subscribed
/// is subscribed at once; one arriving earlier waits for the feed's first
/// `Subscribed` (or is refused, as in per-client mode, if the feed's first
/// attempt fails).
struct SharedFeeds {
    fanout: Arc<Fanout>,
    /// Channel → its running feed. Locked while registering and
    /// unregistering, so a room's feed is started and stopped exactly once.
    feeds: Mutex<HashMap<String, RoomFeed>>,
    client: Client,
    url: String,
    metrics: Arc<Metrics>,
    subscriptions: Arc<Subscriptions>,
    max_payload: usize,
}

/// A room's running feed: a reader thread and its dispatcher threads.
struct RoomFeed {
    canceller: Canceller,
    reader: JoinHandle<()>,
    dispatchers: Vec<JoinHandle<()>>,
}

/// Most dispatcher threads per room: one per core, up to this many.
const MAX_DISPATCHERS: usize = 4;

/// How many dispatcher threads each room gets.
fn dispatchers_per_room() -> usize {
    thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_DISPATCHERS)
}

/// Events a room's reader may queue for each dispatcher.
const FEED_QUEUE: usize = 1024;
/// Most events one dispatch hands out.
const MAX_DISPATCH: usize = 256;

impl SharedFeeds {
    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<String, RoomFeed>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(
        self: &Arc<Self>,
        room: &Room,
        conn: &ConnId,
    ) -> Result<Subscription, BrokerError> {
        let channel = room.channel();
        let registered = {
            let mut feeds = self.feeds();
            let registered = self.fanout.register(&channel, conn);
            if let Some(generation) = registered.new_channel {
                match self.start_feed(&channel, generation) {
                    Ok(feed) => {
                        feeds.insert(channel.clone(), feed);
                    }
                    Err(e) => {
                        self.fanout.unregister(&channel, conn);
                        return Err(e);
                    }
                }
            }
            registered
        };
        let direct = registered.direct;
        let listener = FanoutListener {
            inbox: registered.inbox,
            guard: FeedRegistration {
                feeds: Arc::clone(self),
                channel,
                conn: conn.clone(),
            },
        };
        // Cancelling drops the stop sender; the listener `select!`s on it.
        Ok(Subscription::new(Box::new(listener), Canceller::new(|| {})).with_direct(direct))
    }

    fn start_feed(&self, channel: &str, generation: u64) -> Result<RoomFeed, BrokerError> {
        let (listener, canceller) = RedisListener::new(
            &self.client,
            &self.url,
            channel.to_owned(),
            &self.metrics,
            &self.subscriptions,
            true,
            self.max_payload,
        );
        let listener = Box::new(listener);
        let stop = canceller.signal();
        let spawn_error = |e| BrokerError::Redis(format!("cannot start a room's feed thread: {e}"));
        // The dispatchers: each takes whatever the reader has queued for it
        // and hands it to its shard of the room's clients as one batch. They
        // end when the reader does (it drops their queues' senders).
        let mut senders = Vec::new();
        let mut dispatchers = Vec::new();
        for shard in 0..self.fanout.shards() {
            let (events_tx, events_rx) = crossbeam_channel::bounded::<Event>(FEED_QUEUE);
            let fanout = Arc::clone(&self.fanout);
            let channel = channel.to_owned();
            let source = Source { generation, shard };
            let dispatcher = thread::Builder::new()
                .name(format!("tc-fan-{generation}-{shard}"))
                .stack_size(crate::THREAD_STACK_SIZE)
                .spawn(move || {
                    while let Ok(first) = events_rx.recv() {
                        let mut events = Vec::with_capacity(16);
                        events.push(first);
                        events.extend(events_rx.try_iter().take(MAX_DISPATCH - 1));
                        fanout.dispatch_all(&channel, Some(source), events);
                    }
                });
            match dispatcher {
                Ok(dispatcher) => {
                    senders.push(events_tx);
                    dispatchers.push(dispatcher);
                }
                Err(e) => {
                    drop(senders);
                    join_all(dispatchers);
                    return Err(spawn_error(e));
                }
            }
        }
        // The reader: blocks on the room's Redis subscription, and queues
        // each event for every dispatcher. If one falls behind, the reader
        // blocks on its queue, and Redis buffers.
        let channel = channel.to_owned();
        let reader = thread::Builder::new()
            .name(format!("tc-room-{generation}"))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                let result = listener.listen(&stop, &mut |event| match event {
                    Event::Idle => Flow::Continue(()),
                    event => {
                        for events in &senders {
                            if events.send(event.clone()).is_err() {
                                return Flow::Break(());
                            }
                        }
                        Flow::Continue(())
                    }
                });
                // The one place this thread's errors are logged.
                if let Err(e) = result {
                    log::error!("the shared subscription to {channel} failed: {e}");
                }
            });
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                // The queues' senders are gone with the closure: the
                // dispatchers end.
                join_all(dispatchers);
                return Err(spawn_error(e));
            }
        };
        Ok(RoomFeed {
            canceller,
            reader,
            dispatchers,
        })
    }
}

/// Joins a feed's dispatcher threads (once their queues' senders are
/// gone); true if any of them panicked.
fn join_all(dispatchers: Vec<JoinHandle<()>>) -> bool {
    dispatchers
        .into_iter()
        .map(JoinHandle::join)
        .fold(false, |panicked, joined| panicked | joined.is_err())
}

/// A client's place in a shared feed. Dropping it unregisters the client,
/// and the last client out stops the feed and joins its thread.
struct FeedRegistration {
    feeds: Arc<SharedFeeds>,
    channel: String,
    conn: ConnId,
}

impl Drop for FeedRegistration {
    fn drop(&mut self) {
        let stopped = {
            let mut feeds = self.feeds.feeds();
            if self.feeds.fanout.unregister(&self.channel, &self.conn) {
                feeds.remove(&self.channel)
            } else {
                None
            }
        };
        if let Some(feed) = stopped {
            feed.canceller.cancel();
            // The reader first: its end ends the dispatchers.
            let reader_panicked = feed.reader.join().is_err();
            if join_all(feed.dispatchers) || reader_panicked {
                log::error!("a feed thread of {} panicked", self.channel);
            }
        }
    }
}

/// Hides a password in a Redis URL before it is logged.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// One publisher thread's state: its connection, opened lazily and reopened
/// after a failure.
struct Publisher {
    client: Client,
    connection: Option<Connection>,
}

impl Publisher {
    /// The thread's loop: take all queued jobs, pipeline them, answer each.
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            batch.extend(jobs.try_iter().take(MAX_PIPELINE - 1));
            match self.execute(&batch) {
                Ok(replies) => {
                    let mut replies = replies.into_iter();
                    for job in batch {
                        let mine: Vec<redis::Value> =
                            replies.by_ref().take(job.cmds.len()).collect();
                        job.reply.send(job_result(mine));
                    }
                }
                Err(e) => {
                    log::warn!("Redis command batch failed ({} job(s)): {e}", batch.len());
                    for job in batch {
                        job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Sends every job's commands as one pipeline; an error reply fails
    /// only its own job (see [`job_result`]).
    ///
    /// A connection that turns out to have been closed (say Redis restarted
    /// since the last batch) is replaced, and the batch sent once more: the
    /// closed connection carried nothing to Redis. A batch that Redis does
    /// not answer in time is *not* sent again — a paused or overloaded
    /// Redis may still carry it out — and its outcome is
    /// [`BrokerError::Uncertain`].
    fn execute(&mut self, batch: &[Job]) -> Result<Vec<redis::Value>, BrokerError> {
        if batch.iter().all(|job| job.cmds.is_empty()) {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in batch.iter().flat_map(|job| &job.cmds) {
            pipe.add_command(cmd.clone());
        }
        let mut last_error = None;
        for _attempt in 0..2 {
            let con = self.connection()?;
            match pipe.query::<Vec<redis::Value>>(con) {
                Ok(replies) => {
                    // A script flushed from Redis (`SCRIPT FLUSH`): load it
                    // again on a fresh connection for the next batch.
                    if replies.iter().any(is_no_script) {
                        self.connection = None;
                    }
                    return Ok(replies);
                }
                Err(e) => {
                    self.connection = None;
                    if e.is_timeout() {
                        return Err(BrokerError::Uncertain(e.to_string()));
                    }
                    last_error = Some(BrokerError::Redis(e.to_string()));
                    if !e.is_connection_dropped() {
                        break;
                    }
                }
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }

    /// The thread's connection, opened (and the script loaded) if need be.
    fn connection(&mut self) -> Result<&mut Connection, BrokerError> {
        if self.connection.is_none() {
            let con = self
                .client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .and_then(|mut con| {
                    con.set_read_timeout(Some(IO_TIMEOUT))?;
                    con.set_write_timeout(Some(IO_TIMEOUT))?;
                    for script in SCRIPTS {
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script)
                            .query::<String>(&mut con)?;
                    }
                    Ok(con)
                })
                .map_err(|e| BrokerError::Redis(e.to_string()))?;
            self.connection = Some(con);
        }
        Ok(self.connection.as_mut().expect("just set"))
    }
}

/// A blocking Redis subscription: a client's own (per-client mode), or a
/// room's shared one (shared mode, run by the room's feed thread).
struct RedisListener {
    /// Where Redis is (and the password, if any).
    info: redis::ConnectionInfo,
    url: String,
    channel: String,
    /// The current connection's socket, for the canceller to shut down.
    current: Current,
    metrics: Arc<Metrics>,
    /// A room's shared subscription: it never gives up (clients come and
    /// go; it stops when the last one leaves), and reports every failed
    /// attempt, not only the loss of a live subscription.
    shared: bool,
    /// Longest payload read into memory (see [`Push::Oversized`]).
    max_payload: usize,
}

impl Listen for RedisListener {
    /// Subscribes, delivers, and when the connection is lost, reconnects with
    /// back-off and subscribes again — until cancelled.
    fn listen(
        self: Box<Self>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<(), BrokerError> {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut state = ListenState::default();
        loop {
            state.live = false;
            let error = match self.connection(stop, on_event, &mut state) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            // Cancelled: the canceller shut the socket down; not a failure.
            if stop.is_stopped() {
                return Ok(());
            }
            if !state.ever_subscribed && !self.shared {
                // Never got going: the caller refuses the client instead.
                return Err(error);
            }
            if state.live {
                self.metrics.subscriptions_lost.inc();
                state.down.replace(Down::new(&self.metrics));
                log::debug!("subscription to {} lost: {error}", self.channel);
                if on_event(Event::Lost(Arc::new(error))).is_break() {
                    return Ok(());
                }
                backoff.reset();
            } else if self.shared {
                // A room's shared subscription serves clients that are
                // waiting to join: each failed attempt tells them.
                if on_event(Event::Lost(Arc::new(error))).is_break() {
                    return Ok(());
                }
            }
            if stop.sleep(backoff.next_delay()) {
                return Ok(());
            }
        }
    }
}

/// Where a listener stands, across its reconnections.
#[derive(Default)]
struct ListenState {
    /// Subscribed on the current connection.
    live: bool,
    /// Subscribed at least once (later failures are losses to recover from,
    /// not a failure to join).
    ever_subscribed: bool,
    /// Present while the subscription is lost and not yet restored.
    down: Option<Down>,
}

/// A subscription that is down, counted in `subscriptions_down` for as
/// long as this value lives (so every way out of `listen` uncounts it).
struct Down(Arc<Metrics>);

impl Down {
    fn new(metrics: &Arc<Metrics>) -> Down {
        metrics.subscriptions_down.inc();
        Down(Arc::clone(metrics))
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        self.0.subscriptions_down.dec();
    }
}

impl RedisListener {
    /// A listener for `channel`, and the canceller that stops it.
    fn new(
        client: &Client,
        url: &str,
        channel: String,
        metrics: &Arc<Metrics>,
        subscriptions: &Subscriptions,
        shared: bool,
        max_payload: usize,
    ) -> (RedisListener, Canceller) {
        let current = Current::default();
        subscriptions.track(&current);
        let canceller = {
            let current = Arc::clone(&current);
            // Wakes a read blocked on the current connection, wherever it
            // is; `listen` checks the flag after every connect and read.
            Canceller::new(move || {
                current.shut_down();
            })
        };
        let listener = RedisListener {
            info: client.get_connection_info().clone(),
            url: url.to_owned(),
            channel,
            current,
            metrics: Arc::clone(metrics),
            shared,
            max_payload,
        };
        (listener, canceller)
    }

    /// One connection's worth of subscription: connect, subscribe, deliver.
    /// Returns `Ok` when stopped, `Err` when the connection fails.
    fn connection(
        &self,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let (mut con, socket) =
            PubSubConnection::connect(&self.info, CONNECT_TIMEOUT, self.max_payload).map_err(
                |e| BrokerError::Connect {
                    url: redact(&self.url),
                    reason: e.to_string(),
                },
            )?;
        self.current.set(Some(socket));
        let result = self.receive(&mut con, stop, on_event, state);
        self.current.set(None);
        result
    }

    fn receive(
        &self,
        con: &mut PubSubConnection,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let lost = |e: std::io::Error| BrokerError::Redis(e.to_string());
        con.set_read_timeout(Some(IO_TIMEOUT)).map_err(lost)?;
        con.subscribe(&[&self.channel]).map_err(lost)?;
        // From now on the connection is silent while the room is: no read
        // timeout. A Redis that stops answering is noticed by the heartbeat,
        // which shuts this socket down (see `Subscriptions`).
        con.set_read_timeout(None).map_err(lost)?;
        state.live = true;
        // Restored (if it was down): no longer counted as down.
        drop(state.down.take());
        if state.ever_subscribed {
            self.metrics.redis_reconnects.inc();
        }
        state.ever_subscribed = true;
        // Only now, with the socket registered for the canceller and
        // SUBSCRIBE acknowledged, is a cancel sure to be seen.
        if stop.is_stopped() || on_event(Event::Subscribed).is_break() {
            return Ok(());
        }
        loop {
            // Cancelling shuts the socket down, so this returns at once.
            if let Err(e) = con.wait() {
                if stop.is_stopped() {
                    return Ok(());
                }
                return Err(lost(e));
            }
            if stop.is_stopped() {
                return Ok(());
            }
            let incoming = match con.next().map_err(lost)? {
                Push::Message { channel, payload } if channel == self.channel.as_bytes() => {
                    Some(Incoming::parse(&payload))
                }
                Push::Oversized { channel, len } if channel == self.channel.as_bytes() => {
                    Some(Incoming::oversized(len))
                }
                _ => None,
            };
            if let Some(incoming) = incoming
                && on_event(Event::Message(Arc::new(incoming))).is_break()
            {
                return Ok(());
            }
            // Messages Redis sent together are written to the client
            // together: flush only when nothing more is already here. Also
            // after a reply that is not a message (a pong, a confirmation):
            // it may have come in the same read as the last message.
            if !con.has_buffered() && on_event(Event::Idle).is_break() {
                return Ok(());
            }
        }
    }
}

/// The socket of a listener's current connection, if it has one: shared
/// with the listener's canceller and with [`Subscriptions`], which shut it
/// down to wake the listener.
type Current = Arc<CurrentSocket>;

#[derive(Default)]
struct CurrentSocket(Mutex<Option<Arc<TcpStream>>>);

impl CurrentSocket {
    fn set(&self, socket: Option<Arc<TcpStream>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = socket;
    }

    /// Shuts the socket down, so that a read blocked on it returns at once;
    /// false when there is no connection right now.
    fn shut_down(&self) -> bool {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(stream) => {
                let _ = stream.shutdown(Shutdown::Both);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("redis://:pw@host:1/2"), "redis://***@host:1/2");
        assert_eq!(redact("redis://host:1"), "redis://host:1");
    }

    /// A message that arrives in the same read as a reply that is not a
    /// message (here a pong) is still followed by `Idle`, the subscriber's
    /// cue to write it out. (It was not: the message waited, unwritten, for
    /// the next one — seen as a client missing a message in the
    /// 5,000-client benchmark, when subscriptions still had keepalive
    /// PINGs of their own.) The peer is a scripted one, to put both replies
    /// in one write.
    #[test]
    fn a_message_read_with_a_pong_is_flushed() {
        let peer = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", peer.local_addr().unwrap());
        let script = thread::spawn(move || {
            let (mut redis, _) = peer.accept().unwrap();
            let mut command = [0u8; 256];
            let _ = redis.read(&mut command).unwrap(); // SUBSCRIBE ch
            redis
                .write_all(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
                .unwrap();
            let payload = br#"{"nickname":"ann","message":"hi"}"#;
            let mut both =
                format!("*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n${}\r\n", payload.len()).into_bytes();
            both.extend_from_slice(payload);
            both.extend_from_slice(b"\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n");
            redis.write_all(&both).unwrap();
            // Hold the connection until the listener is cancelled.
            let _ = redis.read(&mut command);
        });
        let client = Client::open(url.as_str()).unwrap();
        let metrics = Arc::new(Metrics::default());
        let subscriptions = Subscriptions::default();
        let (listener, canceller) = RedisListener::new(
            &client,
            &url,
            "ch".into(),
            &metrics,
            &subscriptions,
            false,
            1024,
        );
        let subscription = Subscription::new(Box::new(listener), canceller.clone());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let listening = thread::spawn(move || {
            subscription.run(|event| {
                let name = match event {
                    Event::Subscribed => "subscribed",
                    Event::Message(_) => "message",
                    Event::Idle => "idle",
                    Event::Lost(_) => "lost",
                };
                let _ = events_tx.send(name);
                Flow::Continue(())
            })
        });
        let timeout = Duration::from_secs(5);
        for expected in ["subscribed", "message", "idle"] {
            assert_eq!(events.recv_timeout(timeout), Ok(expected));
        }
        canceller.cancel();
        assert_eq!(listening.join().unwrap(), Ok(()));
        script.join().unwrap();
    }
}
