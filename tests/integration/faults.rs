//! Faults: Redis going away, paused or dropping subscribers; panics. The
//! server keeps serving, tells clients what happened, and leaks nothing.

use std::time::Duration;

use crate::support::{Closed, Redis, Server, eventually, in_both_subscription_modes};

in_both_subscription_modes!(
    redis_dies_and_comes_back_mid_chat,
    joining_while_redis_is_down_gets_503,
    a_silently_dead_redis_is_detected,
);

/// Redis is killed in the middle of a chat and restarted on the same port:
/// clients stay connected, are told the relay was lost and restored,
/// messages sent meanwhile are reported as not delivered (the first as
/// maybe not), the chat resumes, and no thread leaks.
///
/// With a shared subscription the room's one subscription reconnects (once,
/// for everyone) and tells every client.
fn redis_dies_and_comes_back_mid_chat(args: &[&str]) {
    let subscriptions = if args.is_empty() { 2 } else { 1 };
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, args);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    alice.send("before");
    assert_eq!(bob.recv_chat().1, "before");

    let port = redis.kill();
    // (The answer to "before" may have been lost with Redis, though bob got
    // it: alice may be told it was not delivered, before or after the lost
    // notice. See `Client::recv_notice` and `next_error`.)
    assert!(alice.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("lost the chat relay"));
    // A message that meets a publisher connection Redis closed is "may or
    // may not have been delivered": the publisher cannot tell a connection
    // closed before it from one closed right after Redis carried it out.
    // Once it finds Redis gone, "not delivered". A burst is published
    // without waiting for each answer; every message is accounted for (in
    // one error frame or several).
    alice.send("while Redis is down");
    for i in 0..5 {
        alice.send(&format!("burst {i}"));
    }
    let mut failed = 0;
    while failed < 6 {
        failed += not_delivered(&next_error(&mut alice));
    }
    assert_eq!(failed, 6);
    alice.send("still down");
    assert!(next_error(&mut alice).contains("not delivered"));

    let redis = Redis::start_on(port);
    assert!(alice.recv_notice().contains("reconnected"));
    assert!(bob.recv_notice().contains("reconnected"));
    alice.send("after");
    assert_eq!(bob.recv_chat(), ("alice".into(), "after".into()));
    bob.send("welcome back");
    assert_eq!(alice.recv_chat(), ("bob".into(), "welcome back".into()));
    assert_eq!(
        server.metric("threadchat_redis_reconnects_total"),
        subscriptions
    );
    assert!(server.metric("threadchat_publish_errors_total") >= 1);
    // The log: one line when the relay was lost, one when it was back,
    // with what came back; the failures in between summed up.
    let back = server.wait_for_log("the chat relay is back after");
    assert!(
        back.contains(&format!("{subscriptions} subscription(s) restored")),
        "{back}"
    );
    assert_eq!(server.log_count("lost the chat relay (Redis at"), 1);
    assert!(server.log_count("Redis command batch failed") <= 2);

    alice.close();
    bob.close();
    // main, signals, announcer, heartbeat, 2 publishers, 2 query threads,
    // the idle rooms' keeper
    eventually("threads back to baseline", || server.thread_count() == 9);
    eventually(
        "Redis connections back to the publishers and queries",
        || redis.client_count() <= 4,
    );
}

/// The next error frame's text, past one about "before", whose answer may
/// have been lost with Redis (the ambiguous case of `Client::recv_notice`).
fn next_error(client: &mut crate::support::Client) -> String {
    loop {
        let text = client.recv_server("error");
        if !text.contains(r#""before""#) {
            return text;
        }
    }
}

/// How many messages an error frame says were not, or may not have been,
/// delivered.
fn not_delivered(text: &str) -> usize {
    let one = ["was not delivered", "may or may not have been delivered"];
    if text.starts_with("your message ") && one.iter().any(|fate| text.contains(fate)) {
        1
    } else if let Some((n, _)) = text
        .split_once(" of your messages were not delivered")
        .or_else(|| text.split_once(" of your messages may or may not"))
    {
        n.parse().unwrap_or_else(|_| panic!("{text}"))
    } else {
        panic!("not a delivery error: {text}")
    }
}

/// Redis closing subscriber connections (as it does past the pub/sub
/// output-buffer limit) is a loss like any other: notices, resubscribe,
/// nobody left deaf.
#[test]
fn redis_dropping_subscribers_is_survived() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    for client in [&mut alice, &mut bob] {
        assert!(client.recv_server("notice").contains("lost the chat relay"));
        assert!(client.recv_server("notice").contains("reconnected"));
    }
    alice.send("still there?");
    assert_eq!(bob.recv_chat().1, "still there?");
}

