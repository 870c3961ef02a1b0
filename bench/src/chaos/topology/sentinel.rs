//! Redis Sentinel for the chaos run: a master, its replica and three
//! sentinels, all on free ports, and what a failover needs of them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, anyhow, ensure};

use super::Topology;
use super::node::{Node, find, find_mut, free_port, query};

/// The master name the sentinels use.
pub(super) const MASTER_NAME: &str = "mymaster";

/// A master, a replica and three sentinels (quorum 2; a master silent for
/// 1 s is down).
pub(crate) struct Sentinels {
    nodes: Vec<Node>,
    sentinels: Vec<Child>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl Sentinels {
    pub(super) fn start(guard: &[&str]) -> anyhow::Result<Sentinels> {
        let master = Node::start(free_port(false)?, guard, &[])?;
        let replica_of = [
            "--replicaof".to_owned(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ];
        let replica = Node::start(free_port(false)?, guard, &replica_of)?;
        let master_port = master.port;
        let dir = std::env::temp_dir().join(format!("threadchat-chaos-sentinels-{master_port}"));
        std::fs::create_dir_all(&dir)?;
        let mut s = Sentinels {
            nodes: vec![master, replica],
            sentinels: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let port = free_port(false)?;
            let file = s.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &file,
                format!(
                    "port {port}\nbind 127.0.0.1\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n"
                ),
            )?;
            let child = Command::new("redis-server")
                .arg(&file)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("redis-server not found (apt-get install redis-server)")?;
            s.sentinels.push(child);
            s.ports.push(port);
        }
        Topology::wait(|| s.whole())?;
        Ok(s)
    }

    /// The master and the replica (either may be down).
    pub(super) fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    pub(super) fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    pub(super) fn node(&self, port: u16) -> anyhow::Result<&Node> {
        find(&self.nodes, port)
    }

    pub(super) fn node_mut(&mut self, port: u16) -> anyhow::Result<&mut Node> {
        find_mut(&mut self.nodes, port)
    }

    /// The master the first sentinel that answers names.
    pub(super) fn master_port(&self) -> anyhow::Result<u16> {
        self.ports
            .iter()
            .find_map(|&port| self.named_by(port).ok())
            .ok_or_else(|| anyhow!("no sentinel names a master"))
    }

    pub(super) fn named_by(&self, sentinel: u16) -> anyhow::Result<u16> {
        let (_, port): (String, u16) = query(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        )?;
        Ok(port)
    }

    /// Whole: every sentinel names the same master, which says it is one
    /// and has an online replica, and every sentinel sees one replica that
    /// is not down and the two other sentinels.
    pub(super) fn whole(&self) -> anyhow::Result<()> {
        let master = self.named_by(self.ports[0])?;
        for &port in &self.ports {
            ensure!(
                self.named_by(port)? == master,
                "sentinels disagree on the master"
            );
            let replicas: Vec<Vec<String>> = query(port, &["SENTINEL", "replicas", MASTER_NAME])?;
            ensure!(
                replicas.len() == 1,
                "sentinel {port} sees {} replicas",
                replicas.len()
            );
            let flags = field(&replicas[0], "flags").unwrap_or_default();
            ensure!(
                flags == "slave",
                "sentinel {port} sees the replica as {flags}"
            );
            let others: Vec<redis::Value> = query(port, &["SENTINEL", "sentinels", MASTER_NAME])?;
            ensure!(
                others.len() == 2,
                "sentinel {port} knows {} others",
                others.len()
            );
        }
        let info: String = query(master, &["INFO", "replication"])?;
        ensure!(info.contains("role:master"), "{master} is no master yet");
        ensure!(
            info.contains("connected_slaves:1") && info.contains("state=online"),
            "{master}'s replica is not in sync"
        );
        Ok(())
    }

    /// `SENTINEL FAILOVER`, retried while the sentinel finds no replica
    /// good enough yet.
    pub(super) fn ask_failover(&self) -> anyhow::Result<()> {
        Topology::wait(|| {
            query::<()>(self.ports[0], &["SENTINEL", "FAILOVER", MASTER_NAME]).map(|_| ())
        })
    }

    /// Waits until the sentinels name a master other than `old` that says
    /// it is one; returns it.
    pub(super) fn wait_for_new_master(&self, old: u16) -> anyhow::Result<u16> {
        let mut new = old;
        Topology::wait(|| {
            new = self.master_port()?;
            ensure!(new != old, "still {old}");
            let role: Vec<redis::Value> = query(new, &["ROLE"])?;
            ensure!(
                matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master"),
                "{new} is no master yet"
            );
            Ok(())
        })?;
        Ok(new)
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A value in a flat `[name, value, name, value, …]` reply.
pub(super) fn field(pairs: &[String], name: &str) -> Option<String> {
    pairs
        .chunks(2)
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair.get(1).cloned())
}
