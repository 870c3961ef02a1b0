//! Publishing a room's events in runs: one script call for many messages.
//!
//! **Why.** A publisher thread sends every job waiting on its lane as one
//! pipeline. Redis reads at most 16 KiB of a connection's commands per turn
//! of its event loop, and writes to each subscriber once per turn, after
//! running what it read. One `EVALSHA` per message repeats the script's
//! SHA1, four key names, the log's bounds and the channel with every
//! payload, so a turn holds far fewer messages than plain `PUBLISH`es
//! would: each subscriber thread gets fewer messages per wake-up, and
//! spends more context switches per delivery (the numbers are in "The room
//! log" in `docs/PERFORMANCE.md`).
//!
//! **What.** Consecutive events of one room in a batch become *one* call
//! of `LOG_AND_PUBLISH` (see `scripts.rs`): its head — keys, bounds,
//! channel, a fresh epoch — is sent once, and each event adds only its
//! member change and its payload (about 10 bytes besides the payload). The
//! script takes its offsets with one `HINCRBY`, appends with one `RPUSH` and
//! trims with one `LPOP`, so the Lua work per message is little more than
//! its `PUBLISH`. A run ends at another room's event, at a job of other
//! commands, at [`MAX_RUN`] events or at [`MAX_RUN_BYTES`] of payload.
//!
//! A run is one script, so it has one fate: all its events are logged and
//! published in order, or none is, and each of their senders is told the
//! same. Events are never reordered: a run is only ever made of events that
//! were already next to each other on the lane.
//!
//! **Numbers**: "Where the time goes" in `docs/PERFORMANCE.md` (the room log).

use std::ops::Range;
use std::time::Duration;

use super::keys;
use super::scripts::{LOG_AND_PUBLISH, sha_of};
use super::settings::REPLICA_WAIT;
use crate::broker::api::MemberChange;
use crate::broker::random::{new_epoch, random_u64};
use crate::protocol::Room;

/// Most events in one script call: Redis runs a script without serving
/// anyone else, so a run is kept short.
pub(super) const MAX_RUN: usize = 128;
/// Most payload bytes in one script call (a run that would pass it ends
/// before the event that would, unless that event is the run's first).
pub(super) const MAX_RUN_BYTES: usize = 256 * 1024;

/// What a publisher's job asks of Redis.
pub(super) enum Work {
    /// These commands, as they are.
    Commands(Vec<redis::Cmd>),
    /// Log and publish this event of a room (runs of them share one script
    /// call).
    Event(Event),
}

/// One event of a room, to be logged and published: a chat message, or a
/// join or leave with its change to the member list.
#[derive(Clone)]
pub(super) struct Event {
    pub(super) room: Room,
    pub(super) payload: Vec<u8>,
    pub(super) change: MemberChange,
}

/// What a publisher needs of the broker's settings: how logs are bounded,
/// and whether rooms publish on shard channels (a Redis Cluster).
#[derive(Debug, Clone, Copy)]
pub(super) struct ScriptSettings {
    pub(super) history: usize,
    pub(super) history_bytes: usize,
    pub(super) room_ttl: Duration,
    pub(super) sharded: bool,
    /// Replicas that must confirm a batch's events (see [`Plan::short_of_replicas`]).
    pub(super) wait_replicas: usize,
}

/// Whether a batch is sent for the first time, or again after its
/// connection closed before Redis answered: then Redis may have carried it
/// out already, and the script skips what it finds done (see
/// `scripts::LOG_AND_PUBLISH`, "Sent again, carried out once").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    First,
    Again,
}

/// A batch of jobs laid out as one pipeline, and which of its replies
/// answer each job.
pub(super) struct Plan {
    pub(super) pipeline: redis::Pipeline,
    /// One per job, in the batch's order.
    answers: Vec<Answer>,
    /// The index of the `WAIT` that follows the batch's events, and how
    /// many replicas it asks for.
    wait: Option<(usize, usize)>,
}

/// Where a job's replies are among the pipeline's.
enum Answer {
    /// Its own commands' replies.
    Own(Range<usize>),
    /// The reply of the run it is part of.
    Run(usize),
}

/// The run being built: its room, its command, its size so far.
struct OpenRun<'a> {
    room: &'a Room,
    eval: redis::Cmd,
    events: usize,
    bytes: usize,
}

