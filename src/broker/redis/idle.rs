//! Rooms nobody is in, in Redis: held under `--idle-rooms-bytes` together,
//! the least recently used forgotten first.
//!
//! Every room's keys expire `--room-ttl` after their last use, but that
//! alone lets one client fill Redis with rooms it opens and leaves. So
//! Redis keeps an *index of idle rooms*: a sorted set (room → when it was
//! left, by Redis's clock), a hash (room → the bytes it holds) and their
//! total, three keys with one hash tag (`threadchat:{idle-rooms}:…`, see
//! [`keys::idle_rooms`]). On a Redis Cluster the index is in one slot and
//! each room in its own: the index is changed by one script
//! ([`IDLE_INDEX`]) on the index's master, and an evicted room is forgotten
//! by another ([`FORGET_ROOM`]) on its room's master, as separate jobs.
//!
//! When the last connection of this instance leaves a room, the thread
//! `tc-idle-rooms` reads the room's size and indexes it; the script returns
//! the least recently used rooms that no longer fit in the budget (and
//! drops entries older than `--room-ttl`, whose rooms have expired), and
//! the thread forgets each — unless somebody is in it: [`FORGET_ROOM`]
//! checks the member list in the same step as it deletes. When a
//! connection of this instance enters a room, it leaves the index.
//!
//! Enter and exit only queue the room for the thread (without blocking: a
//! full queue drops the change, and the room still expires with its
//! `--room-ttl`), so a join or a leave never waits for the index.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::job::{Job, Reply, Route};
use super::keys;
use super::queries::from_value;
use super::scripts::{FORGET_ROOM, IDLE_INDEX, sha_of};
use crate::broker::error::BrokerError;
use crate::protocol::Room;

/// What a room costs besides its log (its position and member hashes, its
/// keys' names), counted so that rooms with empty logs are not free.
const ROOM_OVERHEAD: usize = 256;

/// Changes queued for the thread before more are dropped.
const QUEUE: usize = 4096;

/// A change of a room, as seen from this instance.
enum Change {
    /// A connection of this instance entered it (nobody here was in).
    Entered(Room),
    /// The last connection of this instance left it, at this instant.
    Left(Room, Instant),
}

/// How long after the last connection left a room its size is read: its
/// last messages and its leave, on their way through the publishers, are
/// logged by then.
const SETTLE: Duration = Duration::from_secs(1);

/// The thread that keeps the index, and its queue.
pub(super) struct IdleRooms {
    changes: Option<Sender<Change>>,
    /// Set at shutdown: what is still queued is left (the rooms expire).
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the thread works with.
struct Keeper {
    /// The broker's query lanes.
    queries: Vec<Sender<Job>>,
    /// Rooms with members on this instance (the broker's own count): none
    /// of them is forgotten.
    local_rooms: Arc<Mutex<HashMap<Room, usize>>>,
    budget: usize,
    room_ttl: Duration,
}

impl IdleRooms {
    /// Starts `tc-idle-rooms`.
    pub(super) fn start(
        queries: Vec<Sender<Job>>,
        local_rooms: Arc<Mutex<HashMap<Room, usize>>>,
        budget: usize,
        room_ttl: Duration,
    ) -> Result<IdleRooms, BrokerError> {
        let (changes, queue) = crossbeam_channel::bounded(QUEUE);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let keeper = Keeper {
            queries,
            local_rooms,
            budget,
            room_ttl,
        };
        let thread = thread::Builder::new()
            .name("tc-idle-rooms".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                // Ends when the broker drops the sender.
                for change in queue {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = keeper.apply(change) {
                        log::debug!("the index of idle rooms was not updated: {e}");
                    }
                }
            })
            .map_err(|e| BrokerError::Redis(format!("cannot start the idle-rooms thread: {e}")))?;
        Ok(IdleRooms {
            changes: Some(changes),
            stopping,
            thread: Some(thread),
        })
    }

    /// Nobody of this instance was in `room`, and somebody now is.
    pub(super) fn entered(&self, room: &Room) {
        self.queue(Change::Entered(room.clone()));
    }

    /// The last connection of this instance left `room`.
    pub(super) fn left(&self, room: &Room) {
        self.queue(Change::Left(room.clone(), Instant::now()));
    }

    fn queue(&self, change: Change) {
        if let Some(changes) = &self.changes {
            let _ = changes.try_send(change);
        }
    }
}

impl Drop for IdleRooms {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.changes.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the idle-rooms thread panicked");
        }
    }
}

impl Keeper {
    fn apply(&self, change: Change) -> Result<(), BrokerError> {
        let room = match change {
            Change::Entered(room) => {
                self.index(&room, None)?;
                return Ok(());
            }
            Change::Left(room, at) => {
                // In the order they were queued: each waits its own time.
                thread::sleep((at + SETTLE).saturating_duration_since(Instant::now()));
                room
            }
        };
        if self.is_local(&room) {
            return Ok(());
        }
        let mut get = redis::cmd("GET");
        get.arg(keys::log_bytes(&room));
        let log_bytes: Option<usize> = from_value(self.run(Route::room(&room), get)?.pop())?;
        let bytes = log_bytes.unwrap_or(0) + room.name().len() + ROOM_OVERHEAD;
        for name in self.index(&room, Some(bytes))? {
            let Ok(evicted) = Room::parse(&name) else {
                continue;
            };
            if self.is_local(&evicted) {
                continue;
            }
            let mut forget = redis::cmd("EVALSHA");
            forget.arg(sha_of(FORGET_ROOM)).arg(5);
            for key in keys::to_refresh(&evicted) {
                forget.arg(key);
            }
            let forgotten: i64 = from_value(self.run(Route::room(&evicted), forget)?.pop())?;
            if forgotten > 0 {
                log::debug!("forgot room {name}: --idle-rooms-bytes reached");
            }
        }
        Ok(())
    }

    /// Puts `room` in the index with `bytes` (or takes it out, with
    /// `None`); returns the rooms evicted to make it fit.
    fn index(&self, room: &Room, bytes: Option<usize>) -> Result<Vec<String>, BrokerError> {
        let [lru, sizes, total] = keys::idle_rooms();
        let mut index = redis::cmd("EVALSHA");
        index
            .arg(sha_of(IDLE_INDEX))
            .arg(3)
            .arg(&lru)
            .arg(sizes)
            .arg(total)
            .arg(room.name())
            .arg(bytes.map_or(-1, |b| b as i64))
            .arg(self.budget)
            .arg(self.room_ttl.as_millis() as u64);
        from_value(self.run(Route::key(&lru), index)?.pop())
    }

    fn is_local(&self, room: &Room) -> bool {
        let rooms = self.local_rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.contains_key(room)
    }

    /// Runs one command on a query lane and waits for its reply.
    fn run(&self, route: Route, cmd: redis::Cmd) -> Result<Vec<redis::Value>, BrokerError> {
        let (reply_tx, reply) = crossbeam_channel::bounded(1);
        // One lane: the index's changes stay in order.
        let queries = self.queries.first().ok_or(BrokerError::Closed)?;
        queries
            .send(Job::commands(route, vec![cmd], Reply::Values(reply_tx)))
            .map_err(|_| BrokerError::Closed)?;
        reply.recv().map_err(|_| BrokerError::Closed)?
    }
}
