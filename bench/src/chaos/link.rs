//! The link between the instances and Redis, made by the harness so that
//! it can be cut, slowed and made lossy (`link-cut`, `link-slow`,
//! `link-lossy`).
//!
//! Redis runs in a network namespace of its own (`ip netns exec NS
//! redis-server`). A veth pair joins it to the root namespace for each
//! instance slot, and one more for the harness itself:
//!
//! ```text
//!   root namespace                        namespace tcchaos-PID
//!   harness   ─ tcc{PID}r0 ═══ tcc{PID}n0 ─┐
//!   instance 0 ─ tcc{PID}r1 ═══ tcc{PID}n1 ─┤ redis-server
//!   instance 1 ─ tcc{PID}r2 ═══ tcc{PID}n2 ─┘ (bound to every n-side address)
//! ```
//!
//! Each pair is a /30 of its own in 169.254.X.0/24 (link-local, never
//! routed), so instance `i` reaches Redis only through pair `i + 1`: one
//! instance's link can be hurt while the others are fine, and the
//! harness's own connection (reading logs, `CLIENT KILL`) is never hurt.
//! Clients still reach the instances on 127.0.0.1.
//!
//! A cut takes the namespace's end of the pair down: the root end loses
//! its carrier and drops what it is given, silently, the way a pulled
//! cable does (taking the root end down instead would remove its route,
//! and the kernel could send Redis's address out of the default route).
//! Slow and lossy are `tc netem` on both ends. Where `sch_netem` is
//! missing, `link-slow` narrows the link with `tbf` instead (a slow link
//! by bandwidth, not by delay), and `link-lossy` drops packets at random
//! with `iptables -m statistic` inside the namespace (the root namespace's
//! firewall is never touched), or is skipped when there is no `iptables`.
//!
//! Everything is named with the harness's pid, removed on drop (also when
//! the run ends in an error) and on Ctrl-C or `kill` (a thread waits for
//! SIGINT and SIGTERM), and a later run removes what a `kill -9`ed run left
//! behind (a namespace or link whose pid is gone).

use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use super::fault::Fault;
use super::rng::Rng;

/// What every namespace the harness makes is called, before its pid.
const NS_PREFIX: &str = "tcchaos-";
/// What every veth end the harness makes is called, before its pid.
const LINK_PREFIX: &str = "tcc";

/// Redis's namespace, and one veth pair per user of Redis: pair 0 is the
/// harness's, pair `i + 1` instance slot `i`'s.
pub(crate) struct Link {
    ns: String,
    pairs: Vec<Pair>,
    /// Whether `tc qdisc … netem` works here (else `link-slow` uses
    /// `tbf`, and `link-lossy` `iptables`).
    netem: bool,
    /// Whether `iptables` works in the namespace (for `link-lossy`
    /// without netem).
    iptables: bool,
    /// The thread that cleans up and exits on SIGINT or SIGTERM, and how
    /// to stop it (closing the handle ends its wait).
    on_signal: Option<(Handle, thread::JoinHandle<()>)>,
}

/// One veth pair: `outer` in the root namespace, `inner` in Redis's.
struct Pair {
    outer: String,
    inner: String,
    inner_addr: Ipv4Addr,
}

/// How a link is hurt while it stays up.
enum Shape {
    /// `netem delay` (ms) with jitter (ms), on both ends.
    Delay(u64, u64),
    /// `tbf` at this many kbit/s on both ends, for a kernel without netem.
    Narrow(u64),
    /// `netem loss` (percent), on both ends.
    Loss(u64),
    /// `iptables … statistic` drops (percent) each way, in the namespace,
    /// for a kernel without netem.
    Drop(u64),
}

impl Shape {
    /// The words after `tc qdisc replace dev DEV root`, or `None` for a
    /// shape made with `iptables`.
    fn qdisc(&self) -> Option<String> {
        match *self {
            Shape::Delay(ms, jitter) => Some(format!("netem delay {ms}ms {jitter}ms")),
            Shape::Narrow(kbit) => Some(format!("tbf rate {kbit}kbit burst 4kb latency 2s")),
            Shape::Loss(percent) => Some(format!("netem loss {percent}%")),
            Shape::Drop(_) => None,
        }
    }

