//! A client's outbox: what writing the room to one client means — the
//! start-up handshake, skipping the client's own messages and those it got
//! from the history, batching, judging how far behind it is, server
//! notices, and the close when the subscription ends first.

use std::collections::HashSet;
use std::net::Shutdown;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tungstenite::Message;

use super::conn::{Conn, Ending};
use super::context::Context;
use super::restored;
use super::socket::Writer;
use crate::broker::{Event, Place, PlaceKey};
use crate::protocol::{At, ChatMessage, Incoming, Kind, Member, ServerFrame, unix_millis};

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
    /// When the client was welcomed: what waited for it before then waited
    /// for the welcome, not for the client.
    welcomed_at: Option<Instant>,
    /// The time the messages arriving together are taken at: read once,
    /// forgotten at each flush.
    now: Option<Instant>,
    /// Room messages waiting for the next flush (see [`Outbox::flush`]).
    pub(super) pending: Vec<Message>,
    /// The send time (`ts`) of each chat message in `pending`, for the
    /// latency histogram.
    pending_stamps: Vec<Option<u64>>,
    /// Where the next message of the room's log must be, for its place to
    /// be passed on.
    expect: Expect,
    /// How many of the messages coming next were read from the room's log
    /// to fill a gap (see [`Event::Restored`]): their places are the log's
    /// own, as the welcome's history is.
    from_log: usize,
}

/// Which places in the room's log may come next, and how a place is known
/// to be the log's own.
///
/// A client keeps the place of the last message it got and comes back
/// with it (`?since=`), and the web page hides what it has seen already by
/// it: a place is an instruction to the client. But anyone who can publish
/// on the room's channel can write any `offset` and `epoch` into a payload,
/// the next one included. So a place is passed on only when it is
///
/// * the log's own: its tag matches the epoch's key, which only the log's
///   keeper knows ([`ChatMessage::tagged_by`], [`PlaceKey`]) — so nobody
///   can write a place the log has not given yet; and
/// * not behind the last one passed on in the same epoch — so nobody can
///   move a client back by replaying a place the log gave before.
///
/// Any other payload is delivered without a place (and counted): a forged
/// place cannot move a client's place, nor hide what follows it. A gap
/// (a message of the room skipped as junk) or a new epoch (a log that
/// starts afresh) is followed as the log gives it.
#[derive(Debug, Default)]
struct Expect {
    /// The epoch followed and the least offset it may give next (none:
    /// not known, after a lost subscription or in a room that had no log).
    next: Option<(String, u64)>,
    /// The key of the epoch last vouched for, and that epoch.
    key: Option<(String, PlaceKey)>,
}

impl Expect {
    /// After the welcome, which sent the log up to `mark`.
    fn after(mark: Option<&Place>) -> Expect {
        Expect {
            next: mark.map(|mark| (mark.epoch.clone(), mark.offset + 1)),
            key: None,
        }
    }

    /// The subscription was restored and what came meanwhile is not known:
    /// the next place vouched for is taken, wherever it is.
    fn lost(&mut self) {
        self.next = None;
    }

    /// Whether `msg`'s place (`at`) may be passed on; if it is, nothing
    /// before the one after it may be from now on. `vouch` asks the relay
    /// for the key of an epoch this connection has none for.
    fn take(
        &mut self,
        msg: &ChatMessage,
        at: At<'_>,
        vouch: impl FnOnce(&str) -> PlaceKey,
    ) -> bool {
        let behind =
            matches!(&self.next, Some((epoch, next)) if epoch == at.epoch && at.offset < *next);
        if behind || !self.vouched(msg, at, vouch) {
            return false;
        }
        self.move_past(at);
        true
    }

