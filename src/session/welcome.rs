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
//! between the subscription and the mark) is removed by id: [`welcome`]
//! returns the ids it sent, and the subscriber thread skips them when they
//! arrive live.
//!
//! **Bounded memory.** A room's history is bounded in bytes
//! (`--history-bytes`). A joiner holds none of it while it waits for its
//! join to be announced (only the mark), and at most [`MAX_WELCOMES`]
//! welcomes read and send a history at once; the others wait their turn.
//! So a join storm into a room whose history is full of the biggest
//! messages costs at most `MAX_WELCOMES` histories of memory, not one per
//! joiner. The history's frames go to the writer one at a time, and the
//! writer writes them out every few KiB.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use tungstenite::Message;

use super::socket::Writer;
use super::{Conn, Context, Ending};
use crate::broker::BrokerError;
use crate::http::Member;
use crate::protocol::{ChatMessage, PRESENCE_LIST, SERVER_NICKNAME, ServerFrame};

/// Most welcomes (history read and sent) under way at once.
pub const MAX_WELCOMES: usize = 16;

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
    /// place. Never waits long: a welcome that takes longer than the write
    /// timeout fails.
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
    let _turn = ctx.welcomes.start();
    let (frames, from_history) = match mark.and_then(|mark| history_frames(ctx, member, mark)) {
        Ok(history) => history,
        Err(e) => {
            let text = format!("could not load the room's history ({e})");
            let notice = ServerFrame::notice(&text).render(member.format);
            (vec![Message::text(notice)], HashSet::new())
        }
    };
    let frames = frames.into_iter().chain([Message::text(presence)]);
    match writer.send_all(frames) {
        // Nobody else writes yet: the subscriber thread waits for "go".
        Ok(()) => writer.release_buffer(),
        Err(e) => conn.end(Ending::from_write_error(&e)),
    }
    from_history
}

/// The history's frames up to `mark`, and the ids they carry. A mark that
/// is no longer in the history (it has moved on since) leaves nothing to
/// send: what came after the mark reaches the client live.
fn history_frames(
    ctx: &Context,
    member: &Member,
    mark: Option<String>,
) -> Result<(Vec<Message>, HashSet<String>), BrokerError> {
    let Some(mark) = mark else {
        return Ok((Vec::new(), HashSet::new()));
    };
    let mut frames = Vec::new();
    let mut ids = HashSet::new();
    // Each payload is dropped once its frame is made.
    for payload in ctx.broker.history(&member.room)? {
        // Junk in the history was reported when it was published.
        let Ok(msg) = ChatMessage::from_payload(&payload) else {
            continue;
        };
        drop(payload);
        frames.push(Message::text(
            ServerFrame::from_event(&msg, true).render(member.format),
        ));
        let Some(id) = msg.id else { continue };
        let last = id == mark;
        ids.insert(id);
        if last {
            return Ok((frames, ids));
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
