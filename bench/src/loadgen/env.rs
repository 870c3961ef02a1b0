//! The processes under test (a `redis-server` and a release `threadchat`,
//! or for relay `async` the async reference server, started on free ports
//! and stopped on drop), and what `/proc` says of them.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::ClientConfig;

use super::Args;
use super::tls::Certs;

/// The Redis servers (none, one, or a cluster's masters) and a threadchat
/// (or the async reference), stopped on drop.
pub(crate) struct Env {
    /// Every redis-server, with its port.
    pub(crate) redis: Vec<(Child, u16)>,
    pub(crate) server: Child,
    pub(crate) addr: SocketAddr,
    /// With `--tls`: the certificates the server was started with, and what
    /// its clients connect with ([`Env::tls`]).
    certs: Option<Certs>,
}

/// The relay that is not threadchat: the async reference server
/// (`bench/reference`), relaying through a Redis of its own.
pub(crate) const ASYNC: &str = "async";

/// Masters of the cluster that relay `redis-cluster` starts (Redis
/// Cluster's minimum; no replicas: they would only take CPU here).
pub(crate) const CLUSTER_MASTERS: usize = 3;

impl Env {
    /// Starts Redis (for a Redis relay: one server, or with
    /// `redis-cluster…` a cluster of [`CLUSTER_MASTERS`] masters without
    /// replicas) and threadchat with `extra` arguments (which must say
    /// `--history`).
    pub(crate) fn start(args: &Args, broker: &str, extra: &[&str]) -> anyhow::Result<Env> {
        Env::start_with(args, broker, extra, false, false)
    }

    /// Like [`Env::start`], serving `wss://` when `tls` (a CA and a
    /// certificate made for this run).
    pub(crate) fn start_over(
        args: &Args,
        broker: &str,
        extra: &[&str],
        tls: bool,
    ) -> anyhow::Result<Env> {
        Env::start_with(args, broker, extra, false, tls)
    }

    /// Like [`Env::start`], with the server's own per-address limits
    /// (`--max-connections-per-ip`, `--max-starting-per-ip`) left on: for
    /// the attacks that come from several addresses.
    pub(crate) fn start_limited(args: &Args, broker: &str, extra: &[&str]) -> anyhow::Result<Env> {
        Env::start_with(args, broker, extra, true, false)
    }

