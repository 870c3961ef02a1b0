//! A Redis `SUBSCRIBE` connection, read by hand.
//!
//! The `redis` crate's `PubSub` hides its socket, which costs threadchat two
//! things:
//!
//! * **It cannot be woken.** A thread blocked in `PubSub::get_message`
//!   cannot be interrupted from outside (the crate's own docs: "this
//!   currently does not provide a way not to block"). Owning the
//!   `TcpStream`, anyone holding a clone can `shutdown()` it, and the blocked
//!   read returns at once — the same trick the server uses on client sockets.
//! * **It cannot say whether more has arrived.** Messages that Redis sent
//!   together sit in one buffer; a subscriber that knows that can write them
//!   to its client with one flush instead of one each.
//!   [`PubSubConnection::has_buffered`] tells it.
//!
//! What a subscription needs of the protocol is small: send commands (encoded
//! by the `redis` crate), and read RESP2 replies, which here are arrays of
//! bulk strings and integers (`["message", channel, payload]`,
//! `["subscribe", channel, count]`, `["pong", ""]` for a `PING` sent on it).
//! On a Redis Cluster a subscription is *sharded* (`SSUBSCRIBE`): the same
//! with `smessage` and `ssubscribe`, and one more push, `sunsubscribe`,
//! which the server sends when the channel's slot moves away.
//!
//! Over TLS (`rediss://`) the bytes travel through a TLS session on the
//! same socket ([`Wire`]; `pubsub/tls.rs`): everything above is unchanged.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo};

use super::link::Link;
// The same `Read + Write` view of a shared socket that client connections use.
use crate::net::SharedStream;

mod in_place;
#[cfg(feature = "tls")]
mod tls;

use in_place::buffered_message;

/// Most elements in one reply array.
const MAX_ARRAY: usize = 64;
/// The read buffer: dozens of chat messages fit in one fill.
const BUFFER: usize = 8 * 1024;
/// TCP keepalive on a subscription socket: first probe after this much
/// silence, then one per interval; the connection is dead after this many
/// unanswered probes (about a minute in all).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// One RESP2 reply, as far as subscriptions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `$n` bulk string.
    Bulk(Vec<u8>),
    /// `+…` simple string.
    Simple(String),
    /// `:n` integer.
    Int(i64),
    /// `*n` array.
    Array(Vec<Reply>),
    /// `$-1` or `*-1`.
    Nil,
    /// A bulk string longer than the connection's limit, read past and
    /// thrown away: only its length is kept.
    Oversized(usize),
}

/// What [`PubSubConnection::wait`] learnt of how far behind Redis its
/// reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// Nothing was left to read: whatever Redis had for this subscription
    /// had been handled.
    CaughtUp,
    /// More may be queued, in the socket or in Redis.
    MaybeBehind,
    /// Nothing was read: what comes next was already buffered here.
    Buffered,
}

/// What arrives on a subscribed connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// A message published on `channel`.
    Message {
        /// The channel.
        channel: Vec<u8>,
        /// What was published.
        payload: Vec<u8>,
    },
    /// A message published on `channel` whose payload, `len` bytes, was
    /// over the limit: skipped without being kept in memory.
    Oversized {
        /// The channel.
        channel: Vec<u8>,
        /// The payload's length.
        len: usize,
    },
    /// The server ended the subscription to `channel`: a cluster moved
    /// its slot to another node (`sunsubscribe`, unasked).
    Unsubscribed {
        /// The channel.
        channel: Vec<u8>,
    },
    /// Anything else: subscription confirmations, the answer to a `PING`.
    /// The reply to a [`ping`](PubSubConnection::ping): it came in line
    /// behind everything Redis had queued for this connection before it.
    Pong,
    /// Anything else.
    Other,
}

/// A connection in subscribed mode. One socket (one file descriptor),
/// shared by the buffered reader, the writes and whoever may shut it down.
pub(crate) struct PubSubConnection {
    reader: BufReader<Wire>,
    stream: Arc<TcpStream>,
    /// Longest payload kept; longer ones are read past (see
    /// [`Push::Oversized`]).
    max_payload: usize,
    /// Whether the last read [`wait`](Self::wait) made drained the socket
    /// (took less than the buffer holds).
    drained: bool,
}

