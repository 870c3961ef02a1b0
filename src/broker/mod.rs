//! The message relay between connections: publish a payload on a channel,
//! and subscribe one connection to a channel.
//!
//! Two implementations share the [`Broker`] trait:
//!
//! * [`redis::RedisBroker`] — the real thing. Every connection gets its own Redis
//!   `SUBSCRIBE` connection (so instances sharing a Redis see each other's
//!   messages), or with [`SubscriptionMode::Shared`] every room gets one per
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
pub mod redis;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::config::{BrokerChoice, DEFAULT_REDIS_URL};
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Incoming, Nickname, Room};

/// A message relay, with the little state rooms need: recent history and
/// the member list. Shared by every connection through an `Arc<dyn Broker>`.
pub trait Broker: Send + Sync {
    /// This process's identity on the relay: the instance part of its
    /// connection ids, and what presence entries are kept alive by.
    fn instance(&self) -> u64;

    /// Publishes `payload` on the room's channel. Returns at once (or when
    /// the relay's queue has room): the [`Receipt`] tells whether the relay
    /// accepted it (for Redis: once `PUBLISH` has been answered).
    ///
    /// A room's messages reach the relay in the order they were published,
    /// so one thread's messages arrive in the order it published them even
    /// with many still unanswered. With `record`, the payload is also
    /// appended to the room's history (before it is published, so a client
    /// that joins meanwhile finds it in one or the other — or both, see
    /// `ChatMessage::id`).
    fn publish(&self, room: &Room, payload: Vec<u8>, record: bool) -> Receipt;

    /// Prepares a subscription of connection `conn` to the room. Nothing
    /// blocks yet: the subscriber thread starts it with [`Subscription::run`].
    fn subscribe(&self, room: &Room, conn: &ConnId) -> Result<Subscription, BrokerError>;

    /// The room's recent history, oldest first.
    fn history(&self, room: &Room) -> Result<Vec<Vec<u8>>, BrokerError>;

    /// The id of the newest message in the room's history right now
    /// (`None`: the history is empty). Cheap: a joiner takes this mark as
    /// soon as it is subscribed, and reads the history itself later,
    /// sending it only up to the mark (see `session::welcome`).
    fn history_mark(&self, room: &Room) -> Result<Option<String>, BrokerError>;

    /// Adds connection `conn` to the room's member list.
    fn join(&self, room: &Room, conn: &ConnId, nickname: &Nickname) -> Result<(), BrokerError>;

    /// Removes connection `conn` from the room's member list.
    fn leave(&self, room: &Room, conn: &ConnId) -> Result<(), BrokerError>;

    /// The nicknames in the room (one per connection, sorted), across every
    /// instance sharing the relay; members of instances that died are not
    /// listed.
    fn members(&self, room: &Room) -> Result<Vec<String>, BrokerError>;

    /// Who is in the room, for the presence frame a joiner gets: how many,
    /// and the sorted nicknames of at most `limit` of them (all of them in a
    /// room that small). A big room's list is cut so that joining stays
    /// cheap: a full list per joiner would make a join storm O(n²).
    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError>;

    /// Whether the relay really works right now; if not, why.
    fn health(&self) -> Result<(), String>;

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
    pub subscriptions: SubscriptionMode,
}

/// How a Redis broker subscribes its clients to their rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubscriptionMode {
    /// Each client has its own `SUBSCRIBE` connection (the design's default):
    /// one Redis connection per client, and Redis does the fan-out.
    #[default]
    PerClient,
    /// Each process has one `SUBSCRIBE` connection per room and fans out to
    /// its clients' queues itself (see [`fanout`]).
    Shared,
}

/// What a running subscription hands to its closure.
///
/// Owned and cheap to clone: the same `Event` is queued for every client of
/// a room when one subscription feeds many (see [`fanout`]).
#[derive(Debug, Clone)]
pub enum Event {
    /// The subscription is active: from now on, every message published on the
    /// channel is delivered. Comes first, and again after each [`Event::Lost`]
    /// once the subscription is restored.
    Subscribed,
    /// The subscription was lost (the relay went away or dropped us). The
    /// broker keeps trying to restore it; messages published meanwhile are
    /// missed. Only after a first [`Event::Subscribed`].
    Lost(Arc<BrokerError>),
    /// A payload published on the channel (possibly by this very connection),
    /// parsed once for everyone it is delivered to.
    Message(Arc<Incoming>),
    /// Nothing more is waiting right now: a good moment to flush what was
    /// written. Never queued; listeners say it when they are about to block.
    Idle,
}

/// A client that the thread dispatching its room's messages may write to
/// itself, without waking the client's subscriber thread (see
/// [`fanout`]'s *direct delivery*). The session implements it.
pub trait DirectSink: Send + Sync {
    /// Takes `messages` for the client without ever blocking, or declines
    /// them. Called only while the client has nothing queued.
    fn try_deliver(&self, messages: &[Arc<Incoming>]) -> Direct;
}

/// What a [`DirectSink`] did with the messages it was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// Written to the client (or skipped, as its own): nothing left to do.
    Written,
    /// Not taken (busy, or not ready): queue them as usual.
    Declined,
    /// Taken but not all written (the client's socket is full, or failed):
    /// its subscriber thread must be woken to finish, or to fail.
    Unfinished,
}

/// Where a client's [`DirectSink`] is kept once its subscriber thread has
/// one: shared by the subscription and the fan-out.
pub(crate) type DirectSlot = Arc<OnceLock<Arc<dyn DirectSink>>>;

/// What a subscriber's closure tells [`Subscription::run`]: keep going, or stop.
pub type Flow = ControlFlow<()>;

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
    /// The relay is shutting down.
    #[error("the relay is shutting down")]
    Closed,
}

