//! How a connection tells the places of a room's log from forged ones:
//! what a relay vouches for ([`PlaceKey`]), and an epoch's key with the
//! places already checked against it ([`EpochKey`]). The connection's side
//! is `session::outbox`'s `Expect`; the key's keeper is the log's Lua script
//! (`broker::redis::scripts`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::random::random_u64;
use crate::protocol::ChatMessage;

/// What a relay can tell a connection about the places on a room's
/// channel: which are the log's own (see `session::outbox`'s `Expect`).
#[derive(Debug, Clone)]
pub enum PlaceKey {
    /// Nobody else can publish here (the in-process relay): every place
    /// is the log's.
    Trusted,
    /// The epoch's key: a place is the log's if its tag matches.
    Key(Arc<EpochKey>),
    /// Not known now: no place in the epoch can be vouched for.
    Unknown,
}

/// A log epoch's key, and the places this instance has found it vouches
/// for already.
///
/// Every connection of a room checks every place it passes on; with
/// per-client subscriptions each has its own copy of each payload. The
/// check is a SHA-1 ([`ChatMessage::tagged_by`]); the first connection to
/// make it for a place notes it here, in one of [`CHECKED`] slots, and the
/// others find it there. A slot holds the tag mixed with the offset by a
/// secret of this process, so that a forged payload can never match a note
/// made for another place.
#[derive(Debug)]
pub struct EpochKey {
    key: Box<str>,
    checked: Box<[AtomicU64]>,
    mix: (u64, u64),
}

/// Places noted per epoch key.
const CHECKED: usize = 256;

impl EpochKey {
    /// The key `key`, with nothing checked yet.
    pub fn new(key: &str) -> EpochKey {
        EpochKey {
            key: key.into(),
            checked: (0..CHECKED).map(|_| AtomicU64::new(0)).collect(),
            mix: (random_u64(), random_u64() | 1),
        }
    }

    /// Whether `msg`'s tag is the one this key gives its place.
    pub fn vouches_for(&self, msg: &ChatMessage) -> bool {
        // The offset alone picks the note (every client checks every
        // message: no more work than that before the note is found).
        let (Some(offset), Some(tag), true) = (msg.offset, &msg.tag, msg.epoch.is_some()) else {
            return false;
        };
        let stamp = tag.0 ^ (offset ^ self.mix.0).wrapping_mul(self.mix.1);
        let slot = &self.checked[(offset % CHECKED as u64) as usize];
        if stamp != 0 && slot.load(Ordering::Relaxed) == stamp {
            return true;
        }
        let vouched = msg.tagged_by(&self.key);
        if vouched {
            slot.store(stamp, Ordering::Relaxed);
        }
        vouched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(key: &str, offset: u64, tag_of: u64) -> ChatMessage {
        let text = format!("{key}:e:{tag_of}");
        let digest = sha1_smol::Sha1::from(text.as_bytes()).digest().to_string();
        let json = format!(
            r#"{{"nickname":"n","message":"m","offset":{offset},"epoch":"e","tag":"{}"}}"#,
            &digest[..16]
        );
        ChatMessage::from_payload(json.as_bytes()).unwrap()
    }

    /// A place checked once is found noted; a genuine tag replayed on
    /// another place sharing its slot is not taken for it.
    #[test]
    fn noted_places_vouch_only_for_themselves() {
        let key = EpochKey::new("k");
        assert!(key.vouches_for(&tagged("k", 7, 7)));
        assert!(key.vouches_for(&tagged("k", 7, 7)));
        let same_slot = 7 + CHECKED as u64;
        assert!(!key.vouches_for(&tagged("k", same_slot, 7)));
        assert!(!key.vouches_for(&tagged("other", 8, 8)));
        assert!(key.vouches_for(&tagged("k", same_slot, same_slot)));
    }

    /// A tag that is not one leaves the message a message, without a
    /// place anyone vouches for.
    #[test]
    fn a_malformed_tag_vouches_for_nothing() {
        let json = br#"{"nickname":"n","message":"m","offset":1,"epoch":"e","tag":"zz"}"#;
        let msg = ChatMessage::from_payload(json).unwrap();
        assert_eq!(msg.tag, None);
        assert!(!EpochKey::new("k").vouches_for(&msg));
    }
}
