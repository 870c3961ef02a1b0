//! `--versus` (`make versus`): threadchat, with per-client and with shared
//! subscriptions, beside the async reference server (`bench/reference`),
//! and a table of their ratios.
//!
//! The machine's load drifts (other work shares its cores), so the three
//! run interleaved: round after round, each scenario with each relay in
//! turn, and each round's ratio is taken from that round's own pair. The
//! table gives the ratios' range over the rounds (`min–max`), not a mean:
//! a wide range says the machine was busy, and a learner should see that.

use std::time::{Duration, Instant};

use super::env::ASYNC;
use super::report::Row;
use super::{Args, chart, run};

/// threadchat's two subscription modes, then the reference.
const RELAYS: [&str; 3] = ["redis", "redis-shared", ASYNC];
const SCENARIOS: [&str; 3] = ["a", "b", "c"];

/// One figure compared: where it comes from and which way is better.
struct Metric {
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    /// "higher" or "lower": which ratio is threadchat's win (above or below 1).
    better: &'static str,
    /// Digits after the point in the absolute figures.
    digits: usize,
    value: fn(&Row) -> Option<f64>,
}

const METRICS: [Metric; 5] = [
    Metric {
        scenario: "b",
        name: "deliveries/s",
        unit: "/s",
        better: "higher",
        digits: 0,
        value: |row| row.deliveries_per_s,
    },
    Metric {
        scenario: "b",
        name: "server CPU per delivery",
        unit: " µs",
        better: "lower",
        digits: 2,
        value: Row::cpu_per_delivery_us,
    },
    Metric {
        scenario: "a",
        name: "latency p99",
        unit: " ms",
        better: "lower",
        digits: 1,
        value: |row| Some(row.latency?.1),
    },
    Metric {
        scenario: "c",
        name: "RSS per idle connection",
        unit: " KiB",
        better: "lower",
        digits: 1,
        value: |row| row.rss_per_client_kib,
    },
    // The kernel's part is machine-wide: it holds both ends of every
    // connection (the load generator's too, the same for each server) and
    // moves with whatever else runs, so it is the noisier figure.
    Metric {
        scenario: "c",
        name: "RSS + kernel per idle connection",
        unit: " KiB",
        better: "lower",
        digits: 1,
        value: |row| {
            let (stacks, tables, slab) = row.kernel_per_client_kib?;
            Some(row.rss_per_client_kib? + stacks + tables + slab)
        },
    },
];

/// One run's row, with the round it belongs to.
struct Measured {
    round: usize,
    row: Row,
}

/// Runs a, b and c with each of [`RELAYS`], `args.rounds` times, and prints
/// every row, then the ratios.
pub(crate) fn main(args: &Args) -> anyhow::Result<()> {
    let rounds = args.rounds.max(1);
    let runs = rounds * SCENARIOS.len() * RELAYS.len();
    let started = Instant::now();
    let mut measured: Vec<Measured> = Vec::with_capacity(runs);
    for round in 0..rounds {
        for scenario in SCENARIOS {
            for relay in RELAYS {
                let done = measured.len();
                let left = if done == 0 {
                    String::new()
                } else {
                    let each = started.elapsed() / done as u32;
                    format!(", about {} left", minutes(each * (runs - done) as u32))
                };
                eprintln!(
                    "round {}/{rounds}, scenario {scenario}, relay {relay} (run {}/{runs}{left})…",
                    round + 1,
                    done + 1
                );
                let mut row = run(args, scenario, relay, false)?;
                row.scenario = scenario.to_owned();
                row.relay = relay.to_owned();
                row.transport = "ws";
                eprintln!("{}", row.render());
                measured.push(Measured { round, row });
            }
        }
    }
    println!("{}", Row::HEADER);
    for m in &measured {
        println!("{}", m.row.render());
    }
    println!("\n{}", ratios(&measured, rounds));
    if let Some(dir) = &args.charts {
        for path in chart::write_all(measured.iter().map(|m| &m.row), dir)? {
            eprintln!("chart: {}", path.display());
        }
    }
    Ok(())
}

/// The ratio table: per metric, threadchat / async for each mode as the
/// range of the rounds' ratios, then each relay's absolute range.
fn ratios(measured: &[Measured], rounds: usize) -> String {
    let mut out = String::from(
        "| scenario | metric | better | per-client / async | shared / async | per-client | shared | async |\n\
         |---|---|---|---|---|---|---|---|",
    );
    for metric in &METRICS {
        // value[relay][round], where the run gave one.
        let values: Vec<Vec<Option<f64>>> = RELAYS
            .iter()
            .map(|relay| {
                (0..rounds)
                    .map(|round| {
                        measured
                            .iter()
                            .find(|m| {
                                m.round == round
                                    && m.row.relay == *relay
                                    && m.row.scenario == metric.scenario
                            })
                            .and_then(|m| (metric.value)(&m.row))
                            .filter(|v| v.is_finite())
                    })
                    .collect()
            })
            .collect();
        let reference = &values[2];
        let ratio = |mode: &[Option<f64>]| {
            let each: Vec<f64> = mode
                .iter()
                .zip(reference)
                .filter_map(|(t, a)| Some(t.as_ref()? / a.filter(|a| *a > 0.0)?))
                .collect();
            range(&each, 2, "×")
        };
        let absolute = |relay: &[Option<f64>]| {
            range(
                &relay.iter().flatten().copied().collect::<Vec<_>>(),
                metric.digits,
                metric.unit,
            )
        };
        out += &format!(
            "\n| {} | {} | {} | {} | {} | {} | {} | {} |",
            metric.scenario,
            metric.name,
            metric.better,
            ratio(&values[0]),
            ratio(&values[1]),
            absolute(&values[0]),
            absolute(&values[1]),
            absolute(reference),
        );
    }
    out
}

/// `min–max` of `values` (one value alone; `–` for none).
fn range(values: &[f64], digits: usize, unit: &str) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match values.len() {
        0 => "–".to_owned(),
        1 => format!("{min:.digits$}{unit}"),
        _ => format!("{min:.digits$}–{max:.digits$}{unit}"),
    }
}

/// A rough duration for the progress line.
fn minutes(d: Duration) -> String {
    match d.as_secs() {
        s if s < 90 => format!("{s} s"),
        s => format!("{} min", (s + 30) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each round's ratio comes from that round's own pair, and the table
    /// shows their range.
    #[test]
    fn ratios_pair_runs_by_round() {
        let row = |round, relay: &str, rate: f64| Measured {
            round,
            row: Row {
                scenario: "b".into(),
                relay: relay.into(),
                deliveries_per_s: Some(rate),
                ..Row::default()
            },
        };
        let measured = [
            row(0, "redis", 100.0),
            row(0, "redis-shared", 300.0),
            row(0, ASYNC, 200.0),
            row(1, "redis", 150.0),
            row(1, "redis-shared", 100.0),
            row(1, ASYNC, 100.0),
        ];
        let table = ratios(&measured, 2);
        let line = table
            .lines()
            .find(|l| l.contains("deliveries/s"))
            .expect("a deliveries/s line");
        assert_eq!(
            line,
            "| b | deliveries/s | higher | 0.50–1.50× | 1.00–1.50× | 100–150/s | 100–300/s | 100–200/s |"
        );
    }
}
