//! The message relay between connections: publish a payload on a channel,
//! and subscribe one connection to a channel.
//!
//! Two implementations share the [`Broker`] trait:
//!
//! * [`redis::RedisBroker`] — the real thing. Every connection gets its own Redis
//!   `SUBSCRIBE` connection (so instances sharing a Redis see each other's
//!   messages), or with [`Subscriptions::Shared`] every room gets one per
//!   instance, fanned out to its clients by [`fanout`]. Publishing goes
//!   through a small shared pool of connections that pipelines whatever is
//!   queued.
//! * [`memory::MemoryBroker`] — an in-process stand-in, so threadchat runs on a
//!   machine without Redis. A single instance only. It fans out with
//!   [`fanout`] too.
//!
//! The shape is the same in all of them: a connection's *subscriber thread*
//! calls [`Subscription::run`], which blocks (on a Redis socket, or on a
//! crossbeam receiver) and hands each [`Event`] to a closure. To end that blocking call
//! from another thread, keep the subscription's [`Canceller`]: `cancel()` wakes
//! the subscriber thread wherever it is blocked, and `run` returns `Ok(())`.

pub mod fanout;
pub mod memory;
mod places;
pub mod redis;
mod subscription;

pub use places::{EpochKey, PlaceKey};
pub use subscription::{Canceller, Direct, DirectSink, Event, Flow, Subscription};
pub(crate) use subscription::{DirectSlot, Listen, StopSignal};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::config::{BrokerChoice, DEFAULT_REDIS_URL, RedisTarget, Subscriptions};
use crate::metrics::Metrics;
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

    /// A connection of this instance is in the room: its state must not
    /// expire while it is (see `--room-ttl`).
    fn enter(&self, room: &Room) -> Result<(), BrokerError>;

    /// A connection of this instance has left the room.
    fn exit(&self, room: &Room);

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

/// A fresh epoch for a log that starts (or starts again): random, short.
pub fn new_epoch() -> String {
    format!("{:012x}", random_u64() & 0xffff_ffff_ffff)
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
}

/// Why the relay failed. `Clone`, because one failed pipeline answers many
/// waiting publishers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// Could not connect; the relay is unreachable.
    #[error("cannot reach Redis at {url}: {reason}")]
    Connect {
        /// Where we tried.
        url: String,
        /// What the OS or Redis said.
        reason: String,
    },
    /// An established connection failed or Redis answered with an error.
    #[error("Redis failed: {0}")]
    Redis(String),
    /// The subscriber could not keep up and was dropped by the relay.
    #[error("fell too far behind the room")]
    Lagged,
    /// Redis answered the command with an error (out of memory, a missing
    /// script, a read-only replica…): it was not carried out.
    #[error("Redis refused it: {0}")]
    Refused(String),
    /// Redis did not answer in time: the command may or may not have been
    /// carried out (a paused or overloaded Redis carries it out later).
    #[error("Redis did not answer in time ({0})")]
    Uncertain(String),
    /// A Redis Cluster serves the room's slot elsewhere now (a resharding
    /// or a failover): the subscription is made again there.
    #[error("the Redis Cluster moved the room to another master")]
    Moved,
    /// The relay is shutting down.
    #[error("the relay is shutting down")]
    Closed,
    /// Taking this client would pass the process's budget of threads or
    /// descriptors (see [`crate::capacity`]): it is refused, nobody else
    /// is hurt.
    #[error("server full: {0}")]
    Full(String),
}

impl BrokerError {
    /// True when the command may have been carried out all the same: the
    /// sender must not be told flatly that its message was not delivered.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, BrokerError::Uncertain(_))
    }
}

/// Capped exponential back-off with jitter, for reconnecting.
///
/// Each delay is drawn from the upper half of an exponentially growing window
/// (100 ms, 200 ms, … up to the cap): thousands of subscribers that lost Redis
/// at the same instant spread their reconnects out instead of stampeding it,
/// and none retries sooner than half the window.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Backoff {
    /// The first window.
    pub const BASE: Duration = Duration::from_millis(100);

    /// A back-off whose window grows up to `cap`.
    pub fn new(cap: Duration) -> Backoff {
        Backoff { attempt: 0, cap }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let window = Self::BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt += 1;
        window / 2 + window.mul_f64(random_fraction() / 2.0)
    }

    /// Back to the first window (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random number in `[0, 1)` (for jitter).
fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A random 64-bit number, from the standard library's per-process random
/// hash keys: no `rand` crate needed for jitter and instance ids.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// Builds the broker the configuration asks for.
///
/// With [`BrokerChoice::Auto`], Redis on localhost is used if it answers;
/// otherwise the in-process broker, with one log line saying so.
pub fn connect(
    choice: &BrokerChoice,
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Broker>, BrokerError> {
    match choice {
        BrokerChoice::Redis(target) => Ok(Arc::new(redis::RedisBroker::connect(
            target,
            Duration::from_secs(3),
            settings,
            metrics,
        )?)),
        BrokerChoice::InProcess => Ok(Arc::new(memory::MemoryBroker::new(settings, metrics)?)),
        BrokerChoice::Auto => {
            match redis::RedisBroker::connect(
                &RedisTarget::Server(DEFAULT_REDIS_URL.into()),
                Duration::from_millis(500),
                settings,
                metrics,
            ) {
                Ok(broker) => Ok(Arc::new(broker)),
                Err(_) => {
                    log::info!(
                        "no Redis answered at localhost:6379, so messages are relayed \
                         in-process: this instance cannot share a room with others. \
                         Start redis-server, or pass --redis HOST[:PORT], to relay through Redis"
                    );
                    Ok(Arc::new(memory::MemoryBroker::new(settings, metrics)?))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let delays: Vec<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(
            delays
                .iter()
                .rev()
                .take(5)
                .all(|d| *d >= Duration::from_secs(1))
        );
        // Jitter: not all the same.
        assert!(delays.windows(2).any(|w| w[0] != w[1]));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
