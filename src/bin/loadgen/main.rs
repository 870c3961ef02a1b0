//! `loadgen`: threadchat's load generator, run by `make bench`.
//!
//! It starts its own `redis-server` (on a free port) and a release
//! `threadchat` (on port 0), then drives them with tungstenite clients and
//! prints one table:
//!
//! * `a`: 1,000 clients in a room, one sender at 10 msg/s for 10 s.
//! * `b`: 100 clients, 10 of them sending as fast as the server allows, 5 s.
//! * `c`: 5,000 idle clients (`--idle-clients`) held 10 s, then one message
//!   all must receive.
//! * `d`, `e`, `f`: attacks, each against one bound (see [`attacks`]): a
//!   join storm over a history of the biggest messages, slow readers, a
//!   flood of `/members` requests. They print a table of their own.
//!
//! Clients connect and send from plain blocking threads. They receive
//! differently: the load generator shares the machine with the server, so
//! it must cost less per delivered frame than the server does, and a thread
//! per receiving client would cost a thread wake-up per frame — as much as
//! the server spends. Two receiver threads each wait on half the sockets
//! with `epoll` instead (see [`receive`]).
//!
//! Latency is measured from a send timestamp carried in each message (client
//! and server share the machine's clock). Every receiver checks each sender's
//! sequence numbers, so loss, duplicates and order violations are counted.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod attacks;

use anyhow::{Context, bail};
use clap::Parser;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

#[derive(Parser)]
#[command(about = "Load generator for threadchat (see `make bench`)")]
struct Args {
    /// Scenarios to run: a, b, c (comma-separated).
    #[arg(long, default_value = "a,b,c", value_delimiter = ',')]
    scenario: Vec<String>,
    /// Relay: redis (per-client subscriptions), redis-shared (one
    /// subscription per room), memory (in-process), or all three.
    #[arg(long, default_value = "redis")]
    broker: String,
    /// Idle clients in scenario c (10000 needs the kernel settings in
    /// docs/OPERATIONS.md).
    #[arg(long, default_value_t = 5000)]
    idle_clients: usize,
    /// The threadchat binary to test.
    #[arg(long, default_value = "target/release/threadchat")]
    threadchat: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relays: Vec<String> = if args.broker == "all" {
        ["redis", "redis-shared", "memory"]
            .map(String::from)
            .to_vec()
    } else {
        vec![args.broker.clone()]
    };
    let mut rows = Vec::new();
    let mut attack_rows = Vec::new();
    for relay in &relays {
        for scenario in &args.scenario {
            eprintln!("scenario {scenario}, relay {relay}…");
            if let Some(attack) = attacks::Attack::named(scenario) {
                let row = attack.run(&args, relay)?;
                eprintln!("{}", row.render());
                attack_rows.push(row);
                continue;
            }
            let env = Env::start(&args, relay, &["--history", "0"])?;
            let mut row = match scenario.as_str() {
                "a" => fan_out(&env, 1000, 1, Pace::PerSecond(10), Duration::from_secs(10))?,
                "b" => fan_out(&env, 100, 10, Pace::FlatOut, Duration::from_secs(5))?,
                "c" => idle(&env, args.idle_clients)?,
                other => bail!("unknown scenario {other:?}"),
            };
            row.scenario = scenario.clone();
            row.relay = relay.clone();
            eprintln!("{}", row.render());
            rows.push(row);
        }
    }
    if !rows.is_empty() {
        println!("{}", Row::HEADER);
        for row in &rows {
            println!("{}", row.render());
        }
    }
    if !attack_rows.is_empty() {
        println!("\n{}", attacks::AttackRow::HEADER);
        for row in &attack_rows {
            println!("{}", row.render());
        }
    }
    Ok(())
}

