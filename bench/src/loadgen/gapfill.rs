//! Scenario `k`: **the gap fill's cost.** A room of 1,000 clients on one
//! instance, a sender in it at 20 messages a second. Twice, the instance's
//! subscriptions are cut (`CLIENT KILL TYPE pubsub`) and held down for 5 s
//! (Redis takes no new connection: `maxclients` at the count it has):
//! first with the sender quiet (what restoring costs by itself), then with
//! it sending (a 5 s gap, about 100 messages, to fill from the log for
//! every client). Reported for each: how long after Redis takes
//! connections again every client has everything, and a message sent once
//! every subscription is back (back-off included:
//! subscriptions held down 5 s wait up to about 3 s more), the server's CPU
//! meanwhile, the log reads it made (`LRANGE`s), and what the clients
//! lost or got twice. Redis relays only, one Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use super::Args;
use super::client::{connect, connect_all, now_micros};
use super::env::{Env, cpu_ticks};
use super::receive::{RECEIVER_THREADS, Receiving, Seen, receive};

/// Clients in the room.
const CLIENTS: usize = 1000;
/// How long subscriptions are held down.
const GAP: Duration = Duration::from_secs(5);
/// The sender's pace.
const PER_SECOND: u64 = 20;

/// Runs the scenario; returns the measured column.
pub(super) fn gap_fill(args: &Args, relay: &str) -> anyhow::Result<String> {
    if relay == "memory" || relay.starts_with("redis-cluster") {
        return Ok("n/a (one Redis only; the in-process relay never loses)".into());
    }
    let env = Env::start(args, relay, &["--history", "1000"])?;
    let url = env.redis_url().expect("a Redis relay");
    let mut redis = redis::Client::open(url.as_str())?.get_connection()?;
    let (_, maxclients): (String, u64) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query(&mut redis)?;
    let (clients, _) = connect_all(env.addr, None, CLIENTS, "gap")?;
    let receiving = clients
        .into_iter()
        .enumerate()
        .map(|(i, ws)| Receiving::new(i, ws, 1))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let mut shares: Vec<Vec<Receiving>> = (0..RECEIVER_THREADS).map(|_| Vec::new()).collect();
    for (i, client) in receiving.into_iter().enumerate() {
        shares[i % RECEIVER_THREADS].push(client);
    }
    let receivers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let (stop, delivered, progress) = (
                Arc::clone(&stop),
                Arc::clone(&delivered),
                Arc::clone(&progress),
            );
            thread::spawn(move || receive(share, &stop, &delivered, &progress))
        })
        .collect();

    // The sender: sends while `sending`, numbering every message.
    let mut sender = connect(env.addr, "sender", "gap")?;
    let sending = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender_thread = {
        let (stop, sending, sent) = (Arc::clone(&stop), Arc::clone(&sending), Arc::clone(&sent));
        sender
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(1)))?;
        thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if sending.load(Ordering::Relaxed) {
                    let seq = sent.load(Ordering::Relaxed);
                    let body = format!("0:{seq}:{}", now_micros());
                    if sender.send(Message::text(body)).is_err() {
                        return;
                    }
                    sent.store(seq + 1, Ordering::Relaxed);
                }
                // Its own socket must be read, or its frames back it up.
                while sender.read().is_ok() {}
                next += Duration::from_millis(1000 / PER_SECOND);
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };

    let channel = "threadchat:room:gap";
    let subscriptions = |redis: &mut redis::Connection| -> u64 {
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query::<(String, u64)>(redis)
            .map_or(0, |(_, n)| n)
    };
    let before = subscriptions(&mut redis);
    sending.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_secs(1));
    sending.store(false, Ordering::Relaxed);
    let mut rows = Vec::new();
    for (label, send_meanwhile) in [("no gap", false), ("5 s gap", true)] {
        wait_all(&progress, sent.load(Ordering::Relaxed))?;
        hold_down(&mut redis)?;
        sending.store(send_meanwhile, Ordering::Relaxed);
        thread::sleep(GAP);
        sending.store(false, Ordering::Relaxed);
        let expected = sent.load(Ordering::Relaxed);
        let lranges = lrange_calls(&mut redis);
        let (cpu, t) = (cpu_ticks(env.pid()), Instant::now());
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(maxclients)
            .query::<()>(&mut redis)?;
        let deadline = t + Duration::from_secs(60);
        while subscriptions(&mut redis) < before {
            anyhow::ensure!(Instant::now() < deadline, "subscriptions did not come back");
            thread::sleep(Duration::from_millis(5));
        }
        // One message more, sent once every subscription is back: it comes
        // live, after whatever the fills deliver.
        sending.store(true, Ordering::Relaxed);
        while sent.load(Ordering::Relaxed) <= expected {
            thread::sleep(Duration::from_millis(1));
        }
        sending.store(false, Ordering::Relaxed);
        wait_all(&progress, expected + 1)?;
        let elapsed = t.elapsed();
        let cpu_ms = (cpu_ticks(env.pid()) - cpu) * 10;
        let reads = lrange_calls(&mut redis) - lranges;
        rows.push(format!(
            "{label}: all back in {:.0} ms, server CPU {cpu_ms} ms, {reads} log reads",
            elapsed.as_secs_f64() * 1000.0
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sender_thread.join();
    let mut seen = Seen::default();
    for receiver in receivers {
        let share = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("a receiver panicked"))??;
        for s in share {
            seen.lost += s.lost;
            seen.duplicates += s.duplicates;
        }
    }
    rows.push(format!(
        "lost {}, duplicates {}",
        seen.lost, seen.duplicates
    ));
    Ok(rows.join("; "))
}

/// Waits until every client has had `count` of the sender's messages.
fn wait_all(progress: &[AtomicU64], count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.iter().any(|p| p.load(Ordering::Relaxed) < count) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the clients did not get every message"
        );
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Cuts every subscription and keeps them from coming back: Redis takes
/// no new connection until `maxclients` is raised again.
fn hold_down(redis: &mut redis::Connection) -> anyhow::Result<()> {
    let all: String = redis::cmd("CLIENT").arg("LIST").query(redis)?;
    let subscribers: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(redis)?;
    let staying = all.lines().count() - subscribers.lines().count();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(staying)
        .query::<()>(redis)?;
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query::<u64>(redis)?;
    Ok(())
}

/// How many `LRANGE`s Redis has run (`INFO commandstats`).
fn lrange_calls(redis: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(redis)
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_lrange:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}
