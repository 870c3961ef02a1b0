//! The subscriber thread: delivers the room's messages to one client.
//!
//! It blocks in `Subscription::run` and, for each event:
//!
//! * `Subscribed` (the first time): the start-up handshake — tell the reader
//!   "ready", wait for "go" (the client has its `101`).
//! * `Message`: parse the payload; skip junk (one warning per payload, not per
//!   client) and the client's own messages; write the rest as chat frames.
//! * `Lost` / `Subscribed` again: tell the client, with a notice, that the
//!   relay was lost and then restored (messages in between may be missing).
//!
//! When it ends first (server shutdown, relay failure, a client too slow to
//! read), it closes the connection: a close frame when one can be sent, a
//! bounded wait for the client's reply, then `shutdown()` to wake the reader.

use std::net::Shutdown;
use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tungstenite::Message;

use super::socket::Writer;
use super::{Conn, Context, Ending};
use crate::broker::{BrokerError, Event, Subscription};
use crate::protocol::{ChatMessage, ServerFrame};

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
    writer: &Writer,
    start: Start,
    reader_done: Receiver<()>,
) {
    let mut start = Some(start);
    let mut upgraded = false;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        subscription.run(|event| match event {
            Event::Subscribed => match start.take() {
                Some(start) => {
                    if start.ready.send(()).is_ok() && start.go.recv().is_ok() {
                        upgraded = true;
                        ControlFlow::Continue(())
                    } else {
                        ControlFlow::Break(())
                    }
                }
                None => notify(
                    conn,
                    writer,
                    "reconnected to the chat relay; messages sent while it was \
                     unavailable may be missing",
                ),
            },
            Event::Lost(e) => notify(
                conn,
                writer,
                &format!("lost the chat relay ({e}); reconnecting"),
            ),
            Event::Message(payload) => deliver(payload, conn, ctx, writer),
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
    if upgraded && let Err(TryRecvError::Empty) = reader_done.try_recv() {
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

/// Sends a server notice; a failed write ends the subscription.
fn notify(conn: &Conn, writer: &Writer, text: &str) -> ControlFlow<()> {
    write(conn, writer, ServerFrame::notice(text).to_json())
}

fn write(conn: &Conn, writer: &Writer, frame: String) -> ControlFlow<()> {
    match writer.send(Message::text(frame)) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            conn.end(Ending::from_write_error(&e));
            ControlFlow::Break(())
        }
    }
}

/// Delivers one payload from the room to this client, unless it is junk or
/// the client's own message.
fn deliver(payload: &[u8], conn: &Conn, ctx: &Context, writer: &Writer) -> ControlFlow<()> {
    let msg = match ChatMessage::from_payload(payload) {
        Ok(msg) => msg,
        Err(e) => {
            if ctx.junk.report(payload, &e) {
                ctx.metrics.payloads_skipped.inc();
            }
            return ControlFlow::Continue(());
        }
    };
    if msg.is_from(&conn.id) {
        return ControlFlow::Continue(());
    }
    let flow = write(conn, writer, ServerFrame::from(&msg).to_json());
    if flow.is_continue() {
        ctx.metrics.messages_delivered.inc();
    }
    flow
}
