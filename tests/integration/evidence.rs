//! A Redis payload is evidence, never authority: whatever anyone who can
//! publish on a room's channel writes into a payload (its `ts`, `offset`,
//! `epoch`, sender) cannot get another client closed, hidden or misplaced.
//! And the room's history is its conversation: joins and leaves never push
//! chat out of it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::{Client, Redis, Server, in_both_subscription_modes, with_both_brokers};

in_both_subscription_modes!(
    a_forged_ts_closes_nobody,
    a_forged_offset_moves_no_place,
    forged_next_offsets_cannot_take_a_place_over,
);

with_both_brokers!(
    joins_and_leaves_never_push_chat_out_of_the_history => ["--history", "10", "--rate-limit", "0"],
);

/// Clients in a room of 50, besides the one that sends.
const ROOM: usize = 50;

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// This instance's id, as its connection ids start with it ("alice joined
/// global_room from … (ID-1)").
fn instance_id(server: &Server) -> String {
    let line = server.wait_for_log("joined global_room");
    let conn = line.rsplit('(').next().unwrap().trim_end_matches(')');
    conn.rsplit_once('-').unwrap().0.to_owned()
}

/// The payloads that closed whole rooms while the lag check trusted `ts`:
/// a made-up sender's message stamped now and then one stamped a minute
/// ago; and ones naming the real instance stamped an hour ahead and an hour
/// behind (a sender whose clock stepped), followed by genuine messages.
fn forged_clocks(instance: &str) -> Vec<String> {
    let now = unix_millis();
    [
        json!({"nickname": "mallory", "message": "now", "conn": "f00d-1", "ts": now}),
        json!({"nickname": "mallory", "message": "late", "conn": "f00d-1", "ts": now - 60_000}),
        json!({"nickname": "mallory", "message": "ahead", "conn": format!("{instance}-999"),
               "ts": now + 3_600_000}),
        json!({"nickname": "mallory", "message": "behind", "conn": format!("{instance}-998"),
               "ts": now - 3_600_000}),
    ]
    .iter()
    .map(Value::to_string)
    .collect()
}

/// Everyone in the room gets the genuine messages after the forged
/// clocks, and nobody is closed as too slow.
fn nobody_closed_by(server: &Server, publish: impl Fn(&str)) {
    let mut room: Vec<Client> = (0..ROOM)
        .map(|i| server.settled(&format!("c{i}")))
        .collect();
    let mut sender = server.settled("sender");
    for payload in forged_clocks(&instance_id(server)) {
        publish(&payload);
    }
    for i in 0..3 {
        sender.send(&format!("genuine {i}"));
    }
    for client in &mut room {
        let mut genuine = Vec::new();
        while genuine.len() < 3 {
            let (nickname, message) = client.recv_chat();
            if nickname == "sender" {
                genuine.push(message);
            }
        }
        assert_eq!(genuine, ["genuine 0", "genuine 1", "genuine 2"]);
    }
    // Still in the room, and still hearing it.
    sender.send("still here");
    for client in &mut room {
        while client.recv_chat().1 != "still here" {}
    }
    assert_eq!(server.metric("threadchat_slow_client_closes_total"), 0);
}

/// Forged and stepped clocks in a room of 50 close nobody: how far behind
/// a client is, is measured by this instance's own clock.
fn a_forged_ts_closes_nobody(mode: &[&str]) {
    let redis = Redis::start();
    let args = [&["--write-timeout", "2", "--rate-limit", "0"], mode].concat();
    let server = Server::with_redis_and(&redis, &args);
    nobody_closed_by(&server, |payload| redis.publish("global_room", payload));
}

/// The same on a Redis Cluster, published with `SPUBLISH` on the room's
/// shard channel.
#[test]
#[cfg(feature = "redis-ha")]
fn a_forged_ts_closes_nobody_on_a_cluster() {
    let cluster = crate::support::Cluster::start();
    let server = Server::on_redis(&cluster.url(), &["--write-timeout", "2"]);
    let master = cluster.node(cluster.master_of_room("global_room"));
    nobody_closed_by(&server, |payload| {
        master.command(&["SPUBLISH", "global_room", payload]);
    });
}

/// The place (offset, epoch) of a frame, if it has one.
fn place(frame: &Value) -> Option<(u64, String)> {
    Some((
        frame["offset"].as_u64()?,
        frame["epoch"].as_str()?.to_owned(),
    ))
}

/// A payload placed far ahead in the room's current epoch (which every
/// frame shows) is delivered without a place; the next genuine message
/// has the place right after the last genuine one.
fn a_forged_offset_moves_no_place(mode: &[&str]) {
    let redis = Redis::start();
    let args = [&["--rate-limit", "0"], mode].concat();
    let server = Server::with_redis_and(&redis, &args);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("first");
    let (offset, epoch) = place(&bob.recv_live()).expect("a place");
    let forged = json!({"nickname": "mallory", "message": "far ahead",
                        "offset": (1u64 << 53) - 2, "epoch": epoch});
    redis.publish("global_room", &forged.to_string());
    let seen = bob.recv_live();
    assert_eq!(seen["message"], "far ahead", "delivered: {seen}");
    assert_eq!(place(&seen), None, "without its place: {seen}");
    alice.send("second");
    let second = bob.recv_live();
    assert_eq!(second["message"], "second");
    assert_eq!(place(&second), Some((offset + 1, epoch.clone())));
    assert!(server.metric("threadchat_payloads_unplaced_total") >= 1);
    // Nor does a forged fresh start (a new epoch's offset 1).
    let fresh = json!({"nickname": "mallory", "message": "new log",
                       "offset": 1, "epoch": "forged"});
    redis.publish("global_room", &fresh.to_string());
    let seen = bob.recv_live();
    assert_eq!((&seen["message"], place(&seen)), (&json!("new log"), None));
    alice.send("third");
    assert_eq!(place(&bob.recv_live()), Some((offset + 2, epoch)));
}