impl BrokerError {
    /// True when the command may have been carried out all the same: the
    /// sender must not be told flatly that its message was not delivered.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, BrokerError::Uncertain(_))
    }
}

/// One connection's subscription, ready to run on its subscriber thread.
pub struct Subscription {
    listener: Box<dyn Listen>,
    canceller: Canceller,
    /// For relays that fan out in-process: where the client's direct sink
    /// goes.
    direct: Option<DirectSlot>,
}

/// The broker-specific half of a [`Subscription`]: the blocking loop.
pub(crate) trait Listen: Send {
    /// Runs until cancelled (`Ok`), until `on_event` breaks (`Ok`), or until
    /// the relay fails (`Err`).
    fn listen(
        self: Box<Self>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<(), BrokerError>;
}

impl Subscription {
    pub(crate) fn new(listener: Box<dyn Listen>, canceller: Canceller) -> Subscription {
        Subscription {
            listener,
            canceller,
            direct: None,
        }
    }

    /// The same, for a relay whose dispatcher can deliver directly.
    pub(crate) fn with_direct(self, slot: DirectSlot) -> Subscription {
        Subscription {
            direct: Some(slot),
            ..self
        }
    }

    /// Whether a thread of the relay dispatches the room's messages to its
    /// clients in-process (shared subscriptions, the in-process relay), and
    /// so may write to this client directly (see [`deliver_directly`](Self::deliver_directly)).
    /// False for a per-client Redis subscription: its subscriber thread
    /// alone writes the room to the client.
    pub fn is_dispatched(&self) -> bool {
        self.direct.is_some()
    }

    /// Lets the thread dispatching the room's messages write them straight
    /// to `sink` whenever the client has nothing queued. Returns false, and
    /// does nothing, where messages are not dispatched in-process (a
    /// per-client Redis subscription) or a sink is set already.
    pub fn deliver_directly(&self, sink: Arc<dyn DirectSink>) -> bool {
        self.direct
            .as_ref()
            .is_some_and(|slot| slot.set(sink).is_ok())
    }

    /// A handle that ends [`run`](Self::run) from any thread.
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// Blocks the calling thread, handing every event to `on_event`.
    ///
    /// The first event is always [`Event::Subscribed`]. Returns `Ok(())` once
    /// cancelled or once `on_event` returns `ControlFlow::Break`, and `Err` when
    /// the subscription cannot be made at all (or, for the in-process broker,
    /// when the subscriber fell too far behind). A subscription that is lost
    /// later is restored by the broker, with [`Event::Lost`] and
    /// [`Event::Subscribed`] telling the closure.
    pub fn run(self, mut on_event: impl FnMut(Event) -> Flow) -> Result<(), BrokerError> {
        let stop = self.canceller.signal();
        self.listener.listen(&stop, &mut on_event)
    }
}

/// Ends a running [`Subscription`] from another thread. Cheap to clone;
/// cancelling twice is harmless.
#[derive(Clone)]
pub struct Canceller {
    inner: Arc<CancelState>,
}

struct CancelState {
    /// Set first, so a subscriber can check it without blocking.
    cancelled: AtomicBool,
    /// Dropped on cancel: every receiver of the paired channel wakes up with
    /// "disconnected". This is how blocking waits on crossbeam channels
    /// (in-process delivery, back-off sleeps) are interrupted.
    stop_tx: Mutex<Option<Sender<()>>>,
    stop_rx: Receiver<()>,
    /// Broker-specific extra wake-up, for blocking calls that are not channel
    /// receives (a Redis socket read). Runs once, after `cancelled` is set.
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Canceller {
    /// A canceller whose `cancel` also runs `wake`.
    pub(crate) fn new(wake: impl Fn() + Send + Sync + 'static) -> Canceller {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        Canceller {
            inner: Arc::new(CancelState {
                cancelled: AtomicBool::new(false),
                stop_tx: Mutex::new(Some(stop_tx)),
                stop_rx,
                wake: Box::new(wake),
            }),
        }
    }

    /// Stops the subscription. Returns at once; the subscriber thread wakes
    /// up shortly after.
    pub fn cancel(&self) {
        if self.inner.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner
            .stop_tx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        (self.inner.wake)();
    }

    /// True once [`cancel`](Self::cancel) has been called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn signal(&self) -> StopSignal {
        StopSignal {
            canceller: self.clone(),
        }
    }
}

/// The subscriber thread's view of its [`Canceller`].
pub(crate) struct StopSignal {
    canceller: Canceller,
}

impl StopSignal {
    /// True once cancelled.
    pub(crate) fn is_stopped(&self) -> bool {
        self.canceller.is_cancelled()
    }

    /// A receiver that becomes ready ("disconnected") on cancel; for `select!`.
    pub(crate) fn receiver(&self) -> &Receiver<()> {
        &self.canceller.inner.stop_rx
    }

    /// Sleeps for `duration` unless cancelled first. Returns true if cancelled.
    pub(crate) fn sleep(&self, duration: Duration) -> bool {
        match self.receiver().recv_timeout(duration) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.is_stopped(),
            _ => true,
        }
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
        BrokerChoice::Redis(url) => Ok(Arc::new(redis::RedisBroker::connect(
            url,
            Duration::from_secs(3),
            settings,
            metrics,
        )?)),
        BrokerChoice::InProcess => Ok(Arc::new(memory::MemoryBroker::new(settings, metrics)?)),
        BrokerChoice::Auto => {
            match redis::RedisBroker::connect(
                DEFAULT_REDIS_URL,
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
