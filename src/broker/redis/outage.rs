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
//!   times it happened since the last line.
//!
//! Every line is cut to [`LONGEST`] characters: errors from a Sentinel or a
//! Cluster can quote a whole topology.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Most one cause logs, with a count of what it kept quiet.
pub(super) const EVERY: Duration = Duration::from_secs(10);

/// Longest error text quoted in a line (characters).
pub(super) const LONGEST: usize = 160;

/// The subscriptions of this instance that are down (see the module doc).
#[derive(Default)]
pub(super) struct Outage(Mutex<Count>);

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
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A subscription to `url`'s Redis was lost, with `error`.
    pub(super) fn lost(&self, url: &str, error: &dyn std::fmt::Display) {
        let mut down = self.lock();
        down.now += 1;
        if down.since.is_none() {
            down.since = Some(Instant::now());
            log::warn!(
                "lost the chat relay (Redis at {url}): {}; reconnecting",
                cut(&error.to_string())
            );
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
    /// A subscription to `url`'s Redis, lost with `error`.
    pub(super) fn new(
        metrics: &Arc<Metrics>,
        outage: Arc<Outage>,
        url: &str,
        error: &dyn std::fmt::Display,
    ) -> Down {
        metrics.subscriptions_down.inc();
        outage.lost(url, error);
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
    since: u64,
}

impl Repeats {
    /// Logs `line` as a warning for `cause`, unless `cause` logged less than
    /// [`EVERY`] ago: then only counts it, and the next line says how many
    /// times it happened meanwhile.
    pub(super) fn warn(&self, cause: &'static str, line: impl FnOnce() -> String) {
        let now = Instant::now();
        let quiet = {
            let mut causes = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match causes.get_mut(cause) {
                Some(quiet) if now.duration_since(quiet.logged) < EVERY => {
                    quiet.since += 1;
                    return;
                }
                Some(quiet) => {
                    std::mem::replace(
                        quiet,
                        Quiet {
                            logged: now,
                            since: 0,
                        },
                    )
                    .since
                }
                None => {
                    causes.insert(
                        cause,
                        Quiet {
                            logged: now,
                            since: 0,
                        },
                    );
                    0
                }
            }
        };
        let line = cut(&line());
        match quiet {
            0 => log::warn!("{line}"),
            n => log::warn!(
                "{line} (and {n} more like it in the last {} s)",
                EVERY.as_secs()
            ),
        }
    }
}

/// The process's causes: like the log itself, one for everybody.
static REPEATS: LazyLock<Repeats> = LazyLock::new(Repeats::default);

/// [`Repeats::warn`] for the whole process.
pub(super) fn warn_repeated(cause: &'static str, line: impl FnOnce() -> String) {
    REPEATS.warn(cause, line);
}

/// `text` cut to [`LONGEST`] characters, marked where it was cut.
pub(super) fn cut(text: &str) -> String {
    match text.char_indices().nth(LONGEST) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long errors are cut, on a character boundary.
    #[test]
    fn long_errors_are_cut() {
        let long = "é".repeat(LONGEST + 10);
        let cut = cut(&long);
        assert_eq!(cut.chars().count(), LONGEST + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(super::cut("short"), "short");
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
        let causes = repeats.0.lock().unwrap();
        assert_eq!(causes["test"].since, 4);
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