impl PubSubConnection {
    /// Connects (through `link`'s TLS, for a `rediss://` address),
    /// authenticates (if the URL has a password) and returns the
    /// connection and a handle whose `shutdown()` wakes any read on it.
    pub(crate) fn connect(
        info: &ConnectionInfo,
        link: &Link,
        timeout: Duration,
        max_payload: usize,
    ) -> io::Result<(PubSubConnection, Arc<TcpStream>)> {
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host, port),
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls { host, port, .. } => (host, port),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "only TCP addresses are supported (redis://, rediss://)",
                ));
            }
        };
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for addr in (host.as_str(), *port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let stream = Arc::new(stream.ok_or(last_error)?);
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        // A subscription is silent while its room is, and is not pinged (the
        // broker checks Redis once for all, see `redis::Subscriptions`): the
        // kernel's TCP keepalive finds a connection that died without a
        // word (a vanished host, a NAT that forgot it), at no cost to us.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        socket2::SockRef::from(&*stream).set_tcp_keepalive(&keepalive)?;
        let wire = Wire::over(&stream, info, link, timeout)?;
        let mut connection = PubSubConnection {
            reader: BufReader::with_capacity(BUFFER, wire),
            stream: Arc::clone(&stream),
            max_payload,
            drained: false,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            auth.arg(password);
            stream.set_read_timeout(Some(timeout))?;
            connection.send(&auth)?;
            connection.read_reply()?;
        }
        Ok((connection, stream))
    }

    /// Subscribes to `channels` (shard channels, `sharded`) and waits for
    /// each confirmation.
    pub(crate) fn subscribe(&mut self, channels: &[&str], sharded: bool) -> io::Result<()> {
        let (command, confirmed): (_, &[u8]) = if sharded {
            ("SSUBSCRIBE", b"ssubscribe")
        } else {
            ("SUBSCRIBE", b"subscribe")
        };
        let mut subscribe = redis::cmd(command);
        for channel in channels {
            subscribe.arg(*channel);
        }
        self.send(&subscribe)?;
        for _ in channels {
            match self.read_reply()? {
                Reply::Array(items) if matches!(items.first(), Some(Reply::Bulk(kind)) if kind == confirmed) =>
                    {}
                other => return Err(protocol_error(&format!("unexpected reply {other:?}"))),
            }
        }
        Ok(())
    }

    /// Sends a `PING` on the subscribed connection. Redis answers it in
    /// line, after everything it has queued for this connection: how long
    /// its [`Push::Pong`] takes is how long a message waits behind Redis
    /// right now.
    pub(crate) fn ping(&mut self) -> io::Result<()> {
        self.send(&redis::cmd("PING"))
    }

    /// How long a read waits for Redis (`None`: forever).
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// Waits until something arrives, and says whether Redis had sent
    /// nothing more than what was already here ([`Waited::CaughtUp`]). A
    /// timeout here (see [`set_read_timeout`](Self::set_read_timeout))
    /// means a quiet connection, and nothing has been consumed.
    ///
    /// Caught up means that everything read so far is handled and nothing
    /// older is queued: the last read here took less than the buffer holds
    /// (it drained the socket, so what came since is newer), or, after a
    /// read that filled the buffer, one peek at the kernel's queue finds it
    /// empty. Bytes still buffered say nothing: more may wait in Redis too.
    pub(crate) fn wait(&mut self) -> io::Result<Waited> {
        let empty = !self.has_buffered();
        let waited = if !empty {
            Waited::Buffered
        } else if self.drained || !crate::net::has_input(&self.stream) {
            Waited::CaughtUp
        } else {
            Waited::MaybeBehind
        };
        let got = self.reader.fill_buf()?.len();
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if empty {
            self.drained =
                got < self.reader.capacity() && self.reader.get_ref().short_read_drains();
        }
        Ok(waited)
    }

    /// The next push. Call [`wait`](Self::wait) first to tell a quiet
    /// connection from a broken one: a timeout in the middle of a reply is a
    /// failure.
    pub(crate) fn next(&mut self) -> io::Result<Push> {
        let Reply::Array(items) = self.read_reply()? else {
            return Ok(Push::Other);
        };
        let mut items = items.into_iter();
        let is_message = |kind: &[u8]| kind == b"message" || kind == b"smessage";
        match (items.next(), items.next(), items.next()) {
            (Some(Reply::Bulk(kind)), Some(Reply::Bulk(channel)), Some(Reply::Bulk(payload)))
                if is_message(&kind) =>
            {
                Ok(Push::Message { channel, payload })
            }
            (Some(Reply::Bulk(kind)), Some(Reply::Bulk(channel)), Some(Reply::Oversized(len)))
                if is_message(&kind) =>
            {
                Ok(Push::Oversized { channel, len })
            }
            (Some(Reply::Bulk(kind)), Some(Reply::Bulk(channel)), _) if kind == b"sunsubscribe" => {
                Ok(Push::Unsubscribed { channel })
            }
            (Some(Reply::Bulk(kind)), _, None) if kind == b"pong" => Ok(Push::Pong),
            _ => Ok(Push::Other),
        }
    }

    /// The next push, if it is a message wholly in the read buffer: its
    /// channel and payload handed to `read` where they lie, with no copy and
    /// no allocation, then consumed. With per-client subscriptions every
    /// client's listener reads every payload, and [`next`](Self::next)'s
    /// general reader made eight allocations of each (its lines, its bulk
    /// strings, its array). `None`, with nothing consumed, for anything
    /// else (a partial message, an oversized one, a reply): `next` reads it.
    pub(crate) fn next_message_in_buffer<T>(
        &mut self,
        read: impl FnOnce(&[u8], &[u8]) -> T,
    ) -> Option<T> {
        let buffer = self.reader.buffer();
        let (channel, payload, len) = buffered_message(buffer, self.max_payload)?;
        let result = read(&buffer[channel], &buffer[payload]);
        self.reader.consume(len);
        Some(result)
    }

    /// True if the next push (or part of it) is already read from the socket.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.reader.buffer().is_empty() || self.reader.get_ref().holds_more()
    }

    /// Writes `cmd` (beside the reader's buffer, which it leaves alone).
    fn send(&mut self, cmd: &redis::Cmd) -> io::Result<()> {
        let wire = self.reader.get_mut();
        wire.write_all(&cmd.get_packed_command())?;
        wire.flush()
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.reader, 0, self.max_payload)
    }
}

