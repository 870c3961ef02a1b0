//! A master, its replica and three sentinels, all real `redis-server`
//! processes on free ports, stopped on drop; all over TLS with
//! [`Sentinels::start_tls`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// The name the sentinels know the master by.
pub const MASTER_NAME: &str = "chat";

/// A Sentinel setup owned by one test.
pub struct Sentinels {
    /// The first master and its replica (either may be killed).
    pub servers: Vec<Option<Redis>>,
    sentinels: Vec<Child>,
    pub sentinel_ports: Vec<u16>,
    dir: PathBuf,
    /// Over TLS: the certificates' directory.
    tls: Option<PathBuf>,
}

impl Sentinels {
    /// Starts a master, a replica in sync with it, and three sentinels that
    /// know both and each other (quorum 2, a master is down after 1 s).
    pub fn start() -> Sentinels {
        Sentinels::start_with(None)
    }

    /// [`start`](Self::start), every server and sentinel speaking only
    /// TLS with the certificates in `certs`.
    #[cfg(all(feature = "tls", target_os = "linux"))]
    pub fn start_tls(certs: &Certs) -> Sentinels {
        Sentinels::start_with(Some(certs.dir()))
    }

    fn start_with(tls: Option<&Path>) -> Sentinels {
        let master = match tls {
            Some(dir) => Redis::start_tls_on(Redis::fresh_port(), dir, &[]),
            None => Redis::start(),
        };
        let master_port = master.port.to_string();
        let replica_of = ["--replicaof", "127.0.0.1", &master_port];
        let replica = match tls {
            Some(dir) => Redis::start_tls_on(Redis::fresh_port(), dir, &replica_of),
            None => Redis::start_with(Redis::fresh_port(), &replica_of),
        };
        eventually("the replica in sync", || {
            let info: String = replica.query(&["INFO", "replication"]);
            info.contains("master_link_status:up")
        });
        let dir = std::env::temp_dir().join(format!("threadchat-sentinel-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let file = dir.join(format!("sentinel-{port}.conf"));
            // The same options as a TLS Redis's, as configuration lines.
            let listen = match tls {
                Some(certs) => Redis::tls_options(port, certs)
                    .chunks(2)
                    .map(|pair| format!("{} {}\n", pair[0].trim_start_matches("--"), pair[1]))
                    .collect(),
                None => format!("port {port}\n"),
            };
            std::fs::write(
                &file,
                format!(
                    "{listen}bind 127.0.0.1\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n"
                ),
            )
            .unwrap();
            sentinels.push(spawn_sentinel(&file));
            sentinel_ports.push(port);
        }
        let setup = Sentinels {
            servers: vec![Some(master), Some(replica)],
            sentinels,
            sentinel_ports,
            dir,
            tls: tls.map(Path::to_owned),
        };
        for &port in &setup.sentinel_ports {
            eventually("each sentinel knows the replica and the others", || {
                let replicas = setup.query_sentinel::<Vec<redis::Value>>(port, "replicas");
                let others = setup.query_sentinel::<Vec<redis::Value>>(port, "sentinels");
                matches!((replicas, others), (Some(r), Some(o)) if r.len() == 1 && o.len() == 2)
            });
        }
        setup
    }

    /// `redis+sentinel://…/chat` for `--redis`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let s = if self.tls.is_some() { "s" } else { "" };
        format!("redis{s}+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The port of the server the sentinels name as master.
    pub fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = self
            .sentinel_ports
            .iter()
            .find_map(|&port| {
                let mut con = self.sentinel_connection(port)?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER_NAME)
                    .query(&mut con)
                    .ok()
            })
            .expect("a sentinel names the master");
        port
    }

    /// Kills the current master (SIGKILL); returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        let slot = self
            .servers
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|s| s.port == port))
            .expect("the master is one of ours");
        slot.take().unwrap().kill()
    }

    /// Asks a sentinel for a failover now (the master is demoted to a
    /// replica, not killed).
    pub fn fail_over(&self) {
        let mut con = self.sentinel_connection(self.sentinel_ports[0]).unwrap();
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER_NAME)
            .query(&mut con)
            .unwrap();
    }

    /// Kills every sentinel (SIGKILL); the master and its replica run on.
    pub fn kill_sentinels(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) every sentinel: frozen, each
    /// takes connections and answers nothing, as one cut off by a network
    /// that drops packets.
    pub fn freeze_sentinels(&self, frozen: bool) {
        for child in &self.sentinels {
            signal(child.id(), if frozen { "STOP" } else { "CONT" });
        }
    }

    /// Starts the killed sentinels again, on their ports, with what they
    /// wrote in their configuration; returns once each answers.
    pub fn restart_sentinels(&mut self) {
        for (child, port) in self.sentinels.iter_mut().zip(&self.sentinel_ports) {
            *child = spawn_sentinel(&self.dir.join(format!("sentinel-{port}.conf")));
        }
        for &port in &self.sentinel_ports {
            eventually("each sentinel answers again", || {
                self.query_sentinel::<Vec<redis::Value>>(port, "replicas")
                    .is_some()
            });
        }
    }

    /// Waits until the sentinels name a master other than `old` that says
    /// it is one.
    pub fn wait_for_new_master(&self, old: u16) -> u16 {
        let mut new = 0;
        eventually("a new master", || {
            new = self.master_port();
            new != old
                && self.servers.iter().flatten().any(|s| {
                    s.port == new && {
                        let role: Vec<redis::Value> = s.query(&["ROLE"]);
                        matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
                    }
                })
        });
        new
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

/// A sentinel running with the configuration `file`.
fn spawn_sentinel(file: &Path) -> Child {
    Command::new("redis-server")
        .arg(file)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs sentinels too")
}

impl Sentinels {
    fn sentinel_connection(&self, port: u16) -> Option<redis::Connection> {
        let s = if self.tls.is_some() { "s" } else { "" };
        let client = client(&format!("redis{s}://127.0.0.1:{port}"), self.tls.as_deref())?;
        client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()
    }

    /// `SENTINEL <what> chat` on the sentinel at `port`, if it answers.
    fn query_sentinel<T: redis::FromRedisValue>(&self, port: u16, what: &str) -> Option<T> {
        let mut con = self.sentinel_connection(port)?;
        redis::cmd("SENTINEL")
            .arg(what)
            .arg(MASTER_NAME)
            .query(&mut con)
            .ok()
    }
}
