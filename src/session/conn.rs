//! One connection's state, shared by its threads and the server: its socket,
//! its id, why it ends ([`Ending`], first to say wins), and how to wake
//! whichever of its threads is blocked.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::admission::Pass;
use super::socket::Writer;
use crate::broker::{BrokerError, Canceller};
use crate::http;
use crate::net::Stream;
use crate::protocol::ConnId;

/// One connection's shared state: known to the server (to stop it) and to
/// both of the connection's threads.
pub struct Conn {
    /// Sequence number within this process; names the threads.
    pub seq: u64,
    /// Its id on the wire, for echo suppression.
    pub id: ConnId,
    /// The client's address, for the log.
    pub peer: SocketAddr,
    /// The socket; `shutdown()` on it wakes any thread blocked on it.
    pub(super) stream: Arc<TcpStream>,
    /// What the HTTP exchange speaks on, once the start opened it: the
    /// socket, or its TLS session after the handshake.
    opened: OnceLock<Stream>,
    /// Why the connection ends; the first to set it wins.
    ending: OnceLock<Ending>,
    /// Stops the subscriber thread; set once it exists.
    canceller: OnceLock<Canceller>,
    /// What admission gave it: its places and claims (see
    /// [`admission`](super::admission)). Given back when the `Conn` is
    /// dropped, with the socket: when the connection's last thread ends.
    pub(super) pass: Pass,
    /// The WebSocket's one writer, set once the `101` is sent: a panic
    /// after that is told to the client as a close frame (1011), before
    /// it as an HTTP 500.
    upgraded: OnceLock<Arc<Writer>>,
}

/// Why a connection ended, as logged in its "left" line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The client sent a close frame.
    ClientClosed(Option<CloseCode>),
    /// The TCP connection failed or was closed without a close frame.
    ConnectionLost(String),
    /// The server closed the connection because of what the client did (or
    /// did not do): a protocol violation, a limit, flooding, silence.
    Refused {
        /// The close code sent.
        code: CloseCode,
        /// The reason sent.
        reason: String,
    },
    /// The client did not read fast enough: a write blocked past the write
    /// timeout, or it fell too far behind the room.
    TooSlow(String),
    /// A write to the client failed (it went away).
    WriteFailed(String),
    /// The relay failed for this connection and could not be restored.
    RelayFailed(BrokerError),
    /// A thread serving the connection panicked.
    Panicked,
    /// The client was silent (not even a pong) for the idle timeout.
    TimedOut,
    /// The server is shutting down.
    ServerShutdown,
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::ClientClosed(Some(code)) => {
                write!(f, "closed by the client ({})", u16::from(*code))
            }
            Ending::ClientClosed(None) => write!(f, "closed by the client"),
            Ending::ConnectionLost(why) => write!(f, "connection lost ({why})"),
            Ending::Refused { code, reason } => {
                write!(
                    f,
                    "closed by the server with {}: {reason}",
                    u16::from(*code)
                )
            }
            Ending::TooSlow(why) => write!(f, "too slow, closed with 1008 ({why})"),
            Ending::WriteFailed(why) => write!(f, "could not be written to ({why})"),
            Ending::RelayFailed(e) => write!(f, "chat relay failed ({e})"),
            Ending::Panicked => write!(f, "server error (a thread panicked)"),
            Ending::TimedOut => write!(f, "timed out (no response to pings)"),
            Ending::ServerShutdown => write!(f, "server shutting down"),
        }
    }
}

impl Ending {
    /// The close frame the server sends for an ending that the subscriber
    /// thread (or the server) decides, if it sends one.
    pub(super) fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::ServerShutdown => (CloseCode::Away, "server shutting down"),
            Ending::RelayFailed(_) => (CloseCode::Error, "chat relay unavailable"),
            Ending::TooSlow(_) => (CloseCode::Policy, "too slow: not reading messages"),
            Ending::Panicked => (CloseCode::Error, "server error"),
            _ => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }

    /// What the rest of the room is told: "left", and why when it was not
    /// the client's own choice.
    pub(super) fn leave_text(&self) -> String {
        match self {
            Ending::ClientClosed(_) => "left".into(),
            Ending::ConnectionLost(_) | Ending::WriteFailed(_) => "left (connection lost)".into(),
            Ending::TimedOut => "left (timed out)".into(),
            Ending::TooSlow(_) => "left (disconnected: too slow)".into(),
            Ending::Refused { reason, .. } => format!("left (disconnected: {reason})"),
            Ending::RelayFailed(_) => "left (chat relay failed)".into(),
            Ending::Panicked => "left (server error)".into(),
            Ending::ServerShutdown => "left (server shutting down)".into(),
        }
    }

    /// The ending for a failed write to the client.
    pub(super) fn from_write_error(e: &tungstenite::Error) -> Ending {
        match e {
            tungstenite::Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ending::TooSlow("a write blocked past --write-timeout".into())
            }
            // The client went away: the same as the reader seeing it go.
            tungstenite::Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ending::ConnectionLost(io.to_string())
            }
            other => Ending::WriteFailed(other.to_string()),
        }
    }
}

impl Conn {
    /// State for connection number `seq` of instance `instance`, holding
    /// the `pass` admission gave it when it was accepted.
    pub fn new(instance: u64, seq: u64, peer: SocketAddr, stream: TcpStream, pass: Pass) -> Conn {
        Conn {
            seq,
            id: ConnId::new(instance, seq),
            peer,
            stream: Arc::new(stream),
            opened: OnceLock::new(),
            ending: OnceLock::new(),
            canceller: OnceLock::new(),
            pass,
            upgraded: OnceLock::new(),
        }
    }

