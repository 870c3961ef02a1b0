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
use super::outbox::{Chosen, Delivery, Outbox, Start};
use super::socket::TrySend;
use crate::broker::{Direct, DirectSink, Event};
use crate::protocol::{Format, Incoming};
use tungstenite::Message;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

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
        let now = std::time::Instant::now();
        // Frames the subscriber thread queued and has not flushed yet (it
        // handled its last item, and is about to) go first: only with none
        // can the new ones be written as bytes, past the writer's queue.
        if self.outbox.member.format == Format::Json && state.delivery.pending.is_empty() {
            return self.deliver_wire(state, messages, now);
        }
        let (outbox, delivery) = (&self.outbox, &mut state.delivery);
        for incoming in messages {
            if let Err(ending) = outbox.take(delivery, incoming, now) {
                state.failed = Some(ending);
                return Direct::Unfinished;
            }
        }
        if delivery.pending.is_empty() {
            return Direct::Written;
        }
        let sent = outbox.writer.try_send_all(&mut delivery.pending);
        // Busy: the reader thread is writing (a pong); the frames wait in
        // `pending`, for the subscriber thread.
        state.written(outbox, sent).unwrap_or(Direct::Unfinished)
    }
}

impl State {
    /// What a direct write of the chosen frames came to; `None` if nothing
    /// was written (the writer was busy, or holds data nothing may
    /// overtake).
    fn written(&mut self, outbox: &Outbox, sent: TrySend) -> Option<Direct> {
        match sent {
            TrySend::Sent => {
                outbox.count_sent(&mut self.delivery);
                Some(Direct::Written)
            }
            TrySend::Blocked => {
                outbox.count_sent(&mut self.delivery);
                self.unfinished = true;
                Some(Direct::Unfinished)
            }
            TrySend::Failed(e) => {
                self.failed = Some(Ending::from_write_error(&e));
                Some(Direct::Unfinished)
            }
            TrySend::Busy | TrySend::Behind => None,
        }
    }
}

impl Shared {
    /// [`try_deliver`](DirectSink::try_deliver) for a client of JSON frames
    /// (all but `?format=text`): the frames chosen for it, each encoded
    /// once for the whole room ([`Incoming::wire_frame`]), are laid end to
    /// end and written with one `send`, past tungstenite
    /// ([`Writer::try_send_wire`](super::socket::Writer::try_send_wire)).
    /// Per client and message that leaves the choice and a copy: no frame
    /// encoded, no reference counted, no buffer of the client's grown.
    ///
    /// The dispatcher thread keeps the bytes of one client's batch in
    /// [`WIRE`] between clients (a room's dispatchers are few, its clients
    /// many). Where the writer cannot take them now, the frames go into the
    /// client's `pending`, for the subscriber thread, as on the other path.
    fn deliver_wire(
        &self,
        state: &mut State,
        messages: &[Arc<Incoming>],
        now: std::time::Instant,
    ) -> Direct {
        let outbox = &self.outbox;
        WIRE.with_borrow_mut(|scratch| {
            let Scratch { wire, chosen } = scratch;
            wire.clear();
            chosen.clear();
            for (i, incoming) in messages.iter().enumerate() {
                match outbox.choose(&mut state.delivery, incoming, now) {
                    Err(ending) => {
                        state.failed = Some(ending);
                        return Direct::Unfinished;
                    }
                    Ok(Chosen::Skip) => {}
                    Ok(Chosen::Live) => {
                        wire.extend_from_slice(incoming.wire_frame().unwrap_or_default());
                        chosen.push((i, Chosen::Live));
                    }
                    Ok(Chosen::Unplaced) => {
                        if let Some(text) = incoming.frame_without_place(Format::Json) {
                            let frame = Frame::message(text, OpCode::Data(Data::Text), true);
                            // Writing to a `Vec` cannot fail.
                            let _ = frame.format(wire);
                        }
                        chosen.push((i, Chosen::Unplaced));
                    }
                }
            }
            let result = if wire.is_empty() {
                Direct::Written
            } else {
                let sent = outbox.writer.try_send_wire(wire);
                state.written(outbox, sent).unwrap_or_else(|| {
                    // Nothing written: the frames wait in `pending`, for the
                    // subscriber thread, behind what the writer holds.
                    for &(i, how) in chosen.iter() {
                        let incoming = &messages[i];
                        let text = match how {
                            Chosen::Live => incoming.frame(Format::Json),
                            _ => incoming.frame_without_place(Format::Json),
                        };
                        state.delivery.pending.extend(text.map(Message::Text));
                    }
                    Direct::Unfinished
                })
            };
            if wire.capacity() > KEPT_WIRE {
                *wire = Vec::new();
            }
            result
        })
    }
}

/// One client's batch, as bytes, on a dispatching thread (see
/// [`Shared::deliver_wire`]).
#[derive(Default)]
struct Scratch {
    /// The frames, end to end.
    wire: Vec<u8>,
    /// Which of the batch's messages they are, and in which frame.
    chosen: Vec<(usize, Chosen)>,
}

thread_local! {
    static WIRE: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The most a dispatching thread keeps of its scratch between batches
/// (a batch of big messages may need more, once).
const KEPT_WIRE: usize = 256 * 1024;
