//! Redis Cluster: each room lives on the master of its slot, with a shard
//! channel there; several instances share the cluster; a killed master and
//! a migrated slot are followed with the same notices as a Redis restart.
//! Per-client and shared subscriptions both.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{
    Client, Cluster, Redis, Server, free_port, in_both_subscription_modes, place_of, room_channel,
};

in_both_subscription_modes!(
    rooms_on_every_master_chat_each_on_its_own_shard,
    several_instances_deliver_every_message_once_in_order,
    a_killed_master_is_followed_to_its_promoted_replica,
    a_migrated_room_is_followed_to_its_new_master,
);

/// A settled client of `room`.
fn join(server: &Server, room: &str, nickname: &str) -> Client {
    let mut client = Client::connect_path(server.addr, &format!("/chat/{nickname}?room={room}"));
    client.settle();
    client
}

/// The chat messages of `room`'s history, as a newcomer gets them.
fn history_of(server: &Server, room: &str) -> Vec<String> {
    let mut carol = Client::connect_path(server.addr, &format!("/chat/carol?room={room}"));
    carol
        .recv_history()
        .iter()
        .filter(|frame| frame["type"] == "chat")
        .map(|frame| frame["message"].as_str().unwrap().to_owned())
        .collect()
}

/// How many subscriptions a room of `clients` clients on one instance
/// takes: one per client, or one for the room (shared).
fn subscriptions_for(args: &[&str], clients: usize) -> usize {
    if args.contains(&"shared") { 1 } else { clients }
}

/// A room on each master: every room chats, keeps its history, and its
/// messages travel only on its own shard (`PUBSUB SHARDNUMSUB` on each
/// master).
fn rooms_on_every_master_chat_each_on_its_own_shard(args: &[&str]) {
    let cluster = Cluster::start();
    let server = Server::on_redis(&cluster.url(), args);
    let line = server.wait_for_log("relay: Redis Cluster: 3 master(s)");
    assert!(line.contains("slots 0-"), "{line}");
    let rooms = cluster.a_room_on_each_master();
    let masters = cluster.masters();
    for room in &rooms {
        let mut alice = join(&server, room, "alice");
        let mut bob = join(&server, room, "bob");
        alice.send(&format!("hello in {room}"));
        assert_eq!(bob.recv_chat().1, format!("hello in {room}"));
        bob.send(&format!("bye from {room}"));
        assert_eq!(alice.recv_chat().1, format!("bye from {room}"));

        let home = cluster.master_of_room(room);
        let channel = room_channel(room);
        for &master in &masters {
            let expected = if master == home {
                subscriptions_for(args, 2)
            } else {
                0
            };
            assert_eq!(
                cluster.shard_subscribers(master, &channel),
                expected,
                "{room}'s subscriptions on {master} (its home is {home})"
            );
        }
        // Its log is on its shard: a newcomer gets the history.
        assert_eq!(
            history_of(&server, room),
            [format!("hello in {room}"), format!("bye from {room}")]
        );
        let keys: Vec<String> = cluster.node(home).keys(&format!("threadchat:{{{room}}}:*"));
        assert!(keys.len() >= 3, "{room}'s keys on {home}: {keys:?}");
    }
}

/// Two instances on one cluster, rooms on different masters, a sender on
/// each instance: every client gets every message of its room exactly
/// once, in each sender's order; member lists span the instances (their
/// liveness keys are on any master).
fn several_instances_deliver_every_message_once_in_order(args: &[&str]) {
    const MESSAGES: usize = 100;
    let cluster = Cluster::start();
    let servers = [
        Server::on_redis(&cluster.url(), args),
        Server::on_redis(&cluster.url(), args),
    ];
    let rooms = &cluster.a_room_on_each_master()[..2];
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for room in rooms {
        for (i, server) in servers.iter().enumerate() {
            receivers.push((room.clone(), join(server, room, &format!("reader{i}"))));
            senders.push(join(server, room, &format!("writer{i}")));
        }
    }
    // A newcomer sees the members of both instances.
    let mut late = Client::connect_path(servers[1].addr, &format!("/chat/late?room={}", rooms[0]));
    let presence = late.recv_type("presence");
    let members: Vec<&str> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for member in ["reader0", "reader1", "writer0", "writer1"] {
        assert!(members.contains(&member), "{member} in {members:?}");
    }
    for n in 0..MESSAGES {
        for sender in &mut senders {
            sender.send(&n.to_string());
        }
    }
    for (room, receiver) in &mut receivers {
        let mut next: HashMap<String, usize> = HashMap::new();
        for _ in 0..2 * MESSAGES {
            let (from, text) = receiver.recv_chat();
            let expected = next.entry(from.clone()).or_default();
            assert_eq!(text, expected.to_string(), "{from} in {room}, in order");
            *expected += 1;
        }
        assert_eq!(next.len(), 2, "both senders of {room}");
        receiver.expect_nothing(Duration::from_millis(300));
    }
}

