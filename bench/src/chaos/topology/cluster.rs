//! Redis Cluster for the chaos run: three masters with a replica each,
//! joined by `redis-cli --cluster create`, and where each slot lives.

use std::process::Command;

use anyhow::{Context, anyhow, bail, ensure};

use super::node::{Node, find, find_mut, free_port};
use super::{Topology, log_key};

/// Three masters with a replica each (a node silent for 1 s is failed).
pub(crate) struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    pub(super) fn start(guard: &[&str]) -> anyhow::Result<Cluster> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // A replica may always be promoted.
                "--cluster-replica-validity-factor",
                "0",
            ];
            args.extend(guard);
            nodes.push(Node::start(free_port(true)?, &args, &[])?);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .context("redis-cli not found")?;
        ensure!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        Topology::wait(|| cluster.whole())?;
        Ok(cluster)
    }

    /// Every node, killed ones too.
    pub(super) fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    pub(super) fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .take(2)
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    pub(super) fn node(&self, port: u16) -> anyhow::Result<&Node> {
        find(&self.nodes, port)
    }

    pub(super) fn node_mut(&mut self, port: u16) -> anyhow::Result<&mut Node> {
        find_mut(&mut self.nodes, port)
    }

    /// Some live node.
    pub(super) fn any(&self) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.is_up() && n.connection().is_ok())
            .ok_or_else(|| anyhow!("no cluster node answers"))
    }

    pub(super) fn slot_of_room(&self, room: &str) -> anyhow::Result<u16> {
        self.any()?.query(&["CLUSTER", "KEYSLOT", &log_key(room)])
    }

    pub(super) fn master_of(&self, slot: u16) -> anyhow::Result<u16> {
        master_in(&self.any()?.query(&["CLUSTER", "SLOTS"])?, slot)?
            .ok_or_else(|| anyhow!("no master serves slot {slot}"))
    }

    pub(super) fn master_of_room(&self, room: &str) -> anyhow::Result<u16> {
        self.master_of(self.slot_of_room(room)?)
    }

    /// Those of `rooms` whose master is on `port`.
    pub(super) fn rooms_on(&self, port: u16, rooms: &[String]) -> Vec<String> {
        rooms
            .iter()
            .filter(|r| self.master_of_room(r).ok() == Some(port))
            .cloned()
            .collect()
    }

    /// The masters that serve slots, as a live node sees them.
    pub(super) fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let slots = self.any()?.query(&["CLUSTER", "SLOTS"])?;
        let mut masters: Vec<u16> = ranges(&slots)?.into_iter().map(|r| r.2).collect();
        masters.sort_unstable();
        masters.dedup();
        Ok(masters)
    }

    /// The port of a replica of the master on `master`.
    pub(super) fn replica_of(&self, master: u16) -> anyhow::Result<u16> {
        let id: String = self.node(master)?.query(&["CLUSTER", "MYID"])?;
        let lines: Vec<String> = self.node(master)?.query(&["CLUSTER", "REPLICAS", &id])?;
        lines
            .first()
            .and_then(|line| node_port(line))
            .ok_or_else(|| anyhow!("master {master} has no replica"))
    }

    /// Whole: every node says `cluster_state:ok`, sees no node failed and
    /// no slot moving, and serves the slots as the first node does; every
    /// master has a replica in sync.
    pub(super) fn whole(&self) -> anyhow::Result<()> {
        let mut first: Option<Vec<(u16, u16, u16)>> = None;
        for node in &self.nodes {
            ensure!(node.is_up(), "node {} is down", node.port);
            let info: String = node.query(&["CLUSTER", "INFO"])?;
            ensure!(info.contains("cluster_state:ok"), "{} is not ok", node.port);
            let view: String = node.query(&["CLUSTER", "NODES"])?;
            ensure!(
                !view.contains("fail") && !view.contains("->-") && !view.contains("-<-"),
                "{} sees a failed node or a moving slot",
                node.port
            );
            let repl: String = node.query(&["INFO", "replication"])?;
            ensure!(
                repl.contains("role:master") || repl.contains("master_link_status:up"),
                "replica {} is not in sync",
                node.port
            );
            // Its own line of `CLUSTER NODES`: slots follow the 8th field.
            let me = view.lines().find(|l| l.contains("myself")).unwrap_or("");
            let serves_slots = me.contains("master") && me.split(' ').count() > 8;
            ensure!(
                !serves_slots || !repl.contains("connected_slaves:0"),
                "master {} has no replica",
                node.port
            );
            let mut slots = ranges(&node.query(&["CLUSTER", "SLOTS"])?)?;
            slots.sort_unstable();
            match &first {
                None => first = Some(slots),
                Some(f) => ensure!(*f == slots, "nodes disagree on the slots"),
            }
        }
        Ok(())
    }

    /// Waits until `done` says so (an error counts as not yet).
    pub(super) fn wait_for(
        &self,
        mut done: impl FnMut(&Cluster) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        Topology::wait(|| {
            ensure!(done(self)?, "not yet");
            Ok(())
        })
    }
}

/// The port in a `CLUSTER NODES` line (`id 127.0.0.1:7000@17000 …`).
pub(super) fn node_port(line: &str) -> Option<u16> {
    let address = line.split(' ').nth(1)?;
    address.split('@').next()?.rsplit(':').next()?.parse().ok()
}

/// The (start, end, master port) ranges of a `CLUSTER SLOTS` reply.
pub(super) fn ranges(slots: &redis::Value) -> anyhow::Result<Vec<(u16, u16, u16)>> {
    let redis::Value::Array(entries) = slots else {
        bail!("unexpected CLUSTER SLOTS reply {slots:?}");
    };
    let mut out = Vec::new();
    for entry in entries {
        let redis::Value::Array(items) = entry else {
            bail!("unexpected CLUSTER SLOTS entry {entry:?}");
        };
        let redis::Value::Array(master) = &items[2] else {
            bail!("unexpected master {:?}", items[2]);
        };
        out.push((
            redis::from_redis_value(items[0].clone())?,
            redis::from_redis_value(items[1].clone())?,
            redis::from_redis_value(master[1].clone())?,
        ));
    }
    Ok(out)
}

/// The master serving `slot` in a `CLUSTER SLOTS` reply.
pub(super) fn master_in(slots: &redis::Value, slot: u16) -> anyhow::Result<Option<u16>> {
    Ok(ranges(slots)?
        .into_iter()
        .find(|(start, end, _)| (*start..=*end).contains(&slot))
        .map(|r| r.2))
}
