//! Where Redis is, as every connection the broker opens asks it: one seam,
//! [`Nodes`], built once at start (`broker.rs`).
//!
//! With one Redis ([`OneServer`]) the answers are constants: one address,
//! one client, no routing of jobs and no refusal to read. Redis Sentinel
//! (a master the sentinels name, which moves in a failover) and Redis
//! Cluster (a master per hash slot, and the redirections that follow a
//! slot's move) are the `redis-ha` wing (`ha/`), which implements the same
//! trait; the publishers and listeners never know which one they talk to.
//!
//! Every connection asks [`Nodes::node`] (or [`Nodes::client`]) where to
//! go each time it connects or reconnects, and says how it went
//! ([`Nodes::reached`], [`Nodes::unreachable`]): that is all a failover
//! needs, since a failed master drops (or, demoted, has the sentinels kill)
//! every connection, and each reconnection asks again.

use std::sync::Arc;

use redis::Client;

use super::job::{Job, Route, job_result};
use super::keys;
use super::link::Link;
use super::sockets::SubscriptionSockets;
use crate::broker::error::{BrokerError, redact};
use crate::protocol::Room;

/// The channel a room's messages travel on, and how it is subscribed to.
pub(super) struct Channel {
    pub(super) name: String,
    /// Sharded pub/sub (`SSUBSCRIBE`): the channel lives on one node.
    pub(super) sharded: bool,
}

/// What a wing starts to follow its nodes' moves as they happen; dropping
/// it stops it.
pub(super) type Follower = Box<dyn Send + Sync>;

/// A publisher thread's connections, as [`Nodes::send`] uses them (one
/// server needs only [`send`](Self::send)).
#[cfg_attr(not(feature = "redis-ha"), allow(dead_code))]
pub(super) trait Lines {
    /// Sends `jobs` to the node at `address` as one pipeline, with
    /// `around` (if any) making the pipeline that is sent from the plain
    /// one (and telling which of its replies are its own, left out). Returns
    /// each job with its replies, for the caller to answer; a pipeline that
    /// failed as a whole has answered every job with the error already, and
    /// returns none.
    fn send(&mut self, address: &str, jobs: Vec<Job>, around: Option<&Around>) -> Vec<Answered>;

    /// Whether a connection to `address` is open.
    fn has(&self, address: &str) -> bool;

    /// Closes the connections to nodes `keep` says no to.
    fn keep_only(&mut self, keep: &dyn Fn(&str) -> bool);
}

/// Makes the pipeline to send from the plain one, and says which of its
/// replies are its own (see [`Lines::send`]).
pub(super) type Around = dyn Fn(&redis::Pipeline) -> (redis::Pipeline, Vec<usize>);

/// A job sent, with its replies (one per command), not yet answered.
pub(super) type Answered = (Job, Vec<redis::Value>);

/// The connection key of a server that is the only one (what [`Lines`]
/// keeps its one connection under).
pub(super) const THE_SERVER: &str = "";

/// Where Redis is: one server, or a wing's (see the module doc).
pub(super) trait Nodes: Send + Sync {
    /// The server to connect to now for `route`: its address and a client.
    fn node(&self, route: &Route) -> Result<(String, Client), BrokerError>;

    /// A client for the node a connection keyed `address` goes to
    /// ([`THE_SERVER`] when there is only one).
    fn client(&self, address: &str) -> Result<Client, BrokerError>;

    /// How connections to the nodes are made (plain TCP, or TLS): what a
    /// subscription, which connects by itself, needs.
    fn link(&self) -> &Link;

    /// Every master, each as the route to it: what the heartbeat checks.
    fn masters(&self) -> Result<Vec<Route>, BrokerError>;

    /// Whether rooms use sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`): each
    /// room's channel lives on the node of its keys.
    fn sharded(&self) -> bool {
        false
    }

    /// The channel of `room`'s messages.
    fn channel(&self, room: &Room) -> Channel {
        Channel {
            name: keys::channel(room, self.sharded()),
            sharded: self.sharded(),
        }
    }

    /// Sends a publisher thread's batch of jobs on `lines` and answers
    /// every job: one server takes them all in one pipeline.
    fn send(&self, batch: Vec<Job>, lines: &mut dyn Lines) {
        for (job, replies) in lines.send(THE_SERVER, batch, None) {
            job.reply.send(job_result(replies));
        }
    }

