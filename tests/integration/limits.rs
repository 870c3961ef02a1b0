//! Limits and hostile or broken clients: each bound has an answer, and only
//! the client that hits it is affected.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::support::{Client, Closed, Server, eventually, with_both_brokers};

with_both_brokers!(
    a_client_that_stops_reading_does_not_hold_up_the_others =>
        ["--rate-limit", "0", "--write-timeout", "2"],
);

/// One client never reads. Everyone else still gets every message, in order;
/// the stuck client is closed once a write to it blocks past the write
/// timeout, and the close is counted.
fn a_client_that_stops_reading_does_not_hold_up_the_others(server: &Server) {
    const MESSAGES: usize = 400;
    let _stuck = server.client("stuck");
    // Each reader reads on its own thread, as a real client would.
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let mut reader = server.client(&format!("r{i}"));
            std::thread::spawn(move || {
                for i in 0..MESSAGES {
                    let (_, message) = reader.recv_chat();
                    assert!(
                        message.starts_with(&format!("{i} ")),
                        "message {i} in order"
                    );
                }
                reader
            })
        })
        .collect();
    let mut sender = server.client("sender");
    let payload = "x".repeat(48 * 1024);
    let started = Instant::now();
    for i in 0..MESSAGES {
        sender.send(&format!("{i} {payload}"));
    }
    let _readers: Vec<Client> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    eprintln!("readers got {MESSAGES} messages in {:?}", started.elapsed());
    server.wait_for_log("stuck (127.0.0.1");
    server.wait_for_log("was too slow and was disconnected");
    assert_eq!(server.metric("threadchat_slow_client_closes_total"), 1);
}

#[test]
fn over_the_rate_limit_messages_are_refused_with_a_notice() {
    let server = Server::start(&["--in-process", "--rate-limit", "2", "--rate-burst", "3"]);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    for i in 0..5 {
        alice.send(&format!("m{i}"));
    }
    let error = alice.recv_server("error");
    assert!(error.contains("rate limit"), "{error}");
    for i in 0..3 {
        assert_eq!(bob.recv_chat().1, format!("m{i}"));
    }
    // After a second, two more tokens.
    std::thread::sleep(Duration::from_millis(1100));
    alice.send("later");
    assert_eq!(bob.recv_chat().1, "later");
    assert_eq!(server.metric("threadchat_rate_limited_total"), 2);
}

#[test]
fn a_client_that_keeps_flooding_is_closed_with_1008() {
    let server = Server::start(&["--in-process", "--rate-limit", "1", "--rate-burst", "1"]);
    let mut flooder = server.client("flooder");
    let mut bob = server.client("bob");
    for i in 0..100 {
        if flooder.ws.send(Message::text(format!("spam {i}"))).is_err() {
            break;
        }
    }
    match flooder.recv_close() {
        Closed::Frame(1008, reason) => assert!(reason.contains("flooding"), "{reason}"),
        other => panic!("expected 1008, got {other:?}"),
    }
    assert_eq!(bob.recv_chat().1, "spam 0");
    // From another address: the flooder's address has spent its budget.
    let mut alice = Client::connect_from(server.addr, "127.0.0.2", "alice");
    alice.send("unaffected");
    assert_eq!(bob.recv_chat().1, "unaffected");
}

