//! Bounded under attack: whatever a client, a room name or a payload on the
//! Redis channel does, what it can make the server (or Redis) hold has a
//! bound, and what happens at the bound is what the docs say. Memory and
//! latency figures are in `make bench`; these tests check the behaviour a
//! user or an attacker sees.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    Client, PATIENCE, Redis, Server, eventually, in_both_subscription_modes, with_both_brokers,
};

with_both_brokers!(
    history_is_bounded_in_bytes => ["--history-bytes", "4096", "--rate-limit", "0"],
    control_characters_are_refused_newline_and_tab_are_not,
    text_mode_shows_one_line_per_event,
    a_trickled_message_is_closed_with_1008 =>
        ["--message-timeout", "1", "--ping-interval", "0.4", "--idle-timeout", "30"],
    endless_empty_fragments_are_closed_with_1008 =>
        ["--message-timeout", "1", "--ping-interval", "0.4", "--idle-timeout", "30"],
    too_many_fragments_are_closed_with_1008 => ["--max-fragments", "16"],
    members_answers_are_bounded => ["--rate-limit", "0", "--max-connections-per-ip", "0"],
    sockets_close_when_their_threads_end,
);

in_both_subscription_modes!(
    a_slow_reader_is_closed_once_it_is_write_timeout_behind,
    forged_and_oversized_payloads_are_skipped,
    an_unanswered_message_may_have_been_delivered,
);

/// The history keeps the newest messages that fit in `--history-bytes`: a
/// joiner gets those, not everything ever said.
fn history_is_bounded_in_bytes(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    for i in 0..10 {
        alice.send(&format!("{i} {}", "x".repeat(1000)));
    }
    // Everything is in before the joiner comes.
    while !bob.recv_chat().1.starts_with("9 ") {}
    bob.send("sync");
    alice.recv_chat();
    let mut carol = server.client("carol");
    let mut history = Vec::new();
    loop {
        let frame = carol.recv();
        if frame["type"] == "presence" {
            break;
        }
        if frame["history"] == true {
            history.push(frame["message"].as_str().unwrap().to_owned());
        }
    }
    // About 1 KB each as stored: three fit in 4 KiB, the newest ones.
    assert!(
        (2..=4).contains(&history.len()),
        "{} messages in history",
        history.len()
    );
    assert_eq!(history.last().unwrap(), "sync");
    assert!(history[history.len() - 2].starts_with("9 "));
}

/// A chat message may hold newlines and tabs; any other control character
/// (an escape sequence, a bell, a NUL) refuses the message with an error,
/// and nobody receives it.
fn control_characters_are_refused_newline_and_tab_are_not(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.send("two\nlines\tand a tab");
    assert_eq!(
        bob.recv_chat(),
        ("alice".into(), "two\nlines\tand a tab".into())
    );
    alice.send("line\r\nending");
    assert_eq!(bob.recv_chat(), ("alice".into(), "line\nending".into()));
    for bad in ["\u{1b}[2J clear", "bell\u{7}", "\u{1}x", "c1 \u{9b}"] {
        alice.send(bad);
        let error = alice.recv_server("error");
        assert!(error.contains("control character"), "{error}");
        assert!(error.contains("not delivered"), "{error}");
    }
    alice.send("after");
    assert_eq!(bob.recv_chat(), ("alice".into(), "after".into()));
}

/// `?format=text` shows exactly one line per event: a multi-line message
/// stays visibly one message (it cannot forge `* alice left`), and control
/// and invisible characters arrive escaped, never raw.
fn text_mode_shows_one_line_per_event(server: &Server) {
    let mut reader = Client::connect_path(server.addr, "/chat/reader?format=text");
    while !reader.recv_text().starts_with("* in global_room") {}
    let mut mallory = server.client("mallory");
    mallory.send("hi\n* alice left\nalice: give me your password");
    let line = wait_for_text(&mut reader, "mallory: ");
    assert_eq!(
        line,
        "mallory: hi↵* alice left↵alice: give me your password"
    );
    mallory.send("bidi \u{202E}gnp.exe zero\u{200B}width");
    let line = wait_for_text(&mut reader, "mallory: bidi");
    assert_eq!(line, "mallory: bidi <U+202E>gnp.exe zero<U+200B>width");

    // The server's own name cannot be taken.
    let (status, body) = server.get("/chat/server");
    assert!(status.contains("400"), "{status}");
    assert!(body.contains("reserved"), "{body}");
    assert!(server.get("/chat/SERVER").0.contains("400"));
}

fn wait_for_text(client: &mut Client, prefix: &str) -> String {
    loop {
        let line = client.recv_text();
        if line.starts_with(prefix) {
            return line;
        }
    }
}

