//! # threadchat
//!
//! A WebSocket chat server that relays every message through Redis pub/sub,
//! built the synchronous way: plain threads, blocking I/O and crossbeam
//! channels. No async runtime anywhere.
//!
//! ## The design in one page
//!
//! ```text
//!   accept loop (main thread) ── per client ──┐
//!                                             ▼
//!   client ──frames──▶ reader thread      ──PUBLISH──▶ Redis
//!   client ◀─frames─── subscriber thread  ◀─SUBSCRIBE── Redis
//!                      └─ both write through one Mutex<WebSocket> ─┘
//! ```
//!
//! * A `std::net::TcpListener` accepts ([`server`]). Each client gets a
//!   **reader thread**, which blocks in `WebSocket::read` and publishes what
//!   the client says, and a **subscriber thread**, which blocks on the
//!   client's own Redis subscription and writes what the room says. (The
//!   card calls the thread blocked on Redis "the reader" and the one blocked
//!   on the WebSocket "the writer": threadchat's subscriber and reader.)
//! * The two coordinate through crossbeam channels: "subscribed", "go",
//!   "the reader is done", and whoever ends first wakes the other.
//! * Exactly one `WebSocket` writes to a socket: a blocking WebSocket cannot
//!   be split, so the reader's own writes go nowhere and its replies (pongs,
//!   the close) go through the one writer.
//! * Every blocking call has a stated way to be interrupted: `accept` by a
//!   self-connection, socket reads (clients' and Redis subscriptions') by
//!   `shutdown()`, channel receives by dropping the sender.
//!
//! `examples/minimal.rs` is this page as a program of about 150 lines: read it
//! first. `docs/ARCHITECTURE.md` starts there and adds, a module at a time,
//! what the real server adds: limits, reconnects, rooms, shared
//! subscriptions.
//!
//! ## Layout
//!
//! * [`config`] — command line → validated [`config::Config`].
//! * [`server`] — bind, the accept loop, the registry of connections, shutdown.
//! * `http` — reading a request head, plain answers, checking an upgrade;
//!   knows nothing of the chat.
//! * `session` — one connection: the router, its start (a short-lived start
//!   thread), its reader and subscriber threads, the one writer, the guards
//!   that end it; joins and leaves announced; history and presence on join;
//!   the admission wing (caps, tokens, nickname claims) behind one door,
//!   `session::admission`.
//! * `net` — a client's byte stream: a TCP socket, or TLS over one.
//! * `tls` — the TLS wing: a session shared by a connection's two threads,
//!   the certificate and its reload.
//! * `protocol` — nicknames and rooms, what clients send, what the server
//!   sends, the JSON on the Redis channel.
//! * `broker` — the relay: Redis (`broker::redis`, with shared subscriptions
//!   in `broker::redis::shared`) and in-process (`broker::memory`); the
//!   in-process fan-out (`broker::fanout`).
//! * `capacity` — the process's budget of threads and descriptors, which
//!   connections and rooms' feeds reserve from before they start threads.
//! * `metrics` — counters, served at `/metrics`.
//! * `auth` — who is speaking: signed tokens checked against the configured
//!   key (opt-in), and signing them for `threadchat token`.
//!
//! Three wings are Cargo features, on by default: `tokens` (`auth`, reached
//! from a connection through `session::admission`), `redis-ha` (Sentinel
//! and Cluster, `broker::redis::ha`) and `tls` (`wss://`, reached through
//! `net::Stream`). `cargo build --no-default-features` leaves them out.
//!
//! Only `auth`, [`config`] and [`server`] are public: the binary needs
//! nothing else, and what nobody uses, the compiler reports.

// Three `unsafe` blocks in the whole server: `session::sched`, `poll` in
// `tls::session` and `sched_getcpu` in `broker::redis::parse_once`.
#![deny(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "tokens")]
pub mod auth;
mod broker;
mod capacity;
pub mod config;
mod http;
mod metrics;
mod net;
mod protocol;
pub mod server;
mod session;
#[cfg(feature = "tls")]
mod tls;

/// Stack size of every thread threadchat starts (but a connection's start
/// thread: see `session::START_STACK_SIZE`). Connection threads only parse
/// small JSON and frames; 256 KiB leaves ample room even in debug builds
/// (the default is 2 MiB, which would be mapped for each of 2 threads per
/// client).
pub const THREAD_STACK_SIZE: usize = 256 * 1024;