/// One line of the results table. Empty cells are what a scenario does not
/// measure.
#[derive(Default)]
struct Row {
    scenario: String,
    relay: String,
    clients: usize,
    senders: usize,
    connect: Duration,
    handshake: String,
    delivered: u64,
    expected: u64,
    duplicates: Option<u64>,
    out_of_order: Option<u64>,
    /// Fan-out latency p50, p99, max (ms).
    latency: Option<(f64, f64, f64)>,
    deliveries_per_s: Option<f64>,
    /// CPU while sending, in % of a core.
    cpu: Option<Cpu>,
    /// Redis connections in use (clients connected to it).
    redis_connections: Option<u64>,
    rss_per_client_kib: Option<f64>,
    idle_cpu: Option<f64>,
}

impl Row {
    const HEADER: &str = "| scenario | relay | clients | senders | connect all | handshake p50 / p99 | delivered / expected | loss | dups | order | latency p50 / p99 / max | deliveries/s | CPU: server / Redis / load gen. | Redis conns | RSS per client | idle CPU |\n\
                          |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    fn render(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "".into());
        format!(
            "| {} | {} | {} | {} | {:.2} s | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.relay,
            self.clients,
            self.senders,
            self.connect.as_secs_f64(),
            self.handshake,
            self.delivered,
            self.expected,
            self.expected.saturating_sub(self.delivered),
            opt(self.duplicates.map(|d| d.to_string())),
            opt(self.out_of_order.map(|d| d.to_string())),
            opt(self.latency.map(|(a, b, c)| {
                if a.is_nan() {
                    // Scenario c: one message, the time until all had it.
                    format!("– / – / {c:.1} ms")
                } else {
                    format!("{a:.1} / {b:.1} / {c:.1} ms")
                }
            })),
            opt(self.deliveries_per_s.map(|d| format!("{d:.0}"))),
            opt(self.cpu.map(|cpu| cpu.render())),
            opt(self.redis_connections.map(|n| n.to_string())),
            opt(self.rss_per_client_kib.map(|k| format!("{k:.1} KiB"))),
            opt(self.idle_cpu.map(|c| format!("{c:.1}% of a core"))),
        )
    }
}

/// Who used the CPU while a scenario was sending, in % of one core.
///
/// All three share the machine's cores, so their sum bounds the latency a
/// scenario can reach: in (a), 1% of a core over the 10 s is 1 ms of CPU per
/// message, and the last of a message's 999 frames cannot be read before
/// the sum has been spent, divided among the cores.
#[derive(Clone, Copy)]
struct Cpu {
    server: f64,
    redis: Option<f64>,
    /// This load generator: its senders and receivers.
    load: f64,
}

impl Cpu {
    fn render(&self) -> String {
        let redis = self.redis.map_or("–".into(), |r| format!("{r:.0}%"));
        format!("{:.0}% / {redis} / {:.0}%", self.server, self.load)
    }
}

/// A redis-server and a threadchat, stopped on drop.
struct Env {
    redis: Option<Child>,
    redis_port: Option<u16>,
    server: Child,
    addr: SocketAddr,
}

