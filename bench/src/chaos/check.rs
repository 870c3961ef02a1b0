//! The checker: from what every client sent, was told and received, and
//! from each room's log as Redis holds it at the end, counts per fault what
//! went wrong. Every message is counted against the fault whose window
//! (plus [`SETTLE`]) holds its send, or against "calm".
//!
//! * duplicate: a client got a message twice (a frame marked `history`,
//!   which a client can tell from news, is not counted);
//! * order: a client got a sender's message after a later one of hers;
//! * silent loss: a message in the log, or sent without an error and with
//!   the connection up long enough to have been told one, that a client in
//!   the room since before it never got, and was never told about (no loss
//!   notice from [`ANNOUNCE_BEFORE`] before the send to [`ANNOUNCE_AFTER`]
//!   after its fault's end);
//! * announced loss: the same, with such a notice;
//! * reused offset: two different messages delivered (or logged) with the
//!   same `epoch` and `offset` in a room, counted once per extra message
//!   against the fault of the later one;
//! * lie: a sender told nothing (so "delivered") for a message nobody got
//!   and the log does not hold, or told "not delivered" for one somebody
//!   got or the log holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::client::{Event, How, Record};
use super::faults::{SETTLE, Window};
use super::harness::Logged;

/// How early before a send a loss notice may come and still cover it.
pub(crate) const ANNOUNCE_BEFORE: Duration = Duration::from_secs(2);
/// How late after its fault's window a loss notice may come.
pub(crate) const ANNOUNCE_AFTER: Duration = Duration::from_secs(10);

/// The counts of one fault (or of the calm spells).
#[derive(Default, Clone)]
pub(crate) struct Counts {
    pub(crate) injected: usize,
    pub(crate) sent: usize,
    pub(crate) expected: usize,
    pub(crate) duplicates: usize,
    pub(crate) order: usize,
    pub(crate) silent: usize,
    pub(crate) announced: usize,
    pub(crate) lies: usize,
    pub(crate) reused: usize,
}

impl Counts {
    pub(crate) const HEADER: &str = "| fault | injected | sent | deliveries due | duplicates | order violations | silent losses | announced losses | senders misled | reused offsets |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

    pub(crate) fn row(&self, name: &str) -> String {
        format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.injected,
            self.sent,
            self.expected,
            self.duplicates,
            self.order,
            self.silent,
            self.announced,
            self.lies,
            self.reused
        )
    }
}

/// The verdict: counts per fault name (`calm` for none), and the first
/// thing that went wrong in the order of sends, in words.
pub(crate) struct Verdict {
    pub(crate) counts: BTreeMap<String, Counts>,
    pub(crate) first_divergence: Option<(Instant, String)>,
    /// The same for the first announced loss.
    pub(crate) first_announced: Option<(Instant, String)>,
}

impl Verdict {
    fn note(slot: &mut Option<(Instant, String)>, at: Instant, what: impl FnOnce() -> String) {
        if slot.as_ref().is_none_or(|(t, _)| at < *t) {
            *slot = Some((at, what()));
        }
    }
}

struct Msg {
    at: Instant,
    fault: Option<usize>,
    failed: bool,
    /// Told "delivered": no error, and the connection stayed up long enough.
    told_delivered: bool,
    logged: bool,
    got_by: usize,
}

