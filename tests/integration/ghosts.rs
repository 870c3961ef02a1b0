//! No ghosts: a client who leaves while Redis cannot hear it (stalled,
//! down, failing over) is announced as gone, leaves `/members` and gives
//! its nickname back once Redis is there again — within one heartbeat —
//! and the heartbeat puts right this instance's entries in a room's member
//! list and claimed nicknames, whatever happened to them.

use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::Message;

#[cfg(feature = "redis-ha")]
use crate::support::Sentinels;
use crate::support::{Client, Redis, Server, eventually, free_port, in_both_subscription_modes};

in_both_subscription_modes!(
    a_leave_while_redis_is_stalled_is_announced_once_it_answers,
    a_leave_while_redis_is_down_is_sent_again,
    the_heartbeat_puts_this_instances_entries_right,
);
#[cfg(feature = "redis-ha")]
in_both_subscription_modes!(a_leave_during_a_sentinel_failover_is_announced_after_it);

/// Longer than a Redis outage and a heartbeat (10 s) after it.
const OUTAGE_PATIENCE: Duration = Duration::from_secs(60);

/// A client of `lobby`, past its history and presence.
fn settled(server: &Server, nickname: &str) -> Client {
    let mut client = Client::connect_path(server.addr, &format!("/chat/{nickname}?room=lobby"));
    client.settle();
    client
}

/// The next leave `client` hears, waiting up to [`OUTAGE_PATIENCE`] (the
/// server's pings do not make it wait longer).
fn next_leave(client: &mut Client) -> Value {
    let deadline = Instant::now() + OUTAGE_PATIENCE;
    let leave = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no leave within {OUTAGE_PATIENCE:?}");
        client.ws.get_ref().set_read_timeout(Some(left)).unwrap();
        match client.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                if frame["type"] == "leave" {
                    break frame;
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("no leave: {e}"),
        }
    };
    client
        .ws
        .get_ref()
        .set_read_timeout(Some(crate::support::PATIENCE))
        .unwrap();
    leave
}

