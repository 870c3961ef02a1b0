//! Nothing lost, nothing twice, across a reconnect: every chat message,
//! join and leave has an offset in its room's log (within an epoch), frames
//! carry it, and a client that reconnects with `?since=OFFSET&epoch=EPOCH`
//! gets exactly what it missed, then a `recovery` frame that says whether
//! that was everything.

use std::collections::HashMap;

use crate::support::{Client, Redis, Server, in_both_subscription_modes, place_of};

/// Room logs big enough for the tests' 500 messages.
const LOG: [&str; 6] = [
    "--history",
    "1000",
    "--history-bytes",
    "1048576",
    "--rate-limit",
    "0",
];

/// Checks that `chats` hold each sender's `n` numbered messages once, in
/// order.
fn each_once_in_order(chats: &[(String, String)], senders: &[&str], n: usize) {
    let mut next: HashMap<&str, usize> = senders.iter().map(|s| (*s, 0)).collect();
    for (nickname, message) in chats {
        let expected = next.get_mut(nickname.as_str()).expect("a sender");
        assert_eq!(
            message,
            &format!("m{expected}"),
            "{nickname}'s messages in order"
        );
        *expected += 1;
    }
    for sender in senders {
        assert_eq!(next[sender], n, "all of {sender}'s messages");
    }
}

