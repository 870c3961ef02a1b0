//! Scenarios a and b (a room fanning out, [`fan_out`]), g and h (many
//! rooms fanning out at once, the same function), c (idle clients, [`idle`])
//! and t (short connections, [`handshakes`]: what a TLS handshake costs).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use super::client::{connect_all, now_micros, send};
use super::env::{Env, Kernel, cpu_ticks, rss_kb, slab_caches, slab_growth};
use super::receive::{RECEIVER_THREADS, Receiving, Seen, receive};
use super::report::{Cpu, Row};
use super::tls::Stream;

pub(crate) enum Pace {
    PerSecond(u32),
    FlatOut,
}

/// How a fan-out scenario lays out its clients: `rooms` rooms of
/// `per_room` clients, the first `senders` of each sending.
pub(crate) struct Rooms {
    pub(crate) rooms: usize,
    pub(crate) per_room: usize,
    pub(crate) senders: usize,
}

impl Rooms {
    /// One room.
    pub(crate) fn one(clients: usize, senders: usize) -> Rooms {
        Rooms {
            rooms: 1,
            per_room: clients,
            senders,
        }
    }
}

/// `layout.rooms` rooms of `layout.per_room` clients; the first
/// `layout.senders` of each room send for `duration`. Clients are numbered
/// room by room, and senders likewise (sender `s` is in room
/// `s / layout.senders`).
pub(crate) fn fan_out(
    env: &Env,
    layout: Rooms,
    pace: Pace,
    duration: Duration,
) -> anyhow::Result<Row> {
    let Rooms {
        rooms,
        per_room,
        senders: senders_per_room,
    } = layout;
    let (clients, senders) = (rooms * per_room, rooms * senders_per_room);
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(clients);
    let mut handshake = String::new();
    for room in 0..rooms {
        let name = if rooms == 1 {
            "bench".to_owned()
        } else {
            format!("bench-{room}")
        };
        let (more, summary) = connect_all(env.addr, env.tls(), per_room, &name)?;
        sockets.extend(more);
        handshake = summary;
    }
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
        let (room, k) = (i / per_room, i % per_room);
        if k < senders_per_room {
            // This client's number among all senders.
            let s = room * senders_per_room + k;
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
                (Arc::clone(&sent[s]), Arc::clone(&go), Arc::clone(&progress));
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
                        // (a sender does not read its own messages, nor
                        // anyone outside its room).
                        let slowest = || {
                            (room * per_room..(room + 1) * per_room)
                                .filter(|&r| r != i)
                                .map(|r| progress[r * senders + s].load(Ordering::Relaxed))
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
                            let text = format!("{s}:{seq}:{}", now_micros());
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
    let redis_cpu: Vec<u64> = env
        .redis_ticks()
        .into_iter()
        .zip(redis_cpu0)
        .map(|(now, then)| now - then)
        .collect();
    stop_reading.store(true, Ordering::Relaxed);
    let mut seen: Vec<Seen> = Vec::with_capacity(clients);
    for reader in readers {
        let group = reader
            .join()
            .map_err(|_| anyhow::anyhow!("a receiver panicked"))??;
        seen.extend(group);
    }
    let sent_total: Vec<u64> = sent.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let mut row = summarize(clients, per_room, &sent_total, &seen, send_time);
    row.connect = connect_time;
    row.handshake = handshake;
    let window = send_time.as_secs_f64();
    row.cpu = Some(Cpu {
        server: cpu as f64 / window,
        redis: redis_cpu.iter().map(|&t| t as f64 / window).collect(),
        load: load_cpu as f64 / window,
    });
    row.senders = senders;
    row.redis_connections = redis_connections;
    Ok(row)
}

/// The row of a fan-out: `clients` in rooms of `per_room`.
pub(crate) fn summarize(
    clients: usize,
    per_room: usize,
    sent: &[u64],
    seen: &[Seen],
    sending: Duration,
) -> Row {
    let sent_total: u64 = sent.iter().sum();
    // Each message goes to everyone in its room but its sender.
    let expected = sent_total * (per_room as u64 - 1);
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
pub(crate) fn idle(env: &Env, clients: usize) -> anyhow::Result<Row> {
    let rss0 = rss_kb(env.pid());
    // Machine-wide: both ends of every connection (the load generator's
    // sockets too, which cost the same whatever the server is).
    let kernel0 = Kernel::now();
    let slabs0 = slab_caches();
    let started = Instant::now();
    let connect_cpu0 = cpu_ticks(env.pid());
    let (mut sockets, handshake) = connect_all(env.addr, env.tls(), clients, "idle")?;
    let connect_time = started.elapsed();
    // Ticks are 10 ms: over thousands of clients, a fine enough average.
    let connect_cpu = (cpu_ticks(env.pid()) - connect_cpu0) as f64 * 10.0 / clients as f64;
    thread::sleep(Duration::from_secs(2));
    let rss = rss_kb(env.pid());
    let kernel = Kernel::now().per_client(&kernel0, clients);
    let grown = slab_growth(&slabs0, &slab_caches(), clients);
    if !grown.is_empty() {
        let top: Vec<String> = grown
            .iter()
            .take(8)
            .map(|(name, kib)| format!("{name} {kib:.1}"))
            .collect();
        eprintln!(
            "slab per client (KiB, both ends of every connection): {}",
            top.join(", ")
        );
    }
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
        kernel_per_client_kib: Some(kernel),
        idle_cpu: Some(idle_cpu as f64 / 10.0),
        connect_cpu_ms: Some(connect_cpu),
        ..Row::default()
    })
}

/// Scenario t: `connections` short connections from four threads, each
/// asking `GET /healthz` and closing. Over TLS each is a full handshake
/// (the clients resume no session: see `tls::Certs::new`), so the server's
/// CPU per connection beside plain is what a handshake costs it.
pub(crate) fn handshakes(env: &Env, connections: usize) -> anyhow::Result<Row> {
    const THREADS: usize = 4;
    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_ticks(env.pid());
    let started = Instant::now();
    let askers: Vec<JoinHandle<anyhow::Result<Vec<Duration>>>> = (0..THREADS)
        .map(|_| {
            let (next, tls, addr) = (Arc::clone(&next), env.tls().cloned(), env.addr);
            thread::Builder::new().spawn(move || {
                let mut took = Vec::new();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < connections {
                    let t = Instant::now();
                    healthz(addr, tls.as_ref())?;
                    took.push(t.elapsed());
                }
                Ok(took)
            })
        })
        .collect::<Result<_, _>>()?;
    let mut took = Vec::with_capacity(connections);
    for asker in askers {
        took.extend(
            asker
                .join()
                .map_err(|_| anyhow::anyhow!("an asker panicked"))??,
        );
    }
    let all = started.elapsed();
    let cpu = (cpu_ticks(env.pid()) - cpu0) as f64 * 10.0 / connections as f64;
    took.sort_unstable();
    let ms = |p: f64| {
        took[((took.len() as f64 * p) as usize).min(took.len() - 1)].as_secs_f64() * 1000.0
    };
    Ok(Row {
        clients: connections,
        connect: all,
        handshake: format!("{:.1} / {:.1} ms", ms(0.5), ms(0.99)),
        connect_cpu_ms: Some(cpu),
        ..Row::default()
    })
}

/// One `GET /healthz` on a connection of its own (over TLS when `tls`).
fn healthz(
    addr: std::net::SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    // As browsers do: the request does not wait for the handshake's last
    // record to be acknowledged.
    tcp.set_nodelay(true)?;
    let mut stream = Stream::connect(tcp, tls)?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    anyhow::ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "/healthz answered {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(40)])
    );
    Ok(())
}
