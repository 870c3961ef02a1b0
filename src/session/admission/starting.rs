//! Connections still in their start: accepted, their request head not yet
//! read. A silent connection costs a thread and one of the
//! `--max-starting` places for as long as the head timeout, so without a
//! bound a few hosts opening silent connections fill every place, and the
//! accept loop stops taking anyone else's.
//!
//! Two bounds, both checked by the accept loop before it spends a thread:
//!
//! * **Per address** (`--max-starting-per-ip`, counted as
//!   [`address_key`] says: IPv6 per /64): past it, the connection gets 503
//!   (held a second first: see [`refusals`](super::refusals)), and no
//!   thread. A real client sends its head as soon as it has connected, so
//!   it holds its place for a moment; only silent or trickling ones pile
//!   up. A trusted proxy is not counted (its clients share its address).
//! * **A shorter head timeout under pressure**: once more than half of the
//!   places are taken, a new connection gets [`PRESSED_HEAD_TIMEOUT`] (or
//!   `--handshake-timeout`, if shorter) to send its head. Silent
//!   connections then cycle through quickly and the places stay free for
//!   everyone else.
//!
//! A [`StartSlot`] is held by the connection until its head is read and
//! answered (or routed to the upgrade), and given back on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::per_ip::{AddressKey, address_key};

/// The head timeout of a connection accepted while more than half of the
/// start places are taken: long enough for any real client, which sends
/// its head at once; short enough that silent connections cannot pile up.
pub const PRESSED_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// The places for connections in their start.
#[derive(Debug)]
pub struct Starting {
    /// Most places per address (`None`: no limit per address).
    per_address: Option<usize>,
    /// All places (`--max-starting`).
    capacity: usize,
    /// `--handshake-timeout`.
    head_timeout: Duration,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    by_address: HashMap<AddressKey, usize>,
    total: usize,
}

/// One connection's place among the starting; given back on drop.
#[derive(Debug)]
pub struct StartSlot {
    owner: Arc<Starting>,
    /// The address counted, if it is (not a trusted proxy).
    key: Option<AddressKey>,
    /// How long this connection has to send its request head.
    pub head_timeout: Duration,
}

impl Starting {
    /// `capacity` places in all, `per_address` per address, connections
    /// given `head_timeout` unless pressed.
    pub fn new(
        capacity: usize,
        per_address: Option<usize>,
        head_timeout: Duration,
    ) -> Arc<Starting> {
        Arc::new(Starting {
            per_address,
            capacity,
            head_timeout,
            counts: Mutex::default(),
        })
    }

    /// A place for a connection from `ip` (not counted against its
    /// address when `counted` is false: a trusted proxy), or `None` when
    /// the address has all it may have.
    pub fn take(self: &Arc<Self>, ip: IpAddr, counted: bool) -> Option<StartSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = counted.then(|| address_key(ip));
        if let Some(key) = key {
            let count = counts.by_address.entry(key).or_default();
            if self.per_address.is_some_and(|limit| *count >= limit) {
                return None;
            }
            *count += 1;
        }
        let pressed = counts.total >= self.capacity / 2;
        counts.total += 1;
        Some(StartSlot {
            owner: Arc::clone(self),
            key,
            head_timeout: if pressed {
                self.head_timeout.min(PRESSED_HEAD_TIMEOUT)
            } else {
                self.head_timeout
            },
        })
    }
}

impl Drop for StartSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total -= 1;
        if let Some(key) = self.key
            && let Some(count) = counts.by_address.get_mut(&key)
        {
            *count -= 1;
            if *count == 0 {
                counts.by_address.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn places_per_address_and_a_short_timeout_past_half() {
        let starting = Starting::new(6, Some(2), LONG);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = starting.take(a, true).unwrap();
        let _a2 = starting.take(a, true).unwrap();
        assert!(starting.take(a, true).is_none());
        // A trusted proxy is not limited, but takes a place.
        let _proxy = starting.take(a, false).unwrap();
        assert_eq!(a1.head_timeout, LONG);
        // Three of six taken: the next one is pressed.
        let b1 = starting.take(b, true).unwrap();
        assert_eq!(b1.head_timeout, PRESSED_HEAD_TIMEOUT);
        drop(a1);
        assert!(starting.take(a, true).is_some());
        drop(b1);
        assert!(
            !starting
                .counts
                .lock()
                .unwrap()
                .by_address
                .contains_key(&address_key(b))
        );
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let starting = Starting::new(100, Some(1), LONG);
        let _one = starting.take("2001:db8::1".parse().unwrap(), true).unwrap();
        assert!(
            starting
                .take("2001:db8::2".parse().unwrap(), true)
                .is_none()
        );
        assert!(
            starting
                .take("2001:db8:0:1::2".parse().unwrap(), true)
                .is_some()
        );
    }
}
