//! A chat connection once started: what its reader thread runs, and the
//! guards that end it in order.
//!
//! * [`SubscriberThread`]: the running subscriber thread. Dropping it stops
//!   the thread (its subscription is cancelled) and joins it.
//! * [`Membership`]: the client's place on the room's member list. Dropping
//!   it takes the client off and tells the room it left.
//! * [`Open`]: counts the connection in `threadchat_connections_open`.
//!
//! [`Chat::run`] reads until the connection ends, then [`Chat::leave`]
//! drops them in that order: first the subscriber thread (so nothing more is
//! written), then the socket, then the member list and the room's notice.

use std::net::Shutdown;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};

use super::announce;
use super::conn::{Conn, Ending, SessionError};
use super::context::Context;
use super::outbox::{Outbox, Start, Welcomed};
use super::reader::{self, ChatHandler};
use super::socket::{self, Writer};
use super::subscriber;
use crate::broker::{BrokerError, Subscription};
use crate::protocol::{Kind, Member};

/// A chat connection after its start: welcomed, subscribed, on the list.
pub(super) struct Chat {
    pub(super) conn: Arc<Conn>,
    pub(super) ctx: Arc<Context>,
    pub(super) writer: Arc<Writer>,
    pub(super) reader: socket::ReadSide,
    pub(super) subscriber: SubscriberThread,
    pub(super) membership: Membership,
    pub(super) open: Open,
}

impl Chat {
    /// The reader thread's life: publish what the client says until the
    /// connection ends, then leave. Boxed all along: the reader rests in
    /// `WebSocket::read` for the client's whole life, and its stack must
    /// stay within two pages (the chat itself is several hundred bytes).
    pub(super) fn run(mut self: Box<Self>) {
        let ending = self.read_until_the_end();
        self.conn.end(ending);
        self.leave();
    }

    /// Reads and publishes until the connection ends; returns why it ended.
    fn read_until_the_end(&mut self) -> Ending {
        let Chat {
            conn,
            ctx,
            writer,
            reader,
            membership,
            ..
        } = self;
        let (conn, ctx, writer) = (&*conn, &*ctx, &*writer);
        // A panic here (in the handler's making, the read loop, or the
        // last answers' collection) must not skip `leave` (which joins the
        // subscriber thread): catch it, record it, close with 1011.
        panic::catch_unwind(AssertUnwindSafe(|| {
            let mut handler = ChatHandler::new(&membership.member, conn, ctx);
            let ending = reader::read_loop(reader, writer, conn, ctx, &mut handler);
            handler.finish();
            ending
        }))
        .unwrap_or_else(|_| {
            // Counted, logged, and the client told (1011) through `writer`,
            // which the connection holds since its upgrade.
            conn.panicked(&ctx.metrics, "reader");
            Ending::Panicked
        })
    }

    /// Ends the chat: stops the subscriber thread, closes the socket, takes
    /// the client off the member list and tells the room why it left. Never
    /// inlined: its locals would otherwise sit in the reader thread's frame
    /// all the while it reads (a resting reader fits in two pages of stack).
    #[inline(never)]
    fn leave(self: Box<Self>) {
        let Chat {
            conn,
            ctx,
            subscriber,
            membership,
            open,
            ..
        } = *self;
        drop(subscriber);
        let _ = conn.stream.shutdown(Shutdown::Both);
        let ending = conn
            .ending()
            .cloned()
            .unwrap_or(Ending::ConnectionLost("?".into()));
        // For the log, once the client has left (and its membership is gone).
        let member = membership.member.clone();
        membership.leave(&ending.leave_text());
        drop(open);
        if let Ending::TooSlow(_) = ending {
            ctx.metrics.slow_client_closes.inc();
            log::warn!(
                "{} ({}) was too slow and was disconnected",
                member.nickname,
                conn.peer
            );
        }
        log::info!(
            "{} left {} ({}): {ending}",
            member.nickname,
            member.room,
            conn.peer
        );
    }
}

/// A connection's subscriber thread, running. Dropping it stops the thread
/// and waits for it.
pub(super) struct SubscriberThread {
    conn: Arc<Conn>,
    handle: Option<JoinHandle<()>>,
    /// Said once subscribed (dropped unsent: the subscription failed); not
    /// kept once heard.
    ready: Option<Receiver<()>>,
    /// The start-up "go", until it is sent (then dropped at once: an idle
    /// connection keeps no channel it no longer needs). Dropped unsent, it
    /// tells the subscriber that the client did not get that far.
    go: Option<Sender<Welcomed>>,
    /// Dropped when the reader stops reading: the subscriber uses it to
    /// wait (bounded) for a close handshake to finish.
    reader_done: Option<Sender<()>>,
}

