//! Join and leave announcements, coalesced per room.
//!
//! Telling a room "carol joined" costs one delivery per member, so a room
//! that 5,000 people join costs 12.5 million deliveries if every join is
//! announced on its own — joining becomes O(n) per client and O(n²) per room.
//! Real chat servers do not do that, and neither does threadchat: all the
//! connections of this process hand their joins and leaves to one
//! *announcer thread* (`tc-announce`), which publishes at most one
//! announcement per room per [`WINDOW`]:
//!
//! * A join or leave in a quiet room is published at once, exactly as a
//!   single event (so the original app's clients see `carol: joined`).
//! * Those arriving within a window of the room's last announcement wait for
//!   the window to end and go out together: one `join` event that lists
//!   every nickname (`"alice, bob and 48 others"`, with a `nicknames` list).
//!   Joins and leaves keep their order: a run of joins, then a run of leaves,
//!   and so on.
//! * The window is [`WINDOW`] (50 ms) and grows with the room: 50 µs per
//!   member on this instance, up to [`MAX_WINDOW`] (see [`window`]). Every
//!   announcement costs one delivery per member, so the window keeps what a
//!   join storm costs a room bounded by a rate, instead of growing with the
//!   square of the room.
//!
//! A joining client's `101` waits until its join is published (see
//! `session::start`), so "connected" still means "the room has been told" —
//! at most one window later during a join storm, at once otherwise.
//!
//! Shutdown: dropping the [`Announcer`] drops the request sender; the thread
//! publishes whatever is still waiting, without waiting for windows, and
//! ends; the drop joins it.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::broker::{Broker, BrokerError, MemberChange};
use crate::protocol::{ChatMessage, ConnId, Kind, Nickname, Room};

/// The shortest window: at most one announcement per room per window.
pub const WINDOW: Duration = Duration::from_millis(50);
/// The longest window, for the biggest rooms.
pub const MAX_WINDOW: Duration = Duration::from_millis(500);
/// How much a room's window grows per member here: an announcement costs
/// one delivery per member, so this caps what announcements cost a room at
/// 20,000 deliveries per second on this instance, whatever its size.
const WINDOW_PER_MEMBER: Duration = Duration::from_micros(50);

/// A room's window, given how many of its members are on this instance.
pub fn window(members: usize) -> Duration {
    WINDOW_PER_MEMBER
        .saturating_mul(members.try_into().unwrap_or(u32::MAX))
        .clamp(WINDOW, MAX_WINDOW)
}

/// One join or leave, as handed to the announcer.
pub struct Announcement {
    /// Where.
    pub room: Room,
    /// [`Kind::Join`] or [`Kind::Leave`].
    pub kind: Kind,
    /// Who.
    pub nickname: Nickname,
    /// Their connection (so they can skip their own event).
    pub conn: ConnId,
    /// What a single announcement says: "joined", "left (timed out)".
    pub text: String,
}

/// What a waiting joiner is told: the id of the event that carried its
/// join (a coalesced one has one), or why it could not be published.
type Published = Result<Option<String>, BrokerError>;

/// A request: the announcement, and whom to tell once it is published.
struct Request {
    announcement: Announcement,
    published: Option<Sender<Published>>,
}

