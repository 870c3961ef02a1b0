//! threadchat and the original Python app on one Redis chat with each other.
//!
//! Needs a Python with FastAPI, uvicorn and redis; `make interop` makes one
//! (a venv under target/) and runs this test with `ORIGINAL_APP_PYTHON` set.
//! Ignored in plain `cargo test` so that Rust alone can run the suite.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(all(feature = "tls", target_os = "linux"))]
use crate::support::Certs;
use crate::support::{Client, PATIENCE, Redis, Server, free_port};

struct OriginalApp(Child);

impl Drop for OriginalApp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs the Python original's dependencies: run `make interop`"]
fn the_python_original_and_threadchat_chat_with_each_other() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let host = format!("127.0.0.1:{}", redis.port);
    chat_with_the_original(&server, &["--redis", &host]);
}

/// The same through a Redis that speaks only TLS: threadchat on
/// `rediss://` with the test's CA, the original on a `rediss://` URL.
#[cfg(all(feature = "tls", target_os = "linux"))]
#[test]
#[ignore = "needs the Python original's dependencies: run `make interop`"]
fn the_python_original_and_threadchat_chat_over_rediss() {
    let certs = Certs::new();
    let redis = Redis::start_tls(&certs, &[]);
    let (url, ca) = (redis.url(), certs.ca());
    let server = Server::start(&["--redis", &url, "--redis-ca", &ca]);
    let python_url = format!("{url}?ssl_ca_certs={ca}");
    chat_with_the_original(&server, &["--redis-url", &python_url]);
}

/// Starts the original app with `redis_args`, and has its client and one of
/// `server`'s chat with each other.
fn chat_with_the_original(server: &Server, redis_args: &[&str]) {
    let python = std::env::var("ORIGINAL_APP_PYTHON")
        .expect("ORIGINAL_APP_PYTHON names a python with fastapi, uvicorn and redis");
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/original_app.py");
    let _app = OriginalApp(
        Command::new(python)
            .arg(script)
            .args(["--port", &port.to_string()])
            .args(redis_args)
            .stdout(Stdio::null())
            .spawn()
            .expect("python starts"),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + PATIENCE * 3;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the original app did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut py = Client::connect_to_original(addr, "py");
    // Let the original's subscription settle (it subscribes only after
    // accepting the WebSocket), so that it hears rusty join.
    std::thread::sleep(Duration::from_millis(500));
    let mut rusty = server.client("rusty");

    // The original's clients send JSON with their nickname; it is published
    // raw, and threadchat shows it as a chat frame.
    py.send(r#"{"nickname": "py", "message": "hello from python"}"#);
    assert_eq!(rusty.recv_chat(), ("py".into(), "hello from python".into()));

    // What threadchat publishes, the original forwards to its client: first
    // rusty's join (printed by such a client as "rusty: joined"), then chat.
    let join = py.recv();
    assert_eq!(
        (&join["nickname"], &join["message"]),
        (&"rusty".into(), &"joined".into())
    );
    rusty.send("hello from threadchat");
    let frame = py.recv();
    assert_eq!(frame["nickname"], "rusty");
    assert_eq!(frame["message"], "hello from threadchat");
}