/// Sends the first bytes of a frame one at a time, slowly, never finishing
/// it: once `--message-timeout` has passed since the message began, the
/// server closes the connection with 1008, though bytes keep arriving more
/// often than the ping interval.
fn a_trickled_message_is_closed_with_1008(server: &Server) {
    let mut stream = server.raw_upgrade("/chat/trickle", "").unwrap();
    // A masked text frame announcing 100 bytes, sent a byte at a time.
    let mut frame = vec![0x81, 0x80 | 100, 1, 2, 3, 4];
    frame.extend_from_slice(&[b'a'; 100]);
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < PATIENCE && stream.write_all(&frame[sent..=sent]).is_ok() {
        sent += 1;
        thread::sleep(Duration::from_millis(150));
        if server.log_count("message not finished") > 0 {
            break;
        }
    }
    assert!(sent < frame.len(), "the whole frame went through");
    assert_eq!(read_close(&mut stream), Some(1008));
    server.wait_for_log("trickle left global_room");
}

/// Empty continuation frames, one every 150 ms, never a final one: one
/// message that never ends. Closed with 1008 after `--message-timeout`.
fn endless_empty_fragments_are_closed_with_1008(server: &Server) {
    let mut stream = server.raw_upgrade("/chat/fragments", "").unwrap();
    let first = [0x01, 0x80, 1, 2, 3, 4]; // text, not final, empty
    let more = [0x00, 0x80, 1, 2, 3, 4]; // continuation, not final, empty
    stream.write_all(&first).unwrap();
    let started = Instant::now();
    while started.elapsed() < PATIENCE && stream.write_all(&more).is_ok() {
        thread::sleep(Duration::from_millis(150));
        if server.log_count("message not finished") > 0 {
            break;
        }
    }
    assert_eq!(read_close(&mut stream), Some(1008));
}

/// A message in more frames than `--max-fragments` is refused at once.
fn too_many_fragments_are_closed_with_1008(server: &Server) {
    let mut stream = server.raw_upgrade("/chat/many", "").unwrap();
    let mut bytes = vec![0x01, 0x80, 1, 2, 3, 4];
    for _ in 0..100 {
        bytes.extend_from_slice(&[0x00, 0x80, 1, 2, 3, 4]);
    }
    let _ = stream.write_all(&bytes);
    assert_eq!(read_close(&mut stream), Some(1008));
    server.wait_for_log("more than 16 frames");
}

/// Reads server frames until a close frame; returns its code.
fn read_close(stream: &mut TcpStream) -> Option<u16> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Server frames are not masked: [op, len, payload…].
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let len = (bytes[at + 1] & 0x7f) as usize;
            let (header, len) = match len {
                126 if at + 4 <= bytes.len() => (
                    4,
                    u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
                ),
                126 | 127 => break,
                n => (2, n),
            };
            if at + header + len > bytes.len() {
                break;
            }
            if bytes[at] & 0x0f == 8 && len >= 2 {
                return Some(u16::from_be_bytes([
                    bytes[at + header],
                    bytes[at + header + 1],
                ]));
            }
            at += header + len;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// `GET /members` answers a count and at most `limit` names (100 unless
/// asked), says when the list is cut, and refuses a limit out of range.
fn members_answers_are_bounded(server: &Server) {
    let clients: Vec<Client> = (0..120)
        .map(|i| server.client(&format!("m{i:03}")))
        .collect();
    let get = |path: &str| {
        let (status, body) = server.get(path);
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let (status, body) = get("/members");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body["count"], 120);
    assert_eq!(body["members"].as_array().unwrap().len(), 100);
    assert_eq!(body["truncated"], true);
    let (_, body) = get("/members?limit=5");
    assert_eq!(body["members"].as_array().unwrap().len(), 5);
    let (_, body) = get("/members?room=elsewhere");
    assert_eq!(
        body,
        serde_json::json!({"room": "elsewhere", "count": 0, "members": [], "truncated": false})
    );
    assert!(server.get("/members?limit=5000").0.contains("400"));
    assert!(server.get("/members?limit=0").0.contains("400"));
    drop(clients);
}

/// A finished connection's socket is closed when its threads end, not
/// when the accept loop next wakes: the server's descriptors go back to
/// what they were with nobody connecting after.
fn sockets_close_when_their_threads_end(server: &Server) {
    // Warm up (the first connection opens what the process keeps).
    server.client("warm").close();
    eventually("the warm-up connection is gone", || {
        server.metric("threadchat_connections_open") == 0
    });
    let before = server.fd_count();
    let clients: Vec<Client> = (0..5).map(|i| server.client(&format!("c{i}"))).collect();
    for client in clients {
        client.close();
    }
    eventually("every socket is closed", || server.fd_count() <= before);
}

