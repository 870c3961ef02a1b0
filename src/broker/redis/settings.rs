//! The Redis broker's fixed sizes and timeouts, in one place.

use std::time::Duration;

/// Publisher threads (and so publishing connections) per process.
pub(super) const POOL_SIZE: usize = 2;
/// Most `PUBLISH` commands sent in one pipeline.
pub(super) const MAX_PIPELINE: usize = 256;
/// Jobs each publisher queues before `publish` blocks (back-pressure on the
/// clients that are sending).
pub(super) const QUEUE_CAPACITY: usize = 1024;
/// How long a publisher or a new subscription waits to connect.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a publishing connection waits for Redis to answer.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a batch of events waits for its replicas (`--wait-replicas`):
/// well under [`IO_TIMEOUT`], so that Redis answers first. A lane waits
/// this long per batch while a replica is away.
pub(super) const REPLICA_WAIT: Duration = Duration::from_secs(1);
/// How many times one job or subscription may be sent elsewhere (the room
/// moved) before it counts as failed.
pub(super) const MAX_MOVES: usize = 5;
/// Longest back-off between attempts to restore a lost subscription.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How soon a failed connection may ask again where Redis is (the
/// sentinels, or a cluster's slot map): thousands of subscriptions lost at
/// once ask once.
#[cfg(feature = "redis-ha")]
pub(super) const ASK_AT_MOST_EVERY: Duration = Duration::from_millis(100);