/// A silent client is pinged; one that answers stays, one that does not is
/// closed with 1008 after the idle timeout.
#[test]
fn keepalive_pings_and_closes_silent_clients() {
    let server = Server::start(&[
        "--in-process",
        "--ping-interval",
        "0.2",
        "--idle-timeout",
        "0.7",
    ]);
    let mut lively = server.client("lively");
    let mut silent = server.client("silent");
    // `lively` reads, and tungstenite answers every ping while reading.
    lively
        .ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        match lively.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Text(_)) => {} // silent joining, the member list
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(_)) => {}
            Err(e) => panic!("lively was closed: {e}"),
        }
    }
    assert!(pings >= 3, "pinged {pings} times");
    // `silent` never read, so never answered: it was pinged, then closed.
    // Reading now, tungstenite first writes the pongs it owes: to a socket
    // the server may have closed already (a broken pipe, the close frame
    // unread behind it). The server's log says why it closed either way.
    let mut saw_ping = false;
    let closed = loop {
        match silent.ws.read() {
            Ok(Message::Ping(_)) => saw_ping = true,
            Ok(Message::Text(_)) => {}
            Ok(Message::Close(frame)) => break frame,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break None;
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    if let Some(closed) = closed {
        assert!(saw_ping);
        assert_eq!(u16::from(closed.code), 1008);
        assert!(closed.reason.contains("idle timeout"), "{}", closed.reason);
    }
    let left = server.wait_for_log("silent left");
    assert!(left.contains("timed out (no response to pings)"), "{left}");
    lively.ws.get_ref().set_read_timeout(None).unwrap();
    lively.send("still here");
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[test]
fn browser_pages_from_other_origins_are_refused() {
    let server = Server::start(&["--in-process", "--allow-origin", "https://friend.example"]);
    let host = server.addr.to_string();
    let request =
        |origin: &str| format!("GET /chat/alice HTTP/1.1\r\nHost: {host}\r\n{UPGRADE}{origin}\r\n");
    let (status, body) = server.http(&request("Origin: https://evil.example\r\n"));
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    assert!(body.contains("--allow-origin"), "{body}");
    for allowed in [
        "",
        "Origin: https://friend.example\r\n",
        &format!("Origin: http://{host}\r\n"),
    ] {
        let (status, _) = server.http(&request(allowed));
        assert_eq!(status, "HTTP/1.1 101 Switching Protocols", "{allowed:?}");
    }
}

/// 1,000 connections that open and send nothing do not stop anyone else.
/// (From one address: the per-address limits, tested in `bounds` and
/// `admission`, are off.)
#[test]
fn slowloris_connections_do_not_keep_others_out() {
    let server = Server::start(&[
        "--in-process",
        "--max-connections-per-ip",
        "0",
        "--max-starting-per-ip",
        "0",
    ]);
    let lurkers: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.send("the lurkers are harmless");
    assert_eq!(bob.recv_chat().1, "the lurkers are harmless");
    drop(lurkers);
}

/// Refused clients that go on sending after their refusal (a byte now and
/// then, forever) do not keep others out: the server stops listening to a
/// refused connection soon, whatever it sends. Here they are as many as
/// the connections that may be starting at once (`--max-starting`), which
/// they would otherwise hold for as long as they send.
#[test]
fn refused_clients_that_keep_sending_do_not_keep_others_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = Server::start(&[
        "--in-process",
        "--unique-nicknames",
        "--max-starting",
        "4",
        "--max-connections-per-ip",
        "0",
        "--max-starting-per-ip",
        "0",
    ]);
    let _alice = server.client("alice");
    let refused: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (stream, refusal) = server.refused_upgrade("/chat/alice");
            assert_eq!(refusal.status, 409, "{refusal}");
            stream
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let dripper = std::thread::Builder::new()
        .name("dripper".into())
        .spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    for mut stream in &refused {
                        let _ = stream.write_all(b"x");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .unwrap();
    let mut bob = server.client("bob");
    let mut carol = server.client("carol");
    bob.send("the refused are harmless");
    assert_eq!(carol.recv_chat().1, "the refused are harmless");
    stop.store(true, Ordering::Relaxed);
    dripper.join().unwrap();
}

#[test]
fn a_request_head_that_never_ends_gets_408() {
    let server = Server::start(&["--in-process", "--handshake-timeout", "0.3"]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /chat/slow HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
}

#[test]
fn metrics_are_served_in_prometheus_format() {
    let server = Server::in_process();
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.send("counted");
    bob.recv_chat();
    let (status, body) = server.get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("# TYPE threadchat_connections_open gauge"),
        "{body}"
    );
    assert_eq!(server.metric("threadchat_connections_open"), 2);
    assert_eq!(server.metric("threadchat_messages_received_total"), 1);
    assert_eq!(server.metric("threadchat_messages_delivered_total"), 1);
}

/// A second SIGTERM during a graceful shutdown exits at once.
#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::in_process();
    // A client that never reads cannot answer the close: the graceful
    // shutdown would wait for it.
    let _deaf = server.client("deaf");
    server.signal("TERM");
    server.wait_for_log("SIGTERM received");
    server.signal("TERM");
    assert_eq!(server.wait_exit(), Some(130));
}

#[test]
fn the_echo_endpoint_is_off_unless_enabled() {
    let server = Server::in_process();
    assert_eq!(server.get("/echo").0, "HTTP/1.1 404 Not Found");
    let server = Server::start(&["--in-process", "--echo-endpoint"]);
    let mut ws = Client::connect_path(server.addr, "/echo");
    ws.send_message(Message::Binary(vec![1, 2, 3].into()));
    assert_eq!(ws.ws.read().unwrap(), Message::Binary(vec![1, 2, 3].into()));
    ws.send("text too");
    assert_eq!(ws.ws.read().unwrap(), Message::text("text too"));
}

#[test]
fn clients_of_a_stopped_server_get_1001() {
    let mut server = Server::in_process();
    let mut alice = server.client("alice");
    eventually("alice counted", || {
        server.metric("threadchat_connections_open") == 1
    });
    server.signal("INT");
    assert_eq!(
        alice.recv_close(),
        Closed::Frame(1001, "server shutting down".into())
    );
    assert_eq!(server.wait_exit(), Some(0));
}
