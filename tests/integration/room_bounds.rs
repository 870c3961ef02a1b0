//! What rooms may cost: the threads a room's shared feed takes come out of
//! the same budget as connections' (past it, 503, and the process goes on),
//! one address may create only so many rooms a minute (past it, 429), and
//! rooms nobody is in are held under a budget, the least recently used
//! forgotten first.

use std::net::TcpStream;

use crate::support::{Client, PATIENCE, Redis, Server, eventually, with_both_brokers};

/// Joins `room` as `nickname` from the local address `ip` (all of
/// 127.0.0.0/8 is this machine): the HTTP refusal, if any.
fn join_from(
    server: &Server,
    ip: &str,
    nickname: &str,
    room: &str,
) -> Result<Client, (u16, String)> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{ip}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let wire = crate::support::Wire::over(stream, server.addr).unwrap();
    let url = format!(
        "{}://{}/chat/{nickname}?room={room}",
        wire.scheme(),
        server.addr
    );
    match tungstenite::client(url, wire) {
        Ok((ws, _)) => Client::admitted(ws).map_err(|refused| (refused.status, refused.reason)),
        // Past the thread budget, the accept loop answers at once, in HTTP.
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let body = response.body().clone().unwrap_or_default();
            Err((
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            ))
        }
        Err(e) => panic!("joining {room} from {ip}: {e}"),
    }
}

/// In shared mode each room in use takes a listener thread and a Redis
/// connection from the budget of `--max-connections` connections (here 10:
/// 20 threads, 10 descriptors). Clients each in a room of their own pass
/// it after a few: they get 503 with a reason, the process keeps running,
/// `/healthz` answers 200 and the clients already in keep chatting. Their
/// threads all end when they leave.
#[test]
fn rooms_past_the_thread_budget_are_refused_and_the_server_goes_on() {
    let redis = Redis::start();
    let server = Server::with_redis_and(
        &redis,
        &["--subscriptions", "shared", "--max-connections", "10"],
    );
    let mut alice = join_from(&server, "127.0.0.1", "alice", "lobby").unwrap();
    let mut bob = join_from(&server, "127.0.0.1", "bob", "lobby").unwrap();
    alice.send("before");
    assert_eq!(bob.recv_chat().1, "before");
    // Once alice's and bob's start threads are gone.
    let starting =
        || (server.thread_policies().iter()).any(|(name, _)| name.starts_with("tc-start"));
    eventually("the start threads end", || !starting());
    let threads = server.thread_count();

    let mut loners = Vec::new();
    let mut refusals = Vec::new();
    for i in 0..8 {
        match join_from(
            &server,
            "127.0.0.1",
            &format!("l{i}"),
            &format!("alone-{i}"),
        ) {
            Ok(loner) if refusals.is_empty() => loners.push(loner),
            Ok(_) => panic!("l{i} got in after a refusal"),
            Err(refusal) => refusals.push(refusal),
        }
    }
    // lobby: 2 connections and a feed (3 descriptors); each loner 2 more.
    assert_eq!(loners.len(), 3, "refused: {refusals:?}");
    assert!(
        refusals.iter().all(|(status, _)| *status == 503),
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(
            |(_, reason)| reason.contains("server full: no thread left to follow another room")
        ),
        "{refusals:?}"
    );
    // Once the refused connections' shares are given back (their start
    // threads joined), a health check has its own.
    eventually("/healthz answers 200", || {
        server.get("/healthz").0.contains("200")
    });
    alice.send("after");
    assert_eq!(bob.recv_chat().1, "after");
    for (i, loner) in loners.iter_mut().enumerate() {
        loner.send(&format!("alone {i}"));
    }
    drop(loners);
    eventually("the loners' threads end", || {
        server.thread_count() == threads
    });
    // The budget is back: a new room is taken again.
    let mut carol = join_from(&server, "127.0.0.1", "carol", "alone-0").unwrap();
    carol.send("back");
    assert!(server.get("/healthz").0.contains("200"));
}

with_both_brokers!(
    one_address_may_create_only_so_many_rooms => ["--new-rooms-per-minute", "3"],
);

