//! A [`Job`]: work queued for a publisher or query thread, where it must
//! run, and who waits for its answer.

use crossbeam_channel::Sender;

use super::coalesce::{Event, Work};
use crate::broker::error::BrokerError;
use crate::protocol::Room;

/// Where a job's commands must run, for the nodes that care (a cluster
/// routes by the hash slot of its key). Nothing is computed from it until
/// they ask: one Redis never looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    /// Anywhere (a `PING`, say).
    Any,
    /// Where a room's keys and channel are.
    Room(Room),
    /// Where one key is.
    Key(String),
    /// On the node at this address (`host:port`) exactly (only a wing
    /// with more than one master names one).
    #[cfg_attr(not(feature = "redis-ha"), allow(dead_code))]
    Node(String),
}

impl Route {
    /// Where a room's keys and channel are.
    pub(super) fn room(room: &Room) -> Route {
        Route::Room(room.clone())
    }

    /// Where one key is.
    pub(super) fn key(key: &str) -> Route {
        Route::Key(key.to_owned())
    }
}

/// Work waiting for a publisher thread, where it must run, and who waits
/// for its answer.
pub(super) struct Job {
    pub(super) work: Work,
    /// Read only by nodes that route (the `redis-ha` wing's cluster).
    #[cfg_attr(not(feature = "redis-ha"), allow(dead_code))]
    pub(super) route: Route,
    pub(super) reply: Reply,
}

impl Job {
    /// A job of plain commands, all of them for `route`.
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
    /// A change that must reach Redis (a leave, a nickname given back):
    /// if it fails, `on_failure` keeps it to be sent again (`ghosts.rs`).
    Retry {
        /// Who waits, if anyone: only success or failure.
        done: Option<Sender<Result<(), BrokerError>>>,
        on_failure: Box<dyn FnOnce() + Send>,
    },
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
            Reply::Retry { done, on_failure } => {
                if result.is_err() {
                    on_failure();
                }
                if let Some(tx) = done {
                    let _ = tx.send(result.map(|_| ()));
                }
            }
        }
    }
}
