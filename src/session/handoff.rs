//! The hand-off: a connection's start and its life run on different threads.
//!
//! Everything a chat connection does only once — read and answer its HTTP
//! request, subscribe, get on the member list, have its join announced, send
//! the `101`, the history and who is in the room — runs on the connection's
//! first thread, `tc-conn-N`. That thread then starts a fresh thread,
//! `tc-read-N`, hands it the connection, and ends. The reader thread first
//! joins the first thread, then reads from the client for the rest of the
//! connection's life.
//!
//! Why not just carry on, on the first thread? Memory, for the whole life of
//! the connection:
//!
//! * A blocked thread keeps every page of stack it ever touched. The start is
//!   the deepest thing a connection does (HTTP parsing, Redis replies, JSON,
//!   starting the subscriber thread), far deeper than a reader resting in
//!   `WebSocket::read`, which fits in two pages.
//! * glibc's `malloc` keeps what a thread frees in a small cache of that
//!   thread's own (the *tcache*), handed back only when the thread exits. The
//!   start frees hundreds of small allocations; kept by the reader, they would
//!   stay cached, unusable by anyone else, for as long as the client stays.
//!
//! When the first thread ends, both go back. An idle connection costs about
//! a quarter less memory, for one more thread start per connection, which
//! makes a connect storm slower (`docs/PERFORMANCE.md` has the numbers).
//!
//! Who joins whom: the accept loop sends the first thread its own
//! [`JoinHandle`]; the first thread passes it to the reader thread it
//! starts, and tells the accept loop the reader's handle. So every thread
//! is joined, the first one as soon as it has ended.
//!
//! Until then a connection has three threads. At most [`MAX_HANDOFFS`]
//! hand-offs are under way at once, so the connection cap
//! (`config::connection_ceiling`) can budget them and a connect storm cannot
//! push the process past the kernel's limits. When that many are under way,
//! or the reader thread cannot be started, the first thread simply stays on
//! as the reader: the same for the client, more memory for the server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

/// Hand-offs that may be under way at once. Each lasts from starting the
/// reader thread until it has joined the first thread: a moment, but when a
/// join storm's announcement lets hundreds of joiners go at once, hundreds
/// of reader threads wait for a core together.
pub const MAX_HANDOFFS: usize = 1024;

/// The stack of a connection's first thread: bigger than every other
/// thread's, on purpose. glibc keeps the stacks of ended threads for reuse,
/// with the pages they touched still resident, and gives one to a new thread
/// that asks for a stack up to 4 times smaller. Five times
/// [`THREAD_STACK_SIZE`](crate::THREAD_STACK_SIZE) means a first thread's deep
/// stack is only ever reused by another first thread, never by a reader or
/// subscriber that would then keep its pages. Only the pages a thread touches
/// are resident; the rest is address space.
pub const FIRST_THREAD_STACK_SIZE: usize = 5 * crate::THREAD_STACK_SIZE;

/// Counts the hand-offs under way, to keep them under [`MAX_HANDOFFS`].
#[derive(Default)]
pub struct Handoffs {
    under_way: Arc<AtomicUsize>,
}

