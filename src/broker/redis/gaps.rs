//! Filling a restored subscription's gap from the room's log: what was
//! published while a subscription was down is in the log, so a listener
//! that subscribes again reads it and delivers what its clients missed,
//! before anything live (see [`Event::Restored`](crate::broker::Event)).
//!
//! **Where it starts.** A listener remembers the places (epoch, offset,
//! tag) of the last few messages it delivered ([`Recent`]), and starts
//! after the furthest of them the log itself holds ([`fill`]). Only the
//! log's own entries match, so a payload anyone published with a made-up
//! place cannot make the fill skip or repeat anything. A log that no
//! longer holds any of them (trimmed meanwhile) is checked with its
//! epoch's key, read with it, and says how much is gone.
//!
//! **No gap, no duplicate.** The log is read only once the new
//! subscription is acknowledged: everything up to the end of that read was
//! in the log, everything after it arrives live. What arrives live at or
//! before that end was delivered from the log already, and is dropped
//! (the same reasoning as a joiner's welcome, `session::welcome`).
//!
//! **One read for many listeners.** With per-client subscriptions every
//! client of a room has its own listener, and a blip restores them all at
//! about the same time. A read is good for every listener whose
//! subscription was acknowledged before the read began, so the first to
//! need one starts it [`GATHER`] later, and those acknowledged meanwhile
//! wait for it instead of reading again ([`Gaps::read`]). Back-off spreads
//! reconnects over seconds, so later listeners need later reads: each
//! reads only what the log gained since the last read ([`EXTEND`]), and
//! parses only that. In shared mode a room has one listener, so one read
//! per room anyway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::coalesce::new_place_key;
use super::job::Route;
use super::keys;
use super::nodes::Nodes;
use super::position::Position;
use super::scripts::REPORT_SEEN;
use super::settings::{CONNECT_TIMEOUT, IO_TIMEOUT};
use crate::broker::Earlier;
use crate::broker::error::BrokerError;
use crate::broker::random::new_epoch;
use crate::broker::subscription::{Gap, Missing};
use crate::protocol::{Incoming, Room};
pub(super) use recent::Recent;

/// How much later than asked for a read of a room's log begins, so that
/// listeners restored at about the same time share it.
const GATHER: Duration = Duration::from_millis(20);

/// How long a finished read is kept for latecomers to find.
const KEEP: Duration = Duration::from_secs(2);

/// The room logs read for restored subscriptions, shared by every listener
/// of a broker.
pub(super) struct Gaps {
    nodes: Arc<dyn Nodes>,
    /// Entries a log keeps (`--history`); with none, it holds nothing and
    /// begins one past its end.
    history: usize,
    /// Per room, the latest read and when it began.
    reads: Mutex<HashMap<Room, Read>>,
    /// Woken when a read is done.
    done: Condvar,
}

struct Read {
    begins: Instant,
    outcome: Option<Result<Arc<LogRead>, BrokerError>>,
    /// A read that succeeded shortly before this one, to extend.
    base: Option<Arc<LogRead>>,
}

/// Reads a log's position and the entries after offset `ARGV[1]`
/// (`KEYS`: the position hash, the log): what a read extends an earlier
/// one with. In one step, so the entries are the position's.
const EXTEND: &str = r#"
local p = redis.call('HGETALL', KEYS[1])
local last = 0
for i = 1, #p, 2 do if p[i] == 'last' then last = tonumber(p[i + 1]) end end
local n = last - tonumber(ARGV[1])
local entries = {}
if n > 0 then entries = redis.call('LRANGE', KEYS[2], -n, -1) end
return {p, entries}
"#;