/// One host cannot hold every slot: 1,000 idle connections from one
/// address (127.0.0.2: all of 127.0.0.0/8 is this machine) get 100 slots
/// and then 503, and a client from another address (127.0.0.1) still gets
/// in and chats. A slot comes back as soon as a connection ends.
#[test]
fn connections_per_address_are_limited() {
    let server = Server::start(&["--in-process", "--max-connections-per-ip", "100"]);
    let from = |ip: &str| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: std::net::SocketAddr = format!("{ip}:0").parse().unwrap();
        socket.bind(&local.into()).unwrap();
        socket.connect(&server.addr.into()).unwrap();
        TcpStream::from(socket)
    };
    let lurkers: Vec<TcpStream> = (0..1000).map(|_| from("127.0.0.2")).collect();
    let mut refused = 0;
    for mut lurker in lurkers.iter().skip(100) {
        lurker.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = String::new();
        let _ = lurker.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("too many connections from your address"));
        refused += 1;
    }
    assert_eq!(refused, 900);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.send("the crowd at 127.0.0.2 is harmless");
    assert_eq!(bob.recv_chat().1, "the crowd at 127.0.0.2 is harmless");
    drop(lurkers);
    eventually("the lurkers' slots are free again", || {
        let mut stream = from("127.0.0.2");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200")
    });
}

/// Behind a trusted proxy, clients are counted by the address the proxy
/// forwards, and the proxy itself is not limited.
#[test]
fn behind_a_trusted_proxy_the_forwarded_address_counts() {
    let server = Server::start(&[
        "--in-process",
        "--max-connections-per-ip",
        "2",
        "--trusted-proxy",
        "127.0.0.1",
    ]);
    let via =
        |ip: &str| server.raw_upgrade("/chat/x", &format!("X-Forwarded-For: 6.6.6.6, {ip}\r\n"));
    let _a = via("10.0.0.1").unwrap();
    let _b = via("10.0.0.1").unwrap();
    let refused = via("10.0.0.1").unwrap_err();
    assert!(refused.contains("503"), "{refused}");
    let _c = via("10.0.0.2").unwrap();
    // Without the header, a request through the proxy is refused.
    assert!(
        server
            .raw_upgrade("/chat/y", "")
            .unwrap_err()
            .contains("400")
    );
}

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
    let server = Server::with_redis_and(&redis, &["--room-ttl", "4"]);
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
            .all(|k| k.ends_with(":kept") || k.starts_with("threadchat:instance:"))
    });
    // The room in use kept its members and its history.
    assert_eq!(redis.keys("threadchat:*:kept").len(), 3);
    let mut late = Client::connect_path(server.addr, "/chat/late?room=kept");
    assert_eq!(late.recv()["message"], "remember me");
    drop(stayer);
}

/// The same in-process: emptied rooms are freed after `--room-ttl`.
#[test]
fn room_state_expires_in_process() {
    let server = Server::start(&["--in-process", "--room-ttl", "2"]);
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

/// Names that look like other names are refused: zero-width and bidi
/// characters, non-breaking spaces; in nicknames and room names alike.
#[test]
fn invisible_and_lookalike_names_are_refused() {
    let server = Server::start(&["--in-process"]);
    for path in [
        "/chat/alice%E2%80%8B",          // zero-width space
        "/chat/%E2%80%AEecila",          // right-to-left override
        "/chat/al%C2%A0ice",             // no-break space
        "/chat/%EF%BB%BFbob",            // byte-order mark
        "/chat/bob?room=lob%E2%81%A6by", // isolate, in a room name
    ] {
        let (status, body) = server.get(path);
        assert!(status.contains("400"), "{path}: {status}");
        assert!(body.contains("invisible"), "{path}: {body}");
    }
    assert!(Client::try_connect(server.addr, "élodie").is_ok());
}

/// An upgrade must be HTTP/1.1, name its `Host`, and carry no body.
#[test]
fn sloppy_upgrades_are_refused() {
    let server = Server::start(&["--in-process"]);
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for (request, why) in [
        (
            format!("GET /chat/a HTTP/1.0\r\nHost: h\r\n{upgrade}\r\n"),
            "HTTP/1.1",
        ),
        (format!("GET /chat/a HTTP/1.1\r\n{upgrade}\r\n"), "Host"),
        (
            format!("GET /chat/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n{upgrade}\r\nhello"),
            "no body",
        ),
        (
            format!(
                "GET /chat/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n{upgrade}\r\n0\r\n\r\n"
            ),
            "no body",
        ),
    ] {
        let (status, body) = server.http(&request);
        assert!(status.contains("400"), "{why}: {status}");
        assert!(body.contains(why), "{why}: {body}");
    }
    // The Origin check compares the scheme and the port too.
    let host = server.addr.to_string();
    for origin in [
        format!("https://{host}"),
        format!("http://{}:1", server.addr.ip()),
    ] {
        let request =
            format!("GET /chat/a HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n{upgrade}\r\n");
        assert!(server.http(&request).0.contains("403"), "{origin}");
    }
    assert!(
        server
            .raw_upgrade("/chat/a", &format!("Origin: http://{host}\r\n"))
            .is_ok()
    );
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
