//! # threadchat
//!
//! A WebSocket chat server that relays every message through Redis pub/sub,
//! built the synchronous way: plain threads, blocking I/O and crossbeam
//! channels. No async runtime anywhere.
//!
//! ## The design in one page
//!
//! ```text
//!                       ┌──────────────── one process ────────────────┐
//!  client ─TCP─▶ accept loop (main thread) ── spawns per connection ──┐│
//!                       │                                            ▼│
//!  client ─request─────────▶ tc-conn-N  first: HTTP, subscribe, 101 ──┤│  then hands over and ends
//!  client ─frames──────────▶ tc-read-N  reader: WebSocket::read ──────┼┼─PUBLISH─▶ tc-publish-0..1 ─▶ Redis
//!  client ◀─frames───────── tc-sub-N   subscriber: blocks on SUBSCRIBE ◀┼──────────────────────────── Redis
//!                       │   (both write through one Mutex<WebSocket>) │
//!                       └─────────────────────────────────────────────┘
//! ```
//!
//! * A `std::net::TcpListener` accepts; each connection gets a *reader thread*
//!   and a *subscriber thread*. A first thread does the connection's one-off
//!   start (the HTTP handshake, the welcome) and hands over to the reader, so
//!   that what the start used is freed ([`session::handoff`]).
//! * The subscriber thread blocks on its own Redis subscription to
//!   `global_room` and writes what arrives to the client; the reader thread
//!   blocks in `WebSocket::read` and publishes what the client says through a
//!   small shared pool of publisher threads.
//! * Exactly one `WebSocket` writes to a socket (see [`session::socket`]).
//! * Every blocking call has a stated way to be interrupted: `accept` by a
//!   self-connection, socket reads (clients' and Redis subscriptions') by
//!   `shutdown()`, channel receives by dropping the sender.
//! * With `--subscriptions shared`, one Redis subscription per room feeds
//!   every client of the room on this instance through bounded queues; the
//!   room's dispatcher threads write directly to the clients whose queues
//!   are empty, so a client that keeps up costs no thread wake-up per
//!   message ([`broker::fanout`]).
//!
//! `docs/ARCHITECTURE.md` tells the same story at length.
//!
//! ## Layout
//!
//! * [`config`] — command line → validated [`config::Config`].
//! * [`server`] — bind, accept loop, connection registry, shutdown.
//! * [`http`] — request head parsing, plain HTTP answers, the upgrade.
//! * [`session`] — one connection's threads; [`session::socket`] the one-writer split;
//!   [`session::handoff`] from the start's thread to the reader's;
//!   [`session::announce`] joins and leaves, coalesced per room;
//!   [`session::liveness`] messages must finish; [`session::per_ip`]
//!   connections per address; [`session::welcome`] history and presence.
//! * [`protocol`] — nicknames, connection ids, client and server frames, the Redis payload.
//! * [`broker`] — the relay: [`broker::redis`] and the in-process [`broker::memory`];
//!   [`broker::fanout`] fans out to clients' queues.
//! * [`metrics`] — counters, served at `/metrics`.

// One `unsafe` block in the whole server: `session::sched`.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod broker;
pub mod config;
pub mod http;
pub mod metrics;
mod net;
pub mod protocol;
pub mod server;
pub mod session;

/// Stack size of every thread threadchat starts. Connection threads only
/// parse small JSON and frames; 256 KiB leaves ample room even in debug builds
/// (the default is 2 MiB, which would be mapped for each of 2 threads per
/// client).
pub const THREAD_STACK_SIZE: usize = 256 * 1024;