/// A room's log as read for restored subscriptions: each entry parsed once
/// for all of them.
#[derive(Debug, Default)]
pub(super) struct LogRead {
    /// The log's epoch (`None`: the room has no log).
    pub(super) epoch: Option<String>,
    /// Its epoch's key, which tells its places from forged ones.
    pub(super) key: Option<String>,
    /// The oldest offset it holds.
    pub(super) first: u64,
    /// The offset of its newest entry.
    pub(super) last: u64,
    /// What it holds, oldest first.
    pub(super) entries: Vec<Arc<Incoming>>,
    /// Its earlier epochs, oldest first, with their keys (see
    /// `position.rs`).
    pub(super) earlier: Vec<(Earlier, Option<String>)>,
    /// The furthest lost place reported by the listeners that share this
    /// read: each reports one only if it is further.
    pub(super) reported: AtomicU64,
}

impl Gaps {
    pub(super) fn new(nodes: &Arc<dyn Nodes>, history: usize) -> Gaps {
        Gaps {
            nodes: Arc::clone(nodes),
            history,
            reads: Mutex::default(),
            done: Condvar::new(),
        }
    }

    /// `room`'s log, read after `acked` (when the caller's subscription was
    /// acknowledged): a read that began since is shared, one under way is
    /// waited for, and otherwise one begins [`GATHER`] from now.
    pub(super) fn read(&self, room: &Room, acked: Instant) -> Result<Arc<LogRead>, BrokerError> {
        let begins = {
            let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match reads.get(room) {
                    Some(read) if read.begins >= acked => match &read.outcome {
                        Some(outcome) => return outcome.clone(),
                        // One under way: waited for, unless it is long
                        // overdue (its reader is stuck), then read anew.
                        None if Instant::now() < read.begins + CONNECT_TIMEOUT + IO_TIMEOUT => {
                            reads = self
                                .done
                                .wait_timeout(reads, IO_TIMEOUT)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        None => break,
                    },
                    _ => break,
                }
            }
            let now = Instant::now();
            // A recent read to extend (a later one replaces one under way,
            // whose base is then the latest).
            let base = reads.remove(room).and_then(|read| match read.outcome {
                Some(Ok(log)) if now.saturating_duration_since(read.begins) < KEEP => Some(log),
                Some(_) => None,
                None => read.base,
            });
            reads.retain(|_, read| {
                read.outcome.is_none() || now.saturating_duration_since(read.begins) < KEEP
            });
            let begins = now + GATHER;
            reads.insert(
                room.clone(),
                Read {
                    begins,
                    outcome: None,
                    base: base.clone(),
                },
            );
            (begins, base)
        };
        let (begins, base) = begins;
        std::thread::sleep(begins.saturating_duration_since(Instant::now()));
        let outcome = self.read_now(room, base.as_deref()).map(Arc::new);
        let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(read) = reads.get_mut(room)
            && read.begins == begins
        {
            read.outcome = Some(outcome.clone());
        }
        self.done.notify_all();
        outcome
    }

    /// Reads the log's position, key and entries in one step, on a
    /// connection of its own ([`Gaps::connection`]): only what it gained
    /// since `base`, if that is still the same log, otherwise all of it.
    fn read_now(&self, room: &Room, base: Option<&LogRead>) -> Result<LogRead, BrokerError> {
        let failed = |e: redis::RedisError| BrokerError::Redis(e.to_string());
        let mut con = self.connection(room)?;
        if let Some(base) = base
            && let Some(extended) = self.extend(&mut con, room, base)?
        {
            return Ok(extended);
        }
        let (fields, payloads): (HashMap<String, String>, Vec<Vec<u8>>) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(keys::meta(room))
            .cmd("LRANGE")
            .arg(keys::log(room))
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .map_err(failed)?;
        let position = Position::from_fields(fields);
        let last = position.last.unwrap_or(0);
        let now = Instant::now();
        Ok(LogRead {
            epoch: position.epoch,
            key: position.key,
            first: if self.history > 0 {
                position.first.unwrap_or(1)
            } else {
                last + 1
            },
            last,
            entries: payloads
                .iter()
                .map(|payload| Arc::new(Incoming::parse(payload, now)))
                .collect(),
            earlier: position.earlier,
            reported: AtomicU64::new(0),
        })
    }
}

