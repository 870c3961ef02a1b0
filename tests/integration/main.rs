//! threadchat's integration tests: one binary, real processes.
//!
//! Each test starts its own `redis-server` on a free port (never 6379) and its
//! own `threadchat` on port 0, then talks to it as a user would.
//!
//! Tests of a wing (a Cargo feature) are built only with it: `make
//! check-minimal` runs the rest without the features.

mod admission;
#[cfg(feature = "tokens")]
mod auth;
mod bounds;
mod bounds_relay;
mod chat;
#[cfg(feature = "redis-ha")]
mod cluster;
#[cfg(all(feature = "tokens", feature = "redis-ha"))]
mod docs;
mod evidence;
mod example;
mod faults;
mod gaps;
mod ghosts;
mod http;
mod interop;
mod lifecycle;
mod limits;
mod names;
mod recovery;
mod redis_wire;
#[cfg(all(feature = "tls", target_os = "linux"))]
mod rediss;
mod resend_attacks;
mod room_bounds;
mod rooms;
#[cfg(feature = "redis-ha")]
mod sentinel;
mod startup;
mod support;
#[cfg(all(feature = "tls", target_os = "linux"))]
mod tls;