/// What a subscription's bytes travel on: the socket itself, or a TLS
/// session over it.
enum Wire {
    /// `redis://`: the socket.
    Plain(SharedStream),
    /// `rediss://`: a TLS session (boxed: it is large, and the plain
    /// connection should not pay for it).
    #[cfg(feature = "tls")]
    Tls(Box<tls::TlsWire>),
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(stream) => stream.read(buf),
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(stream) => stream.write(buf),
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain(stream) => stream.flush(),
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.flush(),
        }
    }
}

impl Wire {
    /// The socket itself for a `redis://` address; for `rediss://`, a TLS
    /// session made over it within `timeout`, as `link` says.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn over(
        stream: &Arc<TcpStream>,
        info: &ConnectionInfo,
        link: &Link,
        timeout: Duration,
    ) -> io::Result<Wire> {
        match info.addr() {
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls { host, port, .. } => {
                let config = link.tls_config().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "rediss:// without TLS settings",
                    )
                })?;
                let tls = tls::TlsWire::handshake(stream, host, *port, config, timeout)?;
                Ok(Wire::Tls(Box::new(tls)))
            }
            _ => Ok(Wire::Plain(SharedStream(Arc::clone(stream)))),
        }
    }

    /// Whether bytes the socket delivered wait here, read but not yet
    /// handed out (TLS decrypts a whole record at once).
    fn holds_more(&self) -> bool {
        match self {
            Wire::Plain(_) => false,
            #[cfg(feature = "tls")]
            Wire::Tls(tls) => tls.holds_plaintext(),
        }
    }

    /// Whether a read that did not fill the buffer proves that the socket
    /// was drained. True of the socket; not of TLS, which reads the socket
    /// in pieces of its own choosing.
    fn short_read_drains(&self) -> bool {
        match self {
            Wire::Plain(_) => true,
            #[cfg(feature = "tls")]
            Wire::Tls(_) => false,
        }
    }
}

