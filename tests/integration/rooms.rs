//! Rooms, join and leave notices, presence, history, the terminal format,
//! and the health endpoint.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Client, Redis, Server, eventually, with_both_brokers};

with_both_brokers!(tls:
    messages_never_cross_rooms,
    joins_and_leaves_are_announced_with_the_reason => ["--ping-interval", "0.2", "--idle-timeout", "0.5"],
    a_joiner_is_told_who_is_in_the_room,
    history_comes_first_then_live_messages,
    history_has_no_gap_and_no_duplicate_while_others_send => ["--rate-limit", "0"],
    the_text_format_is_for_people,
    a_join_storm_is_announced_once_per_person,
    a_big_join_storm_lists_some_and_counts_everyone,
    // More clients than one address may open by default.
    a_big_room_lists_some_names_and_counts_everyone => ["--max-connections-per-ip", "0"],
);

fn join(server: &Server, nickname: &str, room: &str) -> Client {
    server.client(&format!("{nickname}?room={room}"))
}

/// The next frame of one of the room-event types.
fn next_of(client: &mut Client, kind: &str) -> Value {
    loop {
        let frame = client.recv();
        if frame["type"] == kind {
            return frame;
        }
    }
}

fn messages_never_cross_rooms(server: &Server) {
    let mut lobby_a = join(server, "a", "lobby");
    let mut lobby_b = join(server, "b", "lobby");
    let mut kitchen = join(server, "c", "kitchen");
    let mut global = server.client("d");
    lobby_a.send("for the lobby");
    assert_eq!(lobby_b.recv_chat(), ("a".into(), "for the lobby".into()));
    kitchen.send("for the kitchen");
    global.send("for everyone in global_room");
    lobby_b.send("lobby again");
    assert_eq!(lobby_a.recv_chat(), ("b".into(), "lobby again".into()));
    kitchen.expect_nothing(Duration::from_millis(300));
    global.expect_nothing(Duration::from_millis(300));
    // The default room is the original's, also by name.
    let mut named_global = join(server, "e", "global_room");
    global.send("same room");
    assert_eq!(named_global.recv_chat().1, "same room");
}

fn joins_and_leaves_are_announced_with_the_reason(server: &Server) {
    let mut alice = join(server, "alice", "lobby");
    let bob = join(server, "bob", "lobby");
    let joined = next_of(&mut alice, "join");
    assert_eq!(joined["nickname"], "bob");
    assert_eq!(joined["message"], "joined");
    bob.close();
    let left = next_of(&mut alice, "leave");
    assert_eq!(
        (left["nickname"].as_str(), left["message"].as_str()),
        (Some("bob"), Some("left"))
    );

    // carol never answers pings: she times out, and the room is told why.
    // (alice reads, so her tungstenite answers the server's pings.)
    let _carol = join(server, "carol", "lobby");
    assert_eq!(next_of(&mut alice, "join")["nickname"], "carol");
    let left = next_of(&mut alice, "leave");
    assert_eq!(left["nickname"], "carol");
    assert_eq!(left["message"], "left (timed out)");
}

fn a_joiner_is_told_who_is_in_the_room(server: &Server) {
    let _a = join(server, "amy", "lobby");
    let _b = join(server, "bo%20b", "lobby");
    let _twin = join(server, "amy", "lobby");
    let _elsewhere = join(server, "zed", "kitchen");
    let mut c = join(server, "cy", "lobby");
    let presence = next_of(&mut c, "presence");
    assert_eq!(presence["room"], "lobby");
    assert_eq!(presence["members"], json!(["amy", "amy", "bo b", "cy"]));
    assert_eq!(presence["nickname"], "server");
    assert_eq!(presence["message"], "in lobby: amy, amy, bo b, cy");

    let (status, body) = server.get("/members?room=lobby");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        listed,
        json!({"room": "lobby", "count": 4, "members": ["amy", "amy", "bo b", "cy"], "truncated": false})
    );
    drop(c);
    eventually("cy gone from the list", || {
        server.get("/members?room=lobby").1.contains("\"count\":3")
    });
    assert!(
        server
            .get("/members")
            .1
            .contains("\"room\":\"global_room\"")
    );
    assert_eq!(
        server.get("/members?room=%20x").0,
        "HTTP/1.1 400 Bad Request"
    );
}

