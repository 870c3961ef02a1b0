//! A Redis Cluster of real `redis-server` processes on free ports: three
//! masters, each with one replica, killed on drop; all over TLS (clients
//! and the cluster bus) with [`Cluster::start_tls`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A running cluster owned by one test.
pub struct Cluster {
    /// Every node, masters first (as `redis-cli --cluster create` was given
    /// them); a killed node is `None`.
    pub nodes: Vec<Option<Redis>>,
    /// Over TLS: the certificates' directory.
    tls: Option<PathBuf>,
}

/// A free port whose cluster-bus port (+10,000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    /// Starts six nodes and joins them: three masters with a replica each
    /// (a node is failed after 1 s of silence).
    pub fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// [`start`](Self::start), every node speaking only TLS (its cluster
    /// bus too) with the certificates in `certs`.
    #[cfg(all(feature = "tls", target_os = "linux"))]
    pub fn start_tls(certs: &Certs) -> Cluster {
        Cluster::start_with(Some(certs.dir()))
    }

    fn start_with(tls: Option<&Path>) -> Cluster {
        // A killed node's peers keep greeting its port, and meet whatever
        // node starts there next. In this process `free_port` never hands a
        // port out twice; another test process on the machine (a second
        // `cargo test`) may still have freed the port we got.
        (0..3)
            .find_map(|_| Cluster::try_start(tls))
            .expect("three clusters in a row were met by another's nodes")
    }

    fn try_start(tls: Option<&Path>) -> Option<Cluster> {
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                loop {
                    let port = free_cluster_port();
                    // A node's folder may hold the cluster state and data of
                    // an earlier test process's node on the same port.
                    let _ = std::fs::remove_dir_all(Redis::dir(port));
                    // Another test may take the port (or the bus port) first:
                    // then try another.
                    let options = [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // A replica syncs at once (not after 5 s, waiting
                        // for others), and may always be promoted.
                        "--repl-diskless-sync-delay",
                        "0",
                        "--cluster-replica-validity-factor",
                        "0",
                        "--tls-cluster",
                        if tls.is_some() { "yes" } else { "no" },
                    ];
                    let node = match tls {
                        Some(dir) => Redis::try_start_tls(port, dir, &options),
                        None => Redis::try_start_with(port, &options),
                    };
                    if let Some(node) = node {
                        break node;
                    }
                }
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let mut command = Command::new("redis-cli");
        if let Some(dir) = tls {
            let file = |name: &str| dir.join(name);
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(file("ca.pem"))
                .arg("--cert")
                .arg(file("client.pem"))
                .arg("--key")
                .arg(file("client.key"));
        }
        let status = command
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        if !status.status.success() {
            let said = String::from_utf8_lossy(&status.stdout);
            // Met by another test process's cluster (see `start`): the
            // nodes are dropped (killed), and others started.
            assert!(
                said.contains("is not empty"),
                "cluster create failed: {said}"
            );
            return None;
        }
        let cluster = Cluster {
            nodes: nodes.into_iter().map(Some).collect(),
            tls: tls.map(Path::to_owned),
        };
        cluster.wait_until_ok();
        Some(cluster)
    }

    /// `redis+cluster://` URL with two nodes as seeds (any one is enough).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .flatten()
            .take(2)
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let s = if self.tls.is_some() { "s" } else { "" };
        format!("redis{s}+cluster://{}", seeds.join(","))
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .flatten()
            .find(|node| node.port == port)
            .expect("a live node on that port")
    }

    /// Any live node.
    fn any(&self) -> &Redis {
        self.nodes.iter().flatten().next().expect("a live node")
    }

    /// The ports of the masters, as a live node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        let ranges: Vec<redis::Value> = self.any().query(&["CLUSTER", "SLOTS"]);
        for range in ranges {
            let (_, _, (_, port)): (u16, u16, (String, u16)) = first_three(range);
            if !masters.contains(&port) {
                masters.push(port);
            }
        }
        masters.sort_unstable();
        masters
    }

    /// The slot of a key (or channel), as the cluster computes it.
    pub fn slot(&self, key: &str) -> u16 {
        self.any().query(&["CLUSTER", "KEYSLOT", key])
    }

    /// The port of the master serving `slot`, as a live node sees it.
    pub fn master_of(&self, slot: u16) -> u16 {
        let ranges: Vec<redis::Value> = self.any().query(&["CLUSTER", "SLOTS"]);
        for range in ranges {
            let (start, end, (_, port)): (u16, u16, (String, u16)) = first_three(range);
            if (start..=end).contains(&slot) {
                return port;
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The master serving room `name` (its keys and shard channel).
    pub fn master_of_room(&self, name: &str) -> u16 {
        self.master_of(self.slot(&room_channel(name)))
    }

    /// One room name on each master, in the order of [`masters`](Self::masters).
    pub fn a_room_on_each_master(&self) -> Vec<String> {
        self.masters()
            .into_iter()
            .map(|master| {
                (0..)
                    .map(|i| format!("room-{i}"))
                    .find(|name| self.master_of_room(name) == master)
                    .unwrap()
            })
            .collect()
    }

    /// How many subscribe to shard `channel` on the node on `port`.
    pub fn shard_subscribers(&self, port: u16, channel: &str) -> usize {
        let reply: (String, usize) = self.node(port).query(&["PUBSUB", "SHARDNUMSUB", channel]);
        reply.1
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.as_ref().is_some_and(|n| n.port == port))
            .expect("a live node on that port");
        node.take().unwrap().kill();
    }

    /// Waits until another node serves what `old` served, and the cluster
    /// is whole again; returns the new master's port.
    pub fn wait_for_promotion(&self, slot: u16, old: u16) -> u16 {
        eventually("a replica is promoted", || self.master_of(slot) != old);
        self.wait_until_ok();
        self.master_of(slot)
    }

    /// Moves `slot`, with its keys, from its master to the master on `to`,
    /// as `redis-cli --cluster reshard` does; `meanwhile` runs when the keys
    /// have moved and the slot not yet (its old master answers `ASK`).
    pub fn migrate(&self, slot: u16, to: u16, meanwhile: impl FnOnce()) {
        let from = self.master_of(slot);
        let (source, target) = (self.node(from), self.node(to));
        let source_id: String = source.query(&["CLUSTER", "MYID"]);
        let target_id: String = target.query(&["CLUSTER", "MYID"]);
        let slot_text = slot.to_string();
        target.command(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id]);
        source.command(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id]);
        loop {
            let keys: Vec<String> = source.query(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"]);
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys.iter().map(String::as_str));
            source.command(&migrate);
        }
        meanwhile();
        for node in [target, source] {
            node.command(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]);
        }
        eventually("every node knows the slot moved", || {
            self.nodes.iter().flatten().all(|node| {
                let ranges: Vec<redis::Value> = node.query(&["CLUSTER", "SLOTS"]);
                ranges.into_iter().any(|range| {
                    let (start, end, (_, port)): (u16, u16, (String, u16)) = first_three(range);
                    (start..=end).contains(&slot) && port == to
                })
            })
        });
    }

    /// Waits until every node says the cluster is whole, and every
    /// replica has synced with its master (one that has not may not be
    /// promoted).
    fn wait_until_ok(&self) {
        for node in self.nodes.iter().flatten() {
            eventually("the cluster is whole", || {
                let info: String = node.query(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok")
            });
            eventually("the replicas are in sync", || {
                let info: String = node.query(&["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
        }
    }
}

/// A named room's shard channel on a cluster.
pub fn room_channel(name: &str) -> String {
    format!("threadchat:room:{{{name}}}")
}

/// A `CLUSTER SLOTS` entry's start, end and master.
fn first_three(range: redis::Value) -> (u16, u16, (String, u16)) {
    let redis::Value::Array(items) = range else {
        panic!("unexpected CLUSTER SLOTS entry {range:?}")
    };
    let start = redis::from_redis_value(items[0].clone()).unwrap();
    let end = redis::from_redis_value(items[1].clone()).unwrap();
    let redis::Value::Array(master) = &items[2] else {
        panic!("unexpected master {:?}", items[2])
    };
    let host = redis::from_redis_value(master[0].clone()).unwrap();
    let port = redis::from_redis_value(master[1].clone()).unwrap();
    (start, end, (host, port))
}
