//! Fan-out inside one process: one source of messages per channel, one
//! bounded queue per subscribed client.
//!
//! Two brokers deliver this way:
//!
//! * the in-process broker, whose `publish` hands each payload straight to
//!   [`Fanout::dispatch`];
//! * the Redis broker in *shared-subscription* mode, where one thread per room
//!   holds the process's only `SUBSCRIBE` for that room and dispatches what it
//!   receives (see `broker/redis/shared.rs`).
//!
//! Either way a client's subscriber thread keeps the design's shape: it
//! blocks on its own crossbeam receiver ([`FanoutListener`]), exactly as it
//! would block on its own Redis connection.
//!
//! **Parse and encode once.** What is queued is an [`Event`]; a message is an
//! `Arc<Incoming>`, parsed once by the dispatcher and encoded once per format
//! by whichever client writes it first. A thousand clients cost a thousand
//! pointer copies, not a thousand JSON round trips.
//!
//! **Direct delivery.** Waking a client's subscriber thread for every
//! message is the biggest cost of a delivery (a thread switch is dearer than
//! the write itself). So a client that has registered a
//! [`DirectSink`](super::DirectSink) (the session's `direct` module) is
//! written to by the dispatching thread
//! itself, without blocking, *whenever its queue is empty*: nothing is
//! waiting that the new messages could overtake. Otherwise — the client is
//! behind, not yet welcomed, or its socket is full — they are queued as
//! always, and the subscriber thread catches up. A sink that took messages
//! but could not write them all gets a `Queued::Flush` that wakes the
//! subscriber thread to finish the write, blocking, as it would have. The
//! queue's counter is lowered only after the subscriber thread has handled
//! an item, so "empty" also means "nothing in its hands". Only the shared
//! subscription offers it: its dispatcher hands out whatever arrived
//! together, so one write carries a batch. The in-process broker dispatches
//! each message on its sender's thread as it is published; written directly,
//! every message would be a write per client, where queued ones pile up and
//! leave in batches (docs/PERFORMANCE.md measures both).
//!
//! **Bounded, and cheap when idle.** A client may have at most
//! [`QUEUE_LIMIT`] events waiting. One that is further behind is dropped from
//! the channel (its listener then ends with [`BrokerError::Lagged`]) — it
//! must not slow the others or grow without bound, the same fate Redis deals
//! to a subscriber past its output-buffer limit. The bound is kept by a
//! counter beside a crossbeam *list* channel, not by a crossbeam `bounded`
//! channel: `bounded(n)` allocates and initialises all `n` slots up front
//! (4,096 slots would be 100 KiB resident for every idle client), while the
//! list channel allocates small blocks only while messages are waiting.
//!
//! **Order.** Messages are dispatched under a read lock, and changes of state
//! (`Subscribed`, `Lost`, a client registering) under the write lock. So a
//! client that registers on a live channel gets `Subscribed` before any
//! message, and every client sees the messages of one channel in the order
//! they were dispatched.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::broker::error::BrokerError;
use crate::broker::subscription::{Direct, DirectSlot, Event, Flow, Listen, StopSignal};
use crate::protocol::{ConnId, Incoming};

/// Events a client may have waiting before it is dropped as too slow.
pub const QUEUE_LIMIT: usize = 4096;

/// How long a new client waits for a channel's source to subscribe, when it
/// registers on a channel that is not live yet.
const FIRST_SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Channel name → its subscribers, for one process.
pub(crate) struct Fanout {
    channels: RwLock<HashMap<String, Channel>>,
    /// Whether every channel is live from the start (the in-process broker),
    /// or only once its source says [`Event::Subscribed`] (Redis).
    always_live: bool,
    /// Into how many shards each channel's subscribers are dealt, one per
    /// dispatcher thread (see [`Source`]).
    shards: usize,
    /// Numbers the channels created, so a source that is being stopped
    /// cannot deliver into a channel that was created again meanwhile.
    generations: AtomicU64,
}

/// One channel's subscribers, dealt into shards, one per dispatcher.
struct Channel {
    generation: u64,
    shards: Vec<Shard>,
}

/// The subscribers one dispatcher serves (see [`Source`]).
#[derive(Default)]
struct Shard {
    /// Whether its dispatcher has said the source is subscribed (so clients
    /// joining this shard are, too).
    live: bool,
    subscribers: Vec<Subscriber>,
}

/// Who is dispatching: a channel's source, through one of its dispatcher
/// threads or by itself. A dispatcher serves one shard of the channel's
/// subscribers, so a big room's writes are spread over the machine's cores;
/// a client always belongs to the same shard, so it gets its messages in
/// order. A small room's source serves every shard itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Source {
    /// The channel's generation this source was started for (a stopped
    /// source must not deliver into a channel created again meanwhile).
    pub(crate) generation: u64,
    /// The shard this dispatcher serves (`None`: all of them).
    pub(crate) shard: Option<usize>,
}

