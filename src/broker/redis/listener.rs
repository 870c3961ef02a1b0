//! A blocking Redis subscription, and how it survives: reconnecting with
//! back-off after a loss, and being restarted by the heartbeat (see
//! [`SubscriptionSockets`]).
//!
//! Where to connect, on which channel, and what a refusal means are the
//! [`Nodes`]' to say: with one Redis, always the same server and channel.
//!
//! A restored subscription fills its gap from the room's log before
//! anything live ([`gaps`]), and says what it recovered with
//! [`Event::Restored`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gaps::{self, Gaps, Recent};
use super::job::Route;
use super::nodes::{Channel, Nodes};
use super::outage::{Down, Outage};
use super::parse_once::ParseOnce;
use super::place_keys::PlaceKeys;
use super::pubsub::{PubSubConnection, Push, Waited};
use super::settings::{CONNECT_TIMEOUT, IO_TIMEOUT, MAX_BACKOFF, MAX_MOVES};
use super::sockets::{Current, SubscriptionSockets};
use crate::broker::backoff::Backoff;
use crate::broker::error::BrokerError;
use crate::broker::error::redact;
use crate::broker::places::EpochKey;
use crate::broker::subscription::{Canceller, Event, Flow, Listen, StopSignal};
use crate::metrics::Metrics;
use crate::protocol::{EpochName, Incoming, Room, unix_millis};

/// A blocking Redis subscription: a client's own (per-client mode), or a
/// room's shared one (shared mode, run by the room's listener thread).
pub(super) struct RedisListener {
    /// What every listener of this instance shares.
    with: Arc<Listeners>,
    channel: Channel,
    room: Room,
    /// Where the channel is.
    route: Route,
    /// The current connection's socket, for the canceller to shut down.
    current: Current,
    /// When it gives up, and which failures it reports.
    patience: Patience,
}

/// What every subscription of an instance needs, built once when the
/// broker connects and shared by its listeners (a client's own, or a
/// room's feed in shared mode).
pub(super) struct Listeners {
    /// Where Redis is, asked at every (re)connection.
    pub(super) nodes: Arc<dyn Nodes>,
    /// Reads the room's log when a lost subscription is restored.
    pub(super) gaps: Arc<Gaps>,
    /// The Redis URL given, for errors (redacted).
    pub(super) url: String,
    pub(super) metrics: Arc<Metrics>,
    /// Every subscription's socket, for a failover to shut them all.
    pub(super) sockets: Arc<SubscriptionSockets>,
    /// Longest payload read into memory (see [`Push::Oversized`]).
    pub(super) max_payload: usize,
    /// The rooms' place keys the connections read: what the listener
    /// checks places with as it notes them (see `gaps::Recent`).
    pub(super) place_keys: Arc<PlaceKeys>,
    /// Payloads parsed lately: with per-client subscriptions, each is read
    /// by every client's listener, and parsed by the first.
    pub(super) parse_once: ParseOnce,
    /// What the log says of subscriptions lost and restored.
    pub(super) outage: Arc<Outage>,
}

/// When a listener gives up, and which failures it reports: chosen by
/// whoever builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Patience {
    /// A client's own subscription: if it never got going, the error is
    /// returned (the client is refused); once subscribed, a loss is
    /// reported and recovered from.
    UntilFirstFailure,
    /// One that serves whoever comes and goes: it never gives up (it stops
    /// when cancelled), and reports every failed attempt, not only the
    /// loss of a live subscription.
    Endless,
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
            if !state.ever_subscribed && self.patience == Patience::UntilFirstFailure {
                // Never got going: the caller refuses the client instead.
                return Err(error);
            }
            if state.live {
                self.with.metrics.subscriptions_lost.inc();
                // The server it was subscribed on (the URL may name
                // many).
                let at = state.at.clone().unwrap_or_else(|| redact(&self.with.url));
                let outage = Arc::clone(&self.with.outage);
                let down = Down::new(&self.with.metrics, outage, &at, &error);
                state.down.replace(down);
                state.gap().lost_at = unix_millis();
                log::debug!("subscription to {} lost: {error}", self.channel.name);
                if on_event(Event::Lost(Arc::new(error))).is_break() {
                    return Ok(());
                }
                backoff.reset();
            } else if self.patience == Patience::Endless {
                // Those waiting to join are told of each failed attempt.
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
    /// The server the last connection went to (redacted), for the log.
    at: Option<String>,
    /// The last attempt was told the room is served elsewhere now.
    moved: bool,
    /// Where a gap would begin, and the last one filled: boxed, so that
    /// the listener's frame, on every subscriber thread's deepest call
    /// chain, stays small (see `Subscription::run`).
    gap: Option<Box<GapState>>,
}

