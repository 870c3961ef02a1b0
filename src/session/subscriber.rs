//! The subscriber thread: delivers the room to one client, live.
//!
//! It blocks in `Subscription::run` and, for each event:
//!
//! * `Subscribed` (the first time): the start-up handshake — tell the
//!   connection's first thread "ready", wait for "go". Meanwhile that thread
//!   sends the `101`, the history and who is in the room (see [`welcome`](super::welcome)); room
//!   messages wait in the subscription until then.
//! * `Message`: skip junk (one warning per payload, not per client), the
//!   client's own messages and events, and messages it already got from the
//!   history; queue the rest, already encoded, for the client.
//! * `Idle`: nothing more is waiting, so write the queued frames with one
//!   flush.
//! * `Lost` / `Subscribed` again: tell the client, with a notice, that the
//!   relay was lost and then restored (messages in between may be missing).
//!
//! **Direct delivery.** With a shared subscription (and `--delivery
//! direct`, the default), the room's dispatcher thread writes a message
//! straight to a client that has nothing queued, without waking this
//! thread: a thread switch costs more than the write. What a client
//! receives is then decided in one place for both writers, the [`Outbox`],
//! whose state is behind a lock: the dispatcher only tries that lock and
//! only writes what the socket takes at once, and leaves anything harder —
//! a full socket, a failed write, a client not yet welcomed — to this
//! thread, which stays the one that blocks, and the one that ends the
//! connection.
//!
//! This thread does only what repeats. What happens once per connection
//! happens on the connection's first thread, which ends after it (see
//! [`handoff`](super::handoff)): an idle subscriber thread keeps only two or
//! three pages of stack resident.
//!
//! When it ends first (server shutdown, relay failure, a client too slow to
//! read), it closes the connection: a close frame when one can be sent, a
//! bounded wait for the client's reply, then `shutdown()` to wake the reader.

use std::collections::HashSet;
use std::net::Shutdown;
use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tungstenite::Message;

use super::sched;
use super::socket::{TrySend, Writer};
use super::{Conn, Context, Ending};
use crate::broker::{BrokerError, Direct, DirectSink, Event, Subscription};
use crate::http::Member;
use crate::protocol::{ChatMessage, ConnId, Incoming, Kind, ServerFrame, unix_millis};

/// The subscriber thread's half of the start-up handshake.
pub(super) struct Start {
    /// Sent to once subscribed.
    pub(super) ready: Sender<()>,
    /// Received from once the client has its `101`, its history and who is
    /// in the room, with the ids of messages not to deliver (see
    /// [`Delivery::skip`]); disconnected if the client did not get that far.
    pub(super) go: Receiver<HashSet<String>>,
}

/// Everything needed to write the room to one client: shared by its
/// subscriber thread and, with direct delivery, the room's dispatcher.
pub(super) struct Outbox {
    conn: Arc<Conn>,
    ctx: Arc<Context>,
    member: Member,
    writer: Arc<Writer>,
    /// Locked by whoever writes room messages to the client.
    state: Mutex<Delivery>,
}

/// What the room's writers must agree on.
#[derive(Default)]
struct Delivery {
    /// Ids of messages not to deliver, each expected once: those already
    /// sent from the history, and the coalesced announcement of the client's
    /// own join (a single one carries the client's `conn`: `is_from`).
    skip: HashSet<String>,
    /// Whether the client has its `101` (so frames may be written).
    upgraded: bool,
    /// Room messages waiting for the next flush (see [`Outbox::flush`]).
    pending: Vec<Message>,
    /// The send time (`ts`) of each chat message in `pending`, for the
    /// latency histogram.
    pending_stamps: Vec<Option<u64>>,
    /// The dispatcher left frames in the writer that the socket did not
    /// take: the next flush must write them, even with nothing pending.
    unfinished: bool,
    /// A direct write failed, and this is how the connection ends (this
    /// thread ends it: the dispatcher only records it).
    failed: Option<Ending>,
    /// How far behind the room the client is.
    lag: Lag,
}

