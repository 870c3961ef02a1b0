//! The keys that tell the places of each room's log from forged ones, as
//! this instance last read them from Redis.
//!
//! Each log epoch has a secret key in its position hash, from which the log's
//! Lua script tags every place it gives (`scripts::LOG_AND_PUBLISH`). A
//! connection that meets a place in an epoch it has no key for asks here:
//! one Redis read per room and epoch for the whole instance, and at most
//! [`READS_PER_SECOND`] a second per room, whatever payloads anyone
//! publishes (forged epochs are never in the cache).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::broker::places::{EpochKey, PlaceKey};
use crate::protocol::Room;

/// Most reads of one room's key in a second.
const READS_PER_SECOND: usize = 4;

/// Per room: the epoch and key last read, and when.
#[derive(Default)]
pub(super) struct PlaceKeys(Mutex<HashMap<Room, Known>>);

struct Known {
    epoch: Option<String>,
    key: Option<Arc<EpochKey>>,
    /// When it was read, the last [`READS_PER_SECOND`] times.
    reads: Vec<Instant>,
}

impl PlaceKeys {
    /// The key of `room`'s log in `epoch`: from what was last read, or
    /// from `read` (the position hash's epoch and key, from Redis) when
    /// that is another epoch and fewer than [`READS_PER_SECOND`] reads were
    /// made in the last second.
    pub(super) fn get(
        &self,
        room: &Room,
        epoch: &str,
        read: impl FnOnce() -> Option<(Option<String>, Option<String>)>,
    ) -> PlaceKey {
        let now = Instant::now();
        let mut reads = Vec::new();
        {
            let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(known) = known.get_mut(room) {
                if known.epoch.as_deref() == Some(epoch) {
                    return known.key.clone().map_or(PlaceKey::Unknown, PlaceKey::Key);
                }
                known
                    .reads
                    .retain(|read| now.duration_since(*read) < Duration::from_secs(1));
                if known.reads.len() >= READS_PER_SECOND {
                    return PlaceKey::Unknown;
                }
                known.reads.push(now);
                reads = known.reads.clone();
            }
        }
        // Read without the lock held; a second reader meanwhile is harmless.
        let Some((read_epoch, read_key)) = read() else {
            return PlaceKey::Unknown;
        };
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Another connection may have read the same epoch meanwhile: all
        // share one `EpochKey`, so that a place is checked once.
        let key = match known.get(room) {
            Some(k) if k.epoch.is_some() && k.epoch == read_epoch && k.key.is_some() => {
                k.key.clone()
            }
            _ => read_key.map(|key| Arc::new(EpochKey::new(&key))),
        };
        let answer = match (&read_epoch, &key) {
            (Some(e), Some(key)) if e == epoch => PlaceKey::Key(Arc::clone(key)),
            _ => PlaceKey::Unknown,
        };
        if reads.is_empty() {
            reads.push(now);
        }
        known.insert(
            room.clone(),
            Known {
                epoch: read_epoch,
                key,
                reads,
            },
        );
        answer
    }

    /// The key of `room`'s log in `epoch`, if it is what was last read:
    /// never reads.
    pub(super) fn peek(&self, room: &Room, epoch: &str) -> Option<Arc<EpochKey>> {
        let known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let known = known.get(room)?;
        known
            .key
            .clone()
            .filter(|_| known.epoch.as_deref() == Some(epoch))
    }

    /// Forgets `room` (nobody is in it here any more).
    pub(super) fn forget(&self, room: &Room) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(room);
    }
}