/// A Redis that stops answering without closing anything (SIGSTOP) is
/// detected by the heartbeat's PING (every 10 s, failing after the
/// publisher's I/O timeouts: within about 20 s) and treated as lost; when it
/// answers again, subscriptions are restored.
fn a_silently_dead_redis_is_detected(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, args);
    let mut alice = server.client("alice");
    alice.settle();
    alice
        .ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    redis.pause();
    let notice = alice.recv_server("notice");
    redis.resume();
    assert!(notice.contains("lost the chat relay"), "{notice}");
    assert!(alice.recv_server("notice").contains("reconnected"));
    let mut bob = server.client("bob");
    bob.send("hello again");
    assert_eq!(alice.recv_chat().1, "hello again");
}

/// A panic in one connection's thread (its reader, or its start thread)
/// closes that connection only, with 1011, and is counted.
#[test]
fn a_panic_closes_only_its_own_connection() {
    let server = Server::start_with_env(&["--in-process"], &[("THREADCHAT_TEST_PANIC", "boom")]);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    let mut victim = server.client("victim");
    victim.send("boom");
    assert_eq!(
        victim.recv_close(),
        Closed::Frame(1011, "server error".into())
    );
    server.wait_for_log("reader thread panicked");
    alice.send("unaffected");
    assert_eq!(bob.recv_chat().1, "unaffected");
    assert_eq!(server.metric("threadchat_panics_total"), 1);
    let mut carol = server.client("carol");
    carol.send("new people can join");
    assert_eq!(alice.recv_chat().1, "new people can join");
    assert_eq!(bob.recv_chat().1, "new people can join");

    // A panic on a start thread, once the client has its `101` (while it
    // is welcomed): the same close, counted the same.
    let mut early = crate::support::Client::connect(server.addr, "boom");
    assert_eq!(
        early.recv_close(),
        Closed::Frame(1011, "server error".into())
    );
    server.wait_for_log("start thread panicked");
    assert_eq!(server.metric("threadchat_panics_total"), 2);
    alice.send("still unaffected");
    assert_eq!(bob.recv_chat().1, "still unaffected");
    eventually("the panicked connection's threads are gone", || {
        // main, signals, announcer, the in-process relay's sweeper, and
        // two threads per client
        server.thread_count() == 1 + 1 + 1 + 1 + 2 * 3
    });
}

/// With `--unique-nicknames` a joiner's name is claimed in Redis before
/// anything else: refused there while Redis is down, it is counted and
/// logged like any other client the relay could not take.
#[test]
fn joining_while_redis_is_down_gets_503_with_unique_nicknames() {
    joining_while_redis_is_down_gets_503(&["--unique-nicknames"]);
}

/// While Redis is down, a new client is refused (close 4503, with why:
/// never left on a WebSocket that would be deaf), and can join once Redis
/// is back — listed in its own member list at once, though the Redis that
/// came back empty lost this instance's liveness key until its next
/// heartbeat. (With a shared subscription, the room's subscription is
/// already down when the new client arrives.)
fn joining_while_redis_is_down_gets_503(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, args);
    let mut alice = server.client("alice");
    alice.settle();
    let port = redis.kill();
    assert!(alice.recv_server("notice").contains("lost the chat relay"));

    match crate::support::Client::try_connect(server.addr, "bob") {
        Err(refused) => assert_eq!(refused.status, 503, "{refused}"),
        Ok(_) => panic!("bob got a WebSocket while Redis was down"),
    }
    // Counted and summed up with the others refused while Redis is away,
    // not an error line each.
    let refused = r#"threadchat_connections_refused_total{reason="relay_down"}"#;
    assert_eq!(server.metric(refused), 1);
    let line = server.wait_for_log("chat relay unavailable");
    assert!(line.contains("refused 127.0.0.1:"), "{line}");
    assert_eq!(server.log_count("ERROR"), 0);

    let _redis = Redis::start_on(port);
    assert!(alice.recv_notice().contains("reconnected"));
    let mut bob = server.client("bob");
    let presence = bob.recv_type("presence");
    assert!(
        presence["members"]
            .as_array()
            .unwrap()
            .contains(&"bob".into()),
        "{presence}"
    );
    alice.send("welcome, bob");
    assert_eq!(bob.recv_chat(), ("alice".into(), "welcome, bob".into()));
}
