//! The processes under test: one `redis-server` (with its own folder, so a
//! restart can keep or lose what it held) and several threadchat instances
//! on it, each on port 0. Every fault the schedule injects is a method here.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::link::Link;

/// How an instance follows its rooms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    PerClient,
    Shared,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::PerClient => "per-client",
            Mode::Shared => "shared",
        }
    }
}

/// One `redis-server`, always started with an append-only file fsynced on
/// every write in a folder of its own: a restart "with persistence" finds
/// it, a restart "without" wipes the folder first.
pub(crate) struct Redis {
    pub(crate) port: u16,
    dir: PathBuf,
    child: Child,
    /// The namespace and veth pairs it is reached through, for the link
    /// faults; `None`: on 127.0.0.1. Dropped after the process.
    pub(crate) link: Option<Link>,
}

impl Redis {
    pub(crate) fn start(link: Option<Link>) -> anyhow::Result<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("threadchat-chaos-redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let child = spawn_redis(port, &dir, link.as_ref())?;
        let redis = Redis {
            port,
            dir,
            child,
            link,
        };
        redis.wait_up()?;
        Ok(redis)
    }

    /// Where the harness itself reaches Redis.
    pub(crate) fn url(&self) -> String {
        match &self.link {
            Some(link) => format!("redis://{}:{}", link.harness_addr(), self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Where instance slot `slot` reaches Redis (through its own link).
    pub(crate) fn url_for(&self, slot: usize) -> String {
        match &self.link {
            Some(link) => format!("redis://{}:{}", link.addr_for(slot), self.port),
            None => self.url(),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.connection().is_err() {
            ensure!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub(crate) fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(con)
    }

    /// `CLIENT KILL TYPE {kind}` (`pubsub`, `normal`; the harness's own
    /// connection is spared); how many were cut.
    pub(crate) fn kill_clients(&self, kind: &str) -> anyhow::Result<u64> {
        let mut con = self.connection()?;
        Ok(redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query(&mut con)?)
    }

    /// `SIGSTOP` (`stop`) or `SIGCONT`: a Redis that stalls, as one swapping
    /// or forking a big dataset does, without closing a connection.
    pub(crate) fn signal(&self, signal: &str) -> anyhow::Result<()> {
        signal_pid(self.pid(), signal)
    }

    /// Kills Redis (`SIGKILL`, a crash), waits `down`, and starts it again
    /// on the same port: with what its append-only file held (`keep`), or
    /// empty.
    pub(crate) fn restart(&mut self, keep: bool, down: Duration) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        if !keep {
            std::fs::remove_dir_all(&self.dir)?;
            std::fs::create_dir_all(&self.dir)?;
        }
        thread::sleep(down);
        self.child = spawn_redis(self.port, &self.dir, self.link.as_ref())?;
        self.wait_up()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = signal_pid(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `redis-server` on 127.0.0.1, or in the link's namespace on each
/// of its addresses (`ip netns exec` becomes Redis: the pid is Redis's).
fn spawn_redis(port: u16, dir: &PathBuf, link: Option<&Link>) -> anyhow::Result<Child> {
    let mut command = match link {
        Some(link) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", link.ns(), "redis-server", "--bind"]);
            command.args(link.redis_addrs().iter().map(ToString::to_string));
            // Protected mode answers only loopback; the namespace holds
            // nothing but the harness's own pairs.
            command.args(["--protected-mode", "no"]);
            command
        }
        None => {
            let mut command = Command::new("redis-server");
            command.args(["--bind", "127.0.0.1"]);
            command
        }
    };
    command
        .args(["--port", &port.to_string()])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server not found (apt-get install redis-server)")
}

pub(crate) fn signal_pid(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// A threadchat instance; killed on drop.
pub(crate) struct Instance {
    pub(crate) mode: Mode,
    pub(crate) addr: SocketAddr,
    child: Child,
    /// Reads its log; ends when the process does.
    reader: Option<thread::JoinHandle<()>>,
}

impl Instance {
    /// Starts `binary` on port 0 against the Redis at `url`, with limits off that
    /// would refuse a harness whose clients all come from 127.0.0.1, and a
    /// log that can hold the whole run (so the checker can read it).
    pub(crate) fn start(
        binary: &str,
        url: &str,
        mode: Mode,
        wait_replicas: usize,
        log: Arc<Mutex<Vec<String>>>,
    ) -> anyhow::Result<Instance> {
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", "0", "--log-level", "info"])
            .args(["--redis", url, "--subscriptions", mode.name()])
            .args(["--history", "10000", "--history-bytes", "16777216"])
            .args(["--rate-limit", "0", "--max-connections-per-ip", "0"])
            .args(["--max-starting-per-ip", "0", "--new-rooms-per-minute", "0"])
            .args(["--wait-replicas", &wait_replicas.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {binary} (cargo build first)"))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        // Its log is kept for the report (and the listening line read).
        let reader = thread::Builder::new()
            .name(format!("log-{pid}"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ws://").nth(1) {
                        let addr = rest.split('/').next().unwrap_or("").to_owned();
                        let _ = tx.send(addr);
                    } else if line.contains("WARN") || line.contains("ERROR") {
                        log.lock().expect("log").push(format!("[{pid}] {line}"));
                    }
                }
            })?;
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .and_then(|addr| addr.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            bail!("threadchat did not say where it listens (run it by hand to see why)");
        };
        Ok(Instance {
            mode,
            addr,
            child,
            reader: Some(reader),
        })
    }

    /// `kill -9`: the instance vanishes without a goodbye.
    pub(crate) fn kill(self) {
        drop(self);
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The instances clients may connect to (a killed one is `None`), shared
/// with the clients so that they reconnect to one that lives.
#[derive(Clone, Default)]
pub(crate) struct Directory(Arc<Mutex<Vec<Option<SocketAddr>>>>);

impl Directory {
    pub(crate) fn set(&self, slot: usize, addr: Option<SocketAddr>) {
        let mut all = self.0.lock().expect("directory");
        if all.len() <= slot {
            all.resize(slot + 1, None);
        }
        all[slot] = addr;
    }

    /// The first live instance at or after `slot` (wrapping), and its slot.
    pub(crate) fn live_from(&self, slot: usize) -> Option<(usize, SocketAddr)> {
        let all = self.0.lock().expect("directory");
        (0..all.len())
            .map(|i| (slot + i) % all.len())
            .find_map(|i| all[i].map(|a| (i, a)))
    }
}
