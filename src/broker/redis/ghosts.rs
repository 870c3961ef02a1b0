//! No ghosts: what this instance changed in Redis while Redis could not
//! take it is put right once Redis is back.
//!
//! A leave is published (and the member list changed) by the log script,
//! a nickname is given back by a command: when Redis is down, stalled or
//! failing over, either may never arrive, and the departed client would
//! stay on the member list, in presence, and holding its name, for as long
//! as this instance lives. Two things make sure it does not:
//!
//! * **Retries.** A leave or a nickname release that fails is queued
//!   ([`Ghosts::queue`]) and sent again, in the order it was first sent,
//!   by the heartbeat once Redis answers again. The queue holds at most
//!   [`RETRY_CAP`] changes; past it a change is not queued (logged), and
//!   the reconciliation below puts it right instead: memory stays bounded.
//!   A leave is published only if it takes someone off the member list
//!   (`LOG_AND_PUBLISH`), so a retried leave that had landed after all, or
//!   that the reconciliation announced first, is never announced twice.
//! * **Reconciliation.** Every heartbeat, for each room this instance has
//!   state in, the room's member list and its claimed nicknames are
//!   compared with what this instance really has ([`Ghosts::enter`],
//!   [`Ghosts::exit`], [`Ghosts::claiming`], [`Ghosts::released`]). Only
//!   entries whose connection id carries this instance's id are touched:
//!   other instances' are theirs (and their liveness key's). An entry of a
//!   connection that is gone is removed — a member with its leave announced
//!   ("left (connection lost)"), a claim given back. A live connection
//!   missing from the list (a Redis restarted without persistence, a
//!   failover that lost the last writes) is put back *silently*: the room
//!   saw it join and never saw it leave, so announcing it again would tell
//!   the others something false. A claim missing is taken again if nobody
//!   else took it meanwhile.
//!
//! Changes younger than [`GRACE`] are left to the path that is making
//! them (a join being published, a leave waiting for its announcement's
//! window), so the reconciliation never races them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::coalesce::Event;
use super::job::{Job, Reply, Route};
use super::keys;
use super::queries::{Queues, from_value};
use super::scripts::{SWAP_FIELD, sha_of};
use crate::broker::api::MemberChange;
use crate::broker::error::BrokerError;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, ConnId, Kind, Nickname, Room};

/// Most changes waiting to be sent again; past it, the reconciliation
/// puts them right instead.
pub(super) const RETRY_CAP: usize = 10_000;
/// How long a change is left to the path making it before the
/// reconciliation may act on it.
pub(super) const GRACE: Duration = Duration::from_secs(5);
/// Rooms reconciled per round of queries (one job each, pipelined).
const ROOMS_PER_ROUND: usize = 64;

/// A change to send again.
#[derive(Clone)]
pub(super) enum Again {
    /// A leave, as it was first published.
    Event(Event),
    /// Commands of one room (a nickname given back).
    Commands(Room, Vec<redis::Cmd>),
}

impl Again {
    fn room(&self) -> &Room {
        match self {
            Again::Event(event) => &event.room,
            Again::Commands(room, _) => room,
        }
    }

    fn job(self, reply: Reply) -> Job {
        match self {
            Again::Event(event) => Job::event(event, reply),
            Again::Commands(room, cmds) => Job::commands(Route::room(&room), cmds, reply),
        }
    }
}

/// What this instance really has in a room.
#[derive(Default)]
struct Truth {
    /// Its connections in the room: id → nickname, and since when.
    members: HashMap<String, (Nickname, Instant)>,
    /// Connections that left lately, and when: their leave may be on its
    /// way.
    left: HashMap<String, Instant>,
    /// Nickname readings held: (reading, connection id) → since when.
    claims: HashMap<(String, String), Instant>,
    /// Readings given back lately, and when.
    released: HashMap<(String, String), Instant>,
}

impl Truth {
    fn is_empty(&self) -> bool {
        self.members.is_empty()
            && self.left.is_empty()
            && self.claims.is_empty()
            && self.released.is_empty()
    }

    /// Forgets departures older than [`GRACE`].
    fn prune(&mut self, now: Instant) {
        self.left.retain(|_, at| now.duration_since(*at) < GRACE);
        self.released
            .retain(|_, at| now.duration_since(*at) < GRACE);
    }
}

/// This instance's truth, room by room, and the changes waiting to be sent
/// again.
pub(super) struct Ghosts {
    /// This instance's id, as connection ids carry it.
    instance: String,
    /// The same, as a number.
    number: u64,
    rooms: Mutex<HashMap<Room, Truth>>,
    retries: Mutex<VecDeque<Again>>,
    metrics: Arc<Metrics>,
}

