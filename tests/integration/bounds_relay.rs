//! Bounded under attack, the relay's side: slow readers, junk and oversized
//! payloads on a room's channel, room state that must expire, a Redis that
//! refuses writes or does not answer, and joiners that never read. (The
//! client-facing bounds are in `bounds.rs`.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::support::{Client, Redis, Server, eventually, in_both_subscription_modes};

in_both_subscription_modes!(tls: a_slow_reader_is_closed_once_it_is_write_timeout_behind);
in_both_subscription_modes!(tls: a_reader_that_pauses_gets_every_frame_whole_and_in_order);
in_both_subscription_modes!(
    forged_and_oversized_payloads_are_skipped,
    an_unanswered_message_may_have_been_delivered,
    a_message_whose_redis_died_unanswered_may_have_been_delivered,
    a_message_its_replicas_did_not_confirm_may_be_lost,
    a_message_sent_again_after_its_connection_was_killed_is_delivered_once,
);

/// A client that reads, but slower than the room speaks, is closed as too
/// slow once it is `--write-timeout` behind — even though every single
/// write to it completes within the timeout. Redis never reaches its own
/// output-buffer limit for it.
fn a_slow_reader_is_closed_once_it_is_write_timeout_behind(mode: &[&str]) {
    let redis = Redis::start();
    let args = [&["--write-timeout", "2", "--rate-limit", "0"], mode].concat();
    let server = Server::with_redis_and(&redis, &args);
    let mut slow = server.client("slow");
    slow.settle();
    let mut fast = server.client("fast");
    fast.settle();
    let mut sender = server.client("sender");
    // More than the kernel's socket buffers hold, so the client's data
    // has to wait somewhere: in our writer, or in Redis.
    const MESSAGES: usize = 600;
    let payload = "y".repeat(60 * 1024);
    let reading = thread::spawn(move || {
        // About 64 KiB a second: far less than is sent.
        let mut frames = 0;
        loop {
            thread::sleep(Duration::from_millis(500));
            match slow.ws.read() {
                Ok(tungstenite::Message::Close(frame)) => return (frames, frame),
                Ok(_) => frames += 1,
                Err(_) => return (frames, None),
            }
        }
    });
    let fast_reader = thread::spawn(move || {
        for _ in 0..MESSAGES {
            fast.recv_chat();
        }
    });
    for i in 0..MESSAGES {
        sender.send(&format!("{i} {payload}"));
        thread::sleep(Duration::from_millis(5));
    }
    fast_reader.join().unwrap();
    let line = server.wait_for_log("was too slow and was disconnected");
    assert!(line.contains("slow (127.0.0.1"), "{line}");
    let (frames, _) = reading.join().unwrap();
    assert!(
        frames < MESSAGES,
        "the slow reader read everything ({frames})"
    );
    assert_eq!(server.metric("threadchat_slow_client_closes_total"), 1);
    // Redis never dropped a subscription itself (past its output-buffer
    // limit): no subscription was lost.
    assert_eq!(server.metric("threadchat_subscriptions_lost_total"), 0);
}

/// A reader that stops reading while the room talks fills its socket: the
/// server keeps what the socket did not take (a frame cut in two among it,
/// and, in shared mode, bytes the room's dispatcher wrote past the
/// client's WebSocket). Once the client reads again it gets every message
/// whole, once and in order — also with its pings answered in between,
/// through the same writer.
fn a_reader_that_pauses_gets_every_frame_whole_and_in_order(mode: &[&str]) {
    let redis = Redis::start();
    let args = [&["--write-timeout", "60", "--rate-limit", "0"], mode].concat();
    let server = Server::with_redis_and(&redis, &args);
    let mut paused = server.client("paused");
    paused.settle();
    let mut sender = server.client("sender");
    sender.settle();
    // 6 MB in all: more than loopback's socket buffers hold.
    const MESSAGES: usize = 300;
    let payload = "z".repeat(20 * 1024);
    for i in 0..MESSAGES {
        sender.send(&format!("{i} {payload}"));
        if i % 60 == 0 {
            paused.send_message(tungstenite::Message::Ping(format!("p{i}").into()));
        }
    }
    thread::sleep(Duration::from_secs(1));
    for i in 0..MESSAGES {
        let (from, text) = paused.recv_chat();
        assert_eq!(from, "sender");
        assert_eq!(text, format!("{i} {payload}"), "message {i}");
    }
}

