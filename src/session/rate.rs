//! The rate limit: a token bucket, shared by all of a client's
//! connections on this instance ([`AddressLimiters`]: all connections from
//! one address, or with tokens, all of one user's:
//! [`tokens`](super::tokens)), so that opening more connections does
//! not buy more budget.
//!
//! A client may send `rate` messages per second on average and `burst`
//! messages at once. A message that finds the bucket empty is refused (the
//! client gets an error notice for the first refusal in a row, not for every
//! one, so the notices cannot themselves become a flood). A client that keeps
//! sending into an empty bucket — more refusals in a row than the burst size,
//! at least [`MIN_FLOOD_STRIKES`] — is flooding and is disconnected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::per_ip::{AddressKey, address_key};

/// The fewest consecutive refusals that count as flooding.
pub const MIN_FLOOD_STRIKES: u32 = 10;

/// One client's token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    refused_in_a_row: u32,
    flood_strikes: u32,
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Allowed,
    /// Drop it; `first` is true for the first refusal after an allowed one.
    Refused {
        /// Whether to tell the client.
        first: bool,
    },
    /// Drop it and disconnect the client.
    Flooding,
}

impl RateLimiter {
    /// A full bucket: `rate` messages per second, `burst` at once.
    pub fn new(rate: f64, burst: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            refused_in_a_row: 0,
            flood_strikes: burst.max(MIN_FLOOD_STRIKES),
        }
    }

    /// Decides about one message arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            return Verdict::Allowed;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row > self.flood_strikes {
            Verdict::Flooding
        } else {
            Verdict::Refused {
                first: self.refused_in_a_row == 1,
            }
        }
    }
}

/// One rate limiter per client address (as [`address_key`] counts it),
/// shared by all of the address's connections, and kept while it has any.
#[derive(Debug)]
pub struct AddressLimiters {
    rate: f64,
    burst: u32,
    /// Per address: its connections, and their limiter.
    limiters: Mutex<HashMap<AddressKey, (usize, SharedLimiter)>>,
}

/// A limiter shared by several connections.
pub type SharedLimiter = Arc<Mutex<RateLimiter>>;

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
    use std::time::Duration;

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

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(2.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(limiter.check(t0), Verdict::Allowed);
        }
        assert_eq!(limiter.check(t0), Verdict::Refused { first: true });
        assert_eq!(limiter.check(t0), Verdict::Refused { first: false });
        // Half a second later, one token (2 per second) has come back.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check(later), Verdict::Allowed);
        assert_eq!(limiter.check(later), Verdict::Refused { first: true });
    }

    #[test]
    fn sending_into_an_empty_bucket_is_flooding() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(1.0, 1, t0);
        assert_eq!(limiter.check(t0), Verdict::Allowed);
        for _ in 0..MIN_FLOOD_STRIKES {
            assert!(matches!(limiter.check(t0), Verdict::Refused { .. }));
        }
        assert_eq!(limiter.check(t0), Verdict::Flooding);
    }
}