impl Env {
    /// Starts Redis (for a Redis relay) and threadchat with `extra`
    /// arguments (which must say `--history`).
    fn start(args: &Args, broker: &str, extra: &[&str]) -> anyhow::Result<Env> {
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

    fn pid(&self) -> u32 {
        self.server.id()
    }

    /// CPU ticks of the Redis server, if there is one.
    fn redis_ticks(&self) -> Option<u64> {
        self.redis.as_ref().map(|r| cpu_ticks(r.id()))
    }

    /// A Redis URL for this environment's Redis, if it has one.
    fn redis_url(&self) -> Option<String> {
        Some(format!("redis://127.0.0.1:{}", self.redis_port?))
    }

    /// How many clients are connected to Redis (`INFO clients`).
    fn redis_connections(&self) -> Option<u64> {
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
fn supports(binary: &str, flag: &str) -> bool {
    Command::new(binary)
        .arg("--help")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(flag))
}

/// The port a process listens on, from `/proc/net/tcp` and its fds.
fn wait_for_port(pid: u32) -> anyhow::Result<SocketAddr> {
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

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One connected client: its WebSocket, after the member list has arrived.
fn connect(addr: SocketAddr, nickname: &str, room: &str) -> anyhow::Result<WebSocket<TcpStream>> {
    connect_on(TcpStream::connect(addr)?, addr, nickname, room)
}

/// The same over a socket already connected to `addr`.
fn connect_on(
    stream: TcpStream,
    addr: SocketAddr,
    nickname: &str,
    room: &str,
) -> anyhow::Result<WebSocket<TcpStream>> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}/chat/{nickname}?room={room}");
    // tungstenite zero-fills its read buffer before every read: its default
    // 128 KiB would make each received frame cost a 128 KiB memset.
    let config = WebSocketConfig::default().read_buffer_size(8 << 10);
    let (mut ws, _) = tungstenite::client::client_with_config(url, stream, Some(config))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Settled: the member list comes after history.
    loop {
        if let Message::Text(t) = ws.read()?
            && t.as_str().contains(r#""type":"presence""#)
        {
            return Ok(ws);
        }
    }
}

/// What one receiver saw.
#[derive(Default)]
struct Seen {
    received: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    latencies_us: Vec<u64>,
}

enum Pace {
    PerSecond(u32),
    FlatOut,
}

/// `clients` clients in one room; the first `senders` send for `duration`.
fn fan_out(
    env: &Env,
    clients: usize,
    senders: usize,
    pace: Pace,
    duration: Duration,
) -> anyhow::Result<Row> {
    let room = "bench";
    let started = Instant::now();
    let (sockets, handshake) = connect_all(env.addr, clients, room)?;
    let connect_time = started.elapsed();

    let stop_reading = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    // Closed loop: a sender stays at most WINDOW messages ahead of what the
    // slowest client has received from it, so "as fast as the server
    // allows" is measured, not kernel buffering — and no client is ever so
    // far behind that the server would rightly drop it as too slow (the
    // load generator's own readers share the CPU with the server).
    const WINDOW: u64 = 200;
    // progress[reader * senders + sender]: messages `reader` got from `sender`.
    let progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..clients * senders).map(|_| AtomicU64::new(0)).collect());
    let sent: Vec<Arc<AtomicU64>> = (0..senders).map(|_| Arc::default()).collect();
    let mut receiving = Vec::with_capacity(clients);
    let mut writers = Vec::new();
    let go = Arc::new(Barrier::new(senders + 1));
    for (i, ws) in sockets.into_iter().enumerate() {
        if i < senders {
            // A write-only WebSocket on a clone of the socket, so sending
            // and receiving go on independently. The clone shares the
            // receiver's non-blocking mode, hence `send`. (Two writers on one
            // socket is only safe here because the server pings a client only
            // after 30 s of silence, and senders are never silent.)
            let mut out = WebSocket::from_raw_socket(
                ws.get_ref().try_clone()?,
                tungstenite::protocol::Role::Client,
                None,
            );
            let (count, go, progress) =
                (Arc::clone(&sent[i]), Arc::clone(&go), Arc::clone(&progress));
            let pace = match pace {
                Pace::PerSecond(n) => Some(Duration::from_secs(1) / n),
                Pace::FlatOut => None,
            };
            writers.push(
                thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn(move || {
                        go.wait();
                        let end = Instant::now() + duration;
                        let mut seq = 0u64;
                        // The slowest reader's progress on this sender
                        // (a sender does not read its own messages).
                        let slowest = || {
                            (0..clients)
                                .filter(|&r| r != i)
                                .map(|r| progress[r * senders + i].load(Ordering::Relaxed))
                                .min()
                                .unwrap_or(u64::MAX)
                        };
                        let mut allowed = 0;
                        while Instant::now() < end {
                            if seq >= allowed {
                                allowed = slowest().saturating_add(WINDOW);
                            }
                            if seq >= allowed {
                                thread::sleep(Duration::from_micros(200));
                                continue;
                            }
                            let text = format!("{i}:{seq}:{}", now_micros());
                            if send(&mut out, Message::text(text)).is_err() {
                                break;
                            }
                            seq += 1;
                            count.store(seq, Ordering::Relaxed);
                            if let Some(gap) = pace {
                                thread::sleep(gap);
                            }
                        }
                    })?,
            );
        }
        receiving.push(Receiving::new(i, ws, senders)?);
    }
    // The receivers: a few threads, each waiting on many sockets at once.
    let mut readers: Vec<JoinHandle<anyhow::Result<Vec<Seen>>>> = Vec::new();
    let per_thread = receiving.len().div_ceil(RECEIVER_THREADS);
    while !receiving.is_empty() {
        let group: Vec<Receiving> = receiving.drain(..per_thread.min(receiving.len())).collect();
        let (stop, delivered) = (Arc::clone(&stop_reading), Arc::clone(&delivered));
        let progress = Arc::clone(&progress);
        readers.push(
            thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || receive(group, &stop, &delivered, &progress))?,
        );
    }
    go.wait();
    let t0 = Instant::now();
    let cpu0 = cpu_ticks(env.pid());
    let redis_cpu0 = env.redis_ticks();
    let load_cpu0 = cpu_ticks(std::process::id());
    let redis_connections = env.redis_connections();
    for w in writers {
        let _ = w.join();
    }
    // Senders write into their sockets faster than the server relays: wait
    // until deliveries stop (2 s without one), at most a minute.
    let (mut last, mut last_change) = (0, Instant::now());
    while last_change.elapsed() < Duration::from_secs(2) && t0.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(100));
        let now = delivered.load(Ordering::Relaxed);
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    let send_time = last_change.duration_since(t0);
    let cpu = cpu_ticks(env.pid()) - cpu0;
    let load_cpu = cpu_ticks(std::process::id()) - load_cpu0;
    let redis_cpu = env
        .redis_ticks()
        .zip(redis_cpu0)
        .map(|(now, then)| now - then);
    stop_reading.store(true, Ordering::Relaxed);
    let mut seen: Vec<Seen> = Vec::with_capacity(clients);
    for reader in readers {
        let group = reader
            .join()
            .map_err(|_| anyhow::anyhow!("a receiver panicked"))??;
        seen.extend(group);
    }
    let sent_total: Vec<u64> = sent.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let mut row = summarize(clients, senders, &sent_total, &seen, send_time);
    row.connect = connect_time;
    row.handshake = handshake;
    let window = send_time.as_secs_f64();
    row.cpu = Some(Cpu {
        server: cpu as f64 / window,
        redis: redis_cpu.map(|t| t as f64 / window),
        load: load_cpu as f64 / window,
    });
    row.redis_connections = redis_connections;
    Ok(row)
}

