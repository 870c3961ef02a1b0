//! What the rest of threadchat sees of a relay: the [`Broker`] trait, the
//! values it answers with, and how it fails. Every relay implements it
//! (`memory.rs`, `redis/`).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::error::BrokerError;
use super::places::PlaceKey;
use super::subscription::Subscription;
use crate::config::Subscriptions;
use crate::protocol::{ConnId, Nickname, Room};

/// A message relay, with the little state rooms need: recent history and
/// the member list. Shared by every connection through an `Arc<dyn Broker>`.
pub trait Broker: Send + Sync {
    /// This process's identity on the relay: the instance part of its
    /// connection ids, and what presence entries are kept alive by.
    fn instance(&self) -> u64;

    /// Logs `payload` in the room's log and publishes it on the room's
    /// channel, in one step. Returns at once (or when the relay's queue has
    /// room): the [`Receipt`] tells whether the relay accepted it (for
    /// Redis: once the script that logs and publishes has been answered).
    ///
    /// The relay gives the payload the next offset of the room's log and
    /// writes its place in front of its other fields (see
    /// `protocol::with_place`), so offsets are in the order every instance
    /// delivers them. The log keeps the newest `--history` entries within
    /// `--history-bytes`; `change` is applied to the room's member list in
    /// the same step, so the list and the log agree at every offset.
    ///
    /// A room's messages reach the relay in the order they were published,
    /// so one thread's messages arrive in the order it published them even
    /// with many still unanswered.
    fn publish(&self, room: &Room, payload: Vec<u8>, change: MemberChange) -> Receipt;

    /// Prepares a subscription of connection `conn` to the room. Nothing
    /// blocks yet: the subscriber thread starts it with [`Subscription::run`].
    fn subscribe(&self, room: &Room, conn: &ConnId) -> Result<Subscription, BrokerError>;

    /// The room's log as it is now: the entries it still holds, oldest
    /// first, and where it begins.
    fn log(&self, room: &Room) -> Result<Log, BrokerError>;

    /// Where the room's log stands right now (`None`: the room has no log
    /// yet). Cheap: a joiner takes this *mark* as soon as it is subscribed,
    /// and reads the log itself later (when it holds anything), sending it
    /// only up to the mark (see `session::welcome`).
    fn log_end(&self, room: &Room) -> Result<Option<Mark>, BrokerError>;

    /// The key that tells the places of `room`'s log in `epoch` from
    /// forged ones. A blocking call at most once a second per room (cached
    /// otherwise): a connection asks only when a place's epoch is new to it.
    fn place_key(&self, room: &Room, epoch: &str) -> PlaceKey;

    /// Connection `conn` of this instance, called `nickname`, is in the
    /// room: its state must not expire while it is (see `--room-ttl`), and
    /// the relay's member list must keep it (a relay that can lose changes
    /// reconciles its list with these, see `redis/ghosts.rs`).
    fn enter(&self, room: &Room, conn: &ConnId, nickname: &Nickname) -> Result<(), BrokerError>;

    /// Connection `conn` of this instance has left the room (or never got
    /// in after [`enter`](Self::enter)).
    fn exit(&self, room: &Room, conn: &ConnId);

    /// Who is in the room, for the presence frame a joiner gets: how many,
    /// and the sorted nicknames of at most `limit` of them (all of them in a
    /// room that small). A big room's list is cut so that joining stays
    /// cheap: a full list per joiner would make a join storm O(n²).
    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError>;

    /// Whether the relay really works right now; if not, why.
    fn health(&self) -> Result<(), String>;

    /// Claims `nickname` in `room` for connection `conn`
    /// (`--unique-nicknames`): false if another live connection holds it.
    /// A name held by a connection of an instance that died is taken over.
    fn claim_nickname(
        &self,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<bool, BrokerError>;

    /// Gives back a claimed nickname (only if `conn` still holds it).
    fn release_nickname(&self, room: &Room, nickname: &str, conn: &ConnId);

    /// A short description for the start-up log, e.g. `Redis at redis://…`.
    fn describe(&self) -> String;

    /// What makes a room's log start again with this relay (a new epoch),
    /// for a client whose place is in one the log no longer knows: it is
    /// told the cause that can be true here, not another relay's.
    fn log_reset_causes(&self) -> &'static str;
}

/// Who is in a room (see [`Broker::presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// How many connections are in the room.
    pub count: usize,
    /// Some (or all) of their nicknames, sorted.
    pub nicknames: Vec<String>,
    /// The end of the room's log when the list was read: every join and
    /// leave up to here is counted in it, none after.
    pub at: Option<Place>,
}

