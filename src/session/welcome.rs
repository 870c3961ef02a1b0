//! What a client gets right after its `101`: the room's recent history
//! (or, for a client reconnecting with `?since=`, everything it missed and
//! whether that was everything), then who is in the room.
//!
//! **Without gap or duplicate.** As soon as the client is subscribed,
//! before anything else, the connection takes the room log's *mark*: the
//! place of its newest entry (`Broker::log_end`). The welcome then reads the
//! log and sends it up to the mark, no further. Every entry up to the mark
//! was in the log; every entry after it was published after the
//! subscription was live, so it reaches the client live. What arrives live
//! at or before the mark (published between the subscription and the mark)
//! was sent already: the subscriber thread skips it by its offset.
//!
//! **Recovery.** A client that reconnects with `?since=N&epoch=E` gets every
//! entry after offset `N` — chat messages, joins and leaves, marked
//! `recovered` — if the log still holds them and is the same log: epoch
//! `E`, or an earlier epoch it remembers (Redis failed over or restarted
//! since, see [`Standing`]), then a `recovery` frame that says so, and how
//! many the failover lost, if that is known. Otherwise it gets the latest
//! history and a `recovery` frame that says what could not be recovered:
//! never a silent gap.
//!
//! **Presence.** The presence frame says which offset of the log its list
//! reflects: a join or leave at or before it is already counted.
//!
//! **Bounded memory.** A room's history is bounded in bytes
//! (`--history-bytes`). A joiner holds none of it while it waits for its
//! join to be announced (only the mark), and at most [`MAX_WELCOMES`](super::turns::MAX_WELCOMES)
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

use tungstenite::Message;

use super::conn::{Conn, Ending};
use super::context::Context;
use super::socket::{TrySend, Writer};
use crate::broker::{BrokerError, Log, Mark, Place};
use crate::protocol::{
    ChatMessage, Kind, Member, PRESENCE_LIST, Replay, Resume, SERVER_NICKNAME, ServerFrame,
};

/// Sends the history up to `mark` (or, resuming, what the client missed,
/// and a `recovery` frame), then a presence frame. Returns the mark, for
/// the subscriber thread to skip what was sent already. A failed write ends
/// the connection (the reader then finds the socket closed).
pub(super) fn welcome(
    conn: &Conn,
    ctx: &Context,
    member: &Member,
    writer: &Writer,
    mark: Result<Option<Mark>, BrokerError>,
) -> Option<Place> {
    if ctx.panic_trigger.as_deref() == Some(member.nickname.as_str()) {
        panic!("panic requested by THREADCHAT_TEST_PANIC (start thread)");
    }
    let presence = presence(ctx, member);
    let sent_up_to = mark.as_ref().ok().cloned().flatten().map(|mark| mark.end);
    let mut unsent = {
        // A turn bounds the memory of logs read at once: with nothing to
        // read (no log, or an empty one), none is needed.
        let reads = matches!(&mark, Ok(Some(mark)) if mark.holds_any());
        let _turn = reads.then(|| ctx.welcomes.start());
        let mut frames = match mark.and_then(|mark| replay(ctx, member, mark.as_ref())) {
            Ok(frames) => frames,
            Err(e) => {
                let text = format!("could not load the room's history ({e})");
                let mut frames = vec![ServerFrame::notice(&text).render(member.format)];
                if member.resume.is_some() {
                    let message = "could not recover what you missed: the chat relay failed";
                    frames.push(recovery(member, message, false, None));
                }
                frames.into_iter().map(Message::text).collect()
            }
        };
        frames.push(Message::text(presence));
        // What the socket takes at once. A client that does not read keeps
        // the rest waiting in its writer, not the turn.
        match writer.try_send_all(&mut frames) {
            TrySend::Sent | TrySend::Blocked => {}
            // Nobody else writes yet; if someone did, the frames wait.
            TrySend::Busy | TrySend::Behind => {}
            TrySend::Failed(e) => {
                conn.end(Ending::from_write_error(&e));
                return sent_up_to;
            }
        }
        frames
    };
    // The rest, blocking (up to the write timeout), with the turn free.
    match writer.send_all(unsent.drain(..)) {
        // Nobody else writes yet: the subscriber thread waits for "go".
        Ok(()) => writer.release_buffer(),
        Err(e) => conn.end(Ending::from_write_error(&e)),
    }
    sent_up_to
}

