//! The server fills its own gaps: a client that stays connected while its
//! instance's subscription is lost and restored gets what was published
//! meanwhile from the room's log, exactly once and in order, and is told
//! only what could not be recovered.
//!
//! The gap is made deterministic: Redis is told to take no new connection
//! (`maxclients` at the count it has), then subscribers are cut (`CLIENT
//! KILL TYPE pubsub`). Subscriptions cannot come back, while a client of a
//! second instance goes on sending through that instance's publishing
//! connections, until the test lets Redis take connections again.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Client, PATIENCE, Redis, Server, eventually, in_both_subscription_modes};

in_both_subscription_modes!(
    a_cut_subscription_loses_nothing,
    forged_places_before_a_cut_move_nothing,
    a_stalled_redis_loses_nothing,
    a_log_that_no_longer_reaches_back_says_how_much_is_gone,
);

/// Holds subscriptions down: Redis takes no new connection until
/// [`Outage::end`].
struct Outage {
    con: redis::Connection,
    /// The room's position hash.
    meta: String,
}

/// Sends `m{i}` for each `i` of `numbers` while every subscription is cut,
/// and ends the outage once all of them are in the room's log.
fn send_during_outage(
    redis: &Redis,
    sender: &mut crate::support::Client,
    numbers: std::ops::RangeInclusive<u64>,
) {
    let mut outage = Outage::begin(redis);
    let before = outage.last_offset();
    let count = numbers.end() - numbers.start() + 1;
    for i in numbers {
        sender.send(&format!("m{i}"));
    }
    outage.wait_for_offset(before + count);
    outage.end();
}

impl Outage {
    /// Cuts every subscriber, and keeps them from coming back.
    fn begin(redis: &Redis) -> Outage {
        let meta = redis.keys("threadchat:*:meta").pop().expect("a room's log");
        let mut con = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let all: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        let subscribers: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut con)
            .unwrap();
        let staying = all.lines().count() - subscribers.lines().count();
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(staying)
            .query::<()>(&mut con)
            .unwrap();
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query::<u64>(&mut con)
            .unwrap();
        Outage { con, meta }
    }

    /// Waits until the room's log has given `offset`.
    fn wait_for_offset(&mut self, offset: u64) {
        let (con, meta) = (&mut self.con, &self.meta);
        eventually("the messages sent meanwhile are in the log", || {
            let last: Option<u64> = redis::cmd("HGET").arg(meta).arg("last").query(con).unwrap();
            last >= Some(offset)
        });
    }

    /// The room log's newest offset.
    fn last_offset(&mut self) -> u64 {
        redis::cmd("HGET")
            .arg(&self.meta)
            .arg("last")
            .query(&mut self.con)
            .unwrap()
    }

    /// Lets subscriptions come back.
    fn end(mut self) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(10_000)
            .query::<()>(&mut self.con)
            .unwrap();
    }
}

/// What a watcher got: the sender's chat frames (as they came), and the
/// notices.
#[derive(Default)]
struct Seen {
    chats: Vec<Value>,
    notices: Vec<String>,
}

/// Reads until `last` from `sender` arrives, then a little longer (a
/// duplicate would come right after).
fn watch(client: &mut Client, sender: &str, last: &str) -> Seen {
    let mut seen = Seen::default();
    loop {
        let frame = client.recv_live();
        match frame["type"].as_str() {
            Some("notice") => seen
                .notices
                .push(frame["message"].as_str().unwrap().to_owned()),
            Some("chat") if frame["nickname"] == sender => {
                let done = frame["message"] == last;
                seen.chats.push(frame);
                if done {
                    break;
                }
            }
            _ => {}
        }
    }
    while let Some(frame) = client.recv_live_within(Duration::from_millis(300)) {
        if frame["type"] == "chat" {
            seen.chats.push(frame);
        }
    }
    client
        .ws
        .get_ref()
        .set_read_timeout(Some(PATIENCE))
        .unwrap();
    seen
}

