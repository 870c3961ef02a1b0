//! With authentication on, what a user may do across all of its
//! connections on this instance: how many it holds
//! (`--max-connections-per-user`), and one rate limit for all of them
//! (`--rate-limit`, `--rate-burst`), so that ten tabs do not have ten
//! budgets.
//!
//! A connection takes a [`UserSlot`] once its token is checked; the slot
//! carries the user's shared [`RateLimiter`], and gives its place back when
//! the connection's `Conn` is dropped. A user's entry, limiter included,
//! lives while it has connections here.
//!
//! Per instance: instances do not share counts, so behind a load balancer
//! a user may hold the cap on each instance, and send at the rate on each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::session::rate::RateLimiter;

/// Users' connections and their shared limiters.
#[derive(Debug)]
pub struct PerUser {
    /// Most connections per user (`None`: no limit).
    limit: Option<usize>,
    /// Messages per second and burst, per user (`None`: unlimited).
    rate: Option<(f64, u32)>,
    users: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    connections: usize,
    limiter: Option<Arc<Mutex<RateLimiter>>>,
}

/// One connection's place among its user's; given back on drop.
#[derive(Debug)]
pub struct UserSlot {
    owner: Arc<PerUser>,
    user: String,
    /// The user's rate limiter, shared by all of its connections here.
    limiter: Option<Arc<Mutex<RateLimiter>>>,
}

impl PerUser {
    /// Users limited to `limit` connections each, sending at `rate`
    /// (messages per second, burst) together.
    pub fn new(limit: Option<usize>, rate: Option<(f64, u32)>) -> Arc<PerUser> {
        Arc::new(PerUser {
            limit,
            rate,
            users: Mutex::default(),
        })
    }

    /// A place for one more connection of `user`, or the limit it has
    /// reached.
    pub fn take(self: &Arc<Self>, user: &str) -> Result<UserSlot, usize> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let entry = users.entry(user.to_owned()).or_insert_with(|| Entry {
            connections: 0,
            limiter: self.rate.map(|(rate, burst)| {
                Arc::new(Mutex::new(RateLimiter::new(rate, burst, Instant::now())))
            }),
        });
        if let Some(limit) = self.limit
            && entry.connections >= limit
        {
            return Err(limit);
        }
        entry.connections += 1;
        Ok(UserSlot {
            owner: Arc::clone(self),
            user: user.to_owned(),
            limiter: entry.limiter.clone(),
        })
    }
}

impl UserSlot {
    /// The user's rate limiter (`None`: no rate limit).
    pub fn limiter(&self) -> Option<Arc<Mutex<RateLimiter>>> {
        self.limiter.clone()
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = self.owner.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = users.get_mut(&self.user) {
            entry.connections -= 1;
            if entry.connections == 0 {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_holds_at_most_the_limit_and_gets_its_places_back() {
        let users = PerUser::new(Some(2), Some((1.0, 1)));
        let a = users.take("alice").unwrap();
        let b = users.take("alice").unwrap();
        assert_eq!(users.take("alice").unwrap_err(), 2);
        let bob = users.take("bob").unwrap();
        // Alice's connections share one limiter; Bob has his own.
        assert!(Arc::ptr_eq(
            a.limiter.as_ref().unwrap(),
            b.limiter.as_ref().unwrap()
        ));
        assert!(!Arc::ptr_eq(
            a.limiter.as_ref().unwrap(),
            bob.limiter.as_ref().unwrap()
        ));
        drop(a);
        let _c = users.take("alice").unwrap();
        drop((b, bob, _c));
        assert!(users.users.lock().unwrap().is_empty());
    }
}
