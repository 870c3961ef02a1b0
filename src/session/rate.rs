//! The rate limit: a token bucket, shared by all of a client's
//! connections on this instance (all connections from one address, or with
//! tokens, all of one user's: the admission wing decides which, see
//! [`admission`](super::admission)), so that opening more connections does
//! not buy more budget.
//!
//! A client may send `rate` messages per second on average and `burst`
//! messages at once. A message that finds the bucket empty is refused (the
//! client gets an error notice for the first refusal in a row, not for every
//! one, so the notices cannot themselves become a flood). A client that keeps
//! sending into an empty bucket — more refusals in a row than the burst size,
//! at least [`MIN_FLOOD_STRIKES`] — is flooding and is disconnected.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The fewest consecutive refusals that count as flooding.
pub const MIN_FLOOD_STRIKES: u32 = 10;

/// A limiter shared by several connections.
pub type SharedLimiter = Arc<Mutex<RateLimiter>>;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