impl Gaps {
    /// A connection of its own to the node `room` is on, with the usual
    /// timeouts: log reads and reports are rare, and a query thread's queue
    /// is no place to wait out a Redis that is coming back.
    fn connection(&self, room: &Room) -> Result<redis::Connection, BrokerError> {
        let failed = |e: redis::RedisError| BrokerError::Redis(e.to_string());
        let (_, client) = self.nodes.node(&Route::room(room))?;
        let con = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(failed)?;
        con.set_read_timeout(Some(IO_TIMEOUT)).map_err(failed)?;
        con.set_write_timeout(Some(IO_TIMEOUT)).map_err(failed)?;
        Ok(con)
    }

    /// Tells `room`'s log that this instance delivered `offset` of earlier
    /// epoch `epoch`, past where the log kept it (`scripts::REPORT_SEEN`),
    /// unless a listener that shares `log` reported as far. Best effort:
    /// a report that fails leaves the loss's count unknown, and is logged.
    ///
    /// Logged only by the report that noted it: with per-client
    /// subscriptions, every listener of the room (of every instance) may
    /// report the same loss, and one line says it.
    pub(super) fn report_seen(&self, room: &Room, log: &LogRead, (epoch, offset): (&str, u64)) {
        if log.reported.fetch_max(offset, Ordering::Relaxed) >= offset {
            return;
        }
        let report = || -> Result<bool, BrokerError> {
            let failed = |e: redis::RedisError| BrokerError::Redis(e.to_string());
            let mut con = self.connection(room)?;
            let noted = redis::Script::new(REPORT_SEEN)
                .key(keys::meta(room))
                .arg(epoch)
                .arg(offset)
                .arg(new_epoch())
                .arg(new_place_key())
                .invoke::<i64>(&mut con)
                .map_err(failed)?;
            Ok(noted == 1)
        };
        match report() {
            Ok(true) => log::warn!(
                "{room}: Redis lost messages it had published: this instance delivered \
                 offset {offset} of epoch {epoch}, past where the log kept it"
            ),
            Ok(false) => log::debug!("{room}: offset {offset} of epoch {epoch} was reported lost"),
            Err(e) => super::outage::warn_repeated("report-lost", || {
                format!("{room}: could not report offset {offset} of epoch {epoch} lost: {e}")
            }),
        }
    }

    /// `base` and what the log gained since, if it is still the same log
    /// and goes on where `base` ends (`None`: read it all).
    fn extend(
        &self,
        con: &mut redis::Connection,
        room: &Room,
        base: &LogRead,
    ) -> Result<Option<LogRead>, BrokerError> {
        let failed = |e: redis::RedisError| BrokerError::Redis(e.to_string());
        let (fields, payloads): (HashMap<String, String>, Vec<Vec<u8>>) =
            redis::Script::new(EXTEND)
                .key(keys::meta(room))
                .key(keys::log(room))
                .arg(base.last)
                .invoke(con)
                .map_err(failed)?;
        let Position {
            epoch,
            key,
            last,
            earlier,
            ..
        } = Position::from_fields(fields);
        let last = last.unwrap_or(0);
        let now = Instant::now();
        let added: Vec<Arc<Incoming>> = payloads
            .iter()
            .map(|payload| Arc::new(Incoming::parse(payload, now)))
            .collect();
        let offset = |incoming: &Incoming| incoming.message().ok().and_then(|msg| msg.offset);
        let same_log = epoch.is_some() && epoch == base.epoch && key == base.key;
        let goes_on = last >= base.last
            && added.len() as u64 == last - base.last
            && added
                .first()
                .is_none_or(|entry| offset(entry) == Some(base.last + 1));
        if !same_log || !goes_on {
            return Ok(None);
        }
        // What `base` held is kept even if the log dropped it since (it was
        // the log's, and may be just what a listener missed), up to as many
        // entries as a log keeps.
        let mut entries = base.entries.clone();
        entries.extend(added);
        let dropped = entries.len().saturating_sub(self.history);
        entries.drain(..dropped);
        let first = if self.history > 0 {
            base.first + dropped as u64
        } else {
            last + 1
        };
        Ok(Some(LogRead {
            epoch,
            key,
            first,
            last,
            entries,
            earlier,
            reported: AtomicU64::new(0),
        }))
    }
}