/// What a client's queue holds: one event, or a run of messages that the
/// source received together (one wake-up of the client for all of them).
enum Queued {
    One(Event),
    Batch(Arc<[Arc<Incoming>]>),
    /// The client's direct sink took messages it could not write at once:
    /// the subscriber thread finishes writing them (see the module doc).
    Flush,
}

impl Queued {
    /// How many events it counts for against [`QUEUE_LIMIT`].
    fn weight(&self) -> usize {
        match self {
            Queued::One(_) | Queued::Flush => 1,
            Queued::Batch(messages) => messages.len(),
        }
    }

    /// The messages it carries, if it is messages.
    fn messages(&self) -> Option<&[Arc<Incoming>]> {
        match self {
            Queued::One(Event::Message(message)) => Some(std::slice::from_ref(message)),
            Queued::Batch(messages) => Some(messages),
            _ => None,
        }
    }
}

/// One client's end of a channel, as the dispatcher sees it.
struct Subscriber {
    conn: ConnId,
    tx: Sender<Queued>,
    /// Events queued and not yet handled by the client's subscriber thread.
    queued: Arc<AtomicUsize>,
    /// The client's direct sink, once it has one.
    direct: DirectSlot,
}

/// One client's end of a channel, as its subscriber thread sees it.
pub(crate) struct Inbox {
    rx: Receiver<Queued>,
    queued: Arc<AtomicUsize>,
    /// Registered on a live channel: subscribed from the start, without a
    /// `Subscribed` in the queue. (A crossbeam list channel allocates a
    /// block of 31 slots, 1 KiB, for its first message, and keeps it until
    /// 31 have passed: with direct delivery, most clients never need one.)
    live: bool,
}

/// What [`Fanout::register`] did.
pub(crate) struct Registered {
    /// The client's queue.
    pub(crate) inbox: Inbox,
    /// Where the client's direct sink goes (for its `Subscription`).
    pub(crate) direct: DirectSlot,
    /// `Some(generation)` when the channel is new: the caller starts a
    /// source for it, which dispatches with this generation.
    pub(crate) new_channel: Option<u64>,
}

impl Fanout {
    /// An empty fan-out whose channels are dispatched by `shards` threads
    /// each.
    pub(crate) fn new(always_live: bool, shards: usize) -> Fanout {
        Fanout {
            channels: RwLock::default(),
            always_live,
            shards: shards.max(1),
            generations: AtomicU64::new(0),
        }
    }

    /// Into how many shards each channel's subscribers are dealt.
    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    /// Adds connection `conn` to `channel`, creating the channel if needed.
    pub(crate) fn register(&self, channel: &str, conn: &ConnId) -> Registered {
        let (tx, rx) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let mut new_channel = None;
        let entry = channels.entry(channel.to_owned()).or_insert_with(|| {
            let generation = self.generations.fetch_add(1, Ordering::Relaxed);
            new_channel = Some(generation);
            let shard = || Shard {
                live: self.always_live,
                subscribers: Vec::new(),
            };
            Channel {
                generation,
                shards: std::iter::repeat_with(shard).take(self.shards).collect(),
            }
        });
        // The smallest shard (the first of equals): dealt in turn, and
        // balanced again as clients leave.
        let shard = entry
            .shards
            .iter_mut()
            .min_by_key(|shard| shard.subscribers.len())
            .expect("a channel has shards");
        let direct = DirectSlot::default();
        shard.subscribers.push(Subscriber {
            conn: conn.clone(),
            tx,
            queued: Arc::clone(&queued),
            direct: Arc::clone(&direct),
        });
        let live = shard.live;
        Registered {
            inbox: Inbox { rx, queued, live },
            direct,
            new_channel,
        }
    }

