//! Small things the client sockets and the Redis subscriptions share: a
//! TCP socket behind an `Arc`, readable and writable through it, asking
//! whether a read would block, and a client's [`Stream`] (plain, or TLS).

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "tls")]
use crate::tls::Wait;

/// A client's connection as the HTTP exchange sees it, on its start
/// thread: a TCP socket, or (on a TLS port) the TLS session over one. `&Stream`
/// reads and writes plaintext either way, with the socket's timeouts.
#[derive(Debug, Clone)]
pub enum Stream {
    Plain(Arc<TcpStream>),
    /// See [`crate::tls::Session`].
    #[cfg(feature = "tls")]
    Tls(Arc<crate::tls::Session>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &Arc<TcpStream> {
        match self {
            Stream::Plain(tcp) => tcp,
            #[cfg(feature = "tls")]
            Stream::Tls(session) => session.tcp(),
        }
    }

    /// Whether the client speaks TLS (for the `https` origin of its page).
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    pub fn set_read_timeout(&self, wait: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(wait)
    }

    pub fn set_write_timeout(&self, wait: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(wait)
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp().peer_addr()
    }

    /// Whether a read would return at once: the client has sent bytes
    /// (decrypted or not) not read yet, has closed, or the socket failed.
    pub fn has_input(&self) -> bool {
        match self {
            Stream::Plain(tcp) => has_input(tcp),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => session.has_plaintext() || has_input(session.tcp()),
        }
    }

    /// One read, for a WebSocket's read half. A plain socket waits as long
    /// as its read timeout says (the caller has set it to `wait`); a TLS
    /// session waits `wait` for a whole record.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    pub fn read_within(&self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => (&**tcp).read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => session.read(buf, wait.max(Duration::from_millis(1))),
        }
    }

    /// Writes what the socket takes now, without waiting (`MSG_DONTWAIT`;
    /// the socket stays blocking for the reader): `WouldBlock` if nothing.
    pub fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => {
                let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                socket2::SockRef::from(&**tcp).send_with_flags(buf, flags)
            }
            #[cfg(feature = "tls")]
            Stream::Tls(session) => session.write(buf, Wait::No),
        }
    }

    /// Writes, waiting for room until `deadline` at most. A plain socket
    /// waits as long as its write timeout says (the caller has set it).
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    pub fn write_by(&self, buf: &[u8], deadline: Instant) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => (&**tcp).write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => session.write(buf, Wait::Until(deadline)),
        }
    }

    /// Sends what was written but is not on the socket yet (a TLS session's
    /// records; a plain socket keeps nothing back): waiting for room until
    /// `deadline`, or (`None`) not at all, `WouldBlock` if some is left.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    pub fn flush_by(&self, deadline: Option<Instant>) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => session.flush(deadline.map_or(Wait::No, Wait::Until)),
        }
    }

    /// Says nothing more will be sent: a TLS session's `close_notify`, if
    /// the socket takes it at once. A plain socket has no such word.
    pub fn end_of_data(&self) {
        #[cfg(feature = "tls")]
        if let Stream::Tls(session) = self {
            session.close_notify();
        }
    }

    /// Shuts the socket down; before its sending side, a TLS session says
    /// it ends (`close_notify`), if the socket takes that at once.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            self.end_of_data();
        }
        self.tcp().shutdown(how)
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => (&**tcp).read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => Read::read(&mut &**session, buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => (&**tcp).write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => Write::write(&mut &**session, buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => (&**tcp).flush(),
            #[cfg(feature = "tls")]
            Stream::Tls(session) => Write::flush(&mut &**session),
        }
    }
}

/// A TCP socket shared by several owners (a reader, a writer, whoever may
/// shut it down), usable where `Read` and `Write` are asked for.
#[derive(Debug, Clone)]
pub struct SharedStream(pub Arc<TcpStream>);

impl Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for SharedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

/// Whether a read of `stream` would return without blocking: the client has
/// sent bytes not read yet, has closed, or the socket failed. It peeks at the
/// kernel's receive queue (`MSG_PEEK | MSG_DONTWAIT`), so nothing is consumed
/// and the socket stays in blocking mode for everyone else. Bytes already in
/// a reader's own buffer are not seen.
pub fn has_input(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    match socket2::SockRef::from(stream).recv_with_flags(&mut byte, flags) {
        // Data, or 0 for the end of the stream: a read returns either way.
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}