/// What a restored listener delivers: the gap's summary, the messages
/// that fill it, and the end of the log read (live messages at or before
/// it in its epoch were among what the log gave).
pub(super) struct Fill {
    pub(super) gap: Gap,
    pub(super) messages: Vec<Arc<Incoming>>,
    pub(super) upto: Option<(String, u64)>,
    /// A place of an earlier epoch, past where that epoch ended, that this
    /// listener delivered (vouched for by the epoch's key): the log is told
    /// (`Gaps::report_seen`), so that everyone learns how much was lost.
    pub(super) seen: Option<(String, u64)>,
}

/// What a listener that delivered up to what `recent` says, and lost its
/// subscription at `lost_at` (Unix ms), must deliver from `log`.
///
/// Where it stopped is found in the log itself: the furthest entry that is
/// one of the places it delivered (same epoch, offset and tag), or else the
/// furthest place its epoch's key vouches for. Everything after it follows,
/// whatever its epoch: a log found under another Redis (a failover, a
/// restart, a room moved on a Cluster) takes a new epoch and keeps its
/// entries, offsets going on. A place in an earlier epoch past where that
/// epoch ended was given by a Redis whose writes were lost: what follows
/// the end is delivered, and the loss announced.
pub(super) fn fill(log: &LogRead, recent: &Recent, lost_at: u64) -> Fill {
    let missing = |count: Option<u64>, why: &'static str| {
        Some(Missing {
            count,
            since: lost_at,
            why,
        })
    };
    let reset = |messages: Vec<Arc<Incoming>>, why| {
        let missing = recent.any().then(|| missing(None, why)).flatten();
        let upto = log.epoch.clone().map(|epoch| (epoch, log.last));
        Fill {
            gap: Gap {
                recovered: messages.len(),
                missing,
            },
            messages,
            upto,
            seen: None,
        }
    };
    let Some(epoch) = log.epoch.as_deref() else {
        // No log at all: nothing was published since it was lost, but what
        // it held and was not delivered is gone.
        return reset(
            Vec::new(),
            "the room's log was lost: Redis was flushed, restarted or failed over",
        );
    };
    let place = |incoming: &Incoming| {
        let msg = incoming.message().ok()?;
        Some((msg.epoch?, msg.offset?))
    };
    let key_of = |e: &str| {
        if e == epoch {
            log.key.as_deref()
        } else {
            let earlier = log.earlier.iter().find(|(earlier, _)| earlier.epoch == e);
            earlier.and_then(|(_, key)| key.as_deref())
        }
    };
    // Where delivery stopped, and the furthest place delivered that the
    // log holds.
    let found = log
        .entries
        .iter()
        .rposition(|entry| recent.holds(entry))
        .and_then(|at| place(&log.entries[at]));
    let stopped = match &found {
        Some((e, offset)) => {
            // Places past it in its epoch (that its key vouches for, when
            // the key is known) were delivered, and the log lost them.
            let past = recent.furthest(e.as_str(), key_of(e.as_str()));
            Some((
                e.as_str().to_owned(),
                past.map_or(*offset, |past| past.max(*offset)),
            ))
        }
        None => std::iter::once((epoch, log.key.as_deref()))
            .chain(
                log.earlier
                    .iter()
                    .rev()
                    .map(|(e, key)| (e.epoch.as_str(), key.as_deref())),
            )
            .find_map(|(e, key)| Some((e.to_owned(), recent.furthest(e, Some(key?))?))),
    };
    let in_epoch =
        |incoming: &&Arc<Incoming>| place(incoming).is_some_and(|(e, _)| e.as_str() == epoch);
    let reset_why = "the room's log was reset: Redis was flushed, restarted or failed over";
    let Some((stopped_epoch, delivered)) = stopped else {
        if recent.any() {
            // Delivered from a log that is gone: everything in this one is new.
            return reset(
                log.entries.iter().filter(in_epoch).cloned().collect(),
                reset_why,
            );
        }
        // Nothing placed was delivered yet: where to begin is not known.
        let mut fill = reset(Vec::new(), "");
        fill.gap.missing = missing(None, "where its delivery stood was not known yet");
        return fill;
    };
    let (from, had_lost, lost_after) = if stopped_epoch == epoch {
        if delivered > log.last {
            // The log is behind what was delivered from it: it lost entries
            // (a Redis restarted from an older copy, or a replica promoted,
            // that nobody wrote to since). Reported, the epoch ends there.
            let mut fill = fill_from(log, log.last, delivered - log.last, 0, missing);
            fill.seen = log
                .key
                .as_deref()
                .and_then(|key| recent.furthest(epoch, Some(key)))
                .filter(|offset| *offset > log.last)
                .map(|offset| (epoch.to_owned(), offset));
            return fill;
        }
        (delivered, 0, 0)
    } else {
        let Some(i) = log
            .earlier
            .iter()
            .position(|(e, _)| e.epoch == stopped_epoch)
        else {
            // An epoch the log does not remember (one written before
            // earlier epochs were kept): an entry found is a place in it.
            let Some((_, found)) = found else {
                return reset(
                    log.entries.iter().filter(in_epoch).cloned().collect(),
                    reset_why,
                );
            };
            return fill_from(log, found, delivered - found, 0, missing);
        };
        let earlier = &log.earlier[i].0;
        let from = delivered.min(earlier.end);
        let after_own = earlier
            .seen
            .map_or(0, |seen| seen.saturating_sub(delivered.max(earlier.end)));
        let after_later: u64 = log.earlier[i + 1..].iter().map(|(e, _)| e.lost()).sum();
        (from, delivered - from, after_own + after_later)
    };
    let mut fill = fill_from(log, from, had_lost, lost_after, missing);
    fill.seen = key_of(&stopped_epoch)
        .filter(|_| had_lost > 0)
        .and_then(|key| recent.furthest(&stopped_epoch, Some(key)))
        .filter(|offset| *offset > from)
        .map(|offset| (stopped_epoch.clone(), offset));
    fill
}