    /// Removes connection `conn` from `channel`. Returns true if the channel
    /// is now empty, in which case it is gone and its source should stop.
    pub(crate) fn unregister(&self, channel: &str, conn: &ConnId) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = channels.get_mut(channel) else {
            return false;
        };
        for shard in &mut entry.shards {
            shard.subscribers.retain(|s| &s.conn != conn);
        }
        if entry
            .shards
            .iter()
            .all(|shard| shard.subscribers.is_empty())
        {
            channels.remove(channel);
            return true;
        }
        false
    }

    /// Hands `event` to every subscriber of `channel`; from a `source`, to
    /// those of its shard, and only if the channel is still the one that
    /// source was started for.
    ///
    /// `Subscribed` and `Lost` also mark the channel live or not, so clients
    /// registering later know whether they are subscribed yet.
    pub(crate) fn dispatch(&self, channel: &str, source: Option<Source>, event: Event) {
        match event {
            Event::Message(_) => self.offer_messages(channel, source, Queued::One(event)),
            Event::Idle => {}
            control => self.offer_control(channel, source, control),
        }
    }

    /// Hands several events to every subscriber, in order. Consecutive
    /// messages go into each client's queue as one batch: a source that
    /// received 50 messages at once wakes each client once, not 50 times.
    pub(crate) fn dispatch_all(&self, channel: &str, source: Option<Source>, events: Vec<Event>) {
        let mut messages: Vec<Arc<Incoming>> = Vec::new();
        for event in events {
            match event {
                Event::Message(message) => messages.push(message),
                Event::Idle => {}
                control => {
                    self.offer_run(channel, source, std::mem::take(&mut messages));
                    self.offer_control(channel, source, control);
                }
            }
        }
        self.offer_run(channel, source, messages);
    }

    /// Offers a run of messages as one queue item.
    fn offer_run(&self, channel: &str, source: Option<Source>, messages: Vec<Arc<Incoming>>) {
        let queued = match messages.len() {
            0 => return,
            1 => Queued::One(Event::Message(messages.into_iter().next().expect("one"))),
            _ => Queued::Batch(messages.into()),
        };
        self.offer_messages(channel, source, queued);
    }

    /// Offers one item of messages (under the read lock: dispatching does
    /// not stop other rooms, or other dispatches of this one).
    fn offer_messages(&self, channel: &str, source: Option<Source>, queued: Queued) {
        let lagging = {
            let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
            match channels.get(channel).filter(|e| e.is(source)) {
                Some(entry) => entry.offer_all(&queued, source),
                None => return,
            }
        };
        self.drop_laggards(channel, lagging);
    }

    fn offer_control(&self, channel: &str, source: Option<Source>, event: Event) {
        let lagging = {
            let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
            match channels.get_mut(channel).filter(|e| e.is(source)) {
                Some(entry) => {
                    let live = matches!(event, Event::Subscribed | Event::Restored(_));
                    let served = entry.served_by(source);
                    for shard in &mut entry.shards[served] {
                        shard.live = live;
                    }
                    entry.offer_all(&Queued::One(event), source)
                }
                None => return,
            }
        };
        self.drop_laggards(channel, lagging);
    }

    /// Dropping a laggard's sender ends its listener with `Lagged`. It
    /// stays registered (its channel is not empty) until its listener
    /// unregisters it, so the channel's source is not stopped under the
    /// feet of whoever registers next.
    fn drop_laggards(&self, channel: &str, lagging: Vec<ConnId>) {
        if lagging.is_empty() {
            return;
        }
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = channels.get_mut(channel) {
            let subscribers = entry.shards.iter_mut().flat_map(|s| &mut s.subscribers);
            for subscriber in subscribers {
                if lagging.contains(&subscriber.conn) {
                    let (dead, _) = crossbeam_channel::bounded(0);
                    subscriber.tx = dead;
                }
            }
        }
    }

    /// How many clients are subscribed to `channel`.
    pub(crate) fn subscribers(&self, channel: &str) -> usize {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        channels.get(channel).map_or(0, |entry| {
            entry.shards.iter().map(|s| s.subscribers.len()).sum()
        })
    }

    /// The number of channels with subscribers (for tests).
    #[cfg(test)]
    pub(crate) fn channel_count(&self) -> usize {
        self.channels.read().unwrap().len()
    }
}

impl Channel {
    /// Whether this is the channel `source` was started for (any source,
    /// without one).
    fn is(&self, source: Option<Source>) -> bool {
        source.is_none_or(|s| s.generation == self.generation)
    }

    /// Which shards `source` serves: its own, or all of them.
    fn served_by(&self, source: Option<Source>) -> Range<usize> {
        match source.and_then(|s| s.shard) {
            Some(shard) => shard..shard + 1,
            None => 0..self.shards.len(),
        }
    }

    /// Offers `queued` to everyone `source` serves; returns who is too far
    /// behind to take it.
    fn offer_all(&self, queued: &Queued, source: Option<Source>) -> Vec<ConnId> {
        self.shards[self.served_by(source)]
            .iter()
            .flat_map(|shard| &shard.subscribers)
            .filter(|s| !s.offer(queued.clone()))
            .map(|s| s.conn.clone())
            .collect()
    }
}

impl Clone for Queued {
    fn clone(&self) -> Self {
        match self {
            Queued::One(event) => Queued::One(event.clone()),
            Queued::Batch(messages) => Queued::Batch(Arc::clone(messages)),
            Queued::Flush => Queued::Flush,
        }
    }
}