    /// Nothing before the place after `at` may come next. In the same
    /// epoch only the offset changes: every client takes every message,
    /// and a new `String` each time was an allocation per delivery.
    fn move_past(&mut self, at: At<'_>) {
        let next = at.offset.saturating_add(1);
        match &mut self.next {
            Some((epoch, offset)) if epoch == at.epoch => *offset = next,
            _ => self.next = Some((at.epoch.to_owned(), next)),
        }
    }

    /// Whether the place `at` of an entry read from the log itself may be
    /// passed on: only if it is not behind. (Its epoch may be one whose key
    /// is gone: a log that moved took a new one.) Rare (only while a gap
    /// is filled), so kept out of the subscriber thread's frames.
    #[cold]
    #[inline(never)]
    fn take_logged(&mut self, at: At<'_>) -> bool {
        let behind =
            matches!(&self.next, Some((epoch, next)) if epoch == at.epoch && at.offset < *next);
        if behind {
            return false;
        }
        self.move_past(at);
        true
    }

    /// Whether the relay vouches for `msg`'s place.
    fn vouched(
        &mut self,
        msg: &ChatMessage,
        at: At<'_>,
        vouch: impl FnOnce(&str) -> PlaceKey,
    ) -> bool {
        // The key is borrowed, not cloned: every client of a room checks
        // every message, and cloning the shared `Arc` made the dispatchers'
        // cores fight over its count (7% of shared mode's CPU in bench (b)).
        if !matches!(&self.key, Some((epoch, _)) if epoch == at.epoch) {
            let key = vouch(at.epoch);
            // An unknown key is asked for again next time (the relay
            // answers that from its cache, at most once a second from
            // Redis).
            if matches!(key, PlaceKey::Unknown) {
                return false;
            }
            self.key = Some((at.epoch.to_owned(), key));
        }
        match self.key.as_ref().map(|(_, key)| key) {
            Some(PlaceKey::Trusted) => true,
            Some(PlaceKey::Key(key)) => key.vouches_for(msg),
            Some(PlaceKey::Unknown) | None => false,
        }
    }
}

/// What [`Outbox::choose`] decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chosen {
    /// Not for this client: junk, its own, or sent already.
    Skip,
    /// The live frame everyone gets ([`Incoming::frame`]).
    Live,
    /// The frame without its place in the log, whose place was not vouched
    /// for ([`Incoming::frame_without_place`]).
    Unplaced,
}

/// What a client is told, before its close frame, when the server stops.
pub(super) const SHUTDOWN_NOTICE: &str =
    "the server is shutting down; you will be disconnected (reconnect in a moment)";

/// Most room messages written with one flush.
const MAX_BATCH: usize = 64;

