//! One client connection, from its HTTP request to its last frame.
//!
//! A chat connection is served by the two threads the design names:
//!
//! ```text
//!   client ──frames──▶ reader thread (tc-read-N) ──publish──▶ broker
//!   client ◀─frames─── subscriber thread (tc-sub-N) ◀─events── broker
//!                both write through the one socket::Writer
//! ```
//!
//! * The **reader thread** ([`chat`], [`reader`]) blocks in
//!   `WebSocket::read`. It publishes what the client says, answers pings,
//!   pings a quiet client, and replies to the client's close.
//! * The **subscriber thread** ([`subscriber`]) blocks in
//!   [`Subscription::run`](crate::broker::Subscription::run) and writes every
//!   chat message from someone else to the client, batching what arrives
//!   together.
//!
//! Before them, a **start thread** (`tc-start-N`, [`start`]) does what a
//! connection does once: it reads the HTTP request, starts the subscriber
//! thread, gets the client on the member list, has the join announced, sends
//! the `101`, the history and who is in the room ([`welcome`]). Then it
//! starts the reader thread and ends; the accept loop, which started it,
//! joins it. Why not read on the start thread? Memory: the start is deep and
//! allocates a lot, a blocked thread keeps every stack page it touched and
//! glibc keeps what a thread frees in that thread's own cache. A thread that
//! ends gives both back (`docs/PERFORMANCE.md`).
//!
//! The threads coordinate through crossbeam channels and one shared
//! [`Conn`]:
//!
//! * `ready` and `go`: the start-up handshake. The subscriber says "ready"
//!   once subscribed; the start thread then sends the `101`, the history and
//!   the presence frame, and says "go" (with the history's message ids). So a
//!   connected client is already subscribed, and no live frame can precede
//!   the `101` or the history.
//! * `reader_done`: dropped when the reader stops reading; the subscriber
//!   uses it to wait (bounded) for a close handshake to finish.
//! * [`Conn::end`]: the first thread to decide *why* the connection ends
//!   records an [`Ending`](conn::Ending); the other thread is then woken — the subscriber by
//!   its [`Canceller`](crate::broker::Canceller), the reader by a close frame
//!   or by shutting the socket down.
//!
//! Whoever ends first, both threads end, the Redis subscription is dropped
//! and the socket is closed ([`chat`]'s guards). `docs/ARCHITECTURE.md`
//! walks through every case.
//!
//! The echo endpoint (`--echo-endpoint`, for the Autobahn conformance suite)
//! runs the same reader code with a handler that sends each message back, on
//! the start thread, and no subscriber thread.
//!
//! Around them: the shared [`Context`] ([`context`]); the admission wing
//! behind its one door ([`admission`]); the router of the HTTP side
//! ([`route`]).

pub mod admission;
pub mod announce;
mod chat;
mod conn;
mod context;
mod direct;
mod junk;
pub mod liveness;
mod members;
mod outbox;
pub mod rate;
mod reader;
mod restored;
mod route;
mod sched;
pub mod socket;
mod start;
mod subscriber;
mod turns;
mod welcome;

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;

pub use conn::{Conn, SessionError};
pub use context::Context;
use reader::EchoHandler;
use start::Started;

/// What a connection's threads tell the accept loop, which joins them.
pub enum Report {
    /// Connection `seq`'s start thread has handed it to this reader thread,
    /// and is ending.
    Reading(u64, JoinHandle<()>),
    /// Connection `seq` is over.
    Done(u64),
}

/// The stack of a start thread: bigger than every other thread's, on
/// purpose. glibc keeps the stacks of ended threads for reuse, with the
/// pages they touched still resident, and gives one to a new thread that
/// asks for a stack up to 4 times smaller. Five times
/// [`THREAD_STACK_SIZE`](crate::THREAD_STACK_SIZE) means a start thread's
/// deep stack is only ever reused by another start thread, never by a
/// reader or subscriber that would then keep its pages. Only touched pages
/// are resident; the rest is address space.
pub const START_STACK_SIZE: usize = 5 * crate::THREAD_STACK_SIZE;

/// The start thread's body (`tc-start-N`): starts the connection and, for
/// a chat, hands the rest to a new reader thread.
pub fn run(conn: Arc<Conn>, ctx: Arc<Context>, reports: Sender<Report>) {
    let started = panic::catch_unwind(AssertUnwindSafe(|| start::start(&conn, &ctx)))
        .unwrap_or_else(|_| {
            conn.panicked(&ctx.metrics, "start");
            Err(SessionError::Panicked)
        });
    let result = match started {
        Ok(Started::Chat(chat)) => {
            let (seq, conn2, reports2) = (conn.seq, Arc::clone(&conn), reports.clone());
            let ctx2 = Arc::clone(&ctx);
            let reader = thread::Builder::new()
                .name(format!("tc-read-{seq}"))
                .stack_size(crate::THREAD_STACK_SIZE)
                .spawn(move || {
                    // The read loop catches its own panics; this catches
                    // the rest of the reader's life (leaving the room).
                    let read = panic::catch_unwind(AssertUnwindSafe(|| chat.run()));
                    let read = read.map_err(|_| {
                        conn2.panicked(&ctx2.metrics, "reader");
                        SessionError::Panicked
                    });
                    finish(&conn2, read, &reports2);
                });
            match reader {
                Ok(reader) => {
                    let _ = reports.send(Report::Reading(seq, reader));
                    return;
                }
                // The chat, dropped with the closure, has ended itself.
                Err(e) => Err(SessionError::Spawn(e)),
            }
        }
        Ok(Started::Echo { writer, mut reader }) => {
            let ending = reader::read_loop(&mut reader, &writer, &conn, &ctx, &mut EchoHandler);
            conn.end(ending);
            Ok(())
        }
        Ok(Started::Done) => Ok(()),
        Err(e) => Err(e),
    };
    finish(&conn, result, &reports);
}

/// The connection is over: the one place its errors are logged. However the
/// session ended, the client sees the socket close now.
fn finish(conn: &Conn, result: Result<(), SessionError>, reports: &Sender<Report>) {
    match result {
        Ok(()) => {}
        Err(e) if e.is_quiet() => log::debug!("{}: {e}", conn.peer),
        Err(e) => log::error!("{} ({}): {e}", conn.peer, conn.id),
    }
    conn.force_close();
    let _ = reports.send(Report::Done(conn.seq));
}
