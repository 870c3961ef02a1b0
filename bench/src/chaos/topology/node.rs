//! One `redis-server` of a replicated shape (a sentinel's master or
//! replica, a cluster node), and the few calls every shape makes to a node
//! by its port.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};

use crate::world::signal_pid;

/// A free port (and, for a cluster node, its bus port + 10,000 too).
pub(super) fn free_port(bus: bool) -> anyhow::Result<u16> {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !bus || (port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()) {
            return Ok(port);
        }
    }
}

/// One `redis-server` of a replicated shape, in a folder of its own (a
/// cluster node keeps its `nodes.conf` there across a restart). No
/// persistence: a restarted node comes back as a replica and syncs.
pub(crate) struct Node {
    pub(crate) port: u16,
    dir: PathBuf,
    /// Its arguments, but for those of one start (`--replicaof`).
    args: Vec<String>,
    /// `None` while killed.
    child: Option<Child>,
}

impl Node {
    pub(super) fn start(port: u16, args: &[&str], once: &[String]) -> anyhow::Result<Node> {
        let dir = std::env::temp_dir().join(format!("threadchat-chaos-node-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut node = Node {
            port,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        node.restart(once)?;
        Ok(node)
    }

    /// Starts the (killed) node again with its arguments and `once`.
    pub(super) fn restart(&mut self, once: &[String]) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // A replica syncs at once, not after waiting for others.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .args(once)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-server not found (apt-get install redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.connection().is_err() {
            ensure!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Whether it runs (it is not killed).
    pub(super) fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// `SIGKILL`: a crash.
    pub(super) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(super) fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("node {} is down", self.port))
    }

    pub(super) fn connection(&self) -> redis::RedisResult<redis::Connection> {
        connect(self.port)
    }

    pub(super) fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> anyhow::Result<T> {
        query(self.port, args)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = signal_pid(child.id(), "CONT");
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(con)
}

pub(super) fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> anyhow::Result<T> {
    let mut con = connect(port).with_context(|| format!("connecting to {port}"))?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut con)
        .with_context(|| format!("{} on {port}", args.join(" ")))
}

pub(super) fn find(nodes: &[Node], port: u16) -> anyhow::Result<&Node> {
    nodes
        .iter()
        .find(|n| n.port == port)
        .ok_or_else(|| anyhow!("no node of ours on port {port}"))
}

pub(super) fn find_mut(nodes: &mut [Node], port: u16) -> anyhow::Result<&mut Node> {
    nodes
        .iter_mut()
        .find(|n| n.port == port)
        .ok_or_else(|| anyhow!("no node of ours on port {port}"))
}
