//! Stands in for the `redis-ha` feature (`ha/`) in a build without it:
//! only one server is possible. `--redis` refuses `redis+sentinel://` and
//! `redis+cluster://` before this is reached (see `config`); reaching it
//! all the same is an error, never a panic.

use std::sync::Arc;

use super::link::Link;
use super::nodes::Nodes;
use crate::broker::error::BrokerError;
use crate::config::RedisTarget;

/// Always an error for a Sentinel or Cluster `target` (`None` for one
/// server): this build has neither.
pub(super) fn nodes(
    target: &RedisTarget,
    _link: &Link,
) -> Option<Result<Arc<dyn Nodes>, BrokerError>> {
    let url = match target {
        RedisTarget::Server { .. } => return None,
        RedisTarget::Sentinel {
            sentinels, master, ..
        } => format!("redis+sentinel://{}/{master}", sentinels.join(",")),
        RedisTarget::Cluster { seeds, .. } => format!("redis+cluster://{}", seeds.join(",")),
    };
    Some(Err(BrokerError::Connect {
        url,
        reason: crate::config::NO_REDIS_HA.to_owned(),
    }))
}