    /// The start opened the connection (see [`opened`](Self::opened)).
    pub(super) fn opened(&self, stream: &Stream) {
        let _ = self.opened.set(stream.clone());
    }

    /// The `101` is sent: from now on the client hears through `writer`.
    pub(super) fn upgraded(&self, writer: &Arc<Writer>) {
        let _ = self.upgraded.set(Arc::clone(writer));
    }

    /// A thread serving the connection panicked (`thread` says which, for
    /// the log): counted in `threadchat_panics_total`, and the client told
    /// as documented — a close frame with 1011 once upgraded, else an
    /// HTTP 500 — best effort, with a short write timeout.
    pub(super) fn panicked(&self, metrics: &crate::metrics::Metrics, thread: &str) {
        metrics.panics.inc();
        log::error!(
            "{} ({}): {thread} thread panicked; closing it",
            self.peer,
            self.id
        );
        self.end(Ending::Panicked);
        self.shorten_write_timeout();
        match self.upgraded.get() {
            Some(writer) => {
                let _ = writer.close(Ending::Panicked.close_frame());
            }
            // Not before the start opened it: a TLS client cannot read a
            // plain answer.
            None => {
                if let Some(stream) = self.opened.get() {
                    let _ = http::refuse(
                        stream,
                        tungstenite::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "server error",
                    );
                }
            }
        }
    }

    /// Records why the connection ends, unless a reason is already recorded.
    ///
    /// A client too slow is to be reset when its socket closes, whoever
    /// closes it (see [`abort`](Self::abort)).
    pub fn end(&self, ending: Ending) {
        let too_slow = matches!(ending, Ending::TooSlow(_));
        if self.ending.set(ending).is_ok() && too_slow {
            let _ = socket2::SockRef::from(&*self.stream).set_linger(Some(Duration::ZERO));
        }
    }

    /// Why the connection ended (or is ending), if decided.
    pub fn ending(&self) -> Option<&Ending> {
        self.ending.get()
    }

    /// Asks the connection to end because the server is shutting down. The
    /// subscriber thread sends the close frame (1001) and the reader thread
    /// finishes the close handshake. Returns at once.
    pub fn stop_for_shutdown(&self) {
        self.end(Ending::ServerShutdown);
        match self.canceller.get() {
            Some(canceller) => canceller.cancel(),
            // Still in the HTTP exchange, or an echo connection: nothing to
            // cancel, so cut the socket.
            None => self.force_close(),
        }
    }

    /// Shuts the socket down: any blocked read or write on it returns at once.
    pub fn force_close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(canceller) = self.canceller.get() {
            canceller.cancel();
        }
    }

    pub(super) fn set_canceller(&self, canceller: Canceller) {
        let _ = self.canceller.set(canceller.clone());
        // A shutdown may have been requested while the canceller was unset.
        if self.ending() == Some(&Ending::ServerShutdown) {
            canceller.cancel();
        }
    }

    pub(super) fn cancel_subscription(&self) {
        if let Some(canceller) = self.canceller.get() {
            canceller.cancel();
        }
    }

    /// Makes blocked writes give up quickly (before a last, best-effort close
    /// frame to a client that is not reading).
    pub(super) fn shorten_write_timeout(&self) {
        let _ = self
            .stream
            .set_write_timeout(Some(Duration::from_millis(50)));
    }

    /// Ends a connection found too slow: wakes the reader, sending no
    /// `FIN`; the socket, closed when the last thread lets go of it, is
    /// then reset (`SO_LINGER` of zero, set by [`end`](Self::end)). A
    /// graceful close would leave what is queued for the client to the
    /// kernel, which keeps trying to send it for minutes, and the client
    /// would see the end only after reading it all. A reset frees the queue
    /// at once and reaches the client at once.
    pub(super) fn abort(&self) {
        let _ = self.stream.shutdown(Shutdown::Read);
    }
}

/// Errors that end a session and are worth a log line of their own.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Socket I/O failed during the HTTP exchange.
    #[error("HTTP exchange failed: {0}")]
    Io(#[from] io::Error),
    /// The relay could not subscribe this connection.
    #[error("could not join the chat relay: {0}")]
    Relay(#[from] BrokerError),
    /// The OS would not start one of the connection's threads.
    #[error("could not start a thread for it: {0}")]
    Spawn(io::Error),
    /// The connection was stopped (the server is shutting down) before it
    /// was started.
    #[error("stopped before it started")]
    Stopped,
    /// A thread serving the connection panicked (and the connection was
    /// closed).
    #[error("a thread serving it panicked; closed it")]
    Panicked,
}

impl SessionError {
    /// True for errors that only mean the client went away, or that the
    /// server is stopping: not worth more than a debug line.
    pub fn is_quiet(&self) -> bool {
        match self {
            SessionError::Io(e) => http::is_disconnect(e),
            SessionError::Stopped => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_read_well() {
        assert_eq!(
            Ending::ClientClosed(Some(CloseCode::Normal)).to_string(),
            "closed by the client (1000)"
        );
        assert_eq!(
            Ending::ServerShutdown
                .close_frame()
                .map(|f| u16::from(f.code)),
            Some(1001)
        );
        assert_eq!(
            Ending::TooSlow("x".into())
                .close_frame()
                .map(|f| u16::from(f.code)),
            Some(1008)
        );
    }
}
