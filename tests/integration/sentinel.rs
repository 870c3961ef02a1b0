//! Redis Sentinel: threadchat asks the sentinels for the master, and
//! follows a failover — the master killed, or demoted by the sentinels —
//! with the same notices as a Redis restart, in both subscription modes.
//! Its log tells an operator each outage once, in lines read at a glance.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::{Client, Sentinels, Server, free_port, in_both_subscription_modes, place_of};

in_both_subscription_modes!(
    clients_chat_through_the_master_the_sentinels_name,
    a_killed_master_is_followed_to_its_promoted_replica,
    a_master_demoted_by_the_sentinels_is_left_for_the_new_one,
    a_failover_is_told_once_in_the_log,
    sentinels_away_refuse_nobody_and_are_told_once,
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
///
/// The log tells it as one outage, as [`a_failover_is_told_once_in_the_log`]
/// checks for a demotion.
fn a_killed_master_is_followed_to_its_promoted_replica(args: &[&str]) {
    let mut setup = Sentinels::start();
    let args = at_info(args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::on_redis(&setup.url(), &args);
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
    let subscriptions = if args.contains(&"shared") { 1 } else { 2 };
    let back = server.wait_for_log("the chat relay is back after");
    assert!(
        back.ends_with(&format!(": {subscriptions} subscription(s) restored")),
        "{back}"
    );
    told_as_one_outage(&server);
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

/// Clients chatting through a failover in the log test: more than the
/// warnings it allows, so that a line per client would fail it.
const CLIENTS: usize = 8;

/// Most warnings one failover may log, whatever the number of clients:
/// the loss, the move, messages Redis lost (said by one listener), a
/// failed publish batch and a missed heartbeat (each summed up, once per
/// 10 s).
const FAILOVER_WARNINGS: usize = 5;

/// Longest line an operator meets in the log, time and level included.
const LONGEST_LINE: usize = 200;

/// The server's log at the operator's level (`info`), for log tests.
fn at_info(args: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    args.extend(["--log-level".into(), "info".into()]);
    args
}

/// The server's warnings so far, after checking that every line is short
/// and that no error and no warning was logged twice.
fn warnings_of(server: &Server) -> Vec<String> {
    let lines = server.log_lines();
    for line in &lines {
        let chars = line.chars().count();
        assert!(
            chars <= LONGEST_LINE,
            "a line of {chars} characters: {line}"
        );
        assert!(!line.contains("[ERROR]"), "{line}");
    }
    let warnings: Vec<String> = lines
        .into_iter()
        .filter(|line| line.contains("[WARN]"))
        .collect();
    // The same words twice: said once per client, not once per outage.
    let said: HashSet<&str> = warnings
        .iter()
        .map(|line| {
            line.split_once(" [WARN] ")
                .map_or(line.as_str(), |(_, text)| text)
        })
        .collect();
    assert_eq!(said.len(), warnings.len(), "{warnings:#?}");
    warnings
}

/// The log tells a failover as one outage: one "lost" line, one "back"
/// line, and no more warnings than [`FAILOVER_WARNINGS`] (each short, none
/// twice).
fn told_as_one_outage(server: &Server) {
    assert_eq!(server.log_count("lost the chat relay"), 1);
    assert_eq!(server.log_count("is back after"), 1);
    let warnings = warnings_of(server);
    assert!(warnings.len() <= FAILOVER_WARNINGS, "{warnings:#?}");
}

/// A failover while clients chat is one outage in the log: one "lost"
/// line and one "back" line that counts every subscription restored (one
/// per client, or the room's one with shared subscriptions), a handful of
/// warnings however many clients there are, none of them long.
fn a_failover_is_told_once_in_the_log(args: &[&str]) {
    let setup = Sentinels::start();
    let args = at_info(args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::on_redis(&setup.url(), &args);
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| server.settled(&format!("user{i}")))
        .collect();
    clients[0].send("before the failover");
    for client in &mut clients[1..] {
        assert_eq!(client.recv_chat().1, "before the failover");
    }

    let old = setup.master_port();
    setup.fail_over();
    setup.wait_for_new_master(old);
    for client in &mut clients {
        assert!(client.recv_notice().contains("lost the chat relay"));
        assert!(client.recv_notice().contains("reconnected"));
    }
    clients[1].send("after the failover");
    assert_eq!(clients[0].recv_chat().1, "after the failover");

    let back = server.wait_for_log("the chat relay is back after");
    let subscriptions = if args.contains(&"shared") { 1 } else { CLIENTS };
    assert!(
        back.ends_with(&format!(": {subscriptions} subscription(s) restored")),
        "{back}"
    );
    let lost = server.wait_for_log("lost the chat relay");
    assert!(
        lost.contains(&format!("(Redis at 127.0.0.1:{old})")),
        "{lost}"
    );
    told_as_one_outage(&server);
}

/// Every sentinel away while the master runs on: nobody is refused (a
/// newcomer's room is subscribed to on the master named last, which says
/// it still is one), and the log says once that a failover would go
/// unnoticed, and once that a sentinel is heard again; the chat relay was
/// never lost.
fn sentinels_away_refuse_nobody_and_are_told_once(args: &[&str]) {
    let mut setup = Sentinels::start();
    let args = at_info(args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::on_redis(&setup.url(), &args);
    let _alice = server.settled("alice");

    setup.kill_sentinels();
    server.wait_for_log("no sentinel of \"chat\" answers");
    // A room nobody is in yet: a subscription of its own in both modes,
    // made after the sentinels' answer has gone stale.
    let (mut bob, mut carol) = (
        server.settled("bob?room=lobby"),
        server.settled("carol?room=lobby"),
    );
    bob.send("the master is fine");
    assert_eq!(carol.recv_chat().1, "the master is fine");

    setup.restart_sentinels();
    server.wait_for_log("Redis Sentinel: listening to ");
    let mut dave = server.settled("dave?room=lobby");
    dave.send("and with the sentinels back");
    assert_eq!(carol.recv_chat().1, "and with the sentinels back");

    assert_eq!(server.log_count("no sentinel of"), 1);
    assert_eq!(server.log_count("Redis Sentinel: listening to "), 1);
    assert_eq!(server.log_count("lost the chat relay"), 0);
    assert_eq!(warnings_of(&server).len(), 1);
}

/// Every sentinel frozen (taking connections, answering nothing, as behind
/// a network that drops packets) while the master runs on: nobody is
/// refused either. Newcomers join rooms of their own and chat, again once
/// the sentinels' last answer has gone stale. (Each such join waits for
/// every sentinel's timeout: about 3 s with three, printed.)
#[test]
fn frozen_sentinels_refuse_nobody() {
    let setup = Sentinels::start();
    let server = Server::on_redis(&setup.url(), &[]);
    let (mut alice, mut bob) = alice_and_bob(&server);
    setup.freeze_sentinels(true);
    for round in 0..2 {
        // Past FRESH_FOR: the sentinels are asked again.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let asked = std::time::Instant::now();
        let (mut carol, mut dave) = (
            server.settled(&format!("carol?room=frozen{round}")),
            server.settled(&format!("dave?room=frozen{round}")),
        );
        eprintln!("round {round}: two joins in {:?}", asked.elapsed());
        alice.send(&format!("round {round}"));
        assert_eq!(bob.recv_chat().1, format!("round {round}"));
        carol.send("the master is fine");
        assert_eq!(dave.recv_chat().1, "the master is fine");
    }
    setup.freeze_sentinels(false);
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
        (nobody.as_str(), "no master found"),
        ("redis+sentinel://127.0.0.1:1", "names the master"),
    ] {
        Server::fails_on_redis(url, expected);
    }
}
