//! The attack scenarios: each tries one bound of docs/OPERATIONS.md's
//! "Limits" table the way an attacker would, with nothing but WebSocket and
//! HTTP clients, and reports what it cost the server (and Redis).
//!
//! * `d`: **a join storm over a heavy history.** One client fills a room's
//!   history with 50 of the costliest messages the server stores (65,536
//!   `"` characters: JSON escapes each with two bytes), then 150 clients
//!   join at once. Reported: the server's peak RSS above what it was idle,
//!   and its RSS once they have all left (targets: +64 MB at most, and back
//!   within 16 MB).
//! * `e`: **slow readers.** 20 clients with a 16 KiB receive buffer read
//!   4 KB a second, while one client sends 64 KiB messages at 20 a second
//!   and one fast reader keeps up. Reported: when the slow readers were
//!   closed (target: within `--write-timeout` + 2 s of the first message),
//!   Redis's peak memory above its start (target: about `--write-timeout`
//!   of their traffic, 12.5 MB each), and whether Redis ever dropped a
//!   subscription itself.
//! * `f`: **a flood of `/members`.** A room of 10,000 members (written
//!   into Redis as an instance would) is asked for by 50 HTTP clients as
//!   fast as they can, while two clients chat in another room at 20
//!   messages a second. Reported: the chat's latency without and with the
//!   flood (target: no change beyond noise). Redis relays only.
//! * `i`: **silent starts from many addresses** ([`super::silent`]): 11,
//!   then 40 addresses × 100 connections that never send their request,
//!   reopened when cut, while another address times `/healthz` (target:
//!   p50 ≤ 50 ms).
//! * `j`: **room rotation.** One address, 8 connections, each opening a
//!   fresh room and sending two of the costliest messages (64,000 `"`)
//!   there, then the next room, for 30 s, with the server's default
//!   `--new-rooms-per-minute`. Reported: rooms created and refused, Redis's
//!   `used_memory` growth and the server's RSS growth (targets: at most
//!   +64 MB each).
//! * `k`: **the gap fill's cost** ([`super::gapfill`]): 1,000 clients
//!   whose instance's subscriptions are held down 5 s, quiet and then with
//!   a sender going on. Reported: time to restore, server CPU, log reads,
//!   losses and duplicates (target: none lost, none twice).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use super::Args;
use super::client::{connect, connect_on, now_micros};
use super::env::{Env, rss_kb};

/// One attack scenario.
pub(crate) enum Attack {
    JoinStorm,
    SlowReaders,
    MembersFlood,
    SilentStarts,
    RoomRotation,
    GapFill,
}

/// One line of the attacks' table.
pub(crate) struct AttackRow {
    scenario: &'static str,
    relay: String,
    target: &'static str,
    measured: String,
}

impl AttackRow {
    pub(crate) const HEADER: &str = "| scenario | relay | target | measured |\n|---|---|---|---|";

    pub(crate) fn render(&self) -> String {
        format!(
            "| {} | {} | {} | {} |",
            self.scenario, self.relay, self.target, self.measured
        )
    }
}

impl Attack {
    /// The attack a scenario letter names, if it names one.
    pub(crate) fn named(scenario: &str) -> Option<Attack> {
        match scenario {
            "d" => Some(Attack::JoinStorm),
            "e" => Some(Attack::SlowReaders),
            "f" => Some(Attack::MembersFlood),
            "i" => Some(Attack::SilentStarts),
            "j" => Some(Attack::RoomRotation),
            "k" => Some(Attack::GapFill),
            _ => None,
        }
    }

    /// Runs the attack against a fresh server on `relay`.
    pub(crate) fn run(&self, args: &Args, relay: &str) -> anyhow::Result<AttackRow> {
        let (scenario, target, measured) = match self {
            Attack::JoinStorm => (
                "d: 150 joiners, heavy history",
                "peak ≤ +64 MB; after ≤ +16 MB",
                join_storm(args, relay)?,
            ),
            Attack::SlowReaders => (
                "e: 20 slow readers, 64 KiB × 20/s",
                "closed ≤ 12 s; Redis ≤ +250 MB, no drop",
                slow_readers(args, relay)?,
            ),
            Attack::MembersFlood => (
                "f: /members flood, 10,000 members",
                "chat latency unchanged",
                members_flood(args, relay)?,
            ),
            Attack::SilentStarts => (
                "i: silent starts, 11 and 40 addresses × 100",
                "/healthz p50 ≤ 50 ms",
                super::silent::silent_starts(args, relay)?,
            ),
            Attack::RoomRotation => (
                "j: room rotation, 8 connections, 30 s",
                "Redis ≤ +64 MB; RSS ≤ +64 MB",
                room_rotation(args, relay)?,
            ),
            Attack::GapFill => (
                "k: gap fill, 1,000 clients, 5 s gap",
                "0 lost, 0 twice",
                super::gapfill::gap_fill(args, relay)?,
            ),
        };
        Ok(AttackRow {
            scenario,
            relay: relay.to_owned(),
            target,
            measured,
        })
    }
}

