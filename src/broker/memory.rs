//! The in-process broker: channels are lists of crossbeam senders.
//!
//! It exists so that `make run` works on a machine with no Redis, and so the
//! chat tests can run against both brokers. It keeps the same thread shape as
//! Redis: each subscriber thread blocks on its own bounded queue
//! ([`fanout`](super::fanout), which also explains the bound and what happens
//! to a client that falls behind). History and member lists live in memory,
//! like the channels, under the same bounds as in Redis: a room's history
//! is bounded in count and in bytes, and a room nobody is in is freed
//! `--room-ttl` after its last use, by a small sweeper thread
//! (`tc-expire`), or sooner when the rooms nobody is in hold more than
//! `--idle-rooms-bytes` together: the least recently used go first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use super::fanout::{Fanout, FanoutListener};
use crate::broker::api::{Broker, Log, Mark, MemberChange, Place, Presence, Receipt, Settings};
use crate::broker::error::BrokerError;
use crate::broker::places::PlaceKey;
use crate::broker::subscription::{Canceller, Event, Subscription};
use crate::metrics::Metrics;
use crate::protocol::{self, ConnId, Incoming, Nickname, Room};

/// Relays messages between the connections of this process.
pub struct MemoryBroker {
    settings: Settings,
    /// Channel name → its subscribers' queues. Shared with every
    /// subscription, which removes itself when it ends.
    fanout: Arc<Fanout>,
    /// Room name → its recent chat messages and its members.
    rooms: Arc<Rooms>,
    /// Dropped to stop the sweeper thread, which the drop then joins.
    sweeper_stop: Option<Sender<()>>,
    sweeper: Option<JoinHandle<()>>,
    /// (room, nickname) → the connection that claimed it
    /// (`--unique-nicknames`).
    nicknames: Mutex<HashMap<(String, String), ConnId>>,
}

/// Every room's state, and the gauge that counts them.
struct Rooms {
    state: Mutex<Table>,
    metrics: Arc<Metrics>,
    /// Most bytes the rooms nobody is in may hold together
    /// (`--idle-rooms-bytes`).
    idle_budget: usize,
}

/// What each room costs besides its log (its state, name and map entry),
/// counted against `--idle-rooms-bytes` so that empty logs are not free.
const ROOM_OVERHEAD: usize = 256;

/// The rooms, and those nobody is in in the order they were last used.
#[derive(Default)]
struct Table {
    rooms: HashMap<String, RoomState>,
    /// Rooms nobody is in, least recently used first: use number → name.
    idle: BTreeMap<u64, String>,
    /// What the rooms in `idle` hold together.
    idle_bytes: usize,
    /// Counts uses, to order `idle`.
    uses: u64,
}

struct RoomState {
    /// The newest chat messages of the room's log, each with its offset
    /// and with its place written in (joins and leaves take offsets, but are
    /// not kept: they never push chat out of the history).
    log: VecDeque<(u64, Arc<[u8]>)>,
    /// One past the newest entry the log dropped: it holds every chat
    /// message from there on.
    first: u64,
    /// Bytes in `log`.
    log_bytes: usize,
    /// The log's epoch: new for each room this process creates.
    epoch: String,
    /// The offset of the newest entry (0: none yet).
    last: u64,
    /// (connection, nickname) of everyone in the room.
    members: Vec<(ConnId, String)>,
    /// The last message, join or leave: an empty room is freed
    /// `--room-ttl` after it.
    last_used: Instant,
    /// Connections of this process in the room (`Broker::enter`): a room
    /// with any is never freed.
    present: usize,
    /// While nobody is in it: its place in `Table::idle`, and the bytes it
    /// was counted for there.
    idle: Option<(u64, usize)>,
}

impl Default for RoomState {
    fn default() -> Self {
        RoomState {
            log: VecDeque::new(),
            log_bytes: 0,
            first: 1,
            epoch: crate::broker::random::new_epoch(),
            last: 0,
            members: Vec::new(),
            last_used: Instant::now(),
            present: 0,
            idle: None,
        }
    }
}

impl RoomState {
    /// Nobody is in it: it may be freed.
    fn is_idle(&self) -> bool {
        self.present == 0 && self.members.is_empty()
    }
}

impl Table {
    /// Takes `name` out of the idle rooms (it is being used).
    fn unindex(&mut self, name: &str) {
        if let Some((uses, bytes)) = self.rooms.get_mut(name).and_then(|s| s.idle.take()) {
            self.idle.remove(&uses);
            self.idle_bytes -= bytes;
        }
    }

