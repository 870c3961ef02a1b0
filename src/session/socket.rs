//! One client socket, used by two threads without ever corrupting a frame.
//!
//! A blocking tungstenite `WebSocket` cannot simply be split into a read half
//! and a write half (tungstenite-rs issues #311 and #323): `read()` itself
//! *writes* — it answers pings with pongs and closes with close replies. Two
//! full `WebSocket`s on `try_clone()`d streams therefore have two writers, and
//! a pong written by the reader can land in the middle of a data frame being
//! written by the other thread.
//!
//! The rule here: **exactly one writer.**
//!
//! * [`Writer`] owns the only `WebSocket` that writes to the socket, behind a
//!   `Mutex`. Whoever holds the lock writes whole frames. The socket has a
//!   write timeout, so a client that stops reading cannot hold the lock for
//!   longer than that.
//! * [`ReadSide`] is a second `WebSocket` over [`ReadHalf`], whose `Write` goes
//!   nowhere. Its automatic pongs and close replies are discarded; the reader
//!   thread sends them itself, through the [`Writer`].
//! * [`Writer::try_send_all`] is the one way to write without blocking: it
//!   takes the lock only if it is free, and writes only what the socket's
//!   buffer takes at once (`MSG_DONTWAIT`). The room's dispatcher uses it to
//!   deliver directly ([`fanout`](crate::broker::fanout)); whatever it could
//!   not write stays in the writer, in order, for the next blocking write.
//!
//! Both halves share one file descriptor (an `Arc<TcpStream>`: `&TcpStream` is
//! `Read + Write`), so a connection costs one descriptor, and anyone holding
//! the `Arc` can `shutdown()` the socket to wake a blocked read.
//!
//! On a TLS port both halves share the client's TLS session too, which
//! needs a rule of its own (no lock held across a blocking call): see
//! [`crate::tls::Session`]. The halves below only pass their reads and
//! writes to it.

use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error, Message, WebSocket};

use super::liveness::{self, FrameWatch, Stalled};
use crate::net::Stream;

/// The reading side of the socket. Writes are discarded: see the module doc.
///
/// Every byte read passes through a [`FrameWatch`] (see
/// [`super::liveness`]): while a message is open, the read waits
/// no longer than the message's deadline, and a read past it fails with
/// [`Stalled`].
#[derive(Debug)]
pub struct ReadHalf {
    stream: Stream,
    watch: FrameWatch,
    /// How long a read waits when no message is open (the ping interval).
    idle_wait: Duration,
    /// A read waits no later than this either (a token's expiry).
    wake_by: Option<Instant>,
    /// The read timeout this half last gave the socket.
    applied: Option<Duration>,
}

impl ReadHalf {
    /// Makes reads wait no later than `at` (a timeout then, as for the
    /// ping interval), or lifts that bound.
    pub fn wake_by(&mut self, at: Option<Instant>) {
        self.wake_by = at;
    }

    /// Whether a message (or control frame) has begun and not ended: the
    /// client is sending, however slowly.
    pub fn message_open(&self) -> bool {
        self.watch.deadline().is_some()
    }

    /// Whether a read would return at once: the client has sent bytes
    /// (decrypted or not) not read yet, has closed, or the socket failed.
    /// Bytes in tungstenite's own buffer are not seen.
    pub fn has_input(&self) -> bool {
        self.stream.has_input()
    }

    /// Gives the socket the read timeout it needs now, if it differs from
    /// the last one (a system call only when a message is open, or ends).
    fn wait_at_most(&mut self, wait: Duration) -> io::Result<()> {
        let wait = wait.max(Duration::from_millis(1));
        if self.applied != Some(wait) {
            self.stream.set_read_timeout(Some(wait))?;
            self.applied = Some(wait);
        }
        Ok(())
    }

