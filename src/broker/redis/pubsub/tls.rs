//! A subscription over TLS (`rediss://`): the TLS session that the plain
//! subscription's reads and writes go through instead of the socket.
//!
//! **Why this is simple here.** A client's WebSocket is read by one thread
//! and written by another, and a TLS session — one state machine for both
//! directions — has to be split between them (the server's side of TLS). A
//! subscription is read *and* written by one thread, its listener (it
//! writes `SUBSCRIBE` and the odd `PING`, then reads): rustls's own
//! [`StreamOwned`] (a session and its socket, as `Read + Write`) is all it
//! needs, with no lock.
//!
//! **What stays as it was.** The socket is still the raw `TcpStream`
//! behind an `Arc`: shutting it down from another thread (a canceller, the
//! heartbeat, the failover watcher) still wakes a read blocked in it, which
//! returns the end of the stream — without TLS's `close_notify`, an error,
//! as a loss should be. Timeouts and keepalive are the socket's, as before.
//!
//! **What changes.** TLS decrypts a whole record (up to 16 KiB) at a time,
//! so bytes can wait in the session after the subscription's buffer is
//! full: [`TlsWire::holds_plaintext`] counts them as already here. And the
//! handshake, which the plain path has no need of, is bounded by the
//! connect timeout as a whole ([`TlsWire::handshake`]): a port that accepts
//! and never answers, or answers a byte at a time, fails in that time.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::net::SharedStream;

/// A TLS session with Redis over a shared socket.
pub(super) struct TlsWire(StreamOwned<ClientConnection, SharedStream>);

impl TlsWire {
    /// Makes a TLS session with `host` on `stream`, its certificate checked
    /// as `config` says, within `timeout` in all. The socket's read timeout
    /// is cleared again after (as a plain connection's is never set).
    pub(super) fn handshake(
        stream: &Arc<TcpStream>,
        host: &str,
        port: u16,
        config: &Arc<ClientConfig>,
        timeout: Duration,
    ) -> io::Result<TlsWire> {
        let failed = |e: &dyn std::fmt::Display| {
            io::Error::other(format!("TLS handshake with {host}:{port} failed: {e}"))
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|e| failed(&e))?;
        let session = ClientConnection::new(Arc::clone(config), name).map_err(|e| failed(&e))?;
        let mut tls = StreamOwned::new(session, SharedStream(Arc::clone(stream)));
        let deadline = Instant::now() + timeout;
        while tls.conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS handshake with {host}:{port} took longer than {timeout:?} \
                         (is it a TLS port?)"
                    ),
                ));
            }
            stream.set_read_timeout(Some(left))?;
            stream.set_write_timeout(Some(left))?;
            match tls.conn.complete_io(&mut tls.sock) {
                Ok(_) => {}
                // Timed out: the loop says so, once the deadline has passed.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // What rustls says of bytes that are not TLS.
                    return Err(failed(&format!("{e} (is it a TLS port?)")));
                }
                Err(e) => return Err(failed(&e)),
            }
        }
        stream.set_read_timeout(None)?;
        Ok(TlsWire(tls))
    }

    /// Whether decrypted bytes wait in the session, not yet read: a read
    /// returns them without touching the socket.
    pub(super) fn holds_plaintext(&self) -> bool {
        // rustls wants to read the socket only when it holds no plaintext.
        !self.0.conn.wants_read()
    }
}

impl Read for TlsWire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsWire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