/// The messages of `seen`, in the order they came.
fn texts(seen: &Seen) -> Vec<String> {
    seen.chats
        .iter()
        .map(|frame| frame["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Every chat frame carries its place, and places only go forward: a
/// client that reconnects later with `?since=` from the last one is exact.
fn places_go_forward(seen: &Seen) {
    let offsets: Vec<u64> = seen
        .chats
        .iter()
        .map(|frame| {
            frame["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("a place: {frame}"))
        })
        .collect();
    assert!(
        offsets.windows(2).all(|pair| pair[0] < pair[1]),
        "places in order: {offsets:?}"
    );
}

/// Two clients (of the instance under test) stay connected while its
/// subscriptions are cut and held down; a sender on a second instance
/// sends 20 numbered messages meanwhile and 5 after. Each client gets all
/// 25, once each, in order, with their places; it is told the relay was
/// lost, then that it is back with nothing lost — never that messages
/// "may be missing".
fn a_cut_subscription_loses_nothing(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, args);
    let other = Server::with_redis(&redis);
    let mut watchers = [server.client("ann"), server.client("bob")];
    for watcher in &mut watchers {
        watcher.settle();
    }
    let mut sender = other.client("sam");
    sender.settle();
    sender.send("m0");
    for watcher in &mut watchers {
        assert_eq!(watcher.recv_chat().1, "m0");
    }

    send_during_outage(&redis, &mut sender, 1..=20);
    for i in 21..=25 {
        sender.send(&format!("m{i}"));
    }

    let expected: Vec<String> = (1..=25).map(|i| format!("m{i}")).collect();
    for watcher in &mut watchers {
        let seen = watch(watcher, "sam", "m25");
        assert_eq!(texts(&seen), expected);
        places_go_forward(&seen);
        assert!(
            seen.notices[0].contains("lost the chat relay"),
            "{:?}",
            seen.notices
        );
        let back = &seen.notices[1];
        // The 20 sent while it was down, and maybe some sent after.
        let recovered: usize = back
            .strip_prefix("reconnected to the chat relay; nothing was lost: the ")
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("{back}"));
        assert!(recovered >= 20, "{back}");
        assert!(
            !seen.notices.iter().any(|n| n.contains("may be missing")),
            "{:?}",
            seen.notices
        );
    }
    assert!(server.metric("threadchat_gap_recovered_total") >= 20);
    assert_eq!(server.metric("threadchat_gaps_incomplete_total"), 0);
}

/// Two instances on `redis` (the first with `args`), `ann` on the first
/// and `sam` on the second, and the place of the last of three chat
/// messages sam sent and ann got live.
struct Placed {
    _instances: (Server, Server),
    ann: Client,
    sender: Client,
    epoch: String,
    offset: u64,
}

fn three_placed(redis: &Redis, args: &[&str]) -> Placed {
    let server = Server::with_redis_and(redis, args);
    let other = Server::with_redis(redis);
    let mut ann = server.client("ann");
    ann.settle();
    let mut sender = other.client("sam");
    sender.settle();
    for i in 0..3 {
        sender.send(&format!("m{i}"));
    }
    let mut last = Value::Null;
    for i in 0..3 {
        last = ann.recv_live();
        assert_eq!(last["message"], format!("m{i}"));
    }
    Placed {
        _instances: (server, other),
        ann,
        sender,
        epoch: last["epoch"].as_str().unwrap().to_owned(),
        offset: last["offset"].as_u64().unwrap(),
    }
}

/// Payloads published straight on the room's channel just before the
/// cut, with places of the log's epoch ahead of it and behind it but no
/// genuine tag, are delivered as messages without places, and move
/// nothing: the gap is filled from the last genuine place, each message
/// once, and nobody is told anything is missing.
fn forged_places_before_a_cut_move_nothing(args: &[&str]) {
    let redis = Redis::start();
    let Placed {
        _instances,
        mut ann,
        mut sender,
        epoch,
        offset,
    } = three_placed(&redis, args);
    for (text, forged) in [("ahead", offset + 50), ("behind", offset - 2)] {
        let payload = serde_json::json!({"nickname": "sam", "message": text,
            "offset": forged, "epoch": epoch, "tag": "0123456789abcdef"});
        redis.publish("global_room", &payload.to_string());
        let seen = ann.recv_live();
        assert_eq!(seen["message"], text);
        assert!(seen["offset"].is_null(), "{seen}");
    }

    send_during_outage(&redis, &mut sender, 3..=12);

    let seen = watch(&mut ann, "sam", "m12");
    let expected: Vec<String> = (3..=12).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&seen), expected);
    places_go_forward(&seen);
    assert_eq!(seen.chats[0]["offset"].as_u64(), Some(offset + 1));
    assert!(
        seen.notices[1].contains("nothing was lost"),
        "{:?}",
        seen.notices
    );
}

