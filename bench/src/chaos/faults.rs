//! The faults, and the seeded schedule that runs them: each fault, then a
//! calm spell, in an order and with durations drawn from the seed, so a
//! run can be repeated with `SEED=…`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::fault::Fault;
use super::harness::Harness;
use super::rng::Rng;

/// One fault as it ran: messages sent from `start` to `end` plus
/// [`SETTLE`] are counted against it.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    pub(crate) fault: Fault,
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    pub(crate) what: String,
}

/// How long after a fault its effects are still counted as its own (an
/// instance's Redis reconnect backs off for up to a couple of seconds).
pub(crate) const SETTLE: Duration = Duration::from_secs(3);

/// Runs faults until `until`: rounds of every fault in `faults`, each round
/// shuffled, each fault followed by a calm spell.
pub(crate) fn run_schedule(
    harness: &mut Harness,
    faults: &[Fault],
    rng: &mut Rng,
    until: Instant,
) -> anyhow::Result<Vec<Window>> {
    let mut windows = Vec::new();
    if faults.is_empty() {
        // Every fault asked for was skipped: the run is calm throughout.
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        return Ok(windows);
    }
    'rounds: loop {
        let mut round = faults.to_vec();
        rng.shuffle(&mut round);
        for fault in round {
            if Instant::now() >= until {
                break 'rounds;
            }
            let start = Instant::now();
            let what = inject(harness, fault, rng)?;
            eprintln!("chaos: {} ({what})", fault.name());
            windows.push(Window {
                fault,
                start,
                end: Instant::now(),
                what,
            });
            std::thread::sleep(SETTLE + rng.millis(1_000, 3_000));
        }
    }
    Ok(windows)
}

/// Injects one fault; returns what it did, for the log.
fn inject(harness: &mut Harness, fault: Fault, rng: &mut Rng) -> anyhow::Result<String> {
    Ok(match fault {
        Fault::ClientKill => {
            let n = harness.topology.kill_clients("pubsub")?;
            format!("{n} subscribers cut")
        }
        Fault::KillPublishers => {
            let n = harness.topology.kill_clients("normal")?;
            format!("{n} publishing and query connections cut")
        }
        Fault::Stall => {
            let pause = rng.millis(2_000, 6_000);
            harness.topology.stall(pause, rng, &harness.room_names())?
        }
        Fault::RestartEmpty | Fault::RestartKept => {
            let keep = fault == Fault::RestartKept;
            if !keep {
                // What the log held is about to go: the checker needs it.
                harness.read_logs()?;
            }
            let down = rng.millis(500, 3_000);
            harness.topology.one()?.restart(keep, down)?;
            format!("Redis down for {} ms", down.as_millis())
        }
        Fault::KillInstance => {
            let live: Vec<usize> = (0..harness.instances.len())
                .filter(|&i| harness.instances[i].is_some())
                .collect();
            let victim = live[rng.range(0, live.len() as u64 - 1) as usize];
            let dead = harness.instances[victim].take().expect("live");
            let mode = dead.mode;
            harness.directory.set(victim, None);
            dead.kill();
            // A new instance of the same mode takes its place (clients
            // have moved on already; new reconnects may land there).
            std::thread::sleep(rng.millis(500, 2_000));
            let fresh = harness.start_instance(victim, mode)?;
            harness.directory.set(victim, Some(fresh.addr));
            harness.instances[victim] = Some(fresh);
            format!("instance {victim} ({}) killed and replaced", mode.name())
        }
        Fault::DropClients => {
            let n = rng.range(1, harness.drops.len().min(3) as u64) as usize;
            let mut order: Vec<usize> = (0..harness.drops.len()).collect();
            rng.shuffle(&mut order);
            let mut picked = Vec::new();
            for &i in &order[..n] {
                harness.drops[i].store(true, Ordering::Relaxed);
                picked.push(harness.nicks[i].clone());
            }
            format!("dropped {}", picked.join(", "))
        }
        Fault::SentinelFailover => {
            let rooms = harness.room_names();
            harness.topology.sentinel_failover(rng, &rooms)?
        }
        Fault::ClusterFailover => {
            let rooms = harness.room_names();
            harness.topology.cluster_failover(rng, &rooms)?
        }
        Fault::Migrate => {
            let rooms = harness.room_names();
            harness.topology.migrate(rng, &rooms)?
        }
        Fault::LinkCut | Fault::LinkSlow | Fault::LinkLossy => {
            let link = harness.topology.link().ok_or_else(|| {
                anyhow::anyhow!("{} needs the link (see link::prepare)", fault.name())
            })?;
            super::link::inject(link, harness.instances.len(), fault, rng)?
        }
    })
}
