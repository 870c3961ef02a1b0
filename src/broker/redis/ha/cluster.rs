//! Redis Cluster: which master holds a room, and how threadchat follows
//! it when it moves.
//!
//! A cluster splits its keys into 16,384 *slots* and gives each master a
//! share of them. A key's slot is the CRC16 of its hash tag (the part in
//! `{…}`), so every key of a room, and its shard channel, is in one slot
//! (`keys.rs`), on one master. The `redis` crate's synchronous
//! `ClusterConnection` routes ordinary commands but has no pub/sub, so
//! threadchat routes by itself, with what every cluster client keeps: the
//! *slot map*, asked of any node with `CLUSTER SLOTS`.
//!
//! * **Subscriptions** connect to the master of their room's slot and use
//!   *sharded* pub/sub (`SSUBSCRIBE`; the log script `SPUBLISH`es): a
//!   room's messages stay on its shard, where classic `PUBLISH` would be
//!   copied to every node of the cluster.
//! * **Publishers and queries** keep a connection per master, and send
//!   each job to the master of its [`Route`]'s slot.
//!
//! **When a slot moves** (a resharding, a failover), the old master
//! answers commands for it with a redirection ([`Redirect`]): `MOVED` (the
//! slot is elsewhere now: the map is updated at once for that slot, and
//! marked stale), `ASK` (this one command goes to the node that is
//! importing the slot, after `ASKING`), `TRYAGAIN` (keys of one command are
//! split between the two nodes for a moment: wait, and send it again). A
//! shard channel's subscribers are sent `sunsubscribe` by the server, and a
//! master that dies drops every connection. Either way the subscription is
//! lost, its clients are told, and its reconnection asks where the slot is
//! now — the same path, and the same notices, as a Redis restart.
//!
//! A stale map is asked again at most every
//! `settings::ASK_AT_MOST_EVERY`, so that thousands of
//! subscriptions lost at once ask once.
//!
//! This file is the cluster's side of the [`Nodes`] seam: where a route
//! goes, how a publisher's batch is split by master and followed through
//! redirections, and what a refusal to subscribe means. The slot map it
//! routes by is `slot_map.rs`.

use std::sync::Arc;
use std::time::Duration;

use redis::Client;

use super::slot_map::Cluster;
use super::slots::slot;
use crate::broker::error::BrokerError;
use crate::broker::redis::job::{Job, Route, job_result};
use crate::broker::redis::keys;
use crate::broker::redis::link::Link;
use crate::broker::redis::nodes::{Around, Lines, Nodes};
use crate::broker::redis::settings::MAX_MOVES;

/// The pause before sending again jobs answered `TRYAGAIN` (a slot's keys
/// are being moved).
const TRY_AGAIN_AFTER: Duration = Duration::from_millis(20);

/// The slot of what `route` names (`None`: anywhere).
fn slot_of(route: &Route) -> Option<u16> {
    match route {
        Route::Any | Route::Node(_) => None,
        Route::Room(room) => Some(slot(keys::tag(room).as_bytes())),
        Route::Key(key) => Some(slot(key.as_bytes())),
    }
}

/// A cluster's answer that a command belongs elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Redirect {
    /// `MOVED slot host:port`: the slot is served there now.
    Moved(u16, String),
    /// `ASK slot host:port`: the slot is being moved there; send this
    /// command there, after `ASKING`.
    Ask(String),
    /// `TRYAGAIN`: the command's keys are split between the two nodes of
    /// a move in progress.
    TryAgain,
}

impl Redirect {
    /// The redirection an error reply carries (`code` is its first word).
    fn of(code: &str, details: &str) -> Option<Redirect> {
        let mut words = details.split_whitespace();
        let mut target = || {
            let slot = words.next()?.parse().ok()?;
            Some((slot, words.next()?.to_owned()))
        };
        match code {
            "MOVED" => target().map(|(slot, address)| Redirect::Moved(slot, address)),
            "ASK" => target().map(|(_, address)| Redirect::Ask(address)),
            "TRYAGAIN" => Some(Redirect::TryAgain),
            _ => None,
        }
    }

