//! The publisher threads (`tc-publish-N`) and the query threads
//! (`tc-query-N`): each owns one Redis connection and runs the [`Job`]s
//! queued for it, pipelined.

use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

use redis::Connection;

use super::coalesce::{LogBounds, Plan, Work};
use super::scripts::{SCRIPTS, is_no_script, is_read_only};
use super::topology::Topology;
use super::{CONNECT_TIMEOUT, IO_TIMEOUT, MAX_PIPELINE};
use crate::broker::BrokerError;

/// Work waiting for a publisher thread, and who waits for its answer.
pub(super) struct Job {
    pub(super) work: Work,
    pub(super) reply: Reply,
}

impl Job {
    /// A job of plain commands.
    pub(super) fn commands(cmds: Vec<redis::Cmd>, reply: Reply) -> Job {
        Job {
            work: Work::Commands(cmds),
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
    /// A publisher's [`Receipt`]: only success or failure.
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

/// One publisher thread's state: its connection, opened lazily and reopened
/// after a failure.
pub(super) struct Publisher {
    /// Where Redis is, asked whenever the connection opens.
    pub(super) topology: Arc<Topology>,
    /// The topology's [`moves`](Topology::moves) when the connection
    /// opened: if the master has moved since, the connection is reopened.
    pub(super) opened_at_move: u64,
    pub(super) connection: Option<Connection>,
    /// How the rooms' logs are bounded, for the events' script calls.
    pub(super) bounds: LogBounds,
}

impl Publisher {
    /// The thread's loop: take all queued jobs, pipeline them, answer each.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            batch.extend(jobs.try_iter().take(MAX_PIPELINE - 1));
            let plan = Plan::of(batch.iter().map(|job| &job.work), &self.bounds);
            match self.execute(&plan) {
                Ok(replies) => {
                    for (job, mine) in batch.into_iter().zip(plan.answers(&replies)) {
                        job.reply.send(job_result(mine));
                    }
                }
                Err(e) => {
                    log::warn!("Redis command batch failed ({} job(s)): {e}", batch.len());
                    for job in batch {
                        job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Sends a batch's commands as one pipeline; an error reply fails only
    /// the jobs it answers (see [`job_result`]).
    ///
    /// A connection that turns out to have been closed (say Redis restarted
    /// since the last batch) is replaced, and the batch sent once more: the
    /// closed connection carried nothing to Redis. A batch that Redis does
    /// not answer in time is *not* sent again — a paused or overloaded
    /// Redis may still carry it out — and its outcome is
    /// [`BrokerError::Uncertain`].
    pub(super) fn execute(&mut self, plan: &Plan) -> Result<Vec<redis::Value>, BrokerError> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let pipe = &plan.pipeline;
        let mut last_error = None;
        for _attempt in 0..2 {
            let con = self.connection()?;
            match pipe.query::<Vec<redis::Value>>(con) {
                Ok(replies) => {
                    // A script flushed from Redis (`SCRIPT FLUSH`): load it
                    // again on a fresh connection for the next batch.
                    if replies.iter().any(is_no_script) {
                        self.connection = None;
                    }
                    // A master turned replica (a Sentinel failover): the
                    // next batch goes to the master the sentinels name.
                    if replies.iter().any(is_read_only) {
                        self.connection = None;
                        self.topology.forget();
                    }
                    return Ok(replies);
                }
                Err(e) => {
                    self.connection = None;
                    self.topology.forget();
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

    /// The thread's connection, opened (and the script loaded) if need be.
    pub(super) fn connection(&mut self) -> Result<&mut Connection, BrokerError> {
        if self.opened_at_move != self.topology.moves() {
            self.connection = None;
        }
        if self.connection.is_none() {
            self.opened_at_move = self.topology.moves();
            let con = self
                .topology
                .master()?
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
                    self.topology.forget();
                    BrokerError::Redis(e.to_string())
                })?;
            self.connection = Some(con);
        }
        Ok(self.connection.as_mut().expect("just set"))
    }
}
