//! The fan-out's order and sharding, with sinks that answer as told.

use super::*;
use crate::broker::subscription::{Canceller, DirectSink, Subscription};
use std::sync::Mutex;

/// A direct sink whose answer the test sets, and which records what it
/// was offered.
struct Sink {
    answer: Mutex<Direct>,
    offered: Mutex<Vec<String>>,
}

impl DirectSink for Sink {
    fn try_deliver(&self, messages: &[Arc<Incoming>]) -> Direct {
        let mut offered = self.offered.lock().unwrap();
        offered.extend(
            messages
                .iter()
                .map(|m| m.message().unwrap().message.clone()),
        );
        *self.answer.lock().unwrap()
    }
}

/// The dispatcher writes directly only while the client has nothing
/// queued, so nothing can overtake what is queued; what a sink declines
/// is queued, and what it leaves unfinished wakes the subscriber thread
/// to flush.
#[test]
fn direct_delivery_never_overtakes_the_queue() {
    let fanout = Fanout::new(true, 1);
    let registered = fanout.register("room", &ConnId::new(1, 1));
    let listener = FanoutListener {
        inbox: registered.inbox,
        guard: (),
    };
    let sub =
        Subscription::new(Box::new(listener), Canceller::new(|| {})).with_direct(registered.direct);
    let sink = Arc::new(Sink {
        answer: Mutex::new(Direct::Written),
        offered: Mutex::default(),
    });
    assert!(sub.deliver_directly(Arc::clone(&sink) as Arc<dyn DirectSink>));
    let publish = |text: &str| {
        let payload = format!(r#"{{"nickname":"n","message":"{text}"}}"#);
        let message = Arc::new(Incoming::parse(
            payload.as_bytes(),
            std::time::Instant::now(),
        ));
        fanout.dispatch("room", None, Event::Message(message));
    };
    // Declined (as a client not yet welcomed declines): queued.
    *sink.answer.lock().unwrap() = Direct::Declined;
    publish("first");
    // Now something is queued: the sink is not even asked, and this one
    // queues behind it.
    *sink.answer.lock().unwrap() = Direct::Written;
    publish("second");
    assert_eq!(*sink.offered.lock().unwrap(), ["first"]);

    let canceller = sub.canceller();
    let (got_tx, got_rx) = crossbeam_channel::unbounded();
    let thread = std::thread::spawn(move || {
        sub.run(|event| {
            let seen = match event {
                Event::Subscribed => "subscribed".to_owned(),
                Event::Message(m) => m.message().unwrap().message.clone(),
                Event::Idle => "idle".to_owned(),
                Event::Lost(e) => panic!("nothing is lost here: {e}"),
                Event::Restored(_) => panic!("nothing is lost here, so nothing restored"),
            };
            got_tx.send(seen).unwrap();
            Flow::Continue(())
        })
    });
    let next = || got_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        [next(), next(), next(), next()],
        ["subscribed", "first", "second", "idle"]
    );

    // Nothing queued now: the sink writes it, the subscriber never sees it.
    publish("direct");
    // The sink takes this one but cannot finish: the subscriber is told
    // to flush (an `Idle`), and nothing else reaches it.
    *sink.answer.lock().unwrap() = Direct::Unfinished;
    publish("unfinished");
    assert_eq!(next(), "idle");
    // Declined: queued as usual.
    *sink.answer.lock().unwrap() = Direct::Declined;
    publish("declined");
    assert_eq!([next(), next()], ["declined", "idle"]);
    assert_eq!(
        *sink.offered.lock().unwrap(),
        ["first", "direct", "unfinished", "declined"]
    );
    canceller.cancel();
    assert_eq!(thread.join().unwrap(), Ok(()));
}

/// Each of a channel's dispatchers serves its own shard of the
/// clients, and says for its shard alone whether the source is live.
#[test]
fn each_dispatcher_serves_its_shard() {
    let fanout = Fanout::new(false, 2);
    let register = |seq| fanout.register("room", &ConnId::new(1, seq));
    let (first, second) = (register(1), register(2));
    let generation = first.new_channel.expect("a new channel");
    let from = |shard| {
        Some(Source {
            generation,
            shard: Some(shard),
        })
    };
    fanout.dispatch("room", from(0), Event::Subscribed);
    assert_eq!(first.inbox.rx.len(), 1);
    assert_eq!(second.inbox.rx.len(), 0);
    // Dealt in turn: the third joins shard 0, which is live, the fourth
    // shard 1, which is not yet.
    let (third, fourth) = (register(3), register(4));
    assert!(third.inbox.live);
    assert!(!fourth.inbox.live);
    let message = Arc::new(Incoming::parse(
        br#"{"nickname":"n","message":"m"}"#,
        std::time::Instant::now(),
    ));
    fanout.dispatch("room", from(1), Event::Message(message));
    let lengths = [&first, &second, &third, &fourth].map(|r| r.inbox.rx.len());
    assert_eq!(lengths, [1, 1, 0, 1]);
}

/// A source restored after a loss says so with `Restored`: the channel is
/// live again; a client told of the loss hears it; one that registered
/// meanwhile, waiting for its first subscription, is simply subscribed.
#[test]
fn a_restored_source_is_live_again() {
    use crate::broker::subscription::Gap;
    let fanout = Arc::new(Fanout::new(false, 1));
    let first = fanout.register("room", &ConnId::new(1, 1));
    let generation = first.new_channel.expect("a new channel");
    let source = Some(Source {
        generation,
        shard: None,
    });
    fanout.dispatch("room", source, Event::Subscribed);
    let lost = Arc::new(BrokerError::Redis("gone".into()));
    fanout.dispatch("room", source, Event::Lost(lost));
    let waiting = fanout.register("room", &ConnId::new(1, 2));
    assert!(!waiting.inbox.live);
    let gap = Arc::new(Gap {
        recovered: 0,
        missing: None,
    });
    fanout.dispatch("room", source, Event::Restored(gap));
    assert!(fanout.register("room", &ConnId::new(1, 3)).inbox.live);
    let seen = |registered: Registered| {
        let listener = FanoutListener {
            inbox: registered.inbox,
            guard: (),
        };
        let sub = Subscription::new(Box::new(listener), Canceller::new(|| {}));
        let canceller = sub.canceller();
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let thread = std::thread::spawn(move || {
            sub.run(|event| {
                let name = match event {
                    Event::Subscribed => "subscribed",
                    Event::Lost(_) => "lost",
                    Event::Restored(_) => "restored",
                    Event::Message(_) => "message",
                    Event::Idle => return Flow::Continue(()),
                };
                seen_tx.send(name).unwrap();
                Flow::Continue(())
            })
        });
        let mut names = Vec::new();
        while let Ok(name) = seen.recv_timeout(std::time::Duration::from_millis(200)) {
            names.push(name);
        }
        canceller.cancel();
        assert_eq!(thread.join().unwrap(), Ok(()));
        names
    };
    assert_eq!(seen(first), ["subscribed", "lost", "restored"]);
    assert_eq!(seen(waiting), ["subscribed"]);
}