    /// The redirection in a reply, if it is one.
    fn in_value(value: &redis::Value) -> Option<Redirect> {
        match value {
            redis::Value::ServerError(e) => Redirect::of(e.code(), e.details().unwrap_or("")),
            _ => None,
        }
    }

    /// The redirection in an error read by hand (`pubsub.rs` writes a
    /// server's error reply as `Redis answered: CODE details`).
    fn in_message(message: &str) -> Option<Redirect> {
        let reply = message.split("Redis answered: ").nth(1)?;
        let (code, details) = reply.split_once(' ').unwrap_or((reply, ""));
        Redirect::of(code, details)
    }
}

/// Where a group of jobs goes: a node, and whether `ASKING` comes first
/// (an `ASK` sent them there).
#[derive(Clone, PartialEq, Eq)]
struct Destination {
    address: String,
    asking: bool,
}

/// A job to send (again): where an `ASK` said, or by its route.
struct Pending {
    job: Job,
    asked: Option<String>,
}

impl Cluster {
    /// Groups jobs by destination, keeping their order within each. A job
    /// whose slot no master serves is answered with that error.
    fn group(&self, pending: Vec<Pending>) -> Vec<(Destination, Vec<Job>)> {
        let mut groups: Vec<(Destination, Vec<Job>)> = Vec::new();
        for Pending { job, asked } in pending {
            let destination = match asked {
                Some(address) => Destination {
                    address,
                    asking: true,
                },
                None => match self.route_address(&job.route) {
                    Ok(address) => Destination {
                        address,
                        asking: false,
                    },
                    Err(e) => {
                        job.reply.send(Err(e));
                        continue;
                    }
                },
            };
            match groups.iter_mut().find(|(d, _)| *d == destination) {
                Some((_, jobs)) => jobs.push(job),
                None => groups.push((destination, vec![job])),
            }
        }
        groups
    }

    /// The address of the node for `route`.
    fn route_address(&self, route: &Route) -> Result<String, BrokerError> {
        match route {
            Route::Node(address) => Ok(address.clone()),
            route => self.address(slot_of(route)),
        }
    }

    /// Sends jobs to one node as one pipeline and answers them, except
    /// those that belong elsewhere (unless this is the `last` round):
    /// those are returned with their redirection.
    fn send_to(
        &self,
        destination: &Destination,
        jobs: Vec<Job>,
        last: bool,
        lines: &mut dyn Lines,
    ) -> Vec<(Job, Redirect)> {
        let address = destination.address.as_str();
        // A new master: connections to nodes that are no longer masters (a
        // failed-over one, say) are closed.
        if !lines.has(address)
            && let Ok(masters) = Cluster::masters(self)
        {
            lines.keep_only(&|kept| masters.iter().any(|m| m == kept));
        }
        let around: Option<&Around> = if destination.asking {
            Some(&asking)
        } else {
            None
        };
        let mut redirected = Vec::new();
        for (job, mine) in lines.send(address, jobs, around) {
            match mine.iter().find_map(Redirect::in_value) {
                Some(redirect) if !last => {
                    self.redirected(&redirect);
                    redirected.push((job, redirect));
                }
                _ => job.reply.send(job_result(mine)),
            }
        }
        redirected
    }

    /// The cluster answered that a command belongs elsewhere: for a
    /// `MOVED`, the slot map says so from now on.
    fn redirected(&self, redirect: &Redirect) {
        if let Redirect::Moved(slot, address) = redirect {
            self.moved(*slot, address);
        }
    }
}

impl Nodes for Cluster {
    fn node(&self, route: &Route) -> Result<(String, Client), BrokerError> {
        match route {
            Route::Node(address) => Ok((address.clone(), Cluster::client(self, address)?)),
            route => Cluster::node(self, slot_of(route)),
        }
    }

    fn client(&self, address: &str) -> Result<Client, BrokerError> {
        Cluster::client(self, address)
    }