impl Handoffs {
    /// Hands over from the calling thread, whose handle is `caller`, to a
    /// new thread named `name`: the new thread first joins the caller (which
    /// must end right after this returns), then runs `rest(state)`. Returns
    /// the new thread's handle.
    ///
    /// When [`MAX_HANDOFFS`] are under way, or the thread cannot be started,
    /// gives back `caller` and `state`: the caller carries on itself.
    pub fn hand_off<S: Send + 'static>(
        &self,
        name: String,
        caller: JoinHandle<()>,
        state: S,
        rest: impl FnOnce(S) + Send + 'static,
    ) -> Result<JoinHandle<()>, (JoinHandle<()>, S)> {
        let Some(permit) = self.permit() else {
            return Err((caller, state));
        };
        // If the thread cannot be started, `spawn` drops the closure; what it
        // was given must survive that, so the closure takes it from a slot.
        let slot = Arc::new(Mutex::new(Some((caller, state))));
        let taken = Arc::clone(&slot);
        let spawned = thread::Builder::new()
            .name(name)
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                let given = taken.lock().unwrap_or_else(|p| p.into_inner()).take();
                let Some((caller, state)) = given else { return };
                // The caller ends right after handing over. Once it is
                // joined, its stack and its malloc cache are released.
                let _ = caller.join();
                drop(permit);
                rest(state);
            });
        spawned.map_err(|_| {
            let given = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            given.expect("a thread that did not start left what it was given")
        })
    }

    /// A place among the hand-offs under way, if there is one.
    fn permit(&self) -> Option<Permit> {
        let before = self.under_way.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(Arc::clone(&self.under_way));
        (before < MAX_HANDOFFS).then_some(permit)
    }
}

/// A place among the hand-offs under way; given up when dropped.
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn under_way(handoffs: &Handoffs) -> usize {
        handoffs.under_way.load(Ordering::Acquire)
    }

    /// Hands over from a fresh thread that then ends; returns the new
    /// thread's name, or the state given back.
    fn hand_over(handoffs: &Arc<Handoffs>, name: &str, state: u32) -> Result<String, u32> {
        let (caller_tx, caller_rx) = crossbeam_channel::bounded(1);
        let (name_tx, name_rx) = crossbeam_channel::bounded(1);
        let (handoffs2, name) = (Arc::clone(handoffs), name.to_owned());
        let caller = thread::spawn(move || {
            let caller = caller_rx.recv().unwrap();
            let handed = handoffs2.hand_off(name, caller, state, move |_| {
                let _ = name_tx.send(thread::current().name().map(str::to_owned));
            });
            // Given back, the caller's own handle is dropped: nobody joins it
            // (the test does not need to).
            drop(handed);
        });
        caller_tx.send(caller).unwrap();
        match name_rx.recv() {
            Ok(name) => Ok(name.unwrap_or_default()),
            Err(_) => Err(state),
        }
    }

    #[test]
    fn the_new_thread_joins_the_caller_then_runs_the_rest() {
        let handoffs = Arc::new(Handoffs::default());
        assert_eq!(
            hand_over(&handoffs, "tc-read-7", 1).as_deref(),
            Ok("tc-read-7")
        );
        assert_eq!(under_way(&handoffs), 0);
    }

    #[test]
    fn past_the_limit_the_caller_keeps_the_state() {
        let handoffs = Arc::new(Handoffs::default());
        // Fill every place with hand-offs whose callers do not end yet.
        let release = Arc::new(Barrier::new(MAX_HANDOFFS + 1));
        let (handed_tx, handed_rx) = crossbeam_channel::unbounded();
        for n in 0..MAX_HANDOFFS {
            let (handoffs, release, handed_tx) = (
                Arc::clone(&handoffs),
                Arc::clone(&release),
                handed_tx.clone(),
            );
            let (caller_tx, caller_rx) = crossbeam_channel::bounded(1);
            let caller = thread::spawn(move || {
                let caller = caller_rx.recv().unwrap();
                let reader = handoffs.hand_off(format!("tc-read-{n}"), caller, (), |()| {});
                let _ = handed_tx.send(reader.is_ok());
                release.wait();
            });
            caller_tx.send(caller).unwrap();
        }
        assert!(handed_rx.iter().take(MAX_HANDOFFS).all(|handed| handed));
        assert_eq!(hand_over(&handoffs, "tc-read-x", 42), Err(42));
        release.wait();
        // Once those callers are joined, there is room again.
        while under_way(&handoffs) > 0 {
            thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            hand_over(&handoffs, "tc-read-y", 1).as_deref(),
            Ok("tc-read-y")
        );
    }
}
