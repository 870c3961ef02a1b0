//! Joining and leaving: log lines, and every thread and Redis connection a
//! client used is released when it goes, however it goes.

use std::time::Duration;

use crate::support::{Closed, Redis, Server, eventually, in_both_subscription_modes};

in_both_subscription_modes!(sigterm_closes_every_client_with_1001_and_exits_0);

/// Connects `n` clients, lets them chat, then ends them with `leave`, and
/// checks that threads and Redis connections return to their baselines.
fn leaving_releases_everything(leave: fn(crate::support::Client)) {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    // One throwaway connection first: let lazily started things (publisher
    // connections) settle into the baseline.
    let mut warm = server.client("warm");
    warm.send("warming up");
    warm.close();
    server.wait_for_log("warm left");
    eventually("warm's threads gone", || {
        server.thread_count() == base_threads(&server)
    });
    let threads = server.thread_count();
    let redis_clients = redis.client_count();

    let mut clients: Vec<_> = (0..5).map(|i| server.client(&format!("u{i}"))).collect();
    clients[0].send("hello");
    for c in &mut clients[1..] {
        c.recv_chat();
    }
    // Each connection's start thread ends a moment after handing the
    // connection to its reader thread.
    eventually("two threads per client", || {
        server.thread_count() == threads + 2 * 5
    });
    assert_eq!(
        redis.client_count(),
        redis_clients + 5,
        "one subscription each"
    );

    for c in clients {
        leave(c);
    }
    eventually("threads back to baseline", || {
        server.thread_count() == threads
    });
    eventually("Redis connections back to baseline", || {
        redis.client_count() == redis_clients
    });
    eventually("nobody subscribed", || {
        redis.subscribers("global_room") == 0
    });
}

/// Threads of an idle Redis-relayed server with no clients: main, signals,
/// announcer, heartbeat, 2 publishers, 2 query threads, the idle rooms'
/// keeper.
fn base_threads(_server: &Server) -> usize {
    9
}

#[test]
fn a_clean_close_releases_threads_and_redis_connections() {
    leaving_releases_everything(|c| c.close());
}

#[test]
fn a_dropped_connection_releases_threads_and_redis_connections() {
    leaving_releases_everything(|c| c.drop_abruptly());
}

/// Subscriber threads run under `SCHED_BATCH`, so that waking a room's
/// subscribers is not slowed down by each of them preempting the waker
/// (src/session/sched.rs); every other thread keeps the default policy.
#[test]
fn subscriber_threads_wait_their_turn_when_woken() {
    let server = Server::start(&["--in-process"]);
    let mut alice = server.client("alice");
    alice.settle();
    // A new thread names itself, then sets its policy: wait for both.
    let subscribers = |policies: &[(String, u32)]| -> Vec<u32> {
        policies
            .iter()
            .filter(|(name, _)| name.starts_with("tc-sub-"))
            .map(|(_, policy)| *policy)
            .collect()
    };
    eventually("one subscriber thread, under SCHED_BATCH", || {
        subscribers(&server.thread_policies()) == [3]
    });
    let policies = server.thread_policies();
    assert!(
        policies
            .iter()
            .filter(|(name, _)| !name.starts_with("tc-sub-"))
            .all(|(_, policy)| *policy == 0),
        "{policies:?}"
    );
}

#[test]
fn a_client_is_served_by_a_reader_and_a_subscriber_once_started() {
    let server = Server::start(&["--in-process"]);
    let mut alice = server.client("alice");
    alice.settle();
    let names = || -> Vec<String> {
        let policies = server.thread_policies();
        policies.into_iter().map(|(name, _)| name).collect()
    };
    // The start thread did the start, handed the connection to a reader
    // thread, and ended (and the accept loop joined it). Asked as one
    // question: a thread's name shows in /proc only once the thread has
    // set it, so two looks in a row may disagree.
    eventually("one reader, one subscriber, no start thread", || {
        let names = names();
        let count = |prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
        (count("tc-start-"), count("tc-read-"), count("tc-sub-")) == (0, 1, 1)
    });
}

#[test]
fn joins_and_leaves_are_logged_with_the_reason() {
    let server = Server::in_process();
    let alice = server.client("alice");
    let joined = server.wait_for_log("alice joined global_room from 127.0.0.1:");
    assert!(joined.contains("[INFO]"), "{joined}");
    alice.close();
    let left = server.wait_for_log("alice left");
    assert!(left.contains("closed by the client (1000)"), "{left}");

    let bob = server.client("bob");
    bob.drop_abruptly();
    let left = server.wait_for_log("bob left");
    assert!(left.contains("connection lost"), "{left}");
}

#[test]
fn nothing_is_logged_per_message_at_info() {
    let server = Server::start(&["--in-process", "--log-level", "info"]);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    for i in 0..20 {
        alice.send(&format!("secret {i}"));
        bob.recv_chat();
    }
    assert_eq!(server.log_count("secret"), 0);
}

/// SIGTERM: every client is told in words that the server is going away,
/// then gets close 1001, and the process exits 0. (With shared
/// subscriptions, rooms' listener threads, the announcer and the publishers all
/// have to wind down in order.)
fn sigterm_closes_every_client_with_1001_and_exits_0(args: &[&str]) {
    let redis = Redis::start();
    let mut server = Server::with_redis_and(&redis, args);
    let mut clients: Vec<_> = (0..5).map(|i| server.client(&format!("u{i}"))).collect();
    for c in &mut clients {
        c.settle();
    }
    let mut terminal = crate::support::Client::connect_path(server.addr, "/chat/t?format=text");
    while !terminal.recv_text().starts_with("* in global_room") {}
    // One half-open connection that never finishes its HTTP request.
    let _lurker = std::net::TcpStream::connect(server.addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server.signal("TERM");
    for c in &mut clients {
        assert!(c.recv_server("notice").contains("server is shutting down"));
        assert_eq!(
            c.recv_close(),
            Closed::Frame(1001, "server shutting down".into())
        );
    }
    loop {
        let line = terminal.recv_text();
        if line.starts_with("* the server is shutting down") {
            break;
        }
        assert!(line.starts_with("* "), "{line}");
    }
    assert_eq!(
        terminal.recv_close(),
        Closed::Frame(1001, "server shutting down".into())
    );
    assert_eq!(server.wait_exit(), Some(0));
    eventually("Redis connections released", || redis.client_count() == 0);
}