    fn link(&self) -> &Link {
        Cluster::link(self)
    }

    fn masters(&self) -> Result<Vec<Route>, BrokerError> {
        Ok(Cluster::masters(self)?
            .into_iter()
            .map(Route::Node)
            .collect())
    }

    /// A room's channel is a shard channel, in its keys' slot: its
    /// messages stay on its shard, where classic `PUBLISH` would be copied
    /// to every node.
    fn sharded(&self) -> bool {
        true
    }

    /// One pipeline per master, and again where a redirection says, up to
    /// [`MAX_MOVES`] times, before the next batch is taken: a room's
    /// messages still reach it in the order they were queued.
    fn send(&self, batch: Vec<Job>, lines: &mut dyn Lines) {
        let mut pending: Vec<Pending> = batch
            .into_iter()
            .map(|job| Pending { job, asked: None })
            .collect();
        for round in 0..=MAX_MOVES {
            let mut again = Vec::new();
            let mut try_again = false;
            for (destination, jobs) in self.group(pending) {
                let redirected = self.send_to(&destination, jobs, round == MAX_MOVES, lines);
                for (job, redirect) in redirected {
                    try_again |= redirect == Redirect::TryAgain;
                    let asked = match redirect {
                        Redirect::Ask(address) => Some(address),
                        _ => None,
                    };
                    again.push(Pending { job, asked });
                }
            }
            if again.is_empty() {
                return;
            }
            if try_again {
                std::thread::sleep(TRY_AGAIN_AFTER);
            }
            pending = again;
        }
    }

    fn moved(&self, refusal: &str) -> bool {
        match Redirect::in_message(refusal) {
            Some(redirect) => {
                self.redirected(&redirect);
                true
            }
            None => false,
        }
    }

    fn unreachable(&self, address: &str) {
        Cluster::unreachable(self, address);
    }

    fn reached(&self, address: &str) {
        Cluster::reached(self, address);
    }

    fn forget(&self) {
        Cluster::forget(self);
    }

    fn describe(&self) -> String {
        Cluster::describe(self)
    }
}

/// The cluster that `seeds` belong to, as the broker's [`Nodes`].
pub fn nodes(
    seeds: &[String],
    password: Option<&str>,
    link: Link,
) -> Result<Arc<dyn Nodes>, BrokerError> {
    Ok(Arc::new(Cluster::connect(seeds, password, link)?))
}

/// `pipeline` with `ASKING` before each command (before a `MULTI` only:
/// the flag lasts through the transaction), and the indices of the
/// `ASKING`s among the replies.
fn asking(pipeline: &redis::Pipeline) -> (redis::Pipeline, Vec<usize>) {
    let mut asked = redis::pipe();
    asked.ignore_errors();
    let mut ours = Vec::new();
    let mut in_transaction = false;
    let mut count = 0;
    for cmd in pipeline.cmd_iter() {
        let name = match cmd.args_iter().next() {
            Some(redis::Arg::Simple(name)) => name.to_ascii_uppercase(),
            _ => Vec::new(),
        };
        if !in_transaction {
            ours.push(count);
            asked.add_command(redis::cmd("ASKING"));
            count += 1;
        }
        match name.as_slice() {
            b"MULTI" => in_transaction = true,
            b"EXEC" | b"DISCARD" => in_transaction = false,
            _ => {}
        }
        asked.add_command(cmd.clone());
        count += 1;
    }
    (asked, ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirections_are_read() {
        assert_eq!(
            Redirect::of("MOVED", "10294 127.0.0.1:7102"),
            Some(Redirect::Moved(10294, "127.0.0.1:7102".into()))
        );
        assert_eq!(
            Redirect::in_message("Redis answered: ASK 1 h:2"),
            Some(Redirect::Ask("h:2".into()))
        );
        assert_eq!(Redirect::of("TRYAGAIN", ""), Some(Redirect::TryAgain));
        assert_eq!(Redirect::of("ERR", "MOVED 1 h:2"), None);
        assert_eq!(Redirect::of("MOVED", "x"), None);
    }
}