fn history_comes_first_then_live_messages(server: &Server) {
    let mut alice = join(server, "alice", "lobby");
    for i in 0..3 {
        alice.send(&format!("earlier {i}"));
    }
    // Wait until they are in: bob, joining later, must get them as history.
    let mut witness = join(server, "witness", "lobby");
    let mut got = 0;
    while got < 3 {
        let frame = witness.recv();
        if frame["type"] == "chat" {
            got += 1;
        }
    }
    let mut bob = join(server, "bob", "lobby");
    for i in 0..3 {
        let frame = bob.recv();
        assert_eq!(frame["type"], "chat");
        assert_eq!(frame["history"], true);
        assert_eq!(frame["nickname"], "alice");
        assert_eq!(frame["message"], format!("earlier {i}"));
    }
    assert_eq!(bob.recv()["type"], "presence");
    alice.send("now");
    let frame = bob.recv_live();
    assert_eq!(frame["message"], "now");
    assert!(frame.get("history").is_none());
}

/// While two clients send as fast as they can, others join: each joiner gets
/// every message exactly once (history, then live), in each sender's order.
fn history_has_no_gap_and_no_duplicate_while_others_send(server: &Server) {
    const PER_SENDER: usize = 300;
    let senders: Vec<_> = (0..2)
        .map(|s| {
            let mut client = join(server, &format!("s{s}"), "busy");
            std::thread::spawn(move || {
                for i in 0..PER_SENDER {
                    client.send(&format!("{i}"));
                    // Keep sending while the joiners join.
                    std::thread::sleep(Duration::from_millis(1));
                }
                client
            })
        })
        .collect();
    let mut joiners = Vec::new();
    for j in 0..4 {
        std::thread::sleep(Duration::from_millis(15));
        joiners.push(join(server, &format!("j{j}"), "busy"));
    }
    // Kept open until the end: closing a socket with unread input resets it,
    // and a reset can destroy the sender's last frames before they are read.
    let _senders: Vec<Client> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    for mut joiner in joiners {
        let mut next = [None::<usize>; 2];
        let mut seen = 0;
        // The history holds the last 50; everything after arrives live.
        while next.iter().any(|n| n.is_none_or(|n| n < PER_SENDER)) {
            let frame = joiner.recv();
            if frame["type"] != "chat" {
                continue;
            }
            let s: usize = frame["nickname"].as_str().unwrap()[1..].parse().unwrap();
            let i: usize = frame["message"].as_str().unwrap().parse().unwrap();
            if let Some(expected) = next[s] {
                assert_eq!(i, expected, "s{s}: no gap, no duplicate, in order");
            }
            next[s] = Some(i + 1);
            seen += 1;
        }
        assert!(seen > 0);
    }
}

fn the_text_format_is_for_people(server: &Server) {
    let mut alice = join(server, "alice", "lobby");
    alice.send("before bob");
    let mut witness = join(server, "w", "lobby");
    while witness.recv()["type"] != "chat" {}
    let mut bob = server.client("bob?room=lobby&format=text");
    let mut lines = Vec::new();
    for _ in 0..2 {
        lines.push(bob.recv_text());
    }
    assert_eq!(
        lines,
        ["[history] alice: before bob", "* in lobby: alice, bob, w"]
    );
    alice.send("hello bob");
    assert_eq!(bob.recv_text(), "alice: hello bob");
    let carol = join(server, "carol", "lobby");
    assert_eq!(bob.recv_text(), "* carol joined");
    carol.close();
    assert_eq!(bob.recv_text(), "* carol left");
    // What bob types works the same in both formats.
    bob.send("hi all\n");
    assert_eq!(alice.recv_chat(), ("bob".into(), "hi all".into()));
    assert_eq!(
        server.get("/chat/x?format=xml").0,
        "HTTP/1.1 400 Bad Request"
    );
}

/// /healthz is 503 while Redis is down, and 200 again once it is back.
#[test]
fn health_follows_redis() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.client("alice");
    alice.settle();
    assert_eq!(
        server.get("/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    let port = redis.kill();
    alice.recv_server("notice");
    let (status, body) = server.get("/healthz");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("Redis"), "{body}");
    let _redis = Redis::start_on(port);
    alice.recv_server("notice");
    eventually("healthy again", || {
        server.get("/healthz").0 == "HTTP/1.1 200 OK"
    });
}