/// With `--new-rooms-per-minute 3`, an address creates three rooms and is
/// refused a fourth with 429 and a reason; it may still join rooms that
/// exist, and another address may still create one.
fn one_address_may_create_only_so_many_rooms(server: &Server) {
    let mut held = Vec::new();
    for i in 0..3 {
        let mut client = join_from(server, "127.0.0.2", "rover", &format!("new-{i}"))
            .unwrap_or_else(|e| panic!("room {i}: {e:?}"));
        client.send("mine");
        held.push(client);
    }
    let (status, reason) = join_from(server, "127.0.0.2", "rover", "new-3")
        .err()
        .expect("a fourth new room is refused");
    assert_eq!(status, 429);
    assert!(
        reason.contains("too many new rooms from your address"),
        "{reason}"
    );
    // Rooms that exist cost nothing.
    let mut again = join_from(server, "127.0.0.2", "rover2", "new-0").unwrap();
    again.send("an old room");
    // Another address has its own bucket.
    let mut other = join_from(server, "127.0.0.3", "other", "new-3").unwrap();
    other.send("hello");
    assert!(server.get("/healthz").0.contains("200"));
}

/// A room's worth of log: one message of 20,000 characters.
fn big() -> String {
    "h".repeat(20_000)
}

/// `keeper` stays in `held` (one big message in its log) while eight
/// rooms each get one big message and are left: 160 KB of rooms nobody is
/// in, past a budget of 64 KiB.
fn fill_idle_rooms(server: &Server) -> Client {
    let mut keeper = join_from(server, "127.0.0.1", "keeper", "held").unwrap();
    keeper.settle();
    keeper.send(&big());
    for i in 0..8 {
        let mut visitor = join_from(server, "127.0.0.1", "visitor", &format!("idle-{i}")).unwrap();
        visitor.settle();
        visitor.send(&big());
        visitor.close();
    }
    keeper
}

/// The chat messages a joiner of `room` is sent as history.
fn history_of(server: &Server, room: &str) -> usize {
    let mut joiner = join_from(server, "127.0.0.1", "joiner", room).unwrap();
    let history = joiner.recv_history();
    joiner.close();
    history
        .iter()
        .filter(|frame| frame["message"] == big())
        .count()
}

/// Then the oldest rooms nobody is in are forgotten (a joiner gets no
/// history), the newest are kept (a joiner gets it), and the room
/// somebody stayed in keeps its history however old.
fn only_the_recent_idle_rooms_keep_their_history(server: &Server, keeper: Client) {
    assert_eq!(history_of(server, "idle-7"), 1, "the newest is kept");
    assert_eq!(history_of(server, "idle-0"), 0, "the oldest is forgotten");
    assert_eq!(history_of(server, "held"), 1, "a room with members is kept");
    drop(keeper);
    assert!(server.get("/healthz").0.contains("200"));
}

#[test]
fn idle_rooms_past_their_budget_are_forgotten_in_process() {
    let server = Server::start(&["--in-process", "--idle-rooms-bytes", "65536"]);
    let keeper = fill_idle_rooms(&server);
    // held and about three idle rooms of 20 KB.
    eventually("the oldest idle rooms are forgotten", || {
        server.metric("threadchat_rooms_in_memory") <= 5
    });
    only_the_recent_idle_rooms_keep_their_history(&server, keeper);
}

#[test]
fn idle_rooms_past_their_budget_are_forgotten_in_redis() {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &["--idle-rooms-bytes", "65536"]);
    let keeper = fill_idle_rooms(&server);
    let logs = |room: &str| redis.keys(&format!("threadchat:{{{room}}}:*")).len();
    eventually("the oldest idle rooms are forgotten", || {
        logs("idle-0") == 0 && logs("idle-3") == 0
    });
    assert!(logs("idle-7") > 0);
    only_the_recent_idle_rooms_keep_their_history(&server, keeper);
}

/// The same on a Redis Cluster, where the index is in one slot and the
/// rooms in slots of their own, on several masters.
#[test]
#[cfg(feature = "redis-ha")]
fn idle_rooms_past_their_budget_are_forgotten_on_a_cluster() {
    let cluster = crate::support::Cluster::start();
    let server = Server::on_redis(&cluster.url(), &["--idle-rooms-bytes", "65536"]);
    let keeper = fill_idle_rooms(&server);
    let logs = |room: &str| {
        let master = cluster.node(cluster.master_of_room(room));
        master.keys(&format!("threadchat:{{{room}}}:*")).len()
    };
    eventually("the oldest idle rooms are forgotten", || {
        logs("idle-0") == 0 && logs("idle-3") == 0
    });
    assert!(logs("idle-7") > 0);
    only_the_recent_idle_rooms_keep_their_history(&server, keeper);
}