    /// Puts `name` among the idle rooms, as the most recently used, if
    /// nobody is in it.
    fn index(&mut self, name: &str) {
        self.uses += 1;
        let uses = self.uses;
        let Some(state) = self.rooms.get_mut(name).filter(|s| s.is_idle()) else {
            return;
        };
        let bytes = state.log_bytes + name.len() + ROOM_OVERHEAD;
        state.idle = Some((uses, bytes));
        self.idle.insert(uses, name.to_owned());
        self.idle_bytes += bytes;
    }

    /// Frees `name`.
    fn remove(&mut self, name: &str) {
        self.unindex(name);
        self.rooms.remove(name);
    }

    /// Frees the least recently used idle rooms until they fit in `budget`.
    fn evict(&mut self, budget: usize) {
        while self.idle_bytes > budget {
            let Some((_, name)) = self.idle.pop_first() else {
                break;
            };
            if let Some((_, bytes)) = self.rooms.remove(&name).and_then(|s| s.idle) {
                self.idle_bytes -= bytes;
            }
            log::debug!("forgot room {name}: --idle-rooms-bytes reached");
        }
    }
}

impl RoomState {
    /// The oldest offset the log holds every chat message from: with no
    /// log kept (`--history 0`), always one past the last.
    fn first(&self, history: usize) -> u64 {
        if history == 0 {
            self.last + 1
        } else {
            self.first
        }
    }
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the room's state (created if need be), marked as used;
    /// then frees idle rooms past the budget.
    fn with<T>(&self, room: &Room, f: impl FnOnce(&mut RoomState) -> T) -> T {
        let mut table = self.lock();
        let name = room.name();
        table.unindex(name);
        let state = table.rooms.entry(name.to_owned()).or_default();
        state.last_used = Instant::now();
        let result = f(state);
        table.index(name);
        table.evict(self.idle_budget);
        self.metrics.rooms_in_memory.set(table.rooms.len() as i64);
        result
    }

    /// Frees the rooms that nobody is in and nobody used for `ttl`.
    fn expire(&self, ttl: Duration) {
        let mut table = self.lock();
        let expired: Vec<String> = (table.rooms.iter())
            .filter(|(_, state)| state.is_idle() && state.last_used.elapsed() >= ttl)
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            table.remove(&name);
        }
        self.metrics.rooms_in_memory.set(table.rooms.len() as i64);
    }
}

impl MemoryBroker {
    /// An empty broker, and its sweeper thread.
    pub fn new(settings: &Settings, metrics: &Arc<Metrics>) -> Result<MemoryBroker, BrokerError> {
        let rooms = Arc::new(Rooms {
            state: Mutex::default(),
            metrics: Arc::clone(metrics),
            idle_budget: settings.idle_rooms_bytes,
        });
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let ttl = settings.room_ttl;
        // Often enough that a room outlives its time by at most half of it.
        let every = (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let sweeping = Arc::clone(&rooms);
        let sweeper = thread::Builder::new()
            .name("tc-expire".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                // Shutdown by dropping the sender: the wait fails at once.
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(every) {
                    sweeping.expire(ttl);
                }
            })
            .map_err(|e| BrokerError::Redis(format!("cannot start the sweeper thread: {e}")))?;
        Ok(MemoryBroker {
            settings: settings.clone(),
            fanout: Arc::new(Fanout::new(true, 1)),
            rooms,
            sweeper_stop: Some(stop_tx),
            sweeper: Some(sweeper),
            nicknames: Mutex::default(),
        })
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        self.sweeper_stop.take();
        if let Some(sweeper) = self.sweeper.take() {
            let _ = sweeper.join();
        }
    }
}

impl Broker for MemoryBroker {
    fn instance(&self) -> u64 {
        self.settings.instance
    }

    fn publish(&self, room: &Room, payload: Vec<u8>, change: MemberChange) -> Receipt {
        let (max_count, max_bytes) = (self.settings.history, self.settings.history_bytes);
        // Dispatched under the lock that gives the offset: offsets are
        // the order every subscriber receives.
        self.rooms.with(room, |state| {
            state.last += 1;
            let payload: Arc<[u8]> =
                protocol::with_place(&payload, state.last, &state.epoch).into();
            let chat = matches!(change, MemberChange::None);
            match change {
                MemberChange::None => {}
                MemberChange::Join(joined) => state
                    .members
                    .extend(joined.into_iter().map(|(c, n)| (c, n.as_str().to_owned()))),
                MemberChange::Leave(left) => state.members.retain(|(c, _)| !left.contains(c)),
            }
            if max_count > 0 && chat {
                state.log_bytes += payload.len();
                state.log.push_back((state.last, Arc::clone(&payload)));
                // The oldest go first, until both bounds hold (an entry
                // bigger than the byte bound on its own is not kept).
                while state.log.len() > max_count || state.log_bytes > max_bytes {
                    let Some((offset, old)) = state.log.pop_front() else {
                        break;
                    };
                    state.log_bytes -= old.len();
                    state.first = offset + 1;
                }
            }
            let incoming = Arc::new(Incoming::parse(&payload, std::time::Instant::now()));
            self.fanout
                .dispatch(&room.channel(), None, Event::Message(incoming));
        });
        Receipt::Settled(Ok(()))
    }

