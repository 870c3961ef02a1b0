//! The process's budget of threads and file descriptors: what every path
//! that starts a thread or opens a long-lived socket reserves from first.
//!
//! On Linux a thread costs memory maps, and past `vm.max_map_count` a Rust
//! process *aborts* when it spawns one (the spawn does not return an error);
//! past the open-file limit `accept` and `connect` fail. So nothing may
//! count on spawning to fail politely: the budget is derived from the same
//! limits as `config::connection_ceiling` (`--max-connections` connections'
//! worth of threads and descriptors), and what would pass it is refused
//! (a 503 at the upgrade) before a thread is spawned.
//!
//! Who reserves what:
//!
//! * a connection: its reader and subscriber threads, its socket and (with
//!   per-client subscriptions) its Redis connection — reserved by the
//!   accept loop;
//! * a room's shared feed (`--subscriptions shared`): its listener thread
//!   and its Redis connection — reserved when the room's first client here
//!   subscribes; and its dispatcher threads, reserved only when the room
//!   grows big enough to need them (see `broker::redis::shared`).
//!
//! A [`Reservation`] gives its share back when dropped, after the threads
//! it paid for have been joined.

use std::sync::{Arc, Mutex};

/// Threads and file descriptors: what a reservation takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cost {
    /// Threads.
    pub(crate) threads: usize,
    /// File descriptors (sockets).
    pub(crate) fds: usize,
}

impl Cost {
    /// A cost of `threads` threads and `fds` descriptors.
    pub(crate) const fn new(threads: usize, fds: usize) -> Cost {
        Cost { threads, fds }
    }

    fn fits_within(self, limit: Cost) -> bool {
        self.threads <= limit.threads && self.fds <= limit.fds
    }

    fn plus(self, other: Cost) -> Cost {
        Cost::new(self.threads + other.threads, self.fds + other.fds)
    }

    fn minus(self, other: Cost) -> Cost {
        Cost::new(
            self.threads.saturating_sub(other.threads),
            self.fds.saturating_sub(other.fds),
        )
    }
}

/// The budget, shared by the accept loop and the relay.
#[derive(Debug)]
pub(crate) struct Capacity {
    limit: Cost,
    used: Mutex<Cost>,
}

/// A share of the budget, given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    capacity: Arc<Capacity>,
    cost: Cost,
}

impl Capacity {
    /// A budget of `limit`.
    pub(crate) fn new(limit: Cost) -> Arc<Capacity> {
        Arc::new(Capacity {
            limit,
            used: Mutex::default(),
        })
    }

    /// A budget nothing exhausts (for unit tests of the relays).
    #[cfg(test)]
    pub(crate) fn unlimited() -> Arc<Capacity> {
        Capacity::new(Cost::new(usize::MAX / 2, usize::MAX / 2))
    }

    /// Reserves `cost`, or `None` if it would pass the budget.
    pub(crate) fn reserve(self: &Arc<Self>, cost: Cost) -> Option<Reservation> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let after = used.plus(cost);
        if !after.fits_within(self.limit) {
            return None;
        }
        *used = after;
        Some(Reservation {
            capacity: Arc::clone(self),
            cost,
        })
    }

    /// What is reserved now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> Cost {
        *self.used.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.capacity.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.minus(self.cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_budget_and_give_back_on_drop() {
        let capacity = Capacity::new(Cost::new(5, 3));
        let a = capacity.reserve(Cost::new(2, 1)).unwrap();
        let b = capacity.reserve(Cost::new(2, 1)).unwrap();
        assert!(capacity.reserve(Cost::new(2, 1)).is_none(), "7 threads > 5");
        let c = capacity.reserve(Cost::new(1, 1)).unwrap();
        assert!(capacity.reserve(Cost::new(0, 1)).is_none(), "4 fds > 3");
        assert_eq!(capacity.used(), Cost::new(5, 3));
        drop((a, c));
        assert_eq!(capacity.used(), Cost::new(2, 1));
        drop(b);
        assert_eq!(capacity.used(), Cost::default());
    }
}
