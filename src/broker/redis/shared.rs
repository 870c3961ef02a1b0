//! Shared subscriptions (`--subscriptions shared`): one Redis subscription
//! per room per process, fanned out to the room's clients here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use super::topology::Topology;

use super::listener::{RedisListener, SubscriptionSockets};
use crate::broker::fanout::{Fanout, FanoutListener, Source};
use crate::broker::{BrokerError, Canceller, Event, Flow, Listen, Subscription};
use crate::metrics::Metrics;
use crate::protocol::{ConnId, Room};

/// Shared-subscription mode: one Redis subscription per room per process,
/// held by the room's *listener thread* (`tc-room-N`). Its *dispatcher
/// threads* (`tc-fan-N-S`, one per core, up to [`MAX_DISPATCHERS`]) each
/// hand what the reader received to their shard of the room's clients here,
/// batching whatever arrived together: a message to a big room is written
/// on every core at once.
///
/// The first client of a room starts its feed; the last one to leave stops
/// it and joins its thread. A client arriving while the feed is subscribed
/// is subscribed at once; one arriving earlier waits for the feed's first
/// `Subscribed` (or is refused, as in per-client mode, if the feed's first
/// attempt fails).
pub(super) struct SharedFeeds {
    pub(super) fanout: Arc<Fanout>,
    /// Channel → its running feed. Locked while registering and
    /// unregistering, so a room's feed is started and stopped exactly once.
    pub(super) feeds: Mutex<HashMap<String, RoomFeed>>,
    /// Where Redis is.
    pub(super) topology: Arc<Topology>,
    pub(super) url: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) subscriptions: Arc<SubscriptionSockets>,
    pub(super) max_payload: usize,
}

/// A room's running feed: a listener thread and its dispatcher threads.
pub(super) struct RoomFeed {
    canceller: Canceller,
    reader: JoinHandle<()>,
    dispatchers: Vec<JoinHandle<()>>,
}

/// Most dispatcher threads per room: one per core, up to this many.
const MAX_DISPATCHERS: usize = 4;

/// How many dispatcher threads each room gets.
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
        let (listener, canceller) = RedisListener::new(
            &self.topology,
            &self.url,
            room,
            &self.metrics,
            &self.subscriptions,
            true,
            self.max_payload,
        );
        let listener = Box::new(listener);
        let stop = canceller.signal();
        let spawn_error = |e| BrokerError::Redis(format!("cannot start a room's feed thread: {e}"));
        // The dispatchers: each takes whatever the reader has queued for it
        // and hands it to its shard of the room's clients as one batch. They
        // end when the reader does (it drops their queues' senders).
        let mut senders = Vec::new();
        let mut dispatchers = Vec::new();
        for shard in 0..self.fanout.shards() {
            let (events_tx, events_rx) = crossbeam_channel::bounded::<Event>(FEED_QUEUE);
            let fanout = Arc::clone(&self.fanout);
            let channel = channel.to_owned();
            let source = Source { generation, shard };
            let dispatcher = thread::Builder::new()
                .name(format!("tc-fan-{generation}-{shard}"))
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
                    dispatchers.push(dispatcher);
                }
                Err(e) => {
                    drop(senders);
                    join_all(dispatchers);
                    return Err(spawn_error(e));
                }
            }
        }
        // The reader: blocks on the room's Redis subscription, and queues
        // each event for every dispatcher. If one falls behind, the reader
        // blocks on its queue, and Redis buffers.
        let channel = channel.to_owned();
        let reader = thread::Builder::new()
            .name(format!("tc-room-{generation}"))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                let result = listener.listen(&stop, &mut |event| match event {
                    Event::Idle => Flow::Continue(()),
                    event => {
                        for events in &senders {
                            if events.send(event.clone()).is_err() {
                                return Flow::Break(());
                            }
                        }
                        Flow::Continue(())
                    }
                });
                // The one place this thread's errors are logged.
                if let Err(e) = result {
                    log::error!("the shared subscription to {channel} failed: {e}");
                }
            });
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                // The queues' senders are gone with the closure: the
                // dispatchers end.
                join_all(dispatchers);
                return Err(spawn_error(e));
            }
        };
        Ok(RoomFeed {
            canceller,
            reader,
            dispatchers,
        })
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
            // The reader first: its end ends the dispatchers.
            let reader_panicked = feed.reader.join().is_err();
            if join_all(feed.dispatchers) || reader_panicked {
                log::error!("a feed thread of {} panicked", self.channel);
            }
        }
    }
}
