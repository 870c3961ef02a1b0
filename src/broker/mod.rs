//! The message relay between connections: publish a payload on a channel,
//! and subscribe one connection to a channel.
//!
//! Two implementations share the [`Broker`] trait:
//!
//! * [`redis::RedisBroker`] — the real thing. Every connection gets its own Redis
//!   `SUBSCRIBE` connection (so instances sharing a Redis see each other's
//!   messages), or with [`Subscriptions::Shared`](crate::config::Subscriptions::Shared) every room gets one per
//!   instance, fanned out to its clients by [`fanout`]. Publishing goes
//!   through a small shared pool of connections that pipelines whatever is
//!   queued.
//! * [`memory::MemoryBroker`] — an in-process stand-in, so threadchat runs on a
//!   machine without Redis. A single instance only. It fans out with
//!   [`fanout`] too.
//!
//! The shape is the same in all of them: a connection's *subscriber thread*
//! calls [`Subscription::run`], which blocks (on a Redis socket, or on a
//! crossbeam receiver) and hands each [`Event`] to a closure. To end that blocking call
//! from another thread, keep the subscription's [`Canceller`]: `cancel()` wakes
//! the subscriber thread wherever it is blocked, and `run` returns `Ok(())`.

mod api;
mod backoff;
mod error;
pub mod fanout;
pub mod memory;
mod places;
mod random;
pub mod redis;
mod subscription;

pub use api::{Broker, Earlier, Log, Mark, MemberChange, Place, Presence, Receipt, Settings};
pub use error::BrokerError;
/// For the session's tests, which make a place key of their own.
#[cfg(test)]
pub use places::EpochKey;
pub use places::PlaceKey;
pub use random::random_u64;
#[cfg(test)]
pub use subscription::Missing;
pub use subscription::{Canceller, Direct, DirectSink, Event, Gap, Subscription};

use std::sync::Arc;
use std::time::Duration;

use crate::config::{BrokerChoice, DEFAULT_REDIS_URL, RedisTarget};
use crate::metrics::Metrics;

/// Builds the broker the configuration asks for.
///
/// With [`BrokerChoice::Auto`], Redis on localhost is used if it answers;
/// otherwise the in-process broker, with one log line saying so.
pub fn connect(
    choice: &BrokerChoice,
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Broker>, BrokerError> {
    match choice {
        BrokerChoice::Redis(target) => Ok(Arc::new(redis::RedisBroker::connect(
            target,
            Duration::from_secs(3),
            settings,
            metrics,
        )?)),
        BrokerChoice::InProcess => Ok(Arc::new(memory::MemoryBroker::new(settings, metrics)?)),
        BrokerChoice::Auto => {
            match redis::RedisBroker::connect(
                &RedisTarget::server(DEFAULT_REDIS_URL),
                Duration::from_millis(500),
                settings,
                metrics,
            ) {
                Ok(broker) => Ok(Arc::new(broker)),
                Err(_) => {
                    log::info!(
                        "no Redis at localhost:6379: relaying in-process, so no other instance \
                         shares these rooms (start redis-server, or pass --redis HOST[:PORT])"
                    );
                    Ok(Arc::new(memory::MemoryBroker::new(settings, metrics)?))
                }
            }
        }
    }
}