/// The scenario of the issue: a client is away while two others (on two
/// instances, with Redis) send 500 messages; it comes back with `since`
/// and gets all 500, each sender's in order, once each — those the log
/// holds when it comes back recovered, those sent while it reconnects live,
/// with no gap and no duplicate at the boundary — then live ones.
fn a_client_that_comes_back_gets_everything_it_missed(servers: &[&Server]) {
    let (a, b) = (servers[0], servers[servers.len() - 1]);
    let mut alice = a.client("alice");
    alice.settle();
    let mut bob = b.client("bob");
    bob.settle();
    let mut away = a.client("away");
    away.settle();
    alice.send("before");
    bob.recv_chat();
    let frame = away.recv_live();
    assert_eq!(frame["message"], "before");
    let place = place_of(&frame);
    away.close();

    // Sending goes on while the client comes back: some of it is in the
    // log when it reconnects, the rest reaches it live.
    let senders = std::thread::spawn(move || {
        for i in 0..250 {
            alice.send(&format!("m{i}"));
            bob.send(&format!("m{i}"));
            if i == 150 {
                // Half-way: make sure the first half is logged.
                for _ in 0..=150 {
                    alice.recv_chat();
                }
            }
        }
        (alice, bob)
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut back = Client::resume(b.addr, "away", "", &place);
    let mut chats = Vec::new();
    let mut recovery = None;
    while chats.len() < 500 || recovery.is_none() {
        let frame = back.recv();
        match frame["type"].as_str() {
            Some("chat") => chats.push((
                frame["nickname"].as_str().unwrap().to_owned(),
                frame["message"].as_str().unwrap().to_owned(),
            )),
            Some("recovery") => {
                assert!(recovery.is_none(), "one recovery frame");
                recovery = Some(frame);
            }
            _ => {}
        }
    }
    let recovery = recovery.expect("a recovery frame");
    assert_eq!(recovery["complete"], true, "{recovery}");
    assert!(recovery["message"].as_str().unwrap().contains("recovered"));
    each_once_in_order(&chats, &["alice", "bob"], 250);
    let (_alice, mut bob) = senders.join().unwrap();
    // Live from here on, and nothing twice.
    bob.send("live");
    assert_eq!(back.recv_chat(), ("bob".into(), "live".into()));
}

in_both_subscription_modes!(tls: a_client_that_comes_back_gets_everything_it_missed_from_redis);

fn a_client_that_comes_back_gets_everything_it_missed_from_redis(mode: &[&str]) {
    let redis = Redis::start();
    let args: Vec<&str> = LOG.iter().copied().chain(mode.iter().copied()).collect();
    let one = Server::with_redis_and(&redis, &args);
    let two = Server::with_redis_and(&redis, &args);
    a_client_that_comes_back_gets_everything_it_missed(&[&one, &two]);
}

#[test]
fn a_client_that_comes_back_gets_everything_it_missed_in_process() {
    let args: Vec<&str> = ["--in-process"].into_iter().chain(LOG).collect();
    a_client_that_comes_back_gets_everything_it_missed(&[&Server::start(&args)]);
}

/// A `since` the log no longer reaches: the client is told, and gets the
/// latest history instead.
#[test]
fn a_since_older_than_the_log_is_told_and_gets_the_latest() {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &["--history", "5", "--rate-limit", "0"]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    let mut away = server.settled("away");
    alice.send("first");
    bob.recv_chat();
    let place = place_of(&away.recv_live());
    away.close();
    for i in 0..20 {
        alice.send(&format!("m{i}"));
    }
    for _ in 0..20 {
        bob.recv_chat();
    }
    let mut back = Client::resume(server.addr, "away", "", &place);
    let (chats, recovery) = back.recovered();
    assert_eq!(recovery["complete"], false, "{recovery}");
    assert!(
        recovery["message"]
            .as_str()
            .unwrap()
            .contains("no longer reaches back"),
        "{recovery}"
    );
    // The latest history: the newest of the log's five entries that are
    // chat messages, in order.
    assert!(!chats.is_empty() && chats.len() <= 5, "{chats:?}");
    assert_eq!(chats.last().unwrap().1, "m19");
}

/// When Redis loses the log (flushed, or replaced), the log starts again
/// with a new epoch: a client coming back with the old one is told.
#[test]
fn a_flushed_redis_starts_a_new_epoch_and_says_so() {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &["--rate-limit", "0"]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    let mut away = server.settled("away");
    alice.send("before the flush");
    bob.recv_chat();
    let place = place_of(&away.recv_live());
    away.close();
    let _: () = redis.query(&["FLUSHALL"]);
    alice.send("after the flush");
    let (_, after) = place_of(&bob.recv_live());
    assert_ne!(after, place.1, "a new epoch");
    let mut back = Client::resume(server.addr, "away", "", &place);
    let (chats, recovery) = back.recovered();
    assert_eq!(recovery["complete"], false, "{recovery}");
    let message = recovery["message"].as_str().unwrap();
    assert!(
        message.contains("reset") && message.contains("Redis"),
        "{recovery}"
    );
    assert_eq!(
        chats,
        [("alice".to_owned(), "after the flush".to_owned())],
        "the new log's history"
    );
}

/// Without Redis, a log starts again when the server does: a client coming
/// back from before the restart is told that, not about a Redis it never
/// used.
#[test]
fn a_restarted_in_process_server_names_its_own_restart() {
    let first = Server::in_process();
    let mut alice = first.settled("alice");
    let mut away = first.settled("away");
    alice.send("before the restart");
    let place = place_of(&away.recv_live());
    drop((alice, away, first));
    let second = Server::in_process();
    let mut back = Client::resume(second.addr, "away", "", &place);
    let (_, recovery) = back.recovered();
    assert_eq!(recovery["complete"], false, "{recovery}");
    let message = recovery["message"].as_str().unwrap();
    assert!(message.contains("the server restarted"), "{recovery}");
    assert!(!message.contains("Redis"), "{recovery}");
}

/// Payloads published without a place (the original Python app publishes
/// the client's JSON as it is) still reach everyone; they carry no offset,
/// so they cannot be recovered.
#[test]
fn payloads_without_a_place_still_reach_everyone() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.settled("alice");
    let _: i64 = redis.query(&[
        "PUBLISH",
        "global_room",
        r#"{"nickname": "py", "message": "hello from python"}"#,
    ]);
    let frame = alice.recv_live();
    assert_eq!(frame["message"], "hello from python");
    assert!(frame.get("offset").is_none(), "{frame}");
}

/// The presence frame says which offset its list reflects; a join after
/// it has a later offset, so a client counts nobody twice.
#[test]
fn presence_says_where_in_the_log_it_stands() {
    let server = Server::in_process();
    let mut alice = server.client("alice");
    let presence = alice.recv_type("presence");
    let seen = presence["offset"].as_u64().expect("presence has an offset");
    let _carol = server.client("carol");
    let join = alice.recv_type("join");
    assert_eq!(join["nickname"], "carol");
    assert!(
        join["offset"].as_u64().unwrap() > seen,
        "{join} after {presence}"
    );
    assert_eq!(join["epoch"], presence["epoch"]);
}

/// `since` and `epoch` come together, and must be plausible.
#[test]
fn a_malformed_since_is_refused() {
    let server = Server::in_process();
    for (path, reason) in [
        ("/chat/x?since=1", "together"),
        ("/chat/x?since=-1&epoch=abc", "since must be a number"),
        ("/chat/x?since=1&epoch=a%20b", "epoch"),
    ] {
        let refused = server.refusal(path, "").expect("refused");
        assert_eq!(refused.status, 400, "{path}: {refused}");
        assert!(refused.reason.contains(reason), "{path}: {refused}");
    }
}

/// In the terminal, what a reconnecting client missed is marked as such,
/// one line each, then a line that says whether that was everything.
#[test]
fn text_mode_marks_what_was_recovered() {
    let server = Server::in_process();
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    let mut away = server.settled("away");
    alice.send("first");
    let place = place_of(&away.recv_live());
    away.close();
    alice.send("while you were away");
    bob.recv_chat();
    bob.recv_chat();
    let path = format!("/chat/away?since={}&epoch={}&format=text", place.0, place.1);
    let mut back = Client::connect_path(server.addr, &path);
    // Up to the member list, which ends the welcome. How many lines come
    // before it depends on whether the first `away`'s leave was logged
    // before she came back (joins and leaves are announced in batches).
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.starts_with("* in "))
    {
        lines.push(back.recv_text());
    }
    assert!(
        lines.contains(&"[recovered] alice: while you were away".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("* recovered the")),
        "{lines:?}"
    );
}

