//! Attacks on "nothing lost while Redis stumbles": a batch sent again
//! after its connection closed, under `--wait-replicas`, and forged places
//! on a room's channel. Each test is a finding of a review that attacked
//! what was built, kept so that it stays fixed.

use std::time::Duration;

use crate::support::{Redis, Server};

/// `--wait-replicas 1`, and the master's only replica frozen (SIGSTOP: its
/// link stays open, so the master still counts it as a replica). Redis
/// carries out a message, and its publisher's connection is killed while
/// `WAIT` waits for the replica. The publisher sends the batch again on a
/// fresh connection; the script finds the message done and skips it. The
/// `WAIT` after it then asks about that fresh connection's writes, of which
/// there are none: it would answer at once that the replica has them all.
/// The frozen replica does not have the message, so its sender must still
/// hear "may or may not have been delivered", as it would had the
/// connection not been killed.
#[test]
fn a_message_sent_again_while_its_replica_is_frozen_is_not_called_delivered() {
    let (master, replica) = Redis::with_replica();
    let server = Server::with_redis_and(&master, &["--wait-replicas", "1", "--rate-limit", "0"]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("replicated");
    assert_eq!(bob.recv_chat().1, "replicated");

    replica.pause();
    alice.send("frozen");
    // Carried out (the room has it); its WAIT waits up to a second for the
    // frozen replica: the connection is killed meanwhile.
    assert_eq!(bob.recv_chat().1, "frozen");
    master.command(&["CLIENT", "KILL", "TYPE", "normal"]);

    // (On a loaded machine "replicated" may have been answered "may or may
    // not" too, rightly: only the answer about "frozen" counts here.)
    let told = std::iter::from_fn(|| alice.recv_live_within(Duration::from_secs(5)))
        .filter(|frame| frame["type"] == "error")
        .map(|frame| frame["message"].as_str().unwrap_or_default().to_owned())
        .find(|text| text.contains(r#""frozen""#));
    replica.resume();
    let error = told.expect("the sender of a message no replica has is told it may be lost");
    assert!(
        error.contains(r#"your message "frozen" may or may not have been delivered"#),
        "{error}"
    );
    // It was sent again: a WAIT for "replicated", one for "frozen", and one
    // for "frozen" sent again.
    let stats: String = master.query(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_wait:calls=3,"), "{stats}");
    bob.expect_nothing(Duration::from_millis(500));
}

/// A batch sent again after its connection was killed is carried out
/// once, the script finding each chat message's id among the log's newest
/// entries. But a log keeps only `--history` entries: a batch of more
/// chat messages than that (4 here, with `--history 2`) pushes its own
/// first ones out as it is logged, and sent again, those were not found,
/// and were published a second time; now one found stands for its run.
/// (A frozen replica and
/// `--wait-replicas 1` hold each batch for a second: the four messages,
/// sent while the batch before them waits, go in one batch, and its
/// connection is killed while it waits in turn.)
#[test]
fn a_batch_longer_than_the_log_sent_again_is_delivered_once() {
    let (master, replica) = Redis::with_replica();
    let args = [
        "--history",
        "2",
        "--wait-replicas",
        "1",
        "--rate-limit",
        "0",
    ];
    let server = Server::with_redis_and(&master, &args);
    // A client's messages go one at a time: four senders, one each.
    let mut senders: Vec<_> = ["eve", "ann", "ben", "cat", "dan"]
        .iter()
        .map(|name| server.settled(name))
        .collect();
    let mut bob = server.settled("bob");

    replica.pause();
    senders[0].send("before");
    assert_eq!(bob.recv_chat().1, "before");
    for (sender, text) in senders[1..].iter_mut().zip(["a", "b", "c", "d"]) {
        sender.send(text);
    }
    let mut first: Vec<String> = (0..4).map(|_| bob.recv_chat().1).collect();
    first.sort();
    assert_eq!(first, ["a", "b", "c", "d"]);
    master.command(&["CLIENT", "KILL", "TYPE", "normal"]);

    let mut again = Vec::new();
    while let Some(frame) = bob.recv_live_within(Duration::from_millis(3_000)) {
        if frame["type"] == "chat" {
            again.push(frame["message"].as_str().unwrap().to_owned());
        }
    }
    replica.resume();
    // Sent again: a WAIT for "before", one (or, split, two) for the four,
    // and one more for the batch sent again.
    let stats: String = master.query(&["INFO", "commandstats"]);
    let waits: u64 = stats
        .split("cmdstat_wait:calls=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0);
    assert!(waits >= 3, "not sent again: {stats}");
    assert!(again.is_empty(), "published a second time: {again:?}");
}
