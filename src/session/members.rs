//! Recent `GET /members` answers, cached: anyone may ask as often as they
//! like, and the relay is asked at most once per room and limit every
//! [`MEMBERS_CACHE_TTL`].

use std::collections::HashMap;
use std::time::Instant;

use crate::broker::{BrokerError, Presence};
use crate::protocol::Room;

/// How long a `/members` answer is served again without asking the relay.
pub const MEMBERS_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most answers kept in the cache.
const MEMBERS_CACHE_ENTRIES: usize = 1024;

/// Recent `/members` answers, by room and limit.
///
/// One lock is held while an answer is made, so fifty requests arriving
/// together ask the relay once, and the other forty-nine are served the
/// answer it gave. At most `MEMBERS_CACHE_ENTRIES` answers are kept;
/// stale ones are dropped when a new one is added.
#[derive(Default)]
pub struct MembersCache {
    answers: std::sync::Mutex<Answers>,
}

/// `/members` answers by (room, limit): when each was made, and its JSON.
type Answers = HashMap<(Room, usize), (Instant, std::sync::Arc<str>)>;

/// The JSON of a `/members` answer, keys in the documented order.
#[derive(serde::Serialize)]
struct MembersAnswer<'a> {
    room: &'a str,
    count: usize,
    members: &'a [String],
    truncated: bool,
}

impl MembersCache {
    /// The answer for `room` and `limit`, from the cache or from `ask`.
    pub fn get(
        &self,
        room: &Room,
        limit: usize,
        ask: impl FnOnce() -> Result<Presence, BrokerError>,
    ) -> Result<std::sync::Arc<str>, BrokerError> {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (room.clone(), limit);
        if let Some((at, body)) = answers.get(&key)
            && at.elapsed() < MEMBERS_CACHE_TTL
        {
            return Ok(std::sync::Arc::clone(body));
        }
        let presence = ask()?;
        let body: std::sync::Arc<str> = serde_json::to_string(&MembersAnswer {
            room: room.name(),
            count: presence.count,
            members: &presence.nicknames,
            truncated: presence.count > presence.nicknames.len(),
        })
        .expect("strings and numbers always serialize")
        .into();
        if answers.len() >= MEMBERS_CACHE_ENTRIES {
            answers.retain(|_, (at, _)| at.elapsed() < MEMBERS_CACHE_TTL);
            if answers.len() >= MEMBERS_CACHE_ENTRIES {
                answers.clear();
            }
        }
        answers.insert(key, (Instant::now(), std::sync::Arc::clone(&body)));
        Ok(body)
    }
}
