//! Unique nicknames (`--unique-nicknames`): a connection claims its
//! nickname in its room before it is let in, and a second connection asking
//! for a name that is taken there gets `409 Conflict`.
//!
//! **Names are compared as people read them.** The claim is held under
//! each of the name's [`readings`] (NFKC, small capitals, case folded, UTS
//! #39 confusables; a capital `I` read both as `i` and as `l`), so `Alice`,
//! `ALICE`, `aIice`, Cyrillic `аlice`, full-width `ａｌｉｃｅ` and `ᴀʟɪᴄᴇ` are
//! all the name `alice`; the name shown stays as typed. Each reading is
//! claimed atomically on its own: a name is let in only with all of them,
//! and gives back those it got when one is taken. A free name that mixes scripts
//! ([`mixes_scripts`]) is refused too (400): with uniqueness promised, a
//! look-alike is an impersonation (of a name in use, it is told `409`).
//!
//! The claim lives in the relay (with Redis, a hash per room, so instances
//! agree), is taken atomically (`HSETNX`), and is given back when the
//! connection's `Conn` is dropped — when its last thread ends. A name
//! held by a connection of an instance that crashed is taken over once
//! that instance's liveness key has expired (30 s).
//!
//! **Claims per address are bounded** (`--max-nicknames-per-ip`): one
//! address holds at most that many claims at once on this instance, across
//! rooms; past it, `429`. Otherwise one address could squat every name
//! people want. Per instance, as `--max-connections-per-ip` is, and counted
//! as it is ([`address_key`]: IPv6 per /64).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tungstenite::http::StatusCode;

use super::per_ip::{AddressKey, address_key};
use crate::broker::{Broker, BrokerError};
use crate::protocol::{ConnId, Member, NameError, Room, mixes_scripts, readings};

/// A claimed nickname, given back on drop.
pub struct NicknameClaim {
    broker: Arc<dyn Broker>,
    room: Room,
    /// The name's readings held: what the claim is held under.
    keys: Vec<String>,
    conn: ConnId,
    /// Its place in its address's count (`None`: not counted).
    place: Option<AddressPlace>,
}

impl NicknameClaim {
    /// Claims `nickname` (as read: each of its [`readings`]) in `room` for
    /// `conn`: `Ok(None)` if someone else holds one of them.
    pub fn take(
        broker: &Arc<dyn Broker>,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<Option<NicknameClaim>, BrokerError> {
        let mut claim = NicknameClaim {
            broker: Arc::clone(broker),
            room: room.clone(),
            keys: Vec::new(),
            conn: conn.clone(),
            place: None,
        };
        // In one order (sorted), so two names sharing readings race for
        // the same one first. What was taken before a refusal is given back
        // as `claim` drops.
        for key in readings(nickname) {
            if !broker.claim_nickname(room, &key, conn)? {
                return Ok(None);
            }
            claim.keys.push(key);
        }
        Ok(Some(claim))
    }
}

impl std::fmt::Debug for NicknameClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NicknameClaim({:?} in {})", self.keys, self.room)
    }
}

impl Drop for NicknameClaim {
    fn drop(&mut self) {
        for key in &self.keys {
            self.broker.release_nickname(&self.room, key, &self.conn);
        }
    }
}

/// With `--unique-nicknames`: the relay that holds the claims, and how
/// many each address holds here.
pub struct Unique {
    broker: Arc<dyn Broker>,
    claims_per_ip: Arc<ClaimsPerIp>,
}

impl Unique {
    /// Claims held in `broker`, at most `per_ip` per address (`None`: no
    /// limit).
    pub fn new(broker: Arc<dyn Broker>, per_ip: Option<usize>) -> Unique {
        Unique {
            broker,
            claims_per_ip: ClaimsPerIp::new(per_ip),
        }
    }

