//! A blocking Redis subscription, and how it survives: reconnecting with
//! back-off after a loss, and being restarted by the heartbeat.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::{Redirect, Route};
use super::pubsub::{PubSubConnection, Push, Waited};
use super::topology::Topology;
use super::{CONNECT_TIMEOUT, IO_TIMEOUT, MAX_BACKOFF, MAX_REDIRECTS, redact};
use crate::broker::{Backoff, BrokerError, Canceller, Event, Flow, Listen, StopSignal};
use crate::config::Subscriptions;
use crate::metrics::Metrics;
use crate::protocol::{Incoming, Room};

/// Every subscription socket of a broker (weakly: a listener's `Current`),
/// so that one failed liveness check restarts them all.
///
/// Why one check per process and not one per subscription: a subscription
/// connection is silent while its room is, and a paused Redis (or a
/// half-open connection to it) looks just like a quiet room. Checking each
/// subscription with its own PING cost a wake-up per client every few
/// seconds — 1.9% of a core for 5,000 idle per-client subscriptions. All of
/// a process's subscriptions go to the same Redis, so the heartbeat thread
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
    /// (`ip:port`: a new master); returns how many. For the Sentinel
    /// watcher (`ha/failover.rs`).
    #[cfg(feature = "redis-ha")]
    pub(super) fn restart_away_from(&self, address: &str) -> usize {
        self.restart_where(|peer| peer.to_string() != address)
    }

    /// Shuts down the live subscriptions connected to `address` (`ip:port`:
    /// a cluster's master that does not answer); returns how many.
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

/// A blocking Redis subscription: a client's own (per-client mode), or a
/// room's shared one (shared mode, run by the room's listener thread).
pub(super) struct RedisListener {
    /// Where Redis is, asked at every (re)connection.
    topology: Arc<Topology>,
    url: String,
    channel: String,
    /// Where the channel is (on a cluster, the room's slot).
    route: Route,
    /// On a cluster: sharded pub/sub (`SSUBSCRIBE`).
    sharded: bool,
    /// The current connection's socket, for the canceller to shut down.
    current: Current,
    metrics: Arc<Metrics>,
    /// Whose subscription this is. A client's own (`PerClient`) gives up
    /// if it never got going, so that the client is refused. A room's
    /// (`Shared`) never gives up (clients come and go; it stops when the
    /// last one leaves), and reports every failed attempt, not only the
    /// loss of a live subscription.
    mode: Subscriptions,
    /// Longest payload read into memory (see [`Push::Oversized`]).
    max_payload: usize,
}

impl Listen for RedisListener {
    /// Subscribes, delivers, and when the connection is lost, reconnects with
    /// back-off and subscribes again — until cancelled.
    fn listen(
        self: Box<Self>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<(), BrokerError> {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut state = ListenState::default();
        loop {
            state.live = false;
            let error = match self.connection(stop, on_event, &mut state) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            // Cancelled: the canceller shut the socket down; not a failure.
            if stop.is_stopped() {
                return Ok(());
            }
            if !state.ever_subscribed && self.mode == Subscriptions::PerClient {
                // Never got going: the caller refuses the client instead.
                return Err(error);
            }
            if state.live {
                self.metrics.subscriptions_lost.inc();
                state.down.replace(Down::new(&self.metrics));
                log::debug!("subscription to {} lost: {error}", self.channel);
                if on_event(Event::Lost(Arc::new(error))).is_break() {
                    return Ok(());
                }
                backoff.reset();
            } else if self.mode == Subscriptions::Shared {
                // A room's shared subscription serves clients that are
                // waiting to join: each failed attempt tells them.
                if on_event(Event::Lost(Arc::new(error))).is_break() {
                    return Ok(());
                }
            }
            if stop.sleep(backoff.next_delay()) {
                return Ok(());
            }
        }
    }
}

/// Where a listener stands, across its reconnections.
#[derive(Default)]
pub(super) struct ListenState {
    /// Subscribed on the current connection.
    live: bool,
    /// Subscribed at least once (later failures are losses to recover from,
    /// not a failure to join).
    ever_subscribed: bool,
    /// Present while the subscription is lost and not yet restored.
    down: Option<Down>,
    /// The last attempt was told its slot is served elsewhere (`MOVED`).
    redirected: bool,
}

/// A subscription that is down, counted in `subscriptions_down` for as
/// long as this value lives (so every way out of `listen` uncounts it).
struct Down(Arc<Metrics>);

impl Down {
    fn new(metrics: &Arc<Metrics>) -> Down {
        metrics.subscriptions_down.inc();
        Down(Arc::clone(metrics))
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        self.0.subscriptions_down.dec();
    }
}

impl RedisListener {
    /// A listener for `room`'s channel, and the canceller that stops it.
    pub(super) fn new(
        topology: &Arc<Topology>,
        url: &str,
        room: &Room,
        metrics: &Arc<Metrics>,
        subscriptions: &SubscriptionSockets,
        mode: Subscriptions,
        max_payload: usize,
    ) -> (RedisListener, Canceller) {
        let current = Current::default();
        subscriptions.track(&current);
        let canceller = {
            let current = Arc::clone(&current);
            // Wakes a read blocked on the current connection, wherever it
            // is; `listen` checks the flag after every connect and read.
            Canceller::new(move || {
                current.shut_down();
            })
        };
        let listener = RedisListener {
            topology: Arc::clone(topology),
            url: url.to_owned(),
            channel: topology.channel(room),
            route: Route::room(room),
            sharded: topology.is_cluster(),
            current,
            metrics: Arc::clone(metrics),
            mode,
            max_payload,
        };
        (listener, canceller)
    }