/// The same over TLS with a shared subscription: the bytes the room's
/// dispatcher writes go through the client's TLS session.
#[cfg(all(feature = "tls", target_os = "linux"))]
#[test]
fn a_reader_that_pauses_over_wss_in_shared_mode_gets_every_frame() {
    let certs = crate::support::Certs::new();
    let tls = certs.server_args();
    a_reader_that_pauses_gets_every_frame_whole_and_in_order(&[
        &tls[0],
        &tls[1],
        &tls[2],
        &tls[3],
        "--subscriptions",
        "shared",
    ]);
}

/// Whatever is published on the channel is untrusted: an unknown type, a
/// nickname with control characters, a payload bigger than the server
/// would ever publish are skipped (and logged, a little); a forged join's
/// list is cut to what the server itself sends.
fn forged_and_oversized_payloads_are_skipped(mode: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, mode);
    let mut alice = server.client("alice");
    alice.settle();
    let names: Vec<String> = (0..5000).map(|i| format!("n{i}")).collect();
    let forged = serde_json::json!({
        "type": "join", "nickname": "n0, n1 and 4998 others", "message": "joined",
        "nicknames": names, "count": 5000,
    });
    redis.publish("global_room", &forged.to_string());
    let join = alice.recv();
    assert_eq!(join["type"], "join");
    assert_eq!(join["nicknames"].as_array().unwrap().len(), 20);
    redis.publish(
        "global_room",
        r#"{"type":"poll","nickname":"x","message":"unknown type"}"#,
    );
    redis.publish(
        "global_room",
        r#"{"nickname":"evil\nname","message":"forged line"}"#,
    );
    let huge = serde_json::json!({"nickname": "big", "message": "z".repeat(1024 * 1024)});
    redis.publish("global_room", &huge.to_string());
    for i in 0..30 {
        redis.publish("global_room", &format!("junk {i}"));
    }
    redis.publish("global_room", r#"{"nickname":"bob","message":"real"}"#);
    assert_eq!(alice.recv_chat(), ("bob".into(), "real".into()));
    // What the original app's clients may send (any control character)
    // reaches a terminal escaped, as one line.
    let mut terminal = Client::connect_path(server.addr, "/chat/term?format=text");
    while !terminal.recv_text().starts_with("* in global_room") {}
    redis.publish(
        "global_room",
        r#"{"nickname":"py","message":"\u001b[2J\u0007two\nlines"}"#,
    );
    assert_eq!(terminal.recv_text(), "py: ␛[2J␇two↵lines");
    // 33 bad payloads, at most a couple of warnings.
    assert!(server.log_count("skipped a payload") <= 2);
    assert!(server.metric("threadchat_payloads_skipped_total") >= 33);
}

/// Room state expires: 1,000 rooms used and left leave only keys that
/// carry a time to live, and after it, nothing; a room still in use keeps
/// its state.
#[test]
fn room_state_expires_in_redis() {
    let redis = Redis::start();
    // One address creating 1,000 rooms: past --new-rooms-per-minute.
    let server =
        Server::with_redis_and(&redis, &["--room-ttl", "4", "--new-rooms-per-minute", "0"]);
    let mut stayer = Client::connect_path(server.addr, "/chat/stayer?room=kept");
    stayer.settle();
    stayer.send("remember me");
    use_and_leave_rooms(&server, 1000);
    let keys = redis.keys("threadchat:*");
    assert!(keys.len() > 100, "{} keys", keys.len());
    for key in keys
        .iter()
        .filter(|k| !k.starts_with("threadchat:instance:"))
    {
        let ttl: i64 = redis.query(&["PTTL", key]);
        // -1 is a key without expiry; 0 is one in its last millisecond,
        // -2 one that expired between KEYS and PTTL.
        assert_ne!(ttl, -1, "{key} has no time to live");
    }
    thread::sleep(Duration::from_secs(5));
    eventually("every abandoned room's keys expire", || {
        redis
            .keys("threadchat:*")
            .iter()
            .all(|k| k.contains("{kept}") || k.starts_with("threadchat:instance:"))
    });
    // The room in use kept its members and its log (the log, its size, its
    // position).
    assert_eq!(redis.keys("threadchat:{kept}:*").len(), 4);
    let mut late = Client::connect_path(server.addr, "/chat/late?room=kept");
    assert_eq!(late.recv()["message"], "remember me");
    drop(stayer);
}

/// The same in-process: emptied rooms are freed after `--room-ttl`.
#[test]
fn room_state_expires_in_process() {
    let server = Server::start(&[
        "--in-process",
        "--room-ttl",
        "2",
        "--new-rooms-per-minute",
        "0",
    ]);
    use_and_leave_rooms(&server, 1000);
    assert!(server.metric("threadchat_rooms_in_memory") > 0);
    eventually("emptied rooms are freed", || {
        server.metric("threadchat_rooms_in_memory") == 0
    });
}