    fn start_with(
        args: &Args,
        broker: &str,
        extra: &[&str],
        per_address_limits: bool,
        tls: bool,
    ) -> anyhow::Result<Env> {
        if broker == ASYNC {
            return Env::start_reference(args, extra, tls);
        }
        let mut relay = vec!["--in-process".to_owned()];
        let mut redis = Vec::new();
        if broker.starts_with("redis-cluster") {
            for _ in 0..CLUSTER_MASTERS {
                let port = cluster_port()?;
                redis.push((
                    start_redis(
                        port,
                        &[
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            &format!("nodes-{port}.conf"),
                        ],
                    )?,
                    port,
                ));
            }
            let nodes: Vec<String> = redis
                .iter()
                .map(|(_, port)| format!("127.0.0.1:{port}"))
                .collect();
            let created = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .context("redis-cli")?;
            anyhow::ensure!(
                created.status.success(),
                "redis-cli --cluster create failed"
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            for (_, port) in &redis {
                while !info(*port, "CLUSTER INFO").contains("cluster_state:ok") {
                    anyhow::ensure!(Instant::now() < deadline, "the cluster did not form");
                    thread::sleep(Duration::from_millis(50));
                }
            }
            relay = vec![
                "--redis".into(),
                format!("redis+cluster://{}", nodes.join(",")),
            ];
        } else if broker.starts_with("redis") {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            redis.push((start_redis(port, &[])?, port));
            relay = vec!["--redis".into(), format!("127.0.0.1:{port}")];
        }
        if broker.ends_with("-shared") {
            relay.extend(["--subscriptions".into(), "shared".into()]);
        }
        // Every client comes from 127.0.0.1. (Asked only of a build that
        // has the limit, so that this load generator can measure an older
        // build too, for a before-and-after table.)
        for flag in ["--max-connections-per-ip", "--max-starting-per-ip"] {
            if !per_address_limits && supports(&args.threadchat, flag) {
                relay.extend([flag.into(), "0".into()]);
            }
        }
        // Nor would they create their rooms from one address (but where a
        // scenario asks for the limit, scenario j).
        if !extra.contains(&"--new-rooms-per-minute")
            && supports(&args.threadchat, "--new-rooms-per-minute")
        {
            relay.extend(["--new-rooms-per-minute".into(), "0".into()]);
        }
        let certs = if tls { Some(Certs::new()?) } else { None };
        if let Some(certs) = &certs {
            relay.extend(certs.server_args());
        }
        let mut server = Command::new(&args.threadchat)
            .args(["--host", "127.0.0.1", "--port", "0", "--rate-limit", "0"])
            .args(["--log-level", "warn"])
            .args(extra)
            .args(&relay)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {} (make build first)", args.threadchat))?;
        // The listening line is logged at info; at warn we ask the OS instead.
        let stderr = server.stderr.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[threadchat] {line}");
            }
        });
        let addr = wait_for_port(server.id())?;
        Ok(Env {
            redis,
            server,
            addr,
            certs,
        })
    }

    /// The async reference server (`bench/reference`, relay [`ASYNC`]) on
    /// a Redis of its own. It has no options beside Redis and its address:
    /// no log to keep (so `--history` must be 0), no TLS.
    fn start_reference(args: &Args, extra: &[&str], tls: bool) -> anyhow::Result<Env> {
        anyhow::ensure!(!tls, "relay {ASYNC} speaks no TLS");
        anyhow::ensure!(
            extra == ["--history", "0"],
            "relay {ASYNC} keeps no history and has no options: it runs a, b, c, g and h \
             with --history 0 only (asked: {extra:?})"
        );
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let redis = vec![(start_redis(port, &[])?, port)];
        let mut server = Command::new(&args.reference)
            .args(["--redis", &format!("redis://127.0.0.1:{port}")])
            .args(["--port", "0", "--bind", "127.0.0.1"])
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (build it: cargo build --release --manifest-path bench/reference/Cargo.toml)",
                    args.reference
                )
            })?;
        let stderr = server.stderr.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // It says where it listens; we ask the OS, as for threadchat.
                if !line.contains(" listening on ") {
                    eprintln!("[{ASYNC}] {line}");
                }
            }
        });
        let addr = wait_for_port(server.id())?;
        Ok(Env {
            redis,
            server,
            addr,
            certs: None,
        })
    }

    /// What clients connect with: `Some` when the server speaks TLS.
    pub(crate) fn tls(&self) -> Option<&Arc<ClientConfig>> {
        self.certs.as_ref().map(|c| &c.client)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.server.id()
    }

    /// CPU ticks of each Redis server (none without Redis).
    pub(crate) fn redis_ticks(&self) -> Vec<u64> {
        self.redis.iter().map(|(r, _)| cpu_ticks(r.id())).collect()
    }

    /// A Redis URL for this environment's (first) Redis, if it has one.
    pub(crate) fn redis_url(&self) -> Option<String> {
        Some(format!("redis://127.0.0.1:{}", self.redis.first()?.1))
    }

    /// How many clients are connected to Redis (`INFO clients`, summed
    /// over a cluster's masters).
    pub(crate) fn redis_connections(&self) -> Option<u64> {
        if self.redis.is_empty() {
            return None;
        }
        self.redis
            .iter()
            .map(|(_, port)| {
                let text = info(*port, "INFO clients");
                let line = text.lines().find(|l| l.starts_with("connected_clients:"))?;
                // Not counting this query's own connection.
                line["connected_clients:".len()..]
                    .trim()
                    .parse::<u64>()
                    .ok()?
                    .checked_sub(1)
            })
            .sum()
    }
}

