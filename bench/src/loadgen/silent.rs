//! Scenario i, an attack: **silent starts from many addresses.** From each
//! of N addresses (127.0.0.10, 127.0.0.11, …) an attacker keeps 100 TCP
//! connections open that never send a byte, and opens a new one whenever
//! the server cuts one (a 408 once its head timeout passes, or a 503 when
//! the address is over a limit). Meanwhile another address (127.0.0.2)
//! asks `/healthz` every 20 ms and times the answers. Run with 11 and
//! with 40 addresses. Target: the `/healthz` p50 stays ≤ 50 ms (before the
//! per-address start cap, 11 addresses filled all 1,024 start places and
//! `/healthz` took 10.5 s).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::Args;
use super::env::Env;

/// Silent connections each attacking address keeps open.
const PER_ADDRESS: usize = 100;
/// Attacking before measuring: every place the attack can take is taken.
const RAMP: Duration = Duration::from_secs(2);
/// Measuring: longer than the server's 10 s head timeout, so the
/// connections it cuts are reopened within it.
const MEASURE: Duration = Duration::from_secs(11);

/// Scenario i: one line for 11 addresses and one for 40.
pub(super) fn silent_starts(args: &Args, relay: &str) -> anyhow::Result<String> {
    let mut parts = Vec::new();
    for addresses in [11, 40] {
        parts.push(one_round(args, relay, addresses)?);
    }
    Ok(parts.join("; "))
}

/// One attack from `addresses` addresses, against a fresh server with its
/// default per-address limits.
fn one_round(args: &Args, relay: &str, addresses: usize) -> anyhow::Result<String> {
    let env = Env::start_limited(args, relay, &["--history", "0"])?;
    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..addresses)
        .map(|i| {
            let ip = format!("127.0.0.{}", 10 + i);
            let (stop, reopened, addr) = (Arc::clone(&stop), Arc::clone(&reopened), env.addr);
            thread::spawn(move || attack_from(&ip, addr, &stop, &reopened))
        })
        .collect();
    thread::sleep(RAMP);
    let mut ms = Vec::new();
    let mut failed = 0;
    let started = Instant::now();
    while started.elapsed() < MEASURE {
        let asked = Instant::now();
        if healthz(env.addr) {
            ms.push(asked.elapsed().as_secs_f64() * 1000.0);
        } else {
            failed += 1;
        }
        thread::sleep(Duration::from_millis(20).saturating_sub(asked.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        let _ = attacker.join();
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(format!(
        "{addresses} addresses × {PER_ADDRESS}: /healthz p50 {:.1} ms, p99 {:.1} ms \
         ({} answered, {failed} not), {:.0} attacking connections cut and reopened/s",
        at(0.5),
        at(0.99),
        ms.len(),
        reopened.load(Ordering::Relaxed) as f64 / (RAMP + MEASURE).as_secs_f64(),
    ))
}

/// Keeps [`PER_ADDRESS`] silent connections from `ip` open until `stop`,
/// opening a new one for each the server closes.
fn attack_from(ip: &str, addr: SocketAddr, stop: &AtomicBool, reopened: &AtomicU64) {
    let Ok(local) = format!("{ip}:0").parse::<SocketAddr>() else {
        return;
    };
    let open = || -> Option<TcpStream> {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        socket.bind(&local.into()).ok()?;
        socket
            .connect_timeout(&addr.into(), Duration::from_secs(1))
            .ok()?;
        let stream = TcpStream::from(socket);
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    };
    let mut conns: Vec<Option<TcpStream>> = (0..PER_ADDRESS).map(|_| open()).collect();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        for conn in &mut conns {
            // Anything from the server (408, 503) or its close: it is cut.
            let cut = match conn {
                None => true,
                Some(stream) => !matches!(
                    stream.read(&mut buf),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                ),
            };
            if cut {
                if conn.is_some() {
                    reopened.fetch_add(1, Ordering::Relaxed);
                }
                *conn = None;
                *conn = open();
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `GET /healthz` from 127.0.0.2 was answered 200 (within 30 s).
fn healthz(addr: SocketAddr) -> bool {
    let ask = || -> std::io::Result<bool> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let local: SocketAddr = "127.0.0.2:0".parse().expect("an address");
        socket.bind(&local.into())?;
        socket.connect_timeout(&addr.into(), Duration::from_secs(30))?;
        let mut stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(answer.starts_with(b"HTTP/1.1 200"))
    };
    ask().unwrap_or(false)
}