/// This thread ended while the reader still reads: close the connection.
fn say_goodbye(conn: &Conn, ctx: &Context, writer: &Writer, reader_done: &Receiver<()>) {
    let ending = conn.ending();
    let stuck = matches!(ending, Some(Ending::TooSlow(_)));
    if let Some(frame) = ending.and_then(Ending::close_frame) {
        if stuck {
            // It is not reading: one short try, no waiting for a reply.
            conn.shorten_write_timeout();
        }
        if writer.close(Some(frame)).is_ok() && !stuck {
            let _ = reader_done.recv_timeout(ctx.limits.close_grace);
        }
    }
    if stuck {
        conn.abort();
    } else {
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
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
            Event::Subscribed | Event::Restored(_) if start.is_some() => match start.take() {
                Some(start) => self.start(delivery, start),
                None => ControlFlow::Continue(()),
            },
            Event::Subscribed => {
                // Restored by a relay that does not fill gaps: what was
                // published meanwhile never came, and the next place is
                // not known.
                delivery.expect.lost();
                self.notice(
                    delivery,
                    "reconnected to the chat relay; messages sent while it was \
                     unavailable may be missing",
                )
            }
            Event::Restored(gap) => {
                // The gap's messages follow, with their places: the client's
                // place stays exact unless where they begin is not known.
                if gap.missing.as_ref().is_some_and(|m| m.count.is_none()) {
                    delivery.expect.lost();
                }
                delivery.from_log = gap.recovered;
                self.notice(delivery, &restored::notice(&gap))
            }
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
        // Before the upgrade there is no reader yet; the connection's start
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

    /// The start-up handshake: tell the start thread "ready", then wait for
    /// "go", which comes with the ids to skip.
    fn start(&self, delivery: &mut Delivery, start: Start) -> ControlFlow<()> {
        if start.ready.send(()).is_err() {
            return ControlFlow::Break(());
        }
        match start.go.recv() {
            Ok(welcomed) => {
                delivery.expect = Expect::after(welcomed.mark.as_ref());
                delivery.welcomed = welcomed;
                delivery.upgraded = true;
                delivery.welcomed_at = Some(Instant::now());
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
        // One clock read for what arrives together (until the next flush).
        let now = *delivery.now.get_or_insert_with(Instant::now);
        if let Err(ending) = self.take(delivery, incoming, now) {
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
    /// message has waited here for the client more than `--write-timeout`
    /// ([`Incoming::waiting_since`]: this instance's own clock, never the
    /// payload's). `now` is the time it is taken (read once for a batch).
    pub(super) fn take(
        &self,
        delivery: &mut Delivery,
        incoming: &Incoming,
        now: Instant,
    ) -> Result<(), Ending> {
        let text = match self.choose(delivery, incoming, now)? {
            Chosen::Skip => return Ok(()),
            // Encoded once per format for everyone; this is a shared reference.
            Chosen::Live => incoming.frame(self.member.format),
            Chosen::Unplaced => incoming.frame_without_place(self.member.format),
        };
        if let Some(text) = text {
            delivery.pending.push(Message::Text(text));
        }
        Ok(())
    }

    /// Whether one message from the room goes to this client, and in which
    /// frame (see [`take`](Self::take), which queues it; the room's
    /// dispatcher may write it itself, see `direct`). A message chosen is
    /// counted as delivered at the next [`count_sent`](Self::count_sent).
    pub(super) fn choose(
        &self,
        delivery: &mut Delivery,
        incoming: &Incoming,
        now: Instant,
    ) -> Result<Chosen, Ending> {
        let logged = delivery.from_log > 0;
        delivery.from_log = delivery.from_log.saturating_sub(1);
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
                return Ok(Chosen::Skip);
            }
        };
        let waiting_since = match delivery.welcomed_at {
            Some(welcomed) => incoming.waiting_since().max(welcomed),
            None => incoming.waiting_since(),
        };
        let behind = now.saturating_duration_since(waiting_since);
        if behind > self.ctx.limits.write_timeout {
            return Err(Ending::TooSlow(format!(
                "{:.1}s behind the room (--write-timeout)",
                behind.as_secs_f64()
            )));
        }
        let mut placed = true;
        if let Some(at) = msg.at() {
            if let Some(mark) = &delivery.welcomed.mark
                && at.epoch == mark.epoch
                && at.offset <= mark.offset
            {
                return Ok(Chosen::Skip); // Sent from the log already.
            }
            let (broker, room) = (&self.ctx.broker, &self.member.room);
            placed = if logged {
                delivery.expect.take_logged(at)
            } else {
                delivery
                    .expect
                    .take(msg, at, |epoch| broker.place_key(room, epoch))
            };
            if !placed {
                self.ctx.metrics.payloads_unplaced.inc();
            }
        }
        if msg.is_from(&self.conn.id) {
            return Ok(Chosen::Skip);
        }
        let welcomed = &mut delivery.welcomed;
        if !welcomed.skip.is_empty()
            && let Some(id) = &msg.id
            && welcomed.skip.remove(id)
        {
            return Ok(Chosen::Skip);
        }
        if !matches!(msg.kind, Kind::Join | Kind::Leave) {
            delivery.pending_stamps.push(msg.ts);
        }
        Ok(if placed {
            Chosen::Live
        } else {
            Chosen::Unplaced
        })
    }

    /// Writes the queued room messages with one flush, blocking up to the
    /// write timeout.
    pub(super) fn flush(&self, delivery: &mut Delivery) -> ControlFlow<()> {
        delivery.now = None;
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
        metrics.delivery_latency.observe_all(
            delivery
                .pending_stamps
                .drain(..)
                .flatten()
                .map(|ts| now.saturating_sub(ts)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: u64, epoch: &str) -> ChatMessage {
        let json =
            format!(r#"{{"nickname":"n","message":"m","offset":{offset},"epoch":"{epoch}"}}"#);
        ChatMessage::from_payload(json.as_bytes()).unwrap()
    }

    fn take(expect: &mut Expect, offset: u64, epoch: &str) -> bool {
        let msg = msg(offset, epoch);
        expect.take(&msg, msg.at().unwrap(), |_| PlaceKey::Trusted)
    }

    /// A place the log gave before is not passed on again; gaps and a
    /// log that starts afresh are followed.
    #[test]
    fn a_place_behind_is_not_placed() {
        let mark = Place {
            offset: 10,
            epoch: "e".into(),
        };
        let mut expect = Expect::after(Some(&mark));
        assert!(take(&mut expect, 11, "e"));
        assert!(!take(&mut expect, 11, "e"));
        assert!(!take(&mut expect, 3, "e"));
        assert!(take(&mut expect, 14, "e"));
        assert!(take(&mut expect, 1, "fresh"));
        assert!(take(&mut expect, 2, "fresh"));
    }

    /// In sequence is not enough: the next offset, written by anyone, is
    /// placed only with the tag of the epoch's key.
    #[test]
    fn only_the_logs_tag_places_a_message() {
        let mut expect = Expect::after(Some(&Place {
            offset: 3,
            epoch: "e".into(),
        }));
        let key = PlaceKey::Key(std::sync::Arc::new(crate::broker::EpochKey::new("secret")));
        let forged = msg(4, "e");
        assert!(!expect.take(&forged, forged.at().unwrap(), |_| key.clone()));
        let tag = {
            let digest = sha1_smol::Sha1::from("secret:e:4").digest().to_string();
            digest[..16].to_owned()
        };
        let json =
            format!(r#"{{"nickname":"n","message":"m","offset":4,"epoch":"e","tag":"{tag}"}}"#);
        let genuine = ChatMessage::from_payload(json.as_bytes()).unwrap();
        assert!(expect.take(&genuine, genuine.at().unwrap(), |_| key.clone()));
        // Unknown keys vouch for nothing.
        let next = msg(5, "e");
        let mut unknown = Expect::after(Some(&Place {
            offset: 4,
            epoch: "e".into(),
        }));
        assert!(!unknown.take(&next, next.at().unwrap(), |_| PlaceKey::Unknown));
    }

    /// After a lost subscription the next place vouched for is taken.
    #[test]
    fn after_an_outage_the_next_place_is_taken() {
        let mut expect = Expect::after(Some(&Place {
            offset: 50,
            epoch: "e".into(),
        }));
        expect.lost();
        assert!(take(&mut expect, 40, "e"));
        assert!(!take(&mut expect, 39, "e"));
        assert!(take(&mut expect, 41, "e"));
    }

    /// An entry read from the log is placed without its epoch's key (a
    /// log that moved has a new one), but never behind.
    #[test]
    fn a_logged_place_is_taken_unless_behind() {
        let mut expect = Expect::after(Some(&Place {
            offset: 5,
            epoch: "e".into(),
        }));
        let at = |offset, epoch| At { offset, epoch };
        assert!(!expect.take_logged(at(5, "e")));
        assert!(expect.take_logged(at(6, "e")));
        assert!(expect.take_logged(at(7, "moved")));
        assert!(take(&mut expect, 8, "moved"));
    }
}
