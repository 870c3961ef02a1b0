//! Counters the server keeps about itself, served at `GET /metrics` in the
//! Prometheus text format.
//!
//! One [`Metrics`] is created at start-up and shared by `Arc` (no global
//! state). Every counter is a relaxed atomic: incrementing one costs a few
//! nanoseconds and no lock, so they can sit on the per-message path.
//!
//! The exposition format is a handful of lines of text, so it is written by
//! hand here rather than pulling in a metrics crate and its registry.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chat connections open now (upgraded WebSockets).
    pub connections_open: Gauge,
    /// Chat connections ever opened.
    pub connections_total: Counter,
    /// Chat messages received from clients (and published).
    pub messages_received: Counter,
    /// Chat frames written to clients.
    pub messages_delivered: Counter,
    /// Payloads on the room that were not chat messages.
    pub payloads_skipped: Counter,
    /// Clients closed for not reading fast enough.
    pub slow_client_closes: Counter,
    /// Messages refused by the per-connection rate limit.
    pub rate_limited: Counter,
    /// Subscriptions lost (Redis went away or dropped a subscriber).
    pub subscriptions_lost: Counter,
    /// Subscriptions restored after a loss.
    pub redis_reconnects: Counter,
    /// Subscriptions lost and not yet restored.
    pub subscriptions_down: Gauge,
    /// Rooms whose state (history, members) the in-process relay holds.
    pub rooms_in_memory: Gauge,
    /// Messages that could not be published.
    pub publish_errors: Counter,
    /// Connections closed for breaking the protocol or a limit.
    pub protocol_closes: Counter,
    /// Connection threads (or subscriber threads) that panicked.
    pub panics: Counter,
    /// From the sending server receiving a message to this server writing
    /// it to a client, in milliseconds (wall clocks: across instances, clock
    /// skew shows up here).
    pub delivery_latency: Histogram,
}

/// Upper bounds of the latency buckets, in milliseconds.
const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A Prometheus histogram of milliseconds: one atomic per bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at most `LATENCY_BUCKETS_MS[i]` (not cumulative here;
    /// summed up when rendered).
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    count: AtomicU64,
    sum: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, ms: u64) {
        if let Some(i) = LATENCY_BUCKETS_MS.iter().position(|&le| ms <= le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(ms, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0;
        for (le, bucket) in LATENCY_BUCKETS_MS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let seconds = *le as f64 / 1000.0;
            let _ = writeln!(out, "{name}_bucket{{le=\"{seconds}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = write!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}\n"
        );
    }
}

/// A number that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` (one atomic operation for a batch).
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A number that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let gauges = [
            (
                "threadchat_connections_open",
                "Chat connections open now.",
                self.connections_open.get(),
            ),
            (
                "threadchat_subscriptions_down",
                "Subscriptions lost and not yet restored.",
                self.subscriptions_down.get(),
            ),
            (
                "threadchat_rooms_in_memory",
                "Rooms whose history and members the in-process relay holds.",
                self.rooms_in_memory.get(),
            ),
        ];
        let counters = [
            (
                "threadchat_connections_total",
                "Chat connections ever opened.",
                &self.connections_total,
            ),
            (
                "threadchat_messages_received_total",
                "Chat messages received from clients.",
                &self.messages_received,
            ),
            (
                "threadchat_messages_delivered_total",
                "Chat frames written to clients.",
                &self.messages_delivered,
            ),
            (
                "threadchat_payloads_skipped_total",
                "Payloads on the room that were not chat messages.",
                &self.payloads_skipped,
            ),
            (
                "threadchat_slow_client_closes_total",
                "Clients closed for not reading fast enough.",
                &self.slow_client_closes,
            ),
            (
                "threadchat_rate_limited_total",
                "Messages refused by the rate limit.",
                &self.rate_limited,
            ),
            (
                "threadchat_subscriptions_lost_total",
                "Subscriptions lost to a relay failure.",
                &self.subscriptions_lost,
            ),
            (
                "threadchat_redis_reconnects_total",
                "Subscriptions restored after a loss.",
                &self.redis_reconnects,
            ),
            (
                "threadchat_publish_errors_total",
                "Messages that could not be published.",
                &self.publish_errors,
            ),
            (
                "threadchat_protocol_closes_total",
                "Connections closed for breaking the protocol or a limit.",
                &self.protocol_closes,
            ),
            (
                "threadchat_panics_total",
                "Connection threads that panicked.",
                &self.panics,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            );
        }
        for (name, help, counter) in counters {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                counter.get()
            );
        }
        self.delivery_latency.render(
            &mut out,
            "threadchat_delivery_latency_seconds",
            "From the sender's server receiving a message to writing it to a client.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.connections_open.inc();
        metrics.messages_received.inc();
        metrics.messages_received.inc();
        let text = metrics.render();
        assert!(
            text.contains(
                "# TYPE threadchat_connections_open gauge\nthreadchat_connections_open 1\n"
            )
        );
        assert!(text.contains("threadchat_messages_received_total 2\n"));
    }

    #[test]
    fn histograms_are_cumulative() {
        let metrics = Metrics::default();
        for ms in [0, 3, 3, 40, 9999] {
            metrics.delivery_latency.observe(ms);
        }
        let text = metrics.render();
        let name = "threadchat_delivery_latency_seconds";
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"0.001\"}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"0.005\"}} 3\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"5\"}} 4\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 5\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{name}_count 5\n")), "{text}");
    }
}