    fn subscribe(&self, room: &Room, conn: &ConnId) -> Result<Subscription, BrokerError> {
        let channel = room.channel();
        let registered = self.fanout.register(&channel, conn);
        let listener = FanoutListener {
            inbox: registered.inbox,
            guard: Registration {
                fanout: Arc::clone(&self.fanout),
                channel,
                conn: conn.clone(),
            },
        };
        // Cancelling drops the stop sender; the listener `select!`s on it.
        // No direct delivery (see `fanout`): messages are dispatched on the
        // publisher's thread one by one, and the subscriber threads batch
        // what piles up, where a dispatcher writing directly could not.
        Ok(Subscription::new(Box::new(listener), Canceller::new(|| {})))
    }

    fn log(&self, room: &Room) -> Result<Log, BrokerError> {
        let table = self.rooms.lock();
        let Some(state) = table.rooms.get(room.name()) else {
            return Ok(Log::default());
        };
        Ok(Log {
            epoch: Some(state.epoch.clone()),
            first: state.first(self.settings.history),
            entries: state.log.iter().map(|(_, p)| p.to_vec()).collect(),
            earlier: Vec::new(),
        })
    }

    fn log_end(&self, room: &Room) -> Result<Option<Mark>, BrokerError> {
        let table = self.rooms.lock();
        Ok(table.rooms.get(room.name()).map(|state| Mark {
            end: Place {
                offset: state.last,
                epoch: state.epoch.clone(),
            },
            first: state.first(self.settings.history),
        }))
    }

    fn place_key(&self, _room: &Room, _epoch: &str) -> PlaceKey {
        // Only this process publishes here.
        PlaceKey::Trusted
    }

    fn enter(&self, room: &Room, _: &ConnId, _: &Nickname) -> Result<(), BrokerError> {
        // The room exists (and so keeps its epoch) while anyone is in it.
        self.rooms.with(room, |state| state.present += 1);
        Ok(())
    }

    fn exit(&self, room: &Room, _: &ConnId) {
        // Once nobody is in it, the room is idle: freed by the sweeper once
        // `--room-ttl` passes, or sooner past `--idle-rooms-bytes`.
        self.rooms.with(room, |state| {
            state.present = state.present.saturating_sub(1);
        });
    }

    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError> {
        let table = self.rooms.lock();
        let rooms = &table.rooms;
        let members = rooms
            .get(room.name())
            .map(|r| r.members.as_slice())
            .unwrap_or(&[]);
        // The `limit` first names in order, without sorting the whole room.
        let mut names: Vec<&str> = members.iter().map(|(_, n)| n.as_str()).collect();
        if names.len() > limit {
            names.select_nth_unstable(limit);
            names.truncate(limit);
        }
        names.sort_unstable();
        let at = rooms.get(room.name()).map(|state| Place {
            offset: state.last,
            epoch: state.epoch.clone(),
        });
        Ok(Presence {
            count: members.len(),
            nicknames: names.into_iter().map(str::to_owned).collect(),
            at,
        })
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    fn claim_nickname(
        &self,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<bool, BrokerError> {
        let mut names = self.nicknames.lock().unwrap_or_else(|p| p.into_inner());
        let holder = names
            .entry((room.name().to_owned(), nickname.to_owned()))
            .or_insert_with(|| conn.clone());
        Ok(holder == conn)
    }

    fn release_nickname(&self, room: &Room, nickname: &str, conn: &ConnId) {
        let mut names = self.nicknames.lock().unwrap_or_else(|p| p.into_inner());
        let key = (room.name().to_owned(), nickname.to_owned());
        if names.get(&key) == Some(conn) {
            names.remove(&key);
        }
    }

    fn describe(&self) -> String {
        "in-process relay (single instance)".to_owned()
    }

    fn log_reset_causes(&self) -> &'static str {
        "the server restarted, or the room was empty longer than the server keeps it"
    }
}

/// Takes a subscriber out of its channel when dropped, however the
/// subscriber thread ends.
struct Registration {
    fanout: Arc<Fanout>,
    channel: String,
    conn: ConnId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.fanout.unregister(&self.channel, &self.conn);
    }
}

#[cfg(test)]
mod tests;
