//! Test helpers: a real `redis-server` on a free port, the real `threadchat`
//! binary on port 0, and a blocking WebSocket client.
//!
//! Everything started here is killed when its handle is dropped, so a failing
//! test leaves nothing behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// How long any single expected event may take before a test fails. Generous:
/// these are correctness tests, not timing tests.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A `redis-server` owned by one test, on a free port, with no persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// Starts (or restarts) Redis on a given port.
    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: the tests start their own Redis. \
                 Install it (e.g. `apt-get install redis-server`)",
            );
        let redis = Redis { child, port };
        let deadline = Instant::now() + PATIENCE;
        while redis.connection().is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> Option<redis::Connection> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        redis::cmd("PING").query::<String>(&mut con).ok()?;
        Some(con)
    }

    /// PUBLISH straight into Redis, as another program (or the Python
    /// original) would.
    pub fn publish(&self, channel: &str, payload: &str) {
        let mut con = self.connection().expect("redis is up");
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query::<i64>(&mut con)
            .unwrap();
    }

    /// Connected clients, not counting the one asking.
    pub fn client_count(&self) -> usize {
        let mut con = self.connection().expect("redis is up");
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        list.lines().count() - 1
    }

    /// Subscribers of a channel (PUBSUB NUMSUB).
    pub fn subscribers(&self, channel: &str) -> usize {
        let mut con = self.connection().expect("redis is up");
        let (_, n): (String, usize) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut con)
            .unwrap();
        n
    }

    /// Freezes this Redis (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Unfreezes it (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    /// Runs a command against this Redis, e.g. `CLIENT KILL TYPE pubsub`.
    pub fn command(&self, args: &[&str]) {
        let mut con = self.connection().expect("redis is up");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query::<redis::Value>(&mut con).unwrap();
    }

    /// Runs a command and returns its reply, converted.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut con = self.connection().expect("redis is up");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut con).unwrap()
    }

    /// The keys matching `pattern` (`KEYS`: fine on a test's own Redis).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.query(&["KEYS", pattern])
    }

    /// Kills this Redis (SIGKILL), as a crash would.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `check` holds, or fails the test with `what`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// The log a running server has written so far, and a way to wait on it.
#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running `threadchat` process.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<LogBook>,
}

impl Server {
    /// Starts threadchat relaying through `redis`.
    pub fn with_redis(redis: &Redis) -> Server {
        Server::start(&["--redis", &redis.url()])
    }

    /// Starts threadchat on `redis` with extra arguments.
    pub fn with_redis_and(redis: &Redis, args: &[&str]) -> Server {
        let url = redis.url();
        Server::start(&[&["--redis", url.as_str()], args].concat())
    }

    /// Starts threadchat with the in-process broker.
    pub fn in_process() -> Server {
        Server::start(&["--in-process"])
    }