impl Ghosts {
    pub(super) fn new(instance: u64, metrics: &Arc<Metrics>) -> Ghosts {
        Ghosts {
            instance: ConnId::instance_of(ConnId::new(instance, 0).as_str())
                .unwrap_or_default()
                .to_owned(),
            number: instance,
            rooms: Mutex::default(),
            retries: Mutex::default(),
            metrics: Arc::clone(metrics),
        }
    }

    /// The id of one of this instance's connections, from its text.
    fn conn_id(&self, conn: &str) -> Option<ConnId> {
        let (_, seq) = conn.rsplit_once('-')?;
        let id = ConnId::new(self.number, seq.parse().ok()?);
        (id.as_str() == conn).then_some(id)
    }

    fn with_room<T>(&self, room: &Room, f: impl FnOnce(&mut Truth) -> T) -> T {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        f(rooms.entry(room.clone()).or_default())
    }

    /// Connection `conn` is in `room` as `nickname`.
    pub(super) fn enter(&self, room: &Room, conn: &ConnId, nickname: &Nickname) {
        self.with_room(room, |truth| {
            truth.left.remove(conn.as_str());
            truth
                .members
                .insert(conn.as_str().to_owned(), (nickname.clone(), Instant::now()));
        });
    }

    /// Connection `conn` has left `room`.
    pub(super) fn exit(&self, room: &Room, conn: &ConnId) {
        self.with_room(room, |truth| {
            truth.members.remove(conn.as_str());
            truth.left.insert(conn.as_str().to_owned(), Instant::now());
        });
    }

    /// Connection `conn` is claiming `reading` in `room` (recorded before
    /// Redis is asked, so that a claim just made is never taken for a
    /// ghost).
    pub(super) fn claiming(&self, room: &Room, reading: &str, conn: &ConnId) {
        let key = (reading.to_owned(), conn.as_str().to_owned());
        self.with_room(room, |truth| {
            truth.released.remove(&key);
            truth.claims.insert(key, Instant::now());
        });
    }

    /// Connection `conn` gave `reading` back in `room` (or did not get it).
    pub(super) fn released(&self, room: &Room, reading: &str, conn: &ConnId) {
        let key = (reading.to_owned(), conn.as_str().to_owned());
        self.with_room(room, |truth| {
            if truth.claims.remove(&key).is_some() {
                truth.released.insert(key, Instant::now());
            }
        });
    }

    /// Queues `again` to be sent once Redis answers; past [`RETRY_CAP`],
    /// leaves it to the reconciliation.
    pub(super) fn queue(&self, again: Again) {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        if retries.len() >= RETRY_CAP {
            let (waiting, room) = (retries.len(), again.room());
            super::outage::warn_repeated("retry-cap", || {
                format!(
                    "{waiting} changes already wait for Redis: this one in {room} is left to \
                     the heartbeat's reconciliation"
                )
            });
            return;
        }
        retries.push_back(again);
    }

