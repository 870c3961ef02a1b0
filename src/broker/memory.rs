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
//! (`tc-expire`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use super::fanout::{Fanout, FanoutListener};
use super::{Broker, BrokerError, Canceller, Event, Presence, Receipt, Settings, Subscription};
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, ConnId, Incoming, Nickname, Room};

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
}

/// Every room's state, and the gauge that counts them.
struct Rooms {
    state: Mutex<HashMap<String, RoomState>>,
    metrics: Arc<Metrics>,
}

struct RoomState {
    history: VecDeque<Arc<[u8]>>,
    /// Bytes in `history`.
    history_bytes: usize,
    /// (connection, nickname) of everyone in the room.
    members: Vec<(ConnId, String)>,
    /// The last message, join or leave: an empty room is freed
    /// `--room-ttl` after it.
    last_used: Instant,
}

impl Default for RoomState {
    fn default() -> Self {
        RoomState {
            history: VecDeque::new(),
            history_bytes: 0,
            members: Vec::new(),
            last_used: Instant::now(),
        }
    }
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RoomState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the room's state (created if need be), marked as used.
    fn with<T>(&self, room: &Room, f: impl FnOnce(&mut RoomState) -> T) -> T {
        let mut rooms = self.lock();
        let state = rooms.entry(room.name().to_owned()).or_default();
        state.last_used = Instant::now();
        let result = f(state);
        self.metrics.rooms_in_memory.set(rooms.len() as i64);
        result
    }

    /// Frees the rooms that nobody is in and nobody used for `ttl`.
    fn expire(&self, ttl: Duration) {
        let mut rooms = self.lock();
        rooms.retain(|_, state| !state.members.is_empty() || state.last_used.elapsed() < ttl);
        self.metrics.rooms_in_memory.set(rooms.len() as i64);
    }
}