    /// One connection's worth of subscription: connect, subscribe, deliver.
    /// Returns `Ok` when stopped, `Err` when the connection fails. A
    /// cluster's `MOVED` at subscribing is followed at once (a few times):
    /// it is not a loss, only a slot map that was out of date.
    pub(super) fn connection(
        &self,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let mut result = self.attempt(stop, on_event, state);
        for _ in 0..MAX_REDIRECTS {
            if !std::mem::take(&mut state.redirected) {
                break;
            }
            result = self.attempt(stop, on_event, state);
        }
        result
    }

    /// One connection to the node the topology names now.
    fn attempt(
        &self,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let (address, client) = self.topology.node(self.route)?;
        let info = client.get_connection_info().clone();
        let (mut con, socket) = PubSubConnection::connect(&info, CONNECT_TIMEOUT, self.max_payload)
            .map_err(|e| {
                self.topology.unreachable(&address);
                BrokerError::Connect {
                    url: redact(&self.url),
                    reason: e.to_string(),
                }
            })?;
        self.topology.reached(&address);
        self.current.set(Some(socket));
        let result = self.receive(&mut con, stop, on_event, state);
        self.current.set(None);
        match &result {
            // Moved by the cluster: the server is fine, the map is not.
            Err(BrokerError::Moved) => self.topology.forget(),
            // Lost: the next connection asks where the master is now.
            Err(_) => self.topology.unreachable(&address),
            Ok(()) => {}
        }
        result
    }

    pub(super) fn receive(
        &self,
        con: &mut PubSubConnection,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let lost = |e: std::io::Error| BrokerError::Redis(e.to_string());
        con.set_read_timeout(Some(IO_TIMEOUT)).map_err(lost)?;
        if let Err(e) = con.subscribe(&[&self.channel], self.sharded) {
            if let Some(redirect) = Redirect::in_message(&e.to_string()) {
                self.topology.redirected(&redirect);
                state.redirected = true;
                return Err(BrokerError::Moved);
            }
            return Err(lost(e));
        }
        // From now on the connection is silent while the room is: no read
        // timeout. A Redis that stops answering is noticed by the heartbeat,
        // which shuts this socket down (see `SubscriptionSockets`).
        con.set_read_timeout(None).map_err(lost)?;
        state.live = true;
        // Restored (if it was down): no longer counted as down.
        drop(state.down.take());
        if state.ever_subscribed {
            self.metrics.redis_reconnects.inc();
        }
        state.ever_subscribed = true;
        // Only now, with the socket registered for the canceller and
        // SUBSCRIBE acknowledged, is a cancel sure to be seen.
        if stop.is_stopped() || on_event(Event::Subscribed).is_break() {
            return Ok(());
        }
        let mut behind = Behind::default();
        // The clock is read once per read from the socket: what one read
        // brought arrived together.
        let mut now = Instant::now();
        loop {
            // Cancelling shuts the socket down, so this returns at once.
            match con.wait() {
                Ok(Waited::Buffered) => {}
                Ok(Waited::CaughtUp) => {
                    now = Instant::now();
                    behind.caught_up();
                }
                Ok(Waited::MaybeBehind) => {
                    now = Instant::now();
                    if behind.wants_probe(now) {
                        con.ping().map_err(lost)?;
                    }
                }
                Err(e) => {
                    if stop.is_stopped() {
                        return Ok(());
                    }
                    return Err(lost(e));
                }
            }
            if stop.is_stopped() {
                return Ok(());
            }
            let incoming = match con.next().map_err(lost)? {
                Push::Message { channel, payload } if channel == self.channel.as_bytes() => {
                    Some(Incoming::parse(&payload, behind.since(now)))
                }
                Push::Oversized { channel, len } if channel == self.channel.as_bytes() => {
                    Some(Incoming::oversized(len, behind.since(now)))
                }
                Push::Pong => {
                    behind.ponged(now);
                    None
                }
                Push::Unsubscribed { channel } if channel == self.channel.as_bytes() => {
                    // A cluster moved the room's slot to another master
                    // (a resharding, a failover): subscribe there.
                    return Err(BrokerError::Moved);
                }
                _ => None,
            };
            if let Some(incoming) = incoming
                && on_event(Event::Message(Arc::new(incoming))).is_break()
            {
                return Ok(());
            }
            // Messages Redis sent together are written to the client
            // together: flush only when nothing more is already here. Also
            // after a reply that is not a message (a pong, a confirmation):
            // it may have come in the same read as the last message.
            if !con.has_buffered() && on_event(Event::Idle).is_break() {
                return Ok(());
            }
        }
    }
}

/// How long what a listener reads has waited behind Redis: this instance's
/// own measure of how far behind the room its clients are (a payload's
/// `ts` is the sender's word, and anyone who can publish can forge it).
///
/// A listener that has handled everything it read, with nothing more in its
/// socket, is caught up: what it reads next has just arrived. One that is
/// not may have more waiting in Redis, which cannot be seen from here. So
/// it asks: at most every [`PROBE_EVERY`] it sends a `PING` on the
/// subscription, and Redis answers in line, behind everything it had queued.
/// While the answer is on its way, everything read was queued before it,
/// so has waited at least since the `PING` went; once it is here, how long
/// it took is how long a message waits now.
#[derive(Debug, Default)]
struct Behind {
    /// When the unanswered `PING` was sent.
    probe: Option<Instant>,
    /// When the last one was sent.
    last_probe: Option<Instant>,
    /// How long the last answer took (zero once caught up).
    measured: Duration,
}

/// Most often a listener that is behind asks Redis how far (see [`Behind`]).
const PROBE_EVERY: Duration = Duration::from_millis(500);

impl Behind {
    fn caught_up(&mut self) {
        // An answer not seen by now is not coming (nothing is queued).
        self.probe = None;
        self.measured = Duration::ZERO;
    }

