//! The publisher threads (`tc-publish-N`) and the query threads
//! (`tc-query-N`): each owns a Redis connection (on a cluster, one per
//! master) and runs the [`Job`]s queued for it, pipelined.
//!
//! On a cluster a batch is split by the master of each job's slot, one
//! pipeline per master, and a job answered with a redirection (`MOVED`,
//! `ASK`, `TRYAGAIN`; see `cluster.rs`) is sent again where it belongs, up
//! to [`MAX_REDIRECTS`] times, before the next batch is taken: a room's
//! messages still reach it in the order they were queued.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use redis::Connection;

use super::cluster::{Redirect, Route};
use super::coalesce::{Event, Plan, ScriptSettings, Work};
use super::scripts::{SCRIPTS, is_no_script, is_read_only};
use super::topology::Topology;
use super::{CONNECT_TIMEOUT, IO_TIMEOUT, MAX_PIPELINE, MAX_REDIRECTS};
use crate::broker::BrokerError;

/// The pause before sending again jobs answered `TRYAGAIN` (a slot's keys
/// are being moved).
const TRY_AGAIN_AFTER: Duration = Duration::from_millis(20);

/// Work waiting for a publisher thread, where it must run, and who waits
/// for its answer.
pub(super) struct Job {
    pub(super) work: Work,
    pub(super) route: Route,
    pub(super) reply: Reply,
}

impl Job {
    /// A job of plain commands, all of them for `route` (on a cluster,
    /// all their keys in one slot).
    pub(super) fn commands(route: Route, cmds: Vec<redis::Cmd>, reply: Reply) -> Job {
        Job {
            work: Work::Commands(cmds),
            route,
            reply,
        }
    }

    /// A job to log and publish an event of a room.
    pub(super) fn event(event: Event, reply: Reply) -> Job {
        Job {
            route: Route::room(&event.room),
            work: Work::Event(event),
            reply,
        }
    }
}

/// The outcome of one job: its commands' replies, or why it failed. An
/// error reply to any of its commands fails the job (and only that job).
pub(super) fn job_result(values: Vec<redis::Value>) -> Result<Vec<redis::Value>, BrokerError> {
    match values.iter().find_map(|v| match v {
        redis::Value::ServerError(e) => Some(e),
        _ => None,
    }) {
        Some(e) => Err(BrokerError::Refused(e.to_string())),
        None => Ok(values),
    }
}

/// Who is waiting for a [`Job`]'s answer.
pub(super) enum Reply {
    /// Nobody: fire-and-forget (heartbeats, clean-ups).
    None,
    /// A caller that wants the replies, one per command.
    Values(Sender<Result<Vec<redis::Value>, BrokerError>>),
    /// A publisher's [`Receipt`](crate::broker::Receipt): only success or failure.
    Done(Sender<Result<(), BrokerError>>),
}