/// `count` rooms, each joined, spoken in and left by one client (eight at a
/// time).
fn use_and_leave_rooms(server: &Server, count: usize) {
    let addr = server.addr;
    let workers: Vec<_> = (0..8)
        .map(|w| {
            thread::spawn(move || {
                for i in (w..count).step_by(8) {
                    let mut client = Client::connect_path(addr, &format!("/chat/u{i}?room=r{i}"));
                    client.settle();
                    client.send("hello");
                    client.close();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

/// A Redis that refuses writes (`maxmemory` reached, `noeviction`): the
/// message is neither recorded nor published, the sender is told exactly
/// that, and `/healthz` says why it is unhealthy.
#[test]
fn a_redis_that_refuses_writes_is_reported_truthfully() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    bob.settle();
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    alice.send("into the void");
    let error = alice.recv_server("error");
    assert!(error.contains("was not delivered"), "{error}");
    assert!(error.contains("OOM"), "{error}");
    bob.expect_nothing(Duration::from_millis(500));
    let (status, body) = server.get("/healthz");
    assert!(status.contains("503"), "{status}");
    assert!(body.contains("refuses writes"), "{body}");
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    alice.send("back");
    assert_eq!(bob.recv_chat(), ("alice".into(), "back".into()));
    assert!(server.get("/healthz").0.contains("200"));
    // Nothing of the refused message was kept.
    let mut carol = server.client("carol");
    let first = carol.recv();
    assert_eq!(first["message"], "back");
}

/// Clients that join a room with a big history and never read it do not
/// stop anyone else from joining: a welcome's turn is not held while a
/// client leaves its history unread (that waits in its own writer, up to
/// the write timeout).
#[test]
fn joiners_that_never_read_their_welcome_do_not_hold_up_others() {
    let server = Server::start(&[
        "--in-process",
        "--history-bytes",
        "1048576",
        "--write-timeout",
        "30",
        "--rate-limit",
        "0",
    ]);
    let mut alice = Client::connect_path(server.addr, "/chat/alice?room=big");
    let mut bob = Client::connect_path(server.addr, "/chat/bob?room=big");
    bob.settle();
    for i in 0..12 {
        alice.send(&format!("{i} {}", "x".repeat(60 * 1024)));
    }
    while !bob.recv_chat().1.starts_with("11 ") {}
    // Six clients with tiny receive buffers that never read.
    let request = format!(
        "GET /chat/mute?room=big HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    let mutes: Vec<TcpStream> = (0..6)
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket.connect(&server.addr.into()).unwrap();
            let mut stream = TcpStream::from(socket);
            stream.write_all(request.as_bytes()).unwrap();
            // Read the `101` head, and nothing after it, ever.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 101"));
            stream
        })
        .collect();
    // Carol gets her welcome within the test's patience (10 s), though each
    // mute client may keep its own writer waiting for 30.
    let mut carol = Client::connect_path(server.addr, "/chat/carol?room=big");
    carol.settle();
    drop(mutes);
}

/// A message Redis did not answer in time (here Redis is paused) may
/// still be carried out when Redis wakes: the sender is told exactly that,
/// never a flat "not delivered" that would invite a duplicate resend.
fn an_unanswered_message_may_have_been_delivered(mode: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, mode);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    redis.pause();
    alice.send("in limbo");
    let error = loop {
        let frame = alice.recv_live();
        if frame["type"] == "error" {
            break frame["message"].as_str().unwrap().to_owned();
        }
    };
    redis.resume();
    assert!(
        error.contains(r#"your message "in limbo" may or may not have been delivered"#),
        "{error}"
    );
    assert!(error.contains("did not answer in time"), "{error}");
}

/// Redis dies while a message waits for its answer: it may have carried it
/// out (and written it to its append-only file) just before. The
/// publisher's connection closes, and Redis cannot be reached to send it
/// again: the sender is told it may or may not have been delivered, never
/// a flat "not delivered". (Here Redis is paused first, so that the message
/// is surely waiting when it is killed.)
fn a_message_whose_redis_died_unanswered_may_have_been_delivered(mode: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, mode);
    let mut alice = server.client("alice");
    alice.settle();
    redis.pause();
    alice.send("at the crash");
    // Sent, and waiting for Redis's answer (the I/O timeout is 5 s).
    thread::sleep(Duration::from_millis(1_000));
    redis.kill();
    let error = loop {
        let frame = alice.recv_live();
        if frame["type"] == "error" {
            break frame["message"].as_str().unwrap().to_owned();
        }
    };
    assert!(
        error.contains(r#"your message "at the crash" may or may not have been delivered"#),
        "{error}"
    );
    assert!(error.contains("closed before it answered"), "{error}");
}

/// With `--wait-replicas 1`, a message counts as delivered once the
/// master's replica has it too. Its replica gone, Redis still publishes it
/// (the room gets it), but a failover now would lose it: its sender is
/// told it may or may not have been delivered, and why.
fn a_message_its_replicas_did_not_confirm_may_be_lost(mode: &[&str]) {
    let (master, replica) = Redis::with_replica();
    let args = [&["--wait-replicas", "1"], mode].concat();
    let server = Server::with_redis_and(&master, &args);
    let mut alice = server.client("alice");
    alice.settle();
    let mut bob = server.client("bob");
    bob.settle();
    // Confirmed by the replica: no error. (A machine loaded past what a
    // replica answers in a second makes the server say "may or may not",
    // rightly: a few tries.)
    let confirmed = (0..5).any(|i| {
        alice.send(&format!("replicated {i}"));
        assert_eq!(bob.recv_chat().1, format!("replicated {i}"));
        alice
            .recv_live_within(Duration::from_millis(1_500))
            .is_none_or(|frame| frame["type"] != "error")
    });
    assert!(confirmed, "no message was confirmed by the replica");

    replica.kill();
    eventually("the master saw its replica go", || {
        master
            .query::<String>(&["INFO", "replication"])
            .contains("connected_slaves:0")
    });
    alice.send("not replicated");
    assert_eq!(bob.recv_chat().1, "not replicated");
    let error = loop {
        let frame = alice.recv_live();
        let text = frame["message"].as_str().unwrap_or_default();
        if frame["type"] == "error" && text.contains(r#""not replicated""#) {
            break text.to_owned();
        }
    };
    assert!(
        error.contains(r#"your message "not replicated" may or may not have been delivered"#),
        "{error}"
    );
    assert!(error.contains("only 0 of the 1 replicas"), "{error}");
}

/// Redis carries out a message, then its connection is killed before the
/// answer goes out (`CLIENT KILL`, a proxy, a reset): the publisher sends
/// it again, and the script, finding it done, does not publish it twice.
/// (Redis is kept busy meanwhile, so that the message and the kill wait
/// together, in that order, and the answer is never written.)
fn a_message_sent_again_after_its_connection_was_killed_is_delivered_once(mode: &[&str]) {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, mode);
    let mut alice = server.client("alice");
    alice.settle();
    let mut bob = server.client("bob");
    bob.settle();
    alice.send("warm");
    assert_eq!(bob.recv_chat().1, "warm");

    let url = format!("redis://127.0.0.1:{}", redis.port);
    // Connected before Redis is busy, so that its command is read with the
    // message's, in the same turn of Redis's event loop.
    let mut killer = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let busy = {
        thread::spawn(move || {
            let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
            let spin = "local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + 1500000 \
                        repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] > stop";
            let _: redis::RedisResult<redis::Value> =
                redis::cmd("EVAL").arg(spin).arg(0).query(&mut con);
        })
    };
    thread::sleep(Duration::from_millis(300));
    alice.send("once");
    thread::sleep(Duration::from_millis(300));
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut killer)
        .unwrap();
    busy.join().unwrap();

    assert_eq!(bob.recv_chat().1, "once");
    bob.expect_nothing(Duration::from_millis(1_000));
    alice.expect_nothing(Duration::from_millis(100));
    let key = redis
        .keys("threadchat:*:log")
        .pop()
        .expect("the room's log");
    let log: Vec<String> = redis.query(&["LRANGE", &key, "0", "-1"]);
    let copies = log
        .iter()
        .filter(|entry| entry.contains(r#""message":"once""#))
        .count();
    assert_eq!(copies, 1, "{log:?}");
}

/// `--wait-replicas` on a master without that many replicas is a warning
/// at start, saying what every sender will hear.
#[test]
fn waiting_for_replicas_a_master_lacks_is_a_warning_at_start() {
    let redis = Redis::start();
    let server = Server::with_redis_and(&redis, &["--wait-replicas", "1"]);
    let line = server.wait_for_log("--wait-replicas 1, but the Redis master has 0 replica(s)");
    assert!(
        line.contains("may or may not have been delivered"),
        "{line}"
    );
}