    /// Whether to send a `PING` now (and if so, it counts as sent).
    fn wants_probe(&mut self, now: Instant) -> bool {
        let due = self.probe.is_none()
            && self
                .last_probe
                .is_none_or(|last| now.saturating_duration_since(last) >= PROBE_EVERY);
        if due {
            (self.probe, self.last_probe) = (Some(now), Some(now));
        }
        due
    }

    fn ponged(&mut self, now: Instant) {
        if let Some(sent) = self.probe.take() {
            self.measured = now.saturating_duration_since(sent);
        }
    }

    /// Since when a message read `now` has been waiting, at least.
    fn since(&self, now: Instant) -> Instant {
        match self.probe {
            Some(sent) => sent,
            None => now.checked_sub(self.measured).unwrap_or(now),
        }
    }
}

/// The socket of a listener's current connection, if it has one: shared
/// with the listener's canceller and with [`SubscriptionSockets`], which shut it
/// down to wake the listener.
pub(super) type Current = Arc<CurrentSocket>;

#[derive(Default)]
pub(super) struct CurrentSocket(Mutex<Option<Arc<TcpStream>>>);

impl CurrentSocket {
    fn set(&self, socket: Option<Arc<TcpStream>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = socket;
    }

    /// Shuts the socket down, so that a read blocked on it returns at once;
    /// false when there is no connection right now.
    fn shut_down(&self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread;
    use std::time::Duration;

    use crate::broker::Subscription;

    /// A message that arrives in the same read as a reply that is not a
    /// message (here a pong) is still followed by `Idle`, the subscriber's
    /// cue to write it out; otherwise it would wait, unwritten, for the next
    /// message. The peer is a scripted one, to put both replies in one write.
    #[test]
    fn a_message_read_with_a_pong_is_flushed() {
        let peer = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", peer.local_addr().unwrap());
        let script = thread::spawn(move || {
            let (mut redis, _) = peer.accept().unwrap();
            let mut command = [0u8; 256];
            let _ = redis.read(&mut command).unwrap(); // SUBSCRIBE ch
            redis
                .write_all(b"*3\r\n$9\r\nsubscribe\r\n$18\r\nthreadchat:room:ch\r\n:1\r\n")
                .unwrap();
            let payload = br#"{"nickname":"ann","message":"hi"}"#;
            let mut both = format!(
                "*3\r\n$7\r\nmessage\r\n$18\r\nthreadchat:room:ch\r\n${}\r\n",
                payload.len()
            )
            .into_bytes();
            both.extend_from_slice(payload);
            both.extend_from_slice(b"\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n");
            redis.write_all(&both).unwrap();
            // Hold the connection until the listener is cancelled.
            let _ = redis.read(&mut command);
        });
        let target = crate::config::RedisTarget::Server(url.clone());
        let topology = Arc::new(Topology::new(&target).unwrap());
        let metrics = Arc::new(Metrics::default());
        let subscriptions = SubscriptionSockets::default();
        let (listener, canceller) = RedisListener::new(
            &topology,
            &url,
            &Room::parse("ch").unwrap(),
            &metrics,
            &subscriptions,
            Subscriptions::PerClient,
            1024,
        );
        let subscription = Subscription::new(Box::new(listener), canceller.clone());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let listening = thread::spawn(move || {
            subscription.run(|event| {
                let name = match event {
                    Event::Subscribed => "subscribed",
                    Event::Message(_) => "message",
                    Event::Idle => "idle",
                    Event::Lost(_) => "lost",
                };
                let _ = events_tx.send(name);
                Flow::Continue(())
            })
        });
        let timeout = Duration::from_secs(5);
        for expected in ["subscribed", "message", "idle"] {
            assert_eq!(events.recv_timeout(timeout), Ok(expected));
        }
        canceller.cancel();
        assert_eq!(listening.join().unwrap(), Ok(()));
        script.join().unwrap();
    }
}
