//! What every connection shares: the relay, the limits, the counters, and
//! the few services connections use together (the announcer, the welcome
//! turns, the `/members` cache, the admission door). Built once by the
//! server with [`Context::new`], passed to each connection by `Arc`.

use std::io;
use std::sync::Arc;

use super::admission::Admission;
use super::announce::Announcer;
use super::junk::JunkLog;
use super::members::MembersCache;
use super::turns::Welcomes;
use crate::broker::Broker;
use crate::config::{Config, Limits};
use crate::metrics::Metrics;

/// What every session shares: created once by the server, passed by `Arc`.
pub struct Context {
    /// Where messages are published and subscribed.
    pub broker: Arc<dyn Broker>,
    /// Per-connection limits.
    pub limits: Limits,
    /// The server's counters.
    pub metrics: Arc<Metrics>,
    /// De-duplicates warnings about junk payloads (see [`JunkLog`]).
    pub junk: JunkLog,
    /// Publishes joins and leaves, coalesced per room.
    pub announcer: Announcer,
    /// Bounds how many welcomes (history reads and sends) run at once.
    pub welcomes: Welcomes,
    /// Recent `GET /members` answers.
    pub members: MembersCache,
    /// Who may connect, and on what terms: the admission wing's one door.
    pub admission: Admission,
    /// Debug builds only: a chat message with exactly this text makes the
    /// reader thread panic, a client with this nickname its start thread
    /// (while welcoming it). Set by `THREADCHAT_TEST_PANIC`; tests use it
    /// to check that a panic closes only its own connection.
    pub panic_trigger: Option<String>,
    /// With `--tls-cert`, what every handshake uses (the `tls` wing).
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Context {
    /// The context `config` describes, relaying through `broker` and
    /// counting in `metrics`. Fails only if the announcer's thread cannot
    /// be started.
    pub fn new(
        config: &Config,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Context> {
        Ok(Context {
            announcer: Announcer::start(Arc::clone(&broker))?,
            admission: Admission::new(config, Arc::clone(&broker), Arc::clone(&metrics)),
            broker,
            limits: config.limits.clone(),
            metrics,
            junk: JunkLog::default(),
            welcomes: Welcomes::default(),
            members: MembersCache::default(),
            panic_trigger: test_panic_trigger(),
            #[cfg(feature = "tls")]
            tls: config.tls.as_ref().map(|certs| certs.server_config()),
        })
    }

    /// Whether clients connect with TLS (`wss://`, `https://`).
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Stops what the context runs, in order: the announcer first (it
    /// publishes the last leaves, then its thread ends), then the broker
    /// (its heartbeat and publisher threads end and are joined) with the
    /// admission door, which holds it too.
    pub fn shut_down(self) {
        let Context {
            announcer,
            admission,
            broker,
            ..
        } = self;
        drop(announcer);
        drop(admission);
        drop(broker);
    }
}

/// Debug builds only: the chat text that makes a reader thread panic, from
/// `THREADCHAT_TEST_PANIC` (tests check that a panic stays in its connection).
fn test_panic_trigger() -> Option<String> {
    if cfg!(debug_assertions) {
        std::env::var("THREADCHAT_TEST_PANIC").ok()
    } else {
        None
    }
}