/// Starts a redis-server on `port` (no persistence) and waits for it.
fn start_redis(port: u16, more: &[&str]) -> anyhow::Result<Child> {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .args(more)
        .stdout(Stdio::null())
        .spawn()
        .context("redis-server")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// A free port whose cluster-bus port (+10,000) is free too.
fn cluster_port() -> anyhow::Result<u16> {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

/// The text a Redis on `port` answers to an inline command (`INFO
/// clients`), or "" if it does not.
fn info(port: u16, command: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("{command}\r\n").as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut reply = vec![0; 8192];
    let n = stream.read(&mut reply).unwrap_or(0);
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for (redis, port) in &mut self.redis {
            let _ = redis.kill();
            let _ = redis.wait();
            let _ = std::fs::remove_file(std::env::temp_dir().join(format!("nodes-{port}.conf")));
        }
    }
}

/// Whether the threadchat at `binary` has the option `flag`.
pub(crate) fn supports(binary: &str, flag: &str) -> bool {
    Command::new(binary)
        .arg("--help")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(flag))
}

/// The port a process listens on, from `/proc/net/tcp` and its fds.
pub(crate) fn wait_for_port(pid: u32) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                Some(l.strip_prefix("socket:[")?.trim_end_matches(']').to_owned())
            })
            .collect();
        let tcp = std::fs::read_to_string("/proc/net/tcp")?;
        for line in tcp.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // state 0A = LISTEN, local address 0100007F:PORT = 127.0.0.1
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = u16::from_str_radix(f[1].split(':').nth(1).unwrap_or("0"), 16)?;
                return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not start listening"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process, in clock ticks (100 per second).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// What the kernel holds for every process together, from `/proc/meminfo`,
/// in KiB: the part of a connection's cost that no process's RSS shows.
#[derive(Clone, Copy, Default)]
pub(crate) struct Kernel {
    /// Every thread's kernel stack (16 KiB each on x86_64).
    pub stack: u64,
    /// Page tables: every mapping, thread stacks included.
    pub page_tables: u64,
    /// Slab caches: task structures, sockets, epoll and pipe state.
    pub slab: u64,
}

impl Kernel {
    pub(crate) fn now() -> Kernel {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Kernel {
            stack: field("KernelStack"),
            page_tables: field("PageTables"),
            slab: field("Slab"),
        }
    }

    /// The growth from `before` to `self`, per client, in KiB.
    pub(crate) fn per_client(&self, before: &Kernel, clients: usize) -> (f64, f64, f64) {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / clients as f64;
        (
            per(self.stack, before.stack),
            per(self.page_tables, before.page_tables),
            per(self.slab, before.slab),
        )
    }
}

/// Bytes in each slab cache, from `/proc/slabinfo` (readable by root only;
/// empty otherwise): which kernel objects the [`Kernel::slab`] total is.
pub(crate) fn slab_caches() -> std::collections::HashMap<String, u64> {
    let info = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    info.lines()
        .skip(2)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // name active objs size per-slab pages-per-slab : tunables … : slabdata active num shared
            let pages_per_slab: u64 = f.get(5)?.parse().ok()?;
            let slabs: u64 = f.get(f.len().checked_sub(2)?)?.parse().ok()?;
            Some((f[0].to_owned(), slabs * pages_per_slab * 4096))
        })
        .collect()
}

/// The slab caches that grew most from `before` to `after`, per client, in
/// KiB, largest first.
pub(crate) fn slab_growth(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    clients: usize,
) -> Vec<(String, f64)> {
    let mut grown: Vec<(String, f64)> = after
        .iter()
        .map(|(name, &bytes)| {
            let was = before.get(name).copied().unwrap_or(0);
            let per = bytes.saturating_sub(was) as f64 / 1024.0 / clients as f64;
            (name.clone(), per)
        })
        .filter(|(_, per)| *per >= 0.5)
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1));
    grown
}
