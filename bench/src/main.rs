//! `loadgen`: threadchat's load generator, run by `make bench`. A crate of
//! its own in the workspace, so that the server's package keeps its one
//! justified `unsafe` block and builds anywhere; this one measures with
//! `epoll` and `/proc`, so it runs on Linux only.
//!
//! It starts its own `redis-server` (on a free port) and a release
//! `threadchat` (on port 0), then drives them with tungstenite clients and
//! prints one table:
//!
//! * `a`: 1,000 clients in a room, one sender at 10 msg/s for 10 s.
//! * `b`: 100 clients, 10 of them sending as fast as the server allows, 5 s.
//! * `c`: 5,000 idle clients (`--idle-clients`) held 10 s, then one message
//!   all must receive.
//! * `t`: 2,000 short connections asking `/healthz` (with `--tls`, each a
//!   full handshake: what one costs the server).
//! * `d`, `e`, `f`: attacks, each against one bound (see `loadgen/attacks.rs`): a
//!   join storm over a history of the biggest messages, slow readers, a
//!   flood of `/members` requests. They print a table of their own.
//!
//! Clients connect and send from plain blocking threads. They receive
//! differently: the load generator shares the machine with the server, so
//! it must cost less per delivered frame than the server does, and a thread
//! per receiving client would cost a thread wake-up per frame — as much as
//! the server spends. Two receiver threads each wait on half the sockets
//! with `epoll` instead (see `receive`).
//!
//! With `--tls` the clients of a, b, c and t speak `wss://` to a server started
//! with a certificate made for the run (`--tls both`: each scenario plain,
//! then over TLS, for what TLS costs side by side).
//!
//! Layout (in `loadgen/`): `env` starts the processes and reads `/proc`; `client`
//! connects; `tls` makes the certificates and the clients' TLS stream;
//! `scenarios` runs a, b, c and t; `receive` reads for every
//! client; `attacks` runs d, e and f; `report` prints the tables; `chart`
//! draws a, b and c as SVG charts (`--charts DIR`); `versus` sets
//! threadchat beside the async reference server (`bench/reference`, relay
//! `async`) and prints their ratios.
//!
//! Latency is measured from a send timestamp carried in each message (client
//! and server share the machine's clock). Every receiver checks each sender's
//! sequence numbers, so loss, duplicates and order violations are counted.

#[cfg(target_os = "linux")]
mod loadgen;

#[cfg(target_os = "linux")]
fn main() -> anyhow::Result<()> {
    loadgen::main()
}

/// Elsewhere there is no `epoll` and no `/proc` to measure with.
#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!(
        "loadgen measures with epoll and /proc, which only Linux has: \
         run `make bench` on a Linux machine (or in a Linux container)"
    );
    std::process::ExitCode::FAILURE
}
