//! Test helpers: a real `redis-server` on a free port, the real `threadchat`
//! binary on port 0, and a blocking WebSocket client.
//!
//! Everything started here is killed when its handle is dropped, so a failing
//! test leaves nothing behind.

#![allow(dead_code)]

#[cfg(all(feature = "tls", target_os = "linux"))]
mod certs;
mod client;
#[cfg(feature = "redis-ha")]
mod cluster;
mod redis_server;
mod refusal;
#[cfg(feature = "redis-ha")]
mod sentinel;
mod server;
mod wire;

#[cfg(all(feature = "tls", target_os = "linux"))]
pub use certs::*;
pub use client::*;
#[cfg(feature = "redis-ha")]
pub use cluster::*;
pub use redis_server::*;
pub use refusal::*;
#[cfg(feature = "redis-ha")]
pub use sentinel::*;
pub use server::*;
pub use wire::*;

use std::net::TcpListener;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single expected event may take before a test fails. Generous:
/// these are correctness tests, not timing tests.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A port nothing listens on right now, and that this test process has
/// never handed out before.
///
/// Never twice: a test that kills a Redis leaves others that still know its
/// port. A Cluster's surviving nodes keep greeting a dead node's port, and
/// meet whatever node starts there next, so another test's fresh node would
/// join the dead node's cluster ("Node ... is not empty" at `cluster create`,
/// seen under the full suite). Sentinels likewise would turn a new Redis on a
/// dead master's port into a replica.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until `check` holds, or fails the test with `what`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// The log a running server has written so far, and a way to wait on it.
#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// Declares `redis`, `redis_shared` (`--subscriptions shared`) and `in_process` variants of a test taking a `&Server`,
/// optionally with extra server arguments: `name => ["--flag", "value"]`.
/// Led by `tls:`, each test also gets `wss` and `wss_shared` variants:
/// Redis, either subscription mode, and the server on `wss://` with a
/// certificate of the test's own (its clients speak TLS without being told:
/// see [`Wire`]).
macro_rules! with_both_brokers {
    (tls: $($name:ident $(=> [$($arg:expr),*])?),* $(,)?) => {$(
        mod $name {
            crate::support::broker_variants!($name $($(, $arg)*)?);
            #[cfg(all(feature = "tls", target_os = "linux"))]
            #[test]
            fn wss() {
                let redis = crate::support::Redis::start();
                let url = redis.url();
                let args: &[&str] = &["--redis", &url, $($($arg),*)?];
                super::$name(&crate::support::Server::start_tls(args));
            }
            /// Shared subscriptions write through the dispatcher's
            /// non-blocking path: over TLS, its own test.
            #[cfg(all(feature = "tls", target_os = "linux"))]
            #[test]
            fn wss_shared() {
                let redis = crate::support::Redis::start();
                let url = redis.url();
                let args: &[&str] = &["--redis", &url, "--subscriptions", "shared", $($($arg),*)?];
                super::$name(&crate::support::Server::start_tls(args));
            }
        }
    )*};
    ($($name:ident $(=> [$($arg:expr),*])?),* $(,)?) => {$(
        mod $name {
            crate::support::broker_variants!($name $($(, $arg)*)?);
        }
    )*};
}
pub(crate) use with_both_brokers;

/// The three broker variants of [`with_both_brokers`], in the test's module.
macro_rules! broker_variants {
    ($name:ident $(, $arg:expr)*) => {
        #[test]
        fn redis() {
            let redis = crate::support::Redis::start();
            let url = redis.url();
            let args: &[&str] = &["--redis", &url, $($arg),*];
            super::$name(&crate::support::Server::start(args));
        }
        #[test]
        fn redis_shared() {
            let redis = crate::support::Redis::start();
            let url = redis.url();
            let args: &[&str] = &["--redis", &url, "--subscriptions", "shared", $($arg),*];
            super::$name(&crate::support::Server::start(args));
        }
        #[test]
        fn in_process() {
            let args: &[&str] = &["--in-process", $($arg),*];
            super::$name(&crate::support::Server::start(args));
        }
    };
}
pub(crate) use broker_variants;

/// Declares `per_client` and `shared` variants of a test taking the extra
/// server arguments that choose the Redis subscription mode. Led by `tls:`,
/// each also gets a `wss` variant (per-client, the server on `wss://`).
macro_rules! in_both_subscription_modes {
    (tls: $($name:ident),* $(,)?) => {$(
        mod $name {
            crate::support::subscription_variants!($name);
            crate::support::wss_variant!($name);
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            crate::support::subscription_variants!($name);
        }
    )*};
}
pub(crate) use in_both_subscription_modes;

/// Declares `ws` and `wss` variants of a test taking extra server
/// arguments (none, or the certificate options).
#[allow(unused_macros)] // by the token tests only
macro_rules! over_ws_and_wss {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn ws() {
                super::$name(&[]);
            }
            crate::support::wss_variant!($name);
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use over_ws_and_wss;

/// The `wss` variant of a test taking extra server arguments: the
/// certificate options, from certificates of its own.
macro_rules! wss_variant {
    ($name:ident) => {
        #[cfg(all(feature = "tls", target_os = "linux"))]
        #[test]
        fn wss() {
            let certs = crate::support::Certs::new();
            let tls = certs.server_args();
            super::$name(&[&tls[0], &tls[1], &tls[2], &tls[3]]);
        }
    };
}
pub(crate) use wss_variant;

/// The two variants of [`in_both_subscription_modes`].
macro_rules! subscription_variants {
    ($name:ident) => {
        #[test]
        fn per_client() {
            super::$name(&[]);
        }
        #[test]
        fn shared() {
            super::$name(&["--subscriptions", "shared"]);
        }
    };
}
pub(crate) use subscription_variants;