impl Subscriber {
    /// Delivers messages directly when the client has nothing queued (see
    /// the module doc), and queues everything else; false when this makes
    /// the client [`QUEUE_LIMIT`] behind, the moment it is to be dropped.
    fn offer(&self, mut queued: Queued) -> bool {
        if let Some(sink) = self.direct.get()
            && self.queued.load(Ordering::Acquire) == 0
            && let Some(messages) = queued.messages()
        {
            match sink.try_deliver(messages) {
                Direct::Written => return true,
                Direct::Unfinished => queued = Queued::Flush,
                Direct::Declined => {}
            }
        }
        let weight = queued.weight();
        let before = self.queued.fetch_add(weight, Ordering::Relaxed);
        if before + weight <= QUEUE_LIMIT {
            let _ = self.tx.send(queued);
            true
        } else {
            // Just fell behind (the caller drops it), or was dropped already
            // and is waiting to unregister.
            before > QUEUE_LIMIT
        }
    }
}

/// A client's subscriber-thread loop over its [`Inbox`]. `G` is whatever
/// must happen when it ends: dropping it unregisters the client.
pub(crate) struct FanoutListener<G: Send> {
    pub(crate) inbox: Inbox,
    pub(crate) guard: G,
}

impl<G: Send> Listen for FanoutListener<G> {
    fn listen(
        self: Box<Self>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<(), BrokerError> {
        let FanoutListener { inbox, guard } = *self;
        // Held until this function returns, however it returns.
        let _guard = guard;
        let deadline = Instant::now() + FIRST_SUBSCRIBE_TIMEOUT;
        let mut subscribed = inbox.live;
        let mut live = inbox.live;
        if subscribed && on_event(Event::Subscribed).is_break() {
            return Ok(());
        }
        loop {
            let Some(queued) = next(&inbox, stop, subscribed, deadline)? else {
                return Ok(());
            };
            let weight = queued.weight();
            let flow = match queued {
                Queued::Batch(messages) => messages
                    .iter()
                    .try_for_each(|message| on_event(Event::Message(Arc::clone(message)))),
                // Told again by a source that reconnected: only news if we
                // had been told it was lost.
                Queued::One(Event::Subscribed) if live => Flow::Continue(()),
                Queued::One(Event::Subscribed) => {
                    subscribed = true;
                    live = true;
                    on_event(Event::Subscribed)
                }
                // Restored with its gap filled: news only to those told it
                // was lost. One waiting for its first subscription is
                // subscribed now (what the fill delivers next reached its
                // welcome's log read already, or comes after it).
                Queued::One(Event::Restored(_)) if live => Flow::Continue(()),
                Queued::One(Event::Restored(_)) if !subscribed => {
                    subscribed = true;
                    live = true;
                    on_event(Event::Subscribed)
                }
                Queued::One(Event::Restored(gap)) => {
                    live = true;
                    on_event(Event::Restored(gap))
                }
                // The source failed before we were ever subscribed: the
                // client is refused, as with its own failed subscription.
                Queued::One(Event::Lost(e)) if !subscribed => return Err((*e).clone()),
                Queued::One(Event::Lost(_)) if !live => Flow::Continue(()),
                Queued::One(Event::Lost(e)) => {
                    live = false;
                    on_event(Event::Lost(e))
                }
                Queued::One(other) => on_event(other),
                // The client's sink left frames to write: the `Idle` below,
                // once nothing else waits, writes them with everything else.
                Queued::Flush => Flow::Continue(()),
            };
            // Only now: until the item is handled, the dispatcher must not
            // deliver around it.
            inbox.queued.fetch_sub(weight, Ordering::AcqRel);
            if flow.is_break() {
                return Ok(());
            }
            if inbox.rx.is_empty() && on_event(Event::Idle).is_break() {
                return Ok(());
            }
        }
    }
}

/// Waits for the client's next item: `None` once the subscription is
/// stopped. Out of line: waiting on three channels takes crossbeam's
/// selection machinery, whose 400 bytes of frame would otherwise sit above
/// every write to the client, and push an idle client's subscriber stack
/// onto a third page (4 KiB more per client, for its whole life).
#[inline(never)]
fn next(
    inbox: &Inbox,
    stop: &StopSignal,
    subscribed: bool,
    deadline: Instant,
) -> Result<Option<Queued>, BrokerError> {
    let waiting_for_first = if subscribed {
        crossbeam_channel::never()
    } else {
        crossbeam_channel::at(deadline)
    };
    let queued = crossbeam_channel::select! {
        recv(inbox.rx) -> queued => match queued {
            Ok(queued) => queued,
            // Our sender was replaced by the dispatcher: we fell behind.
            Err(_) => return Err(BrokerError::Lagged),
        },
        recv(stop.receiver()) -> _ => return Ok(None),
        recv(waiting_for_first) -> _ => {
            return Err(BrokerError::Redis(
                "timed out waiting for the room's subscription".into(),
            ));
        }
    };
    if stop.is_stopped() {
        return Ok(None);
    }
    Ok(Some(queued))
}

#[cfg(test)]
mod tests;