    /// Starts the binary on 127.0.0.1, port 0, with extra arguments, and
    /// waits until it says where it listens.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_threadchat"));
        command.envs(env.iter().copied());
        command.args(["--host", "127.0.0.1", "--port", "0"]);
        if !args.contains(&"--log-level") {
            command.args(["--log-level", "debug"]);
        }
        let mut child = command
            .args(args)
            .env_remove("THREADCHAT_REDIS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the threadchat binary runs");
        let log = Arc::new(LogBook::default());
        let stderr = child.stderr.take().unwrap();
        let book = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[threadchat] {line}");
                book.lines.lock().unwrap().push(line);
                book.grew.notify_all();
            }
        });
        let mut server = Server {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let line = server.wait_for_log("listening on ws://");
        let addr = line
            .split("ws://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("the listening line names the address");
        server.addr = addr.parse().expect("a socket address");
        server
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_count(needle, 1)
    }

    /// Waits until `count` log lines contain `needle`; returns the last.
    pub fn wait_for_log_count(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            let found: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= count {
                return found[count - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle:?} (x{count}); log so far:\n{}",
                lines.join("\n")
            );
            lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// How many log lines contain `needle` so far.
    pub fn log_count(&self, needle: &str) -> usize {
        let lines = self.log.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Threads the server process has right now.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The scheduling policy of each of the server's threads, by name
    /// (`/proc/{pid}/task/{tid}/stat`: field 2 is the name, field 41 the
    /// policy; 0 is the default `SCHED_OTHER`, 3 is `SCHED_BATCH`).
    pub fn thread_policies(&self) -> Vec<(String, u32)> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).unwrap();
        tasks
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                let (head, rest) = stat.rsplit_once(')')?;
                let name = head.split_once('(')?.1.to_owned();
                // Fields from the third on follow the name.
                let policy = rest.split_whitespace().nth(41 - 3)?.parse().ok()?;
                Some((name, policy))
            })
            .collect()
    }

    /// File descriptors the server process has open right now.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Opens a WebSocket by hand: sends the upgrade request for `path` with
    /// `extra` header lines, and returns the socket once the `101` head is
    /// read (or the status line, if the answer is something else).
    pub fn raw_upgrade(&self, path: &str, extra: &str) -> Result<TcpStream, String> {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n",
            self.addr
        );
        stream.write_all(request.as_bytes()).unwrap();
        // Read the head byte by byte: frames may follow it.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&head);
        let status = head.lines().next().unwrap_or_default().to_owned();
        if status.contains(" 101 ") {
            Ok(stream)
        } else {
            Err(status)
        }
    }

    /// Sends a signal (by name, e.g. "TERM") to the server process.
    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    /// The value of a metric from `GET /metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
            .parse()
            .unwrap()
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "threadchat did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A chat client named `nickname` (given raw, as it appears in the URL).
    pub fn client(&self, nickname: &str) -> Client {
        Client::connect(self.addr, nickname)
    }

    /// Sends raw bytes as an HTTP request; returns the status line and body.
    pub fn http(&self, request: &str) -> (String, String) {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        // Lossy: after a 101, WebSocket frames follow the head.
        let response = String::from_utf8_lossy(&bytes);
        let status = response.lines().next().unwrap_or_default().to_owned();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// `GET path` and return the status line and body.
    pub fn get(&self, path: &str) -> (String, String) {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client observed instead of a message.
#[derive(Debug, PartialEq)]
pub enum Closed {
    /// A close frame with this code (and reason).
    Frame(u16, String),
    /// The TCP connection ended without a close frame.
    Dropped,
}

/// A blocking WebSocket chat client.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr, nickname: &str) -> Client {
        Client::try_connect(addr, nickname).unwrap_or_else(|e| panic!("connect as {nickname}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr, nickname: &str) -> Result<Client, tungstenite::Error> {
        Client::try_connect_path(addr, &format!("/chat/{nickname}"))
    }

    /// A WebSocket to any path.
    pub fn connect_path(addr: SocketAddr, path: &str) -> Client {
        Client::try_connect_path(addr, path).unwrap_or_else(|e| panic!("connect to {path}: {e}"))
    }

    pub fn try_connect_path(addr: SocketAddr, path: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tungstenite::client(url, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => unreachable!("blocking"),
        })?;
        Ok(Client { ws })
    }

    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }

    pub fn send_message(&mut self, message: Message) {
        self.ws.send(message).unwrap();
    }

    /// The next data frame, parsed as JSON (control frames are skipped).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    return serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                }
                Ok(Message::Binary(b)) => panic!("unexpected binary frame {b:?}"),
                Ok(Message::Close(frame)) => {
                    panic!("closed while waiting for a message: {frame:?}")
                }
                Ok(_) => continue,
                Err(e) => panic!("error while waiting for a message: {e}"),
            }
        }
    }

    /// The next frame that is not a room event (someone joining or leaving,
    /// the member list, the history sent at join).
    pub fn recv_live(&mut self) -> Value {
        loop {
            let frame = self.recv();
            let room_event = matches!(frame["type"].as_str(), Some("join" | "leave" | "presence"))
                || frame["history"] == true;
            if !room_event {
                return frame;
            }
        }
    }

    /// The next frame, which must be from the server and of the given type
    /// (`notice` or `error`), skipping room events; returns its text.
    pub fn recv_server(&mut self, kind: &str) -> String {
        let frame = self.recv_live();
        assert_eq!(frame["type"], kind, "expected a {kind} frame, got {frame}");
        assert_eq!(frame["nickname"], "server");
        frame["message"].as_str().unwrap().to_owned()
    }

    /// Reads up to the member list sent at join: from then on, the client is
    /// fully in the room (history and member list delivered).
    pub fn settle(&mut self) -> &mut Client {
        while self.recv()["type"] != "presence" {}
        self
    }

    /// The next text frame as it is (for `?format=text`).
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => return text.as_str().to_owned(),
                Ok(Message::Close(frame)) => panic!("closed while waiting for text: {frame:?}"),
                Ok(_) => continue,
                Err(e) => panic!("error while waiting for text: {e}"),
            }
        }
    }

    /// The next live chat message as (nickname, message), skipping room
    /// events.
    pub fn recv_chat(&mut self) -> (String, String) {
        let frame = self.recv_live();
        assert_eq!(frame["type"], "chat", "expected a chat frame, got {frame}");
        (
            frame["nickname"].as_str().unwrap().to_owned(),
            frame["message"].as_str().unwrap().to_owned(),
        )
    }

    /// Asserts that no chat, notice or error frame arrives within `quiet`
    /// (room events — joins, leaves, presence — are allowed).
    pub fn expect_nothing(&mut self, quiet: Duration) {
        self.ws.get_ref().set_read_timeout(Some(quiet)).unwrap();
        let result = loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    let room_event =
                        matches!(frame["type"].as_str(), Some("join" | "leave" | "presence"));
                    if !room_event {
                        break Ok(Message::Text(text));
                    }
                }
                other => break other,
            }
        };
        self.ws.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
        match result {
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Reads until the server closes; returns how.
    pub fn recv_close(&mut self) -> Closed {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(CloseFrame { code, reason }))) => {
                    return Closed::Frame(u16::from(code), reason.as_str().to_owned());
                }
                Ok(Message::Close(None)) => return Closed::Frame(1005, String::new()),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the server did not close the connection")
                }
                Err(_) => return Closed::Dropped,
            }
        }
    }

    /// A clean close from the client side.
    pub fn close(mut self) {
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }));
        // Wait for the server's close reply (or the connection's end).
        while self.ws.read().is_ok() {}
    }

    /// Drops the TCP connection without any close frame.
    pub fn drop_abruptly(self) {
        let stream = self.ws.into_inner();
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Declares `redis`, `redis_shared` (`--subscriptions shared`) and `in_process` variants of a test taking a `&Server`,
/// optionally with extra server arguments: `name => ["--flag", "value"]`.
macro_rules! with_both_brokers {
    ($($name:ident $(=> [$($arg:expr),*])?),* $(,)?) => {$(
        mod $name {
            #[test]
            fn redis() {
                let redis = crate::support::Redis::start();
                let url = redis.url();
                let args: &[&str] = &["--redis", &url, $($($arg),*)?];
                super::$name(&crate::support::Server::start(args));
            }
            #[test]
            fn redis_shared() {
                let redis = crate::support::Redis::start();
                let url = redis.url();
                let args: &[&str] =
                    &["--redis", &url, "--subscriptions", "shared", $($($arg),*)?];
                super::$name(&crate::support::Server::start(args));
            }
            #[test]
            fn in_process() {
                let args: &[&str] = &["--in-process", $($($arg),*)?];
                super::$name(&crate::support::Server::start(args));
            }
        }
    )*};
}
pub(crate) use with_both_brokers;

/// Declares `per_client` and `shared` variants of a test taking the extra
/// server arguments that choose the Redis subscription mode.
macro_rules! in_both_subscription_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn per_client() {
                super::$name(&[]);
            }
            #[test]
            fn shared() {
                super::$name(&["--subscriptions", "shared"]);
            }
        }
    )*};
}
pub(crate) use in_both_subscription_modes;
