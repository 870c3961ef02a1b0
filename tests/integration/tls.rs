//! `wss://` and `https://` (the `tls` wing), with certificates each test
//! makes for itself. The chat, rooms and recovery tests run over TLS too
//! (their `wss` variants); these are what only TLS has: the start-up
//! checks, plain HTTP on the TLS port, a handshake that never finishes, a
//! reload on SIGHUP, a key update mid-chat, and the limits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Certs, Client, PATIENCE, Redis, Server, Wire, client_config, eventually};

/// A server on `wss://` relaying through a fresh Redis, with `extra` options.
fn tls_server(certs: &Certs, redis: &Redis, extra: &[&str]) -> Server {
    let url = redis.url();
    let tls = certs.server_args();
    let mut args = vec!["--redis", &url, &tls[0], &tls[1], &tls[2], &tls[3]];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A TLS client of `server` trusting the CA in `ca_pem` (not necessarily
/// the server's): the WebSocket, or why the handshake failed.
fn connect_trusting(server: &Server, ca_pem: &[u8], nickname: &str) -> Result<Client, String> {
    let tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(server.addr.ip().into());
    let conn = rustls::ClientConnection::new(client_config(ca_pem), name).unwrap();
    let wire = Wire::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)));
    let url = format!("wss://{}/chat/{nickname}", server.addr);
    tungstenite::client(url, wire)
        .map(|(ws, _)| Client::on(ws))
        .map_err(|e| e.to_string())
}

#[test]
fn the_page_health_and_metrics_are_served_over_https() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &[]);
    let line = server.wait_for_log("in a browser");
    assert!(
        line.contains(&format!("open https://{}/", server.addr)),
        "{line}"
    );
    assert!(
        line.contains(&format!("websocat -E wss://{}/chat/alice", server.addr)),
        "{line}"
    );
    server.wait_for_log(&format!("listening on wss://{}/chat/", server.addr));

    let (status, body) = server.get("/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("<html"), "{body}");
    assert_eq!(
        server.get("/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    let (status, body) = server.get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("threadchat_tls_handshake_failures_total 0"),
        "{body}"
    );

    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    alice.send("over TLS");
    assert_eq!(bob.recv_chat(), ("alice".into(), "over TLS".into()));
}

/// The page's own origin is `https://…`: a browser's upgrade from it is
/// allowed, one claiming the `http://` origin of the same host is not.
#[test]
fn the_pages_https_origin_may_chat() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &[]);
    let upgrade = |origin: &str| {
        server
            .http(&format!(
                "GET /chat/eve HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}://{addr}\r\n\
                 Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                addr = server.addr
            ))
            .0
    };
    assert_eq!(upgrade("https"), "HTTP/1.1 101 Switching Protocols");
    assert_eq!(upgrade("http"), "HTTP/1.1 403 Forbidden");
}

#[test]
fn plain_http_on_the_tls_port_is_told_to_use_https() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &[]);
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain.set_read_timeout(Some(PATIENCE)).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = plain.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    assert!(
        answer.contains("this port speaks TLS: use https:// or wss://"),
        "{answer}"
    );
}

/// A client that opens a connection and never finishes its handshake (or
/// never starts it) is closed when a slow request head would be, and
/// counted; everyone else chats meanwhile.
#[test]
fn an_unfinished_handshake_is_closed_like_a_slow_request() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &["--handshake-timeout", "1"]);
    let silent = TcpStream::connect(server.addr).unwrap();
    // A TLS record header announcing a ClientHello that never comes.
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();

    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    alice.send("still here");
    assert_eq!(bob.recv_chat(), ("alice".into(), "still here".into()));

    let started = Instant::now();
    for mut stream in [silent, stalled] {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut rest = Vec::new();
        // Closed: the end of the stream (or a reset), not a timeout.
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
        }
    }
    assert!(started.elapsed() < PATIENCE);
    eventually("both counted", || {
        server.metric("threadchat_tls_handshake_failures_total") == 2
    });
}