/// Clients connecting at the same time. People arrive in parallel, and each
/// connector waits for its own handshake — which includes its join being
/// announced, at most one announcement window (up to 500 ms) later.
const CONNECTORS: usize = 512;

/// Connects `clients` clients from [`CONNECTORS`] threads. Returns them in
/// order, and the handshake latency p50 / p99 as text.
fn connect_all(
    addr: SocketAddr,
    clients: usize,
    room: &str,
) -> anyhow::Result<(Vec<WebSocket<TcpStream>>, String)> {
    let next = Arc::new(AtomicU64::new(0));
    let connectors: Vec<_> = (0..CONNECTORS.min(clients))
        .map(|_| {
            let (next, room) = (Arc::clone(&next), room.to_owned());
            thread::Builder::new().stack_size(256 << 10).spawn(move || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= clients {
                        return Ok(done);
                    }
                    let t = Instant::now();
                    let ws = connect(addr, &format!("u{i}"), &room)?;
                    done.push((i, ws, t.elapsed()));
                }
            })
        })
        .collect::<Result<_, _>>()?;
    let mut all = Vec::with_capacity(clients);
    for connector in connectors {
        let done: anyhow::Result<Vec<_>> = connector
            .join()
            .map_err(|_| anyhow::anyhow!("a connector panicked"))?;
        all.extend(done?);
    }
    all.sort_by_key(|(i, _, _)| *i);
    let mut handshakes: Vec<Duration> = all.iter().map(|(_, _, d)| *d).collect();
    handshakes.sort_unstable();
    let pct = |p: f64| {
        handshakes[((handshakes.len() as f64 * p) as usize).min(handshakes.len() - 1)].as_secs_f64()
            * 1000.0
    };
    let summary = format!("{:.1} / {:.1} ms", pct(0.5), pct(0.99));
    Ok((all.into_iter().map(|(_, ws, _)| ws).collect(), summary))
}

