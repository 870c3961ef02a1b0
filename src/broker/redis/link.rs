//! How a connection to a Redis node is opened: plain TCP (`redis://`), or
//! TLS (`rediss://`, the `tls` feature) with the certificates given at
//! start. One [`Link`] is made from the target at start and cloned into
//! everything that connects — one server, the sentinels and the masters
//! they name, every node of a cluster, the subscriptions — so that a node
//! found later (a master after a failover, a node named by `CLUSTER SLOTS`
//! or `MOVED`) is reached the same way as the first.
//!
//! Without TLS a [`Link`] is empty and [`Link::client`] is
//! `Client::open("redis://…")`, as it always was.

use redis::Client;

use crate::config::RedisTarget;
#[cfg(feature = "tls")]
use crate::config::RedisTls;

/// How connections to Redis are made (see the module doc).
#[derive(Clone, Debug, Default)]
pub(super) struct Link {
    /// With `rediss`: the certificates to trust and to show.
    #[cfg(feature = "tls")]
    tls: Option<RedisTls>,
}

impl Link {
    /// The link `target` asks for.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    pub(super) fn new(target: &RedisTarget) -> Link {
        Link {
            #[cfg(feature = "tls")]
            tls: target.tls().cloned(),
        }
    }

    /// A client for the node at `address` (`host:port`), with `password`
    /// and database `db`, if any (a wing's nodes: `ha/`).
    #[cfg_attr(not(feature = "redis-ha"), allow(dead_code))]
    pub(super) fn client(
        &self,
        address: &str,
        password: Option<&str>,
        db: Option<i64>,
    ) -> Result<Client, redis::RedisError> {
        let auth = password.map_or(String::new(), |password| format!(":{password}@"));
        let db = db.map_or(String::new(), |db| format!("/{db}"));
        self.open(&format!("{}://{auth}{address}{db}", self.scheme()))
    }

    /// A client for `url`, whose scheme is `redis` or (with TLS) `rediss`.
    pub(super) fn open(&self, url: &str) -> Result<Client, redis::RedisError> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return Client::build_with_tls(url, (*tls.certificates).clone());
        }
        Client::open(url)
    }

    /// What `e`, an error connecting, means to a person: a timeout says so
    /// (the socket says "Resource temporarily unavailable"), and over TLS
    /// that is most often a port that does not speak it (a plain Redis
    /// waits for the end of a command line that a TLS hello never brings).
    pub(super) fn explain(&self, e: &redis::RedisError) -> String {
        if !e.is_timeout() {
            let text = e.to_string();
            if text.contains("CertificateRequired") {
                return format!(
                    "{text} (Redis asks for a client certificate: \
                     give --redis-cert and --redis-key)"
                );
            }
            return text;
        }
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "no answer in time to a TLS handshake (is it a TLS port?)".into();
        }
        "no answer in time".into()
    }

    /// For the start-up log: `", over TLS"`, or nothing.
    #[cfg_attr(not(feature = "redis-ha"), allow(dead_code))]
    pub(super) fn describe(&self) -> &'static str {
        match self.scheme() {
            "rediss" => ", over TLS",
            _ => "",
        }
    }

    /// The scheme of a node's URL.
    #[cfg_attr(not(feature = "redis-ha"), allow(dead_code))]
    fn scheme(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "rediss";
        }
        "redis"
    }

    /// With TLS, the configuration subscriptions make their sessions with
    /// (one per process: see `config::RedisTls`).
    #[cfg(feature = "tls")]
    pub(super) fn tls_config(&self) -> Option<&std::sync::Arc<rustls::ClientConfig>> {
        self.tls.as_ref().map(|tls| &tls.config)
    }
}
