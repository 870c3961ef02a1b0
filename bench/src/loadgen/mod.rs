//! The load generator proper (Linux only: see the crate's doc).

mod attacks;
mod client;
mod env;
mod receive;
mod report;
mod scenarios;

use std::time::Duration;

use anyhow::bail;
use clap::Parser;

use env::Env;
use report::Row;
use scenarios::{Pace, fan_out, idle};

#[derive(Parser)]
#[command(about = "Load generator for threadchat (see `make bench`)")]
pub(crate) struct Args {
    /// Scenarios to run: a, b, c (comma-separated).
    #[arg(long, default_value = "a,b,c", value_delimiter = ',')]
    scenario: Vec<String>,
    /// Relay: redis (per-client subscriptions), redis-shared (one
    /// subscription per room), memory (in-process), or all three.
    #[arg(long, default_value = "redis")]
    broker: String,
    /// Idle clients in scenario c (10000 needs the kernel settings in
    /// docs/OPERATIONS.md).
    #[arg(long, default_value_t = 5000)]
    idle_clients: usize,
    /// The threadchat binary to test.
    #[arg(long, default_value = "target/release/threadchat")]
    threadchat: String,
    /// Room log entries the server keeps (`--history`) in scenarios a, b
    /// and c: 0, the default, measures relaying alone; 50, the server's
    /// default, adds keeping the log.
    #[arg(long, default_value_t = 0)]
    history: usize,
}

/// Runs the scenarios the command line asks for and prints the tables.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relays: Vec<String> = if args.broker == "all" {
        ["redis", "redis-shared", "memory"]
            .map(String::from)
            .to_vec()
    } else {
        vec![args.broker.clone()]
    };
    let mut rows = Vec::new();
    let mut attack_rows = Vec::new();
    for relay in &relays {
        for scenario in &args.scenario {
            eprintln!("scenario {scenario}, relay {relay}…");
            if let Some(attack) = attacks::Attack::named(scenario) {
                let row = attack.run(&args, relay)?;
                eprintln!("{}", row.render());
                attack_rows.push(row);
                continue;
            }
            let history = args.history.to_string();
            let env = Env::start(&args, relay, &["--history", &history])?;
            let mut row = match scenario.as_str() {
                "a" => fan_out(&env, 1000, 1, Pace::PerSecond(10), Duration::from_secs(10))?,
                "b" => fan_out(&env, 100, 10, Pace::FlatOut, Duration::from_secs(5))?,
                "c" => idle(&env, args.idle_clients)?,
                other => bail!("unknown scenario {other:?}"),
            };
            row.scenario = scenario.clone();
            row.relay = relay.clone();
            eprintln!("{}", row.render());
            rows.push(row);
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
    Ok(())
}