/// The same, with more forged places than a listener remembers (it keeps
/// the last 8 it delivered), published straight on the channel just before
/// a cut. They once pushed every genuine place out: the listener took the
/// log for one that was reset, gave its clients the whole log again and
/// told them so. A forged place in the log's own epoch, whose tag the
/// epoch's key does not give, is not noted at all: nothing is delivered
/// twice, and nobody is told of a reset.
#[test]
fn a_flood_of_forged_places_before_a_cut_moves_nothing() {
    let redis = Redis::start();
    let Placed {
        _instances,
        mut ann,
        mut sender,
        epoch,
        offset,
    } = three_placed(&redis, &[]);
    for i in 0..12 {
        let text = format!("forged {i}");
        let payload = serde_json::json!({"nickname": "sam", "message": text,
            "offset": offset + 1 + i, "epoch": epoch, "tag": "0123456789abcdef"});
        redis.publish("global_room", &payload.to_string());
        assert_eq!(ann.recv_live()["message"], text);
    }

    send_during_outage(&redis, &mut sender, 3..=12);

    let seen = watch(&mut ann, "sam", "m12");
    let expected: Vec<String> = (3..=12).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&seen), expected, "{:?}", seen.notices);
    places_go_forward(&seen);
    assert!(
        seen.notices.iter().all(|notice| !notice.contains("reset")),
        "{:?}",
        seen.notices
    );
}

/// Redis stops answering for a few seconds (SIGSTOP) while a sender on a
/// second instance goes on: what it sends waits, and the clients get all
/// of it once, in order, with no "may be missing" — whether the stall was
/// short enough for the subscriptions to ride it out, or the heartbeat
/// took it for a loss and they were restored and filled from the log.
fn a_stalled_redis_loses_nothing(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, args);
    let other = Server::with_redis(&redis);
    let mut ann = server.client("ann");
    ann.settle();
    let mut sender = other.client("sam");
    sender.settle();
    sender.send("m0");
    assert_eq!(ann.recv_chat().1, "m0");

    redis.pause();
    for i in 1..=10 {
        sender.send(&format!("m{i}"));
        std::thread::sleep(Duration::from_millis(250));
    }
    redis.resume();
    for i in 11..=15 {
        sender.send(&format!("m{i}"));
    }

    let seen = watch(&mut ann, "sam", "m15");
    let expected: Vec<String> = (1..=15).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&seen), expected);
    places_go_forward(&seen);
    assert!(
        !seen.notices.iter().any(|n| n.contains("missing")),
        "{:?}",
        seen.notices
    );
}

/// With `--history 3`, ten messages sent while the subscription is down
/// are more than the log keeps: the client gets the three it still holds,
/// after a notice that says seven could not be recovered and since when.
fn a_log_that_no_longer_reaches_back_says_how_much_is_gone(args: &[&str]) {
    let redis = Redis::start();
    let history = ["--history", "3"];
    let server = Server::with_redis_and(&redis, &[args, &history].concat());
    let other = Server::with_redis_and(&redis, &history);
    let mut ann = server.client("ann");
    ann.settle();
    let mut sender = other.client("sam");
    sender.settle();
    sender.send("m0");
    assert_eq!(ann.recv_chat().1, "m0");

    send_during_outage(&redis, &mut sender, 1..=10);

    let seen = watch(&mut ann, "sam", "m10");
    assert_eq!(texts(&seen), ["m8", "m9", "m10"]);
    places_go_forward(&seen);
    let back = &seen.notices[1];
    assert!(
        back.contains("7 messages and events sent since")
            && back.contains("could not be recovered")
            && back.contains("the 3 messages and events sent meanwhile follow"),
        "{back}"
    );
    assert_eq!(server.metric("threadchat_gaps_incomplete_total"), 1);
}