/// Sends on a non-blocking socket, waiting while the kernel's send buffer is
/// full (the server is behind).
fn send(out: &mut WebSocket<TcpStream>, message: Message) -> tungstenite::Result<()> {
    let mut result = out.send(message);
    loop {
        match result {
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(100));
                result = out.flush();
            }
            other => return other,
        }
    }
}

/// Threads that receive for all clients of a scenario (one per core).
const RECEIVER_THREADS: usize = 2;

/// One client on the receiving side: its socket, switched to non-blocking,
/// and what it has seen so far.
struct Receiving {
    index: usize,
    ws: WebSocket<TcpStream>,
    /// The next sequence number expected from each sender.
    next: Vec<u64>,
    seen: Seen,
    open: bool,
}

impl Receiving {
    fn new(index: usize, ws: WebSocket<TcpStream>, senders: usize) -> anyhow::Result<Receiving> {
        ws.get_ref().set_nonblocking(true)?;
        Ok(Receiving {
            index,
            ws,
            next: vec![0; senders],
            seen: Seen::default(),
            open: true,
        })
    }

    /// Reads every frame that has arrived, checking each sender's sequence.
    fn drain(&mut self, delivered: &AtomicU64, progress: &[AtomicU64]) {
        let senders = self.next.len();
        loop {
            let message = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return;
                }
                Err(_) => {
                    self.open = false;
                    return;
                }
            };
            let Message::Text(text) = message else {
                continue;
            };
            let Some(body) = chat_body(text.as_str()) else {
                continue;
            };
            let mut parts = body.split(':').map(|p| p.parse::<u64>().unwrap_or(0));
            let (s, seq, ts) = (
                parts.next().unwrap_or(0) as usize,
                parts.next().unwrap_or(0),
                parts.next().unwrap_or(0),
            );
            if s >= senders {
                continue;
            }
            let seen = &mut self.seen;
            seen.received += 1;
            delivered.fetch_add(1, Ordering::Relaxed);
            progress[self.index * senders + s].store(seq + 1, Ordering::Relaxed);
            seen.latencies_us.push(now_micros().saturating_sub(ts));
            match seq.cmp(&self.next[s]) {
                std::cmp::Ordering::Equal => self.next[s] += 1,
                std::cmp::Ordering::Greater => {
                    seen.lost += seq - self.next[s];
                    self.next[s] = seq + 1;
                }
                std::cmp::Ordering::Less => {
                    seen.duplicates += 1;
                    seen.out_of_order += 1;
                }
            }
        }
    }
}

/// Receives for `clients` until `stop`, returning what each saw (in order).
///
/// The load generator is not what is being measured, and it shares the
/// machine with the server, so it must cost less per delivered frame than
/// the server does. A thread per receiving client would cost a thread
/// wake-up per frame on each side; instead one thread waits on all of its
/// sockets with `epoll` and reads whichever are ready. (Sending and
/// connecting are still plain blocking threads.)
fn receive(
    mut clients: Vec<Receiving>,
    stop: &AtomicBool,
    delivered: &AtomicU64,
    progress: &[AtomicU64],
) -> anyhow::Result<Vec<Seen>> {
    let epoll = Epoll::new()?;
    for (slot, client) in clients.iter().enumerate() {
        epoll.add(client.ws.get_ref().as_raw_fd(), slot as u64)?;
    }
    // Frames may already be waiting in tungstenite's buffer.
    for client in &mut clients {
        client.drain(delivered, progress);
    }
    let mut ready = Vec::with_capacity(256);
    while !stop.load(Ordering::Relaxed) {
        epoll.wait(&mut ready, Duration::from_millis(100))?;
        for &slot in &ready {
            let client = &mut clients[slot as usize];
            if client.open {
                client.drain(delivered, progress);
                if !client.open {
                    epoll.remove(client.ws.get_ref().as_raw_fd());
                }
            }
        }
    }
    Ok(clients.into_iter().map(|c| c.seen).collect())
}

