//! A chaos client: one thread that connects to an instance, sends numbered
//! messages (`"{nickname} #{seq}"`) at its own pace, and writes down every
//! frame it receives and every error it is told. When its connection breaks
//! (or the schedule drops it) it reconnects, to the next live instance, with
//! `?since=&epoch=` from the last place it saw.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};

use super::world::Directory;

/// How a chat frame came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum How {
    Live,
    /// Marked `history` (before a join, or after a reconnect the log could
    /// not serve): the client can tell it from news.
    History,
    Recovered,
}

/// What a client saw, in order.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    Chat {
        sender: String,
        seq: u64,
        how: How,
        /// Its `(epoch, offset)`, when the frame had one.
        place: Option<(String, u64)>,
    },
    /// A notice that messages may be missing (or that the relay is lost),
    /// or a `recovery` frame that says it is not complete.
    Loss { at: Instant },
    /// `presence` arrived: from here on the client is in the room.
    Attached { at: Instant },
    /// The connection ended, and why.
    Detached { why: String },
}

/// A message this client sent.
#[derive(Clone, Debug)]
pub(crate) struct Sent {
    pub(crate) seq: u64,
    pub(crate) at: Instant,
    /// Its connection ended (without an error about it) within
    /// [`VERDICT`] of the send: the sender was told nothing either way.
    pub(crate) unanswered: bool,
}

/// How long after a send its connection must stay up for "no error frame"
/// to mean "told delivered" (the server's Redis timeouts are shorter).
pub(crate) const VERDICT: Duration = Duration::from_secs(10);

/// Why the last connection ended.
pub(crate) const END: &str = "end of run";

/// Everything one client did and saw.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) nick: String,
    pub(crate) room: String,
    pub(crate) sent: Vec<Sent>,
    pub(crate) events: Vec<Event>,
    /// Told "not delivered".
    pub(crate) failed: BTreeSet<u64>,
    /// Told "may or may not have been delivered".
    pub(crate) unsure: BTreeSet<u64>,
}

/// What a client thread is given.
pub(crate) struct Plan {
    pub(crate) nick: String,
    pub(crate) room: String,
    pub(crate) home: usize,
    pub(crate) period: Duration,
    pub(crate) directory: Directory,
    /// Set by the schedule: close the socket now and reconnect after
    /// `drop_for`.
    pub(crate) drop_now: Arc<AtomicBool>,
    pub(crate) drop_for: Duration,
    pub(crate) sending: Arc<AtomicBool>,
    pub(crate) running: Arc<AtomicBool>,
}

/// Runs one client until `running` is cleared.
pub(crate) fn run(plan: Plan) -> Record {
    let mut record = Record {
        nick: plan.nick.clone(),
        room: plan.room.clone(),
        sent: Vec::new(),
        events: Vec::new(),
        failed: BTreeSet::new(),
        unsure: BTreeSet::new(),
    };
    let mut place: Option<(u64, String)> = None;
    let mut slot = plan.home;
    let mut seq = 0u64;
    let mut first = true;
    while plan.running.load(Ordering::Relaxed) {
        let Some((at, addr)) = plan.directory.live_from(slot) else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        slot = at;
        let Ok(mut ws) = connect(addr, &plan, place.as_ref()) else {
            // Next time, another instance.
            slot += 1;
            thread::sleep(Duration::from_millis(200));
            continue;
        };
        let connected_at = record.sent.len();
        let why = session(&mut ws, &plan, &mut record, &mut place, &mut seq, first);
        first = false;
        let now = Instant::now();
        let ended = plan.running.load(Ordering::Relaxed);
        for sent in &mut record.sent[connected_at..] {
            if ended && now.duration_since(sent.at) < VERDICT {
                sent.unanswered = true;
            }
        }
        record.events.push(Event::Detached { why });
        if plan.drop_now.swap(false, Ordering::Relaxed) {
            let _ = ws.get_mut().shutdown(std::net::Shutdown::Both);
            thread::sleep(plan.drop_for);
        } else if plan.running.load(Ordering::Relaxed) {
            slot += 1;
            thread::sleep(Duration::from_millis(100));
        } else {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    }
    record
}

fn connect(
    addr: SocketAddr,
    plan: &Plan,
    place: Option<&(u64, String)>,
) -> anyhow::Result<WebSocket<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let mut url = format!("ws://{addr}/chat/{}?room={}", plan.nick, plan.room);
    if let Some((offset, epoch)) = place {
        url.push_str(&format!("&since={offset}&epoch={epoch}"));
    }
    let (ws, _) = tungstenite::client(url, stream).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ws)
}

