//! How many rooms one client address may create (`--new-rooms-per-minute`).
//!
//! Each room's log is bounded, but without this nothing bounds how many
//! rooms one address fills: a handful of connections, each opening a fresh
//! room and filling its log, would add hundreds of megabytes a minute to
//! Redis (or to the process). So each address has a token bucket of new
//! rooms: `per_minute` at once, refilled at `per_minute` a minute. A room
//! is new when it has no log yet; joining a room that exists costs nothing.
//! A join that would create a room with the bucket empty is refused with
//! HTTP 429 before anything is started for it.
//!
//! An address is counted as [`address_key`] says (IPv6 per /64), as every
//! per-address bound is: otherwise an IPv6 host would get a bucket for
//! each of its 2^64 addresses.
//!
//! The buckets of addresses that have not created a room for a minute are
//! full again, and are forgotten, so the table stays small.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::per_ip::{AddressKey, address_key};
use crate::broker::Broker;
use crate::protocol::Room;

/// Addresses kept before the full buckets are swept out.
const SWEEP_AT: usize = 4096;

/// Every address's bucket of new rooms.
#[derive(Debug)]
pub struct NewRooms {
    /// Rooms per minute, and in a burst; `None`: no limit.
    per_minute: Option<u32>,
    buckets: Mutex<HashMap<AddressKey, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Refused since its last room: refusals in a row are logged once.
    refused: bool,
}

/// Why a new room was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Until the address may create one again.
    pub wait: Duration,
    /// The first refusal since the address's last new room (the one to log).
    pub first: bool,
}

impl NewRooms {
    /// Buckets of `per_minute` new rooms (`None`: no limit).
    pub fn new(per_minute: Option<u32>) -> NewRooms {
        NewRooms {
            per_minute,
            buckets: Mutex::default(),
        }
    }

    /// Whether a limit is set at all (if not, nobody needs to ask whether
    /// a room is new).
    pub fn is_limited(&self) -> bool {
        self.per_minute.is_some()
    }

    /// Takes one new room for `ip` (counted by its [`address_key`]) at
    /// `now`: `Err` with the time until the next one if its bucket is empty.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        let Some(per_minute) = self.per_minute else {
            return Ok(());
        };
        let capacity = f64::from(per_minute);
        let per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, b| Bucket::refilled(*b, now, per_second, capacity) < capacity);
        }
        let bucket = buckets.entry(address_key(ip)).or_insert(Bucket {
            tokens: capacity,
            last: now,
            refused: false,
        });
        bucket.tokens = Bucket::refilled(*bucket, now, per_second, capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refused = false;
            Ok(())
        } else {
            Err(Refused {
                wait: Duration::from_secs_f64((1.0 - bucket.tokens) / per_second),
                first: !std::mem::replace(&mut bucket.refused, true),
            })
        }
    }

    /// Whether a client from `ip` may join `room` (`broker` tells whether
    /// it exists): `Err` with the reason to give it (with a 429) when the
    /// room is new and `ip` may create no more rooms for now. A relay that cannot tell whether the room exists lets
    /// the join go on (it fails on its own, with its own reason).
    pub(super) fn admit(&self, broker: &dyn Broker, room: &Room, ip: IpAddr) -> Result<(), String> {
        if !self.is_limited() || !matches!(broker.log_end(room), Ok(None)) {
            return Ok(());
        }
        self.take(ip, Instant::now()).map_err(|refused| {
            // Once per run of refusals: an address rotating rooms does not
            // flood the log either.
            if refused.first {
                log::warn!("refused {ip}: --new-rooms-per-minute reached (joining {room})");
            }
            format!(
                "too many new rooms from your address; try again in {} s, or join a room that exists",
                refused.wait.as_secs() + 1
            )
        })
    }
}

impl Bucket {
    fn refilled(self, now: Instant, per_second: f64, capacity: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * per_second).min(capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_bucket_which_refills() {
        let rooms = NewRooms::new(Some(3));
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "::1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(rooms.take(a, t0), Ok(()));
        }
        let refused = rooms.take(a, t0).unwrap_err();
        assert_eq!(refused.wait.as_secs(), 20, "3 a minute: one every 20 s");
        assert!(refused.first);
        assert!(!rooms.take(a, t0).unwrap_err().first, "logged once");
        assert_eq!(rooms.take(b, t0), Ok(()));
        assert_eq!(rooms.take(a, t0 + Duration::from_secs(21)), Ok(()));
        assert!(rooms.take(a, t0 + Duration::from_secs(21)).is_err());
        assert!(NewRooms::new(None).take(a, t0).is_ok());
    }

    #[test]
    fn an_ipv6_host_has_one_bucket_for_its_64() {
        let rooms = NewRooms::new(Some(2));
        let t0 = Instant::now();
        let in_64 = |n: u16| IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, n]);
        assert_eq!(rooms.take(in_64(1), t0), Ok(()));
        assert_eq!(rooms.take(in_64(2), t0), Ok(()));
        assert!(rooms.take(in_64(3), t0).is_err(), "same /64, same bucket");
        let next_64 = IpAddr::from([0x2001, 0xdb8, 1, 3, 0, 0, 0, 1]);
        assert_eq!(rooms.take(next_64, t0), Ok(()));
    }
}
