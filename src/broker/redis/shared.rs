//! Shared subscriptions (`--subscriptions shared`): one Redis subscription
//! per room per process, fanned out to the room's clients here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;

use super::listener::{Listeners, Patience, RedisListener};
use crate::broker::error::BrokerError;
use crate::broker::fanout::{Fanout, FanoutListener, Source};
use crate::broker::subscription::{Canceller, Event, Flow, Listen, Subscription};
use crate::capacity::{Capacity, Cost, Reservation};
use crate::protocol::{ConnId, Room};

/// Shared-subscription mode: one Redis subscription per room per process,
/// held by the room's *listener thread* (`tc-room-N`), which hands what it
/// receives to the room's clients here, batching whatever arrived together.
///
/// A room costs one thread and one Redis connection, reserved from the
/// process's budget ([`Capacity`]) before they are started: past the
/// budget the client that would start a room's feed is refused (a 503),
/// where spawning would have risked the process. Only a room with more than
/// [`SMALL_ROOM`] clients here gets *dispatcher threads* (`tc-fan-N-S`, one
/// per core, up to [`MAX_DISPATCHERS`]), reserved from the budget too, so
/// that a message to a big room is written on every core at once; a
/// listener that cannot have them goes on delivering itself.
///
/// The first client of a room starts its feed; the last one to leave stops
/// it and joins its thread (which joins its dispatchers). A client arriving
/// while the feed is subscribed is subscribed at once; one arriving earlier
/// waits for the feed's first `Subscribed` (or is refused, as in
/// per-client mode, if the feed's first attempt fails).
pub(super) struct SharedFeeds {
    pub(super) fanout: Arc<Fanout>,
    /// Channel → its running feed. Locked while registering and
    /// unregistering, so a room's feed is started and stopped exactly once.
    pub(super) feeds: Mutex<HashMap<String, RoomFeed>>,
    /// What the room's feeds subscribe with.
    pub(super) listeners: Arc<Listeners>,
    /// The process's budget of threads and descriptors.
    pub(super) capacity: Arc<Capacity>,
}

/// A room's running feed: its listener thread (which owns the dispatcher
/// threads, if the room has any).
pub(super) struct RoomFeed {
    canceller: Canceller,
    listener_thread: JoinHandle<()>,
    /// The listener's thread and Redis connection in the budget, given back
    /// once it is joined.
    _reserved: Reservation,
}

/// Most dispatcher threads per room: one per core, up to this many.
const MAX_DISPATCHERS: usize = 4;

/// Clients a room may have here while its listener delivers to them
/// itself; past it the room gets dispatcher threads. One thread writes to
/// this many clients in well under a millisecond (most writes go directly
/// to the socket, see `fanout`), so only bigger rooms gain from more cores.
pub(super) const SMALL_ROOM: usize = 64;

/// What a room's feed reserves from the budget: the listener thread and
/// its Redis connection.
const FEED_COST: Cost = Cost::new(1, 1);

/// How many dispatcher threads a big room gets.
pub(super) fn dispatchers_per_room() -> usize {
    thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_DISPATCHERS)
}

/// Events a room's listener may queue for each dispatcher.
const FEED_QUEUE: usize = 1024;
/// Most events one dispatch hands out.
const MAX_DISPATCH: usize = 256;

