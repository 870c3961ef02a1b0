//! The queues of the publisher and query threads, as the broker's callers
//! use them: a room's events on the room's lane, commands on a query
//! thread, and waiting for their replies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::job::{Job, Reply, Route};
use super::keys;
use crate::broker::error::BrokerError;
use crate::protocol::Room;

/// The publisher threads' queues (*lanes*) and the query threads'.
/// Dropping it drops the senders: each thread's `recv()` then fails, and
/// it leaves its loop.
pub(super) struct Queues {
    /// One sender per publisher thread.
    pub(super) lanes: Vec<Sender<Job>>,
    /// The query threads' queues.
    pub(super) queries: Vec<Sender<Job>>,
    /// Round-robin choice.
    next: AtomicUsize,
}

impl Queues {
    /// The queues of `lanes` publisher threads and `queries` query threads.
    pub(super) fn new(lanes: Vec<Sender<Job>>, queries: Vec<Sender<Job>>) -> Queues {
        Queues {
            lanes,
            queries,
            next: AtomicUsize::new(0),
        }
    }

    /// Queues that send to the same threads (for the heartbeat): a room's
    /// events take the same lane through either.
    pub(super) fn clones(&self) -> Queues {
        Queues::new(self.lanes.clone(), self.queries.clone())
    }

    /// Any lane, for commands whose order does not matter.
    fn lane(&self) -> Option<&Sender<Job>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.lanes.get(n % self.lanes.len().max(1))
    }

    /// The lane that carries all of `room`'s messages, which keeps them in
    /// order.
    pub(super) fn room_lane(&self, room: &Room) -> Option<&Sender<Job>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(room.name());
        self.lanes.get(hash as usize % self.lanes.len().max(1))
    }

    /// Runs `cmds` (all for `route`) on a query connection and waits for
    /// their replies.
    pub(super) fn run(
        &self,
        route: Route,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<redis::Value>, BrokerError> {
        self.run_each(vec![(route, cmds)])?
            .pop()
            .ok_or(BrokerError::Closed)
    }

    /// Runs each list of commands (each for its route: on a cluster they
    /// may be on different masters) as a job of its own on one query
    /// connection, and waits for all their replies.
    pub(super) fn run_each(
        &self,
        jobs: Vec<(Route, Vec<redis::Cmd>)>,
    ) -> Result<Vec<Vec<redis::Value>>, BrokerError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let queries = self
            .queries
            .get(n % self.queries.len().max(1))
            .ok_or(BrokerError::Closed)?;
        let mut answers = Vec::with_capacity(jobs.len());
        for (route, cmds) in jobs {
            let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
            let job = Job::commands(route, cmds, Reply::Values(reply_tx));
            queries.send(job).map_err(|_| BrokerError::Closed)?;
            answers.push(reply_rx);
        }
        answers
            .into_iter()
            .map(|answer| answer.recv().map_err(|_| BrokerError::Closed)?)
            .collect()
    }

    /// Runs `cmds` in one `MULTI`/`EXEC` transaction on a query connection
    /// — Redis runs them with nothing in between — and reads their replies
    /// as `T` (a tuple, one element per command). They are all of `room`.
    pub(super) fn transaction<T: redis::FromRedisValue>(
        &self,
        room: &Room,
        cmds: Vec<redis::Cmd>,
    ) -> Result<T, BrokerError> {
        let mut all = Vec::with_capacity(cmds.len() + 2);
        all.push(redis::cmd("MULTI"));
        all.extend(cmds);
        all.push(redis::cmd("EXEC"));
        from_value(self.run(Route::room(room), all)?.pop())
    }

    /// Runs `cmds` (all for `route`) without waiting (or caring) for the
    /// outcome.
    pub(super) fn run_detached(&self, route: Route, cmds: Vec<redis::Cmd>) {
        if let Some(lane) = self.lane() {
            let _ = lane.try_send(Job::commands(route, cmds, Reply::None));
        }
    }
}

/// `PEXPIRE` for each of a room's keys: they live `ttl` more.
pub(super) fn refresh(room: &Room, ttl: Duration) -> impl Iterator<Item = redis::Cmd> {
    let ttl = ttl.as_millis() as u64;
    keys::to_refresh(room).into_iter().map(move |key| {
        let mut pexpire = redis::cmd("PEXPIRE");
        pexpire.arg(key).arg(ttl);
        pexpire
    })
}

/// A reply, read as `T`.
pub(super) fn from_value<T: redis::FromRedisValue>(
    reply: Option<redis::Value>,
) -> Result<T, BrokerError> {
    redis::from_redis_value(reply.unwrap_or(redis::Value::Nil))
        .map_err(|e| BrokerError::Redis(e.to_string()))
}
