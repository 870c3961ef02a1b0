//! Every subscription's socket, so that one thread can wake any of them:
//! a listener's canceller, the heartbeat when Redis stops answering, the
//! failover watcher when the master moves.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

/// Every subscription socket of a broker (weakly: a listener's `Current`),
/// so that one failed liveness check restarts them all.
///
/// Why one check per process and not one per subscription: a subscription
/// connection is silent while its room is, and a paused Redis (or a
/// half-open connection to it) looks just like a quiet room. Checking each
/// subscription with its own PING would cost a wake-up per client every few
/// seconds (docs/PERFORMANCE.md). All of a process's subscriptions go to
/// the same Redis, so the heartbeat thread
/// checks it once every `heartbeat::HEARTBEAT` for all of them; when Redis
/// does not answer, it shuts every subscription socket down, and each
/// listener reconnects as after any loss. A single connection that dies silently
/// while Redis is fine is the kernel's business: subscription sockets have
/// TCP keepalive (see `pubsub::PubSubConnection::connect`).
#[derive(Default)]
pub(super) struct SubscriptionSockets(Mutex<Tracked>);

#[derive(Default)]
struct Tracked {
    currents: Vec<std::sync::Weak<CurrentSocket>>,
    /// Forget ended listeners when the list reaches this length (amortised).
    prune_at: usize,
}

impl SubscriptionSockets {
    pub(super) fn track(&self, current: &Current) {
        let mut tracked = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if tracked.currents.len() >= tracked.prune_at {
            tracked.currents.retain(|c| c.strong_count() > 0);
            tracked.prune_at = (tracked.currents.len() * 2).max(64);
        }
        tracked.currents.push(Arc::downgrade(current));
    }

    /// Shuts down every live subscription's socket; returns how many.
    pub(super) fn restart_all(&self) -> usize {
        self.restart_where(|_| true)
    }

    /// Shuts down the live subscriptions connected anywhere but `address`
    /// (`ip:port`: a new master); returns how many. For the failover
    /// watcher (`ha/failover.rs`).
    #[cfg(feature = "redis-ha")]
    pub(super) fn restart_away_from(&self, address: &str) -> usize {
        self.restart_where(|peer| peer.to_string() != address)
    }

    /// Shuts down the live subscriptions connected to `address` (`ip:port`:
    /// a master that does not answer); returns how many.
    pub(super) fn restart_at(&self, address: &str) -> usize {
        self.restart_where(|peer| peer.to_string() == address)
    }

    fn restart_where(&self, restart: impl Fn(SocketAddr) -> bool) -> usize {
        let tracked = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut restarted = 0;
        for current in tracked.currents.iter().filter_map(|c| c.upgrade()) {
            if current.shut_down_if(&restart) {
                restarted += 1;
            }
        }
        restarted
    }
}

/// The socket of a listener's current connection, if it has one: shared
/// with the listener's canceller and with [`SubscriptionSockets`], which shut it
/// down to wake the listener.
pub(super) type Current = Arc<CurrentSocket>;

#[derive(Default)]
pub(super) struct CurrentSocket(Mutex<Option<Arc<TcpStream>>>);

impl CurrentSocket {
    pub(super) fn set(&self, socket: Option<Arc<TcpStream>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = socket;
    }

    /// Shuts the socket down, so that a read blocked on it returns at once;
    /// false when there is no connection right now.
    pub(super) fn shut_down(&self) -> bool {
        self.shut_down_if(|_| true)
    }

    /// [`shut_down`](Self::shut_down), if `restart` says so of the address
    /// the socket is connected to (a socket with none is shut down).
    fn shut_down_if(&self, restart: impl Fn(SocketAddr) -> bool) -> bool {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(stream) if stream.peer_addr().map_or(true, &restart) => {
                let _ = stream.shutdown(Shutdown::Both);
                true
            }
            _ => false,
        }
    }
}