impl SubscriberThread {
    /// Starts `tc-sub-N`, which runs `subscription` for the client.
    pub(super) fn start(
        conn: &Arc<Conn>,
        ctx: &Arc<Context>,
        member: &Member,
        writer: &Arc<Writer>,
        subscription: Subscription,
    ) -> Result<SubscriberThread, SessionError> {
        // Zero-capacity: each side waits for the other anyway, and a
        // rendezvous channel is a fifth the size of a one-slot one.
        let (ready_tx, ready) = crossbeam_channel::bounded::<()>(0);
        let (go_tx, go) = crossbeam_channel::bounded(0);
        let (reader_done_tx, reader_done) = crossbeam_channel::bounded::<()>(0);
        let outbox = Outbox {
            conn: Arc::clone(conn),
            ctx: Arc::clone(ctx),
            member: member.clone(),
            writer: Arc::clone(writer),
        };
        let start = Start {
            ready: ready_tx,
            go,
        };
        let writers = subscriber::Writers::for_subscription(outbox, &subscription);
        let handle = thread::Builder::new()
            .name(format!("tc-sub-{}", conn.seq))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || subscriber::run(subscription, writers, start, reader_done))
            .map_err(SessionError::Spawn)?;
        Ok(SubscriberThread {
            conn: Arc::clone(conn),
            handle: Some(handle),
            ready: Some(ready),
            go: Some(go_tx),
            reader_done: Some(reader_done_tx),
        })
    }

    /// Waits until the subscription is live. If it never is, the subscriber
    /// thread has recorded why the connection ends.
    pub(super) fn wait_until_subscribed(&mut self) -> Result<(), SessionError> {
        let heard = self.ready.take().map(|ready| ready.recv());
        match heard {
            Some(Ok(())) => Ok(()),
            _ => Err(match self.conn.ending() {
                Some(Ending::RelayFailed(e)) => SessionError::Relay(e.clone()),
                _ => SessionError::Stopped,
            }),
        }
    }

    /// Lets the subscriber deliver the room, skipping what the welcome
    /// sent already.
    pub(super) fn go(&mut self, welcomed: Welcomed) {
        if let Some(go) = self.go.take() {
            let _ = go.send(welcomed);
        }
    }
}

impl Drop for SubscriberThread {
    fn drop(&mut self) {
        // Whoever ended first, make sure the subscriber ends too, then wait.
        self.go = None;
        self.reader_done = None;
        self.conn.cancel_subscription();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join(); // Its panics are caught (and logged) inside.
        }
    }
}

/// A client on its room's member list. Dropping it takes the client off
/// and tells the room it left; [`leave`](Self::leave) says why.
pub(super) struct Membership {
    conn: Arc<Conn>,
    ctx: Arc<Context>,
    /// Who, in which room: the connection keeps no other copy.
    member: Member,
    /// Set once the client has left.
    left: bool,
}

impl Membership {
    /// Puts the client on its room's member list, in the same step as its
    /// join is logged and announced; returns once that is done, with the
    /// id of the event that carried the join if it was a coalesced one
    /// (the client skips it when it arrives: nobody is told of their own
    /// arrival).
    pub(super) fn join(
        conn: &Arc<Conn>,
        ctx: &Arc<Context>,
        member: &Member,
    ) -> Result<(Membership, Option<String>), SessionError> {
        let failed = |e: BrokerError| {
            conn.end(Ending::RelayFailed(e.clone()));
            SessionError::Relay(e)
        };
        ctx.broker
            .enter(&member.room, &conn.id, &member.nickname)
            .map_err(failed)?;
        let mut membership = Membership {
            conn: Arc::clone(conn),
            ctx: Arc::clone(ctx),
            member: member.clone(),
            left: false,
        };
        let joined = announcement(conn, member, Kind::Join, "joined");
        match ctx.announcer.announce_and_wait(joined) {
            Ok(own_join) => Ok((membership, own_join)),
            Err(e) => {
                // Not joined, unless Redis may have done it all the same:
                // then the guard's leave takes the client off again.
                membership.left = !e.is_uncertain();
                if membership.left {
                    ctx.broker.exit(&member.room, &conn.id);
                }
                Err(failed(e))
            }
        }
    }

    /// Leaves, telling the room `text` ("left (timed out)").
    pub(super) fn leave(mut self, text: &str) {
        self.left_with(text);
    }

    fn left_with(&mut self, text: &str) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let Membership {
            conn, ctx, member, ..
        } = &*self;
        ctx.broker.exit(&member.room, &conn.id);
        // Off the member list in the same step as the leave is announced.
        // Best effort: the room may be unreachable, which the client has
        // been told about already.
        ctx.announcer
            .announce(announcement(conn, member, Kind::Leave, text));
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Joined, but the start went no further: the client is gone.
        self.left_with("left (connection lost)");
    }
}

/// Counts an upgraded chat connection in `threadchat_connections_open`
/// for as long as it lives.
pub(super) struct Open(Arc<Context>);

impl Open {
    pub(super) fn count(ctx: &Arc<Context>) -> Open {
        ctx.metrics.connections_open.inc();
        Open(Arc::clone(ctx))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.connections_open.dec();
    }
}

/// What the room is told when this client joins or leaves.
pub(super) fn announcement(
    conn: &Conn,
    member: &Member,
    kind: Kind,
    text: &str,
) -> announce::Announcement {
    announce::Announcement {
        room: member.room.clone(),
        kind,
        nickname: member.nickname.clone(),
        conn: conn.id.clone(),
        text: text.to_owned(),
    }
}