/// What a listener keeps to fill its gaps.
#[derive(Default)]
struct GapState {
    /// The places of the last messages delivered: where a gap begins.
    recent: Recent,
    /// When the subscription was last lost (Unix ms).
    lost_at: u64,
    /// The end of the log read that filled the last gap: live messages at
    /// or before it (in its epoch) were delivered from the log.
    filled_upto: Option<(String, u64)>,
    /// The key places were last checked with, and its epoch: the shared
    /// cache (`place_keys.rs`, behind a lock) is asked only when the epoch
    /// changes.
    key: Option<(EpochName, Arc<EpochKey>)>,
}

impl ListenState {
    fn gap(&mut self) -> &mut GapState {
        self.gap.get_or_insert_with(Box::default)
    }

    /// Whether `incoming` was delivered from the log already.
    fn filled(&self, incoming: &Incoming) -> bool {
        let Some((epoch, end)) = self.gap.as_ref().and_then(|gap| gap.filled_upto.as_ref()) else {
            return false;
        };
        incoming
            .message()
            .ok()
            .and_then(|msg| msg.at())
            .is_some_and(|at| at.epoch == epoch && at.offset <= *end)
    }
}

impl RedisListener {
    /// A listener for `room`'s channel, and the canceller that stops it.
    pub(super) fn new(
        with: &Arc<Listeners>,
        room: &Room,
        patience: Patience,
    ) -> (RedisListener, Canceller) {
        let current = Current::default();
        with.sockets.track(&current);
        let canceller = {
            let current = Arc::clone(&current);
            // Wakes a read blocked on the current connection, wherever it
            // is; `listen` checks the flag after every connect and read.
            Canceller::new(move || {
                current.shut_down();
            })
        };
        let listener = RedisListener {
            with: Arc::clone(with),
            channel: with.nodes.channel(room),
            room: room.clone(),
            route: Route::room(room),
            current,
            patience,
        };
        (listener, canceller)
    }

    /// One connection's worth of subscription: connect, subscribe, deliver.
    /// Returns `Ok` when stopped, `Err` when the connection fails. A room
    /// found to be served elsewhere at subscribing is followed at once (a
    /// few times): it is not a loss, only a map that was out of date.
    pub(super) fn connection(
        &self,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let mut result = self.attempt(stop, on_event, state);
        for _ in 0..MAX_MOVES {
            if !std::mem::take(&mut state.moved) {
                break;
            }
            result = self.attempt(stop, on_event, state);
        }
        result
    }