/// Samples a process's RSS every 5 ms until dropped; keeps the peak.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    sampler: Option<thread::JoinHandle<()>>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kb(pid)));
        let sampler = {
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        PeakRss {
            stop,
            peak,
            sampler: Some(sampler),
        }
    }

    /// The peak so far, in KiB.
    fn peak_kb(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
}

fn mb(kb: i64) -> f64 {
    kb as f64 / 1024.0
}

/// Scenario d.
fn join_storm(args: &Args, relay: &str) -> anyhow::Result<String> {
    const JOINERS: usize = 150;
    let env = Env::start(args, relay, &["--history", "50"])?;
    let room = "heavy";
    // The costliest message the server stores: every character escaped.
    let text = "\"".repeat(65_536);
    let mut witness = connect(env.addr, "witness", room)?;
    {
        let mut writer = connect(env.addr, "writer", room)?;
        for _ in 0..50 {
            writer.send(Message::text(text.as_str()))?;
        }
        // All 50 are recorded once the witness has them live.
        let mut got = 0;
        while got < 50 {
            if let Message::Text(t) = witness.read()?
                && t.as_str().starts_with(r#"{"type":"chat""#)
            {
                got += 1;
            }
        }
        writer.close(None)?;
    }
    drop(witness);
    thread::sleep(Duration::from_secs(1));
    let before = rss_kb(env.pid()) as i64;
    let peak = PeakRss::watch(env.pid());
    let start = Arc::new(Barrier::new(JOINERS + 1));
    let all_in = Arc::new(Barrier::new(JOINERS + 1));
    let history_bytes = Arc::new(AtomicU64::new(0));
    let joiners: Vec<_> = (0..JOINERS)
        .map(|i| {
            let (start, all_in, addr) = (Arc::clone(&start), Arc::clone(&all_in), env.addr);
            let history_bytes = Arc::clone(&history_bytes);
            thread::spawn(move || -> anyhow::Result<Duration> {
                start.wait();
                let began = Instant::now();
                let result = joiner(addr, i, room, &history_bytes);
                let took = began.elapsed();
                all_in.wait();
                let mut ws = result?;
                let _ = ws.close(None);
                while ws.read().is_ok() {}
                Ok(took)
            })
        })
        .collect();
    start.wait();
    all_in.wait();
    let mut slowest = Duration::ZERO;
    for joiner in joiners {
        slowest = slowest.max(joiner.join().expect("joiner thread")?);
    }
    thread::sleep(Duration::from_secs(3));
    let peak_kb = peak.peak_kb() as i64;
    drop(peak);
    let after = rss_kb(env.pid()) as i64;
    Ok(format!(
        "peak +{:.1} MB, after they left +{:.1} MB; every welcome in {:.2} s, {:.0} KiB of history each",
        mb(peak_kb - before),
        mb(after - before),
        slowest.as_secs_f64(),
        history_bytes.load(Ordering::Relaxed) as f64 / 1024.0 / JOINERS as f64,
    ))
}

/// One joiner of scenario d: connects, and counts the history it is sent.
fn joiner(
    addr: SocketAddr,
    i: usize,
    room: &str,
    history_bytes: &AtomicU64,
) -> anyhow::Result<tungstenite::WebSocket<TcpStream>> {
    let stream = TcpStream::connect(addr)?;
    let url = format!("ws://{addr}/chat/j{i}?room={room}");
    let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 << 10);
    let (mut ws, _) = tungstenite::client::client_with_config(url, stream, Some(config))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        if let Message::Text(t) = ws.read()? {
            if t.as_str().contains(r#""type":"presence""#) {
                return Ok(ws);
            }
            history_bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Scenario j.
fn room_rotation(args: &Args, relay: &str) -> anyhow::Result<String> {
    const CONNECTIONS: usize = 8;
    const ATTACK: Duration = Duration::from_secs(30);
    // Asked explicitly, so that the load generator leaves it on.
    let env = Env::start(args, relay, &["--new-rooms-per-minute", "30"])?;
    let redis_before = redis_used_memory(&env).unwrap_or(0);
    let rss_before = rss_kb(env.pid()) as i64;
    let peak = PeakRss::watch(env.pid());
    let created = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + ATTACK;
    let attackers: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let (created, refused, addr) = (Arc::clone(&created), Arc::clone(&refused), env.addr);
            thread::spawn(move || {
                let text = "\"".repeat(64_000);
                let mut n = 0;
                while Instant::now() < deadline {
                    n += 1;
                    match connect(addr, &format!("r{c}"), &format!("rot-{c}-{n}")) {
                        Ok(mut ws) => {
                            created.fetch_add(1, Ordering::Relaxed);
                            for _ in 0..2 {
                                let _ = ws.send(Message::text(text.as_str()));
                            }
                            let _ = ws.close(None);
                            while ws.read().is_ok() {}
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            // Refused (429): try the next name at once,
                            // as an attacker would, but let the CPU breathe.
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        })
        .collect();
    for attacker in attackers {
        let _ = attacker.join();
    }
    // Leaves and idle-room bookkeeping settle.
    thread::sleep(Duration::from_secs(3));
    let redis_growth = redis_used_memory(&env).map(|after| after as i64 - redis_before as i64);
    let peak_kb = peak.peak_kb() as i64;
    drop(peak);
    let rss_after = rss_kb(env.pid()) as i64;
    Ok(format!(
        "{} rooms created, {} refused; Redis {}; RSS +{:.1} MB (peak +{:.1} MB)",
        created.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        redis_growth.map_or("-".to_owned(), |b| format!(
            "+{:.1} MB",
            b as f64 / 1048576.0
        )),
        mb(rss_after - rss_before),
        mb(peak_kb - rss_before),
    ))
}

/// Scenario e.
fn slow_readers(args: &Args, relay: &str) -> anyhow::Result<String> {
    const READERS: usize = 20;
    const SENDING: Duration = Duration::from_secs(20);
    let env = Env::start(args, relay, &["--history", "0", "--write-timeout", "10"])?;
    let room = "slow";
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..READERS {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_recv_buffer_size(16 << 10)?;
        socket.connect(&env.addr.into())?;
        let mut ws = connect_on(socket.into(), env.addr, &format!("slow{i}"), room)?;
        let stop = Arc::clone(&stop);
        readers.push(thread::spawn(move || {
            // 4 KB a second, straight from the socket.
            let stream = ws.get_mut();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => thread::sleep(Duration::from_secs(1)),
                }
            }
        }));
    }
    let mut fast = connect(env.addr, "fast", room)?;
    let fast_got = Arc::new(AtomicU64::new(0));
    let fast_reader = {
        let fast_got = Arc::clone(&fast_got);
        thread::spawn(move || {
            while let Ok(message) = fast.read() {
                if let Message::Text(t) = message
                    && t.as_str().starts_with(r#"{"type":"chat""#)
                {
                    fast_got.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut sender = connect(env.addr, "sender", room)?;
    let redis_before = redis_used_memory(&env).unwrap_or(0);
    let peak = PeakRss::watch(env.pid());
    let rss_before = rss_kb(env.pid()) as i64;
    let started = Instant::now();
    let text = "y".repeat(64 * 1024 - 16);
    let sent = Arc::new(AtomicU64::new(0));
    let sending = {
        let (sent, text) = (Arc::clone(&sent), text.clone());
        thread::spawn(move || {
            let mut next = Instant::now();
            while next.duration_since(started) < SENDING {
                if sender.send(Message::text(text.as_str())).is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                next += Duration::from_millis(50);
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            sender
        })
    };
    let mut redis_peak = redis_before;
    let mut closed_at = Vec::new();
    while started.elapsed() < SENDING + Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(100));
        if let Some(used) = redis_used_memory(&env) {
            redis_peak = redis_peak.max(used);
        }
        let closes = metric(env.addr, "threadchat_slow_client_closes_total").unwrap_or(0);
        while (closed_at.len() as u64) < closes.min(READERS as u64) {
            closed_at.push(started.elapsed());
        }
    }
    let _sender = sending.join().expect("sender thread");
    stop.store(true, Ordering::Relaxed);
    let lost = metric(env.addr, "threadchat_subscriptions_lost_total").unwrap_or(0);
    let peak_kb = peak.peak_kb() as i64;
    drop(peak);
    drop(env);
    let _ = fast_reader.join();
    for reader in readers {
        let _ = reader.join();
    }
    let closed = match (closed_at.first(), closed_at.last()) {
        (Some(first), Some(last)) => format!(
            "{} of {READERS} closed at {:.1}–{:.1} s",
            closed_at.len(),
            first.as_secs_f64(),
            last.as_secs_f64()
        ),
        _ => format!("none of {READERS} closed in {} s", SENDING.as_secs() + 3),
    };
    let redis = if relay.starts_with("redis") {
        format!(
            "Redis peak +{:.0} MB, subscriptions Redis dropped: {lost}; ",
            (redis_peak - redis_before) as f64 / 1e6
        )
    } else {
        String::new()
    };
    Ok(format!(
        "{closed}; {redis}server RSS peak +{:.0} MB; the fast reader got {} of {}",
        mb(peak_kb - rss_before),
        fast_got.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
    ))
}

/// Scenario f.
fn members_flood(args: &Args, relay: &str) -> anyhow::Result<String> {
    const MEMBERS: usize = 10_000;
    const FLOODERS: usize = 50;
    const PHASE: Duration = Duration::from_secs(5);
    let env = Env::start(args, relay, &["--history", "0"])?;
    let Some(url) = env.redis_url() else {
        return Ok("not run: the members are written into Redis".into());
    };
    // The room's members as instances keep them: a live instance key, and
    // a hash of connection id → nickname.
    let mut redis = redis::Client::open(url)?.get_connection()?;
    redis::cmd("SET")
        .arg("threadchat:instance:feedfacefeedface")
        .arg(1)
        .arg("EX")
        .arg(3600)
        .query::<()>(&mut redis)?;
    for chunk in (0..MEMBERS).collect::<Vec<_>>().chunks(1000) {
        let mut hset = redis::cmd("HSET");
        hset.arg("threadchat:members:big");
        for i in chunk {
            hset.arg(format!("feedfacefeedface-{i}"))
                .arg(format!("member{i}"));
        }
        hset.query::<()>(&mut redis)?;
    }
    let mut receiver = connect(env.addr, "receiver", "quiet")?;
    let mut sender = connect(env.addr, "sender", "quiet")?;
    let latencies: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let receiving = {
        let latencies = Arc::clone(&latencies);
        thread::spawn(move || {
            while let Ok(message) = receiver.read() {
                let Message::Text(t) = message else { continue };
                let Some(body) = super::receive::chat_body(t.as_str()) else {
                    continue;
                };
                if body == "end" {
                    return;
                }
                if let Ok(ts) = body.parse::<u64>() {
                    let us = now_micros().saturating_sub(ts);
                    latencies.lock().unwrap().push((Instant::now(), us));
                }
            }
        })
    };
    let started = Instant::now();
    let flood_from = started + PHASE;
    let flooding = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let answer_bytes = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let (flooding, requests, answer_bytes, addr) = (
                Arc::clone(&flooding),
                Arc::clone(&requests),
                Arc::clone(&answer_bytes),
                env.addr,
            );
            thread::spawn(move || {
                while !flooding.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(5));
                }
                while flooding.load(Ordering::Relaxed) {
                    if let Some(body) = get(addr, "/members?room=big") {
                        requests.fetch_add(1, Ordering::Relaxed);
                        answer_bytes.store(body.len() as u64, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut next = Instant::now();
    while started.elapsed() < 2 * PHASE {
        if !flooding.load(Ordering::Relaxed) && Instant::now() >= flood_from {
            flooding.store(true, Ordering::Relaxed);
        }
        sender.send(Message::text(now_micros().to_string()))?;
        next += Duration::from_millis(50);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    flooding.store(false, Ordering::Relaxed);
    sender.send(Message::text("end"))?;
    let _ = receiving.join();
    for flooder in flooders {
        let _ = flooder.join();
    }
    let latencies = latencies.lock().unwrap();
    let phase = |flood: bool| {
        let mut ms: Vec<f64> = latencies
            .iter()
            .filter(|(at, _)| (*at >= flood_from) == flood)
            .map(|(_, us)| *us as f64 / 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms.get(((ms.len() as f64 - 1.0) * q) as usize).copied();
        (at(0.5).unwrap_or(f64::NAN), at(0.99).unwrap_or(f64::NAN))
    };
    let (quiet50, quiet99) = phase(false);
    let (flood50, flood99) = phase(true);
    Ok(format!(
        "chat p50 / p99 in another room: {quiet50:.1} / {quiet99:.1} ms quiet, \
         {flood50:.1} / {flood99:.1} ms during {:.0} /members requests/s ({:.1} KB each)",
        requests.load(Ordering::Relaxed) as f64 / PHASE.as_secs_f64(),
        answer_bytes.load(Ordering::Relaxed) as f64 / 1000.0,
    ))
}

/// `GET path` on a fresh connection; the body, if the answer came.
fn get(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let at = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(answer.split_off(at + 4))
}

/// A counter from the server's `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let body = String::from_utf8(get(addr, "/metrics")?).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Redis's `used_memory`, in bytes.
fn redis_used_memory(env: &Env) -> Option<u64> {
    let mut redis = redis::Client::open(env.redis_url()?)
        .ok()?
        .get_connection()
        .ok()?;
    let info: String = redis::cmd("INFO").arg("memory").query(&mut redis).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
}
