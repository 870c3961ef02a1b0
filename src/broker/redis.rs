//! The Redis broker: one `SUBSCRIBE` connection per chat connection, and a
//! small shared pool of publishing connections.
//!
//! **Subscribing.** Each chat connection's subscriber thread opens its own
//! Redis connection and blocks in `PubSub::get_message`, as the design asks.
//! That call cannot be interrupted from outside (the `redis` crate exposes no
//! socket to shut down), so every subscription also listens on a *private
//! wake channel*, `threadchat:wake:{conn}`. [`Canceller::cancel`] sets a flag and
//! publishes an empty message there; the subscriber wakes, sees the flag and
//! returns. The order matters: the subscriber checks the flag only *after* its
//! `SUBSCRIBE` was acknowledged, so a wake-up can never fall in the gap.
//!
//! **Publishing.** Opening a Redis connection per client for publishing would
//! double Redis's client count. Instead [`POOL_SIZE`] publisher threads each
//! own one connection and a bounded job queue. A publisher takes every job
//! that is waiting (up to [`MAX_PIPELINE`]) and sends them as one pipeline —
//! one round trip for many clients' messages. [`Broker::publish`] waits for
//! its job's answer, so one client has at most one message in flight and its
//! messages cannot overtake each other, whatever lane they take.
//!
//! **Shutdown.** Dropping the [`RedisBroker`] drops the job senders; each
//! publisher's `recv()` then fails, it leaves its loop, and the drop joins it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use redis::{Client, Connection};

use super::{
    Backoff, Broker, BrokerError, Canceller, Event, Flow, Listen, StopSignal, Subscription,
};
use crate::metrics::Metrics;
use crate::protocol::ConnId;

/// Publisher threads (and so publishing connections) per process.
pub const POOL_SIZE: usize = 2;
/// Most `PUBLISH` commands sent in one pipeline.
pub const MAX_PIPELINE: usize = 256;
/// Jobs each publisher queues before `publish` blocks (back-pressure on the
/// clients that are sending).
const QUEUE_CAPACITY: usize = 1024;
/// How long a publisher or a new subscription waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a publishing connection waits for Redis to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest back-off between attempts to restore a lost subscription.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A subscription connection quiet for this long is checked with PING.
const KEEPALIVE: Duration = Duration::from_secs(12);
/// Prefix of the private per-connection wake channel.
const WAKE_PREFIX: &str = "threadchat:wake:";

/// Relays through Redis.
pub struct RedisBroker {
    client: Client,
    url: String,
    /// One sender per publisher thread. Dropping them stops the publishers.
    lanes: Vec<Sender<Job>>,
    /// Round-robin lane choice.
    next_lane: AtomicUsize,
    /// The publisher threads, joined on drop.
    publishers: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

/// One `PUBLISH` waiting for a publisher thread.
struct Job {
    channel: String,
    payload: Vec<u8>,
    /// Where to send the outcome; `None` for fire-and-forget (wake-ups).
    reply: Option<Sender<Result<(), BrokerError>>>,
}

impl RedisBroker {
    /// Connects to the Redis at `url`, checks that it answers `PING` within
    /// `timeout`, and starts the publisher threads.
    pub fn connect(
        url: &str,
        timeout: Duration,
        metrics: &Arc<Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let connect_err = |e: redis::RedisError| BrokerError::Connect {
            url: url.to_owned(),
            reason: e.to_string(),
        };
        let client = Client::open(url).map_err(connect_err)?;
        let mut con = client
            .get_connection_with_timeout(timeout)
            .map_err(connect_err)?;
        con.set_read_timeout(Some(timeout)).map_err(connect_err)?;
        redis::cmd("PING")
            .query::<String>(&mut con)
            .map_err(connect_err)?;

        let mut lanes = Vec::with_capacity(POOL_SIZE);
        let mut publishers = Vec::with_capacity(POOL_SIZE);
        for lane in 0..POOL_SIZE {
            let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
            let publisher = Publisher {
                client: client.clone(),
                connection: None,
            };
            let handle = thread::Builder::new()
                .name(format!("tc-publish-{lane}"))
                .stack_size(crate::THREAD_STACK_SIZE)
                .spawn(move || publisher.run(rx))
                .map_err(|e| BrokerError::Redis(format!("cannot start a publisher thread: {e}")))?;
            lanes.push(tx);
            publishers.push(handle);
        }
        Ok(RedisBroker {
            client,
            url: url.to_owned(),
            lanes,
            next_lane: AtomicUsize::new(0),
            publishers,
            metrics: Arc::clone(metrics),
        })
    }

