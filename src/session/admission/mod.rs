//! The admission wing: who may connect, and on what terms. Per-address
//! caps (counted through a trusted proxy by the address it forwards), the
//! places of connections still starting, refusals counted and summed up in
//! the log, tokens and each user's connections, the budget of new rooms,
//! each address's share of the rate limit, and claims on nicknames.
//!
//! The rest of the session reaches all of it through one door
//! ([`door`]): an [`Admission`] built once at start, and the [`Pass`] it
//! gives each connection, which holds every place and claim the
//! connection took and gives them all back when it is dropped.

mod address_rate;
mod door;
mod new_rooms;
mod per_ip;
mod refusals;
mod starting;
#[cfg(feature = "tokens")]
mod tokens;
#[cfg(not(feature = "tokens"))]
#[path = "without_tokens.rs"]
mod tokens;
mod unique;

pub use door::{Admission, Pass};
pub use refusals::{Held, Refusal};
pub use tokens::Lease;
