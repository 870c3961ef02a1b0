//! One client's TLS session, used by two threads at once.
//!
//! A TLS session is one state machine for both directions: the records it
//! writes carry sequence numbers, a record read may make it answer (an alert,
//! a TLS 1.3 key update), and decrypting a record changes state the writer
//! depends on. So both threads need it, and it sits behind a `Mutex`. The
//! rule that keeps either direction from blocking the other:
//!
//! **The lock is never held across a blocking call.**
//!
//! * The **reader** waits for the socket to become readable *without* the
//!   lock (`poll`). Only then does it take the lock, pull what arrived into the session
//!   (`read_tls`, which cannot block now), decrypt it, and let go.
//! * The **writer** takes the lock to encrypt (`writer().write`) and to hand
//!   records to the socket *without waiting* (`MSG_DONTWAIT`). What the
//!   socket does not take stays queued in the session, and the writer waits
//!   for room (`poll`) without the lock, then comes back for more.
//! * Records leave from **one queue, in order**, under the lock, whoever
//!   sends them: the writer's chat frames, and the answers a record read
//!   made the session queue (the reader sends those itself, right after
//!   decrypting, if the socket takes them; otherwise they go out with the
//!   writer's next write, still in order).
//!
//! So a client that stops reading holds only its writer (until
//! `--write-timeout`), and a client that stops sending holds nobody: its
//! reader sleeps in the kernel with no lock held.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection};

/// How a write may wait for the socket to take its records.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// Not at all: what the socket does not take now stays queued, and the
    /// call says `WouldBlock`.
    No,
    /// Until this instant, then `TimedOut`.
    Until(Instant),
}

/// A client's TLS session and its socket (see the module doc).
#[derive(Debug)]
pub struct Session {
    tcp: Arc<TcpStream>,
    state: Mutex<ServerConnection>,
}

/// Why a TLS start failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client spoke plain HTTP (or anything but TLS) to the TLS port.
    #[error("not TLS (plain HTTP on the TLS port?)")]
    NotTls,
    /// The client went away or sent nothing in time.
    #[error("handshake not finished in time")]
    Timeout,
    #[error("client closed during the handshake")]
    Closed,
    /// The handshake failed (the client's alert, or a protocol error).
    #[error("{0}")]
    Tls(rustls::Error),
    #[error("{0}")]
    Io(io::Error),
}

/// The first byte of every TLS connection: a handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

impl Session {
    /// Runs the handshake on `tcp`, on the connection's start thread,
    /// within `deadline` (the same time a plain client has to send its
    /// request head, so a slow handshake is closed like a slow head).
    ///
    /// A client whose first byte is not a TLS handshake record gets
    /// [`HandshakeError::NotTls`], before anything is read: the caller can
    /// still answer it in plain text.
    pub fn handshake(
        tcp: Arc<TcpStream>,
        config: Arc<ServerConfig>,
        deadline: Instant,
    ) -> Result<Session, HandshakeError> {
        let left = |deadline: Instant| {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(HandshakeError::Timeout)
            } else {
                Ok(left)
            }
        };
        tcp.set_read_timeout(Some(left(deadline)?))
            .map_err(HandshakeError::Io)?;
        match peek(&tcp) {
            Ok(Some(HANDSHAKE_RECORD)) => {}
            Ok(Some(_)) => return Err(HandshakeError::NotTls),
            Ok(None) => return Err(HandshakeError::Closed),
            Err(e) if is_timeout(&e) => return Err(HandshakeError::Timeout),
            Err(e) => return Err(HandshakeError::Io(e)),
        }
        // The handshake's flights go out in several writes: without this,
        // Nagle holds each back until the last is acknowledged.
        tcp.set_nodelay(true).map_err(HandshakeError::Io)?;
        let mut conn = ServerConnection::new(config).map_err(HandshakeError::Tls)?;
        while conn.is_handshaking() {
            if conn.wants_write() {
                tcp.set_write_timeout(Some(left(deadline)?))
                    .map_err(HandshakeError::Io)?;
                conn.write_tls(&mut &*tcp).map_err(io_to_handshake)?;
                continue;
            }
            tcp.set_read_timeout(Some(left(deadline)?))
                .map_err(HandshakeError::Io)?;
            if conn.read_tls(&mut &*tcp).map_err(io_to_handshake)? == 0 {
                return Err(HandshakeError::Closed);
            }
            if let Err(e) = conn.process_new_packets() {
                // Tell the client why (best effort), then give up.
                let _ = conn.write_tls(&mut &*tcp);
                return Err(HandshakeError::Tls(e));
            }
        }
        // TLS 1.3 session tickets, queued at the end of the handshake.
        while conn.wants_write() {
            tcp.set_write_timeout(Some(left(deadline)?))
                .map_err(HandshakeError::Io)?;
            conn.write_tls(&mut &*tcp).map_err(io_to_handshake)?;
        }
        // The socket as a plain one starts its HTTP exchange: the head's
        // reader sets its own timeout, and answers wait as long as needed.
        tcp.set_write_timeout(None).map_err(HandshakeError::Io)?;
        Ok(Session {
            tcp,
            state: Mutex::new(conn),
        })
    }

    /// The TCP socket under the session (for timeouts and `shutdown`).
    pub fn tcp(&self) -> &Arc<TcpStream> {
        &self.tcp
    }

    fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        // A thread that panicked holding the lock left the session in some
        // state; the connection is being closed anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads decrypted bytes into `buf`, waiting `wait` at most in all: a
    /// client trickling a TLS record a byte at a time, which never
    /// completes a record, is as silent as one sending nothing (the read
    /// fails with `TimedOut`, as a plain socket's read would).
    ///
    /// `Ok(0)` at the end (a `close_notify`, or the socket closed).
    pub fn read(&self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        let until = Instant::now() + wait;
        loop {
            {
                let mut conn = self.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The socket closed without a close_notify: for a
                    // WebSocket, whose own close handshake says whether
                    // it ended cleanly, that is an ordinary end.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
            }
            // Blocking, without the lock.
            wait_readable(&self.tcp, until)?;
            let mut conn = self.lock();
            // Bytes are waiting and only this thread reads: no blocking.
            if conn.read_tls(&mut &*self.tcp)? == 0 {
                return Ok(0);
            }
            let processed = conn.process_new_packets();
            // An alert, a key update's answer: out now if the socket takes it.
            let _ = send_queued(&mut conn, &self.tcp);
            if let Err(e) = processed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Encrypts and sends `buf` (or its first part: the session takes at
    /// most its buffer limit at once), as [`Wait`] says.
    ///
    /// Records queued before this call go out first; new plaintext is taken
    /// only once they are all out, so a client that reads slowly holds no
    /// more than one write's records in the session.
    pub fn write(&self, buf: &[u8], wait: Wait) -> io::Result<usize> {
        self.flush(wait)?;
        let mut conn = self.lock();
        let n = conn.writer().write(buf)?;
        match send_queued(&mut conn, &self.tcp) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
            Ok(()) => Ok(n),
        }
    }

    /// Sends every queued record, as [`Wait`] says.
    pub fn flush(&self, wait: Wait) -> io::Result<()> {
        loop {
            match send_queued(&mut self.lock(), &self.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            // The lock is free while we wait for room.
            match wait {
                Wait::No => return Err(io::ErrorKind::WouldBlock.into()),
                Wait::Until(deadline) => wait_writable(&self.tcp, deadline)?,
            }
        }
    }

    /// Says the session ends (`close_notify`), if the socket takes it now.
    pub fn close_notify(&self) {
        let mut conn = self.lock();
        conn.send_close_notify();
        let _ = send_queued(&mut conn, &self.tcp);
    }

    /// Whether decrypted bytes wait to be read (the socket's own input is
    /// the caller's to ask about).
    pub fn has_plaintext(&self) -> bool {
        self.lock()
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }
}

/// Hands queued records to the socket, taking only what fits now: `Ok`
/// when none is left, `WouldBlock` when some are.
fn send_queued(conn: &mut ServerConnection, tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut DontWait(tcp))?;
    }
    Ok(())
}