    /// Lets `member` (connection `conn`, from `peer`, counted as
    /// `address`) in only under a name nobody else holds in its room (read
    /// as people read it), that does not mix scripts, and within its
    /// address's bound: the claim, to keep while the connection lives.
    /// `Err` is the refusal to answer with: 400, 409, 429 or 503, and why.
    pub(super) fn admit(
        &self,
        peer: SocketAddr,
        member: &Member,
        conn: &ConnId,
        address: IpAddr,
    ) -> Result<NicknameClaim, (StatusCode, String)> {
        let nickname = member.nickname.as_str();
        let place = match self.claims_per_ip.take(address) {
            Ok(place) => place,
            Err(limit) => {
                log::warn!("refused {peer}: {address} holds {limit} nicknames");
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "your address holds {limit} nicknames already (--max-nicknames-per-ip); \
                         close a connection first"
                    ),
                ));
            }
        };
        match NicknameClaim::take(&self.broker, &member.room, nickname, conn) {
            // Checked once the name is known to be free: a look-alike of a
            // name in use is told it is taken.
            Ok(Some(_)) if mixes_scripts(nickname) => Err((
                StatusCode::BAD_REQUEST,
                format!("nickname {nickname:?} {}", NameError::MixedScripts),
            )),
            Ok(Some(mut claim)) => {
                claim.place = place;
                Ok(claim)
            }
            Ok(None) => Err((
                StatusCode::CONFLICT,
                format!(
                    "the nickname {nickname:?} is taken in {} (or one that reads the same); \
                     choose another",
                    member.room
                ),
            )),
            Err(e) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("chat relay unavailable ({e}); try again later"),
            )),
        }
    }
}

/// How many nickname claims each address holds on this instance.
#[derive(Debug)]
pub struct ClaimsPerIp {
    /// Most claims per address (`None`: no limit).
    limit: Option<usize>,
    held: Mutex<HashMap<AddressKey, usize>>,
}

/// One claim's place in its address's count; given back on drop.
#[derive(Debug)]
struct AddressPlace {
    owner: Arc<ClaimsPerIp>,
    address: AddressKey,
}

impl ClaimsPerIp {
    /// At most `limit` claims per address (`None`: no limit).
    pub fn new(limit: Option<usize>) -> Arc<ClaimsPerIp> {
        Arc::new(ClaimsPerIp {
            limit,
            held: Mutex::default(),
        })
    }

    /// A place for one more claim of `address` (counted by its
    /// [`address_key`]; `None` when nothing is counted), or the limit it has
    /// reached.
    fn take(self: &Arc<Self>, address: IpAddr) -> Result<Option<AddressPlace>, usize> {
        let Some(limit) = self.limit else {
            return Ok(None);
        };
        let address = address_key(address);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(address).or_default();
        if *count >= limit {
            if *count == 0 {
                held.remove(&address);
            }
            return Err(limit);
        }
        *count += 1;
        Ok(Some(AddressPlace {
            owner: Arc::clone(self),
            address,
        }))
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_the_limit_and_gets_its_places_back() {
        let claims = ClaimsPerIp::new(Some(2));
        let (one, two): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "::1".parse().unwrap());
        let a = claims.take(one).unwrap();
        let b = claims.take(one).unwrap();
        assert_eq!(claims.take(one).unwrap_err(), 2);
        let c = claims.take(two).unwrap();
        drop(a);
        let d = claims.take(one).unwrap();
        drop((b, c, d));
        assert!(claims.held.lock().unwrap().is_empty());
        assert!(ClaimsPerIp::new(None).take(one).unwrap().is_none());
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64() {
        let claims = ClaimsPerIp::new(Some(2));
        let in_64 = |n: u16| IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, n]);
        let _a = claims.take(in_64(1)).unwrap();
        let _b = claims.take(in_64(2)).unwrap();
        assert_eq!(claims.take(in_64(3)).unwrap_err(), 2, "same /64");
        let _c = claims
            .take(IpAddr::from([0x2001, 0xdb8, 1, 3, 0, 0, 0, 1]))
            .unwrap();
    }
}