/// Presence is shared by every instance on one Redis, and the members of an
/// instance that is killed disappear (no ghosts).
#[test]
fn presence_spans_instances_and_a_killed_instance_leaves_no_ghosts() {
    let redis = Redis::start();
    let east = Server::with_redis(&redis);
    let mut west = Server::with_redis(&redis);
    let _a = join(&east, "alice", "lobby");
    let _b = join(&west, "bob", "lobby");
    let mut c = join(&east, "carol", "lobby");
    assert_eq!(
        next_of(&mut c, "presence")["members"],
        json!(["alice", "bob", "carol"])
    );
    assert!(
        west.get("/members?room=lobby")
            .1
            .contains(r#"["alice","bob","carol"]"#)
    );

    west.signal("KILL");
    west.wait_exit();
    // The killed instance's liveness key expires (30 s); then bob is gone.
    std::thread::sleep(Duration::from_secs(31));
    let (_, body) = east.get("/members?room=lobby");
    assert!(body.contains(r#"["alice","carol"]"#), "{body}");
}

/// `--history 0` keeps nothing: a joiner starts with the member list.
#[test]
fn history_can_be_turned_off() {
    let server = Server::start(&["--in-process", "--history", "0"]);
    let mut alice = server.client("alice");
    let mut witness = server.client("witness");
    witness.settle();
    alice.send("not kept");
    assert_eq!(witness.recv_chat().1, "not kept");
    let mut bob = server.client("bob");
    assert_eq!(bob.recv()["type"], "presence");
    alice.send("live");
    assert_eq!(bob.recv_chat().1, "live");
}

/// Clients connecting in parallel, each settled (fully joined).
fn join_many(server: &Server, prefix: &str, count: usize, room: &str) -> Vec<(String, Client)> {
    let addr = server.addr;
    let room = room.to_owned();
    let prefix = prefix.to_owned();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (room, prefix) = (room.clone(), prefix.clone());
            std::thread::spawn(move || {
                (t..count)
                    .step_by(8)
                    .map(|i| {
                        let name = format!("{prefix}{i}");
                        let mut client = Client::connect(addr, &format!("{name}?room={room}"));
                        client.settle();
                        (name, client)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

/// Twenty people join at once. Joins may be announced together (one frame
/// listing several nicknames), but the watcher hears of each person exactly
/// once, and nobody is told of their own arrival.
fn a_join_storm_is_announced_once_per_person(server: &Server) {
    let mut watcher = join(server, "watcher", "storm");
    watcher.settle();
    let mut joiners = join_many(server, "j", 20, "storm");
    let mut heard = Vec::new();
    while heard.len() < 20 {
        let frame = next_of(&mut watcher, "join");
        match frame["nicknames"].as_array() {
            Some(names) => {
                assert!(names.len() > 1, "{frame}");
                heard.extend(names.iter().map(|n| n.as_str().unwrap().to_owned()));
            }
            None => heard.push(frame["nickname"].as_str().unwrap().to_owned()),
        }
    }
    heard.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("j{i}")).collect();
    expected.sort();
    assert_eq!(heard, expected);
    // Everyone is connected and settled, so every announcement is out: a
    // chat message now is the next thing each joiner gets, and no joiner was
    // told of itself.
    watcher.send("hello all");
    for (name, joiner) in &mut joiners {
        loop {
            let frame = joiner.recv();
            if frame["type"] == "chat" {
                assert_eq!(frame["message"], "hello all");
                break;
            }
            assert_eq!(frame["type"], "join", "{frame}");
            let about: Vec<String> = frame["nicknames"]
                .as_array()
                .map(|n| n.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                .unwrap_or_else(|| vec![frame["nickname"].as_str().unwrap().to_owned()]);
            assert!(!about.contains(name), "{name} was told of itself: {frame}");
        }
    }
}

/// Forty people join at once: announcements together list at most 20
/// names, but their counts add up to everyone, and nobody is listed twice.
fn a_big_join_storm_lists_some_and_counts_everyone(server: &Server) {
    let mut watcher = join(server, "watcher", "bigstorm");
    watcher.settle();
    let _joiners = join_many(server, "j", 40, "bigstorm");
    let (mut counted, mut listed) = (0, Vec::new());
    while counted < 40 {
        let frame = next_of(&mut watcher, "join");
        match frame["nicknames"].as_array() {
            Some(names) => {
                assert!(names.len() <= 20, "{frame}");
                counted += frame["count"].as_u64().unwrap();
                listed.extend(names.iter().map(|n| n.as_str().unwrap().to_owned()));
            }
            None => {
                counted += 1;
                listed.push(frame["nickname"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(counted, 40);
    let before = listed.len();
    listed.sort();
    listed.dedup();
    assert_eq!(listed.len(), before, "someone was listed twice");
}

/// Past 100 members the presence frame counts everyone and lists 100 names
/// (`GET /members` lists up to 1,000 when asked).
fn a_big_room_lists_some_names_and_counts_everyone(server: &Server) {
    let _crowd = join_many(server, "p", 105, "big");
    let mut late = join(server, "late", "big");
    let presence = next_of(&mut late, "presence");
    assert_eq!(presence["count"], 106);
    assert_eq!(presence["members"].as_array().unwrap().len(), 100);
    assert!(
        presence["message"]
            .as_str()
            .unwrap()
            .starts_with("in big: 106 people, among them "),
        "{presence}"
    );
    let (_, body) = server.get("/members?room=big&limit=1000");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["members"].as_array().unwrap().len(), 106, "{listed}");
    assert_eq!(listed["truncated"], false);
}
