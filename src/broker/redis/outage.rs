//! What the log says while Redis is away: one line when the relay is lost,
//! one when it is back, and repeated failures in between summed up.
//!
//! An instance may hold thousands of subscriptions (one per client, with
//! per-client subscriptions), and each notices a lost Redis on its own;
//! publishers and the heartbeat fail every batch and every beat. Logged one
//! by one, an outage of a minute filled the log with hundreds of lines of
//! the same error. So:
//!
//! * [`Outage`] counts the subscriptions that are down. The first one lost
//!   logs "lost the chat relay"; when the last one is restored, one line
//!   says how long the relay was gone and how many subscriptions came back.
//! * [`Repeats`] lets a cause log at most once per [`EVERY`], with how many
//!   times it happened since the last line; the heartbeat says the count
//!   of a burst that went quiet ([`flush_repeated`]).
//!
//! Every line fits in [`LONGEST`] characters, the error it quotes cut to
//! make room: errors from a Sentinel or a Cluster can quote a whole
//! topology, and a line an operator cannot read at a glance is not read.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::metrics::Metrics;

/// Most one cause logs, with a count of what it kept quiet.
pub(super) const EVERY: Duration = Duration::from_secs(10);

/// Longest line these write (characters, before the time and level the
/// logger adds): with them, under 200.
pub(super) const LONGEST: usize = 180;

/// The subscriptions of this instance that are down (see the module doc).
pub(super) struct Outage {
    count: Mutex<Count>,
    /// Told when the relay is back, so that the heartbeat beats at once
    /// (see [`Outage::relay_back`]).
    back: (Sender<()>, Receiver<()>),
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            count: Mutex::default(),
            // One is enough: a beat soon after serves every return.
            back: crossbeam_channel::bounded(1),
        }
    }
}

#[derive(Default)]
struct Count {
    /// Subscriptions lost and not yet restored, or gone.
    now: usize,
    /// When the first of them was lost.
    since: Option<Instant>,
    /// Subscriptions restored since then.
    restored: usize,
}

impl Outage {
    fn lock(&self) -> std::sync::MutexGuard<'_, Count> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hears each return of the relay. A Redis that came back empty has
    /// lost this instance's liveness key and its member-list entries; until
    /// the heartbeat puts them back, other instances take its members for a
    /// dead instance's. So it beats when told, not up to 10 s later.
    pub(super) fn relay_back(&self) -> Receiver<()> {
        self.back.1.clone()
    }

    /// A subscription to the Redis at `at` was lost, with `error`.
    pub(super) fn lost(&self, at: &str, error: &dyn std::fmt::Display) {
        let mut down = self.lock();
        down.now += 1;
        if down.since.is_none() {
            down.since = Some(Instant::now());
            let head = format!("lost the chat relay (Redis at {at}): ");
            log::warn!("{}", fit(&head, &error.to_string(), "; reconnecting"));
        }
    }

    /// A subscription lost before is subscribed again (`restored`), or gone
    /// for good (its client left).
    pub(super) fn over(&self, restored: bool) {
        let mut down = self.lock();
        down.now = down.now.saturating_sub(1);
        down.restored += usize::from(restored);
        if down.now > 0 {
            return;
        }
        let (since, restored) = (down.since.take(), std::mem::take(&mut down.restored));
        // Every client that waited left before Redis came back: nothing is
        // known to be back.
        if let Some(since) = since.filter(|_| restored > 0) {
            log::info!(
                "the chat relay is back after {:.1} s: {restored} subscription(s) restored",
                since.elapsed().as_secs_f64()
            );
            let _ = self.back.0.try_send(());
        }
    }
}

/// A subscription that is down, counted in `subscriptions_down` and in its
/// [`Outage`] for as long as this value lives (so every way out of a
/// listener uncounts it).
pub(super) struct Down {
    metrics: Arc<Metrics>,
    outage: Arc<Outage>,
    restored: bool,
}

impl Down {
    /// A subscription to the Redis at `at`, lost with `error`.
    pub(super) fn new(
        metrics: &Arc<Metrics>,
        outage: Arc<Outage>,
        at: &str,
        error: &dyn std::fmt::Display,
    ) -> Down {
        metrics.subscriptions_down.inc();
        outage.lost(at, error);
        Down {
            metrics: Arc::clone(metrics),
            outage,
            restored: false,
        }
    }

    /// Subscribed again.
    pub(super) fn restored(mut self) {
        self.restored = true;
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        self.metrics.subscriptions_down.dec();
        self.outage.over(self.restored);
    }
}

