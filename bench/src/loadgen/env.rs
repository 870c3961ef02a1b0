//! The processes under test (a `redis-server` and a release `threadchat`,
//! started on free ports and stopped on drop), and what `/proc` says of them.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Args;

/// A redis-server and a threadchat, stopped on drop.
pub(crate) struct Env {
    pub(crate) redis: Option<Child>,
    pub(crate) redis_port: Option<u16>,
    pub(crate) server: Child,
    pub(crate) addr: SocketAddr,
}

impl Env {
    /// Starts Redis (for a Redis relay) and threadchat with `extra`
    /// arguments (which must say `--history`).
    pub(crate) fn start(args: &Args, broker: &str, extra: &[&str]) -> anyhow::Result<Env> {
        let mut relay = vec!["--in-process".to_owned()];
        let mut redis = None;
        let mut redis_port = None;
        if broker.starts_with("redis") {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            redis = Some(
                Command::new("redis-server")
                    .args([
                        "--port",
                        &port.to_string(),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("redis-server")?,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
                thread::sleep(Duration::from_millis(20));
            }
            redis_port = Some(port);
            relay = vec!["--redis".into(), format!("127.0.0.1:{port}")];
            if broker == "redis-shared" {
                relay.extend(["--subscriptions".into(), "shared".into()]);
            }
        }
        // Every client comes from 127.0.0.1. (Asked only of a build that
        // has the limit, so that this load generator can measure an older
        // build too, for a before-and-after table.)
        if supports(&args.threadchat, "--max-connections-per-ip") {
            relay.extend(["--max-connections-per-ip".into(), "0".into()]);
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
            redis_port,
            server,
            addr,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.server.id()
    }

    /// CPU ticks of the Redis server, if there is one.
    pub(crate) fn redis_ticks(&self) -> Option<u64> {
        self.redis.as_ref().map(|r| cpu_ticks(r.id()))
    }

    /// A Redis URL for this environment's Redis, if it has one.
    pub(crate) fn redis_url(&self) -> Option<String> {
        Some(format!("redis://127.0.0.1:{}", self.redis_port?))
    }

    /// How many clients are connected to Redis (`INFO clients`).
    pub(crate) fn redis_connections(&self) -> Option<u64> {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect(("127.0.0.1", self.redis_port?)).ok()?;
        stream.write_all(b"INFO clients\r\n").ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut reply = vec![0; 4096];
        let n = stream.read(&mut reply).ok()?;
        let text = String::from_utf8_lossy(&reply[..n]);
        let line = text.lines().find(|l| l.starts_with("connected_clients:"))?;
        // Not counting this query's own connection.
        line["connected_clients:".len()..]
            .trim()
            .parse::<u64>()
            .ok()?
            .checked_sub(1)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        if let Some(redis) = &mut self.redis {
            let _ = redis.kill();
            let _ = redis.wait();
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
            "threadchat did not start listening"
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