/// One connection: reads until `presence`, then sends and reads until the
/// connection breaks, the schedule drops it, or the run ends. Returns why
/// it ended.
fn session(
    ws: &mut WebSocket<TcpStream>,
    plan: &Plan,
    record: &mut Record,
    place: &mut Option<(u64, String)>,
    seq: &mut u64,
    first: bool,
) -> String {
    let mut attached = false;
    let mut next_send = Instant::now() + plan.period;
    loop {
        if !plan.running.load(Ordering::Relaxed) {
            return END.into();
        }
        if plan.drop_now.load(Ordering::Relaxed) {
            return "dropped by the schedule".into();
        }
        if attached && plan.sending.load(Ordering::Relaxed) && Instant::now() >= next_send {
            *seq += 1;
            let text = format!("{} #{}", plan.nick, seq);
            if let Err(e) = ws.send(Message::text(text)) {
                *seq -= 1;
                return format!("send failed: {e}");
            }
            record.sent.push(Sent {
                seq: *seq,
                at: Instant::now(),
                unanswered: false,
            });
            next_send += plan.period;
        }
        let _ = ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(if attached {
                20
            } else {
                10_000
            })));
        match ws.read() {
            Ok(Message::Text(text)) => {
                let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                if let (Some(o), Some(e)) = (frame["offset"].as_u64(), frame["epoch"].as_str()) {
                    *place = Some((o, e.to_owned()));
                }
                if frame["type"] == "presence" {
                    attached = true;
                    record.events.push(Event::Attached { at: Instant::now() });
                    continue;
                }
                observe(&frame, record, first && !attached);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && attached => {}
            Err(e) => return format!("{e}"),
        }
    }
}

/// The `(epoch, offset)` of a frame or logged payload, if it has both.
pub(crate) fn place_of(frame: &Value) -> Option<(String, u64)> {
    Some((
        frame["epoch"].as_str()?.to_owned(),
        frame["offset"].as_u64()?,
    ))
}

/// Writes down one frame (a join's history, `before_join`, is not news).
fn observe(frame: &Value, record: &mut Record, before_join: bool) {
    let at = Instant::now();
    let text = frame["message"].as_str().unwrap_or("");
    match frame["type"].as_str().unwrap_or("") {
        "chat" if !before_join => {
            let Some((sender, seq)) = text.rsplit_once(" #") else {
                return;
            };
            let Ok(seq) = seq.parse() else { return };
            let how = if frame["recovered"] == true {
                How::Recovered
            } else if frame["history"] == true {
                How::History
            } else {
                How::Live
            };
            record.events.push(Event::Chat {
                sender: sender.to_owned(),
                seq,
                how,
                place: place_of(frame),
            });
        }
        "notice" if text.contains("missing") || text.contains("lost the chat relay") => {
            record.events.push(Event::Loss { at });
        }
        "recovery" if frame["complete"] != true => {
            record.events.push(Event::Loss { at });
        }
        "error" => {
            if std::env::var_os("CHAOS_TRACE").is_some() {
                eprintln!("{}: error {text}", record.nick);
            }
            told(text, record)
        }
        _ => {}
    }
}

/// An `error` frame about what this client sent: `your message "x #7" was
/// not delivered`, `3 of your messages were not delivered, starting with
/// "x #7"`, or `… may or may not have been delivered`. Of several, only the
/// first is named: those sent after it and not yet answered may be the
/// others or not, so they count as neither told delivered nor not.
fn told(text: &str, record: &mut Record) {
    let Some(quoted) = text.split('"').nth(1) else {
        return;
    };
    let Some(first) = quoted
        .rsplit_once(" #")
        .and_then(|(_, s)| s.parse::<u64>().ok())
    else {
        return;
    };
    let several = text.contains(" of your messages");
    let last = record.sent.last().map_or(first, |s| s.seq);
    if text.contains("may or may not") {
        record.unsure.insert(first);
    } else {
        record.failed.insert(first);
    }
    if several {
        record.unsure.extend(first + 1..=last);
    }
}
