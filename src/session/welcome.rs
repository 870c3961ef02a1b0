//! What a client gets right after its `101`: the room's recent history,
//! then who is in the room.
//!
//! **History without gap or duplicate.** The subscription is live before the
//! history is read, so a message published around the join is either in the
//! history, or delivered live, or both — never neither. "Both" is removed by
//! message id: [`welcome`] returns the ids it sent, and the subscriber thread
//! skips them when they arrive live. The history is read before the client
//! gets its `101` (in `session::chat`), so whatever anyone sends once the client
//! is connected reaches it as a live message.

use std::collections::HashSet;

use tungstenite::Message;

use super::socket::Writer;
use super::{Conn, Context, Ending};
use crate::broker::BrokerError;
use crate::http::Member;
use crate::protocol::{ChatMessage, PRESENCE_LIST, SERVER_NICKNAME, ServerFrame};

/// Sends the history (marked as such), then a presence frame. Returns the
/// ids of the messages sent from the history. A failed write ends the
/// connection (the reader then finds the socket closed).
pub(super) fn welcome(
    conn: &Conn,
    ctx: &Context,
    member: &Member,
    writer: &Writer,
    history: Result<Vec<Vec<u8>>, BrokerError>,
) -> HashSet<String> {
    let mut from_history = HashSet::new();
    let mut frames = Vec::new();
    match history {
        Ok(history) => {
            for payload in history {
                // Junk in the history was reported when it was published.
                let Ok(msg) = ChatMessage::from_payload(&payload) else {
                    continue;
                };
                if let Some(id) = &msg.id {
                    from_history.insert(id.clone());
                }
                frames.push(ServerFrame::from_event(&msg, true).render(member.format));
            }
        }
        Err(e) => frames.push(
            ServerFrame::notice(&format!("could not load the room's history ({e})"))
                .render(member.format),
        ),
    }
    frames.push(presence(ctx, member));
    match writer.send_all(frames.into_iter().map(Message::text)) {
        // Nobody else writes yet: the subscriber thread waits for "go".
        Ok(()) => writer.release_buffer(),
        Err(e) => conn.end(Ending::from_write_error(&e)),
    }
    from_history
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