/// A place in a room's log: an offset within an epoch (see
/// `protocol::At`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// From 1, one more for each entry.
    pub offset: u64,
    /// Changes when the log is lost, and offsets start again.
    pub epoch: String,
}

/// Where a room's log stands (see [`Broker::log_end`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The place of its newest entry.
    pub end: Place,
    /// The offset of the oldest entry it holds (`end.offset + 1` when it
    /// holds none).
    pub first: u64,
}

impl Mark {
    /// Whether the log holds any entry.
    pub fn holds_any(&self) -> bool {
        self.first <= self.end.offset
    }
}

/// A room's log, as read by [`Broker::log`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Log {
    /// The log's epoch (`None`: the room has no log yet).
    pub epoch: Option<String>,
    /// The offset of the oldest entry it holds (one past the newest when it
    /// holds none): a client that has seen everything up to `first - 1`
    /// can be given everything it missed.
    pub first: u64,
    /// The payloads it holds, oldest first, each with its place written in.
    pub entries: Vec<Vec<u8>>,
    /// The epochs it had before, oldest first: a log found under another
    /// Redis process (a failover, a restart, a room moved on a Cluster)
    /// keeps its entries and takes a new epoch, and remembers where the
    /// old one ended.
    pub earlier: Vec<Earlier>,
}

/// An earlier epoch of a room's log (see [`Log::earlier`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Earlier {
    /// Its name.
    pub epoch: String,
    /// Its last offset the log kept: the Redis that took over had every
    /// entry up to here. Places past it were given by a Redis whose writes
    /// were lost (never replicated, or after the snapshot it came back from).
    pub end: u64,
    /// The furthest offset of this epoch any instance is known to have
    /// delivered (`None`: none past `end` is known): offsets `end + 1` to
    /// here were delivered by the old Redis, then lost.
    pub seen: Option<u64>,
}

impl Earlier {
    /// How many of this epoch's entries past `end` are known to be lost.
    pub fn lost(&self) -> u64 {
        self.seen.map_or(0, |seen| seen.saturating_sub(self.end))
    }
}

/// How a published event changes the room's member list (see
/// [`Broker::publish`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MemberChange {
    /// A chat message: no change.
    #[default]
    None,
    /// These connections joined, with these nicknames.
    Join(Vec<(ConnId, Nickname)>),
    /// These connections left.
    Leave(Vec<ConnId>),
}

/// The relay's answer to one [`Broker::publish`], to be waited for.
///
/// Publishing and waiting are separate so that a client sending fast can
/// have several messages on their way at once (see the reader thread's
/// `ChatHandler`): waiting for each answer before reading the next message
/// would allow one message per Redis round trip per client.
#[must_use = "a publish may fail: wait for its receipt"]
#[derive(Debug)]
pub enum Receipt {
    /// Answered already (the in-process broker publishes synchronously).
    Settled(Result<(), BrokerError>),
    /// The answer will come on this channel.
    Pending(Receiver<Result<(), BrokerError>>),
}

impl Receipt {
    /// Blocks until the relay has answered.
    pub fn wait(self) -> Result<(), BrokerError> {
        match self {
            Receipt::Settled(result) => result,
            Receipt::Pending(answer) => answer.recv().unwrap_or(Err(BrokerError::Closed)),
        }
    }
}

/// What every broker is built with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This process's random identity (see [`Broker::instance`]).
    pub instance: u64,
    /// Chat messages kept per room (0: no history).
    pub history: usize,
    /// Most bytes of stored messages kept per room: the oldest go first.
    pub history_bytes: usize,
    /// How long a room's state (history, member list) outlives its last
    /// use.
    pub room_ttl: Duration,
    /// Largest payload accepted from a room's channel (see
    /// [`max_payload`](crate::protocol::max_payload)).
    pub max_payload: usize,
    /// How the Redis broker subscribes (the in-process broker ignores it).
    pub subscriptions: Subscriptions,
    /// The process's budget of threads and descriptors: a room's shared
    /// feed reserves from it (see [`crate::capacity`]).
    pub(crate) capacity: Arc<crate::capacity::Capacity>,
    /// Most bytes held for rooms nobody is in (their logs and state): past
    /// it the least recently used go first (`--idle-rooms-bytes`).
    pub idle_rooms_bytes: usize,
    /// Replicas of the Redis master that must have a published message
    /// before its sender is told it was delivered (`--wait-replicas`; the
    /// in-process broker has none).
    pub wait_replicas: usize,
}
