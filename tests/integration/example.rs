//! The design's smallest form, `examples/minimal.rs`, and threadchat chat
//! with each other on one Redis: the example is wire-compatible with the
//! original app, and so with threadchat.
//!
//! `cargo test` builds the examples beside this binary; a filtered run
//! (`cargo test --test integration`) may not, hence the hint below.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Client, PATIENCE, Redis, Server, free_port};

/// The example, running; killed on drop.
struct Example(Child);

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Example {
    /// Starts the example on a free port; returns it and its address once
    /// it listens.
    fn start(redis: &Redis) -> (Example, SocketAddr) {
        // target/<profile>/deps/integration-… → target/<profile>/examples/minimal
        let test_binary = std::env::current_exe().unwrap();
        let profile_dir = test_binary.parent().and_then(|deps| deps.parent()).unwrap();
        let binary: PathBuf = profile_dir.join("examples").join("minimal");
        assert!(
            binary.exists(),
            "{} is missing: run `cargo build --examples` (plain `cargo test` builds it)",
            binary.display()
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(binary)
            .arg(format!("redis://127.0.0.1:{}", redis.port))
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("the example starts");
        let example = Example(child);
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the example did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        (example, addr)
    }
}

/// Waits until `count` connections are subscribed to the default room.
fn wait_for_subscribers(redis: &Redis, count: i64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, subscribed): (String, i64) = redis.query(&["PUBSUB", "NUMSUB", "global_room"]);
        if subscribed == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subscribed} subscribers, not {count}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_minimal_example_and_threadchat_chat_with_each_other() {
    let redis = Redis::start();
    let server = Server::with_redis(&redis);
    let (_example, addr) = Example::start(&redis);

    let mut mini = Client::connect_to_original(addr, "mini");
    wait_for_subscribers(&redis, 1);
    let mut rusty = server.client("rusty");

    // threadchat announces its joins on the room; the example forwards them.
    let join = mini.recv();
    assert_eq!(
        (&join["nickname"], &join["message"]),
        (&"rusty".into(), &"joined".into())
    );

    // The example publishes {"nickname", "message"}, which threadchat shows.
    mini.send(r#"{"message": "hello from the example"}"#);
    assert_eq!(
        rusty.recv_chat(),
        ("mini".into(), "hello from the example".into())
    );
    mini.send("plain text works too");
    assert_eq!(
        rusty.recv_chat(),
        ("mini".into(), "plain text works too".into())
    );

    // And back; the example's own messages were not echoed to it.
    rusty.send("hello from threadchat");
    let frame = mini.recv();
    assert_eq!(
        (&frame["nickname"], &frame["message"]),
        (&"rusty".into(), &"hello from threadchat".into())
    );

    // Two clients of the example chat through Redis too.
    let mut other = Client::connect_to_original(addr, "other");
    wait_for_subscribers(&redis, 3);
    other.send("hi mini");
    let frame = mini.recv();
    assert_eq!(
        (&frame["nickname"], &frame["message"]),
        (&"other".into(), &"hi mini".into())
    );
}