/// A level-triggered `epoll` set: the few lines of libc the receivers need.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> std::io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a valid result is a new
        // descriptor that we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` outlives the call; the kernel copies it.
        let rc =
            unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL. An error only
        // means the descriptor was not in the set.
        unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Fills `ready` with the tokens of ready descriptors (none on timeout).
    fn wait(&self, ready: &mut Vec<u64>, timeout: Duration) -> std::io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        // SAFETY: the kernel writes at most `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout.as_millis() as i32,
            )
        };
        ready.clear();
        if n < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::Interrupted => Ok(()),
                _ => Err(error),
            };
        }
        ready.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// The `"message"` of a live chat frame, found by a scan rather than a JSON
/// parse: the load generator shares the CPU with the server, so it must be
/// cheaper per frame than the server is. The server writes chat frames as
/// `{"type":"chat","nickname":…,"message":"…",…}`; the bodies sent here are
/// digits and colons, which JSON never escapes.
fn chat_body(frame: &str) -> Option<&str> {
    let rest = frame.strip_prefix(r#"{"type":"chat","#)?;
    let start = rest.find(r#""message":""#)? + r#""message":""#.len();
    let end = rest[start..].find('"')?;
    Some(&rest[start..start + end])
}

fn summarize(
    clients: usize,
    senders: usize,
    sent: &[u64],
    seen: &[Seen],
    sending: Duration,
) -> Row {
    let sent_total: u64 = sent.iter().sum();
    // Each message goes to everyone but its sender.
    let expected = sent_total * (clients as u64 - 1);
    let received: u64 = seen.iter().map(|s| s.received).sum();
    let mut lat: Vec<u64> = seen
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Row {
        clients,
        senders,
        delivered: received,
        expected,
        duplicates: Some(seen.iter().map(|s| s.duplicates).sum()),
        out_of_order: Some(seen.iter().map(|s| s.out_of_order).sum()),
        latency: Some((
            pct(0.50),
            pct(0.99),
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        )),
        // From the first send to the last delivery.
        deliveries_per_s: Some(received as f64 / sending.as_secs_f64()),
        ..Row::default()
    }
}

/// `clients` idle clients held 10 s, then one message all must receive.
fn idle(env: &Env, clients: usize) -> anyhow::Result<Row> {
    let rss0 = rss_kb(env.pid());
    let started = Instant::now();
    let (mut sockets, handshake) = connect_all(env.addr, clients, "idle")?;
    let connect_time = started.elapsed();
    thread::sleep(Duration::from_secs(2));
    let rss = rss_kb(env.pid());
    let cpu0 = cpu_ticks(env.pid());
    thread::sleep(Duration::from_secs(10));
    let idle_cpu = cpu_ticks(env.pid()) - cpu0;
    let t0 = Instant::now();
    sockets[0].send(Message::text("wake up"))?;
    let mut got = 0u64;
    for ws in sockets.iter_mut().skip(1) {
        loop {
            match ws.read() {
                Ok(Message::Text(t)) if t.as_str().contains("wake up") => {
                    got += 1;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    let all_received = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(Row {
        clients,
        connect: connect_time,
        handshake,
        delivered: got,
        expected: clients as u64 - 1,
        latency: Some((f64::NAN, f64::NAN, all_received)),
        redis_connections: env.redis_connections(),
        rss_per_client_kib: Some(rss.saturating_sub(rss0) as f64 / clients as f64),
        idle_cpu: Some(idle_cpu as f64 / 10.0),
        ..Row::default()
    })
}

fn rss_kb(pid: u32) -> u64 {
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
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}