/// The handle to the announcer thread.
pub struct Announcer {
    requests: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Starts the announcer thread.
    pub fn start(broker: Arc<dyn Broker>) -> io::Result<Announcer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = thread::Builder::new()
            .name("tc-announce".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || run(&*broker, &rx))?;
        Ok(Announcer {
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// Announces, and returns once the announcement is published (with
    /// its member-list change), or could not be. Returns the id of the event
    /// that carried it, if it has one (a coalesced one): the joiner skips
    /// that event when it arrives.
    pub fn announce_and_wait(&self, announcement: Announcement) -> Published {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.send(announcement, Some(tx)) {
            return Err(BrokerError::Closed);
        }
        rx.recv().unwrap_or(Err(BrokerError::Closed))
    }

    /// Announces without waiting.
    pub fn announce(&self, announcement: Announcement) {
        self.send(announcement, None);
    }

    fn send(&self, announcement: Announcement, published: Option<Sender<Published>>) -> bool {
        let request = Request {
            announcement,
            published,
        };
        self.requests
            .as_ref()
            .is_some_and(|tx| tx.send(request).is_ok())
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the announcer thread panicked");
        }
    }
}

/// The thread's loop.
fn run(broker: &dyn Broker, requests: &Receiver<Request>) {
    let mut waiting: Vec<Request> = Vec::new();
    // Room → when it may be announced to next.
    let mut next_allowed: HashMap<String, Instant> = HashMap::new();
    // Room → its members on this instance (joins minus leaves seen here).
    let mut members: HashMap<String, usize> = HashMap::new();
    loop {
        let received = match earliest(&waiting, &next_allowed) {
            None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => requests.recv_deadline(deadline),
        };
        match received {
            Ok(request) => {
                waiting.push(request);
                waiting.extend(requests.try_iter());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // Shutting down: everything goes out now.
                publish_rooms(broker, &mut waiting, |_| true);
                return;
            }
        }
        let now = Instant::now();
        let due = |room: &str| next_allowed.get(room).is_none_or(|t| *t <= now);
        let published = publish_rooms(broker, &mut waiting, due);
        next_allowed.retain(|_, t| *t > now);
        for (room, joined, left) in published {
            let count = members.entry(room.clone()).or_default();
            *count = (*count + joined).saturating_sub(left);
            let count = *count;
            if count == 0 {
                members.remove(&room);
            }
            next_allowed.insert(room, now + window(count));
        }
    }
}

/// When the next waiting announcement is due.
fn earliest(waiting: &[Request], next_allowed: &HashMap<String, Instant>) -> Option<Instant> {
    waiting
        .iter()
        .filter_map(|r| next_allowed.get(r.announcement.room.name()).copied())
        .min()
}

/// Publishes the waiting announcements of every room that `due` allows,
/// and returns those rooms, each with how many joined and left.
fn publish_rooms(
    broker: &dyn Broker,
    waiting: &mut Vec<Request>,
    due: impl Fn(&str) -> bool,
) -> Vec<(String, usize, usize)> {
    let mut rooms: Vec<String> = Vec::new();
    for request in waiting.iter() {
        let room = request.announcement.room.name();
        if !rooms.iter().any(|r| r == room) && due(room) {
            rooms.push(room.to_owned());
        }
    }
    rooms
        .into_iter()
        .map(|room| {
            let (mine, rest): (Vec<Request>, Vec<Request>) = std::mem::take(waiting)
                .into_iter()
                .partition(|r| r.announcement.room.name() == room);
            *waiting = rest;
            let joined = mine
                .iter()
                .filter(|r| r.announcement.kind == Kind::Join)
                .count();
            let left = mine.len() - joined;
            publish_room(broker, mine);
            (room, joined, left)
        })
        .collect()
}

/// Publishes one room's announcements: each run of the same kind as one
/// event. Then tells whoever waits.
fn publish_room(broker: &dyn Broker, requests: Vec<Request>) {
    let mut start = 0;
    let mut carried_by: Vec<Published> = Vec::with_capacity(requests.len());
    while start < requests.len() {
        let kind = requests[start].announcement.kind;
        let end = requests[start..]
            .iter()
            .position(|r| r.announcement.kind != kind)
            .map_or(requests.len(), |n| start + n);
        let run: Vec<&Announcement> = requests[start..end]
            .iter()
            .map(|r| &r.announcement)
            .collect();
        let event = match run.as_slice() {
            [one] => ChatMessage::event(one.kind, &one.nickname, &one.conn, &one.text),
            many => ChatMessage::group_event(
                kind,
                many.iter()
                    .map(|a| a.nickname.as_str().to_owned())
                    .collect(),
                &many[0].conn,
            ),
        };
        // The member list changes in the same step as the event is logged.
        let change = match kind {
            Kind::Join => MemberChange::Join(
                run.iter()
                    .map(|a| (a.conn.clone(), a.nickname.clone()))
                    .collect(),
            ),
            _ => MemberChange::Leave(run.iter().map(|a| a.conn.clone()).collect()),
        };
        let room = &run[0].room;
        let outcome = broker.publish(room, event.to_payload(), change).wait();
        if let Err(e) = &outcome {
            log::debug!("could not announce {} {kind:?} in {room}: {e}", run.len());
        }
        carried_by.extend(
            run.iter()
                .map(|_| outcome.clone().map(|()| event.id.clone())),
        );
        start = end;
    }
    for (request, outcome) in requests.into_iter().zip(carried_by) {
        if let Some(published) = request.published {
            let _ = published.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::broker::memory::MemoryBroker;
    use crate::broker::{Event, Settings};
    use std::ops::ControlFlow;

    #[test]
    fn a_burst_of_joins_goes_out_in_few_announcements_in_order() {
        let settings = Settings {
            instance: 1,
            history: 0,
            history_bytes: 1024,
            room_ttl: std::time::Duration::from_secs(60),
            max_payload: 4096,
            subscriptions: Default::default(),
            capacity: crate::capacity::Capacity::unlimited(),
            idle_rooms_bytes: 64 * 1024 * 1024,
            wait_replicas: 0,
        };
        let broker: Arc<dyn Broker> =
            Arc::new(MemoryBroker::new(&settings, &Arc::default()).unwrap());
        let room = Room::parse("burst").unwrap();
        let subscription = broker.subscribe(&room, &ConnId::new(1, 0)).unwrap();
        let canceller = subscription.canceller();
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let listener = thread::spawn(move || {
            subscription.run(|event| {
                if let Event::Message(m) = event {
                    events_tx.send(m.message().unwrap().clone()).unwrap();
                }
                ControlFlow::Continue(())
            })
        });
        let announcer = Announcer::start(Arc::clone(&broker)).unwrap();
        for i in 1..=10 {
            announcer.announce(Announcement {
                room: room.clone(),
                kind: Kind::Join,
                nickname: Nickname::parse(&format!("n{i}")).unwrap(),
                conn: ConnId::new(1, i),
                text: "joined".into(),
            });
        }
        // Dropping the announcer publishes whatever still waits.
        drop(announcer);
        let (mut events, mut heard) = (Vec::new(), Vec::new());
        while heard.len() < 10 {
            let event: ChatMessage = events_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            if event.nicknames.is_empty() {
                heard.push(event.nickname.clone());
            } else {
                heard.extend(event.nicknames.iter().cloned());
            }
            events.push(event);
        }
        canceller.cancel();
        listener.join().unwrap().unwrap();
        assert!(events.len() <= 3, "{events:?}");
        let expected: Vec<String> = (1..=10).map(|i| format!("n{i}")).collect();
        assert_eq!(heard, expected);
    }

    #[test]
    fn the_window_grows_with_the_room_within_bounds() {
        assert_eq!(window(0), WINDOW);
        assert_eq!(window(100), WINDOW);
        assert_eq!(window(5000), Duration::from_millis(250));
        assert_eq!(window(1_000_000), MAX_WINDOW);
    }
}
