//! TLS (the `tls` wing): `wss://` and `https://` for clients, with rustls.
//!
//! What TLS changes in a server that gives every client a reader thread and
//! one writer is small and sits here:
//!
//! * [`Session`] — a client's TLS state machine shared by its two threads:
//!   the reader decrypts, the writer encrypts, neither blocks while holding
//!   it (its module doc is the chapter to read).
//! * [`Certificates`] — the certificate and key, checked at start and read
//!   again on `SIGHUP`.
//! * [`validity`] — a certificate's dates, so that an expired one is an
//!   error at start.
//!
//! Everything else — the HTTP exchange, the WebSocket halves, the limits —
//! sees a [`crate::net::Stream`], which is a TCP socket or a `Session`.
//! Redis over TLS (`rediss://`) is the broker's (`crate::broker::redis`).

mod certs;
mod session;
mod validity;

pub use certs::Certificates;
pub(crate) use session::{HandshakeError, Session, Wait};

/// The cryptography rustls uses: *ring*, compiled in (rustls's default,
/// aws-lc-rs, needs cmake to build). rustls marks it deprecated for lacking
/// post-quantum key exchange; classical X25519 and P-256 are what browsers
/// and websocat offer alongside.
#[allow(deprecated)]
pub(crate) fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
