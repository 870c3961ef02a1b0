//! The subscriber thread: delivers the room to one client, live.
//!
//! It blocks in `Subscription::run` and hands each event to the client's
//! [`Outbox`], which:
//!
//! * `Subscribed` (the first time): the start-up handshake — tell the
//!   connection's start thread "ready", wait for "go". Meanwhile that thread
//!   sends the `101`, the history and who is in the room (see
//!   [`welcome`](super::welcome)); room messages wait in the subscription
//!   until then.
//! * `Message`: skip junk (one warning per payload, not per client), the
//!   client's own messages and events, and messages it already got from the
//!   history; queue the rest, already encoded, for the client.
//! * `Idle`: nothing more is waiting, so write the queued frames with one
//!   flush.
//! * `Lost` / `Subscribed` again: tell the client, with a notice, that the
//!   relay was lost and then restored (messages in between may be missing).
//!
//! With a per-client subscription this thread alone writes the room to the
//! client, and keeps what that needs (the [`Delivery`]) to itself. Where a
//! room's messages are dispatched in-process (shared subscriptions, the
//! in-process relay), the dispatcher may write to the client too: that is
//! [`direct`]'s business, and the only place with a lock.
//!
//! This thread does only what repeats. What happens once per connection
//! happens on the connection's start thread, which ends after it (see
//! [`start`](super::start)): an idle subscriber thread keeps only two or
//! three pages of stack resident.
//!
//! When it ends first (server shutdown, relay failure, a client too slow to
//! read), it closes the connection: a close frame when one can be sent, a
//! bounded wait for the client's reply, then `shutdown()` to wake the reader.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::conn::Ending;
use super::direct;
use super::outbox::{Delivery, Outbox, Start};
use super::sched;
use crate::broker::{BrokerError, DirectSink, Subscription};

/// Who writes the room to the client.
pub(super) enum Writers {
    /// The subscriber thread alone (a per-client subscription, the
    /// in-process relay), with what it keeps track of. Boxed: the thread
    /// rests with this in reach for the client's whole life, and its stack
    /// must stay within two pages where it can.
    Alone(Box<(Outbox, Delivery)>),
    /// The subscriber thread, and the room's dispatcher while the client
    /// keeps up (see [`direct`]).
    WithDispatcher(Arc<direct::Shared>),
}

impl Writers {
    /// Who will write to the client of `subscription`. Called on the start
    /// thread, so that the shared outbox is allocated there: an idle
    /// subscriber thread that never calls `malloc` has no malloc cache to
    /// keep for the client's whole life.
    pub(super) fn for_subscription(outbox: Outbox, subscription: &Subscription) -> Writers {
        if !subscription.is_dispatched() {
            return Writers::Alone(Box::new((outbox, Delivery::default())));
        }
        let shared = direct::Shared::new(outbox);
        subscription.deliver_directly(Arc::clone(&shared) as Arc<dyn DirectSink>);
        Writers::WithDispatcher(shared)
    }
}

/// The thread's body.
pub(super) fn run(
    subscription: Subscription,
    writers: Writers,
    start: Start,
    reader_done: Receiver<()>,
) {
    // Woken with a room's message, wait for the waker to wake everyone.
    sched::wait_turn_when_woken();
    let mut start = Some(start);
    match writers {
        Writers::Alone(mut alone) => {
            let (outbox, delivery) = &mut *alone;
            let result = catch(outbox, || {
                subscription.run(|event| outbox.on_event(delivery, &mut start, event))
            });
            report(outbox, &result, start.is_none());
            outbox.finish(delivery, result, &reader_done);
        }
        Writers::WithDispatcher(shared) => {
            let result = catch(&shared.outbox, || {
                subscription.run(|event| shared.on_event(&mut start, event))
            });
            report(&shared.outbox, &result, start.is_none());
            shared
                .outbox
                .finish(&mut shared.lock().delivery, result, &reader_done);
        }
    }
}

/// Runs the subscription, turning a panic into an ending.
fn catch(outbox: &Outbox, run: impl FnOnce() -> Result<(), BrokerError>) -> Result<(), Ending> {
    match panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(BrokerError::Lagged)) => Err(Ending::TooSlow("fell too far behind the room".into())),
        Ok(Err(e)) => Err(Ending::RelayFailed(e)),
        Err(_) => {
            outbox.ctx.metrics.panics.inc();
            Err(Ending::Panicked)
        }
    }
}

/// The one place this thread's errors are logged. A relay that failed
/// before the client was welcomed (`subscribed` false) is not: the start
/// thread refuses the client and counts it with the others refused while
/// Redis is away.
fn report(outbox: &Outbox, result: &Result<(), Ending>, subscribed: bool) {
    let conn = &outbox.conn;
    match result {
        Err(Ending::RelayFailed(e)) if subscribed => {
            log::error!("{}: chat relay failed: {e}", conn.id);
        }
        Err(Ending::Panicked) => log::error!(
            "{}: subscriber thread panicked; closing the connection",
            conn.id
        ),
        _ => {}
    }
}
