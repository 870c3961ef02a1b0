//! The real `threadchat` binary on port 0, killed on drop, with its log.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

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

    /// Starts threadchat on `wss://` with a certificate of its own (read
    /// at start; its clients trust its CA: see [`Wire`]), with `args`.
    #[cfg(all(feature = "tls", target_os = "linux"))]
    pub fn start_tls(args: &[&str]) -> Server {
        let certs = Certs::new();
        let tls = certs.server_args();
        let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        Server::start(&all)
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

    /// Starts the binary on the Redis `url` names (a Sentinel or Cluster
    /// URL, say), without a rate limit, with extra arguments.
    pub fn on_redis(url: &str, args: &[&str]) -> Server {
        let mut all = vec!["--redis", url, "--rate-limit", "0"];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    /// Runs the binary on the Redis `url` names, which must fail at start
    /// with one line of error that contains `expected`.
    pub fn fails_on_redis(url: &str, expected: &str) {
        Server::fails_to_start(&["--redis", url], expected);
    }

    /// Runs the binary (port 0, no `THREADCHAT_REDIS`) with `args`, which
    /// must make it fail at start with one line of error that contains
    /// `expected`.
    pub fn fails_to_start(args: &[&str], expected: &str) {
        let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
            .args(["--port", "0"])
            .args(args)
            .env_remove("THREADCHAT_REDIS")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{args:?}: {err}");
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
        let line = server.wait_for_log("threadchat listening on ");
        let addr = line
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("the listening line names the address");
        server.addr = addr.parse().expect("a socket address");
        // Served over TLS: its clients trust the CA beside its certificate
        // (see `Certs`).
        #[cfg(feature = "tls")]
        if let Some(at) = args.iter().position(|arg| *arg == "--tls-cert") {
            let cert = std::path::Path::new(args[at + 1]);
            let ca = std::fs::read(cert.with_file_name("ca.pem")).expect("ca.pem beside the cert");
            trust(server.addr, &ca);
        }
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

    /// Every line the server logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// How many log lines contain `needle` so far.
    pub fn log_count(&self, needle: &str) -> usize {
        let lines = self.log.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Threads the server process has right now.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The server's threads once no connection is in its start: a start
    /// thread lives until the accept loop joins it, a moment after its
    /// client is in, so a count taken earlier may include it (and later
    /// counts not, which is no leak).
    pub fn steady_thread_count(&self) -> usize {
        crate::support::eventually("no connection in its start", || {
            !self
                .thread_policies()
                .iter()
                .any(|(name, _)| name.starts_with("tc-start"))
        });
        self.thread_count()
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
    /// read and the server has taken it (or the status line, or the
    /// refusal, if not).
    pub fn raw_upgrade(&self, path: &str, extra: &str) -> Result<TcpStream, String> {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let status = send_upgrade(&mut stream, &self.addr.to_string(), path, extra);
        if !status.contains(" 101 ") {
            return Err(status);
        }
        // A refusal is told over the WebSocket; a chat starts with its welcome.
        match Refusal::from_frames(&stream) {
            Some(refused) => Err(refused.to_string()),
            None => Ok(stream),
        }
    }

    /// A WebSocket upgrade to `path` the server refuses over the WebSocket,
    /// sent raw: the refusal, and the socket, still open, for a test to go
    /// on writing to (as a hostile client does after its refusal).
    pub fn refused_upgrade(&self, path: &str) -> (TcpStream, Refusal) {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let status = send_upgrade(&mut stream, &self.addr.to_string(), path, "");
        assert!(status.contains(" 101 "), "{path}: {status}");
        let refusal =
            Refusal::from_frames(&stream).unwrap_or_else(|| panic!("{path}: taken, not refused"));
        (stream, refusal)
    }

    /// A WebSocket upgrade to `path` with `extra` header lines, sent raw:
    /// how the server refused it (a plain status, or over the WebSocket: see
    /// [`Refusal`]), or `None` when it took it.
    pub fn refusal(&self, path: &str, extra: &str) -> Option<Refusal> {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut stream = Wire::over(stream, self.addr).unwrap();
        let status = send_upgrade(&mut stream, "localhost", path, extra);
        let status: u16 = status
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        if status == 101 {
            return Refusal::from_frames(stream);
        }
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body);
        Some(Refusal {
            status,
            reason: body.trim_end().to_owned(),
        })
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

    /// A client of this server, past its history and presence: in the
    /// room.
    pub fn settled(&self, nickname: &str) -> Client {
        let mut client = self.client(nickname);
        client.settle();
        client
    }

    /// A chat client named `nickname` (given raw, as it appears in the URL).
    pub fn client(&self, nickname: &str) -> Client {
        Client::connect(self.addr, nickname)
    }

    /// Sends raw bytes as an HTTP request; returns the status line and body.
    pub fn http(&self, request: &str) -> (String, String) {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut stream = Wire::over(stream, self.addr).unwrap();
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
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Its port may serve a plain server next.
        #[cfg(feature = "tls")]
        distrust(self.addr);
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

/// Sends an upgrade request for `path` (with `extra` header lines) and reads
/// the answer's head, byte by byte (frames may follow it): its status line.
fn send_upgrade(stream: &mut (impl Read + Write), host: &str, path: &str, extra: &str) -> String {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head);
    head.lines().next().unwrap_or_default().to_owned()
}
