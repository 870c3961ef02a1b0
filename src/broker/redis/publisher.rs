//! The publisher threads (`tc-publish-N`) and the query threads
//! (`tc-query-N`): each owns its Redis connections and runs the [`Job`]s
//! queued for it, pipelined.
//!
//! A thread takes every job that is waiting (up to [`MAX_PIPELINE`]) and
//! hands the batch to the [`Nodes`], which say where each job goes: with
//! one Redis, all of them in one pipeline on one connection ([`Lines`]).
//! Redis answers one connection's commands in order, so a room's messages
//! reach it in the order they were queued.

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use redis::Connection;

use super::coalesce::{Plan, ScriptSettings, Sent, Work};
use super::job::{Job, job_result};
use super::nodes::{Answered, Around, Lines, Nodes};
use super::scripts::{SCRIPTS, is_no_script, is_read_only};
use super::settings::{CONNECT_TIMEOUT, IO_TIMEOUT, MAX_PIPELINE};
use crate::broker::MemberChange;
use crate::broker::error::BrokerError;

/// One publisher thread's state: its connections, opened lazily and
/// reopened after a failure.
pub(super) struct Publisher {
    /// Where Redis is, asked whenever a connection opens.
    nodes: Arc<dyn Nodes>,
    /// The nodes' [`moves`](Nodes::moves) when the connections opened: if
    /// the master has moved since, they are reopened.
    opened_at_move: u64,
    /// By node address (one, under `THE_SERVER`, with one Redis).
    connections: HashMap<String, Connection>,
    /// How the rooms' logs are bounded, and how rooms publish.
    bounds: ScriptSettings,
}

impl Publisher {
    /// A publisher with no connection yet.
    pub(super) fn new(nodes: Arc<dyn Nodes>, bounds: ScriptSettings) -> Publisher {
        Publisher {
            nodes,
            opened_at_move: 0,
            connections: HashMap::new(),
            bounds,
        }
    }

    /// The thread's loop: take all queued jobs, pipeline them, answer each.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        let nodes = Arc::clone(&self.nodes);
        while let Ok(first) = jobs.recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            batch.extend(jobs.try_iter().take(MAX_PIPELINE - 1));
            nodes.send(batch, &mut self);
        }
    }

    /// Sends a plan's commands as one pipeline; an error reply fails only
    /// the jobs it answers (see [`job_result`]).
    ///
    /// A connection that turns out to have been closed (say Redis restarted
    /// since the last batch) is replaced, and the batch sent once more, as
    /// `again` lays it out: the closed connection most likely carried
    /// nothing to Redis, and if it did (killed after Redis carried the
    /// batch out), the scripts skip what is done. If the batch cannot be
    /// sent again either, its outcome is [`BrokerError::Uncertain`], not a
    /// failure. A
    /// batch that Redis does not answer in time is *not* sent again — a
    /// paused or overloaded Redis may still carry it out — and its outcome
    /// is [`BrokerError::Uncertain`] too.
    fn execute(
        &mut self,
        address: &str,
        plan: &Plan,
        again: &dyn Fn() -> Plan,
        around: Option<&Around>,
    ) -> Result<Vec<redis::Value>, BrokerError> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let mut dropped: Option<String> = None;
        for _attempt in 0..2 {
            // Sent again, the scripts skip what Redis carried out already.
            let resent;
            let plan = match dropped {
                None => plan,
                Some(_) => {
                    resent = again();
                    &resent
                }
            };
            let made;
            let (pipe, ours) = match around {
                Some(around) => {
                    made = around(&plan.pipeline);
                    (&made.0, made.1.as_slice())
                }
                None => (&plan.pipeline, &[][..]),
            };
            let con = match (self.connection(address), dropped.as_deref()) {
                (Ok(con), _) => con,
                (Err(e), None) => return Err(e),
                (Err(e), Some(first)) => return Err(uncertain_after(first, &e)),
            };
            match pipe.query::<Vec<redis::Value>>(con) {
                Ok(replies) => {
                    // A script flushed from Redis (`SCRIPT FLUSH`): load it
                    // again on a fresh connection for the next batch.
                    if replies.iter().any(is_no_script) {
                        self.connections.remove(address);
                    }
                    // A master turned replica: the next batch goes to
                    // wherever the master is now.
                    if replies.iter().any(is_read_only) {
                        self.connections.remove(address);
                        self.nodes.forget();
                    }
                    return Ok(replies
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| !ours.contains(i))
                        .map(|(_, reply)| reply)
                        .collect());
                }
                Err(e) => {
                    self.connections.remove(address);
                    self.nodes.unreachable(address);
                    if e.is_timeout() {
                        return Err(BrokerError::Uncertain(format!(
                            "Redis did not answer in time ({e})"
                        )));
                    }
                    let error = BrokerError::Redis(e.to_string());
                    match dropped.as_deref() {
                        Some(first) => return Err(uncertain_after(first, &error)),
                        None if e.is_connection_dropped() => dropped = Some(e.to_string()),
                        None => return Err(error),
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// The connection to `address`, opened (and the scripts loaded) if
    /// need be.
    fn connection(&mut self, address: &str) -> Result<&mut Connection, BrokerError> {
        if self.opened_at_move != self.nodes.moves() {
            self.opened_at_move = self.nodes.moves();
            self.connections.clear();
        }
        if !self.connections.contains_key(address) {
            let con = self
                .nodes
                .client(address)?
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
                    self.nodes.unreachable(address);
                    BrokerError::Redis(e.to_string())
                })?;
            self.nodes.reached(address);
            self.connections.insert(address.to_owned(), con);
        }
        Ok(self.connections.get_mut(address).expect("just opened"))
    }
}