impl Plan {
    /// Lays out a batch of jobs' work: other commands as they are, runs of
    /// one room's events as one script call each.
    pub(super) fn of<'a>(
        batch: impl Iterator<Item = &'a Work>,
        bounds: &ScriptSettings,
        sent: Sent,
    ) -> Plan {
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors();
        let mut commands = 0;
        let mut answers = Vec::new();
        let mut open: Option<OpenRun> = None;
        let mut has_chat = false;
        for work in batch {
            match work {
                Work::Event(event) => {
                    has_chat |= event.change == MemberChange::None;
                    let fits = open.as_ref().is_some_and(|run| {
                        run.room == &event.room
                            && run.events < MAX_RUN
                            && run.bytes + event.payload.len() <= MAX_RUN_BYTES
                    });
                    if !fits {
                        if let Some(run) = open.take() {
                            pipeline.add_command(run.eval);
                            commands += 1;
                        }
                        open = Some(OpenRun {
                            room: &event.room,
                            eval: head(&event.room, bounds, sent),
                            events: 0,
                            bytes: 0,
                        });
                    }
                    let run = open.as_mut().expect("opened above");
                    add_event(&mut run.eval, event);
                    run.events += 1;
                    run.bytes += event.payload.len();
                    answers.push(Answer::Run(commands));
                }
                Work::Commands(cmds) => {
                    if let Some(run) = open.take() {
                        pipeline.add_command(run.eval);
                        commands += 1;
                    }
                    for cmd in cmds {
                        pipeline.add_command(cmd.clone());
                    }
                    answers.push(Answer::Own(commands..commands + cmds.len()));
                    commands += cmds.len();
                }
            }
        }
        if let Some(run) = open {
            pipeline.add_command(run.eval);
            commands += 1;
        }
        let wait = (bounds.wait_replicas > 0 && has_chat).then(|| {
            pipeline
                .cmd("WAIT")
                .arg(bounds.wait_replicas)
                .arg(REPLICA_WAIT.as_millis() as u64);
            (commands, bounds.wait_replicas)
        });
        Plan {
            pipeline,
            answers,
            wait,
        }
    }

    /// Why the batch's chat messages cannot be called delivered, if its `WAIT`
    /// (`--wait-replicas`) says fewer replicas than asked for have them: a
    /// failover now could lose them, or (a master demoted meanwhile) the
    /// master that took them was no longer the one that counts.
    pub(super) fn short_of_replicas(&self, replies: &[redis::Value]) -> Option<String> {
        let (index, wanted) = self.wait?;
        match replies.get(index) {
            Some(redis::Value::Int(have)) if *have >= wanted as i64 => None,
            Some(redis::Value::Int(have)) => Some(format!(
                "Redis took it, but only {have} of the {wanted} replicas asked for \
                 confirmed it within {} ms: a failover may lose it",
                REPLICA_WAIT.as_millis()
            )),
            Some(redis::Value::ServerError(e)) => Some(format!(
                "Redis took it, but could not say whether its replicas have it ({e})"
            )),
            _ => Some("Redis took it, but did not say whether its replicas have it".into()),
        }
    }

    /// True when there is nothing to send.
    pub(super) fn is_empty(&self) -> bool {
        self.pipeline.cmd_iter().next().is_none()
    }

    /// Each job's replies, in the batch's order, taken from the pipeline's
    /// `replies`.
    pub(super) fn answers<'a>(
        &'a self,
        replies: &'a [redis::Value],
    ) -> impl Iterator<Item = Vec<redis::Value>> + 'a {
        self.answers.iter().map(|answer| match answer {
            Answer::Own(range) => replies.get(range.clone()).unwrap_or_default().to_vec(),
            Answer::Run(index) => replies.get(*index).cloned().into_iter().collect(),
        })
    }
}

/// A script call's head: the room's keys, the bounds, the channel, and an
/// epoch in case the log starts afresh.
fn head(room: &Room, bounds: &ScriptSettings, sent: Sent) -> redis::Cmd {
    let mut eval = redis::cmd("EVALSHA");
    eval.arg(sha_of(LOG_AND_PUBLISH)).arg(4);
    for key in keys::of_script(room) {
        eval.arg(key);
    }
    eval.arg(bounds.history)
        .arg(bounds.history_bytes)
        .arg(bounds.room_ttl.as_millis() as u64)
        .arg(keys::channel(room, bounds.sharded))
        .arg(new_epoch())
        .arg(if bounds.sharded { "sharded" } else { "classic" })
        .arg(new_place_key())
        .arg(match sent {
            Sent::First => "first",
            Sent::Again => "again",
        });
    eval
}

/// One event's arguments: its change, how many connection arguments
/// follow, those, and its payload.
fn add_event(eval: &mut redis::Cmd, event: &Event) {
    match &event.change {
        MemberChange::None => {
            eval.arg("").arg(0);
        }
        MemberChange::Join(joined) => {
            eval.arg("join").arg(joined.len() * 2);
            for (conn, nickname) in joined {
                eval.arg(conn.as_str()).arg(nickname.as_str());
            }
        }
        MemberChange::Leave(left) => {
            eval.arg("leave").arg(left.len());
            for conn in left {
                eval.arg(conn.as_str());
            }
        }
    }
    eval.arg(event.payload.as_slice());
}

/// A secret key for a log epoch that starts (see `scripts::LOG_AND_PUBLISH`):
/// 128 random bits, in hex.
pub(super) fn new_place_key() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}
