//! The Redis the instances are given, in one of three shapes
//! (`--topology`): one `redis-server` (see `world::Redis`); a master, its
//! replica and three sentinels (`redis+sentinel://`); or a Cluster of
//! three masters with a replica each (`redis+cluster://`). Each shape knows
//! how to do the faults that make sense for it (a failover, a slot moved)
//! and where a room's log lives now, so that the checker reads it from the
//! node that holds it, once the shape is whole again.
//!
//! These are small cousins of the integration tests' `support/sentinel.rs`
//! and `support/cluster.rs` (a binary cannot import test code), with
//! errors instead of panics: a harness that cannot heal its Redis says so
//! and stops.

mod cluster;
mod node;
mod sentinel;

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::fault::Fault;
use super::link::Link;
use super::rng::Rng;
use super::world::{Redis, signal_pid};
use cluster::{Cluster, master_in};
use node::{Node, query};
use sentinel::Sentinels;

/// The shape asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// One `redis-server` (restarts keep or lose its append-only file).
    One,
    /// A master, a replica and three sentinels.
    Sentinel,
    /// Three masters with a replica each.
    Cluster,
}

impl Kind {
    /// As written on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::One => "one",
            Kind::Sentinel => "sentinel",
            Kind::Cluster => "cluster",
        }
    }

    /// Why `fault` makes no sense on this shape, if it does not.
    pub(crate) fn refuses(self, fault: Fault) -> Option<&'static str> {
        match (self, fault) {
            (Kind::One, Fault::SentinelFailover) => Some("needs --topology sentinel"),
            (Kind::One, Fault::ClusterFailover | Fault::Migrate) => {
                Some("needs --topology cluster")
            }
            (Kind::Sentinel, Fault::ClusterFailover | Fault::Migrate) => {
                Some("needs --topology cluster")
            }
            (Kind::Cluster, Fault::SentinelFailover) => Some("needs --topology sentinel"),
            (Kind::Sentinel | Kind::Cluster, Fault::RestartEmpty | Fault::RestartKept) => Some(
                "restarts one lone Redis; on a replicated shape use sentinel-failover or \
                 cluster-failover (a master killed and restarted)",
            ),
            (
                Kind::Sentinel | Kind::Cluster,
                Fault::LinkCut | Fault::LinkSlow | Fault::LinkLossy,
            ) => {
                Some("the link faults put one lone Redis in a namespace of its own: --topology one")
            }
            _ => None,
        }
    }
}

/// The running shape.
pub(crate) enum Topology {
    One(Redis),
    Sentinel(Sentinels),
    Cluster(Cluster),
}

/// How long a shape may take to be whole again after a fault before the
/// run gives up (a sentinel looks at replicas every 10 s).
const PATIENCE: Duration = Duration::from_secs(60);

impl Topology {
    /// Starts the shape; with `min_replicas` > 0, a replicated master
    /// refuses writes unless that many replicas acknowledged within the
    /// last second (`min-replicas-to-write`, `min-replicas-max-lag 1`).
    /// `link`: the namespace a lone Redis is reached through, for the link
    /// faults (see `link`).
    pub(crate) fn start(
        kind: Kind,
        min_replicas: u32,
        link: Option<Link>,
    ) -> anyhow::Result<Topology> {
        let n = min_replicas.to_string();
        let guard: &[&str] = if min_replicas > 0 {
            &["--min-replicas-to-write", &n, "--min-replicas-max-lag", "1"]
        } else {
            &[]
        };
        Ok(match kind {
            Kind::One => Topology::One(Redis::start(link)?),
            Kind::Sentinel => Topology::Sentinel(Sentinels::start(guard)?),
            Kind::Cluster => Topology::Cluster(Cluster::start(guard)?),
        })
    }

    /// What the instances are given as `--redis`.
    pub(crate) fn url(&self) -> String {
        match self {
            Topology::One(redis) => redis.url(),
            Topology::Sentinel(s) => s.url(),
            Topology::Cluster(c) => c.url(),
        }
    }

    /// What instance slot `slot` is given as `--redis`: with the link
    /// faults, through its own link.
    pub(crate) fn url_for(&self, slot: usize) -> String {
        match self {
            Topology::One(redis) => redis.url_for(slot),
            _ => self.url(),
        }
    }

    /// The links to a lone Redis, if the link faults are on.
    pub(crate) fn link(&self) -> Option<&Link> {
        match self {
            Topology::One(redis) => redis.link.as_ref(),
            _ => None,
        }
    }