    /// One read of the socket, waiting `wait` at most.
    fn read_some(&mut self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        self.wait_at_most(wait)?;
        self.stream.read_within(buf, wait)
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let now = Instant::now();
        self.watch.check(now).map_err(Stalled::into_io)?;
        let mut wait = self.idle_wait;
        for deadline in [self.watch.deadline(), self.wake_by].into_iter().flatten() {
            wait = wait.min(deadline.saturating_duration_since(now));
        }
        let n = match self.read_some(buf, wait) {
            // Woken by the open message's deadline: the client is
            // trickling, not silent, and is told so.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                self.watch.check(Instant::now()).map_err(Stalled::into_io)?;
                return Err(e);
            }
            read => read?,
        };
        self.watch
            .feed(&buf[..n], Instant::now())
            .map_err(Stalled::into_io)?;
        Ok(n)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reader thread's WebSocket.
pub type ReadSide = WebSocket<ReadHalf>;

/// The writing side of the socket: blocking writes, or, while `dont_wait`
/// is set, writes that take only what fits in the socket's buffer now. The
/// socket itself stays in blocking mode: the reader thread blocks on it
/// meanwhile.
///
/// **The write deadline.** A client that stops reading must be closed
/// `--write-timeout` after the oldest data it has not taken became due —
/// not after each `send()` call blocks that long: a client draining a few
/// bytes a second would otherwise restart the clock with every partial
/// write, and hold its data (and, with per-client subscriptions, Redis's
/// buffer for it) for ever. So `due` records when the data waiting now
/// first had to wait, and each blocking write is given only the time left.
#[derive(Debug)]
pub struct WriteHalf {
    stream: Stream,
    dont_wait: bool,
    /// `--write-timeout`.
    write_timeout: Duration,
    /// When the oldest data not yet taken by the socket became due; `None`
    /// when everything has been written.
    due: Option<Instant>,
    /// The write timeout this half last gave the socket.
    applied: Option<Duration>,
    /// Frames written past tungstenite ([`Writer::try_send_wire`]) that the
    /// socket did not take: they go out before anything written after
    /// them. Freed once written out.
    backlog: Vec<u8>,
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.backlog.is_empty() {
            self.drain_backlog()?;
        }
        self.write_out(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.backlog.is_empty() {
            self.drain_backlog()?;
        }
        // Whatever the stream itself still holds (a TLS session's records).
        let deadline = match self.due {
            _ if self.dont_wait => None,
            Some(due) => Some(due + self.write_timeout),
            None => Some(Instant::now() + self.write_timeout),
        };
        if let Err(e) = self.stream.flush_by(deadline) {
            if e.kind() == io::ErrorKind::WouldBlock {
                self.due.get_or_insert_with(Instant::now);
            }
            return Err(e);
        }
        // tungstenite flushes once its buffer is written out: nothing waits.
        if !self.dont_wait {
            self.due = None;
        }
        Ok(())
    }
}

impl WriteHalf {
    /// Writes to the stream: what the socket takes now (`dont_wait`), or
    /// waiting for room no longer than the write timeout allows the oldest
    /// data waiting.
    fn write_out(&mut self, buf: &[u8]) -> io::Result<usize> {
        let now = Instant::now();
        if self.dont_wait {
            let written = self.stream.write_now(buf);
            if matches!(&written, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                // Left for the next blocking write: due from now.
                self.due.get_or_insert(now);
            }
            return written;
        }
        let due = *self.due.get_or_insert(now);
        let left = (due + self.write_timeout).saturating_duration_since(now);
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "data waited past --write-timeout",
            ));
        }
        // A system call only when the time left has moved noticeably (a
        // write that follows a partial one): a client that keeps up costs
        // none.
        if self
            .applied
            .is_none_or(|applied| applied.abs_diff(left) > Duration::from_millis(20))
        {
            self.stream.set_write_timeout(Some(left))?;
            self.applied = Some(left);
        }
        self.stream.write_by(buf, due + self.write_timeout)
    }

    /// Writes the backlog out (all of it, or an error: `WouldBlock` when
    /// not waiting and the socket is full).
    fn drain_backlog(&mut self) -> io::Result<()> {
        while !self.backlog.is_empty() {
            let backlog = std::mem::take(&mut self.backlog);
            let written = self.write_out(&backlog);
            self.backlog = backlog;
            match written? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => drop(self.backlog.drain(..n)),
            }
        }
        self.backlog = Vec::new();
        Ok(())
    }

    /// Writes `wire`, whole frames, past tungstenite and without waiting:
    /// what the socket does not take now waits in the backlog. True if it
    /// took everything. Only with tungstenite's buffer and the backlog
    /// empty (see [`Writer::try_send_wire`]).
    fn write_wire_now(&mut self, wire: &[u8]) -> io::Result<bool> {
        let taken = match self.write_out(wire) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if taken == wire.len() {
            return Ok(true);
        }
        self.backlog.extend_from_slice(&wire[taken..]);
        self.due.get_or_insert_with(Instant::now);
        Ok(false)
    }
}

