//! The in-process broker: channels are lists of crossbeam senders.
//!
//! It exists so that `make run` works on a machine with no Redis, and so the
//! chat tests can run against both brokers. It keeps the same thread shape as
//! Redis: each subscriber thread blocks on its own bounded receiver. History
//! and member lists live in memory, like the channels.
//!
//! Bound and policy: each subscriber's queue holds [`QUEUE_CAPACITY`]
//! messages. A subscriber whose queue is full when a message arrives is
//! removed from the channel (it cannot be allowed to slow the publisher or grow
//! without bound), and its [`Subscription::run`] ends with
//! [`BrokerError::Lagged`] — the same fate Redis deals to a subscriber past its
//! output-buffer limit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::{Broker, BrokerError, Canceller, Event, Listen, Settings, StopSignal, Subscription};
use crate::protocol::{ConnId, Nickname, Room};

/// Messages a subscriber may have waiting before it is dropped as too slow.
pub const QUEUE_CAPACITY: usize = 1024;

/// A payload shared by every subscriber it is delivered to (one allocation per
/// message, not per recipient).
type Payload = Arc<[u8]>;

/// Relays messages between the connections of this process.
pub struct MemoryBroker {
    settings: Settings,
    /// Channel name → its subscribers. Shared with every subscription, which
    /// removes itself when it ends.
    channels: Arc<RwLock<Channels>>,
    /// Room name → its recent chat messages and its members.
    rooms: Mutex<HashMap<String, RoomState>>,
}

type Channels = HashMap<String, Vec<Member>>;

/// One subscriber of a channel.
struct Member {
    conn: ConnId,
    tx: Sender<Payload>,
}

#[derive(Default)]
struct RoomState {
    history: VecDeque<Payload>,
    /// (connection, nickname) of everyone in the room.
    members: Vec<(ConnId, String)>,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new(settings: &Settings) -> MemoryBroker {
        MemoryBroker {
            settings: settings.clone(),
            channels: Arc::default(),
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

    fn publish(&self, room: &Room, payload: Vec<u8>, record: bool) -> Result<(), BrokerError> {
        let payload: Payload = payload.into();
        if record && self.settings.history > 0 {
            let mut rooms = self.rooms();
            let history = &mut rooms.entry(room.name().to_owned()).or_default().history;
            history.push_back(Arc::clone(&payload));
            while history.len() > self.settings.history {
                history.pop_front();
            }
        }
        let channel = room.channel();
        let mut lagging = Vec::new();
        {
            let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
            for member in channels.get(&channel).into_iter().flatten() {
                match member.tx.try_send(Arc::clone(&payload)) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                    Err(TrySendError::Full(_)) => lagging.push(member.conn.clone()),
                }
            }
        }
        for conn in lagging {
            remove(&self.channels, &channel, &conn);
        }
        Ok(())
    }

    fn subscribe(&self, room: &Room, conn: &ConnId) -> Result<Subscription, BrokerError> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let listener = MemoryListener {
            rx,
            // Registered only when the listener starts (see `listen`).
            registration: Some((
                tx,
                Registration {
                    channels: Arc::clone(&self.channels),
                    channel: room.channel(),
                    conn: conn.clone(),
                },
            )),
        };
        // Cancelling drops the stop sender; the listener `select!`s on it.
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

    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-process relay (single instance)".to_owned()
    }
}

/// Removes `conn` from `channel`, dropping its sender.
fn remove(channels: &RwLock<Channels>, channel: &str, conn: &ConnId) {
    let mut channels = channels.write().unwrap_or_else(|p| p.into_inner());
    if let Some(members) = channels.get_mut(channel) {
        members.retain(|m| &m.conn != conn);
        if members.is_empty() {
            channels.remove(channel);
        }
    }
}

/// Takes a subscriber out of its channel when dropped, however the
/// subscriber thread ends.
struct Registration {
    channels: Arc<RwLock<Channels>>,
    channel: String,
    conn: ConnId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        remove(&self.channels, &self.channel, &self.conn);
    }
}

struct MemoryListener {
    rx: Receiver<Payload>,
    registration: Option<(Sender<Payload>, Registration)>,
}

impl Listen for MemoryListener {
    fn listen(
        mut self: Box<Self>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event<'_>) -> super::Flow,
    ) -> Result<(), BrokerError> {
        let (tx, registration) = self.registration.take().expect("listen runs once");
        registration
            .channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(registration.channel.clone())
            .or_default()
            .push(Member {
                conn: registration.conn.clone(),
                tx,
            });
        // Held until this function returns, however it returns.
        let _registration = registration;

        if stop.is_stopped() || on_event(Event::Subscribed).is_break() {
            return Ok(());
        }
        loop {
            crossbeam_channel::select! {
                recv(self.rx) -> payload => match payload {
                    Ok(payload) => {
                        if on_event(Event::Message(&payload)).is_break() {
                            return Ok(());
                        }
                    }
                    // Our sender was removed by a publisher: we fell behind.
                    Err(_) => return Err(BrokerError::Lagged),
                },
                recv(stop.receiver()) -> _ => return Ok(()),
            }
        }
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
                    Event::Message(p) => got_tx.send(p.to_vec()).unwrap(),
                    Event::Lost(e) => panic!("the in-process broker never loses: {e}"),
                }
                ControlFlow::Continue(())
            })
        });
        ready_rx.recv().unwrap();
        broker.publish(&room, b"hello".to_vec(), false).unwrap();
        broker
            .publish(&Room::parse("other").unwrap(), b"nope".to_vec(), false)
            .unwrap();
        assert_eq!(got_rx.recv().unwrap(), b"hello");
        canceller.cancel();
        assert_eq!(thread.join().unwrap(), Ok(()));
        assert!(broker.channels.read().unwrap().is_empty());
    }

    #[test]
    fn a_full_queue_drops_the_subscriber() {
        let broker = broker(0);
        let room = Room::global();
        let sub = broker.subscribe(&room, &ConnId::new(1, 2)).unwrap();
        let mut published = false;
        let result = sub.run(|event| {
            if let Event::Subscribed = event {
                for _ in 0..=QUEUE_CAPACITY {
                    broker.publish(&room, b"x".to_vec(), false).unwrap();
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
            broker.publish(&room, m.as_bytes().to_vec(), true).unwrap();
        }
        broker.publish(&room, b"event".to_vec(), false).unwrap();
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