    /// The lone Redis, for the faults that restart it (refused elsewhere
    /// at start, see [`Kind::refuses`]).
    pub(crate) fn one(&mut self) -> anyhow::Result<&mut Redis> {
        match self {
            Topology::One(redis) => Ok(redis),
            _ => bail!("this fault needs --topology one"),
        }
    }

    /// `CLIENT KILL TYPE {kind}` (`pubsub`, `normal`) on every data node;
    /// how many were cut.
    pub(crate) fn kill_clients(&self, kind: &str) -> anyhow::Result<u64> {
        match self {
            Topology::One(redis) => redis.kill_clients(kind),
            Topology::Sentinel(s) => kill_clients(s.nodes(), kind),
            Topology::Cluster(c) => kill_clients(c.nodes(), kind),
        }
    }

    /// Stops a master (`SIGSTOP`) for `pause`, then lets it go on: the lone
    /// Redis, the sentinels' master, or the master of a room drawn from
    /// `rooms`. Longer than the shape's failure timeout (1 s), a stall is a
    /// failover, with the old master coming back to find it is one no more.
    pub(crate) fn stall(
        &self,
        pause: Duration,
        rng: &mut Rng,
        rooms: &[String],
    ) -> anyhow::Result<String> {
        let (node, on_it) = match self {
            Topology::One(redis) => {
                redis.signal("STOP")?;
                thread::sleep(pause);
                redis.signal("CONT")?;
                return Ok(format!("Redis stopped for {} ms", pause.as_millis()));
            }
            Topology::Sentinel(s) => (s.node(s.master_port()?)?, rooms.to_vec()),
            Topology::Cluster(c) => {
                let room = &rooms[rng.range(0, rooms.len() as u64 - 1) as usize];
                let port = c.master_of_room(room)?;
                (c.node(port)?, c.rooms_on(port, rooms))
            }
        };
        let mut before = Before::take(node, &on_it)?;
        signal_pid(node.pid()?, "STOP")?;
        thread::sleep(pause);
        signal_pid(node.pid()?, "CONT")?;
        before.watch(node.port, self)?;
        let lost = before.missing_now(self, &on_it)?;
        Ok(format!(
            "master on port {} stopped for {} ms; {lost}",
            node.port,
            pause.as_millis()
        ))
    }

    /// Waits until the shape is whole: a master that says so, with its
    /// replicas in sync, known as such by every sentinel or cluster node.
    pub(crate) fn wait_whole(&self) -> anyhow::Result<()> {
        Topology::wait(|| self.whole_now()).context("Redis not whole again")
    }

    /// Whether the shape is whole now (see [`Topology::wait_whole`]).
    fn whole_now(&self) -> anyhow::Result<()> {
        match self {
            Topology::One(_) => Ok(()),
            Topology::Sentinel(s) => s.whole(),
            Topology::Cluster(c) => c.whole(),
        }
    }

    /// A connection to the node that holds `room`'s keys now.
    pub(crate) fn room_connection(&self, room: &str) -> anyhow::Result<redis::Connection> {
        Ok(match self {
            Topology::One(redis) => redis.connection()?,
            Topology::Sentinel(s) => s.node(s.master_port()?)?.connection()?,
            Topology::Cluster(c) => c.node(c.master_of_room(room)?)?.connection()?,
        })
    }

    /// `sentinel-failover`: `SENTINEL FAILOVER`, or the master killed (and
    /// restarted as a replica once another master serves), a seeded choice.
    pub(crate) fn sentinel_failover(
        &mut self,
        rng: &mut Rng,
        rooms: &[String],
    ) -> anyhow::Result<String> {
        let Topology::Sentinel(_) = self else {
            bail!("sentinel-failover needs --topology sentinel");
        };
        self.wait_whole()?;
        let Topology::Sentinel(s) = self else {
            unreachable!()
        };
        let old = s.master_port()?;
        let mut before = Before::take(s.node(old)?, rooms)?;
        let how = if rng.range(0, 1) == 0 {
            s.ask_failover()?;
            s.wait_for_new_master(old)?;
            before.watch(old, self)?;
            "SENTINEL FAILOVER"
        } else {
            s.node_mut(old)?.kill();
            let new = s.wait_for_new_master(old)?;
            thread::sleep(rng.millis(1_000, 3_000));
            let replica_of = [
                "--replicaof".to_owned(),
                "127.0.0.1".into(),
                new.to_string(),
            ];
            s.node_mut(old)?.restart(&replica_of)?;
            self.wait_whole()?;
            "master killed, restarted as a replica"
        };
        let lost = before.missing_now(self, rooms)?;
        let Topology::Sentinel(s) = self else {
            unreachable!()
        };
        let new = s.master_port()?;
        Ok(format!("{how}: {old} -> {new}; {}; {lost}", before.lag))
    }

