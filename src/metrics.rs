//! Counters the server keeps about itself, served at `GET /metrics`.
//!
//! One [`Metrics`] is created at start-up and shared by `Arc` (no global
//! state). Counters and gauges are `prometheus-client`'s (the Prometheus
//! project's own Rust client): each is an atomic, cheap enough for the
//! per-message path, and its [`Registry`] writes the text format.
//!
//! The one metric of our own is the latency [`Histogram`]: it is observed
//! for every frame written to every client, and `prometheus-client`'s
//! histogram takes a lock on each observation, which dispatcher and
//! subscriber threads would then all contend for. Ours is an atomic per
//! bucket; the registry still writes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

/// A number that only goes up. (Written with a `_total` suffix.)
pub type Counter = prometheus_client::metrics::counter::Counter;
/// A number that goes up and down.
pub type Gauge = prometheus_client::metrics::gauge::Gauge;

/// The server's counters, and the registry that writes them out.
#[derive(Debug)]
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
    /// Payloads delivered without their place in the room's log: not the
    /// place the log gives next (a forged `offset`), counted once per client.
    pub payloads_unplaced: Counter,
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
    /// Messages and events read from the room's log to fill restored
    /// subscriptions' gaps (once per subscription, not per client).
    pub gap_recovered: Counter,
    /// Restored subscriptions whose gap could not be filled entirely.
    pub gaps_incomplete: Counter,
    /// Rooms whose state (history, members) the in-process relay holds.
    pub rooms_in_memory: Gauge,
    /// Messages that could not be published.
    pub publish_errors: Counter,
    /// Connections closed for breaking the protocol or a limit.
    pub protocol_closes: Counter,
    /// Connection threads (or subscriber threads) that panicked.
    pub panics: Counter,
    /// TLS handshakes that failed or were not finished in time (plain HTTP
    /// to the TLS port is answered, not counted).
    pub tls_handshake_failures: Counter,
    /// Leaves and nickname releases sent again once Redis was back.
    pub ghost_retries: Counter,
    /// Member-list entries and nickname claims of this instance put right
    /// by the heartbeat's reconciliation.
    pub ghosts_reconciled: Counter,
    /// Connections refused before they were served, by reason (see
    /// `session::admission`).
    pub connections_refused: Family<RefusalLabels, Counter>,
    /// From the sending server receiving a message to this server writing
    /// it to a client, in milliseconds (wall clocks: across instances, clock
    /// skew shows up here).
    pub delivery_latency: Histogram,
    /// Every metric above, by its name on `/metrics`.
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut metrics = Metrics {
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            messages_received: Counter::default(),
            messages_delivered: Counter::default(),
            payloads_skipped: Counter::default(),
            payloads_unplaced: Counter::default(),
            slow_client_closes: Counter::default(),
            rate_limited: Counter::default(),
            subscriptions_lost: Counter::default(),
            redis_reconnects: Counter::default(),
            subscriptions_down: Gauge::default(),
            gap_recovered: Counter::default(),
            gaps_incomplete: Counter::default(),
            rooms_in_memory: Gauge::default(),
            publish_errors: Counter::default(),
            protocol_closes: Counter::default(),
            panics: Counter::default(),
            tls_handshake_failures: Counter::default(),
            ghost_retries: Counter::default(),
            ghosts_reconciled: Counter::default(),
            connections_refused: Family::default(),
            delivery_latency: Histogram::default(),
            registry: Registry::default(),
        };
        // The registry holds clones: each shares its value with the field.
        // (It ends each help text with a period itself.)
        let gauges = [
            (
                "connections_open",
                "Chat connections open now",
                &metrics.connections_open,
            ),
            (
                "subscriptions_down",
                "Subscriptions lost and not yet restored",
                &metrics.subscriptions_down,
            ),
            (
                "rooms_in_memory",
                "Rooms whose history and members the in-process relay holds",
                &metrics.rooms_in_memory,
            ),
        ];
        for (name, help, gauge) in gauges {
            metrics
                .registry
                .register(format!("threadchat_{name}"), help, gauge.clone());
        }
        let counters = [
            (
                "connections",
                "Chat connections ever opened",
                &metrics.connections_total,
            ),
            (
                "messages_received",
                "Chat messages received from clients",
                &metrics.messages_received,
            ),
            (
                "messages_delivered",
                "Chat frames written to clients",
                &metrics.messages_delivered,
            ),
            (
                "payloads_skipped",
                "Payloads on the room that were not chat messages",
                &metrics.payloads_skipped,
            ),
            (
                "payloads_unplaced",
                "Payloads delivered without their place: not the one the room's log gives next",
                &metrics.payloads_unplaced,
            ),
            (
                "slow_client_closes",
                "Clients closed for not reading fast enough",
                &metrics.slow_client_closes,
            ),
            (
                "rate_limited",
                "Messages refused by the rate limit",
                &metrics.rate_limited,
            ),
            (
                "subscriptions_lost",
                "Subscriptions lost to a relay failure",
                &metrics.subscriptions_lost,
            ),
            (
                "redis_reconnects",
                "Subscriptions restored after a loss",
                &metrics.redis_reconnects,
            ),
            (
                "gap_recovered",
                "Messages and events read from the log to fill restored subscriptions' gaps",
                &metrics.gap_recovered,
            ),
            (
                "gaps_incomplete",
                "Restored subscriptions whose gap could not be filled entirely",
                &metrics.gaps_incomplete,
            ),
            (
                "publish_errors",
                "Messages that could not be published",
                &metrics.publish_errors,
            ),
            (
                "protocol_closes",
                "Connections closed for breaking the protocol or a limit",
                &metrics.protocol_closes,
            ),
            (
                "panics",
                "Connection threads that panicked",
                &metrics.panics,
            ),
            (
                "tls_handshake_failures",
                "TLS handshakes that failed or were not finished in time",
                &metrics.tls_handshake_failures,
            ),
            (
                "member_changes_retried",
                "Leaves and nickname releases sent again once Redis was back",
                &metrics.ghost_retries,
            ),
            (
                "members_reconciled",
                "Member-list entries and nickname claims of this instance put right by the heartbeat",
                &metrics.ghosts_reconciled,
            ),
        ];
        for (name, help, counter) in counters {
            metrics
                .registry
                .register(format!("threadchat_{name}"), help, counter.clone());
        }
        metrics.registry.register(
            "threadchat_connections_refused",
            "Connections refused before they were served, by reason",
            metrics.connections_refused.clone(),
        );
        metrics.registry.register_with_unit(
            "threadchat_delivery_latency",
            "From the sender's server receiving a message to writing it to a client",
            Unit::Seconds,
            metrics.delivery_latency.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// Every metric, in the OpenMetrics text format (which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The label of `threadchat_connections_refused_total`: why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The reason, e.g. `per_address`.
    pub reason: &'static str,
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency buckets, in milliseconds.
const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A histogram of milliseconds, written out in seconds: one atomic per
/// bucket, so observing never waits. Clones share their counts.
#[derive(Debug, Default, Clone)]
pub struct Histogram(Arc<Buckets>);

#[derive(Debug, Default)]
struct Buckets {
    /// Observations at most `LATENCY_BUCKETS_MS[i]` (the last one: above
    /// them all). Not cumulative; the encoder sums them up.
    counts: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
}

impl Histogram {
    /// Records several observations, counted here first and added to the
    /// shared counts once per bucket: a batch of frames written to one
    /// client mostly lands in one bucket, and every atomic add is a cache
    /// line the dispatchers' cores pass between them.
    pub fn observe_all(&self, observations: impl IntoIterator<Item = u64>) {
        let mut counts = [0u64; LATENCY_BUCKETS_MS.len() + 1];
        let mut sum = 0u64;
        for ms in observations {
            let i = LATENCY_BUCKETS_MS
                .iter()
                .position(|&le| ms <= le)
                .unwrap_or(LATENCY_BUCKETS_MS.len());
            counts[i] += 1;
            sum = sum.saturating_add(ms);
        }
        for (shared, n) in self.0.counts.iter().zip(counts) {
            if n > 0 {
                shared.fetch_add(n, Ordering::Relaxed);
            }
        }
        if sum > 0 {
            self.0.sum_ms.fetch_add(sum, Ordering::Relaxed);
        }
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.counts.iter().map(|c| c.load(Ordering::Relaxed));
        let bounds = LATENCY_BUCKETS_MS.iter().map(|&ms| ms as f64 / 1000.0);
        // `f64::MAX` is how the encoder spells the `+Inf` bucket.
        let buckets: Vec<(f64, u64)> = bounds.chain([f64::MAX]).zip(counts).collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_metric_names_prometheus_scrapes() {
        let metrics = Metrics::default();
        metrics.connections_open.inc();
        metrics.messages_received.inc();
        metrics.messages_received.inc();
        let text = metrics.render();
        assert!(
            text.contains(
                "# TYPE threadchat_connections_open gauge\nthreadchat_connections_open 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("threadchat_messages_received_total 2\n"),
            "{text}"
        );
        assert!(text.contains("threadchat_connections_total 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn histograms_are_cumulative_and_in_seconds() {
        let metrics = Metrics::default();
        metrics.delivery_latency.observe_all([0, 3, 3]);
        metrics.delivery_latency.observe_all([40, 9999]);
        let text = metrics.render();
        let name = "threadchat_delivery_latency_seconds";
        for line in [
            "_bucket{le=\"0.001\"} 1\n",
            "_bucket{le=\"0.005\"} 3\n",
            "_bucket{le=\"5.0\"} 4\n",
            "_bucket{le=\"+Inf\"} 5\n",
            "_count 5\n",
        ] {
            assert!(text.contains(&format!("{name}{line}")), "{line} in {text}");
        }
    }
}
