//! The in-process broker: channels are lists of crossbeam senders.
//!
//! It exists so that `make run` works on a machine with no Redis, and so the
//! chat tests can run against both brokers. It keeps the same thread shape as
//! Redis: each subscriber thread blocks on its own bounded queue
//! ([`fanout`](super::fanout), which also explains the bound and what happens
//! to a client that falls behind). History and member lists live in memory,
//! like the channels.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::fanout::{Fanout, FanoutListener};
use super::{Broker, BrokerError, Canceller, Event, Presence, Receipt, Settings, Subscription};
use crate::protocol::{ConnId, Incoming, Nickname, Room};

/// Relays messages between the connections of this process.
pub struct MemoryBroker {
    settings: Settings,
    /// Channel name → its subscribers' queues. Shared with every
    /// subscription, which removes itself when it ends.
    fanout: Arc<Fanout>,
    /// Room name → its recent chat messages and its members.
    rooms: Mutex<HashMap<String, RoomState>>,
}

#[derive(Default)]
struct RoomState {
    history: VecDeque<Arc<[u8]>>,
    /// (connection, nickname) of everyone in the room.
    members: Vec<(ConnId, String)>,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new(settings: &Settings) -> MemoryBroker {
        MemoryBroker {
            settings: settings.clone(),
            fanout: Arc::new(Fanout::new(true, 1)),
            rooms: Mutex::default(),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, RoomState>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Broker for MemoryBroker {
    fn instance(&self) -> u64 {
        self.settings.instance
    }

    fn publish(&self, room: &Room, payload: Vec<u8>, record: bool) -> Receipt {
        let incoming = Arc::new(Incoming::parse(&payload));
        if record && self.settings.history > 0 {
            let mut rooms = self.rooms();
            let history = &mut rooms.entry(room.name().to_owned()).or_default().history;
            history.push_back(payload.into());
            while history.len() > self.settings.history {
                history.pop_front();
            }
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
            .rooms()
            .get(room.name())
            .map(|r| r.history.iter().map(|p| p.to_vec()).collect())
            .unwrap_or_default())
    }

    fn join(&self, room: &Room, conn: &ConnId, nickname: &Nickname) -> Result<(), BrokerError> {
        self.rooms()
            .entry(room.name().to_owned())
            .or_default()
            .members
            .push((conn.clone(), nickname.as_str().to_owned()));
        Ok(())
    }

    fn leave(&self, room: &Room, conn: &ConnId) -> Result<(), BrokerError> {
        let mut rooms = self.rooms();
        if let Some(state) = rooms.get_mut(room.name()) {
            state.members.retain(|(c, _)| c != conn);
            if state.members.is_empty() && state.history.is_empty() {
                rooms.remove(room.name());
            }
        }
        Ok(())
    }

    fn members(&self, room: &Room) -> Result<Vec<String>, BrokerError> {
        let mut members: Vec<String> = self
            .rooms()
            .get(room.name())
            .map(|r| r.members.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default();
        members.sort();
        Ok(members)
    }

    fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError> {
        let rooms = self.rooms();
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

    fn broker(history: usize) -> MemoryBroker {
        MemoryBroker::new(&Settings {
            instance: 1,
            history,
            subscriptions: Default::default(),
        })
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