    fn lane(&self) -> &Sender<Job> {
        let n = self.next_lane.fetch_add(1, Ordering::Relaxed);
        &self.lanes[n % self.lanes.len()]
    }
}

impl Broker for RedisBroker {
    fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<(), BrokerError> {
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let job = Job {
            channel: channel.to_owned(),
            payload,
            reply: Some(reply_tx),
        };
        self.lane().send(job).map_err(|_| BrokerError::Closed)?;
        reply_rx.recv().map_err(|_| BrokerError::Closed)?
    }

    fn subscribe(&self, channel: &str, conn: &ConnId) -> Result<Subscription, BrokerError> {
        let wake_channel = format!("{WAKE_PREFIX}{conn}");
        let lane = self.lane().clone();
        let wake_target = wake_channel.clone();
        let canceller = Canceller::new(move || {
            // Fire and forget: if Redis is unreachable, the subscriber is not
            // blocked on it either (it is failing, and checks the flag).
            let _ = lane.try_send(Job {
                channel: wake_target.clone(),
                payload: Vec::new(),
                reply: None,
            });
        });
        let listener = RedisListener {
            client: self.client.clone(),
            url: self.url.clone(),
            channel: channel.to_owned(),
            wake_channel,
            metrics: Arc::clone(&self.metrics),
        };
        Ok(Subscription::new(Box::new(listener), canceller))
    }

    fn describe(&self) -> String {
        format!("Redis at {}", redact(&self.url))
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        // Shutdown by dropping senders: each publisher leaves its loop.
        self.lanes.clear();
        for handle in self.publishers.drain(..) {
            if handle.join().is_err() {
                log::error!("a Redis publisher thread panicked");
            }
        }
    }
}

/// Hides a password in a Redis URL before it is logged.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// One publisher thread's state: its connection, opened lazily and reopened
/// after a failure.
struct Publisher {
    client: Client,
    connection: Option<Connection>,
}

impl Publisher {
    /// The thread's loop: take all queued jobs, pipeline them, answer each.
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            batch.extend(jobs.try_iter().take(MAX_PIPELINE - 1));
            let outcome = self.publish_batch(&batch);
            if let Err(e) = &outcome {
                log::warn!("could not publish {} message(s): {e}", batch.len());
            }
            for job in batch {
                if let Some(reply) = job.reply {
                    // The publisher may have given up waiting; that is fine.
                    let _ = reply.send(outcome.clone());
                }
            }
        }
    }

    /// Sends the batch as one pipeline. A connection that turns out to be
    /// dead (say Redis restarted since the last batch) is replaced once.
    fn publish_batch(&mut self, batch: &[Job]) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for job in batch {
            pipe.cmd("PUBLISH")
                .arg(&job.channel)
                .arg(&job.payload)
                .ignore();
        }
        let mut last_error = None;
        for _attempt in 0..2 {
            let con = self.connection()?;
            match pipe.query::<()>(con) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let retry = e.is_connection_dropped() || e.is_io_error();
                    self.connection = None;
                    last_error = Some(BrokerError::Redis(e.to_string()));
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }

    fn connection(&mut self) -> Result<&mut Connection, BrokerError> {
        if self.connection.is_none() {
            let con = self
                .client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .and_then(|con| {
                    con.set_read_timeout(Some(IO_TIMEOUT))?;
                    con.set_write_timeout(Some(IO_TIMEOUT))?;
                    Ok(con)
                })
                .map_err(|e| BrokerError::Redis(e.to_string()))?;
            self.connection = Some(con);
        }
        Ok(self.connection.as_mut().expect("just set"))
    }
}