impl Reply {
    pub(super) fn send(self, result: Result<Vec<redis::Value>, BrokerError>) {
        // The caller may have given up waiting; that is fine.
        match self {
            Reply::None => {}
            Reply::Values(tx) => {
                let _ = tx.send(result);
            }
            Reply::Done(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
        }
    }
}

/// One publisher thread's state: its connections, opened lazily and
/// reopened after a failure.
pub(super) struct Publisher {
    /// Where Redis is, asked whenever a connection opens.
    pub(super) topology: Arc<Topology>,
    /// The topology's [`moves`](Topology::moves) when the connections
    /// opened: if the master has moved since, they are reopened.
    pub(super) opened_at_move: u64,
    /// By node address: one for one Redis or Sentinel's master (under
    /// [`THE_SERVER`]), one per master on a cluster.
    pub(super) connections: HashMap<String, Connection>,
    /// How the rooms' logs are bounded, and how rooms publish.
    pub(super) bounds: ScriptSettings,
}

/// The connection key of the one server that is not a cluster.
const THE_SERVER: &str = "";

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

impl Publisher {
    /// The thread's loop: take all queued jobs, pipeline them, answer each.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(Pending {
                job: first,
                asked: None,
            });
            batch.extend(
                jobs.try_iter()
                    .take(MAX_PIPELINE - 1)
                    .map(|job| Pending { job, asked: None }),
            );
            self.send(batch);
        }
    }

    /// Sends a batch and answers every job in it: one pipeline per node,
    /// and again where a redirection says, until none is left.
    fn send(&mut self, mut pending: Vec<Pending>) {
        for round in 0..=MAX_REDIRECTS {
            let mut again = Vec::new();
            let mut try_again = false;
            for (destination, jobs) in self.group(pending) {
                let redirected = self.send_to(&destination, jobs, round == MAX_REDIRECTS);
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
                None => match self.topology.cluster_address(job.route) {
                    None => Destination {
                        address: THE_SERVER.to_owned(),
                        asking: false,
                    },
                    Some(Ok(address)) => Destination {
                        address,
                        asking: false,
                    },
                    Some(Err(e)) => {
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

    /// Sends jobs to one node as one pipeline and answers them, except
    /// those that belong elsewhere (unless this is the `last` round):
    /// those are returned with their redirection.
    fn send_to(
        &mut self,
        destination: &Destination,
        jobs: Vec<Job>,
        last: bool,
    ) -> Vec<(Job, Redirect)> {
        let plan = Plan::of(jobs.iter().map(|job| &job.work), &self.bounds);
        let replies = match self.execute(destination, &plan) {
            Ok(replies) => replies,
            Err(e) => {
                log::warn!("Redis command batch failed ({} job(s)): {e}", jobs.len());
                for job in jobs {
                    job.reply.send(Err(e.clone()));
                }
                return Vec::new();
            }
        };
        let mut redirected = Vec::new();
        for (job, mine) in jobs.into_iter().zip(plan.answers(&replies)) {
            match mine.iter().find_map(Redirect::in_value) {
                Some(redirect) if !last => {
                    self.topology.redirected(&redirect);
                    redirected.push((job, redirect));
                }
                _ => job.reply.send(job_result(mine)),
            }
        }
        redirected
    }

    /// Sends a plan's commands as one pipeline; an error reply fails only
    /// the jobs it answers (see [`job_result`]).
    ///
    /// A connection that turns out to have been closed (say Redis restarted
    /// since the last batch) is replaced, and the batch sent once more: the
    /// closed connection carried nothing to Redis. A batch that Redis does
    /// not answer in time is *not* sent again — a paused or overloaded
    /// Redis may still carry it out — and its outcome is
    /// [`BrokerError::Uncertain`].
    fn execute(
        &mut self,
        destination: &Destination,
        plan: &Plan,
    ) -> Result<Vec<redis::Value>, BrokerError> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let asked;
        let (pipe, ours) = if destination.asking {
            asked = asking(&plan.pipeline);
            (&asked.0, asked.1.as_slice())
        } else {
            (&plan.pipeline, &[][..])
        };
        let address = destination.address.as_str();
        let mut last_error = None;
        for _attempt in 0..2 {
            let con = self.connection(address)?;
            match pipe.query::<Vec<redis::Value>>(con) {
                Ok(replies) => {
                    // A script flushed from Redis (`SCRIPT FLUSH`): load it
                    // again on a fresh connection for the next batch.
                    if replies.iter().any(is_no_script) {
                        self.connections.remove(address);
                    }
                    // A master turned replica (a Sentinel failover): the
                    // next batch goes to the master the sentinels name.
                    if replies.iter().any(is_read_only) {
                        self.connections.remove(address);
                        self.topology.forget();
                    }
                    // Without the replies to our own `ASKING`s.
                    return Ok(replies
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| !ours.contains(i))
                        .map(|(_, reply)| reply)
                        .collect());
                }
                Err(e) => {
                    self.connections.remove(address);
                    self.topology.unreachable(address);
                    if e.is_timeout() {
                        return Err(BrokerError::Uncertain(e.to_string()));
                    }
                    last_error = Some(BrokerError::Redis(e.to_string()));
                    if !e.is_connection_dropped() {
                        break;
                    }
                }
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }

    /// The connection to `address` ([`THE_SERVER`] for the one server),
    /// opened (and the script loaded) if need be.
    fn connection(&mut self, address: &str) -> Result<&mut Connection, BrokerError> {
        if self.opened_at_move != self.topology.moves() {
            self.opened_at_move = self.topology.moves();
            self.connections.clear();
        }
        if !self.connections.contains_key(address) {
            let client = if address == THE_SERVER {
                self.topology.node(Route::Any)?.1
            } else {
                // A cluster's new master: connections to nodes that are no
                // longer masters (a failed-over one, say) are closed.
                if let Ok(masters) = self.topology.masters() {
                    self.connections.retain(|kept, _| {
                        masters
                            .iter()
                            .any(|(m, _)| m.as_deref() == Some(kept.as_str()))
                    });
                }
                self.topology.client(address)?
            };
            let con = client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .and_then(|mut con| {
                    con.set_read_timeout(Some(IO_TIMEOUT))?;
                    con.set_write_timeout(Some(IO_TIMEOUT))?;
                    for script in SCRIPTS {
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script)
                            .query::<String>(&mut con)?;
                    }
                    Ok(con)
                })
                .map_err(|e| {
                    self.topology.unreachable(address);
                    BrokerError::Redis(e.to_string())
                })?;
            self.topology.reached(address);
            self.connections.insert(address.to_owned(), con);
        }
        Ok(self.connections.get_mut(address).expect("just opened"))
    }
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
