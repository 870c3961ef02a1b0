//! Direct delivery: where a room's messages are dispatched in-process
//! (shared subscriptions, the in-process relay), the room's dispatcher
//! writes a message straight to a client that has nothing queued, without
//! waking the client's subscriber thread: a thread switch costs more than
//! the write (`docs/PERFORMANCE.md` has the numbers).
//!
//! So two threads may write the room to one client, and what the client
//! receives must be decided in one place: the client's [`Delivery`], here
//! behind a lock. The dispatcher only *tries* that lock, and only writes
//! what the socket takes at once; anything harder (a full socket, a failed
//! write, a client not yet welcomed) it leaves to the subscriber thread,
//! which stays the one that blocks and the one that ends the connection.
//!
//! A per-client Redis subscription has no dispatcher: none of this runs,
//! and its subscriber thread keeps its `Delivery` to itself, with no lock.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard};

use super::conn::Ending;
use super::outbox::{Delivery, Outbox, Start};
use super::socket::TrySend;
use crate::broker::{Direct, DirectSink, Event};
use crate::protocol::Incoming;

/// A client's [`Outbox`], shared by its subscriber thread and its room's
/// dispatcher.
pub(super) struct Shared {
    pub(super) outbox: Outbox,
    /// Locked by whoever writes room messages to the client.
    state: Mutex<State>,
}

/// What the two writers must agree on.
#[derive(Default)]
pub(super) struct State {
    pub(super) delivery: Delivery,
    /// The dispatcher left frames in the writer that the socket did not
    /// take: the subscriber thread must flush them.
    unfinished: bool,
    /// A direct write failed, and this is how the connection ends (the
    /// subscriber thread ends it: the dispatcher only records it).
    failed: Option<Ending>,
}

impl Shared {
    pub(super) fn new(outbox: Outbox) -> Arc<Shared> {
        Arc::new(Shared {
            outbox,
            state: Mutex::default(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subscriber thread's handling of an event: first whatever the
    /// dispatcher left to it, then what any subscriber thread does.
    pub(super) fn on_event(&self, start: &mut Option<Start>, event: Event) -> ControlFlow<()> {
        let state = &mut *self.lock();
        if state.unfinished || state.failed.is_some() {
            self.take_over(state)?;
        }
        self.outbox.on_event(&mut state.delivery, start, event)
    }

    /// What the dispatcher left to the subscriber thread: a failure to end
    /// the connection with, or frames to flush. Rare, so out of line: the
    /// caller's frame sits above every write of the subscriber thread, and
    /// a client whose subscriber ever wrote below its second stack page
    /// keeps a third one resident for its whole life (inlined, this one's
    /// locals pushed the writes of a join storm's welcomes just past it).
    #[cold]
    #[inline(never)]
    fn take_over(&self, state: &mut State) -> ControlFlow<()> {
        if let Some(ending) = state.failed.take() {
            self.outbox.conn.end(ending);
            return ControlFlow::Break(());
        }
        state.unfinished = false;
        self.outbox.check(self.outbox.writer.send_all([]))
    }
}

/// On the room's dispatching thread: never blocks, and declines whenever
/// this client's subscriber thread must decide.
impl DirectSink for Shared {
    fn try_deliver(&self, messages: &[Arc<Incoming>]) -> Direct {
        let Ok(mut state) = self.state.try_lock() else {
            return Direct::Declined;
        };
        let state = &mut *state;
        if !state.delivery.upgraded || state.unfinished || state.failed.is_some() {
            return Direct::Declined;
        }
        let (outbox, delivery) = (&self.outbox, &mut state.delivery);
        let now = std::time::Instant::now();
        for incoming in messages {
            if let Err(ending) = outbox.take(delivery, incoming, now) {
                state.failed = Some(ending);
                return Direct::Unfinished;
            }
        }
        if delivery.pending.is_empty() {
            return Direct::Written;
        }
        match outbox.writer.try_send_all(&mut delivery.pending) {
            TrySend::Sent => {
                outbox.count_sent(delivery);
                Direct::Written
            }
            // The reader thread is writing (a pong): the frames wait in
            // `pending`, for the subscriber thread.
            TrySend::Busy => Direct::Unfinished,
            TrySend::Blocked => {
                outbox.count_sent(delivery);
                state.unfinished = true;
                Direct::Unfinished
            }
            TrySend::Failed(e) => {
                state.failed = Some(Ending::from_write_error(&e));
                Direct::Unfinished
            }
        }
    }
}
