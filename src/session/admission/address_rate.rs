//! With a rate limit and no token, a client's messages share its
//! address's budget: one [`RateLimiter`] per address (as [`address_key`]
//! counts it), shared by all of the address's connections on this instance,
//! so that opening more connections does not buy more budget. (With tokens,
//! a user's connections share the user's instead: see `tokens`.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::per_ip::{AddressKey, address_key};
use crate::session::rate::{RateLimiter, SharedLimiter};

/// One rate limiter per client address (as [`address_key`] counts it),
/// shared by all of the address's connections, and kept while it has any.
#[derive(Debug)]
pub struct AddressLimiters {
    rate: f64,
    burst: u32,
    /// Per address: its connections, and their limiter.
    limiters: Mutex<HashMap<AddressKey, (usize, SharedLimiter)>>,
}

/// One connection's share of its address's limiter; given back on drop.
#[derive(Debug)]
pub struct AddressShare {
    owner: Arc<AddressLimiters>,
    key: AddressKey,
    /// The address's limiter.
    pub limiter: SharedLimiter,
}

impl AddressLimiters {
    /// Limiters of `rate` messages per second, `burst` at once, per address.
    pub fn new(rate: f64, burst: u32) -> Arc<AddressLimiters> {
        Arc::new(AddressLimiters {
            rate,
            burst,
            limiters: Mutex::default(),
        })
    }

    /// The limiter of `ip`'s address, for one more of its connections.
    pub fn share(self: &Arc<Self>, ip: IpAddr) -> AddressShare {
        let key = address_key(ip);
        let mut limiters = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        let (count, limiter) = limiters.entry(key).or_insert_with(|| {
            let limiter = RateLimiter::new(self.rate, self.burst, Instant::now());
            (0, Arc::new(Mutex::new(limiter)))
        });
        *count += 1;
        AddressShare {
            owner: Arc::clone(self),
            key,
            limiter: Arc::clone(limiter),
        }
    }
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut limiters = self
            .owner
            .limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((count, _)) = limiters.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                limiters.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_shares_one_limiter_while_it_has_connections() {
        let limiters = AddressLimiters::new(1.0, 1);
        let a = limiters.share("10.0.0.1".parse().unwrap());
        let b = limiters.share("10.0.0.1".parse().unwrap());
        let other = limiters.share("10.0.0.2".parse().unwrap());
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        assert!(!Arc::ptr_eq(&a.limiter, &other.limiter));
        drop((a, b, other));
        assert!(limiters.limiters.lock().unwrap().is_empty());
    }
}