/// The outcome of a batch whose connection closed while it was sent
/// (`first`), and that could not be sent again (`then`): Redis may have
/// carried it out before the connection closed.
fn uncertain_after(first: &str, then: &BrokerError) -> BrokerError {
    BrokerError::Uncertain(format!(
        "the connection to Redis closed before it answered ({first}), and then: {then}"
    ))
}

impl Lines for Publisher {
    fn send(&mut self, address: &str, jobs: Vec<Job>, around: Option<&Around>) -> Vec<Answered> {
        let works = || jobs.iter().map(|job| &job.work);
        let plan = Plan::of(works(), &self.bounds, Sent::First);
        let bounds = self.bounds;
        let again = || Plan::of(works(), &bounds, Sent::Again);
        match self.execute(address, &plan, &again, around) {
            Ok(replies) => {
                let short = plan.short_of_replicas(&replies);
                let answered = jobs.into_iter().zip(plan.answers(&replies));
                let Some(short) = short else {
                    return answered.collect();
                };
                // Chat messages Redis carried out, but that its replicas
                // may not have: their senders are told the truth, "may or
                // may not". (A join or leave a failover loses is put right
                // by the heartbeat's reconciliation, `ghosts.rs`; failing
                // it would refuse every join while a replica is away.)
                answered
                    .filter_map(|(job, values)| {
                        let carried_out = matches!(&job.work, Work::Event(event) if event.change == MemberChange::None)
                            && job_result(values.clone()).is_ok();
                        if !carried_out {
                            return Some((job, values));
                        }
                        job.reply.send(Err(BrokerError::Uncertain(short.clone())));
                        None
                    })
                    .collect()
            }
            Err(e) => {
                let n = jobs.len();
                super::outage::warn_repeated("publish", || {
                    format!("Redis command batch failed ({n} job(s)): {e}")
                });
                for job in jobs {
                    job.reply.send(Err(e.clone()));
                }
                Vec::new()
            }
        }
    }

    fn has(&self, address: &str) -> bool {
        self.connections.contains_key(address)
    }

    fn keep_only(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.connections.retain(|address, _| keep(address));
    }
}