/// Reads one RESP2 reply. `-ERR …` replies are errors. A bulk string over
/// `max_bulk` bytes is read past, in small pieces, and returned as
/// [`Reply::Oversized`]: someone publishing 32 MiB on a room costs this
/// process a few KiB, not 32 MiB per subscription.
fn read_reply(reader: &mut impl BufRead, depth: usize, max_bulk: usize) -> io::Result<Reply> {
    let line = read_line(reader)?;
    let (kind, rest) = line
        .split_first()
        .ok_or_else(|| protocol_error("empty reply line"))?;
    let text = std::str::from_utf8(rest).map_err(|_| protocol_error("reply is not UTF-8"))?;
    let number = || {
        text.parse::<i64>()
            .map_err(|_| protocol_error(&format!("bad number {text:?}")))
    };
    match kind {
        b'+' => Ok(Reply::Simple(text.to_owned())),
        b'-' => Err(io::Error::other(format!("Redis answered: {text}"))),
        b':' => Ok(Reply::Int(number()?)),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Reply::Nil);
            };
            if len > max_bulk {
                let skipped = io::copy(&mut reader.by_ref().take(len as u64 + 2), &mut io::sink())?;
                if skipped < len as u64 + 2 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                return Ok(Reply::Oversized(len));
            }
            let mut data = vec![0; len + 2];
            reader.read_exact(&mut data)?;
            if !data.ends_with(b"\r\n") {
                return Err(protocol_error("bulk string without CRLF"));
            }
            data.truncate(len);
            Ok(Reply::Bulk(data))
        }
        b'*' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Reply::Nil);
            };
            if len > MAX_ARRAY || depth > 2 {
                return Err(protocol_error("reply array too big or too deep"));
            }
            (0..len)
                .map(|_| read_reply(reader, depth + 1, max_bulk))
                .collect::<io::Result<_>>()
                .map(Reply::Array)
        }
        other => Err(protocol_error(&format!(
            "unknown reply type {:?}",
            *other as char
        ))),
    }
}

/// One `\r\n`-terminated line, without the terminator.
fn read_line(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(16);
    reader.by_ref().take(1024).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(protocol_error("reply line without CRLF (or too long)"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Redis protocol: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever Redis (or something pretending to be Redis) sends, the
        /// reader returns a reply or an error; it never panics.
        #[test]
        fn any_bytes_are_a_reply_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }

        /// A published message comes back exactly, whatever its bytes.
        #[test]
        fn messages_round_trip(channel in "[a-z:_]{1,20}", payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut wire = format!("*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n", channel.len(), payload.len()).into_bytes();
            wire.extend_from_slice(&payload);
            wire.extend_from_slice(b"\r\n");
            prop_assert_eq!(
                parse(&wire).unwrap(),
                Reply::Array(vec![
                    Reply::Bulk(b"message".to_vec()),
                    Reply::Bulk(channel.into_bytes()),
                    Reply::Bulk(payload),
                ])
            );
        }
    }

    pub(super) fn parse(bytes: &[u8]) -> io::Result<Reply> {
        read_reply(&mut &bytes[..], 0, 1024)
    }

    #[test]
    fn oversized_payloads_are_read_past() {
        let mut wire = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2000\r\n".to_vec();
        wire.extend_from_slice(&[b'x'; 2000]);
        wire.extend_from_slice(b"\r\n:1\r\n");
        let mut reader = &wire[..];
        assert_eq!(
            read_reply(&mut reader, 0, 1024).unwrap(),
            Reply::Array(vec![
                Reply::Bulk(b"message".to_vec()),
                Reply::Bulk(b"ch".to_vec()),
                Reply::Oversized(2000),
            ])
        );
        // What follows is read as usual.
        assert_eq!(read_reply(&mut reader, 0, 1024).unwrap(), Reply::Int(1));
    }

    #[test]
    fn reads_pushes_and_replies() {
        assert_eq!(
            parse(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nl\r\n").unwrap(),
            Reply::Array(vec![
                Reply::Bulk(b"message".to_vec()),
                Reply::Bulk(b"ch".to_vec()),
                Reply::Bulk(b"he\r\nl".to_vec()),
            ])
        );
        assert_eq!(parse(b"+OK\r\n").unwrap(), Reply::Simple("OK".into()));
        assert_eq!(parse(b":3\r\n").unwrap(), Reply::Int(3));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Nil);
        assert!(parse(b"-WRONGPASS nope\r\n").is_err());
        assert!(parse(b"$5\r\nab").is_err());
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"*100000\r\n").is_err());
    }
}
