//! Redis Sentinel: threadchat asks the sentinels for the master, and
//! follows a failover — the master killed, or demoted by the sentinels —
//! with the same notices as a Redis restart, in both subscription modes.

use std::time::Duration;

use crate::support::{Client, Sentinels, Server, free_port, in_both_subscription_modes, place_of};

in_both_subscription_modes!(
    clients_chat_through_the_master_the_sentinels_name,
    a_killed_master_is_followed_to_its_promoted_replica,
    a_master_demoted_by_the_sentinels_is_left_for_the_new_one,
);

/// Two settled clients.
fn alice_and_bob(server: &Server) -> (Client, Client) {
    (server.settled("alice"), server.settled("bob"))
}

/// The start-up log says which topology was found, and where the master is.
fn clients_chat_through_the_master_the_sentinels_name(args: &[&str]) {
    let setup = Sentinels::start();
    let server = Server::on_redis(&setup.url(), args);
    let line = server.wait_for_log("relay: Redis Sentinel");
    assert!(
        line.contains(&format!(
            "master \"chat\" at 127.0.0.1:{}",
            setup.master_port()
        )),
        "{line}"
    );
    let (mut alice, mut bob) = alice_and_bob(&server);
    alice.send("hello through the master");
    assert_eq!(bob.recv_chat().1, "hello through the master");
}

/// The master dies: the sentinels promote its replica, and every client is
/// told the relay was lost, then restored, and chats again.
fn a_killed_master_is_followed_to_its_promoted_replica(args: &[&str]) {
    let mut setup = Sentinels::start();
    let server = Server::on_redis(&setup.url(), args);
    let (mut alice, mut bob) = alice_and_bob(&server);
    alice.send("before");
    assert_eq!(bob.recv_chat().1, "before");
    let threads = server.steady_thread_count();

    let old = setup.kill_master();
    assert!(alice.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("lost the chat relay"));
    let new = setup.wait_for_new_master(old);
    assert!(alice.recv_notice().contains("reconnected"));
    assert!(bob.recv_notice().contains("reconnected"));
    alice.send("after the failover");
    assert_eq!(bob.recv_chat().1, "after the failover");
    bob.send("on the new master");
    assert_eq!(alice.recv_chat().1, "on the new master");
    assert_ne!(new, old);
    crate::support::eventually("no thread leaked", || {
        server.steady_thread_count() == threads
    });
}

/// A failover that keeps the old master alive, as a replica: the sentinels
/// close its clients, and threadchat goes to the new master (a write to
/// the old one would be refused: it is read-only now). The room's log is
/// found under another Redis, and takes a new epoch; a client that comes
/// back with a place of the old one still gets everything after it.
fn a_master_demoted_by_the_sentinels_is_left_for_the_new_one(args: &[&str]) {
    let setup = Sentinels::start();
    let server = Server::on_redis(&setup.url(), args);
    let (mut alice, mut bob) = alice_and_bob(&server);
    let old = setup.master_port();
    alice.send("before the failover");
    let before = bob.recv_live();
    let place = place_of(&before);

    setup.fail_over();
    let new = setup.wait_for_new_master(old);
    let moved = server.wait_for_log("Redis Sentinel: master \"chat\" moved");
    assert!(moved.contains(&format!(":{new}")), "{moved}");
    assert!(alice.recv_notice().contains("lost the chat relay"));
    assert!(alice.recv_notice().contains("reconnected"));
    assert!(bob.recv_notice().contains("lost the chat relay"));
    assert!(bob.recv_notice().contains("reconnected"));
    // Published to the new master and delivered (messages refused by the
    // old one, if any, were reported to their sender).
    let delivered = (0..20).any(|i| {
        alice.send(&format!("on {new}, try {i}"));
        bob.recv_live_within(Duration::from_millis(500))
            .is_some_and(|frame| frame["type"] == "chat")
    });
    assert!(delivered, "no message got through after the failover");

    let mut carol = Client::resume(server.addr, "carol", "", &place);
    let (chats, recovery) = carol.recovered();
    let got: Vec<&str> = chats.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(recovery["complete"], true, "{recovery}");
    assert_ne!(recovery["epoch"], place.1.as_str(), "a new epoch");
    assert!(
        got.iter().any(|m| m.starts_with(&format!("on {new}"))),
        "{got:?}"
    );
    assert!(!got.contains(&"before the failover"), "{got:?}");
}

/// A Sentinel URL whose master nobody knows, or whose sentinels do not
/// answer, is one clear error at start.
#[test]
fn a_wrong_sentinel_setup_is_one_clear_error_at_start() {
    let setup = Sentinels::start();
    let unknown = setup.url().replace("/chat", "/nosuchmaster");
    let nobody = format!("redis+sentinel://127.0.0.1:{}/chat", free_port());
    for (url, expected) in [
        (unknown.as_str(), "does not know this master"),
        (nobody.as_str(), "no sentinel named a master"),
        ("redis+sentinel://127.0.0.1:1", "names the master"),
    ] {
        Server::fails_on_redis(url, expected);
    }
}
