//! Unique nicknames (`--unique-nicknames`): a connection claims its
//! nickname in its room before it is let in, and a second connection asking
//! for a name that is taken there gets `409 Conflict`.
//!
//! The claim lives in the relay (with Redis, a hash per room, so instances
//! agree), is taken atomically (`HSETNX`), and is given back when the
//! connection's `Conn` is dropped — when its last thread ends. A name
//! held by a connection of an instance that crashed is taken over once
//! that instance's liveness key has expired (30 s).

use std::sync::Arc;

use crate::broker::{Broker, BrokerError};
use crate::protocol::{ConnId, Room};

/// A claimed nickname, given back on drop.
pub struct NicknameClaim {
    broker: Arc<dyn Broker>,
    room: Room,
    nickname: String,
    conn: ConnId,
}

impl NicknameClaim {
    /// Claims `nickname` in `room` for `conn`: `Ok(None)` if someone else
    /// holds it.
    pub fn take(
        broker: &Arc<dyn Broker>,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<Option<NicknameClaim>, BrokerError> {
        if !broker.claim_nickname(room, nickname, conn)? {
            return Ok(None);
        }
        Ok(Some(NicknameClaim {
            broker: Arc::clone(broker),
            room: room.clone(),
            nickname: nickname.to_owned(),
            conn: conn.clone(),
        }))
    }
}

impl std::fmt::Debug for NicknameClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NicknameClaim({:?} in {})", self.nickname, self.room)
    }
}

impl Drop for NicknameClaim {
    fn drop(&mut self) {
        self.broker
            .release_nickname(&self.room, &self.nickname, &self.conn);
    }
}