    /// `cluster-failover`: the master of a room drawn from `rooms` replaced
    /// by its replica, by `CLUSTER FAILOVER` on the replica or by killing
    /// the master (restarted later; it comes back as a replica).
    pub(crate) fn cluster_failover(
        &mut self,
        rng: &mut Rng,
        rooms: &[String],
    ) -> anyhow::Result<String> {
        let Topology::Cluster(_) = self else {
            bail!("cluster-failover needs --topology cluster");
        };
        self.wait_whole()?;
        let Topology::Cluster(c) = self else {
            unreachable!()
        };
        let room = rooms[rng.range(0, rooms.len() as u64 - 1) as usize].clone();
        let slot = c.slot_of_room(&room)?;
        let old = c.master_of(slot)?;
        let replica = c.replica_of(old)?;
        let on_it = c.rooms_on(old, rooms);
        let mut before = Before::take(c.node(old)?, &on_it)?;
        let how = if rng.range(0, 1) == 0 {
            let _: () = c.node(replica)?.query(&["CLUSTER", "FAILOVER"])?;
            c.wait_for(|c| Ok(c.master_of(slot)? != old))?;
            before.watch(old, self)?;
            "CLUSTER FAILOVER on its replica"
        } else {
            c.node_mut(old)?.kill();
            c.wait_for(|c| Ok(c.master_of(slot)? != old))?;
            thread::sleep(rng.millis(1_000, 3_000));
            c.node_mut(old)?.restart(&[])?;
            self.wait_whole()?;
            "master killed, restarted later"
        };
        let lost = before.missing_now(self, &on_it)?;
        let Topology::Cluster(c) = self else {
            unreachable!()
        };
        let new = c.master_of(slot)?;
        Ok(format!(
            "{how}: room {room} (slot {slot}) {old} -> {new}; {}; {lost}",
            before.lag
        ))
    }