impl Read for WriteHalf {
    /// Never called: the writer does not read.
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

/// The one writer of a client socket.
#[derive(Debug)]
pub struct Writer {
    ws: Mutex<WebSocket<WriteHalf>>,
}

impl WriteHalf {
    /// A write half of a socket whose write timeout is `write_timeout`
    /// already (see [`split`]).
    fn new(stream: Stream, write_timeout: Duration) -> WriteHalf {
        WriteHalf {
            stream,
            dont_wait: false,
            write_timeout,
            due: None,
            applied: Some(write_timeout),
            backlog: Vec::new(),
        }
    }
}

/// What [`Writer::try_send_all`] did.
#[derive(Debug)]
pub enum TrySend {
    /// Everything was written.
    Sent,
    /// Someone else holds the writer: nothing was written.
    Busy,
    /// The writer holds data the socket has not taken yet, which nothing
    /// may overtake: nothing was written ([`Writer::try_send_wire`] only).
    Behind,
    /// The socket's buffer is full: the messages are in the writer, and the
    /// rest of them goes out with the next blocking write or flush.
    Blocked,
    /// Writing failed; the connection is unusable.
    Failed(Error),
}

/// Bytes the reader's buffer starts with. A chat line fits; tungstenite grows
/// the buffer for a bigger message (up to the message limit). The default,
/// 128 KiB, is zero-filled on first read: 128 KiB resident per idle client.
const READ_BUFFER: usize = 512;

/// Bytes of frames the writer collects before writing them out even
/// without a flush. A batch of chat frames (two dozen) fits, so it leaves in
/// one `write` system call. Kept small because tungstenite never shrinks
/// its write buffer: what a client's biggest batch needed stays resident.
/// (A room's dispatcher writes its batches past it, as bytes: see
/// [`Writer::try_send_wire`].)
const WRITE_BUFFER: usize = 4 * 1024;

/// The writer's `WebSocket`, with empty buffers. It never reads, so it
/// needs no real read buffer. Frames are buffered until a flush (see
/// [`Writer::send_all`]) or until [`WRITE_BUFFER`] bytes wait.
fn write_socket(half: WriteHalf) -> WebSocket<WriteHalf> {
    let config = WebSocketConfig::default()
        .read_buffer_size(64)
        .write_buffer_size(WRITE_BUFFER);
    WebSocket::from_raw_socket(half, Role::Server, Some(config))
}

/// What the two sides enforce.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// The largest message (and frame) the client may send.
    pub max_message: usize,
    /// How long one read waits for a client that is between messages.
    pub idle_wait: Duration,
    /// How long data to the client may wait to be written.
    pub write_timeout: Duration,
    /// Deadlines and fragment counts for messages begun.
    pub liveness: liveness::Limits,
}

/// Splits an upgraded socket into its one writer and its reader, and gives
/// the socket the timeouts the two halves start from (so that neither has
/// to set them on a thread that then rests: a system call made deep in a
/// read would leave a resting thread one stack page bigger).
///
/// `leftover` holds bytes read past the HTTP request head.
pub fn split(
    stream: Stream,
    leftover: Vec<u8>,
    limits: ReadLimits,
) -> io::Result<(Writer, ReadSide)> {
    stream.set_read_timeout(Some(limits.idle_wait))?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    let read_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_message));
    // The leftover goes to tungstenite directly: the watch must see it too.
    // If it already breaks a limit, the watch remembers, and the first
    // read fails.
    let mut watch = FrameWatch::new(limits.liveness);
    let _ = watch.feed(&leftover, Instant::now());
    let half = ReadHalf {
        stream: stream.clone(),
        watch,
        idle_wait: limits.idle_wait,
        wake_by: None,
        applied: Some(limits.idle_wait),
    };
    let reader = WebSocket::from_partially_read(half, leftover, Role::Server, Some(read_config));
    let writer = write_socket(WriteHalf::new(stream, limits.write_timeout));
    Ok((
        Writer {
            ws: Mutex::new(writer),
        },
        reader,
    ))
}