    /// Whether a refusal to subscribe (`refusal`: what Redis answered)
    /// means the room is served elsewhere now, to be subscribed to again
    /// at once; the nodes have taken note of where.
    fn moved(&self, _refusal: &str) -> bool {
        false
    }

    /// A connection to `address` failed: where it goes may have changed.
    fn unreachable(&self, address: &str);

    /// A connection to `address` was made.
    fn reached(&self, _address: &str) {}

    /// What was found may be out of date (a server turned replica): the
    /// next [`node`](Self::node) asks again.
    fn forget(&self) {}

    /// How many times the master moved so far: a connection opened at an
    /// older count is to the old one, and is reopened.
    fn moves(&self) -> u64 {
        0
    }

    /// Starts whatever follows moves as they happen, restarting the
    /// subscriptions that must move (`None`: nothing to follow).
    fn follow(
        self: Arc<Self>,
        _subscriptions: &Arc<SubscriptionSockets>,
    ) -> Result<Option<Follower>, BrokerError> {
        Ok(None)
    }

    /// What was found, for the start-up log.
    fn describe(&self) -> String;
}

/// One Redis server, always the same.
pub(super) struct OneServer {
    client: Client,
    url: String,
    link: Link,
}

impl OneServer {
    /// The server at `url`, reached through `link`. Nothing is connected
    /// yet.
    pub(super) fn new(url: &str, link: Link) -> Result<OneServer, BrokerError> {
        link.open(url)
            .map(|client| OneServer {
                client,
                url: url.to_owned(),
                link,
            })
            .map_err(|e| BrokerError::Connect {
                url: redact(url),
                reason: e.to_string(),
            })
    }
}

impl Nodes for OneServer {
    fn node(&self, _route: &Route) -> Result<(String, Client), BrokerError> {
        Ok((self.url.clone(), self.client.clone()))
    }

    fn client(&self, _address: &str) -> Result<Client, BrokerError> {
        Ok(self.client.clone())
    }

    fn link(&self) -> &Link {
        &self.link
    }

    fn masters(&self) -> Result<Vec<Route>, BrokerError> {
        Ok(vec![Route::Any])
    }

    fn unreachable(&self, _address: &str) {}

    fn describe(&self) -> String {
        format!("Redis at {}", redact(&self.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::job::Reply;

    /// Lines that record where each pipeline went, and answer `OK`.
    #[derive(Default)]
    struct Recorded(Vec<(String, usize)>);

    impl Lines for Recorded {
        fn send(
            &mut self,
            address: &str,
            jobs: Vec<Job>,
            around: Option<&Around>,
        ) -> Vec<Answered> {
            assert!(around.is_none(), "one server adds nothing to a pipeline");
            self.0.push((address.to_owned(), jobs.len()));
            jobs.into_iter()
                .map(|job| (job, vec![redis::Value::Okay]))
                .collect()
        }

        fn has(&self, _address: &str) -> bool {
            unreachable!("one server never asks which connections are open")
        }

        fn keep_only(&mut self, _keep: &dyn Fn(&str) -> bool) {
            unreachable!("one server never closes connections by address")
        }
    }

    /// With one Redis, a batch of jobs for many rooms and keys is one
    /// pipeline to the one server, every job answered: no route is looked
    /// at (a route is only a room or a key, never a slot computed ahead).
    #[test]
    fn one_server_sends_a_batch_as_one_pipeline() {
        let nodes = OneServer::new("redis://127.0.0.1:1", Link::default()).unwrap();
        let mut answers = Vec::new();
        let batch = ["lobby", "other", "third"]
            .iter()
            .map(|name| Route::room(&Room::parse(name).unwrap()))
            .chain([Route::key("threadchat:instance:x"), Route::Any])
            .map(|route| {
                let (tx, rx) = crossbeam_channel::bounded(1);
                answers.push(rx);
                Job::commands(route, vec![redis::cmd("PING")], Reply::Values(tx))
            })
            .collect();
        let mut lines = Recorded::default();
        nodes.send(batch, &mut lines);
        assert_eq!(lines.0, vec![(THE_SERVER.to_owned(), 5)]);
        for answer in answers {
            assert_eq!(answer.try_recv(), Ok(Ok(vec![redis::Value::Okay])));
        }
    }

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("redis://:pw@host:1/2"), "redis://***@host:1/2");
        assert_eq!(redact("redis://host:1"), "redis://host:1");
    }
}