/// How far behind the room a client is, from the messages it is sent.
///
/// The write deadline (see `socket::WriteHalf`) catches a client whose
/// socket stops taking data. A client that reads, but slower than the room
/// speaks, is caught here: each live message carries when its sender's
/// server received it (`ts`), so the time between that and the moment the
/// message is taken for this client is how long it waited for the client —
/// in Redis's buffer for it (per-client subscriptions), in its queue
/// (shared, in-process), or behind earlier writes. Past `--write-timeout`,
/// the client is closed as too slow, before Redis's own output-buffer limit
/// drops the subscription (and with it, the client's messages).
///
/// Clocks of different instances need not agree: the wait is measured
/// against the quickest message seen from the same instance (at most
/// [`LAG_INSTANCES`] of them are followed), so a constant clock offset
/// cancels out. Messages without `ts` (the original app's) are not judged.
/// The baselines live inline, keyed by a hash of the instance: following
/// the room costs an idle client no allocation (each one on a subscriber
/// thread would stay in that thread's malloc cache).
#[derive(Default)]
struct Lag {
    /// (hash of an instance, least `arrival - ts` seen from it, in ms).
    baselines: [(u64, i64); LAG_INSTANCES],
    /// How many of `baselines` are in use.
    len: usize,
}

/// Most sending instances a client's [`Lag`] follows.
const LAG_INSTANCES: usize = 8;

impl Lag {
    /// How much later than its instance's quickest this message arrives,
    /// in ms. It runs for every message to every client: a hash of a few
    /// instructions, no allocation.
    #[inline(never)]
    fn behind(&mut self, msg: &ChatMessage, now_ms: u64) -> u64 {
        let Some(ts) = msg.ts else { return 0 };
        let sender = msg.conn.as_deref().or(msg.id.as_deref()).unwrap_or("");
        let instance = ConnId::instance_of(sender).unwrap_or(sender);
        // FNV-1a: instances are few, and a collision only merges two
        // baselines.
        let key = instance
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let offset = now_ms as i64 - ts as i64;
        let known = &mut self.baselines[..self.len];
        match known.iter_mut().find(|(k, _)| *k == key) {
            Some((_, base)) => {
                *base = (*base).min(offset);
                (offset - *base) as u64
            }
            None => {
                if self.len < LAG_INSTANCES {
                    self.baselines[self.len] = (key, offset);
                    self.len += 1;
                }
                0
            }
        }
    }
}

/// What a client is told, before its close frame, when the server stops.
pub(super) const SHUTDOWN_NOTICE: &str =
    "the server is shutting down; you will be disconnected (reconnect in a moment)";

/// Most room messages written with one flush.
const MAX_BATCH: usize = 64;

/// The thread's body.
pub(super) fn run(
    subscription: Subscription,
    outbox: Arc<Outbox>,
    start: Start,
    reader_done: Receiver<()>,
) {
    // Woken with a room's message, wait for the waker to wake everyone.
    sched::wait_turn_when_woken();
    // Where messages come from a room's dispatcher, let it write to the
    // client itself while the client keeps up. (A per-client Redis
    // subscription has no dispatcher: this thread reads Redis itself, and
    // `deliver_directly` says no.)
    subscription.deliver_directly(Arc::clone(&outbox) as Arc<dyn DirectSink>);
    let mut start = Some(start);
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        subscription.run(|event| match event {
            Event::Subscribed => match start.take() {
                Some(start) => outbox.start(start),
                None => {
                    // Messages held up by the outage say nothing of the
                    // client: judge its lag afresh.
                    outbox.lock().lag = Lag::default();
                    outbox.notice(
                        "reconnected to the chat relay; messages sent while it was \
                         unavailable may be missing",
                    )
                }
            },
            Event::Lost(e) => outbox.notice(&format!("lost the chat relay ({e}); reconnecting")),
            Event::Message(incoming) => outbox.deliver(&incoming),
            Event::Idle => outbox.flush(&mut outbox.lock()),
        })
    }));
    let Outbox { conn, ctx, .. } = &*outbox;
    // The one place this thread's errors are logged.
    match result {
        Ok(Ok(())) => {}
        Ok(Err(BrokerError::Lagged)) => {
            conn.end(Ending::TooSlow("fell too far behind the room".into()));
        }
        Ok(Err(e)) => {
            log::error!("{}: chat relay failed: {e}", conn.id);
            conn.end(Ending::RelayFailed(e));
        }
        Err(_) => {
            ctx.metrics.panics.inc();
            log::error!(
                "{}: subscriber thread panicked; closing the connection",
                conn.id
            );
            conn.end(Ending::Panicked);
        }
    }
    // Before the upgrade there is no reader yet; the connection's first
    // thread answers HTTP.
    if outbox.lock().upgraded
        && let Err(TryRecvError::Empty) = reader_done.try_recv()
    {
        // A close frame alone says nothing to a person in a terminal (and
        // websocat without `-E` shows nothing at all): say it in words first.
        if conn.ending() == Some(&Ending::ServerShutdown) {
            let _ = outbox.notice(SHUTDOWN_NOTICE);
        }
        say_goodbye(conn, ctx, &outbox.writer, &reader_done);
    }
}