/// A burst — one client sending hundreds of messages back to back, so that
/// the relay logs them many per script call — still gives every message the
/// next offset, and leaves the log within its bounds: its entries, their
/// size in bytes and where it begins all agree, and a joiner's history is
/// the newest entries, in order.
#[test]
fn a_burst_keeps_offsets_consecutive_and_the_log_within_its_bounds() {
    let redis = Redis::start();
    let server = Server::with_redis_and(
        &redis,
        &[
            "--history",
            "50",
            "--history-bytes",
            "8192",
            "--rate-limit",
            "0",
        ],
    );
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    for i in 0..300 {
        alice.send(&format!("{i:03} {}", "x".repeat(100)));
    }
    let mut offsets = Vec::new();
    while offsets.len() < 300 {
        let frame = bob.recv_live();
        if frame["type"] == "chat" {
            offsets.push(frame["offset"].as_u64().expect("an offset"));
        }
    }
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "offsets with a gap or out of order: {offsets:?}"
    );

    let log = &redis.keys("threadchat:*:log")[0];
    let meta = log.replace(":log", ":meta");
    let entries: Vec<String> = redis.query(&["LRANGE", log, "0", "-1"]);
    let bytes: usize = redis.query(&["GET", &log.replace(":log", ":log-bytes")]);
    let (first, last): (u64, u64) = redis.query(&["HMGET", &meta, "first", "last"]);
    assert_eq!(bytes, entries.iter().map(String::len).sum::<usize>());
    assert!(
        bytes <= 8192 && entries.len() <= 50,
        "{bytes} bytes, {} entries",
        entries.len()
    );
    assert_eq!(last, *offsets.last().unwrap());
    assert_eq!(first + entries.len() as u64, last + 1);

    let history: Vec<u64> = server
        .client("carol")
        .recv_history()
        .iter()
        .map(|frame| frame["offset"].as_u64().unwrap())
        .collect();
    assert!(!history.is_empty());
    assert!(history.windows(2).all(|w| w[1] == w[0] + 1), "{history:?}");
    assert_eq!(history.last(), offsets.last());
}

