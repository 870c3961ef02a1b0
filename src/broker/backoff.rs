//! Capped exponential back-off with jitter, for reconnecting.

use std::time::Duration;

use super::random::random_fraction;

/// Capped exponential back-off with jitter, for reconnecting.
///
/// Each delay is drawn from the upper half of an exponentially growing window
/// (100 ms, 200 ms, … up to the cap): thousands of subscribers that lost Redis
/// at the same instant spread their reconnects out instead of stampeding it,
/// and none retries sooner than half the window.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Backoff {
    /// The first window.
    pub const BASE: Duration = Duration::from_millis(100);

    /// A back-off whose window grows up to `cap`.
    pub fn new(cap: Duration) -> Backoff {
        Backoff { attempt: 0, cap }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let window = Self::BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt += 1;
        window / 2 + window.mul_f64(random_fraction() / 2.0)
    }

    /// Back to the first window (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let delays: Vec<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(
            delays
                .iter()
                .rev()
                .take(5)
                .all(|d| *d >= Duration::from_secs(1))
        );
        // Jitter: not all the same.
        assert!(delays.windows(2).any(|w| w[0] != w[1]));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
