//! Connections refused before they are served, counted and logged without
//! letting the log become the attack: one host opening connections as fast
//! as it can is refused tens of thousands of times a second, and a warning
//! for each would write megabytes a second.
//!
//! Every refusal is counted in `/metrics`
//! (`threadchat_connections_refused_total{reason="…"}`). The log gets the
//! first refusal of a reason at once, then at most one line per reason
//! every [`LOG_EVERY`], summing up the refusals since the last line
//! ("refused 3214 connection(s) in the last 10 s: …"). Refusals after the
//! last line of a burst are in the metric, and in the next line if the
//! reason comes back.
//!
//! **Held refusals.** A client refused for its address's caps that
//! reconnects at once would be refused again at once, as fast as it can
//! reconnect, and the accept loop would spend its time on it while the
//! kernel queues everyone else's connections behind. So such a connection
//! is [`Held`]: kept open, unread, without a thread, and answered its 503
//! [`HOLD`] later. Its client waits instead of reconnecting. At most
//! [`MAX_HELD`] are held, and never more than the connections the server
//! has room for (each takes a file descriptor a connection could use);
//! past that, refusals are answered at once.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::http;
use crate::metrics::{Metrics, RefusalLabels};

/// At most one log line per reason this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a connection was refused before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` connections are open.
    ServerFull,
    /// The client's address holds `--max-connections-per-ip`.
    PerAddress,
    /// The client's address has `--max-starting-per-ip` connections that
    /// have not sent their request head yet.
    StartingPerAddress,
    /// With tokens, the user holds `--max-connections-per-user`.
    PerUser,
    /// No thread could be started for the connection.
    NoThread,
    /// The chat relay could not subscribe it (Redis is down, or has no
    /// room for another subscription): while Redis is away, every client
    /// that tries, and every page that retries, is one.
    RelayDown,
    /// With tokens: none, or one that is invalid, expired, or does not
    /// give the nickname or room (401, 403).
    Token,
    /// A chat request that cannot be served as asked: an invalid nickname
    /// or room, a malformed `since` (400).
    BadRequest,
}

const ALL: [Refusal; 8] = [
    Refusal::ServerFull,
    Refusal::PerAddress,
    Refusal::StartingPerAddress,
    Refusal::PerUser,
    Refusal::NoThread,
    Refusal::RelayDown,
    Refusal::Token,
    Refusal::BadRequest,
];

impl Refusal {
    /// Whether the refused connection is [`Held`] before its answer: a
    /// refusal for the client's own address, which it could otherwise
    /// turn into a flood by reconnecting.
    pub fn is_held(self) -> bool {
        matches!(self, Refusal::PerAddress | Refusal::StartingPerAddress)
    }

    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::PerAddress => "per_address",
            Refusal::StartingPerAddress => "starting_per_address",
            Refusal::PerUser => "per_user",
            Refusal::NoThread => "no_thread",
            Refusal::RelayDown => "relay_down",
            Refusal::Token => "token",
            Refusal::BadRequest => "bad_request",
        }
    }

    /// For the log: which limit, by its option.
    fn describe(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server full (--max-connections)",
            Refusal::PerAddress => "per-address cap (--max-connections-per-ip)",
            Refusal::StartingPerAddress => {
                "too many connections from one address still starting (--max-starting-per-ip)"
            }
            Refusal::PerUser => "per-user cap (--max-connections-per-user)",
            Refusal::NoThread => "cannot start a thread",
            Refusal::RelayDown => "chat relay unavailable",
            Refusal::Token => "no valid token",
            Refusal::BadRequest => "bad request",
        }
    }
}

/// Counts refusals and writes their summaries to the log.
#[derive(Debug, Default)]
pub struct Refusals {
    tallies: Mutex<[Tally; ALL.len()]>,
}

/// One reason's refusals since its last log line.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// When the last line for this reason was written.
    logged: Option<Instant>,
    /// Refusals since then.
    count: u64,
}

impl Refusals {
    /// Makes every reason appear in `/metrics`, at 0, before any refusal.
    pub fn register(metrics: &Metrics) {
        for reason in ALL {
            let _ = metrics.connections_refused.get_or_create(&RefusalLabels {
                reason: reason.label(),
            });
        }
    }

    /// Counts one refusal of `who` (an address, with whatever the log
    /// should say about it), and logs if this reason is due a line.
    pub fn refused(&self, metrics: &Metrics, reason: Refusal, who: &dyn std::fmt::Display) {
        metrics
            .connections_refused
            .get_or_create(&RefusalLabels {
                reason: reason.label(),
            })
            .inc();
        let now = Instant::now();
        let (count, since) = {
            let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
            let tally = &mut tallies[reason as usize];
            tally.count += 1;
            if tally
                .logged
                .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
            {
                return;
            }
            let since = tally.logged.map(|at| now.duration_since(at));
            let count = std::mem::take(&mut tally.count);
            tally.logged = Some(now);
            (count, since)
        };
        match since {
            // The first of a reason, or the first after a quiet spell.
            Some(since) if count > 1 => log::warn!(
                "refused {count} connections in the last {} s: {} (latest: {who})",
                since.as_secs(),
                reason.describe()
            ),
            _ => log::warn!(
                "refused {who}: {} (more refusals for this reason are summed up every {} s)",
                reason.describe(),
                LOG_EVERY.as_secs()
            ),
        }
    }
}

/// How long a refused connection is held before its 503.
pub const HOLD: Duration = Duration::from_secs(1);
/// Most refused connections held at once.
pub const MAX_HELD: usize = 4096;

/// Refused connections waiting for their answer, oldest first. Owned by the
/// accept loop, which answers them as they come due.
#[derive(Debug)]
pub struct Held {
    queue: VecDeque<(Instant, TcpStream, &'static str)>,
    /// Whether the port speaks TLS (see [`http::refuse_full`]).
    tls: bool,
}

impl Held {
    /// None held yet, on a port that speaks TLS or not.
    pub fn new(tls: bool) -> Held {
        Held {
            queue: VecDeque::new(),
            tls,
        }
    }

    /// Holds `stream`, to be refused with `why` after [`HOLD`], if fewer
    /// than `room` (and [`MAX_HELD`]) are held; otherwise answers it now.
    pub fn refuse(&mut self, stream: TcpStream, why: &'static str, room: usize) {
        if self.queue.len() < room.min(MAX_HELD) {
            self.queue.push_back((Instant::now() + HOLD, stream, why));
        } else {
            http::refuse_full(&stream, why, self.tls);
        }
    }

    /// Answers (and closes) every held connection whose time has come.
    pub fn answer_due(&mut self) {
        let now = Instant::now();
        while self.queue.front().is_some_and(|(due, _, _)| *due <= now) {
            if let Some((_, stream, why)) = self.queue.pop_front() {
                http::refuse_full(&stream, why, self.tls);
            }
        }
    }

    /// Whether any connection is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