/// Everything in `log` after offset `from`, and what is missing: `had_lost`
/// delivered places the log lost, `lost_after` lost after them (known
/// from earlier epochs), and what the log no longer reaches back to.
fn fill_from(
    log: &LogRead,
    from: u64,
    had_lost: u64,
    lost_after: u64,
    missing: impl Fn(Option<u64>, &'static str) -> Option<Missing>,
) -> Fill {
    let offset = |incoming: &Arc<Incoming>| incoming.message().ok().and_then(|msg| msg.offset);
    let messages: Vec<Arc<Incoming>> = log
        .entries
        .iter()
        .filter(|incoming| offset(incoming).is_some_and(|offset| offset > from))
        .cloned()
        .collect();
    let gone = log.first.saturating_sub(from + 1);
    let missing = if had_lost > 0 {
        missing(
            None,
            "Redis failed over or restarted and lost its newest messages and events, \
             some of which you got; any sent after them are lost too",
        )
    } else if lost_after > 0 {
        missing(
            Some(gone + lost_after),
            "Redis failed over or restarted and lost them: they were never replicated",
        )
    } else if gone > 0 {
        missing(Some(gone), "the room's log no longer reaches back that far")
    } else {
        None
    };
    Fill {
        gap: Gap {
            recovered: messages.len(),
            missing,
        },
        messages,
        upto: log.epoch.clone().map(|epoch| (epoch, log.last)),
        seen: None,
    }
}

mod recent;
#[cfg(test)]
mod tests;
