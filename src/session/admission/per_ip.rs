//! How many connections each client address holds, and the limit on it
//! (`--max-connections-per-ip`).
//!
//! Without it one host can take every connection slot the server has. The
//! accept loop takes a [`Slot`] for each connection's address before it
//! spends a thread on it, and answers 503 when the address has none left
//! (a second later: see [`refusals`](super::refusals)).
//! A connection through a trusted reverse proxy is counted by the address
//! the proxy forwarded instead, once its request head has been read (the
//! proxy itself is not counted: all its clients share its address).
//!
//! A slot is held by the connection's [`Pass`](super::door::Pass) and given
//! back when it is dropped, that is when the connection's last thread ends.
//!
//! **What an address is.** An IPv4 address is one client. An IPv6 host
//! usually holds a whole /64 (and can use any address in it), so IPv6
//! addresses are counted by their /64 ([`address_key`]); an IPv4-mapped
//! IPv6 address is its IPv4 address. Every per-address bound (here, the
//! starting places, the message budget, the new rooms, the nickname
//! claims) keys its table on an [`AddressKey`], which only [`address_key`]
//! makes, so none can count a raw address by mistake.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Connections per address, under a limit.
#[derive(Debug)]
pub struct PerIp {
    limit: Option<usize>,
    counts: Mutex<HashMap<AddressKey, usize>>,
}

/// One connection's place in its address's count; given back on drop.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<PerIp>,
    ip: AddressKey,
}

impl PerIp {
    /// Counts under `limit` connections per address (`None`: no limit,
    /// nothing counted).
    pub fn new(limit: Option<usize>) -> Arc<PerIp> {
        Arc::new(PerIp {
            limit,
            counts: Mutex::default(),
        })
    }

    /// A slot for one more connection from `ip` (counted by its
    /// [`address_key`]): `Some(None)` when there is no limit, `None` when
    /// the address has used up its slots.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Option<Slot>> {
        let Some(limit) = self.limit else {
            return Some(None);
        };
        let ip = address_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Some(Slot {
            owner: Arc::clone(self),
            ip,
        }))
    }

    /// How many connections `ip` holds now.
    #[cfg(test)]
    pub fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&address_key(ip)).copied().unwrap_or(0)
    }
}

/// A client address as the per-address bounds count it (see
/// [`address_key`]): one client, whichever of its addresses it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

/// What a client address is counted as: an IPv4 address as itself, an
/// IPv6 address as its /64 (the first 64 bits, the rest zero), an
/// IPv4-mapped IPv6 address as its IPv4 address.
pub fn address_key(ip: IpAddr) -> AddressKey {
    AddressKey(match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    })
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back() {
        let per_ip = PerIp::new(Some(2));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let a = per_ip.take(ip).unwrap();
        let _b = per_ip.take(ip).unwrap();
        assert!(per_ip.take(ip).is_none());
        assert!(per_ip.take("10.1.2.4".parse().unwrap()).is_some());
        drop(a);
        assert_eq!(per_ip.count(ip), 1);
        assert!(per_ip.take(ip).is_some());
        assert!(PerIp::new(None).take(ip).unwrap().is_none());
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let per_ip = PerIp::new(Some(2));
        let _a = per_ip.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _b = per_ip
            .take("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        // Same /64: refused; another /64: its own count.
        assert!(
            per_ip
                .take("2001:db8:1:2:abcd::1".parse().unwrap())
                .is_none()
        );
        assert!(per_ip.take("2001:db8:1:3::1".parse().unwrap()).is_some());
        assert_eq!(
            address_key("::ffff:10.0.0.1".parse().unwrap()),
            address_key("10.0.0.1".parse().unwrap())
        );
    }
}