impl Writer {
    /// Sends one message and flushes it.
    ///
    /// An error means the connection is unusable: the client went away, or it
    /// did not read for longer than the write timeout.
    pub fn send(&self, message: Message) -> Result<(), Error> {
        let mut ws = self.ws.lock().map_err(|_| Error::AlreadyClosed)?;
        ws.send(message)
    }

    /// Sends several messages with one flush: under one lock, and (when
    /// they fit in the write buffer) in one system call.
    pub fn send_all(&self, messages: impl IntoIterator<Item = Message>) -> Result<(), Error> {
        let mut ws = self.ws.lock().map_err(|_| Error::AlreadyClosed)?;
        for message in messages {
            ws.write(message)?;
        }
        ws.flush()
    }

    /// Sends `messages` without waiting: not at all if the writer is busy,
    /// and only as much as the socket takes at once (see [`TrySend`]).
    /// Unless the writer was busy, `messages` is emptied.
    pub fn try_send_all(&self, messages: &mut Vec<Message>) -> TrySend {
        let Ok(mut ws) = self.ws.try_lock() else {
            return TrySend::Busy;
        };
        ws.get_mut().dont_wait = true;
        let mut blocked = false;
        let mut result = Ok(());
        for message in messages.drain(..) {
            // On `WouldBlock` the frame is in tungstenite's buffer already.
            match ws.write(message) {
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => blocked = true,
                Err(e) => {
                    result = Err(e);
                    break;
                }
                Ok(()) => {}
            }
        }
        if result.is_ok() && !blocked {
            result = ws.flush();
        }
        ws.get_mut().dont_wait = false;
        match result {
            Ok(()) if blocked => TrySend::Blocked,
            Ok(()) => TrySend::Sent,
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => TrySend::Blocked,
            Err(e) => TrySend::Failed(e),
        }
    }

    /// Writes `wire`, whole WebSocket frames encoded already (see
    /// `Incoming::wire_frame`), without waiting: not at all if the writer
    /// is busy or holds data not yet written ([`TrySend::Behind`]), and
    /// only as much as the socket takes at once; the rest waits in the
    /// writer, for the next blocking write or flush.
    ///
    /// The bytes go past tungstenite, which frames, buffers and copies each
    /// message it writes: a room's dispatcher encodes each frame once and
    /// writes a client's whole batch with one `send` (see
    /// `session::direct`). Frames still go out whole and in order: only
    /// with tungstenite's buffer empty, and whatever the socket does not
    /// take goes out before anything tungstenite writes later.
    pub fn try_send_wire(&self, wire: &[u8]) -> TrySend {
        let Ok(mut ws) = self.ws.try_lock() else {
            return TrySend::Busy;
        };
        if !ws.can_write() {
            return TrySend::Failed(Error::AlreadyClosed);
        }
        ws.get_mut().dont_wait = true;
        let written = match ws.flush() {
            Ok(()) => ws.get_mut().write_wire_now(wire).map_err(Error::Io),
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                ws.get_mut().dont_wait = false;
                return TrySend::Behind;
            }
            Err(e) => Err(e),
        };
        ws.get_mut().dont_wait = false;
        match written {
            Ok(true) => TrySend::Sent,
            Ok(false) => TrySend::Blocked,
            Err(e) => TrySend::Failed(e),
        }
    }

    /// Frees the write buffer, which tungstenite keeps at the size of the
    /// biggest batch ever written. For after the welcome (a history and a
    /// member list, kept by every idle client otherwise), while nothing
    /// else writes: the writer starts afresh, so anything buffered and not
    /// yet flushed would be lost, and a close already sent forgotten.
    pub fn release_buffer(&self) {
        let Ok(mut ws) = self.ws.lock() else {
            return;
        };
        let half = ws.get_ref();
        let half = WriteHalf::new(half.stream.clone(), half.write_timeout);
        *ws = write_socket(half);
    }

    /// Sends a close frame (once; later calls do nothing).
    pub fn close(&self, frame: Option<CloseFrame>) -> Result<(), Error> {
        let mut ws = self.ws.lock().map_err(|_| Error::AlreadyClosed)?;
        let closed = match ws.close(frame) {
            Err(Error::AlreadyClosed | Error::ConnectionClosed) => Ok(()),
            other => other,
        };
        // Nothing follows a close frame (over TLS, the session ends too).
        ws.get_ref().stream.end_of_data();
        closed
    }
}
