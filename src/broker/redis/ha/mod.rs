//! The `redis-ha` feature: Redis Sentinel (`redis+sentinel://`, and the
//! watcher that follows a failover the moment it happens) and Redis
//! Cluster (`redis+cluster://`, the slot map and the routing by it). A
//! wing: the broker reaches it only through [`nodes`], which gives the
//! [`Nodes`] seam the publishers and listeners ask. Built without the
//! feature, `without_ha.rs` stands in for this module.

use std::sync::Arc;

use crate::broker::error::BrokerError;
use crate::broker::redis::link::Link;
use crate::broker::redis::nodes::Nodes;
use crate::config::RedisTarget;

mod cluster;
mod failover;
mod sentinel;
mod slot_map;
mod slots;

/// Where the Sentinel or Cluster `target` names is, every node reached
/// through `link` (`None`: it names one server, not a wing's).
pub(super) fn nodes(
    target: &RedisTarget,
    link: &Link,
) -> Option<Result<Arc<dyn Nodes>, BrokerError>> {
    match target {
        RedisTarget::Server { .. } => None,
        RedisTarget::Sentinel {
            sentinels,
            master,
            password,
            db,
            ..
        } => Some(
            sentinel::Sentinels::new(sentinels, master, password.as_deref(), *db, link.clone())
                .map(|found| Arc::new(found) as Arc<dyn Nodes>),
        ),
        RedisTarget::Cluster {
            seeds, password, ..
        } => Some(cluster::nodes(seeds, password.as_deref(), link.clone())),
    }
}
