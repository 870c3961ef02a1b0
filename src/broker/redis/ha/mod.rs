//! The `redis-ha` feature: Redis Sentinel (`redis+sentinel://`, and the
//! watcher that follows a failover the moment it happens) and Redis
//! Cluster (`redis+cluster://`, the slot map). A wing: the broker reaches
//! it only through [`Topology`](super::Topology)'s variants and the
//! optional [`Watcher`]. Built without the feature, `without_ha.rs` stands
//! in for this module with types that have no values.

use std::time::Duration;

mod failover;
mod sentinel;
mod slot_map;

pub use failover::Watcher;
pub use sentinel::Sentinels;
pub use slot_map::Cluster;

/// How soon a failed connection may ask again where Redis is (the
/// sentinels, or a cluster's slot map): thousands of subscriptions lost at
/// once ask once.
pub const ASK_AT_MOST_EVERY: Duration = Duration::from_millis(100);
