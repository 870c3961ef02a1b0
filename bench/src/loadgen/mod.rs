//! The load generator proper (Linux only: see the crate's doc).

mod attacks;
mod chart;
mod client;
mod env;
mod gapfill;
mod receive;
mod report;
mod scenarios;
mod silent;
mod tls;
mod versus;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;

use env::Env;
use report::Row;
use scenarios::{Pace, Rooms, fan_out, handshakes, idle};

#[derive(Parser)]
#[command(about = "Load generator for threadchat (see `make bench`)")]
pub(crate) struct Args {
    /// Scenarios to run: a, b, c; g and h (many rooms); the attacks d, e,
    /// f, i (silent starts) and j (room rotation); k, the gap fill's cost;
    /// t, short connections (each a handshake with `--tls`)
    /// (comma-separated).
    #[arg(long, default_value = "a,b,c", value_delimiter = ',')]
    scenario: Vec<String>,
    /// Relays (comma-separated): redis (per-client subscriptions),
    /// redis-shared (one subscription per room), memory (in-process), all
    /// (those three); redis-cluster and redis-cluster-shared (a 3-master
    /// Redis Cluster); async, not threadchat but the async reference server
    /// (`--reference`; scenarios a, b, c, g, h only).
    #[arg(long, default_value = "redis", value_delimiter = ',')]
    broker: Vec<String>,
    /// Idle clients in scenario c (10000 needs the kernel settings in
    /// docs/OPERATIONS.md).
    #[arg(long, default_value_t = 5000)]
    idle_clients: usize,
    /// The threadchat binary to test.
    #[arg(long, default_value = "target/release/threadchat")]
    threadchat: String,
    /// The async reference server (relay `async`; built apart: `cargo
    /// build --release --manifest-path bench/reference/Cargo.toml`).
    #[arg(
        long,
        default_value = "bench/reference/target/release/threadchat-async-reference"
    )]
    reference: String,
    /// threadchat (per-client and shared subscriptions) against the async
    /// reference: a, b and c with each, interleaved, `--rounds` times, then
    /// a table of their ratios (`make versus`; ignores --scenario and
    /// --broker).
    #[arg(long)]
    versus: bool,
    /// Room log entries the server keeps (`--history`) in scenarios a, b
    /// and c: 0, the default, measures relaying alone; 50, the server's
    /// default, adds keeping the log.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// Clients speak TLS (`wss://`) in the scenarios a, b, c, g, h and t: the
    /// server is started with a certificate made for the run. `--tls both`
    /// runs each of them plain, then over TLS, for a table of the two side
    /// by side. (The attacks and k stay plain.)
    #[arg(long, value_enum, default_value = "off", num_args = 0..=1, default_missing_value = "on")]
    tls: Tls,
    /// Runs everything this many times over (for a range of each figure,
    /// plain and TLS runs alternating).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also draws the results of a, b and c as SVG charts into this folder
    /// (latency.svg, deliveries.svg, memory.svg; see `loadgen/chart.rs`).
    #[arg(long)]
    charts: Option<PathBuf>,
}

/// Whether the clients of scenarios a, b, c, g, h and t speak TLS.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Tls {
    Off,
    On,
    Both,
}

impl Tls {
    /// The runs of one scenario: `false` plain, `true` over TLS.
    fn runs(self) -> &'static [bool] {
        match self {
            Tls::Off => &[false],
            Tls::On => &[true],
            Tls::Both => &[false, true],
        }
    }
}

/// The layout of scenarios g and h: 30 rooms of 20 clients, 2 senders in
/// each.
const MANY_ROOMS: Rooms = Rooms {
    rooms: 30,
    per_room: 20,
    senders: 2,
};

/// Connections in scenario t (each a TLS handshake with `--tls`).
const HANDSHAKES: usize = 2000;

/// Runs the scenarios the command line asks for and prints the tables.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.versus {
        return versus::main(&args);
    }
    let relays: Vec<String> = args
        .broker
        .iter()
        .flat_map(|relay| match relay.as_str() {
            "all" => vec!["redis".into(), "redis-shared".into(), "memory".into()],
            one => vec![one.to_owned()],
        })
        .collect();
    if relays.iter().any(|r| r == env::ASYNC)
        && let Some(other) = args
            .scenario
            .iter()
            .find(|s| !["a", "b", "c", "g", "h"].contains(&s.as_str()))
    {
        bail!(
            "relay {} runs scenarios a, b, c, g and h only, not {other}",
            env::ASYNC
        );
    }
    let mut rows = Vec::new();
    let mut attack_rows = Vec::new();
    for _round in 0..args.rounds {
        for relay in &relays {
            for scenario in &args.scenario {
                if let Some(attack) = attacks::Attack::named(scenario) {
                    eprintln!("scenario {scenario}, relay {relay}…");
                    let row = attack.run(&args, relay)?;
                    eprintln!("{}", row.render());
                    attack_rows.push(row);
                    continue;
                }
                for &tls in args.tls.runs() {
                    let transport = if tls { "wss" } else { "ws" };
                    eprintln!("scenario {scenario}, relay {relay}, {transport}…");
                    let mut row = run(&args, scenario, relay, tls)?;
                    row.scenario = scenario.clone();
                    row.relay = relay.clone();
                    row.transport = transport;
                    eprintln!("{}", row.render());
                    rows.push(row);
                }
            }
        }
    }
    if !rows.is_empty() {
        println!("{}", Row::HEADER);
        for row in &rows {
            println!("{}", row.render());
        }
    }
    if !attack_rows.is_empty() {
        println!("\n{}", attacks::AttackRow::HEADER);
        for row in &attack_rows {
            println!("{}", row.render());
        }
    }
    if let Some(dir) = &args.charts {
        for path in chart::write_all(&rows, dir)? {
            eprintln!("chart: {}", path.display());
        }
    }
    Ok(())
}

/// One run of a fan-out or idle scenario against a fresh server (over TLS
/// when `tls`).
pub(crate) fn run(args: &Args, scenario: &str, relay: &str, tls: bool) -> anyhow::Result<Row> {
    let history = args.history.to_string();
    let env = Env::start_over(args, relay, &["--history", &history], tls)?;
    match scenario {
        "a" => fan_out(
            &env,
            Rooms::one(1000, 1),
            Pace::PerSecond(10),
            Duration::from_secs(10),
        ),
        "b" => fan_out(
            &env,
            Rooms::one(100, 10),
            Pace::FlatOut,
            Duration::from_secs(5),
        ),
        // Many rooms at once, what a cluster spreads over its masters
        // (compare redis with redis-cluster): as fast as the server allows
        // (g), and at a steady 1,200 messages/s for latency (h).
        "g" => fan_out(&env, MANY_ROOMS, Pace::FlatOut, Duration::from_secs(5)),
        "h" => fan_out(
            &env,
            MANY_ROOMS,
            Pace::PerSecond(20),
            Duration::from_secs(10),
        ),
        "c" => idle(&env, args.idle_clients),
        "t" => handshakes(&env, HANDSHAKES),
        other => bail!("unknown scenario {other:?}"),
    }
}