impl SharedFeeds {
    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<String, RoomFeed>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn subscribe(
        self: &Arc<Self>,
        room: &Room,
        conn: &ConnId,
    ) -> Result<Subscription, BrokerError> {
        let channel = room.channel();
        let registered = {
            let mut feeds = self.feeds();
            let registered = self.fanout.register(&channel, conn);
            if let Some(generation) = registered.new_channel {
                match self.start_feed(room, &channel, generation) {
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

    /// Starts `room`'s feed; `channel` is its key among the feeds.
    fn start_feed(
        &self,
        room: &Room,
        channel: &str,
        generation: u64,
    ) -> Result<RoomFeed, BrokerError> {
        let reserved = self.capacity.reserve(FEED_COST).ok_or_else(|| {
            BrokerError::Full(
                "no thread left to follow another room (each room in use here takes one; \
                 see --max-connections)"
                    .into(),
            )
        })?;
        // A room's feed serves clients that come and go: it never gives
        // up, and those waiting to join hear of every failure.
        let (listener, canceller) = RedisListener::new(&self.listeners, room, Patience::Endless);
        let listener = Box::new(listener);
        let stop = canceller.signal();
        let mut delivery = Delivery {
            fanout: Arc::clone(&self.fanout),
            channel: channel.to_owned(),
            generation,
            capacity: Arc::clone(&self.capacity),
            pending: Vec::new(),
            dispatchers: None,
            declined: false,
        };
        // The listener: blocks on the room's Redis subscription and hands
        // out what it receives, itself or through its dispatchers.
        let listener_thread = thread::Builder::new()
            .name(format!("tc-room-{generation}"))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                let result = listener.listen(&stop, &mut |event| delivery.take(event));
                // The one place this thread's errors are logged.
                if let Err(e) = result {
                    log::error!(
                        "the shared subscription to {} failed: {e}",
                        delivery.channel
                    );
                }
                delivery.finish();
            })
            .map_err(|e| {
                BrokerError::Redis(format!("cannot start a room's listener thread: {e}"))
            })?;
        Ok(RoomFeed {
            canceller,
            listener_thread,
            _reserved: reserved,
        })
    }
}

/// How a room's listener hands out what it receives: itself, in batches of
/// what arrived together, while the room is small; through dispatcher
/// threads once it is big (see [`SharedFeeds`]).
struct Delivery {
    fanout: Arc<Fanout>,
    channel: String,
    generation: u64,
    capacity: Arc<Capacity>,
    /// Received and not yet handed out (while delivering itself).
    pending: Vec<Event>,
    /// The room's dispatcher threads, once it has them.
    dispatchers: Option<Dispatchers>,
    /// The budget had no room for dispatchers (said once in the log).
    declined: bool,
}

/// A big room's dispatcher threads: each takes whatever the listener has
/// queued for it and hands it to its shard of the room's clients as one
/// batch. They end when the listener drops their queues' senders.
struct Dispatchers {
    senders: Vec<Sender<Event>>,
    threads: Vec<JoinHandle<()>>,
    /// Their threads in the budget, given back once they are joined.
    _reserved: Reservation,
}

impl Delivery {
    /// Takes one event from the listener.
    fn take(&mut self, event: Event) -> Flow {
        if let Some(dispatchers) = &self.dispatchers {
            // If one falls behind, the listener blocks on its queue, and
            // Redis buffers.
            if !matches!(event, Event::Idle) {
                for (shard, events) in dispatchers.senders.iter().enumerate() {
                    if events.send(for_shard(shard, &event)).is_err() {
                        return Flow::Break(());
                    }
                }
            }
            return Flow::Continue(());
        }
        match event {
            // Nothing more has arrived: hand out what has.
            Event::Idle => self.flush(),
            Event::Message(_) => {
                self.pending.push(event);
                if self.pending.len() >= MAX_DISPATCH {
                    self.flush();
                }
            }
            // `Subscribed` and `Lost` are awaited by joiners: at once.
            control => {
                self.pending.push(control);
                self.flush();
            }
        }
        Flow::Continue(())
    }

    /// Hands out what is pending, to every shard; then, if the room has
    /// grown big, starts its dispatchers (after the flush: whatever they
    /// hand out comes after what the listener did).
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let source = Source {
            generation: self.generation,
            shard: None,
        };
        let events = std::mem::take(&mut self.pending);
        self.fanout
            .dispatch_all(&self.channel, Some(source), events);
        if self.fanout.shards() > 1 && self.fanout.subscribers(&self.channel) > SMALL_ROOM {
            self.dispatchers = self.start_dispatchers();
        }
    }

    /// The room's dispatcher threads, if the budget allows them and the OS
    /// starts them all.
    fn start_dispatchers(&mut self) -> Option<Dispatchers> {
        let shards = self.fanout.shards();
        let Some(reserved) = self.capacity.reserve(Cost::new(shards, 0)) else {
            if !std::mem::replace(&mut self.declined, true) {
                log::warn!(
                    "{} is big, but the thread budget has no room for its dispatchers: \
                     its listener goes on delivering alone",
                    self.channel
                );
            }
            return None;
        };
        let mut senders = Vec::with_capacity(shards);
        let mut threads = Vec::with_capacity(shards);
        for shard in 0..shards {
            let (events_tx, events_rx) = crossbeam_channel::bounded::<Event>(FEED_QUEUE);
            let fanout = Arc::clone(&self.fanout);
            let channel = self.channel.clone();
            let source = Source {
                generation: self.generation,
                shard: Some(shard),
            };
            let dispatcher = thread::Builder::new()
                .name(format!("tc-fan-{}-{shard}", self.generation))
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
                    threads.push(dispatcher);
                }
                Err(e) => {
                    log::error!("cannot start a dispatcher of {}: {e}", self.channel);
                    drop(senders);
                    join_all(threads);
                    return None;
                }
            }
        }
        Some(Dispatchers {
            senders,
            threads,
            _reserved: reserved,
        })
    }

    /// The listener is done: its dispatchers end, and are joined.
    fn finish(mut self) {
        self.flush();
        if let Some(dispatchers) = self.dispatchers.take() {
            drop(dispatchers.senders);
            if join_all(dispatchers.threads) {
                log::error!("a dispatcher of {} panicked", self.channel);
            }
        }
    }
}

/// What the listener hands dispatcher `shard`: the event itself to the
/// first, a copy of a message to each other one. Every frame written takes
/// and drops a reference to the frame's bytes, an atomic count: on one
/// shared frame, the dispatchers' cores passed its cache line back and
/// forth at every write (5% of the server's CPU in bench (b)). A copy costs
/// the listener a clone and each dispatcher one encoding per message.
fn for_shard(shard: usize, event: &Event) -> Event {
    match event {
        Event::Message(incoming) if shard > 0 => incoming
            .copy_for_another_thread()
            .map_or_else(|| event.clone(), |copy| Event::Message(Arc::new(copy))),
        _ => event.clone(),
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
            // It joins its dispatchers before it ends.
            if feed.listener_thread.join().is_err() {
                log::error!("the listener thread of {} panicked", self.channel);
            }
        }
    }
}
