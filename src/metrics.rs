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
    /// Messages that could not be published.
    pub publish_errors: Counter,
    /// Connections closed for breaking the protocol or a limit.
    pub protocol_closes: Counter,
    /// Connection threads (or subscriber threads) that panicked.
    pub panics: Counter,
}

/// A number that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
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
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let gauges = [(
            "threadchat_connections_open",
            "Chat connections open now.",
            self.connections_open.get(),
        )];
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
}