/// Causes that may fail again and again, each logged at most once per
/// [`EVERY`] (see the module doc).
#[derive(Default)]
pub(super) struct Repeats(Mutex<HashMap<&'static str, Quiet>>);

/// What a cause kept quiet since its last line.
struct Quiet {
    logged: Instant,
    /// Times it happened since, unsaid.
    since: u64,
    /// What its last line said (without a count), for [`Repeats::flush`].
    said: String,
}

impl Repeats {
    /// Logs `line` as a warning for `cause`, unless `cause` logged less than
    /// [`EVERY`] ago: then only counts it, and the next line (or the next
    /// [`flush`](Self::flush)) says how many times it happened since the
    /// last, and in how long.
    pub(super) fn warn(&self, cause: &'static str, line: impl FnOnce() -> String) {
        let now = Instant::now();
        let mut causes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(quiet) = causes.get_mut(cause)
            && now.duration_since(quiet.logged) < EVERY
        {
            quiet.since += 1;
            return;
        }
        let said = line();
        let tail = match causes.get(cause) {
            Some(last) if last.since > 0 => format!(
                " (and {} more like it in the last {} s)",
                last.since,
                now.duration_since(last.logged).as_secs()
            ),
            _ => String::new(),
        };
        log::warn!("{}", fit("", &said, &tail));
        let logged = Quiet {
            logged: now,
            since: 0,
            said,
        };
        causes.insert(cause, logged);
    }

    /// Says how many times each cause happened unsaid, once it has been
    /// quiet for [`EVERY`]: the last of a burst is counted too, even if
    /// nothing like it follows.
    pub(super) fn flush(&self) {
        let now = Instant::now();
        let mut causes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for quiet in causes.values_mut() {
            let after = now.duration_since(quiet.logged);
            if quiet.since == 0 || after < EVERY {
                continue;
            }
            let head = format!(
                "{} more in the last {} s like: ",
                quiet.since,
                after.as_secs()
            );
            log::warn!("{}", fit(&head, &quiet.said, ""));
            (quiet.logged, quiet.since) = (now, 0);
        }
    }
}

/// The process's causes: like the log itself, one for everybody.
static REPEATS: LazyLock<Repeats> = LazyLock::new(Repeats::default);

/// [`Repeats::warn`] for the whole process.
pub(super) fn warn_repeated(cause: &'static str, line: impl FnOnce() -> String) {
    REPEATS.warn(cause, line);
}

/// [`Repeats::flush`] for the whole process (called at every heartbeat).
pub(super) fn flush_repeated() {
    REPEATS.flush();
}

/// `head`, `text` and `tail` in one line of at most [`LONGEST`]
/// characters: `text` (an error, say) is cut to make room, the rest kept.
pub(super) fn fit(head: &str, text: &str, tail: &str) -> String {
    let room = LONGEST.saturating_sub(head.chars().count() + tail.chars().count());
    format!("{head}{}{tail}", cut(text, room))
}

/// `text` cut to `most` characters, a `…` where it was cut: in the
/// middle, as an error chain says what failed first and why last.
pub(super) fn cut(text: &str, most: usize) -> String {
    let chars = text.chars().count();
    if chars <= most {
        return text.to_owned();
    }
    let kept = most.saturating_sub(1);
    let (head, tail) = (kept - kept / 3, kept / 3);
    let at = |n: usize| text.char_indices().nth(n).map_or(text.len(), |(i, _)| i);
    format!("{}…{}", &text[..at(head)], &text[at(chars - tail)..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long errors are cut, on a character boundary, so that the whole
    /// line fits.
    #[test]
    fn long_errors_are_cut() {
        let long = "é".repeat(LONGEST + 10);
        let line = fit("lost: ", &long, "; reconnecting");
        assert_eq!(line.chars().count(), LONGEST);
        assert!(line.starts_with("lost: é") && line.ends_with("é; reconnecting"));
        assert_eq!(line.matches('…').count(), 1);
        assert_eq!(fit("a ", "short", " b"), "a short b");
        assert_eq!(cut("short", 5), "short");
        assert_eq!(cut("0123456789abcdefghij", 13), "01234567…ghij");
    }

    /// A cause logs once per period; what it kept quiet is counted.
    #[test]
    fn a_cause_is_counted_while_quiet() {
        let repeats = Repeats::default();
        let mut lines = 0;
        for _ in 0..5 {
            repeats.warn("test", || {
                lines += 1;
                "failed".into()
            });
        }
        assert_eq!(lines, 1);
        {
            let causes = repeats.0.lock().unwrap();
            assert_eq!(causes["test"].since, 4);
        }
        // Not quiet for long enough yet: nothing said.
        repeats.flush();
        assert_eq!(repeats.0.lock().unwrap()["test"].since, 4);
        // Once it is, the count is said, and starts again.
        repeats.0.lock().unwrap().get_mut("test").unwrap().logged -= EVERY;
        repeats.flush();
        assert_eq!(repeats.0.lock().unwrap()["test"].since, 0);
    }

    /// Clients that left while Redis was away are not counted as restored.
    #[test]
    fn only_restored_subscriptions_count() {
        let outage = Outage::default();
        outage.lost("redis://x", &"gone");
        outage.lost("redis://x", &"gone");
        outage.over(false);
        assert_eq!(outage.lock().now, 1);
        outage.over(true);
        let down = outage.lock();
        assert_eq!((down.now, down.restored, down.since), (0, 0, None));
    }
}
