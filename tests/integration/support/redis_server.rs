//! A real `redis-server` on a free port, killed on drop; over TLS too
//! (`rediss://`), with certificates a test made ([`Certs`](super::Certs)).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// A `redis-server` owned by one test, on a free port, with no persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
    /// Speaking TLS only: the directory of its certificates (a `Certs`
    /// the test keeps), whose `client.pem` the helpers here show.
    tls: Option<PathBuf>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(Redis::fresh_port())
    }

    /// A free port for a new Redis, with its folder emptied: an earlier
    /// test process may have left a `dump.rdb` there (a replica saves what
    /// it receives), which a Redis started in it would load — another
    /// test's room log, or, for a cluster node, "Node … is not empty".
    pub fn fresh_port() -> u16 {
        let port = free_port();
        let _ = std::fs::remove_dir_all(Redis::dir(port));
        port
    }

    /// Starts (or restarts) Redis on a given port.
    pub fn start_on(port: u16) -> Redis {
        Redis::start_with(port, &[])
    }

    /// Starts Redis on a given port with more options
    /// (`["--replicaof", "127.0.0.1", "6380"]`).
    pub fn start_with(port: u16, args: &[&str]) -> Redis {
        Redis::try_start_with(port, args).unwrap_or_else(|| {
            panic!("port {port} is another process's: the Redis there is not the one started")
        })
    }

    /// [`start_with`](Self::start_with), or `None` if what answers on the
    /// port is not the Redis just started: tests run at once, and a free
    /// port found by one may be taken by another before its Redis binds it.
    pub fn try_start_with(port: u16, args: &[&str]) -> Option<Redis> {
        Redis::try_start(port, args, None)
    }

    /// A Redis that speaks only TLS on a fresh port, with the certificates
    /// in `certs` (its own `server.pem`, clients' certificates checked
    /// against `ca.pem` if they show one: `--tls-auth-clients optional`,
    /// unless `args` say otherwise).
    #[cfg(all(feature = "tls", target_os = "linux"))]
    pub fn start_tls(certs: &super::Certs, args: &[&str]) -> Redis {
        Redis::start_tls_on(Redis::fresh_port(), certs.dir(), args)
    }

    /// Starts (or restarts) a TLS-only Redis on `port` with the
    /// certificates in `dir` (see [`start_tls`](Self::start_tls)).
    pub fn start_tls_on(port: u16, dir: &Path, args: &[&str]) -> Redis {
        Redis::try_start(port, args, Some(dir)).unwrap_or_else(|| {
            panic!("port {port} is another process's: the Redis there is not the one started")
        })
    }

    /// [`start_tls_on`](Self::start_tls_on), or `None` if the port is
    /// taken.
    pub fn try_start_tls(port: u16, dir: &Path, args: &[&str]) -> Option<Redis> {
        Redis::try_start(port, args, Some(dir))
    }

    /// The options that make a Redis (or a sentinel) speak TLS only on
    /// `port`, with the certificates in `dir`.
    pub fn tls_options(port: u16, dir: &Path) -> Vec<String> {
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            file("server.pem"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.pem"),
            // What it shows as a client (a replica, a sentinel, a cluster
            // bus peer): `server.pem` is for servers only.
            "--tls-client-cert-file".into(),
            file("client.pem"),
            "--tls-client-key-file".into(),
            file("client.key"),
            "--tls-auth-clients".into(),
            "optional".into(),
            // Replicas and cluster buses speak TLS too.
            "--tls-replication".into(),
            "yes".into(),
        ]
    }

    fn try_start(port: u16, args: &[&str], tls: Option<&Path>) -> Option<Redis> {
        // A folder of its own: a replica writes the data it receives to
        // disk, and a Redis started where another left a dump.rdb would
        // load it.
        let dir = Redis::dir(port);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(
                tls.map(|tls| Redis::tls_options(port, tls))
                    .unwrap_or_default(),
            )
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: the tests start their own Redis. \
                 Install it (e.g. `apt-get install redis-server`)",
            );
        let mut redis = Redis {
            child,
            port,
            tls: tls.map(Path::to_owned),
        };
        let deadline = Instant::now() + PATIENCE;
        let mut con = loop {
            if let Some(con) = redis.connection() {
                break con;
            }
            if let Ok(Some(_)) = redis.child.try_wait() {
                return None; // it could not bind the port
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        // The one answering is ours.
        let info: String = redis::cmd("INFO").arg("server").query(&mut con).ok()?;
        let pid = format!("process_id:{}", redis.child.id());
        info.lines().any(|line| line.trim() == pid).then_some(redis)
    }

    /// The folder a Redis on `port` runs in (restarted on the same port,
    /// it finds what it saved there).
    pub fn dir(port: u16) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("threadchat-test-redis-{port}"))
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://…` over TLS.
    pub fn url(&self) -> String {
        let s = if self.tls.is_some() { "s" } else { "" };
        format!("redis{s}://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> Option<redis::Connection> {
        let client = client(&self.url(), self.tls.as_deref())?;
        // A TLS handshake (and the `redis` crate's reading of the system's
        // roots for each connection) takes longer on a loaded machine.
        let timeout = Duration::from_secs(if self.tls.is_some() { 5 } else { 1 });
        let mut con = client.get_connection_with_timeout(timeout).ok()?;
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

    /// A master and its replica, in sync (the replica `online`, so that a
    /// `WAIT` on the master counts it).
    pub fn with_replica() -> (Redis, Redis) {
        let master = Redis::start();
        let replica = Redis::start_with(
            Redis::fresh_port(),
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        );
        super::eventually("the replica is in sync", || {
            master
                .query::<String>(&["INFO", "replication"])
                .contains("state=online")
        });
        (master, replica)
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

/// A client for `url`: with `tls` (a certificates directory), trusting
/// its `ca.pem` and showing its `client.pem`.
pub(super) fn client(url: &str, tls: Option<&Path>) -> Option<redis::Client> {
    match tls {
        None => redis::Client::open(url).ok(),
        #[cfg(feature = "tls")]
        Some(dir) => {
            let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
            let certificates = redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: read("client.pem"),
                    client_key: read("client.key"),
                }),
                root_cert: Some(read("ca.pem")),
            };
            redis::Client::build_with_tls(url, certificates).ok()
        }
        #[cfg(not(feature = "tls"))]
        Some(_) => unreachable!("TLS Redis servers are started only with the `tls` feature"),
    }
}

pub(super) fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
