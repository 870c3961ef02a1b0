//! Stands in for the `redis-ha` feature (`ha/`) in a build without it:
//! [`Sentinels`] and [`Cluster`] have no values, so a
//! [`Topology`](super::Topology) is always one server and the code that
//! matches on the others compiles to nothing; [`Watcher`] never starts.
//! `--redis` refuses `redis+sentinel://` and `redis+cluster://` before
//! this is reached (see `config`); reaching it all the same is an error,
//! never a panic.

use redis::Client;

use super::cluster::Route;
use super::listener::SubscriptionSockets;
use super::topology::Topology;
use crate::broker::BrokerError;

/// Why a Sentinel or Cluster target cannot be used in this build.
fn not_built(url: &str) -> BrokerError {
    BrokerError::Connect {
        url: url.to_owned(),
        reason: crate::config::NO_REDIS_HA.to_owned(),
    }
}

/// No sentinels in this build.
pub enum Sentinels {}

impl Sentinels {
    /// Always an error: this build has no Sentinel support.
    pub(super) fn new(
        addresses: &[String],
        master: &str,
        _password: Option<&str>,
        _db: i64,
    ) -> Result<Sentinels, BrokerError> {
        Err(not_built(&format!(
            "redis+sentinel://{}/{master}",
            addresses.join(",")
        )))
    }

    pub(super) fn master(&self) -> Result<(String, Client), BrokerError> {
        match *self {}
    }

    pub(super) fn forget(&self) {
        match *self {}
    }

    pub(super) fn moves(&self) -> u64 {
        match *self {}
    }

    pub(super) fn describe(&self) -> String {
        match *self {}
    }
}

/// No cluster in this build.
pub enum Cluster {}

impl Cluster {
    /// Always an error: this build has no Cluster support.
    pub(super) fn connect(
        seeds: &[String],
        _password: Option<&str>,
    ) -> Result<Cluster, BrokerError> {
        Err(not_built(&format!("redis+cluster://{}", seeds.join(","))))
    }

    pub(super) fn node(&self, _route: Route) -> Result<(String, Client), BrokerError> {
        match *self {}
    }

    pub(super) fn address(&self, _route: Route) -> Result<String, BrokerError> {
        match *self {}
    }

    pub(super) fn client(&self, _address: &str) -> Result<Client, BrokerError> {
        match *self {}
    }

    pub(super) fn masters(&self) -> Result<Vec<(String, Route)>, BrokerError> {
        match *self {}
    }

    pub(super) fn forget(&self) {
        match *self {}
    }

    pub(super) fn unreachable(&self, _address: &str) {
        match *self {}
    }

    pub(super) fn reached(&self, _address: &str) {
        match *self {}
    }

    pub(super) fn moved(&self, _slot: u16, _address: &str) {
        match *self {}
    }

    pub(super) fn describe(&self) -> String {
        match *self {}
    }
}

/// No failover watcher in this build.
pub struct Watcher;

impl Watcher {
    /// Never starts: there are no sentinels to watch.
    pub(super) fn start(
        _topology: &std::sync::Arc<Topology>,
        _subscriptions: &std::sync::Arc<SubscriptionSockets>,
    ) -> Result<Option<Watcher>, BrokerError> {
        Ok(None)
    }
}