pub(crate) fn check(
    records: &[Record],
    windows: &[Window],
    logs: &HashMap<String, Vec<Logged>>,
    start: Instant,
) -> Verdict {
    let mut verdict = Verdict {
        counts: BTreeMap::new(),
        first_divergence: None,
        first_announced: None,
    };
    for w in windows {
        verdict
            .counts
            .entry(w.fault.name().to_owned())
            .or_default()
            .injected += 1;
    }
    let fault_of = |at: Instant| {
        windows
            .iter()
            .rposition(|w| w.start <= at && at <= w.end + SETTLE)
    };
    let name_of = |fault: Option<usize>| {
        fault.map_or("calm".to_owned(), |i| windows[i].fault.name().to_owned())
    };
    let secs = |at: Instant| at.duration_since(start).as_secs_f64();

    // Every message, by (room, sender, seq).
    let mut msgs: HashMap<(&str, &str, u64), Msg> = HashMap::new();
    for r in records {
        for s in &r.sent {
            let failed = r.failed.contains(&s.seq);
            let unsure = r.unsure.contains(&s.seq);
            msgs.insert(
                (&r.room, &r.nick, s.seq),
                Msg {
                    at: s.at,
                    fault: fault_of(s.at),
                    failed,
                    told_delivered: !failed && !unsure && !s.unanswered,
                    logged: false,
                    got_by: 0,
                },
            );
            verdict
                .counts
                .entry(name_of(fault_of(s.at)))
                .or_default()
                .sent += 1;
        }
    }
    for (room, logged) in logs {
        for l in logged {
            if let Some(m) = msgs.get_mut(&(room.as_str(), l.sender.as_str(), l.seq)) {
                m.logged = true;
            }
        }
    }

    for r in records {
        let Some(joined) = r.events.iter().find_map(|e| match e {
            Event::Attached { at, .. } => Some(*at),
            _ => None,
        }) else {
            continue;
        };
        let losses: Vec<Instant> = r
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Loss { at, .. } => Some(*at),
                _ => None,
            })
            .collect();
        let mut got: HashMap<(&str, u64), usize> = HashMap::new();
        let mut highest: HashMap<&str, u64> = HashMap::new();
        for e in &r.events {
            let Event::Chat {
                sender, seq, how, ..
            } = e
            else {
                continue;
            };
            if *sender == r.nick {
                continue;
            }
            let times = got.entry((sender.as_str(), *seq)).or_default();
            *times += 1;
            let Some(m) = msgs.get_mut(&(r.room.as_str(), sender.as_str(), *seq)) else {
                continue;
            };
            if *times == 1 {
                m.got_by += 1;
            }
            if *how == How::History {
                continue;
            }
            let name = name_of(m.fault);
            let at = m.at;
            if *times > 1 {
                verdict.counts.entry(name.clone()).or_default().duplicates += 1;
                Verdict::note(&mut verdict.first_divergence, at, || {
                    format!(
                        "{} got {sender} #{seq} twice (sent at {:.1} s, {name})",
                        r.nick,
                        secs(at)
                    )
                });
            }
            let top = highest.entry(sender.as_str()).or_default();
            if *seq < *top {
                verdict.counts.entry(name.clone()).or_default().order += 1;
                Verdict::note(&mut verdict.first_divergence, at, || {
                    format!(
                        "{} got {sender} #{seq} after #{top} (sent at {:.1} s, {name})",
                        r.nick,
                        secs(at)
                    )
                });
            }
            *top = (*top).max(*seq);
        }
        // What this client should have got: every message of the others in
        // its room, sent after it first joined, that the log holds or whose
        // sender was told it went out.
        for (&(room, sender, seq), m) in &msgs {
            if room != r.room || sender == r.nick || m.at <= joined {
                continue;
            }
            if !(m.logged || m.told_delivered) {
                continue;
            }
            let name = name_of(m.fault);
            let counts = verdict.counts.entry(name.clone()).or_default();
            counts.expected += 1;
            if got.contains_key(&(sender, seq)) {
                continue;
            }
            let until = m.fault.map_or(m.at, |i| windows[i].end + SETTLE) + ANNOUNCE_AFTER;
            let told = losses
                .iter()
                .any(|&l| l + ANNOUNCE_BEFORE >= m.at && l <= until);
            let what = || {
                format!(
                    "{} never got {sender} #{seq} (room {room}, sent at {:.1} s, {name}{}{})",
                    r.nick,
                    secs(m.at),
                    if m.logged {
                        ", in the log"
                    } else {
                        ", not in the log"
                    },
                    if m.told_delivered {
                        ", sender told nothing"
                    } else {
                        ""
                    }
                )
            };
            if told {
                counts.announced += 1;
                Verdict::note(&mut verdict.first_announced, m.at, what);
            } else {
                counts.silent += 1;
                Verdict::note(&mut verdict.first_divergence, m.at, what);
            }
        }
    }

    reused(records, logs, &msgs, &mut verdict, &name_of, &secs);

    for (&(room, sender, seq), m) in &msgs {
        let lie = (m.told_delivered && !m.logged && m.got_by == 0)
            || (m.failed && (m.logged || m.got_by > 0));
        if lie {
            let name = name_of(m.fault);
            verdict.counts.entry(name.clone()).or_default().lies += 1;
            Verdict::note(&mut verdict.first_divergence, m.at, || {
                let mut s = format!(
                    "{sender} #{seq} (room {room}, sent at {:.1} s, {name}): ",
                    secs(m.at)
                );
                let _ = if m.failed {
                    write!(s, "told not delivered, but delivered or logged")
                } else {
                    write!(s, "told nothing, but nobody got it and the log lacks it")
                };
                s
            });
        }
    }
    verdict
}