/// This thread ended while the reader still reads: close the connection.
fn say_goodbye(conn: &Conn, ctx: &Context, writer: &Writer, reader_done: &Receiver<()>) {
    let ending = conn.ending();
    if let Some(frame) = ending.and_then(Ending::close_frame) {
        let stuck = matches!(ending, Some(Ending::TooSlow(_)));
        if stuck {
            // It is not reading: one short try, no waiting for a reply.
            conn.shorten_write_timeout();
        }
        if writer.close(Some(frame)).is_ok() && !stuck {
            let _ = reader_done.recv_timeout(ctx.limits.close_grace);
        }
    }
    let _ = conn.stream.shutdown(Shutdown::Both);
}

impl Outbox {
    /// A client's outbox; nothing is written until it is upgraded.
    pub(super) fn new(
        conn: Arc<Conn>,
        ctx: Arc<Context>,
        member: Member,
        writer: Arc<Writer>,
    ) -> Outbox {
        Outbox {
            conn,
            ctx,
            member,
            writer,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Delivery> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The start-up handshake: tell the first thread "ready", then wait for
    /// "go", which comes with the ids to skip.
    fn start(&self, start: Start) -> ControlFlow<()> {
        if start.ready.send(()).is_err() {
            return ControlFlow::Break(());
        }
        match start.go.recv() {
            Ok(skip) => {
                let mut delivery = self.lock();
                delivery.skip = skip;
                delivery.upgraded = true;
                ControlFlow::Continue(())
            }
            Err(_) => ControlFlow::Break(()),
        }
    }

    /// Sends a server notice.
    fn notice(&self, text: &str) -> ControlFlow<()> {
        self.write(&ServerFrame::notice(text))
    }

    /// Writes one frame of the server's own in the client's format, after
    /// any room messages still waiting; a failed write ends the subscription.
    fn write(&self, frame: &ServerFrame<'_>) -> ControlFlow<()> {
        let delivery = &mut self.lock();
        self.flush(delivery)?;
        let message = Message::text(frame.render(self.member.format));
        self.check(self.writer.send(message))
    }

    /// Ends the subscription if a write failed.
    fn check(&self, result: Result<(), tungstenite::Error>) -> ControlFlow<()> {
        match result {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.conn.end(Ending::from_write_error(&e));
                ControlFlow::Break(())
            }
        }
    }

    /// Queues one message from the room for the client (see
    /// [`take`](Self::take)); writes the queue once [`MAX_BATCH`] wait.
    /// The rest is written by [`flush`](Self::flush), when the listener has
    /// nothing more waiting.
    fn deliver(&self, incoming: &Incoming) -> ControlFlow<()> {
        let delivery = &mut self.lock();
        if let Err(ending) = self.take(delivery, incoming, unix_millis()) {
            self.conn.end(ending);
            return ControlFlow::Break(());
        }
        if delivery.pending.len() >= MAX_BATCH {
            return self.flush(delivery);
        }
        ControlFlow::Continue(())
    }

    /// Adds one message from the room to `pending`, unless it is junk, the
    /// client's own, or already sent from the history. Fails when the
    /// client has fallen more than `--write-timeout` behind (see [`Lag`]).
    /// `now_ms` is the time it is taken (read once for a batch).
    fn take(
        &self,
        delivery: &mut Delivery,
        incoming: &Incoming,
        now_ms: u64,
    ) -> Result<(), Ending> {
        let msg = match incoming.message() {
            Ok(msg) => msg,
            Err(junk) => {
                if self
                    .ctx
                    .junk
                    .report(&self.member.room, &junk.payload, &junk.error)
                {
                    self.ctx.metrics.payloads_skipped.inc();
                }
                return Ok(());
            }
        };
        let behind = Duration::from_millis(delivery.lag.behind(msg, now_ms));
        if behind > self.ctx.limits.write_timeout {
            return Err(Ending::TooSlow(format!(
                "{:.1}s behind the room (--write-timeout)",
                behind.as_secs_f64()
            )));
        }
        if msg.is_from(&self.conn.id) {
            return Ok(());
        }
        if !delivery.skip.is_empty()
            && let Some(id) = &msg.id
            && delivery.skip.remove(id)
        {
            return Ok(());
        }
        // Encoded once per format for everyone; this is a shared reference.
        let Some(text) = incoming.frame(self.member.format) else {
            return Ok(());
        };
        delivery.pending.push(Message::Text(text));
        if !matches!(msg.kind, Kind::Join | Kind::Leave) {
            delivery.pending_stamps.push(msg.ts);
        }
        Ok(())
    }

    /// Writes the queued room messages (and whatever a direct write left in
    /// the writer) with one flush, blocking up to the write timeout.
    fn flush(&self, delivery: &mut Delivery) -> ControlFlow<()> {
        if let Some(ending) = delivery.failed.take() {
            self.conn.end(ending);
            return ControlFlow::Break(());
        }
        if delivery.pending.is_empty() && !delivery.unfinished {
            return ControlFlow::Continue(());
        }
        let sent = self.writer.send_all(delivery.pending.drain(..));
        self.check(sent)?;
        delivery.unfinished = false;
        self.count_sent(delivery);
        ControlFlow::Continue(())
    }

    /// Counts the messages just handed to the writer.
    fn count_sent(&self, delivery: &mut Delivery) {
        let metrics = &self.ctx.metrics;
        metrics
            .messages_delivered
            .inc_by(delivery.pending_stamps.len() as u64);
        let now = unix_millis();
        for ts in delivery.pending_stamps.drain(..).flatten() {
            metrics.delivery_latency.observe(now.saturating_sub(ts));
        }
    }
}

/// Direct delivery, on the room's dispatching thread: never blocks, and
/// declines whenever this client's subscriber thread must decide.
impl DirectSink for Outbox {
    fn try_deliver(&self, messages: &[Arc<Incoming>]) -> Direct {
        let Ok(mut delivery) = self.state.try_lock() else {
            return Direct::Declined;
        };
        if !delivery.upgraded || delivery.unfinished || delivery.failed.is_some() {
            return Direct::Declined;
        }
        let now = unix_millis();
        for incoming in messages {
            if let Err(ending) = self.take(&mut delivery, incoming, now) {
                // The subscriber thread ends the connection.
                delivery.failed = Some(ending);
                return Direct::Unfinished;
            }
        }
        if delivery.pending.is_empty() {
            return Direct::Written;
        }
        match self.writer.try_send_all(&mut delivery.pending) {
            TrySend::Sent => {
                self.count_sent(&mut delivery);
                Direct::Written
            }
            // The reader thread is writing (a pong): the frames wait in
            // `pending`, for the subscriber thread.
            TrySend::Busy => Direct::Unfinished,
            TrySend::Blocked => {
                self.count_sent(&mut delivery);
                delivery.unfinished = true;
                Direct::Unfinished
            }
            TrySend::Failed(e) => {
                delivery.failed = Some(Ending::from_write_error(&e));
                Direct::Unfinished
            }
        }
    }
}