    /// One connection to the node the nodes name now.
    fn attempt(
        &self,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event) -> Flow,
        state: &mut ListenState,
    ) -> Result<(), BrokerError> {
        let (address, client) = self.with.nodes.node(&self.route)?;
        state.at = Some(redact(&address));
        let info = client.get_connection_info().clone();
        let (mut con, socket) = PubSubConnection::connect(
            &info,
            self.with.nodes.link(),
            CONNECT_TIMEOUT,
            self.with.max_payload,
        )
        .map_err(|e| {
            self.with.nodes.unreachable(&address);
            BrokerError::Connect {
                url: redact(&self.with.url),
                reason: e.to_string(),
            }
        })?;
        self.with.nodes.reached(&address);
        self.current.set(Some(socket));
        let result = self.receive(&mut con, stop, on_event, state);
        self.current.set(None);
        match &result {
            // Moved: the server is fine, the map of where rooms are is not.
            Err(BrokerError::Moved) => self.with.nodes.forget(),
            // Lost: the next connection asks where the master is now.
            Err(_) => self.with.nodes.unreachable(&address),
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
        let channel = &self.channel.name;
        if let Err(e) = con.subscribe(&[channel], self.channel.sharded) {
            if self.with.nodes.moved(&e.to_string()) {
                state.moved = true;
                return Err(BrokerError::Moved);
            }
            return Err(lost(e));
        }
        // From now on the connection is silent while the room is: no read
        // timeout. A Redis that stops answering is noticed by the heartbeat,
        // which shuts this socket down (see `SubscriptionSockets`).
        con.set_read_timeout(None).map_err(lost)?;
        // Restored: what was published meanwhile is read from the log
        // before anything live. If it cannot be read, the subscription is
        // not restored yet (its clients have heard nothing new): it is
        // tried again as after any loss.
        let restored = if state.ever_subscribed {
            Some(self.fill(state)?)
        } else {
            None
        };
        state.live = true;
        // Restored (if it was down): no longer counted as down.
        if let Some(down) = state.down.take() {
            down.restored();
        }
        if state.ever_subscribed {
            self.with.metrics.redis_reconnects.inc();
        }
        state.ever_subscribed = true;
        // Only now, with the socket registered for the canceller and
        // SUBSCRIBE acknowledged, is a cancel sure to be seen.
        if stop.is_stopped() {
            return Ok(());
        }
        match restored {
            None => {
                if on_event(Event::Subscribed).is_break() {
                    return Ok(());
                }
            }
            Some(fill) => {
                if deliver_fill(fill, on_event).is_break() {
                    return Ok(());
                }
            }
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
            let since = behind.since(now);
            let in_place = con.next_message_in_buffer(|on, payload| {
                (on == channel.as_bytes()).then(|| self.with.parse_once.incoming(payload, since))
            });
            let incoming = match in_place {
                Some(incoming) => incoming,
                None => match con.next().map_err(lost)? {
                    Push::Message {
                        channel: on,
                        payload,
                    } if on == channel.as_bytes() => {
                        Some(self.with.parse_once.incoming(&payload, since))
                    }
                    Push::Oversized { channel: on, len } if on == channel.as_bytes() => {
                        Some(Incoming::oversized(len, since))
                    }
                    Push::Pong => {
                        behind.ponged(now);
                        None
                    }
                    Push::Unsubscribed { channel: on } if on == channel.as_bytes() => {
                        // Redis ended the subscription itself: the room is
                        // served elsewhere now. Subscribe there.
                        return Err(BrokerError::Moved);
                    }
                    _ => None,
                },
            };
            if let Some(incoming) = incoming.filter(|incoming| !state.filled(incoming)) {
                let (room, keys) = (&self.room, &self.with.place_keys);
                let gap = state.gap();
                // The epoch's key, kept here and lent: a clone per message
                // is an atomic count every listener's core fights over.
                let epoch = incoming.message().ok().and_then(|msg| msg.epoch);
                if let Some(epoch) = epoch
                    && !matches!(&gap.key, Some((e, _)) if *e == epoch)
                    && let Some(key) = keys.peek(room, epoch.as_str())
                {
                    gap.key = Some((epoch, key));
                }
                let key = gap.key.as_ref();
                gap.recent.note(&incoming, |epoch| {
                    key.filter(|(e, _)| e.as_str() == epoch)
                        .map(|(_, key)| &**key)
                });
                if on_event(Event::Message(Arc::new(incoming))).is_break() {
                    return Ok(());
                }
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

impl RedisListener {
    /// Reads the room's log for a restored subscription, and what it must
    /// deliver from it. (Out of line, and boxed: see [`ListenState::gap`].)
    #[inline(never)]
    fn fill(&self, state: &mut ListenState) -> Result<Box<gaps::Fill>, BrokerError> {
        let log = self.with.gaps.read(&self.room, Instant::now())?;
        let gap = state.gap();
        let fill = gaps::fill(&log, &gap.recent, gap.lost_at);
        if let Some((epoch, offset)) = &fill.seen {
            self.with
                .gaps
                .report_seen(&self.room, &log, (epoch, *offset));
        }
        if let Some(newest) = fill.messages.last() {
            gap.recent.note_from_log(newest);
        }
        gap.filled_upto = fill.upto.clone();
        self.with
            .metrics
            .gap_recovered
            .inc_by(fill.gap.recovered as u64);
        if fill.gap.missing.is_some() {
            self.with.metrics.gaps_incomplete.inc();
        }
        Ok(Box::new(fill))
    }
}

/// Hands a restored subscription's gap to `on_event`: what it recovered,
/// the messages, then `Idle` to write them out.
// Boxed on purpose: unboxed, the caller's frame would hold it.
#[allow(clippy::boxed_local)]
#[inline(never)]
fn deliver_fill(fill: Box<gaps::Fill>, on_event: &mut dyn FnMut(Event) -> Flow) -> Flow {
    let gaps::Fill { gap, messages, .. } = *fill;
    on_event(Event::Restored(Arc::new(gap)))?;
    for message in messages {
        on_event(Event::Message(message))?;
    }
    on_event(Event::Idle)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread;
    use std::time::Duration;

    use crate::broker::subscription::Subscription;

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
        let nodes: Arc<dyn Nodes> = Arc::new(
            crate::broker::redis::nodes::OneServer::new(&url, Default::default()).unwrap(),
        );
        let listeners = Arc::new(Listeners {
            gaps: Arc::new(Gaps::new(&nodes, 0)),
            nodes,
            url,
            metrics: Arc::new(Metrics::default()),
            sockets: Arc::default(),
            max_payload: 1024,
            parse_once: ParseOnce::default(),
            outage: Arc::default(),
            place_keys: Arc::default(),
        });
        let room = Room::parse("ch").unwrap();
        let (listener, canceller) =
            RedisListener::new(&listeners, &room, Patience::UntilFirstFailure);
        let subscription = Subscription::new(Box::new(listener), canceller.clone());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let listening = thread::spawn(move || {
            subscription.run(|event| {
                let name = match event {
                    Event::Subscribed => "subscribed",
                    Event::Message(_) => "message",
                    Event::Idle => "idle",
                    Event::Lost(_) => "lost",
                    Event::Restored(_) => "restored",
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
