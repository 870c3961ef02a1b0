//! The [`RedisBroker`]: what it holds, how it starts and stops, and the
//! [`Broker`] trait's answers, each a job for the publisher or query
//! threads (see the module doc of [`redis`](super)).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::broker::api::{Broker, Log, Mark, MemberChange, Place, Presence, Receipt, Settings};
use crate::broker::error::BrokerError;
use crate::broker::fanout::Fanout;
use crate::broker::places::PlaceKey;
use crate::broker::subscription::Subscription;
use crate::config::{RedisTarget, Subscriptions};
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Nickname, Room};

use super::coalesce::{Event, ScriptSettings};
use super::gaps::Gaps;
use super::ghosts::{Again, Ghosts, swap_nickname};
use super::heartbeat::{Beat, Heartbeat, keep_alive};
use super::job::{Job, Reply, Route};
use super::link::Link;
use super::listener::Listeners;
use super::listener::{Patience, RedisListener};
use super::members::Members;
use super::nodes::{Follower, Nodes, OneServer};
use super::position::Position;
use super::publisher::Publisher;
use super::queries::{Queues, from_value, refresh};
use super::settings::{POOL_SIZE, QUEUE_CAPACITY};
use super::shared::{SharedFeeds, dispatchers_per_room};
use super::{ha, idle, keys, place_keys};

/// Relays through Redis.
pub struct RedisBroker {
    /// Where Redis is: asked afresh by every connection that opens or
    /// reopens.
    nodes: Arc<dyn Nodes>,
    /// The publisher threads' and the query threads' queues. Dropping them
    /// stops those threads.
    queues: Queues,
    /// The publisher threads and the query threads, joined on drop.
    publishers: Vec<JoinHandle<()>>,
    /// Rooms with members on this instance, and how many: the heartbeat
    /// keeps their keys from expiring.
    local_rooms: Arc<Mutex<HashMap<Room, usize>>>,
    /// The heartbeat thread, stopped when dropped.
    heartbeat: Option<Heartbeat>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// In shared-subscription mode, the rooms' feeds.
    shared: Option<Arc<SharedFeeds>>,
    /// What follows the nodes' moves as they happen, if anything does
    /// (with Sentinel, the thread that hears of failovers).
    follower: Option<Follower>,
    /// The thread that keeps rooms nobody is in under their budget
    /// (`idle.rs`).
    idle: Option<idle::IdleRooms>,
    /// Each room's place key, as last read (`place_keys.rs`).
    place_keys: Arc<place_keys::PlaceKeys>,
    /// What this instance really has in each room, and the changes waiting
    /// for Redis to come back (`ghosts.rs`).
    ghosts: Arc<Ghosts>,
    /// What its subscriptions share (where Redis is, the log reader for
    /// gaps, every subscription's socket), built once here.
    listeners: Arc<Listeners>,
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
        let link = Link::new(target);
        let connect_err = |e: redis::RedisError| BrokerError::Connect {
            url: url.clone(),
            reason: link.explain(&e),
        };
        let nodes: Arc<dyn Nodes> = match ha::nodes(target, &link) {
            Some(wing) => wing?,
            None => Arc::new(OneServer::new(&url, link.clone())?),
        };
        // Every master answers (a cluster has several).
        for route in nodes.masters()? {
            let mut con = nodes
                .node(&route)?
                .1
                .get_connection_with_timeout(timeout)
                .map_err(connect_err)?;
            con.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            redis::cmd("PING")
                .query::<String>(&mut con)
                .map_err(connect_err)?;
            if settings.wait_replicas > 0 {
                warn_if_short_of_replicas(&mut con, settings.wait_replicas);
            }
            // Sharded pub/sub came with Redis 7.
            if let Route::Node(address) = route {
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
            let bounds = ScriptSettings {
                history: settings.history,
                history_bytes: settings.history_bytes,
                room_ttl: settings.room_ttl,
                sharded: nodes.sharded(),
                wait_replicas: settings.wait_replicas,
            };
            let publisher = Publisher::new(Arc::clone(&nodes), bounds);
            let handle = thread::Builder::new()
                .name(name)
                .stack_size(crate::THREAD_STACK_SIZE)
                .spawn(move || publisher.run(rx))
                .map_err(|e| BrokerError::Redis(format!("cannot start a publisher thread: {e}")))?;
            lanes.push(tx);
            publishers.push(handle);
        }
        let queries = lanes.split_off(POOL_SIZE);
        let place_keys = Arc::new(place_keys::PlaceKeys::default());
        let mut broker = RedisBroker {
            listeners: Arc::new(Listeners {
                nodes: Arc::clone(&nodes),
                gaps: Arc::new(Gaps::new(&nodes, settings.history)),
                url: url.to_owned(),
                metrics: Arc::clone(metrics),
                sockets: Arc::default(),
                max_payload: settings.max_payload,
                parse_once: Default::default(),
                outage: Arc::default(),
                place_keys: Arc::clone(&place_keys),
            }),
            nodes,
            queues: Queues::new(lanes, queries),
            publishers,
            local_rooms: Arc::default(),
            place_keys,
            heartbeat: None,
            settings: settings.clone(),
            metrics: Arc::clone(metrics),
            shared: None,
            follower: None,
            idle: None,
            ghosts: Arc::new(Ghosts::new(settings.instance, metrics)),
        };
        if settings.subscriptions == Subscriptions::Shared {
            broker.shared = Some(Arc::new(SharedFeeds {
                fanout: Arc::new(Fanout::new(false, dispatchers_per_room())),
                feeds: Mutex::default(),
                listeners: Arc::clone(&broker.listeners),
                capacity: Arc::clone(&settings.capacity),
            }));
        }
        broker.heartbeat = Some(Heartbeat::start(Beat {
            lane: broker.queues.lanes[0].clone(),
            key: keys::instance(&broker.instance_id()),
            subscriptions: Arc::clone(&broker.listeners.sockets),
            nodes: Arc::clone(&broker.nodes),
            local_rooms: Arc::clone(&broker.local_rooms),
            room_ttl: settings.room_ttl,
            ghosts: Arc::clone(&broker.ghosts),
            queues: broker.queues.clones(),
            relay_back: broker.listeners.outage.relay_back(),
        })?);
        broker.idle = Some(idle::IdleRooms::start(
            broker.queues.queries.clone(),
            Arc::clone(&broker.local_rooms),
            settings.idle_rooms_bytes,
            settings.room_ttl,
        )?);
        broker.follower = Arc::clone(&broker.nodes).follow(&broker.listeners.sockets)?;
        Ok(broker)
    }

