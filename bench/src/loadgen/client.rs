//! Chat clients: connecting one, connecting thousands at once (over TLS
//! with `--tls`), sending.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::ClientConfig;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::tls::Stream;

pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One connected client: its WebSocket, after the member list has arrived.
pub(crate) fn connect(
    addr: SocketAddr,
    nickname: &str,
    room: &str,
) -> anyhow::Result<WebSocket<TcpStream>> {
    connect_on(TcpStream::connect(addr)?, addr, nickname, room)
}

/// The same over a socket already connected to `addr`.
pub(crate) fn connect_on(
    stream: TcpStream,
    addr: SocketAddr,
    nickname: &str,
    room: &str,
) -> anyhow::Result<WebSocket<TcpStream>> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_nodelay(true)?;
    join(stream, &format!("ws://{addr}"), nickname, room)
}

/// One connected client of a scenario that may run over TLS: `wss://` when
/// `tls` is given (the TLS handshake, then the WebSocket one), else `ws://`.
pub(crate) fn connect_over(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    nickname: &str,
    room: &str,
) -> anyhow::Result<WebSocket<Stream>> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    tcp.set_nodelay(true)?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    join(
        Stream::connect(tcp, tls)?,
        &format!("{scheme}://{addr}"),
        nickname,
        room,
    )
}

/// The WebSocket handshake on `stream` to `base` (`ws://host:port`), then
/// the wait for the member list.
fn join<S: Read + Write>(
    stream: S,
    base: &str,
    nickname: &str,
    room: &str,
) -> anyhow::Result<WebSocket<S>> {
    let url = format!("{base}/chat/{nickname}?room={room}");
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

/// Clients connecting at the same time. People arrive in parallel, and each
/// connector waits for its own handshake — which includes its join being
/// announced, at most one announcement window (up to 500 ms) later.
pub(crate) const CONNECTORS: usize = 512;

/// Connects `clients` clients from [`CONNECTORS`] threads. Returns them in
/// order, and the handshake latency p50 / p99 as text.
pub(crate) fn connect_all(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    clients: usize,
    room: &str,
) -> anyhow::Result<(Vec<WebSocket<Stream>>, String)> {
    let next = Arc::new(AtomicU64::new(0));
    let connectors: Vec<_> = (0..CONNECTORS.min(clients))
        .map(|_| {
            let (next, room, tls) = (Arc::clone(&next), room.to_owned(), tls.cloned());
            thread::Builder::new().stack_size(256 << 10).spawn(move || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= clients {
                        return Ok(done);
                    }
                    let t = Instant::now();
                    let ws = connect_over(addr, tls.as_ref(), &format!("u{i}"), &room)?;
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
pub(crate) fn send<S: Read + Write>(
    out: &mut WebSocket<S>,
    message: Message,
) -> tungstenite::Result<()> {
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