    fn describe(&self) -> String {
        match *self {
            Shape::Delay(ms, jitter) => format!("delayed {ms} ± {jitter} ms each way (netem)"),
            Shape::Narrow(kbit) => format!("narrowed to {kbit} kbit/s (tbf)"),
            Shape::Loss(percent) => format!("losing {percent} % each way (netem)"),
            Shape::Drop(percent) => format!("losing {percent} % each way (iptables)"),
        }
    }
}

/// Makes the link when one of `faults` needs it; otherwise, or when the
/// machine does not allow it, removes the link faults from `faults` and
/// says why in one line.
pub(crate) fn prepare(faults: &mut Vec<Fault>, slots: usize) -> Option<Link> {
    if !faults.iter().any(|f| f.is_link()) {
        return None;
    }
    let link = match Link::create(slots) {
        Ok(link) => link,
        Err(why) => {
            eprintln!("chaos: link faults skipped: {why}");
            faults.retain(|f| !f.is_link());
            return None;
        }
    };
    if !link.netem && faults.contains(&Fault::LinkSlow) {
        eprintln!("chaos: link-slow narrows the link with tbf: no sch_netem in this kernel");
    }
    if !link.netem && faults.contains(&Fault::LinkLossy) {
        if link.iptables {
            eprintln!("chaos: link-lossy drops with iptables: no sch_netem in this kernel");
        } else {
            eprintln!("chaos: link-lossy skipped: no sch_netem in this kernel, and no iptables");
            faults.retain(|&f| f != Fault::LinkLossy);
        }
    }
    Some(link)
}

impl Link {
    /// Sweeps what killed runs left, then makes the namespace and
    /// `slots + 1` pairs. `Err` is the reason, in a few words.
    fn create(slots: usize) -> Result<Link, String> {
        if !is_root() {
            return Err("not root (namespaces and veth pairs need root)".to_owned());
        }
        ensure_tool("ip", &["-V"])?;
        ensure_tool("tc", &["-V"])?;
        sweep();
        let pid = std::process::id();
        let ns = format!("{NS_PREFIX}{pid}");
        run("ip", &["netns", "add", &ns]).map_err(|e| format!("cannot make a namespace ({e})"))?;
        let mut link = Link {
            ns,
            pairs: Vec::new(),
            netem: false,
            iptables: false,
            on_signal: None,
        };
        link.on_signal = Some(clean_up_on_signal().map_err(|e| format!("signals: {e}"))?);
        let net = free_net().ok_or("no free 169.254.X.0/24 for the veth pairs")?;
        for k in 0..=slots.min(62) {
            let pair = Pair {
                outer: format!("{LINK_PREFIX}{pid}r{k}"),
                inner: format!("{LINK_PREFIX}{pid}n{k}"),
                inner_addr: Ipv4Addr::new(169, 254, net, 4 * k as u8 + 2),
            };
            let outer_addr = format!("169.254.{net}.{}/30", 4 * k + 1);
            let inner_addr = format!("{}/30", pair.inner_addr);
            // Pushed first, so that drop removes a half-made pair too.
            link.pairs.push(pair);
            let pair = link.pairs.last().expect("pushed");
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &pair.outer,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &pair.inner,
                    "netns",
                    &link.ns,
                ],
            )
            .map_err(|e| format!("cannot make a veth pair ({e})"))?;
            run("ip", &["addr", "add", &outer_addr, "dev", &pair.outer])
                .and_then(|_| run("ip", &["link", "set", &pair.outer, "up"]))
                .and_then(|_| link.in_ns(&["ip", "addr", "add", &inner_addr, "dev", &pair.inner]))
                .and_then(|_| link.in_ns(&["ip", "link", "set", &pair.inner, "up"]))
                .map_err(|e| format!("cannot set up {} ({e})", pair.outer))?;
        }
        link.in_ns(&["ip", "link", "set", "lo", "up"])
            .map_err(|e| format!("cannot set up the namespace ({e})"))?;
        let probe = &link.pairs[0].outer;
        link.netem = run("tc", &["qdisc", "add", "dev", probe, "root", "netem"]).is_ok();
        let _ = run("tc", &["qdisc", "del", "dev", probe, "root"]);
        link.iptables = link.in_ns(&["iptables", "-S"]).is_ok();
        Ok(link)
    }

    /// The namespace Redis runs in.
    pub(crate) fn ns(&self) -> &str {
        &self.ns
    }

    /// The addresses Redis listens on (one per pair).
    pub(crate) fn redis_addrs(&self) -> Vec<Ipv4Addr> {
        self.pairs.iter().map(|p| p.inner_addr).collect()
    }

    /// The address of Redis as the harness reaches it (never hurt).
    pub(crate) fn harness_addr(&self) -> Ipv4Addr {
        self.pairs[0].inner_addr
    }

    /// The address of Redis as instance slot `slot` reaches it.
    pub(crate) fn addr_for(&self, slot: usize) -> Ipv4Addr {
        self.pairs[(slot + 1).min(self.pairs.len() - 1)].inner_addr
    }

    fn in_ns(&self, command: &[&str]) -> Result<String, String> {
        let mut args = vec!["netns", "exec", &self.ns];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    fn set_up(&self, slot: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        self.in_ns(&["ip", "link", "set", &self.pairs[slot + 1].inner, state])
            .map(drop)
    }

    /// Hurts (`on`) or heals slot `slot`'s link with `shape`.
    fn shape(&self, slot: usize, shape: &Shape, on: bool) -> Result<(), String> {
        let pair = &self.pairs[slot + 1];
        let Some(qdisc) = shape.qdisc() else {
            let Shape::Drop(percent) = *shape else {
                unreachable!("only drops are made without a qdisc")
            };
            let p = format!("{:.2}", percent as f64 / 100.0);
            let verb = if on { "-A" } else { "-D" };
            for (chain, way) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
                self.in_ns(&[
                    "iptables",
                    verb,
                    chain,
                    way,
                    &pair.inner,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ])?;
            }
            return Ok(());
        };
        for (dev, in_ns) in [(&pair.outer, false), (&pair.inner, true)] {
            let mut command = vec!["tc", "qdisc"];
            if on {
                command.extend(["replace", "dev", dev, "root"]);
                command.extend(qdisc.split(' '));
            } else {
                command.extend(["del", "dev", dev, "root"]);
            }
            if in_ns {
                self.in_ns(&command)?;
            } else {
                run(command[0], &command[1..])?;
            }
        }
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some((handle, thread)) = self.on_signal.take() {
            handle.close();
            let _ = thread.join();
        }
        remove(std::process::id());
    }
}

