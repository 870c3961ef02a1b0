//! The chat protocol: what a client may send, what the server sends back, and
//! the JSON that travels over Redis between instances.
//!
//! Everything that crosses a boundary is parsed here into a typed value, once.
//! The rest of the program never looks at raw JSON or raw path segments:
//!
//! * [`Nickname`] — a validated, percent-decoded nickname from `/chat/{nickname}`.
//! * [`ConnId`] — an identity for one WebSocket connection, unique across every
//!   instance sharing a Redis, used to suppress echo of a client's own messages.
//! * [`ClientFrame`] — what a client's text frame means: chat text (the
//!   `"message"` of a JSON object, as the original Python app's clients send
//!   `{"nickname": "alice", "message": "hi"}`, or the frame's text itself),
//!   or a fresh token.
//! * [`ChatMessage`] — the payload published on the Redis channel. It is a
//!   superset of what the original app publishes, so the two interoperate.
//! * [`ServerFrame`] — every JSON text frame the server sends to a client.
//! * [`Incoming`] — a payload from the room, parsed and encoded once for all
//!   the clients it goes to.
//!
//! The wire formats are described for humans in `docs/PROTOCOL.md`.

mod client;
mod frames;
mod incoming;
mod names;
mod payload;
mod request;
#[cfg(test)]
mod tests;

pub use client::*;
pub use frames::*;
pub use incoming::*;
pub use names::*;
pub use payload::*;
pub use request::*;