    /// `migrate`: the slot of a room drawn from `rooms` moved, with its
    /// keys, to another master while the clients chat, as `redis-cli
    /// --cluster reshard` does; half-way (some keys moved, not all) it
    /// waits a little, so that the instances meet `ASK` and `TRYAGAIN`.
    pub(crate) fn migrate(&mut self, rng: &mut Rng, rooms: &[String]) -> anyhow::Result<String> {
        let Topology::Cluster(_) = self else {
            bail!("migrate needs --topology cluster");
        };
        self.wait_whole()?;
        let Topology::Cluster(c) = self else {
            unreachable!()
        };
        let room = rooms[rng.range(0, rooms.len() as u64 - 1) as usize].clone();
        let slot = c.slot_of_room(&room)?;
        let from = c.master_of(slot)?;
        let others: Vec<u16> = c.masters()?.into_iter().filter(|&m| m != from).collect();
        ensure!(!others.is_empty(), "no other master to move slot {slot} to");
        let to = others[rng.range(0, others.len() as u64 - 1) as usize];
        let (source, target) = (c.node(from)?, c.node(to)?);
        let source_id: String = source.query(&["CLUSTER", "MYID"])?;
        let target_id: String = target.query(&["CLUSTER", "MYID"])?;
        let slot_text = slot.to_string();
        let _: () = target.query(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id])?;
        let _: () = source.query(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id])?;
        let pause = rng.millis(200, 1_500);
        let mut moved = 0;
        // One key at a time, with the pause after the first: a room's keys
        // live apart for a while, as on a big reshard.
        loop {
            let keys: Vec<String> = source.query(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "1"])?;
            let Some(key) = keys.first() else { break };
            let port = to.to_string();
            let _: redis::Value =
                source.query(&["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key])?;
            moved += 1;
            if moved == 1 {
                thread::sleep(pause);
            }
        }
        // The new owner first, then the old, then everybody else (as
        // redis-cli does): no node sends a client back and forth.
        let mut order = vec![to, from];
        order.extend(c.masters()?.into_iter().filter(|m| *m != to && *m != from));
        for port in order {
            let _: () = c
                .node(port)?
                .query(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id])?;
        }
        c.wait_for(|c| {
            for node in c.nodes().filter(|n| n.is_up()) {
                if master_in(&node.query(&["CLUSTER", "SLOTS"])?, slot)? != Some(to) {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        self.wait_whole()?;
        Ok(format!(
            "room {room} (slot {slot}) moved {from} -> {to}, {moved} keys, {} ms half-way",
            pause.as_millis()
        ))
    }
}

/// A replicated master as a fault found it: its replicas' lag (as of
/// their last acknowledgement, once a second), and each room's log
/// entries, to say afterwards which of them the new master lacks. A master
/// that lives on through the fault (stopped, or demoted) is watched until
/// the shape is whole: what it took meanwhile counts too.
struct Before {
    lag: String,
    rooms: Vec<String>,
    logs: Vec<BTreeSet<String>>,
}

impl Before {
    fn take(master: &Node, rooms: &[String]) -> anyhow::Result<Before> {
        let info: String = master.query(&["INFO", "replication"])?;
        let offset = info_field(&info, "master_repl_offset").unwrap_or_default();
        let lags: Vec<String> = info
            .lines()
            .filter(|l| l.starts_with("slave"))
            .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("offset=")))
            .map(|o| {
                let o: i64 = o.trim().parse().unwrap_or(0);
                let master: i64 = offset.parse().unwrap_or(0);
                (master - o).to_string()
            })
            .collect();
        let mut logs = Vec::new();
        for room in rooms {
            logs.push(master.query(&["LRANGE", &log_key(room), "0", "-1"])?);
        }
        Ok(Before {
            lag: format!("replica behind by {} bytes", lags.join("/")),
            rooms: rooms.to_vec(),
            logs,
        })
    }

    /// Adds what the old master on `port` holds to the entries, again and
    /// again, until `topology` is whole (it has then synced with the new
    /// master, and holds nothing of its own any more).
    fn watch(&mut self, port: u16, topology: &Topology) -> anyhow::Result<()> {
        Topology::wait(|| {
            for (room, seen) in self.rooms.iter().zip(&mut self.logs) {
                if let Ok(now) = query::<Vec<String>>(port, &["LRANGE", &log_key(room), "0", "-1"])
                {
                    seen.extend(now);
                }
            }
            topology.whole_now()
        })
    }

    /// How many of the entries the old master held are not where each
    /// room's log is now.
    fn missing_now(&self, topology: &Topology, rooms: &[String]) -> anyhow::Result<String> {
        let mut missing = 0;
        let mut held = 0;
        let mut elsewhere = 0;
        let mut example = None;
        for (room, before) in rooms.iter().zip(&self.logs) {
            let mut con = topology.room_connection(room)?;
            let now: BTreeSet<String> = redis::cmd("LRANGE")
                .arg(log_key(room))
                .arg(0)
                .arg(-1)
                .query(&mut con)?;
            held += before.len();
            let ids: BTreeSet<String> = now.iter().filter_map(|e| message_id(e)).collect();
            for entry in before.difference(&now) {
                missing += 1;
                // The same message logged again, at another place?
                if message_id(entry).is_some_and(|id| ids.contains(&id)) {
                    elsewhere += 1;
                }
                if example.is_none() {
                    example = Some(entry.clone());
                }
            }
        }
        let mut said = format!(
            "{missing} of the {held} log entries the old master held are not on the new one \
             ({elsewhere} of them there at another place)"
        );
        if let Some(entry) = example {
            said.push_str(&format!(", such as {entry}"));
        }
        Ok(said)
    }
}

/// The `id` of a logged payload (the sender's connection and number).
fn message_id(entry: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(entry).ok()?;
    Some(v["id"].as_str()?.to_owned())
}

fn log_key(room: &str) -> String {
    format!("threadchat:{{{room}}}:log")
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn kill_clients<'a>(nodes: impl Iterator<Item = &'a Node>, kind: &str) -> anyhow::Result<u64> {
    let mut cut = 0;
    for node in nodes.filter(|n| n.is_up()) {
        cut += node.query::<u64>(&["CLIENT", "KILL", "TYPE", kind])?;
    }
    Ok(cut)
}

impl Topology {
    /// Retries `check` until it succeeds or [`PATIENCE`] runs out.
    fn wait(mut check: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match check() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("gave up after {} s", PATIENCE.as_secs())));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
