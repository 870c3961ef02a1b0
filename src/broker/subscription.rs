//! A connection's [`Subscription`], the [`Event`]s it hands to its
//! subscriber thread, and the [`Canceller`] that ends it from outside: the
//! shape every broker's subscriptions share.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::broker::error::BrokerError;
use crate::protocol::Incoming;

/// What a running subscription hands to its closure.
///
/// Owned and cheap to clone: the same `Event` is queued for every client of
/// a room when one subscription feeds many (see [`fanout`](super::fanout)).
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
    /// The subscription was restored after an [`Event::Lost`], and what was
    /// published meanwhile was read from the room's log: the messages
    /// recovered follow this event, before anything live, and the
    /// [`Gap`] says how many there are and what could not be recovered.
    /// Takes the place of [`Event::Subscribed`] after a loss (a relay that
    /// cannot fill gaps says `Subscribed` again instead).
    Restored(Arc<Gap>),
    /// A payload published on the channel (possibly by this very connection),
    /// parsed once for everyone it is delivered to.
    Message(Arc<Incoming>),
    /// Nothing more is waiting right now: a good moment to flush what was
    /// written. Never queued; listeners say it when they are about to block.
    Idle,
}

/// What a restored subscription recovered from the room's log (see
/// [`Event::Restored`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// How many messages and events of the room were recovered (they
    /// follow the event).
    pub recovered: usize,
    /// What could not be recovered, if anything.
    pub missing: Option<Missing>,
}

/// The part of a [`Gap`] that could not be recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// How many messages and events are gone (`None`: not known).
    pub count: Option<u64>,
    /// When the subscription was lost (milliseconds since the Unix epoch):
    /// what is missing was published after it.
    pub since: u64,
    /// Why, in words.
    pub why: &'static str,
}

/// A client that the thread dispatching its room's messages may write to
/// itself, without waking the client's subscriber thread (see
/// [`fanout`](super::fanout)'s *direct delivery*). The session implements it.
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
    // Inlined: it sits on every subscriber thread's deepest call chain
    // (delivering a frame), whose depth decides whether an idle thread's
    // stack holds two pages or three (docs/PERFORMANCE.md, "The start
    // thread").
    #[inline]
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
