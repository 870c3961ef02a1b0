//! The subscriber thread: delivers the room to one client.
//!
//! It blocks in `Subscription::run` and, for each event:
//!
//! * `Subscribed` (the first time): read the room's history, then the
//!   start-up handshake — tell the reader "ready", wait for "go" (the client
//!   has its `101`) — then send the history (marked as such) and who is in the
//!   room.
//! * `Message`: parse the payload; skip junk (one warning per payload, not per
//!   client), the client's own events, and messages it already got from the
//!   history; write the rest in the client's format.
//! * `Lost` / `Subscribed` again: tell the client, with a notice, that the
//!   relay was lost and then restored (messages in between may be missing).
//!
//! **History without gap or duplicate.** The subscription is live before the
//! history is read, so a message published around the join is either in the
//! history, or delivered live, or both — never neither. "Both" is removed by
//! message id: ids seen in the history are skipped when they arrive live. The
//! history is read before the client gets its `101`, so whatever anyone sends
//! once the client is connected reaches it as a live message.
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

use super::socket::Writer;
use super::{Conn, Context, Ending};
use crate::broker::{BrokerError, Event, Subscription};
use crate::http::Member;
use crate::protocol::{
    ChatMessage, Incoming, Kind, PRESENCE_LIST, SERVER_NICKNAME, ServerFrame, unix_millis,
};

/// The subscriber thread's half of the start-up handshake.
pub(super) struct Start {
    /// Sent to once subscribed.
    pub(super) ready: Sender<()>,
    /// Received from once the client has its `101`; disconnected if not.
    pub(super) go: Receiver<()>,
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
    let mut start = Some(start);
    let mut delivery = Delivery {
        conn,
        ctx,
        member,
        writer,
        from_history: HashSet::new(),
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
    // Before the upgrade there is no reader yet; the connection thread
    // answers HTTP.
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
    /// Ids of the messages sent from the history, not to be sent again.
    from_history: HashSet<String>,
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
    /// History, the start-up handshake, then history and presence are sent.
    fn start(&mut self, start: Start) -> ControlFlow<()> {
        let history = self.ctx.broker.history(&self.member.room);
        if start.ready.send(()).is_err() || start.go.recv().is_err() {
            return ControlFlow::Break(());
        }
        self.upgraded = true;
        self.send_history(history)?;
        self.send_presence()
    }

    fn send_history(&mut self, history: Result<Vec<Vec<u8>>, BrokerError>) -> ControlFlow<()> {
        let history = match history {
            Ok(history) => history,
            Err(e) => return self.notice(&format!("could not load the room's history ({e})")),
        };
        for payload in history {
            // Junk in the history was reported when it was published.
            let Ok(msg) = ChatMessage::from_payload(&payload) else {
                continue;
            };
            if let Some(id) = &msg.id {
                self.from_history.insert(id.clone());
            }
            self.write(&ServerFrame::from_event(&msg, true))?;
        }
        ControlFlow::Continue(())
    }

    fn send_presence(&mut self) -> ControlFlow<()> {
        let room = &self.member.room;
        let presence = match self.ctx.broker.presence(room, PRESENCE_LIST) {
            Ok(presence) => presence,
            Err(e) => return self.notice(&format!("could not load who is in {room} ({e})")),
        };
        let names = presence.nicknames.join(", ");
        let text = if presence.count > presence.nicknames.len() {
            format!("in {room}: {} people, among them {names}", presence.count)
        } else {
            format!("in {room}: {names}")
        };
        self.write(&ServerFrame::Presence {
            nickname: SERVER_NICKNAME,
            message: &text,
            room: room.name(),
            members: &presence.nicknames,
            count: presence.count,
        })
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
        if !self.from_history.is_empty()
            && let Some(id) = &msg.id
            && self.from_history.remove(id)
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
