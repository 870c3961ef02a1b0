//! Random numbers without a `rand` crate: for jitter, instance ids, log
//! epochs and keys.

use std::sync::atomic::Ordering;

/// A fresh epoch for a log that starts (or starts again): random, short.
pub fn new_epoch() -> String {
    format!("{:012x}", random_u64() & 0xffff_ffff_ffff)
}

/// A random number in `[0, 1)` (for jitter).
pub(super) fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A random 64-bit number, from the standard library's per-process random
/// hash keys: no `rand` crate needed for jitter and instance ids.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}