/// The offsets the log will give next, published first by someone else
/// with the room's real epoch, are not the log's: the client's place stays
/// where the log put it, and when it comes back with it, it recovers every
/// message it missed, complete.
fn forged_next_offsets_cannot_take_a_place_over(mode: &[&str]) {
    let redis = Redis::start();
    let args = [&["--rate-limit", "0", "--history", "100"], mode].concat();
    let server = Server::with_redis_and(&redis, &args);
    let mut alice = server.settled("alice");
    let mut victim = server.settled("victim");
    let mut witness = server.settled("witness");
    alice.send("genuine first");
    let (offset, epoch) = place(&victim.recv_live()).expect("a place");
    for k in offset + 1..=offset + 20 {
        let forged = json!({"nickname": "mallory", "message": "spam",
                            "offset": k, "epoch": epoch});
        redis.publish("global_room", &forged.to_string());
    }
    let mut last = (offset, epoch.clone());
    for _ in 0..20 {
        let frame = victim.recv_live();
        assert_eq!(place(&frame), None, "forged, so without a place: {frame}");
    }
    alice.send("genuine second");
    let frame = victim.recv_live();
    assert_eq!(place(&frame), Some((offset + 1, epoch.clone())), "{frame}");
    assert!(
        frame.get("tag").is_none(),
        "the tag stays between servers: {frame}"
    );
    last.0 = offset + 1;
    victim.close();
    let said: Vec<String> = (0..30).map(|i| format!("missed {i}")).collect();
    for message in &said {
        alice.send(message);
    }
    // Logged once the witness has them all.
    while witness.recv_chat().1 != "missed 29" {}
    let mut back = Client::connect_path(
        server.addr,
        &format!("/chat/victim?since={}&epoch={}", last.0, last.1),
    );
    let (recovered, recovery) = recover(&mut back);
    assert_eq!(recovery["complete"], true, "{recovery}");
    assert_eq!(recovered, said);
}

/// 30 connect/close cycles, nothing said: a joiner still gets the room's
/// last 10 messages, and a client away since before them recovers them all
/// with `?since=`.
fn joins_and_leaves_never_push_chat_out_of_the_history(server: &Server) {
    let mut alice = server.settled("alice");
    let mut away = server.settled("away");
    alice.send("before");
    let frame = away.recv_live();
    let (since, epoch) = place(&frame).expect("a place");
    away.close();
    let said: Vec<String> = (0..10).map(|i| format!("message {i}")).collect();
    for message in &said {
        alice.send(message);
    }
    for i in 0..30 {
        server.settled(&format!("passer{i}")).close();
    }
    let mut joiner = server.client("joiner");
    let history: Vec<String> = joiner
        .recv_history()
        .iter()
        .filter(|frame| frame["type"] == "chat")
        .map(|frame| frame["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(history, said, "the last 10 messages");
    let mut back = Client::connect_path(
        server.addr,
        &format!("/chat/away?since={since}&epoch={epoch}"),
    );
    let (recovered, recovery) = recover(&mut back);
    assert_eq!(recovery["complete"], true, "{recovery}");
    assert_eq!(recovered, said);
}

/// A client dropped as too slow is reset, not closed gracefully: the
/// kernel drops what was queued for it at once (no socket left sending it
/// for minutes), and the client sees the end as soon as it reads, however
/// slowly.
#[test]
fn a_client_dropped_as_too_slow_is_reset() {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &["--write-timeout", "2", "--rate-limit", "0"]);
    let mut slow = server.settled("slow");
    let port = slow.ws.get_ref().local_addr().unwrap().port();
    let mut sender = server.settled("sender");
    let payload = "y".repeat(60 * 1024);
    let mut i = 0;
    while server.log_count("slow (127.0.0.1") == 0 {
        sender.send(&format!("{i} {payload}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
        assert!(i < 10_000, "the slow client was never dropped");
    }
    // Nothing of the connection is left in the server's kernel, queued.
    // In /proc/net/tcp: local address, then remote, as hex `IP:PORT`.
    let pair = format!("0100007F:{:04X} 0100007F:{port:04X}", server.addr.port());
    crate::support::eventually("the server's socket to the slow client is gone", || {
        !server_sockets().iter().any(|line| line.contains(&pair))
    });
    // The client, reading slowly, meets the end without reading everything.
    let mut frames = 0;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        match slow.ws.read() {
            Ok(_) => frames += 1,
            Err(_) => break,
        }
    }
    assert!(frames < i, "read everything ({frames} of {i})");
}

/// The kernel's TCP sockets (IPv4), one line each, as `/proc/net/tcp`
/// lists them.
fn server_sockets() -> Vec<String> {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

/// What a client that came back with `?since=` recovers: the chat
/// messages, and the `recovery` frame that ends them.
fn recover(back: &mut Client) -> (Vec<String>, Value) {
    let mut recovered = Vec::new();
    loop {
        let frame = back.recv();
        match frame["type"].as_str() {
            Some("recovery") => return (recovered, frame),
            Some("chat") => recovered.push(frame["message"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
}
