//! The in-process relay's own tests: its log's bounds, delivery, idle rooms.

use super::*;
use std::ops::ControlFlow;
use std::time::Duration;

use crate::protocol::Nickname;

fn broker(history: usize) -> MemoryBroker {
    MemoryBroker::new(
        &Settings {
            instance: 1,
            history,
            history_bytes: 200,
            room_ttl: Duration::from_millis(200),
            max_payload: 1024,
            subscriptions: Default::default(),
            capacity: crate::capacity::Capacity::unlimited(),
            idle_rooms_bytes: 64 * 1024 * 1024,
            wait_replicas: 0,
        },
        &Arc::default(),
    )
    .unwrap()
}

/// A chat payload with this text.
fn chat(text: &str) -> Vec<u8> {
    format!(r#"{{"nickname":"n","message":"{text}"}}"#).into_bytes()
}

/// The messages of a log's entries.
fn texts(log: &Log) -> Vec<String> {
    let text = |p: &Vec<u8>| protocol::ChatMessage::from_payload(p).unwrap().message;
    log.entries.iter().map(text).collect()
}

#[test]
fn the_log_is_bounded_in_bytes_and_empty_rooms_expire() {
    let broker = broker(100);
    let room = Room::parse("r").unwrap();
    let publish = |m: &str| {
        broker
            .publish(&room, chat(m), MemberChange::None)
            .wait()
            .unwrap();
    };
    publish(&"d".repeat(300));
    // Over the byte bound on its own: published, not kept.
    let log = broker.log(&room).unwrap();
    assert!(log.entries.is_empty());
    assert_eq!(log.first, 2);
    // About 70 bytes each with their places: two fit in 200.
    for m in ["aaaaaa", "bbbbbb", "cccccc"] {
        publish(m);
    }
    let log = broker.log(&room).unwrap();
    assert_eq!(texts(&log), ["bbbbbb", "cccccc"]);
    assert_eq!(log.first, 3);
    assert_eq!(broker.rooms.metrics.rooms_in_memory.get(), 1);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(broker.log(&room).unwrap(), Log::default());
    assert_eq!(broker.rooms.metrics.rooms_in_memory.get(), 0);
}

/// Past `--idle-rooms-bytes`, the least recently used rooms nobody is
/// in are forgotten first; a room somebody is in never is.
#[test]
fn idle_rooms_past_the_budget_are_forgotten_oldest_first() {
    let broker = MemoryBroker::new(
        &Settings {
            idle_rooms_bytes: 2_000,
            ..broker(100).settings.clone()
        },
        &Arc::default(),
    )
    .unwrap();
    let occupied = Room::parse("occupied").unwrap();
    let (someone, nickname) = (ConnId::new(1, 9), Nickname::parse("someone").unwrap());
    broker.enter(&occupied, &someone, &nickname).unwrap();
    let rooms: Vec<Room> = (0..20)
        .map(|i| Room::parse(&format!("r{i}")).unwrap())
        .collect();
    for room in std::iter::once(&occupied).chain(&rooms) {
        broker
            .publish(room, chat(&"x".repeat(100)), MemberChange::None)
            .wait()
            .unwrap();
    }
    // About 160 + 258 bytes per room: four fit in 2,000.
    let kept: Vec<bool> = (rooms.iter())
        .map(|room| broker.log_end(room).unwrap().is_some())
        .collect();
    assert_eq!(kept.iter().filter(|k| **k).count(), 4, "{kept:?}");
    assert!(
        kept[16..].iter().all(|k| *k),
        "the newest are kept: {kept:?}"
    );
    assert_eq!(texts(&broker.log(&occupied).unwrap()).len(), 1);
    // Once nobody is in it, it is idle, last used when left: four
    // newer rooms push it out.
    broker.exit(&occupied, &someone);
    assert!(broker.log_end(&occupied).unwrap().is_some());
    for i in 0..4 {
        let newer = Room::parse(&format!("newer{i}")).unwrap();
        broker
            .publish(&newer, chat(&"x".repeat(100)), MemberChange::None)
            .wait()
            .unwrap();
    }
    assert!(broker.log_end(&occupied).unwrap().is_none());
}

#[test]
fn offsets_count_every_entry_and_the_log_keeps_the_newest() {
    let broker = broker(2);
    let room = Room::global();
    for m in ["a", "b", "c"] {
        broker
            .publish(&room, chat(m), MemberChange::None)
            .wait()
            .unwrap();
    }
    let log = broker.log(&room).unwrap();
    assert_eq!(texts(&log), ["b", "c"]);
    assert_eq!(log.first, 2);
    let mark = broker.log_end(&room).unwrap().unwrap();
    assert_eq!((mark.end.offset, mark.first), (3, 2));
    let end = mark.end;
    assert_eq!(Some(end.epoch.clone()), log.epoch);
    let last = protocol::ChatMessage::from_payload(&log.entries[1]).unwrap();
    assert_eq!(
        last.at().map(|at| (at.offset, at.epoch.to_owned())),
        Some((3, end.epoch))
    );
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
                Event::Restored(_) => panic!("the in-process broker never restores"),
                Event::Idle => {}
            }
            ControlFlow::Continue(())
        })
    });
    ready_rx.recv().unwrap();
    broker
        .publish(&room, chat("hello"), MemberChange::None)
        .wait()
        .unwrap();
    broker
        .publish(
            &Room::parse("other").unwrap(),
            chat("nope"),
            MemberChange::None,
        )
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
                let x = chat("x");
                broker.publish(&room, x, MemberChange::None).wait().unwrap();
            }
            published = true;
        }
        ControlFlow::Continue(())
    });
    assert!(published);
    assert_eq!(result, Err(BrokerError::Lagged));
}

#[test]
fn members_change_with_their_events_and_presence_says_where() {
    let broker = broker(2);
    let room = Room::global();
    let (c1, c2) = (ConnId::new(1, 1), ConnId::new(1, 2));
    let (zed, amy) = (
        Nickname::parse("zed").unwrap(),
        Nickname::parse("amy").unwrap(),
    );
    let join = MemberChange::Join(vec![(c1.clone(), zed), (c2, amy)]);
    broker.publish(&room, chat("joined"), join).wait().unwrap();
    assert_eq!(
        broker.presence(&room, 10).unwrap().nicknames,
        ["amy", "zed"]
    );
    let leave = MemberChange::Leave(vec![c1]);
    broker.publish(&room, chat("left"), leave).wait().unwrap();
    let presence = broker.presence(&room, 10).unwrap();
    assert_eq!(presence.nicknames, vec!["amy"]);
    assert_eq!(presence.at.map(|at| at.offset), Some(2));
}