/// The nicknames in `lobby` as `/members` tells them.
fn members(server: &Server) -> Vec<String> {
    let (status, body) = server.get("/members?room=lobby");
    assert!(status.contains("200"), "{status} {body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

/// A metric's value, from `/metrics`.
fn metric(server: &Server, name: &str) -> u64 {
    let (_, body) = server.get("/metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// A client that joined `lobby` as `nickname`, or `None` if the name is
/// taken (`409`).
fn take(server: &Server, nickname: &str) -> Option<Client> {
    match Client::try_connect_path(server.addr, &format!("/chat/{nickname}?room=lobby")) {
        Ok(client) => Some(client),
        Err(refused) if refused.status == 409 => None,
        Err(refused) => panic!("joining as {nickname}: {refused}"),
    }
}

/// What a user sees once Redis is back after bob left unheard: alice hears
/// bob's leave (once), `/members` has alice only, and a new client can be
/// `bob`.
fn bob_is_gone(server: &Server, alice: &mut Client) {
    let leave = next_leave(alice);
    assert_eq!(leave["nickname"], "bob", "{leave}");
    let heard = Instant::now();
    eventually("/members without bob", || members(server) == ["alice"]);
    let mut new_bob = None;
    eventually("the name bob free again", || {
        new_bob = take(server, "bob");
        new_bob.is_some()
    });
    // Once: another heartbeat (the retried leave and the reconciliation
    // both had their chance) brings no second leave before a marker.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(heard.elapsed()));
    let mut carol = settled(server, "carol");
    carol.send("marker");
    loop {
        let frame = alice.recv();
        assert_ne!(frame["type"], "leave", "a second leave: {frame}");
        if frame["type"] == "chat" && frame["message"] == "marker" {
            break;
        }
    }
}

/// Redis frozen (SIGSTOP) for 15 s while bob leaves: once it answers
/// again, within one heartbeat, his leave is announced, `/members` is
/// right and his name is free (`--unique-nicknames`).
fn a_leave_while_redis_is_stalled_is_announced_once_it_answers(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &[args, &["--unique-nicknames"]].concat());
    let mut alice = settled(&server, "alice");
    let bob = settled(&server, "bob");
    assert!(take(&server, "bob").is_none());
    redis.pause();
    bob.drop_abruptly();
    std::thread::sleep(Duration::from_secs(15));
    redis.resume();
    bob_is_gone(&server, &mut alice);
}

/// Redis killed while bob leaves, and started again from its append-only
/// file: bob's leave and his name's release failed outright; both are sent
/// again once Redis answers, and counted.
fn a_leave_while_redis_is_down_is_sent_again(args: &[&str]) {
    let persistent = ["--appendonly", "yes", "--appendfsync", "always"];
    let port = free_port();
    let _ = std::fs::remove_dir_all(Redis::dir(port));
    let redis = Redis::start_with(port, &persistent);
    let server = Server::with_redis_and(&redis, &[args, &["--unique-nicknames"]].concat());
    let mut alice = settled(&server, "alice");
    let bob = settled(&server, "bob");
    let port = redis.kill();
    bob.drop_abruptly();
    std::thread::sleep(Duration::from_secs(3));
    let _redis = Redis::start_with(port, &persistent);
    bob_is_gone(&server, &mut alice);
    assert!(metric(&server, "threadchat_member_changes_retried_total") >= 1);
}

/// Entries of this instance that no connection backs (a member, a claimed
/// name) are removed — the member's leave announced — and a live
/// connection's entry that went missing is put back, silently; another
/// instance's entries are left alone.
fn the_heartbeat_puts_this_instances_entries_right(args: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &[args, &["--unique-nicknames"]].concat());
    let mut alice = settled(&server, "alice");
    let mut bob = settled(&server, "bob");
    // This instance's id, from a connection id it gave.
    let entries: std::collections::HashMap<String, String> =
        redis.query(&["HGETALL", "threadchat:{lobby}:members"]);
    let (bob_conn, _) = entries.iter().find(|(_, n)| *n == "bob").unwrap();
    let (instance, _) = bob_conn.rsplit_once('-').unwrap();
    let ghost = format!("{instance}-999999");
    let other = "00000000000000ff-1";
    redis.command(&[
        "SET",
        "threadchat:instance:00000000000000ff",
        "1",
        "EX",
        "60",
    ]);
    for (conn, name) in [(ghost.as_str(), "casper"), (other, "olga")] {
        redis.command(&["HSET", "threadchat:{lobby}:members", conn, name]);
        redis.command(&["HSET", "threadchat:{lobby}:nicknames", name, conn]);
    }
    let (alice_conn, _) = entries.iter().find(|(_, n)| *n == "alice").unwrap();
    redis.command(&["HDEL", "threadchat:{lobby}:members", alice_conn]);

    let leave = next_leave(&mut bob);
    assert_eq!(leave["nickname"], "casper", "{leave}");
    eventually("/members right", || {
        members(&server) == ["alice", "bob", "olga"]
    });
    let _casper = take(&server, "casper").expect("casper's name given back");
    assert!(
        take(&server, "olga").is_none(),
        "another instance's claim kept"
    );
    assert!(metric(&server, "threadchat_members_reconciled_total") >= 3);
    // Alice was put back without a word: the room never saw her leave.
    alice.send("still here");
    let frame = bob.recv_live();
    assert_eq!(frame["message"], "still here", "{frame}");
}

/// The master killed while bob leaves: once the sentinels have promoted
/// its replica, bob's leave is announced there, `/members` is right and
/// his name is free.
#[cfg(feature = "redis-ha")]
fn a_leave_during_a_sentinel_failover_is_announced_after_it(args: &[&str]) {
    let mut setup = Sentinels::start();
    let server = Server::on_redis(&setup.url(), &[args, &["--unique-nicknames"]].concat());
    let mut alice = settled(&server, "alice");
    let bob = settled(&server, "bob");
    // The member list and the claim reach the replica before the kill.
    std::thread::sleep(Duration::from_millis(500));
    let old = setup.kill_master();
    bob.drop_abruptly();
    setup.wait_for_new_master(old);
    bob_is_gone(&server, &mut alice);
}
