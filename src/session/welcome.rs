//! What a client gets right after its `101`: the room's recent history,
//! then who is in the room.
//!
//! **History without gap or duplicate.** As soon as the client is
//! subscribed, before anything else, the connection takes the history's
//! *mark*: the id of its newest message (`Broker::history_mark`). The
//! welcome then reads the history and sends it up to the mark, no further.
//! Every message up to the mark was in the history; every message after it
//! was published after the subscription was live, so it reaches the client
//! live. A message both sent from the history and delivered live (published
//! between the subscription and the mark) is removed by id: `welcome`
//! returns the ids it sent, and the subscriber thread skips them when they
//! arrive live.
//!
//! **Bounded memory.** A room's history is bounded in bytes
//! (`--history-bytes`). A joiner holds none of it while it waits for its
//! join to be announced (only the mark), and at most [`MAX_WELCOMES`]
//! welcomes read and render a history at once; the others wait their turn.
//! So a join storm into a room whose history is full of the biggest
//! messages costs a few histories of memory at a time, not one per joiner.
//! A turn covers the work only: reading, rendering, and writing what the
//! socket takes at once. What a slow joiner's socket does not take yet waits
//! in that joiner's writer, up to the write timeout, with the turn free for
//! the next joiner — a few clients that never read cannot stop everyone
//! else from joining. Four turns keep both cores busy during a storm; more
//! only spread the storm's freed memory over more of glibc's per-thread
//! arenas, where it stays resident (docs/PERFORMANCE.md, scenario d).

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use tungstenite::Message;

use super::socket::{TrySend, Writer};
use super::{Conn, Context, Ending};
use crate::broker::BrokerError;
use crate::protocol::Member;
use crate::protocol::{ChatMessage, PRESENCE_LIST, SERVER_NICKNAME, ServerFrame};

/// Most welcomes (a history read, rendered, and written as far as the
/// socket takes it at once) under way together.
pub const MAX_WELCOMES: usize = 4;

/// A counting semaphore for welcomes: [`Welcomes::start`] waits for a
/// free place, and the place is freed when its [`Turn`] is dropped.
#[derive(Default)]
pub struct Welcomes {
    under_way: Mutex<usize>,
    freed: Condvar,
}

/// One welcome's place; dropping it lets the next one start.
pub struct Turn<'a>(&'a Welcomes);

impl Welcomes {
    /// Waits until fewer than [`MAX_WELCOMES`] are under way, and takes a
    /// place. Never waits long: a turn covers reading the history,
    /// rendering it and writing what the socket takes at once, never a wait
    /// for a client to read.
    pub fn start(&self) -> Turn<'_> {
        let mut under_way = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        while *under_way >= MAX_WELCOMES {
            under_way = self
                .freed
                .wait(under_way)
                .unwrap_or_else(|p| p.into_inner());
        }
        *under_way += 1;
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.under_way.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// Reads the history and sends it up to `mark` (marked as history), then a
/// presence frame. Returns the ids of the messages sent from the history.
/// A failed write ends the connection (the reader then finds the socket
/// closed).
pub(super) fn welcome(
    conn: &Conn,
    ctx: &Context,
    member: &Member,
    writer: &Writer,
    mark: Result<Option<String>, BrokerError>,
) -> HashSet<String> {
    let presence = presence(ctx, member);
    let (from_history, mut unsent) = {
        // A turn bounds the memory of histories read at once: with nothing
        // to read (an empty history), none is needed.
        let _turn = matches!(mark, Ok(Some(_))).then(|| ctx.welcomes.start());
        let (history, ids, notice) = match mark.and_then(|mark| history(ctx, member, mark)) {
            Ok((history, ids)) => (history, ids, None),
            Err(e) => {
                let text = format!("could not load the room's history ({e})");
                let notice = ServerFrame::notice(&text).render(member.format);
                (Vec::new(), HashSet::new(), Some(Message::text(notice)))
            }
        };
        // Each payload is dropped once its frame is made.
        let mut frames: Vec<Message> = history
            .into_iter()
            .filter_map(|payload| {
                // Junk in the history was reported when it was published.
                let msg = ChatMessage::from_payload(&payload).ok()?;
                let frame = ServerFrame::from_event(&msg, true).render(member.format);
                Some(Message::text(frame))
            })
            .chain(notice)
            .chain([Message::text(presence)])
            .collect();
        // What the socket takes at once. A client that does not read keeps
        // the rest waiting in its writer, not the turn.
        match writer.try_send_all(&mut frames) {
            TrySend::Sent | TrySend::Blocked => {}
            // Nobody else writes yet; if someone did, the frames wait.
            TrySend::Busy => {}
            TrySend::Failed(e) => {
                conn.end(Ending::from_write_error(&e));
                return ids;
            }
        }
        (ids, frames)
    };
    // The rest, blocking (up to the write timeout), with the turn free.
    match writer.send_all(unsent.drain(..)) {
        // Nobody else writes yet: the subscriber thread waits for "go".
        Ok(()) => writer.release_buffer(),
        Err(e) => conn.end(Ending::from_write_error(&e)),
    }
    from_history
}

/// The history up to `mark`, and the ids of its messages. A mark that is
/// no longer in the history (it has moved on since) leaves nothing to
/// send: what came after the mark reaches the client live.
fn history(
    ctx: &Context,
    member: &Member,
    mark: Option<String>,
) -> Result<(Vec<Vec<u8>>, HashSet<String>), BrokerError> {
    /// Only the id: the rest of a payload is skipped, not copied.
    #[derive(serde::Deserialize)]
    struct Id {
        id: Option<String>,
    }
    let Some(mark) = mark else {
        return Ok((Vec::new(), HashSet::new()));
    };
    let mut history = ctx.broker.history(&member.room)?;
    let mut ids = HashSet::new();
    for (at, payload) in history.iter().enumerate() {
        let Ok(Id { id: Some(id) }) = serde_json::from_slice(payload) else {
            continue;
        };
        let last = id == mark;
        ids.insert(id);
        if last {
            history.truncate(at + 1);
            return Ok((history, ids));
        }
    }
    Ok((Vec::new(), HashSet::new()))
}

/// The presence frame: everyone in a small room, a count and some names in
/// a big one.
fn presence(ctx: &Context, member: &Member) -> String {
    let room = &member.room;
    let presence = match ctx.broker.presence(room, PRESENCE_LIST) {
        Ok(presence) => presence,
        Err(e) => {
            return ServerFrame::notice(&format!("could not load who is in {room} ({e})"))
                .render(member.format);
        }
    };
    let names = presence.nicknames.join(", ");
    let text = if presence.count > presence.nicknames.len() {
        format!("in {room}: {} people, among them {names}", presence.count)
    } else {
        format!("in {room}: {names}")
    };
    ServerFrame::Presence {
        nickname: SERVER_NICKNAME,
        message: &text,
        room: room.name(),
        members: &presence.nicknames,
        count: presence.count,
    }
    .render(member.format)
}