/// The subscriber-thread half of a Redis subscription.
struct RedisListener {
    client: Client,
    url: String,
    channel: String,
    wake_channel: String,
    metrics: Arc<Metrics>,
}

impl Listen for RedisListener {
    /// Subscribes, delivers, and when the connection is lost, reconnects with
    /// back-off and subscribes again — until cancelled.
    fn listen(
        self: Box<Self>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<(), BrokerError> {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut ever_subscribed = false;
        loop {
            let mut live = false;
            let error = match self.connection(stop, on_event, &mut live, &mut ever_subscribed) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !ever_subscribed {
                // Never got going: the caller refuses the client instead.
                return Err(error);
            }
            if live {
                self.metrics.subscriptions_lost.inc();
                log::debug!("subscription to {} lost: {error}", self.channel);
                if on_event(Event::Lost(&error)).is_break() {
                    return Ok(());
                }
                backoff.reset();
            }
            if stop.sleep(backoff.next_delay()) {
                return Ok(());
            }
        }
    }
}

impl RedisListener {
    /// One connection's worth of subscription: connect, subscribe, deliver.
    /// Returns `Ok` when stopped, `Err` when the connection fails. Sets `live`
    /// once subscribed.
    fn connection(
        &self,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
        live: &mut bool,
        ever_subscribed: &mut bool,
    ) -> Result<(), BrokerError> {
        let mut con = self
            .client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .and_then(|con| {
                con.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(con)
            })
            .map_err(|e| BrokerError::Connect {
                url: redact(&self.url),
                reason: e.to_string(),
            })?;
        let mut pubsub = con.as_pubsub();
        let result = self.receive(&mut pubsub, stop, on_event, live, ever_subscribed);
        // Dropping a PubSub sends UNSUBSCRIBE and waits for the answer: never
        // wait long for a Redis that has stopped answering.
        let _ = pubsub.set_read_timeout(Some(Duration::from_secs(1)));
        result
    }

    fn receive(
        &self,
        pubsub: &mut redis::PubSub<'_>,
        stop: &StopSignal,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
        live: &mut bool,
        ever_subscribed: &mut bool,
    ) -> Result<(), BrokerError> {
        let lost = |e: redis::RedisError| BrokerError::Redis(e.to_string());
        pubsub
            .subscribe(&[&self.channel, &self.wake_channel])
            .map_err(lost)?;
        // A quiet connection is checked with PING after this long; if the PING
        // is not answered within as long again, the link is dead (a paused
        // Redis, a half-open TCP connection): detected within 2 x KEEPALIVE.
        pubsub.set_read_timeout(Some(KEEPALIVE)).map_err(lost)?;
        *live = true;
        if *ever_subscribed {
            self.metrics.redis_reconnects.inc();
        }
        *ever_subscribed = true;
        // Only now, with SUBSCRIBE acknowledged, is a wake-up sure to reach us.
        if stop.is_stopped() || on_event(Event::Subscribed).is_break() {
            return Ok(());
        }
        loop {
            let msg = match pubsub.get_message() {
                Ok(msg) => msg,
                Err(e) if e.is_timeout() => {
                    if stop.is_stopped() {
                        return Ok(());
                    }
                    pubsub.ping::<redis::Value>().map_err(lost)?;
                    continue;
                }
                Err(e) => return Err(lost(e)),
            };
            // Checked on every message, not only on wake-ups: a wake-up that
            // could not be queued must not leave this thread running forever.
            if stop.is_stopped() {
                return Ok(());
            }
            if msg.get_channel_name() == self.wake_channel {
                continue;
            }
            if on_event(Event::Message(msg.get_payload_bytes())).is_break() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("redis://:pw@host:1/2"), "redis://***@host:1/2");
        assert_eq!(redact("redis://host:1"), "redis://host:1");
    }
}