/// A socket's `Write` that never blocks (`MSG_DONTWAIT`), for use under
/// the session's lock; the socket itself stays blocking for the reader.
struct DontWait<'a>(&'a TcpStream);

impl Write for DontWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        socket2::SockRef::from(self.0).send_with_flags(buf, flags)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits, with the socket's read timeout, until a byte can be read; returns
/// it without consuming it (`None`: the peer closed).
fn peek(tcp: &TcpStream) -> io::Result<Option<u8>> {
    let mut byte = [0u8];
    loop {
        match tcp.peek(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Waits until the socket's send buffer has room, or `deadline` passes.
fn wait_writable(tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    wait_for(tcp, libc::POLLOUT, deadline).map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            io::Error::new(e.kind(), "data waited past --write-timeout")
        } else {
            e
        }
    })
}

/// Waits until the socket has input (or has closed, or failed), or
/// `deadline` passes. A `shutdown()` of the socket by another thread wakes
/// it at once, as it wakes a blocked read.
fn wait_readable(tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    wait_for(tcp, libc::POLLIN, deadline)
}

/// `poll` for one socket and one event, until `deadline` (`TimedOut`).
///
/// The server's second `unsafe` block (the first is `session::sched`): std
/// has no `poll`, and a thread that must wait for a socket *without*
/// reading or writing it needs one.
#[allow(unsafe_code)]
fn wait_for(tcp: &TcpStream, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut fd = libc::pollfd {
            fd: tcp.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        match unsafe { libc::poll(&mut fd, 1, ms) } {
            // Ready, or failed: the next call on the socket says which.
            1.. => return Ok(()),
            0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_to_handshake(e: io::Error) -> HandshakeError {
    if is_timeout(&e) {
        HandshakeError::Timeout
    } else if e.kind() == io::ErrorKind::InvalidData {
        HandshakeError::Tls(rustls::Error::General(e.to_string()))
    } else {
        HandshakeError::Io(e)
    }
}

/// How long a call waits where the socket has no timeout of its own.
const NO_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// For the HTTP exchange on the start thread, which uses the session
/// alone: reads and writes wait as long as the socket's own timeouts say.
impl Read for &Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = self.tcp.read_timeout()?.unwrap_or(NO_TIMEOUT);
        Session::read(self, buf, wait)
    }
}

impl Write for &Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let wait = self.tcp.write_timeout()?.unwrap_or(NO_TIMEOUT);
        Session::write(self, buf, Wait::Until(Instant::now() + wait))
    }
    fn flush(&mut self) -> io::Result<()> {
        let wait = self.tcp.write_timeout()?.unwrap_or(NO_TIMEOUT);
        Session::flush(self, Wait::Until(Instant::now() + wait))
    }
}