/// Removes the namespace and links of the run with pid `pid`, stopping
/// what still runs inside the namespace. Deleting one end of a veth pair
/// deletes the other.
fn remove(pid: u32) {
    let ns = format!("{NS_PREFIX}{pid}");
    let pids = run("ip", &["netns", "pids", &ns]).unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = run("kill", &["-KILL", pid]);
    }
    let own = format!("{LINK_PREFIX}{pid}r");
    for name in links() {
        if name
            .strip_prefix(&own)
            .is_some_and(|k| k.parse::<u32>().is_ok())
        {
            let _ = run("ip", &["link", "del", &name]);
        }
    }
    let _ = run("ip", &["netns", "del", &ns]);
}

/// Starts the thread that, on SIGINT or SIGTERM, stops the harness's
/// children (Redis, the instances), removes this run's namespace and links,
/// and exits.
fn clean_up_on_signal() -> std::io::Result<(Handle, thread::JoinHandle<()>)> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let thread = thread::Builder::new()
        .name("link-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!("chaos: stopped by signal {signal}; removing the namespace");
                for child in children() {
                    let _ = run("kill", &["-KILL", &child.to_string()]);
                }
                remove(std::process::id());
                std::process::exit(128 + signal);
            }
        })?;
    Ok((handle, thread))
}

/// The pids of this process's children (from `/proc/*/stat`).
fn children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // "pid (comm) state ppid …": the comm may hold spaces.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
            after.split_whitespace().nth(1) == Some(me.as_str())
        })
        .collect()
}

