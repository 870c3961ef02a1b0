//! Small things the client sockets and the Redis subscriptions share: a
//! TCP socket behind an `Arc`, readable and writable through it, and asking
//! whether a read would block.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::sync::Arc;

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
