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

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tungstenite::Message;

use super::sched;
use super::socket::Writer;
use super::{Conn, Context, Ending};
use crate::broker::{BrokerError, Event, Subscription};
use crate::http::Member;
use crate::protocol::{Incoming, Kind, ServerFrame, unix_millis};

/// The subscriber thread's half of the start-up handshake.
pub(super) struct Start {
    /// Sent to once subscribed.
    pub(super) ready: Sender<()>,
    /// Received from once the client has its `101`, its history and who is
    /// in the room, with the ids of messages not to deliver (see
    /// [`Delivery::skip`]); disconnected if the client did not get that far.
    pub(super) go: Receiver<HashSet<String>>,
}

/// The thread's body.
pub(super) fn run(
    subscription: Subscription,
    conn: &Conn,
    ctx: &Context,
    member: &Member,
    writer: &Writer,
    start: Start,
    reader_done: Receiver<()>,
) {
    // Woken with a room's message, wait for the waker to wake everyone.
    sched::wait_turn_when_woken();
    let mut start = Some(start);
    let mut delivery = Delivery {
        conn,
        ctx,
        member,
        writer,
        skip: HashSet::new(),
        upgraded: false,
        pending: Vec::new(),
        pending_stamps: Vec::new(),
    };
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        subscription.run(|event| match event {
            Event::Subscribed => match start.take() {
                Some(start) => delivery.start(start),
                None => delivery.notice(
                    "reconnected to the chat relay; messages sent while it was \
                     unavailable may be missing",
                ),
            },
            Event::Lost(e) => delivery.notice(&format!("lost the chat relay ({e}); reconnecting")),
            Event::Message(incoming) => delivery.deliver(&incoming),
            Event::Idle => delivery.flush(),
        })
    }));
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
    if delivery.upgraded
        && let Err(TryRecvError::Empty) = reader_done.try_recv()
    {
        say_goodbye(conn, ctx, writer, &reader_done);
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

/// Everything needed to write the room to one client.
struct Delivery<'a> {
    conn: &'a Conn,
    ctx: &'a Context,
    member: &'a Member,
    writer: &'a Writer,
    /// Ids of messages not to deliver, each expected once: those already
    /// sent from the history, and the coalesced announcement of the client's
    /// own join (a single one carries the client's `conn`: `is_from`).
    skip: HashSet<String>,
    /// Whether the client has its `101` (so frames may be written).
    upgraded: bool,
    /// Room messages waiting for the next flush (see [`Delivery::flush`]).
    pending: Vec<Message>,
    /// The send time (`ts`) of each chat message in `pending`, for the
    /// latency histogram.
    pending_stamps: Vec<Option<u64>>,
}

/// Most room messages written with one flush.
const MAX_BATCH: usize = 64;

impl Delivery<'_> {
    /// The start-up handshake: tell the first thread "ready", then wait for "go",
    /// which comes with the ids to skip.
    fn start(&mut self, start: Start) -> ControlFlow<()> {
        if start.ready.send(()).is_err() {
            return ControlFlow::Break(());
        }
        match start.go.recv() {
            Ok(skip) => {
                self.skip = skip;
                self.upgraded = true;
                ControlFlow::Continue(())
            }
            Err(_) => ControlFlow::Break(()),
        }
    }

    /// Sends a server notice.
    fn notice(&mut self, text: &str) -> ControlFlow<()> {
        self.write(&ServerFrame::notice(text))
    }

    /// Writes one frame of the server's own in the client's format, after
    /// any room messages still waiting; a failed write ends the subscription.
    fn write(&mut self, frame: &ServerFrame<'_>) -> ControlFlow<()> {
        self.flush()?;
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

    /// Queues one message from the room for the client, unless it is junk,
    /// the client's own, or already sent from the history. Queued messages
    /// are written by [`flush`](Self::flush): when the listener has nothing
    /// more waiting, or when [`MAX_BATCH`] are queued.
    fn deliver(&mut self, incoming: &Incoming) -> ControlFlow<()> {
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
                return ControlFlow::Continue(());
            }
        };
        if msg.is_from(&self.conn.id) {
            return ControlFlow::Continue(());
        }
        if !self.skip.is_empty()
            && let Some(id) = &msg.id
            && self.skip.remove(id)
        {
            return ControlFlow::Continue(());
        }
        // Encoded once per format for everyone; this is a shared reference.
        let Some(text) = incoming.frame(self.member.format) else {
            return ControlFlow::Continue(());
        };
        self.pending.push(Message::Text(text));
        if !matches!(msg.kind, Kind::Join | Kind::Leave) {
            self.pending_stamps.push(msg.ts);
        }
        if self.pending.len() >= MAX_BATCH {
            return self.flush();
        }
        ControlFlow::Continue(())
    }

    /// Writes the queued room messages with one flush.
    fn flush(&mut self) -> ControlFlow<()> {
        if self.pending.is_empty() {
            return ControlFlow::Continue(());
        }
        let sent = self.writer.send_all(self.pending.drain(..));
        self.check(sent)?;
        let metrics = &self.ctx.metrics;
        metrics
            .messages_delivered
            .add(self.pending_stamps.len() as u64);
        let now = unix_millis();
        for ts in self.pending_stamps.drain(..).flatten() {
            metrics.delivery_latency.observe(now.saturating_sub(ts));
        }
        ControlFlow::Continue(())
    }
}
