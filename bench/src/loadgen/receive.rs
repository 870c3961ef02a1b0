//! The receiving side: two threads wait on every client's socket with
//! `epoll` and check what arrives (see the crate's doc for why).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tungstenite::{Message, WebSocket};

use super::client::now_micros;
use super::tls::Stream;

/// Threads that receive for all clients of a scenario (one per core).
pub(crate) const RECEIVER_THREADS: usize = 2;

/// One client on the receiving side: its socket, switched to non-blocking,
/// and what it has seen so far.
pub(crate) struct Receiving {
    index: usize,
    ws: WebSocket<Stream>,
    /// The next sequence number expected from each sender.
    next: Vec<u64>,
    seen: Seen,
    open: bool,
}

impl Receiving {
    pub(crate) fn new(
        index: usize,
        ws: WebSocket<Stream>,
        senders: usize,
    ) -> anyhow::Result<Receiving> {
        ws.get_ref().tcp().set_nonblocking(true)?;
        Ok(Receiving {
            index,
            ws,
            next: vec![0; senders],
            seen: Seen::default(),
            open: true,
        })
    }

    /// Reads every frame that has arrived, checking each sender's sequence.
    pub(crate) fn drain(&mut self, delivered: &AtomicU64, progress: &[AtomicU64]) {
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
pub(crate) fn receive(
    mut clients: Vec<Receiving>,
    stop: &AtomicBool,
    delivered: &AtomicU64,
    progress: &[AtomicU64],
) -> anyhow::Result<Vec<Seen>> {
    let epoll = Epoll::new()?;
    for (slot, client) in clients.iter().enumerate() {
        epoll.add(client.ws.get_ref().tcp().as_raw_fd(), slot as u64)?;
    }
    // Frames may already be waiting in tungstenite's buffer (or, over TLS,
    // decrypted in the session), where epoll cannot see them.
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
                    epoll.remove(client.ws.get_ref().tcp().as_raw_fd());
                }
            }
        }
    }
    Ok(clients.into_iter().map(|c| c.seen).collect())
}

/// A level-triggered `epoll` set: the few lines of libc the receivers need.
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> std::io::Result<Epoll> {
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

/// What one receiver saw.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) latencies_us: Vec<u64>,
}

/// The `"message"` of a live chat frame, found by a scan rather than a JSON
/// parse: the load generator shares the CPU with the server, so it must be
/// cheaper per frame than the server is. The server writes chat frames as
/// `{"type":"chat","nickname":…,"message":"…",…}`; the bodies sent here are
/// digits and colons, which JSON never escapes.
pub(crate) fn chat_body(frame: &str) -> Option<&str> {
    let rest = frame.strip_prefix(r#"{"type":"chat","#)?;
    let start = rest.find(r#""message":""#)? + r#""message":""#.len();
    let end = rest[start..].find('"')?;
    Some(&rest[start..start + end])
}
