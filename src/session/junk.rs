//! Junk on a room's channel (payloads that are not chat messages) is
//! reported, but never so that the log grows with it.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::Room;

/// Warns about payloads on a room that are not chat messages.
///
/// With per-client subscriptions every connection sees every payload, and
/// anyone who can reach the Redis can publish junk: the log must not grow
/// with either. So each distinct payload is counted once (the most recent
/// `JUNK_MEMORY` are remembered), and at most one warning is written per
/// [`JUNK_LOG_INTERVAL`]; the next warning says how many were not logged.
#[derive(Default)]
pub struct JunkLog {
    /// Junk is rare, so a lock on this path costs nothing in practice.
    state: Mutex<JunkState>,
}

#[derive(Default)]
struct JunkState {
    /// Hashes of the payloads seen most recently.
    recent: VecDeque<u64>,
    /// When the last warning was written.
    last_logged: Option<std::time::Instant>,
    /// Distinct payloads not logged since then.
    suppressed: u64,
}

/// How many junk payloads [`JunkLog`] remembers.
const JUNK_MEMORY: usize = 64;
/// At most one junk warning per this long.
pub const JUNK_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl JunkLog {
    /// Reports a skipped payload; returns true the first time this payload
    /// is reported (so that it is counted once).
    pub fn report(&self, room: &Room, payload: &[u8], error: &dyn std::error::Error) -> bool {
        let mut hasher = DefaultHasher::new();
        room.hash(&mut hasher);
        payload.hash(&mut hasher);
        error.to_string().hash(&mut hasher);
        let hash = hasher.finish();
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.recent.contains(&hash) {
                return false;
            }
            if state.recent.len() == JUNK_MEMORY {
                state.recent.pop_front();
            }
            state.recent.push_back(hash);
            if state
                .last_logged
                .is_some_and(|at| at.elapsed() < JUNK_LOG_INTERVAL)
            {
                state.suppressed += 1;
                return true;
            }
            state.last_logged = Some(std::time::Instant::now());
            std::mem::take(&mut state.suppressed)
        };
        let preview = String::from_utf8_lossy(&payload[..payload.len().min(80)]);
        let more = match suppressed {
            0 => String::new(),
            n => format!(" ({n} more skipped since the last report, not logged)"),
        };
        log::warn!(
            "skipped a payload on {}: {error}: {preview:?}{more}",
            room.channel()
        );
        true
    }
}
