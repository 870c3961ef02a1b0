//! What travels over Redis: interoperability with the original Python app,
//! junk on the channel, and several instances sharing one Redis.

use std::time::Duration;

use crate::support::{Redis, Server, eventually};

/// The original app PUBLISHes the raw text its clients send, e.g.
/// `{"nickname": "py", "message": "hi"}`; threadchat clients receive it.
#[test]
fn messages_published_by_the_original_app_arrive() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.client("alice");
    redis.publish(
        "global_room",
        r#"{"nickname": "py", "message": "from python"}"#,
    );
    assert_eq!(alice.recv_chat(), ("py".into(), "from python".into()));
}

/// The original app's reader does `json.loads(data)` and reads
/// `data["nickname"]`, then forwards the text; both fields must be strings.
#[test]
fn what_threadchat_publishes_is_what_the_original_reads() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.client("alice");

    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let mut pubsub = con.as_pubsub();
    pubsub.subscribe("global_room").unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    alice.send("hello python");
    // Skip alice's join event (published as she joined, maybe just now).
    let data = loop {
        let payload: String = pubsub.get_message().unwrap().get_payload().unwrap();
        let data: serde_json::Value = serde_json::from_str(&payload).unwrap();
        if data.get("type").is_none() {
            break data;
        }
    };
    assert_eq!(data["nickname"], "alice");
    assert_eq!(data["message"], "hello python");
    assert!(
        data["conn"].is_string(),
        "carries the sender's connection id"
    );
    assert!(data["ts"].is_u64(), "carries a timestamp");
}

/// Payloads that are not chat messages are skipped with one warning (not one
/// per connection) and nobody is disconnected.
#[test]
fn junk_on_the_channel_is_skipped_and_hurts_no_one() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    for junk in ["junk", "{}", r#"{"nickname": 5, "message": "x"}"#, "[]", ""] {
        redis.publish("global_room", junk);
    }
    bob.send("after the junk");
    assert_eq!(alice.recv_chat(), ("bob".into(), "after the junk".into()));
    alice.send("me too");
    assert_eq!(bob.recv_chat(), ("alice".into(), "me too".into()));
    server.wait_for_log("skipped a payload on global_room");
    assert_eq!(
        server.log_count("\"junk\""),
        1,
        "one warning per junk payload, not one per connection"
    );
}

/// Two instances on one Redis are one room.
#[test]
fn two_instances_on_one_redis_share_the_room() {
    let redis = Redis::start();
    let east = Server::with_redis(&redis);
    let west = Server::with_redis(&redis);
    let mut alice = east.client("alice");
    let mut bob = west.client("bob");
    let mut carol = west.client("carol");
    alice.send("hi from east");
    assert_eq!(bob.recv_chat(), ("alice".into(), "hi from east".into()));
    assert_eq!(carol.recv_chat(), ("alice".into(), "hi from east".into()));
    bob.send("hi from west");
    assert_eq!(alice.recv_chat(), ("bob".into(), "hi from west".into()));
    assert_eq!(carol.recv_chat(), ("bob".into(), "hi from west".into()));
}

/// Publishing shares a small pool of connections: clients cost one Redis
/// connection each (their subscription), not two.
#[test]
fn publishing_does_not_cost_a_connection_per_client() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let baseline = redis.client_count();
    let clients: Vec<_> = (0..10).map(|i| server.client(&format!("c{i}"))).collect();
    let mut clients = clients.into_iter();
    let mut first = clients.next().unwrap();
    first.send("hello");
    let mut rest: Vec<_> = clients.collect();
    for c in &mut rest {
        c.recv_chat();
    }
    eventually("10 subscriptions", || {
        redis.subscribers("global_room") == 10
    });
    // Ten subscriptions, and the pooled connections (2 publishing, 2 for
    // queries), which open when first needed: any of them may have opened
    // after the baseline.
    assert!(redis.client_count() <= baseline + 10 + 4);
}

/// Three instances on one Redis, clients spread over them: every message
/// reaches every other client in its room exactly once, and in each sender's
/// order.
#[test]
fn three_instances_deliver_exactly_once_in_order() {
    const PER_SENDER: usize = 100;
    let redis = Redis::start();
    let url = redis.url();
    let servers: Vec<Server> = (0..3)
        .map(|_| Server::start(&["--redis", &url, "--rate-limit", "0"]))
        .collect();
    // Two clients per instance, all in one room; everyone sends.
    let mut clients: Vec<crate::support::Client> = (0..6)
        .map(|i| {
            let mut client = servers[i % 3].client(&format!("c{i}?room=scale"));
            client.settle();
            client
        })
        .collect();
    for round in 0..PER_SENDER {
        for (i, client) in clients.iter_mut().enumerate() {
            client.send(&format!("{i}:{round}"));
        }
    }
    for (me, client) in clients.iter_mut().enumerate() {
        let mut next = [0usize; 6];
        for _ in 0..5 * PER_SENDER {
            let (nickname, message) = client.recv_chat();
            let (sender, round) = message.split_once(':').unwrap();
            let (sender, round): (usize, usize) = (sender.parse().unwrap(), round.parse().unwrap());
            assert_eq!(nickname, format!("c{sender}"));
            assert_ne!(sender, me, "no echo");
            assert_eq!(
                round, next[sender],
                "c{me} got c{sender}'s messages in order, once"
            );
            next[sender] += 1;
        }
        client.expect_nothing(Duration::from_millis(200));
    }
}

/// A Redis that requires a password: the password in the URL is used by
/// every connection (publishers and subscriptions, in both modes), and is
/// never logged.
#[test]
fn a_password_protected_redis_works_in_both_modes() {
    let redis = Redis::start();
    redis.command(&["CONFIG", "SET", "requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    for mode in ["per-client", "shared"] {
        let server = Server::start(&["--redis", &url, "--subscriptions", mode]);
        let mut alice = server.client("alice");
        let mut bob = server.client("bob");
        alice.settle();
        bob.settle();
        alice.send(&format!("hello in {mode} mode"));
        assert_eq!(bob.recv_chat().1, format!("hello in {mode} mode"));
        server.wait_for_log("relay: Redis at redis://***@");
        assert_eq!(server.log_count("s3cret"), 0, "the password was logged");
    }
}

/// A Redis user that may not run `INFO` (a restricted ACL) still chats: the
/// log's check for a restarted Redis is skipped, nothing else.
#[test]
fn a_redis_user_without_info_still_chats() {
    let redis = Redis::start();
    redis.command(&[
        "ACL", "SETUSER", "chat", "on", ">secret", "~*", "&*", "+@all", "-info",
    ]);
    let url = format!("redis://chat:secret@127.0.0.1:{}", redis.port);
    let server = Server::start(&["--redis", &url]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("no INFO for me");
    assert_eq!(bob.recv_chat().1, "no INFO for me");
}