/// The frames of what the log holds up to `mark`: the history's chat
/// messages; or, for a client resuming, every entry after what it has and a
/// `recovery` frame saying whether that was everything.
fn replay(
    ctx: &Context,
    member: &Member,
    mark: Option<&Mark>,
) -> Result<Vec<Message>, BrokerError> {
    let log = match mark {
        // A client resuming from another epoch needs the log's earlier ones.
        Some(mark)
            if mark.holds_any()
                || member
                    .resume
                    .as_ref()
                    .is_some_and(|r| r.epoch != mark.end.epoch) =>
        {
            ctx.broker.log(&member.room)?
        }
        // Nothing to read: what the mark says is all there is to know.
        Some(mark) => Log {
            epoch: Some(mark.end.epoch.clone()),
            first: mark.first,
            entries: Vec::new(),
            earlier: Vec::new(),
        },
        None => Log::default(),
    };
    let mark = mark.map(|mark| &mark.end);
    // Entries up to the mark: what comes after reaches the client live. A
    // log may hold entries of an earlier epoch before those of the mark's
    // (a Redis restarted or failed over, or a cluster moved the room, and
    // the log was kept): they come before the mark. Each payload is
    // dropped once its frame is made.
    let mut in_marks_epoch = false;
    let upto = move |msg: &ChatMessage| match (msg.at(), mark) {
        (Some(at), Some(mark)) if at.epoch == mark.epoch => {
            in_marks_epoch = true;
            at.offset <= mark.offset
        }
        (Some(_), Some(_)) => !in_marks_epoch,
        _ => false,
    };
    let standing = member
        .resume
        .as_ref()
        .map(|resume| standing(&log, mark, resume));
    let entries = log
        .entries
        .into_iter()
        // Junk in the log was reported when it was published.
        .filter_map(|payload| ChatMessage::from_payload(&payload).ok())
        .filter(upto);
    let Some(standing) = standing else {
        return Ok(history(member, entries));
    };
    let why = match standing {
        Standing::In {
            from,
            had_lost,
            lost_after,
        } => {
            let missed: Vec<ChatMessage> = entries
                .filter(|msg| msg.offset.is_some_and(|offset| offset > from))
                .collect();
            let recovered = match missed.len() {
                0 => "you missed nothing".to_owned(),
                1 => "recovered the one message or event you missed".to_owned(),
                n => format!("recovered the {n} messages and events you missed"),
            };
            let complete = had_lost == 0 && lost_after == 0;
            let text = if complete {
                recovered
            } else {
                let recovered = match missed.len() {
                    0 => "nothing after them was sent".to_owned(),
                    1 => "the one message or event sent since is above".to_owned(),
                    n => format!("the {n} messages and events sent since are above"),
                };
                format!(
                    "could not recover everything you missed: {}; {recovered}",
                    lost_in_failover(had_lost, lost_after)
                )
            };
            let mut frames: Vec<Message> = missed
                .iter()
                .map(|msg| ServerFrame::from_event(msg, Replay::Recovered).render(member.format))
                .map(Message::text)
                .collect();
            frames.push(Message::text(recovery(member, &text, complete, mark)));
            return Ok(frames);
        }
        Standing::Unknown => format!(
            "the room's log was reset since ({}); the latest history is above",
            ctx.broker.log_reset_causes()
        ),
        Standing::Ahead => {
            "that offset is not in the room's log; the latest history is above".to_owned()
        }
        Standing::Trimmed => {
            "the room's log no longer reaches back that far; the latest history is above".to_owned()
        }
    };
    let text = format!("could not recover everything you missed: {why}");
    let mut frames = history(member, entries);
    frames.push(Message::text(recovery(member, &text, false, mark)));
    Ok(frames)
}

/// Where a resuming client's place stands in the log read for it, whose
/// end is `mark`.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// Every entry after offset `from` is owed, and the log holds them.
    /// `had_lost`: how many the client had that the log lost; `lost_after`:
    /// how many after its place are known to be lost (both in a failover or
    /// a restart, see `broker::Earlier`).
    In {
        from: u64,
        had_lost: u64,
        lost_after: u64,
    },
    /// The log no longer reaches back to it.
    Trimmed,
    /// Past the log's end.
    Ahead,
    /// In an epoch the log does not know.
    Unknown,
}

fn standing(log: &Log, mark: Option<&Place>, resume: &Resume) -> Standing {
    let Some(mark) = mark.filter(|mark| log.epoch.as_deref() == Some(mark.epoch.as_str())) else {
        return Standing::Unknown;
    };
    let since = resume.since;
    let (from, had_lost, lost_after) = if resume.epoch == mark.epoch {
        if since > mark.offset {
            return Standing::Ahead;
        }
        (since, 0, 0)
    } else {
        // An earlier epoch the log kept: its entries up to where it ended
        // are this log's; places past that were given by a Redis whose
        // writes were lost.
        let Some(earlier) = log.earlier.iter().find(|e| e.epoch == resume.epoch) else {
            return Standing::Unknown;
        };
        let from = since.min(earlier.end);
        let lost_after = earlier
            .seen
            .map_or(0, |seen| seen.saturating_sub(since.max(earlier.end)));
        (from, since - from, lost_after)
    };
    if log.first > from.saturating_add(1) {
        return Standing::Trimmed;
    }
    Standing::In {
        from,
        had_lost,
        lost_after,
    }
}

/// Says what a failover (or a restart from an older copy) lost of a
/// resuming client's messages: `had_lost` it had, `lost_after` after them.
fn lost_in_failover(had_lost: u64, lost_after: u64) -> String {
    let what = "Redis failed over or restarted, and lost";
    let count = |n: u64| match n {
        1 => "1 message or event".to_owned(),
        n => format!("{n} messages and events"),
    };
    match (had_lost, lost_after) {
        (0, after) => format!("{what} {} sent after your last", count(after)),
        (had, 0) => format!(
            "{what} the last {} you had (others never got them); anything sent after \
             them before that is lost too",
            count(had)
        ),
        (had, after) => format!(
            "{what} the last {} you had (others never got them) and {} after them",
            count(had),
            count(after)
        ),
    }
}

/// The chat messages among `entries`, as history frames.
fn history(member: &Member, entries: impl Iterator<Item = ChatMessage>) -> Vec<Message> {
    entries
        .filter(|msg| msg.kind == Kind::Chat)
        .map(|msg| ServerFrame::from_event(&msg, Replay::History).render(member.format))
        .map(Message::text)
        .collect()
}

/// A `recovery` frame.
fn recovery(member: &Member, text: &str, complete: bool, at: Option<&Place>) -> String {
    ServerFrame::Recovery {
        nickname: SERVER_NICKNAME,
        message: text,
        complete,
        offset: at.map(|at| at.offset),
        epoch: at.map(|at| at.epoch.as_str()),
    }
    .render(member.format)
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
        offset: presence.at.as_ref().map(|at| at.offset),
        epoch: presence.at.as_ref().map(|at| at.epoch.as_str()),
    }
    .render(member.format)
}