/// A master dies mid-chat: its replica is promoted; the clients of its
/// room are told the relay was lost, then restored, and chat again; the
/// clients of a room on another master notice nothing; no thread and no
/// subscription is left behind.
fn a_killed_master_is_followed_to_its_promoted_replica(args: &[&str]) {
    let mut cluster = Cluster::start();
    let server = Server::on_redis(&cluster.url(), args);
    let rooms = cluster.a_room_on_each_master();
    let (doomed, safe) = (&rooms[0], &rooms[1]);
    let mut alice = join(&server, doomed, "alice");
    let mut bob = join(&server, doomed, "bob");
    let mut carol = join(&server, safe, "carol");
    let mut dave = join(&server, safe, "dave");
    alice.send("before");
    let before = bob.recv_live();
    assert_eq!(before["message"], "before");
    let threads = server.steady_thread_count();

    let slot = cluster.slot(&room_channel(doomed));
    let old = cluster.master_of(slot);
    // Replicated before the kill: the test is about what survived.
    cluster.node(old).command(&["WAIT", "1", "5000"]);
    cluster.kill(old);
    assert!(alice.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("lost the chat relay"));
    let new = cluster.wait_for_promotion(slot, old);
    assert!(alice.recv_notice().contains("reconnected"));
    assert!(bob.recv_notice().contains("reconnected"));
    alice.send("after the failover");
    assert_eq!(bob.recv_chat().1, "after the failover");
    bob.send("on the promoted replica");
    assert_eq!(alice.recv_chat().1, "on the promoted replica");

    // The room on another master went on as if nothing happened.
    carol.send("still here");
    assert_eq!(dave.recv_chat().1, "still here");
    dave.expect_nothing(Duration::from_millis(200));

    crate::support::eventually("no thread leaked", || {
        server.steady_thread_count() == threads
    });
    assert_eq!(
        cluster.shard_subscribers(new, &room_channel(doomed)),
        subscriptions_for(args, 2),
        "one subscription per client (or room) on the new master, no more"
    );

    // A client back with a place of the old master's epoch gets what
    // followed it on the promoted replica, and is told that was all.
    let query = format!("&room={doomed}");
    let mut erin = Client::resume(server.addr, "erin", &query, &place_of(&before));
    let (chats, recovery) = erin.recovered();
    let got: Vec<&str> = chats.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(recovery["complete"], true, "{recovery}");
    assert_eq!(got, ["after the failover", "on the promoted replica"]);
}

/// A room's slot is moved to another master while its clients chat (a
/// resharding): the old master tells them (`sunsubscribe`), and they
/// follow it with the usual notices, their log moved with it; a message
/// sent mid-move (`ASK`) is not lost: the restored subscription fills the
/// gap from the log, and nobody is told anything may be missing.
fn a_migrated_room_is_followed_to_its_new_master(args: &[&str]) {
    let cluster = Cluster::start();
    let server = Server::on_redis(&cluster.url(), args);
    let rooms = cluster.a_room_on_each_master();
    let room = &rooms[0];
    let mut alice = join(&server, room, "alice");
    let mut bob = join(&server, room, "bob");
    alice.send("before the move");
    assert_eq!(bob.recv_chat().1, "before the move");
    let threads = server.steady_thread_count();

    let slot = cluster.slot(&room_channel(room));
    let old = cluster.master_of(slot);
    let new = cluster.masters().into_iter().find(|m| *m != old).unwrap();
    // A message sent while the keys have moved and the slot not yet: the
    // old master answers `ASK`, and it is logged on the new one (it is
    // published there too, where nobody subscribes yet: the subscriptions
    // restored there read it from the log).
    let log = format!("threadchat:{{{room}}}:log");
    cluster.migrate(slot, new, || {
        alice.send("during the move");
        let client = redis::Client::open(format!("redis://127.0.0.1:{new}")).unwrap();
        let mut con = client.get_connection().unwrap();
        crate::support::eventually("the message is logged on the new master", || {
            // The slot is not the new master's yet: it answers the keys it
            // is importing only after `ASKING`.
            let (entries,): (Vec<String>,) = redis::pipe()
                .cmd("ASKING")
                .ignore()
                .cmd("LRANGE")
                .arg(&log)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap();
            entries.iter().any(|e| e.contains("during the move"))
        });
    });
    assert!(alice.recv_notice().contains("lost the chat relay"));
    let back = alice.recv_notice();
    assert!(
        back.contains("reconnected") && !back.contains("missing"),
        "{back}"
    );
    assert!(bob.recv_notice().contains("lost the chat relay"));
    let back = bob.recv_notice();
    assert!(
        back.contains("reconnected") && !back.contains("missing"),
        "{back}"
    );
    // With its place, though its epoch's key did not move with the log.
    let during = bob.recv_live();
    assert_eq!(during["message"], "during the move");
    assert!(during["offset"].is_u64(), "{during}");
    alice.send("after the move");
    assert_eq!(bob.recv_chat().1, "after the move");

    crate::support::eventually("no thread leaked", || {
        server.steady_thread_count() == threads
    });
    let channel = room_channel(room);
    assert_eq!(cluster.shard_subscribers(old, &channel), 0);
    assert_eq!(
        cluster.shard_subscribers(new, &channel),
        subscriptions_for(args, 2)
    );
    // The log moved with the slot, and goes on.
    assert_eq!(
        history_of(&server, room),
        ["before the move", "during the move", "after the move"]
    );
}

/// Seeds that do not answer, a Redis that is not a cluster, and a
/// malformed URL are one clear error each at start.
#[test]
fn a_wrong_cluster_setup_is_one_clear_error_at_start() {
    let plain = Redis::start();
    let nobody = format!("redis+cluster://127.0.0.1:{}", free_port());
    let not_a_cluster = format!("redis+cluster://127.0.0.1:{}", plain.port);
    for (url, expected) in [
        (nobody.as_str(), "no node answered CLUSTER SLOTS"),
        (not_a_cluster.as_str(), "cluster support disabled"),
        ("redis+cluster://127.0.0.1", "is not HOST:PORT"),
        ("redis+cluster://127.0.0.1:7000/1", "one database"),
    ] {
        Server::fails_on_redis(url, expected);
    }
}