/// With a certificate that signed itself, the start-up hint tells
/// websocat to accept it (`-k`); with one a CA signed, it does not.
#[test]
fn the_hint_says_k_for_a_self_signed_certificate() {
    let certs = Certs::new();
    let (cert, key) = (certs.path("self.pem"), certs.path("self.key"));
    let args = ["--in-process", "--tls-cert", &cert, "--tls-key", &key];
    let server = Server::start_with_env(&args, &[]);
    server.wait_for_log(&format!("websocat -E -k wss://{}/chat/alice", server.addr));
}

/// The certificate and key may come from the environment, as every
/// option may.
#[test]
fn the_certificate_may_come_from_the_environment() {
    let certs = Certs::new();
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let env = [
        ("THREADCHAT_TLS_CERT", cert.as_str()),
        ("THREADCHAT_TLS_KEY", key.as_str()),
    ];
    let server = Server::start_with_env(&["--in-process"], &env);
    server.wait_for_log(&format!("listening on wss://{}/", server.addr));
    let ca = certs.ca_pem();
    let mut alice = connect_trusting(&server, &ca, "alice").unwrap();
    let mut bob = connect_trusting(&server, &ca, "bob").unwrap();
    alice.settle();
    bob.settle();
    alice.send("from the environment");
    assert_eq!(bob.recv_chat().1, "from the environment");
}

#[test]
fn a_certificate_that_cannot_serve_is_one_clear_error_at_start() {
    let certs = Certs::new();
    let start = |cert: &str, key: &str, expected: &str| {
        let (cert, key) = (certs.path(cert), certs.path(key));
        Server::fails_to_start(
            &["--in-process", "--tls-cert", &cert, "--tls-key", &key],
            expected,
        );
    };
    start(
        "server.pem",
        "other.key",
        "does not belong to the certificate",
    );
    start("expired.pem", "expired.key", "expired");
    start("missing.pem", "server.key", "cannot read");
    start("server.pem", "missing.key", "cannot read");
    // A key where the certificate should be.
    start("server.key", "server.key", "holds no certificate");
}

/// SIGHUP reads the files again: connections made before keep chatting,
/// new ones are served the new certificate. A reload that fails keeps
/// the certificate in use.
#[test]
fn sighup_reloads_the_certificate_without_dropping_anyone() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &[]);
    let old_ca = certs.ca_pem();
    let mut alice = connect_trusting(&server, &old_ca, "alice").unwrap();
    alice.settle();

    certs.renew_server();
    let new_ca = std::fs::read(certs.dir().join("ca2.pem")).unwrap();
    hangup(&server);
    server.wait_for_log("SIGHUP: reloaded the certificate and key");

    let mut bob = connect_trusting(&server, &new_ca, "bob").unwrap();
    bob.settle();
    let refused = connect_trusting(&server, &old_ca, "carol").err().unwrap();
    assert!(refused.contains("certificate"), "{refused}");
    alice.recv_type("join");
    alice.send("made before the reload");
    assert_eq!(
        bob.recv_chat(),
        ("alice".into(), "made before the reload".into())
    );
    bob.send("made after");
    assert_eq!(alice.recv_chat(), ("bob".into(), "made after".into()));

    // A broken key file: the error is logged, the certificate stays.
    std::fs::write(certs.dir().join("server.key"), "not a key").unwrap();
    hangup(&server);
    server.wait_for_log("SIGHUP: kept the certificate in use");
    connect_trusting(&server, &new_ca, "dave").unwrap();
}

fn hangup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A TLS 1.3 key update asked for mid-chat (the server must answer with
/// its own): the chat goes on both ways, many times over.
#[test]
fn key_updates_mid_chat_are_answered() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &["--rate-limit", "0"]);
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    for round in 0..20 {
        let Wire::Tls(tls) = alice.ws.get_mut() else {
            panic!("a TLS client")
        };
        tls.conn.refresh_traffic_keys().unwrap();
        alice.send(&format!("a{round}"));
        assert_eq!(bob.recv_chat(), ("alice".into(), format!("a{round}")));
        bob.send(&format!("b{round}"));
        assert_eq!(alice.recv_chat(), ("bob".into(), format!("b{round}")));
    }
}