/// Every place (room, epoch, offset) and the messages seen or logged at
/// it: more than one is a reused offset.
fn reused(
    records: &[Record],
    logs: &HashMap<String, Vec<Logged>>,
    msgs: &HashMap<(&str, &str, u64), Msg>,
    verdict: &mut Verdict,
    name_of: &impl Fn(Option<usize>) -> String,
    secs: &impl Fn(Instant) -> f64,
) {
    // (room, epoch, offset) -> the (sender, seq) of each message there.
    type Place<'a> = (&'a str, &'a str, u64);
    let mut places: BTreeMap<Place, BTreeSet<(&str, u64)>> = BTreeMap::new();
    for r in records {
        for e in &r.events {
            if let Event::Chat {
                sender,
                seq,
                place: Some((epoch, offset)),
                ..
            } = e
            {
                places
                    .entry((&r.room, epoch, *offset))
                    .or_default()
                    .insert((sender, *seq));
            }
        }
    }
    for (room, logged) in logs {
        for l in logged {
            if let Some((epoch, offset)) = &l.place {
                places
                    .entry((room, epoch, *offset))
                    .or_default()
                    .insert((&l.sender, l.seq));
            }
        }
    }
    for ((room, epoch, offset), at_place) in places {
        if at_place.len() < 2 {
            continue;
        }
        let sent: Vec<(Instant, Option<usize>)> = at_place
            .iter()
            .filter_map(|&(sender, seq)| msgs.get(&(room, sender, seq)))
            .map(|m| (m.at, m.fault))
            .collect();
        let Some(&(at, fault)) = sent.iter().max_by_key(|(at, _)| *at) else {
            continue;
        };
        let name = name_of(fault);
        verdict.counts.entry(name.clone()).or_default().reused += at_place.len() - 1;
        Verdict::note(&mut verdict.first_divergence, at, || {
            let which: Vec<String> = at_place
                .iter()
                .map(|(sender, seq)| format!("{sender} #{seq}"))
                .collect();
            format!(
                "room {room} offset {offset} of epoch {epoch} given to {} (the last sent at {:.1} s, {name})",
                which.join(" and "),
                secs(at)
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::client::Sent;

    /// A client in room `chaos0` that sent `seq` 1 and got `got`.
    fn client(nick: &str, got: Vec<Event>, start: Instant) -> Record {
        let mut events = vec![Event::Attached { at: start }];
        events.extend(got);
        Record {
            nick: nick.into(),
            room: "chaos0".into(),
            sent: vec![Sent {
                seq: 1,
                at: start + Duration::from_secs(1),
                unanswered: false,
            }],
            events,
            failed: BTreeSet::new(),
            unsure: BTreeSet::new(),
        }
    }

    fn chat(sender: &str, offset: u64) -> Event {
        Event::Chat {
            sender: sender.into(),
            seq: 1,
            how: How::Live,
            place: Some(("e1".into(), offset)),
        }
    }

    /// Two messages given offset 6 of one epoch (as a failover to a replica
    /// that lacked the first might) are one reused offset; the same message
    /// seen at its offset by everybody is none.
    #[test]
    fn two_messages_at_one_place_are_a_reused_offset() {
        let start = Instant::now();
        let records = vec![
            client("a", vec![chat("b", 5), chat("c", 6)], start),
            client("b", vec![chat("a", 4), chat("c", 6)], start),
            client("c", vec![chat("a", 4), chat("b", 6)], start),
        ];
        let verdict = check(&records, &[], &HashMap::new(), start);
        assert_eq!(verdict.counts["calm"].reused, 1);
        let first = verdict.first_divergence.expect("a divergence").1;
        assert!(first.contains("offset 6"), "{first}");
    }
}
