//! `rediss://`: threadchat relaying through a Redis that speaks only TLS
//! (`--port 0 --tls-port P`), with certificates the test makes — one
//! server, Sentinel and Cluster — and what it says when TLS goes wrong: a
//! certificate authority it does not trust, an expired certificate, a
//! client certificate Redis wants and was not given, a port that speaks
//! plain Redis, a port that never answers.

use std::net::TcpListener;

use crate::support::{Certs, Client, Redis, Server, in_both_subscription_modes, place_of};
#[cfg(feature = "redis-ha")]
use crate::support::{Cluster, Sentinels};

in_both_subscription_modes!(
    clients_chat_over_tls,
    a_redis_restart_is_survived_over_tls,
    a_client_that_comes_back_gets_what_it_missed_over_tls,
);

/// `--redis rediss://…` and `--redis-ca`, with more server arguments.
fn server_on(redis: &Redis, certs: &Certs, args: &[&str]) -> Server {
    let (url, ca) = (redis.url(), certs.ca());
    let mut all = vec!["--redis", &url, "--redis-ca", &ca];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// Two clients chat through a TLS-only Redis: every connection threadchat
/// makes (publishers, queries, subscriptions) speaks TLS, or nothing would
/// arrive.
fn clients_chat_over_tls(args: &[&str]) {
    let certs = Certs::new();
    let redis = Redis::start_tls(&certs, &[]);
    let server = server_on(&redis, &certs, args);
    assert!(
        server
            .wait_for_log("relay: Redis at rediss://")
            .contains(&redis.url())
    );
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("hello over TLS");
    assert_eq!(bob.recv_chat(), ("alice".into(), "hello over TLS".into()));
    bob.send("and back");
    assert_eq!(alice.recv_chat(), ("bob".into(), "and back".into()));
    // The history a newcomer gets is read over TLS too.
    let mut carol = server.client("carol");
    let history: Vec<_> = carol
        .recv_history()
        .iter()
        .map(|frame| frame["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        history.contains(&"hello over TLS".to_owned()),
        "{history:?}"
    );
}

/// Redis restarts on the same TLS port: the subscriptions make new TLS
/// sessions, the clients are told the relay was lost and is back, and the
/// chat goes on.
fn a_redis_restart_is_survived_over_tls(args: &[&str]) {
    let certs = Certs::new();
    let redis = Redis::start_tls(&certs, &[]);
    let server = server_on(&redis, &certs, args);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("before");
    assert_eq!(bob.recv_chat().1, "before");

    let port = redis.kill();
    assert!(alice.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("lost the chat relay"));
    let _redis = Redis::start_tls_on(port, certs.dir(), &[]);
    assert!(alice.recv_notice().contains("reconnected"));
    assert!(bob.recv_notice().contains("reconnected"));
    alice.send("after");
    // Messages sent while Redis was down may be refused first (see
    // `faults.rs`): "after" is what must arrive.
    while bob.recv_chat().1 != "after" {}
    bob.send("welcome back");
    assert_eq!(alice.recv_chat(), ("bob".into(), "welcome back".into()));
}

/// A client that comes back with its place gets, from the room's log over
/// TLS, what was said while it was away.
fn a_client_that_comes_back_gets_what_it_missed_over_tls(args: &[&str]) {
    let certs = Certs::new();
    let redis = Redis::start_tls(&certs, &[]);
    let server = server_on(&redis, &certs, args);
    let mut alice = server.settled("alice");
    let mut witness = server.settled("witness");
    let mut away = server.settled("away");
    alice.send("before");
    let place = place_of(&away.recv_live());
    away.close();
    for i in 0..20 {
        alice.send(&format!("missed {i}"));
    }
    // All logged before `away` comes back: what it gets is recovered.
    for i in 0..20 {
        while witness.recv_chat().1 != format!("missed {i}") {}
    }
    let mut back = Client::resume(server.addr, "away", "", &place);
    let (chats, recovery) = back.recovered();
    assert_eq!(recovery["complete"], true, "{recovery}");
    let missed: Vec<String> = chats.into_iter().map(|(_, message)| message).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("missed {i}")).collect();
    assert_eq!(missed, expected);
}

/// A Redis that asks every client for a certificate: threadchat shows the
/// one `--redis-cert`/`--redis-key` (here their variables) name, and chats; without them, it
/// fails at start with one line that says TLS was refused.
#[test]
fn a_client_certificate_redis_requires_is_shown() {
    let certs = Certs::new();
    let redis = Redis::start_tls(&certs, &["--tls-auth-clients", "yes"]);
    let (url, ca) = (redis.url(), certs.ca());
    let (cert, key) = (certs.path("client.pem"), certs.path("client.key"));
    // Given through the environment, as any option may be.
    let server = Server::start_with_env(
        &["--redis", &url],
        &[
            ("THREADCHAT_REDIS_CA", ca.as_str()),
            ("THREADCHAT_REDIS_CERT", cert.as_str()),
            ("THREADCHAT_REDIS_KEY", key.as_str()),
        ],
    );
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("shown and trusted");
    assert_eq!(bob.recv_chat().1, "shown and trusted");

    Server::fails_to_start(
        &["--redis", &url, "--redis-ca", &ca],
        "CertificateRequired (Redis asks for a client certificate: give --redis-cert and --redis-key)",
    );
}

/// A Redis whose certificate was signed by a CA threadchat does not trust:
/// one line at start naming the reason, not a hang and not a start.
#[test]
fn a_certificate_from_an_untrusted_authority_is_refused_at_start() {
    let (certs, strangers) = (Certs::new(), Certs::new());
    let redis = Redis::start_tls(&certs, &[]);
    let url = redis.url();
    Server::fails_to_start(
        &["--redis", &url, "--redis-ca", &strangers.ca()],
        "invalid peer certificate",
    );
    // Without --redis-ca, the system's authorities do not know it either.
    Server::fails_to_start(&["--redis", &url], "invalid peer certificate");
}

/// An expired Redis certificate is refused, and said to be expired.
#[test]
fn an_expired_redis_certificate_is_refused_at_start() {
    let certs = Certs::new();
    // TLS with the expired certificate on one port, and plain TCP on
    // another, where the test's own helpers check that it is up.
    let tls_port = Redis::fresh_port().to_string();
    let (cert, key, ca) = (
        certs.path("expired.pem"),
        certs.path("expired.key"),
        certs.ca(),
    );
    let _redis = Redis::start_with(
        Redis::fresh_port(),
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://127.0.0.1:{tls_port}");
    Server::fails_to_start(&["--redis", &url, "--redis-ca", &ca], "certificate expired");
}

/// A plain Redis on the port `rediss://` names: it waits for the end of
/// a command line that the TLS hello never brings, and answers nothing.
/// The handshake is bounded by the connect timeout, and the error says
/// what was expected.
#[test]
fn a_plain_redis_on_the_tls_port_is_refused_at_start() {
    let certs = Certs::new();
    let redis = Redis::start();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    Server::fails_to_start(
        &["--redis", &url, "--redis-ca", &certs.ca()],
        "is it a TLS port?",
    );
}

/// A port that accepts connections and never says a word: the TLS
/// handshake is bounded by the connect timeout, and the start fails.
#[test]
fn a_port_that_never_answers_the_handshake_is_refused_at_start() {
    let certs = Certs::new();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("rediss://127.0.0.1:{}", silent.local_addr().unwrap().port());
    Server::fails_to_start(
        &["--redis", &url, "--redis-ca", &certs.ca()],
        "is it a TLS port?",
    );
    drop(silent);
}

/// The TLS options are checked at start, each mistake one line.
#[test]
fn tls_options_are_checked_at_start() {
    let certs = Certs::new();
    let (ca, cert, key) = (
        certs.ca(),
        certs.path("client.pem"),
        certs.path("client.key"),
    );
    let url = "rediss://127.0.0.1:1";
    Server::fails_to_start(
        &["--redis", url, "--redis-ca", &ca, "--redis-cert", &cert],
        "--redis-cert and --redis-key go together",
    );
    Server::fails_to_start(
        &["--redis", url, "--redis-ca", "/nonexistent/ca.pem"],
        "cannot read /nonexistent/ca.pem",
    );
    // A key, where certificates are expected.
    Server::fails_to_start(&["--redis", url, "--redis-ca", &key], "holds no PEM");
    let other = certs.path("other.key");
    Server::fails_to_start(
        &[
            "--redis",
            url,
            "--redis-ca",
            &ca,
            "--redis-cert",
            &cert,
            "--redis-key",
            &other,
        ],
        "does not go with --redis-cert",
    );
    Server::fails_to_start(
        &["--redis", "redis://127.0.0.1:1", "--redis-ca", &ca],
        "are for Redis over TLS",
    );
    Server::fails_to_start(
        &[
            "--redis",
            "rediss://127.0.0.1:1/#insecure",
            "--redis-ca",
            &ca,
        ],
        "not supported",
    );
}

/// Sentinels and their master and replica all speak only TLS: threadchat
/// asks the sentinels over TLS, chats through the master over TLS, and
/// follows a failover (the watcher listens to the sentinels over TLS).
#[test]
#[cfg(feature = "redis-ha")]
fn sentinel_over_tls_chats_and_follows_a_failover() {
    let certs = Certs::new();
    let mut setup = Sentinels::start_tls(&certs);
    let server = Server::on_redis(&setup.url(), &["--redis-ca", &certs.ca()]);
    assert!(
        server
            .wait_for_log("relay: Redis Sentinel")
            .contains(", over TLS")
    );
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    alice.send("through the master");
    assert_eq!(bob.recv_chat().1, "through the master");

    let old = setup.kill_master();
    assert!(alice.recv_notice().contains("lost the chat relay"));
    let new = setup.wait_for_new_master(old);
    assert!(alice.recv_notice().contains("reconnected"));
    assert!(bob.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("reconnected"));
    alice.send("after the failover");
    while bob.recv_chat().1 != "after the failover" {}
    assert_ne!(new, old);
}

/// A Redis Cluster whose nodes speak only TLS: rooms on different masters
/// each carry their chat (the nodes after the seeds, named by `CLUSTER
/// SLOTS`, are reached over TLS too).
#[test]
#[cfg(feature = "redis-ha")]
fn cluster_over_tls_chats_in_rooms_on_every_master() {
    let certs = Certs::new();
    let cluster = Cluster::start_tls(&certs);
    let server = Server::on_redis(&cluster.url(), &["--redis-ca", &certs.ca()]);
    assert!(
        server
            .wait_for_log("relay: Redis Cluster: 3 master(s)")
            .contains(", over TLS")
    );
    for room in cluster.a_room_on_each_master() {
        let mut alice = Client::connect_path(server.addr, &format!("/chat/alice?room={room}"));
        alice.settle();
        let mut bob = Client::connect_path(server.addr, &format!("/chat/bob?room={room}"));
        bob.settle();
        alice.send(&format!("hello in {room}"));
        assert_eq!(bob.recv_chat().1, format!("hello in {room}"));
    }
}

/// A failover that keeps the old master alive (demoted by the sentinels)
/// is heard by the watcher, which listens to the sentinels over TLS, and
/// every subscription moves to the new master.
#[test]
#[cfg(feature = "redis-ha")]
fn sentinel_over_tls_watcher_hears_a_demotion() {
    let certs = Certs::new();
    let setup = Sentinels::start_tls(&certs);
    let server = Server::on_redis(&setup.url(), &["--redis-ca", &certs.ca()]);
    let mut alice = server.settled("alice");
    let mut bob = server.settled("bob");
    let old = setup.master_port();
    setup.fail_over();
    let new = setup.wait_for_new_master(old);
    let moved = server.wait_for_log("Redis Sentinel: master \"chat\" moved");
    assert!(moved.contains(&format!(":{new}")), "{moved}");
    assert!(bob.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("reconnected"));
    // Published to the new master and delivered (messages refused by the
    // old one, if any, were reported to their sender).
    let delivered = (0..20).any(|i| {
        alice.send(&format!("on {new}, try {i}"));
        bob.recv_live_within(std::time::Duration::from_millis(500))
            .is_some_and(|frame| frame["type"] == "chat")
    });
    assert!(delivered, "no message got through after the failover");
}

/// A room's slot moved to another master of a TLS cluster (a resharding):
/// the publishers follow `MOVED`, the subscriptions the pushed
/// `sunsubscribe`, both to a node they reach over TLS, and the chat goes
/// on.
#[test]
#[cfg(feature = "redis-ha")]
fn cluster_over_tls_follows_a_moved_room() {
    let certs = Certs::new();
    let cluster = Cluster::start_tls(&certs);
    let server = Server::on_redis(&cluster.url(), &["--redis-ca", &certs.ca()]);
    let room = &cluster.a_room_on_each_master()[0];
    let join = |nickname: &str| {
        let mut client =
            Client::connect_path(server.addr, &format!("/chat/{nickname}?room={room}"));
        client.settle();
        client
    };
    let (mut alice, mut bob) = (join("alice"), join("bob"));
    alice.send("before the move");
    assert_eq!(bob.recv_chat().1, "before the move");

    let slot = cluster.slot(&crate::support::room_channel(room));
    let old = cluster.master_of(slot);
    let new = cluster.masters().into_iter().find(|m| *m != old).unwrap();
    cluster.migrate(slot, new, || {});
    assert!(bob.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("reconnected"));
    alice.send("after the move");
    while bob.recv_chat().1 != "after the move" {}
    assert_eq!(
        cluster.shard_subscribers(new, &crate::support::room_channel(room)),
        2
    );
}