in_both_subscription_modes!(a_redis_restored_from_a_snapshot_keeps_what_survived);

/// A Redis that restarts from a snapshot brings back an older log: what
/// came after the snapshot is lost, like what a failed-over master took
/// and never replicated. The log takes a new epoch, so that new messages
/// are not taken for ones already seen (their offsets come again), but
/// keeps its entries and remembers where the old epoch ended: a client
/// whose place survived recovers everything after it, and is told exactly
/// how much was lost (the instance that delivered it reported how far it
/// got); a client whose place was lost is told so, and gets what followed.
fn a_redis_restored_from_a_snapshot_keeps_what_survived(mode: &[&str]) {
    let redis = Redis::start();
    let args: Vec<&str> = ["--rate-limit", "0"].iter().chain(mode).copied().collect();
    let server = Server::with_redis_and(&redis, &args);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("saved");
    let saved = place_of(&bob.recv_live());
    redis.command(&["SAVE"]);
    alice.send("not saved");
    let not_saved = place_of(&bob.recv_live());

    let port = redis.kill();
    let _redis = Redis::start_on(port);
    for client in [&mut alice, &mut bob] {
        while !client.recv_server("notice").contains("reconnected") {}
    }
    alice.send("after the restart");
    let frame = bob.recv_type("chat");
    assert_eq!(frame["message"], "after the restart");
    assert_ne!(
        place_of(&frame).1,
        saved.1,
        "the same epoch after a restore"
    );

    // Its place survived: everything after it, and the loss, counted.
    let mut carol = Client::resume(server.addr, "carol", "", &saved);
    let (chats, recovery) = carol.recovered();
    let messages: Vec<&str> = chats.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(messages, ["after the restart"], "{recovery}");
    assert_eq!(recovery["complete"], false, "{recovery}");
    let text = recovery["message"].as_str().unwrap();
    assert!(
        text.contains("lost 1 message or event sent after your last"),
        "{text}"
    );

    // Its place was lost: told so, and given what followed.
    let mut dave = Client::resume(server.addr, "dave", "", &not_saved);
    let (chats, recovery) = dave.recovered();
    let messages: Vec<&str> = chats.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(messages, ["after the restart"], "{recovery}");
    assert_eq!(recovery["complete"], false, "{recovery}");
    let text = recovery["message"].as_str().unwrap();
    assert!(
        text.contains("lost the last 1 message or event you had"),
        "{text}"
    );
}

/// A Redis restarted from its append-only file (every write kept) takes a
/// new epoch, yet a client coming back from the old one loses nothing.
#[test]
fn a_redis_restarted_with_everything_keeps_every_place() {
    let persistent = ["--appendonly", "yes", "--appendfsync", "always"];
    let redis = Redis::start_with(Redis::fresh_port(), &persistent);
    let server = Server::with_redis_and(&redis, &["--rate-limit", "0"]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("before");
    let before = place_of(&bob.recv_live());
    alice.send("also before");
    bob.recv_live();

    let port = redis.kill();
    let _redis = Redis::start_with(port, &persistent);
    for client in [&mut alice, &mut bob] {
        while !client.recv_server("notice").contains("reconnected") {}
    }
    alice.send("after");
    assert_eq!(bob.recv_type("chat")["message"], "after");

    let mut carol = Client::resume(server.addr, "carol", "", &before);
    let (chats, recovery) = carol.recovered();
    let messages: Vec<&str> = chats.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(messages, ["also before", "after"], "{recovery}");
    assert_eq!(recovery["complete"], true, "{recovery}");
}
