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

use crate::support::{Client, PATIENCE, Server, eventually, with_both_brokers};

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
    let history: Vec<String> = server
        .client("carol")
        .recv_history()
        .iter()
        .map(|frame| frame["message"].as_str().unwrap().to_owned())
        .collect();
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
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
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
            format!("GET /chat/a HTTP/1.0\r\nHost: localhost\r\n{upgrade}\r\n"),
            "HTTP/1.1",
        ),
        (format!("GET /chat/a HTTP/1.1\r\n{upgrade}\r\n"), "Host"),
        (
            format!(
                "GET /chat/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n{upgrade}\r\nhello"
            ),
            "no body",
        ),
        (
            format!(
                "GET /chat/a HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n{upgrade}\r\n0\r\n\r\n"
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
