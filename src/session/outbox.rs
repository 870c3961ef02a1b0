//! A client's outbox: what writing the room to one client means — the
//! start-up handshake, skipping the client's own messages and those it got
//! from the history, batching, judging how far behind it is, server
//! notices, and the close when the subscription ends first.

use std::collections::HashSet;
use std::net::Shutdown;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tungstenite::Message;

use super::socket::Writer;
use super::{Conn, Context, Ending};
use crate::broker::{Event, Place};
use crate::protocol::{ChatMessage, ConnId, Incoming, Kind, Member, ServerFrame, unix_millis};

/// The subscriber thread's half of the start-up handshake.
pub(super) struct Start {
    /// Sent to once subscribed.
    pub(super) ready: Sender<()>,
    /// Received from once the client has its `101`, its history and who is
    /// in the room (see [`Welcomed`]); disconnected if the client did not
    /// get that far.
    pub(super) go: Receiver<Welcomed>,
}

/// What the welcome sent, so that nothing reaches the client twice.
#[derive(Debug, Default)]
pub(super) struct Welcomed {
    /// The place in the room's log the welcome sent up to: what arrives live
    /// at or before it (same epoch) was sent already.
    pub(super) mark: Option<Place>,
    /// Ids of messages not to deliver, each expected once: the coalesced
    /// announcement of the client's own join (a single one carries the
    /// client's `conn`: `is_from`).
    pub(super) skip: HashSet<String>,
}

/// Everything needed to write the room to one client, that does not change.
pub(super) struct Outbox {
    pub(super) conn: Arc<Conn>,
    pub(super) ctx: Arc<Context>,
    pub(super) member: Member,
    pub(super) writer: Arc<Writer>,
}

/// What writing the room to one client keeps track of.
#[derive(Default)]
pub(super) struct Delivery {
    /// What the welcome sent.
    welcomed: Welcomed,
    /// Whether the client has its `101` (so frames may be written).
    pub(super) upgraded: bool,
    /// Room messages waiting for the next flush (see [`Outbox::flush`]).
    pub(super) pending: Vec<Message>,
    /// The send time (`ts`) of each chat message in `pending`, for the
    /// latency histogram.
    pending_stamps: Vec<Option<u64>>,
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
    /// What the subscription's events mean for the client.
    pub(super) fn on_event(
        &self,
        delivery: &mut Delivery,
        start: &mut Option<Start>,
        event: Event,
    ) -> ControlFlow<()> {
        match event {
            Event::Subscribed => match start.take() {
                Some(start) => self.start(delivery, start),
                None => {
                    // Messages held up by the outage say nothing of the
                    // client: judge its lag afresh.
                    delivery.lag = Lag::default();
                    self.notice(
                        delivery,
                        "reconnected to the chat relay; messages sent while it was \
                         unavailable may be missing",
                    )
                }
            },
            Event::Lost(e) => self.notice(
                delivery,
                &format!("lost the chat relay ({e}); reconnecting"),
            ),
            Event::Message(incoming) => self.deliver(delivery, &incoming),
            Event::Idle => self.flush(delivery),
        }
    }

    /// The subscription has ended, and why: if the reader still reads,
    /// close the connection.
    pub(super) fn finish(
        &self,
        delivery: &mut Delivery,
        result: Result<(), Ending>,
        reader_done: &Receiver<()>,
    ) {
        if let Err(ending) = result {
            self.conn.end(ending);
        }
        // Before the upgrade there is no reader yet; the connection's first
        // thread answers HTTP.
        if delivery.upgraded
            && let Err(TryRecvError::Empty) = reader_done.try_recv()
        {
            // A close frame alone says nothing to a person in a terminal (and
            // websocat without `-E` shows nothing at all): say it in words first.
            if self.conn.ending() == Some(&Ending::ServerShutdown) {
                let _ = self.notice(delivery, SHUTDOWN_NOTICE);
            }
            say_goodbye(&self.conn, &self.ctx, &self.writer, reader_done);
        }
    }

    /// The start-up handshake: tell the first thread "ready", then wait for
    /// "go", which comes with the ids to skip.
    fn start(&self, delivery: &mut Delivery, start: Start) -> ControlFlow<()> {
        if start.ready.send(()).is_err() {
            return ControlFlow::Break(());
        }
        match start.go.recv() {
            Ok(welcomed) => {
                delivery.welcomed = welcomed;
                delivery.upgraded = true;
                ControlFlow::Continue(())
            }
            Err(_) => ControlFlow::Break(()),
        }
    }

    /// Sends a server notice.
    fn notice(&self, delivery: &mut Delivery, text: &str) -> ControlFlow<()> {
        self.write(delivery, &ServerFrame::notice(text))
    }

    /// Writes one frame of the server's own in the client's format, after
    /// any room messages still waiting; a failed write ends the subscription.
    fn write(&self, delivery: &mut Delivery, frame: &ServerFrame<'_>) -> ControlFlow<()> {
        self.flush(delivery)?;
        let message = Message::text(frame.render(self.member.format));
        self.check(self.writer.send(message))
    }

    /// Ends the subscription if a write failed.
    pub(super) fn check(&self, result: Result<(), tungstenite::Error>) -> ControlFlow<()> {
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
    fn deliver(&self, delivery: &mut Delivery, incoming: &Incoming) -> ControlFlow<()> {
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
    pub(super) fn take(
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
        let welcomed = &mut delivery.welcomed;
        if let (Some(mark), Some(at)) = (&welcomed.mark, msg.at())
            && at.epoch == mark.epoch
            && at.offset <= mark.offset
        {
            return Ok(()); // Sent from the log already.
        }
        if !welcomed.skip.is_empty()
            && let Some(id) = &msg.id
            && welcomed.skip.remove(id)
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

    /// Writes the queued room messages with one flush, blocking up to the
    /// write timeout.
    pub(super) fn flush(&self, delivery: &mut Delivery) -> ControlFlow<()> {
        if delivery.pending.is_empty() {
            return ControlFlow::Continue(());
        }
        let sent = self.writer.send_all(delivery.pending.drain(..));
        self.check(sent)?;
        self.count_sent(delivery);
        ControlFlow::Continue(())
    }

    /// Counts the messages just handed to the writer.
    pub(super) fn count_sent(&self, delivery: &mut Delivery) {
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