impl MemoryBroker {
    /// An empty broker, and its sweeper thread.
    pub fn new(settings: &Settings, metrics: &Arc<Metrics>) -> Result<MemoryBroker, BrokerError> {
        let rooms = Arc::new(Rooms {
            state: Mutex::default(),
            metrics: Arc::clone(metrics),
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

    fn publish(&self, room: &Room, payload: Vec<u8>, record: bool) -> Receipt {
        let incoming = Arc::new(Incoming::parse(&payload));
        if record && self.settings.history > 0 {
            let (max_count, max_bytes) = (self.settings.history, self.settings.history_bytes);
            self.rooms.with(room, |state| {
                state.history_bytes += payload.len();
                state.history.push_back(payload.into());
                // The oldest go first, until both bounds hold (a message
                // bigger than the byte bound on its own is not kept).
                while state.history.len() > max_count || state.history_bytes > max_bytes {
                    let Some(old) = state.history.pop_front() else {
                        break;
                    };
                    state.history_bytes -= old.len();
                }
            });
        }
        self.fanout
            .dispatch(&room.channel(), None, Event::Message(incoming));
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

    fn history(&self, room: &Room) -> Result<Vec<Vec<u8>>, BrokerError> {
        Ok(self
            .rooms
            .lock()
            .get(room.name())
            .map(|r| r.history.iter().map(|p| p.to_vec()).collect())
            .unwrap_or_default())
    }

    fn history_mark(&self, room: &Room) -> Result<Option<String>, BrokerError> {
        let rooms = self.rooms.lock();
        let newest = rooms.get(room.name()).and_then(|r| r.history.back());
        Ok(newest.and_then(|payload| ChatMessage::from_payload(payload).ok()?.id))
    }

    fn join(&self, room: &Room, conn: &ConnId, nickname: &Nickname) -> Result<(), BrokerError> {
        self.rooms.with(room, |state| {
            state
                .members
                .push((conn.clone(), nickname.as_str().to_owned()));
        });
        Ok(())
    }

    fn leave(&self, room: &Room, conn: &ConnId) -> Result<(), BrokerError> {
        // An empty room without history goes at once; one with history
        // stays for `--room-ttl` (the sweeper frees it).
        let mut rooms = self.rooms.lock();
        if let Some(state) = rooms.get_mut(room.name()) {
            state.members.retain(|(c, _)| c != conn);
            state.last_used = Instant::now();
            if state.members.is_empty() && state.history.is_empty() {
                rooms.remove(room.name());
            }
        }
        self.rooms.metrics.rooms_in_memory.set(rooms.len() as i64);
        Ok(())
    }

    fn members(&self, room: &Room) -> Result<Vec<String>, BrokerError> {
        let mut members: Vec<String> = self
            .rooms
            .lock()
            .get(room.name())
            .map(|r| r.members.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default();
        members.sort();
        Ok(members)
    }

    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError> {
        let rooms = self.rooms.lock();
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
        Ok(Presence {
            count: members.len(),
            nicknames: names.into_iter().map(str::to_owned).collect(),
        })
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-process relay (single instance)".to_owned()
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
mod tests {
    use super::*;
    use std::ops::ControlFlow;
    use std::time::Duration;

    fn broker(history: usize) -> MemoryBroker {
        MemoryBroker::new(
            &Settings {
                instance: 1,
                history,
                history_bytes: 16,
                room_ttl: Duration::from_millis(200),
                max_payload: 1024,
                subscriptions: Default::default(),
            },
            &Arc::default(),
        )
        .unwrap()
    }

    #[test]
    fn history_is_bounded_in_bytes_and_empty_rooms_expire() {
        let broker = broker(100);
        let room = Room::parse("r").unwrap();
        for m in ["aaaaaa", "bbbbbb", "cccccc", &"d".repeat(40)] {
            broker
                .publish(&room, m.as_bytes().to_vec(), true)
                .wait()
                .unwrap();
        }
        // The 40-byte message is over the 16-byte bound on its own.
        assert!(broker.history(&room).unwrap().is_empty());
        for m in ["aaaaaa", "bbbbbb", "cccccc"] {
            broker
                .publish(&room, m.as_bytes().to_vec(), true)
                .wait()
                .unwrap();
        }
        assert_eq!(
            broker.history(&room).unwrap(),
            vec![b"bbbbbb".to_vec(), b"cccccc".to_vec()]
        );
        assert_eq!(broker.rooms.metrics.rooms_in_memory.get(), 1);
        std::thread::sleep(Duration::from_millis(600));
        assert!(broker.history(&room).unwrap().is_empty());
        assert_eq!(broker.rooms.metrics.rooms_in_memory.get(), 0);
    }

    #[test]
    fn delivers_to_subscribers_and_cancels() {
        let broker = Arc::new(broker(0));
        let room = Room::parse("room").unwrap();
        let sub = broker.subscribe(&room, &ConnId::new(1, 1)).unwrap();
        let canceller = sub.canceller();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (got_tx, got_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::spawn(move || {
            sub.run(|event| {
                match event {
                    Event::Subscribed => ready_tx.send(()).unwrap(),
                    Event::Message(m) => got_tx.send(m.message().unwrap().message.clone()).unwrap(),
                    Event::Lost(e) => panic!("the in-process broker never loses: {e}"),
                    Event::Idle => {}
                }
                ControlFlow::Continue(())
            })
        });
        ready_rx.recv().unwrap();
        let payload = |text: &str| format!(r#"{{"nickname":"n","message":"{text}"}}"#).into_bytes();
        broker
            .publish(&room, payload("hello"), false)
            .wait()
            .unwrap();
        broker
            .publish(&Room::parse("other").unwrap(), payload("nope"), false)
            .wait()
            .unwrap();
        assert_eq!(got_rx.recv().unwrap(), "hello");
        canceller.cancel();
        assert_eq!(thread.join().unwrap(), Ok(()));
        assert_eq!(broker.fanout.channel_count(), 0);
    }

    #[test]
    fn a_full_queue_drops_the_subscriber() {
        let broker = broker(0);
        let room = Room::global();
        let sub = broker.subscribe(&room, &ConnId::new(1, 2)).unwrap();
        let mut published = false;
        let result = sub.run(|event| {
            if let Event::Subscribed = event {
                for _ in 0..=super::super::fanout::QUEUE_LIMIT {
                    broker.publish(&room, b"x".to_vec(), false).wait().unwrap();
                }
                published = true;
            }
            ControlFlow::Continue(())
        });
        assert!(published);
        assert_eq!(result, Err(BrokerError::Lagged));
    }

    #[test]
    fn history_is_capped_and_members_listed() {
        let broker = broker(2);
        let room = Room::global();
        for m in ["a", "b", "c"] {
            broker
                .publish(&room, m.as_bytes().to_vec(), true)
                .wait()
                .unwrap();
        }
        broker
            .publish(&room, b"event".to_vec(), false)
            .wait()
            .unwrap();
        assert_eq!(
            broker.history(&room).unwrap(),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        let (c1, c2) = (ConnId::new(1, 1), ConnId::new(1, 2));
        broker
            .join(&room, &c1, &Nickname::parse("zed").unwrap())
            .unwrap();
        broker
            .join(&room, &c2, &Nickname::parse("amy").unwrap())
            .unwrap();
        assert_eq!(broker.members(&room).unwrap(), vec!["amy", "zed"]);
        broker.leave(&room, &c1).unwrap();
        assert_eq!(broker.members(&room).unwrap(), vec!["amy"]);
    }
}