/// The names of the network interfaces in the root namespace.
fn links() -> Vec<String> {
    let out = run("ip", &["-o", "link", "show"]).unwrap_or_default();
    // "7: tcc123r0@if6: <…>"
    out.lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// Injects a link fault into one instance's link, or all of them (drawn
/// from the seed); returns what it did, for the log.
pub(crate) fn inject(
    link: &Link,
    slots: usize,
    fault: Fault,
    rng: &mut Rng,
) -> anyhow::Result<String> {
    let pick = rng.range(0, slots as u64) as usize;
    let victims: Vec<usize> = if pick == slots {
        (0..slots).collect()
    } else {
        vec![pick]
    };
    let whom = if pick == slots {
        "every instance".to_owned()
    } else {
        format!("instance {pick}")
    };
    // Cuts reach past the instance's 5 s Redis timeout now and then.
    let length = match fault {
        Fault::LinkCut => rng.millis(2_000, 12_000),
        _ => rng.millis(3_000, 8_000),
    };
    let what = match fault {
        Fault::LinkCut => {
            for &slot in &victims {
                link.set_up(slot, false).map_err(anyhow::Error::msg)?;
            }
            std::thread::sleep(length);
            for &slot in &victims {
                link.set_up(slot, true).map_err(anyhow::Error::msg)?;
            }
            format!("{whom}'s link to Redis cut for {} ms", length.as_millis())
        }
        Fault::LinkSlow | Fault::LinkLossy => {
            let (delay, kbit, loss) = (rng.range(100, 300), rng.range(16, 64), rng.range(2, 10));
            let shape = match fault {
                Fault::LinkLossy if link.netem => Shape::Loss(loss),
                Fault::LinkLossy => Shape::Drop(loss),
                _ if link.netem => Shape::Delay(delay, delay / 4),
                _ => Shape::Narrow(kbit),
            };
            for &slot in &victims {
                link.shape(slot, &shape, true).map_err(anyhow::Error::msg)?;
            }
            std::thread::sleep(length);
            for &slot in &victims {
                link.shape(slot, &shape, false)
                    .map_err(anyhow::Error::msg)?;
            }
            format!(
                "{whom}'s link to Redis {} for {} ms",
                shape.describe(),
                length.as_millis()
            )
        }
        _ => anyhow::bail!("{} is not a link fault", fault.name()),
    };
    Ok(what)
}

/// Runs `program` with `args`; `Err` holds its complaint.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let said = String::from_utf8_lossy(&out.stderr);
        Err(format!("{program} {}: {}", args.join(" "), said.trim()))
    }
}

fn ensure_tool(program: &str, args: &[&str]) -> Result<(), String> {
    Command::new(program)
        .args(args)
        .output()
        .map(drop)
        .map_err(|_| format!("no `{program}` on the PATH (apt-get install iproute2)"))
}

/// Whether this process runs as root (`Uid:` in `/proc/self/status`; a
/// machine without it is not one where namespaces can be made either).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Removes the namespaces and links of runs whose process is gone, and
/// stops what still ran inside such a namespace (a Redis left by a run
/// killed with `kill -9`).
fn sweep() {
    // The pid in a name of ours, when that process is gone (or a zombie).
    let dead = |name: &str, prefix: &str| -> Option<u32> {
        let rest = name.strip_prefix(prefix)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let pid = digits.parse().ok()?;
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = state
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z'));
        gone.then_some(pid)
    };
    let namespaces = run("ip", &["netns", "list"]).unwrap_or_default();
    for ns in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if let Some(pid) = dead(ns, NS_PREFIX) {
            remove(pid);
            eprintln!("chaos: removed namespace {ns}, left by a run that was killed");
        }
    }
    for name in links() {
        if let Some(pid) = dead(&name, LINK_PREFIX) {
            remove(pid);
        }
    }
}

/// A 169.254.X.0/24 that no address or route here uses yet (X in
/// 100..=199, started from the pid; never 169, where clouds keep their
/// metadata service).
fn free_net() -> Option<u8> {
    let taken = run("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default()
        + &run("ip", &["-4", "route", "show"]).unwrap_or_default();
    let start = std::process::id() as u64;
    (0..100)
        .map(|i| 100 + ((start + i) % 100) as u8)
        .find(|&x| x != 169 && !taken.contains(&format!("169.254.{x}.")))
}