    /// The rooms' member lists and claimed nicknames.
    fn members(&self) -> Members<'_> {
        Members {
            queues: &self.queues,
            room_ttl: self.settings.room_ttl,
            own: self.instance_id(),
        }
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
        // Blocks while the lane's queue is full: back-pressure on senders.
        let Some(lane) = self.queues.room_lane(room) else {
            return Receipt::Settled(Err(BrokerError::Closed));
        };
        if let MemberChange::Leave(_) = &event.change {
            // A leave must reach Redis in the end: sent again if it fails.
            return match self
                .ghosts
                .send(Some(lane), Again::Event(event), Some(answer_tx))
            {
                Ok(()) => Receipt::Pending(answer_rx),
                Err(e) => Receipt::Settled(Err(e)),
            };
        }
        let job = Job::event(event, Reply::Done(answer_tx));
        match lane.send(job) {
            Ok(()) => Receipt::Pending(answer_rx),
            Err(_) => Receipt::Settled(Err(BrokerError::Closed)),
        }
    }

    fn log(&self, room: &Room) -> Result<Log, BrokerError> {
        let mut position = redis::cmd("HGETALL");
        position.arg(keys::meta(room));
        let mut entries = redis::cmd("LRANGE");
        entries.arg(keys::log(room)).arg(0).arg(-1);
        // Where the log begins, its earlier epochs, and what it holds, in
        // one step.
        let (fields, entries): (HashMap<String, String>, Vec<Vec<u8>>) =
            self.queues.transaction(room, vec![position, entries])?;
        let position = Position::from_fields(fields);
        let earlier = position.earlier();
        let Some(epoch) = position.epoch else {
            return Ok(Log::default());
        };
        Ok(Log {
            epoch: Some(epoch),
            first: self.first(position.first.unwrap_or(1), position.last.unwrap_or(0)),
            entries,
            earlier,
        })
    }

    fn log_end(&self, room: &Room) -> Result<Option<Mark>, BrokerError> {
        let reply = self
            .queues
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
            let reply = self.queues.run(Route::room(room), vec![hmget]).ok()?;
            from_value(reply.into_iter().next()).ok()
        })
    }

    fn enter(&self, room: &Room, conn: &ConnId, nickname: &Nickname) -> Result<(), BrokerError> {
        let refresh = refresh(room, self.settings.room_ttl).collect();
        self.queues.run(Route::room(room), refresh)?;
        self.ghosts.enter(room, conn, nickname);
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

    fn exit(&self, room: &Room, conn: &ConnId) {
        self.ghosts.exit(room, conn);
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
        self.members().presence(room, limit)
    }

    fn health(&self) -> Result<(), String> {
        // A write, not only a PING: a Redis at `maxmemory` answers PING but
        // refuses every message. (It refreshes this instance's liveness key,
        // which the heartbeat does anyway.)
        let key = keys::instance(&self.instance_id());
        match self.queues.run(Route::key(&key), vec![keep_alive(&key)]) {
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
        // A client's own: if it never gets going, the client is refused.
        let (listener, canceller) =
            RedisListener::new(&self.listeners, room, Patience::UntilFirstFailure);
        Ok(Subscription::new(Box::new(listener), canceller))
    }

    fn claim_nickname(
        &self,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<bool, BrokerError> {
        // Known here before Redis is asked: a claim just made is no ghost.
        self.ghosts.claiming(room, nickname, conn);
        let claimed = self.members().claim(room, nickname, conn);
        if !matches!(claimed, Ok(true)) {
            self.ghosts.released(room, nickname, conn);
        }
        claimed
    }

    fn release_nickname(&self, room: &Room, nickname: &str, conn: &ConnId) {
        self.ghosts.released(room, nickname, conn);
        // Given back only if `conn` still holds it; sent again if it fails.
        let swap = swap_nickname(room, nickname, conn.as_str(), "");
        let again = Again::Commands(room.clone(), vec![swap]);
        if self
            .ghosts
            .send(self.queues.room_lane(room), again, None)
            .is_err()
        {
            log::debug!("could not give {nickname:?} back in {room}: shutting down");
        }
    }

    fn describe(&self) -> String {
        self.nodes.describe()
    }

    fn log_reset_causes(&self) -> &'static str {
        "Redis was flushed, restarted or failed over more often than the log remembers, \
         or the room expired"
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.follower.take();
        // Shutdown by dropping senders: the heartbeat leaves its loop (after
        // queueing the deletion of its key), then each publisher leaves its.
        self.heartbeat.take();
        // Before the lanes it uses are closed.
        self.idle.take();
        self.shared.take();
        self.queues.lanes.clear();
        self.queues.queries.clear();
        for handle in self.publishers.drain(..) {
            if handle.join().is_err() {
                log::error!("a Redis publisher thread panicked");
            }
        }
    }
}

/// Warns at start when a master has fewer replicas than `--wait-replicas`
/// asks for: every chat message's sender would then wait a second and be
/// told it may or may not have been delivered.
fn warn_if_short_of_replicas(con: &mut redis::Connection, wanted: usize) {
    let Ok(info) = redis::cmd("INFO").arg("replication").query::<String>(con) else {
        return;
    };
    let online = info
        .lines()
        .filter(|line| line.starts_with("slave") && line.contains("state=online"))
        .count();
    if online < wanted {
        log::warn!(
            "--wait-replicas {wanted}, but the Redis master has {online} replica(s) in sync: \
             until it has {wanted}, every chat message's sender waits 1 s and is told it may \
             or may not have been delivered"
        );
    }
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
