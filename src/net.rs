//! One small thing the client sockets and the Redis subscriptions share: a
//! TCP socket behind an `Arc`, readable and writable through it.

use std::io::{self, Read, Write};
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