    /// Sends `again` on `lane` (the room's); if it fails, it is queued to
    /// be sent again. `done` is told the outcome.
    pub(super) fn send(
        self: &Arc<Self>,
        lane: Option<&Sender<Job>>,
        again: Again,
        done: Option<Sender<Result<(), BrokerError>>>,
    ) -> Result<(), BrokerError> {
        let reply = {
            let (ghosts, again) = (Arc::clone(self), again.clone());
            Reply::Retry {
                done,
                on_failure: Box::new(move || ghosts.queue(again)),
            }
        };
        let Some(lane) = lane else {
            return Err(BrokerError::Closed);
        };
        match again {
            // An event waits for room on its lane, as every publish does.
            Again::Event(_) => lane.send(again.job(reply)).map_err(|_| BrokerError::Closed),
            // Commands are given up on a full lane, for the heartbeat to send.
            Again::Commands(..) => match lane.try_send(again.job(reply)) {
                Ok(()) => Ok(()),
                Err(crossbeam_channel::TrySendError::Full(job)) => {
                    if let Reply::Retry { on_failure, .. } = job.reply {
                        on_failure();
                    }
                    Ok(())
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(BrokerError::Closed),
            },
        }
    }

    /// What the heartbeat does once Redis answers: sends the queued changes
    /// again, then reconciles every room this instance has state in.
    /// (The reconciliation runs even when some changes failed again: a
    /// change Redis keeps refusing must not keep the rest from being put
    /// right, and whichever of the two lands first is the one announced.)
    pub(super) fn beat(&self, queues: &Queues, room_ttl: Duration) {
        self.retry(queues);
        self.reconcile(queues, room_ttl);
    }

    /// Sends every queued change again, in order, and waits for each;
    /// those that fail go back to the front of the queue, still in order.
    fn retry(&self, queues: &Queues) {
        let queued: Vec<Again> = {
            let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
            retries.drain(..).collect()
        };
        if queued.is_empty() {
            return;
        }
        let mut waiting = Vec::with_capacity(queued.len());
        for again in queued {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let sent = queues
                .room_lane(again.room())
                .is_some_and(|lane| lane.send(again.clone().job(Reply::Done(tx))).is_ok());
            waiting.push((again, sent.then_some(rx)));
        }
        let mut failed = Vec::new();
        for (again, answer) in waiting {
            match answer.map(|rx| rx.recv()) {
                Some(Ok(Ok(()))) => {
                    self.metrics.ghost_retries.inc();
                }
                _ => failed.push(again),
            }
        }
        if !failed.is_empty() {
            let n = failed.len();
            super::outage::warn_repeated("retries", || {
                format!("{n} member-list change(s) still could not reach Redis")
            });
            let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
            for again in failed.into_iter().rev() {
                retries.push_front(again);
            }
            retries.truncate(RETRY_CAP);
        }
    }

    /// Compares each room's member list and claimed nicknames with what
    /// this instance has, and puts right this instance's entries (see the
    /// module doc).
    fn reconcile(&self, queues: &Queues, room_ttl: Duration) {
        let rooms: Vec<Room> = {
            let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
            rooms.keys().cloned().collect()
        };
        for round in rooms.chunks(ROOMS_PER_ROUND) {
            let reads = round
                .iter()
                .map(|room| {
                    let mut members = redis::cmd("HGETALL");
                    members.arg(keys::members(room));
                    let mut names = redis::cmd("HGETALL");
                    names.arg(keys::nicknames(room));
                    (Route::room(room), vec![members, names])
                })
                .collect();
            let Ok(answers) = queues.run_each(reads) else {
                return;
            };
            for (room, answer) in round.iter().zip(answers) {
                let mut answer = answer.into_iter();
                let members: Result<HashMap<String, String>, _> = from_value(answer.next());
                let names: Result<HashMap<String, String>, _> = from_value(answer.next());
                if let (Ok(members), Ok(names)) = (members, names) {
                    self.reconcile_room(queues, room, &members, &names, room_ttl);
                }
            }
        }
    }

    /// Puts right one room, given its member list and claimed nicknames as
    /// Redis has them.
    fn reconcile_room(
        &self,
        queues: &Queues,
        room: &Room,
        members: &HashMap<String, String>,
        names: &HashMap<String, String>,
        room_ttl: Duration,
    ) {
        let now = Instant::now();
        let ours = |conn: &str| ConnId::instance_of(conn) == Some(self.instance.as_str());
        let settled = |since: &Instant| now.duration_since(*since) >= GRACE;
        let mut fixes = Fixes::default();
        {
            let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
            let Some(truth) = rooms.get_mut(room) else {
                return;
            };
            truth.prune(now);
            for (conn, nickname) in members {
                if ours(conn) && !truth.members.contains_key(conn) && !truth.left.contains_key(conn)
                {
                    fixes.gone.push((conn.clone(), nickname.clone()));
                }
            }
            for (conn, (nickname, since)) in &truth.members {
                if settled(since) && !members.contains_key(conn) {
                    fixes
                        .missing
                        .push((conn.clone(), nickname.as_str().to_owned()));
                }
            }
            for (reading, conn) in names {
                let key = (reading.clone(), conn.clone());
                if ours(conn)
                    && !truth.claims.contains_key(&key)
                    && !truth.released.contains_key(&key)
                {
                    fixes.unclaimed.push(key);
                }
            }
            for ((reading, conn), since) in &truth.claims {
                // Held by another connection meanwhile: theirs now.
                if settled(since) && !names.contains_key(reading) {
                    fixes.reclaimed.push((reading.clone(), conn.clone()));
                }
            }
            if truth.is_empty() && fixes.is_empty() {
                rooms.remove(room);
            }
        }
        if fixes.is_empty() {
            return;
        }
        let count = fixes.len();
        log::info!(
            "{room}: {} member(s) gone, {} missing, {} nickname(s) to give back, {} to take \
             again: put right",
            fixes.gone.len(),
            fixes.missing.len(),
            fixes.unclaimed.len(),
            fixes.reclaimed.len()
        );
        let lane = queues.room_lane(room);
        for (conn, nickname) in fixes.gone {
            let (Ok(nickname), Some(id)) = (Nickname::parse(&nickname), self.conn_id(&conn)) else {
                // Not an entry this server would have written: just drop it.
                let mut hdel = redis::cmd("HDEL");
                hdel.arg(keys::members(room)).arg(&conn);
                queues.run_detached(Route::room(room), vec![hdel]);
                continue;
            };
            let conn = id;
            let event = ChatMessage::event(Kind::Leave, &nickname, &conn, "left (connection lost)");
            let event = Event {
                room: room.clone(),
                payload: event.to_payload(),
                change: MemberChange::Leave(vec![conn]),
            };
            if let Some(lane) = lane {
                let (tx, _) = crossbeam_channel::bounded(1);
                let _ = lane.send(Job::event(event, Reply::Done(tx)));
            }
        }
        let mut cmds = Vec::new();
        for (conn, nickname) in &fixes.missing {
            let mut hset = redis::cmd("HSET");
            hset.arg(keys::members(room)).arg(conn).arg(nickname);
            cmds.push(hset);
        }
        if !fixes.missing.is_empty() {
            let mut expire = redis::cmd("PEXPIRE");
            expire
                .arg(keys::members(room))
                .arg(room_ttl.as_millis() as u64);
            cmds.push(expire);
        }
        for (reading, conn) in &fixes.unclaimed {
            cmds.push(swap_nickname(room, reading, conn, ""));
        }
        for (reading, conn) in &fixes.reclaimed {
            let mut hsetnx = redis::cmd("HSETNX");
            hsetnx.arg(keys::nicknames(room)).arg(reading).arg(conn);
            cmds.push(hsetnx);
        }
        if !cmds.is_empty()
            && let Some(lane) = lane
        {
            let _ = lane.send(Job::commands(Route::room(room), cmds, Reply::None));
        }
        self.metrics.ghosts_reconciled.inc_by(count as u64);
    }
}

/// What one room's reconciliation puts right.
#[derive(Default)]
struct Fixes {
    /// Members of connections that are gone: (id, nickname).
    gone: Vec<(String, String)>,
    /// Live connections missing from the list: (id, nickname).
    missing: Vec<(String, String)>,
    /// Claims of connections that are gone: (reading, id).
    unclaimed: Vec<(String, String)>,
    /// Claims of live connections missing: (reading, id).
    reclaimed: Vec<(String, String)>,
}

impl Fixes {
    fn len(&self) -> usize {
        self.gone.len() + self.missing.len() + self.unclaimed.len() + self.reclaimed.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs [`SWAP_FIELD`] on a room's claimed nicknames: `nickname` from
/// `from` to `to` (empty: given back).
pub(super) fn swap_nickname(room: &Room, nickname: &str, from: &str, to: &str) -> redis::Cmd {
    let mut swap = redis::cmd("EVALSHA");
    swap.arg(sha_of(SWAP_FIELD))
        .arg(1)
        .arg(keys::nicknames(room))
        .arg(nickname)
        .arg(from)
        .arg(to);
    swap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ghosts() -> Ghosts {
        Ghosts::new(0x3f9c, &Arc::default())
    }

    #[test]
    fn only_this_instances_connection_ids_are_read_back() {
        let ghosts = ghosts();
        let mine = ConnId::new(0x3f9c, 17);
        assert_eq!(ghosts.conn_id(mine.as_str()), Some(mine));
        assert_eq!(ghosts.conn_id(ConnId::new(0x3f9d, 17).as_str()), None);
        assert_eq!(ghosts.conn_id("0000000000003f9c-x"), None);
        assert_eq!(ghosts.conn_id("0000000000003f9c-017"), None);
    }

    #[test]
    fn the_retry_queue_stops_at_its_cap() {
        let ghosts = ghosts();
        let room = Room::parse("lobby").unwrap();
        for _ in 0..RETRY_CAP + 5 {
            ghosts.queue(Again::Commands(room.clone(), Vec::new()));
        }
        assert_eq!(ghosts.retries.lock().unwrap().len(), RETRY_CAP);
    }

    #[test]
    fn a_room_is_kept_while_anything_of_it_is_recent() {
        let ghosts = ghosts();
        let room = Room::parse("lobby").unwrap();
        let (conn, nickname) = (ConnId::new(0x3f9c, 1), Nickname::parse("amy").unwrap());
        ghosts.enter(&room, &conn, &nickname);
        ghosts.exit(&room, &conn);
        let rooms = ghosts.rooms.lock().unwrap();
        let truth = &rooms[&room];
        assert!(truth.members.is_empty() && truth.left.contains_key(conn.as_str()));
        assert!(!truth.is_empty(), "its leave may still be on its way");
    }
}