/// A TLS client that stops reading is closed once it is --write-timeout
/// behind; one that sends half a TLS record and stops (in a quiet room, so
/// that only pings are written to it) is closed by the idle timeout, as a
/// silent one would be. Neither stalls anyone else.
#[test]
fn a_stuck_tls_client_stalls_nobody() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(
        &certs,
        &redis,
        &[
            "--rate-limit",
            "0",
            "--write-timeout",
            "1",
            "--ping-interval",
            "0.5",
            "--idle-timeout",
            "1.5",
        ],
    );
    let mut deaf = server.client("deaf");
    deaf.settle();
    let mut half = Client::connect_path(server.addr, "/chat/half?room=quiet");
    half.settle();
    // Half a record: a header announcing 100 bytes, and 10 of them.
    let mut header = vec![0x17, 0x03, 0x03, 0x00, 100];
    header.extend_from_slice(&[0; 10]);
    half.ws
        .get_ref()
        .tcp()
        .try_clone()
        .unwrap()
        .write_all(&header)
        .unwrap();

    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    alice.settle();
    bob.settle();
    let text = "x".repeat(4000);
    let started = Instant::now();
    let mut sent = 0;
    // Enough to fill the deaf client's buffers many times over.
    while started.elapsed() < Duration::from_secs(4) {
        alice.send(&text);
        sent += 1;
        assert_eq!(bob.recv_chat().1.len(), 4000);
    }
    assert!(sent > 100, "only {sent} in 4 s");
    // Both happened while the others chatted.
    let deaf_left = server.wait_for_log("deaf left global_room");
    assert!(deaf_left.contains("too slow"), "{deaf_left}");
    let half_left = server.wait_for_log("half left quiet");
    assert!(half_left.contains("timed out"), "{half_left}");
    drop(deaf);
    drop(half);
    // Still chatting.
    alice.send("after");
    assert_eq!(bob.recv_chat(), ("alice".into(), "after".into()));
}

/// A message trickled one TLS record per byte is still one message begun
/// and not finished: `--message-timeout` ends it with 1008, as on a plain
/// socket, though records keep arriving more often than the ping interval.
#[test]
fn a_message_trickled_a_record_at_a_time_is_closed_with_1008() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &["--message-timeout", "1.5"]);
    let mut trickle = server.client("trickle");
    trickle.settle();
    // A masked text frame announcing 100 bytes, a byte (a record) at a time.
    let mut frame = vec![0x81, 0x80 | 100, 1, 2, 3, 4];
    frame.extend_from_slice(&[b'a'; 100]);
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < PATIENCE && server.log_count("message not finished") == 0 {
        let wire = trickle.ws.get_mut();
        if wire
            .write_all(&frame[sent..=sent])
            .and_then(|()| wire.flush())
            .is_err()
        {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(sent < frame.len(), "the whole frame went through");
    match trickle.recv_close() {
        crate::support::Closed::Frame(code, reason) => {
            assert_eq!(code, 1008);
            assert!(reason.contains("message not finished"), "{reason}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Connections still in their handshake hold start places, as those still
/// sending their request head do: past `--max-starting-per-ip`, the next
/// one from that address is refused, with a TLS alert (a client that
/// speaks TLS can read nothing else before a handshake).
#[test]
fn handshakes_take_start_places() {
    let (certs, redis) = (Certs::new(), Redis::start());
    let server = tls_server(&certs, &redis, &["--max-starting-per-ip", "2"]);
    let _silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    eventually("two connections starting", || {
        server
            .thread_policies()
            .iter()
            .filter(|(name, _)| name.starts_with("tc-start"))
            .count()
            == 2
    });
    let mut refused = TcpStream::connect(server.addr).unwrap();
    refused.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer);
    // Alert (21), TLS 1.2 framing, 2 bytes: fatal (2), internal_error (80).
    assert_eq!(answer, [21, 3, 3, 0, 2, 2, 80]);
    server.wait_for_log("still starting");
    // A client that does finish its handshake gets in once places free up.
    drop(_silent);
    server.steady_thread_count();
    let mut alice = server.client("alice");
    alice.settle();
}
