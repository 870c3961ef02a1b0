//! The results table: one [`Row`] per scenario and relay.

use std::time::Duration;

/// One line of the results table. Empty cells are what a scenario does not
/// measure.
#[derive(Default)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) relay: String,
    /// `ws` or `wss` (`--tls`).
    pub(crate) transport: &'static str,
    pub(crate) clients: usize,
    pub(crate) senders: usize,
    pub(crate) connect: Duration,
    pub(crate) handshake: String,
    pub(crate) delivered: u64,
    pub(crate) expected: u64,
    pub(crate) duplicates: Option<u64>,
    pub(crate) out_of_order: Option<u64>,
    /// Fan-out latency p50, p99, max (ms).
    pub(crate) latency: Option<(f64, f64, f64)>,
    pub(crate) deliveries_per_s: Option<f64>,
    /// CPU while sending, in % of a core.
    pub(crate) cpu: Option<Cpu>,
    /// Redis connections in use (clients connected to it).
    pub(crate) redis_connections: Option<u64>,
    pub(crate) rss_per_client_kib: Option<f64>,
    /// Kernel memory per client: stacks, page tables, slab (KiB).
    pub(crate) kernel_per_client_kib: Option<(f64, f64, f64)>,
    pub(crate) idle_cpu: Option<f64>,
    /// The server's CPU per client while they all connect (ms): the
    /// WebSocket handshake and join, and with `--tls` the TLS handshake.
    pub(crate) connect_cpu_ms: Option<f64>,
}

impl Row {
    pub(crate) const HEADER: &str = "| scenario | relay | over | clients | senders | connect all | handshake p50 / p99 | server CPU per connect | delivered / expected | loss | dups | order | latency p50 / p99 / max | deliveries/s | CPU: server / Redis / load gen. | server CPU per delivery | Redis conns | RSS per client | kernel per client: stacks + page tables + slab | idle CPU |\n\
                          |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    pub(crate) fn render(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "".into());
        format!(
            "| {} | {} | {} | {} | {} | {:.2} s | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.relay,
            self.transport,
            self.clients,
            self.senders,
            self.connect.as_secs_f64(),
            self.handshake,
            opt(self.connect_cpu_ms.map(|ms| format!("{ms:.2} ms"))),
            self.delivered,
            self.expected,
            self.expected.saturating_sub(self.delivered),
            opt(self.duplicates.map(|d| d.to_string())),
            opt(self.out_of_order.map(|d| d.to_string())),
            opt(self.latency.map(|(a, b, c)| {
                if a.is_nan() {
                    // Scenario c: one message, the time until all had it.
                    format!("– / – / {c:.1} ms")
                } else {
                    format!("{a:.1} / {b:.1} / {c:.1} ms")
                }
            })),
            opt(self.deliveries_per_s.map(|d| format!("{d:.0}"))),
            opt(self.cpu.as_ref().map(Cpu::render)),
            opt(self.cpu_per_delivery_us().map(|us| format!("{us:.1} µs"))),
            opt(self.redis_connections.map(|n| n.to_string())),
            opt(self.rss_per_client_kib.map(|k| format!("{k:.1} KiB"))),
            opt(self.kernel_per_client_kib.map(|(stack, tables, slab)| {
                let total = stack + tables + slab;
                format!("{stack:.1} + {tables:.1} + {slab:.1} = {total:.1} KiB")
            })),
            opt(self.idle_cpu.map(|c| format!("{c:.1}% of a core"))),
        )
    }

    /// The server's CPU time per frame delivered, in µs: what a fan-out
    /// costs per receiver (with `--tls`, one encryption each).
    pub(crate) fn cpu_per_delivery_us(&self) -> Option<f64> {
        let (cpu, rate) = (self.cpu.as_ref()?, self.deliveries_per_s?);
        (rate > 0.0).then(|| cpu.server / 100.0 * 1e6 / rate)
    }
}

/// Who used the CPU while a scenario was sending, in % of one core.
///
/// All three share the machine's cores, so their sum bounds the latency a
/// scenario can reach: in (a), 1% of a core over the 10 s is 1 ms of CPU per
/// message, and the last of a message's 999 frames cannot be read before
/// the sum has been spent, divided among the cores.
#[derive(Clone)]
pub(crate) struct Cpu {
    pub(crate) server: f64,
    /// Each Redis server (a cluster's masters: one figure each).
    pub(crate) redis: Vec<f64>,
    /// This load generator: its senders and receivers.
    pub(crate) load: f64,
}

impl Cpu {
    pub(crate) fn render(&self) -> String {
        let redis = match &self.redis[..] {
            [] => "–".to_owned(),
            [one] => format!("{one:.0}%"),
            shards => {
                let each: Vec<String> = shards.iter().map(|r| format!("{r:.0}")).collect();
                format!(
                    "{}% ({}%)",
                    shards.iter().sum::<f64>().round(),
                    each.join(" + ")
                )
            }
        };
        format!("{:.0}% / {redis} / {:.0}%", self.server, self.load)
    }
}
