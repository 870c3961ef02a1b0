//! What a listener remembers of where its delivery stood: the places of
//! the last few messages it delivered, kept so that forged places cannot
//! crowd out genuine ones (see [`Recent`]). The gap fill (`gaps.rs`) reads
//! them to find where to start.

use std::collections::VecDeque;

use crate::broker::places::EpochKey;
use crate::protocol::{ChatMessage, EpochName, Incoming, Tag, place_tag};

/// Places remembered per listener.
const RECENT: usize = 8;

/// The places of the last few messages a listener delivered. Allocated
/// with the first placed message.
///
/// **Forged places cannot crowd out genuine ones.** Anyone who can publish
/// on the channel can send places, as many as they like. A place whose
/// epoch's key this instance has at hand (the connections read it, see
/// `place_keys.rs`) is checked as it comes: forged, it is not noted at all;
/// genuine, it is noted as *checked*. A place in an epoch whose key is not
/// at hand (a new epoch, or a made-up one) is noted unchecked, and makes
/// room only by pushing out another unchecked one: a flood of forged
/// places leaves the checked ones where they are, and the gap fill finds
/// where delivery really stopped. (Every place is checked again, with the
/// key read with the log, when it matters.)
#[derive(Debug, Default)]
pub(in crate::broker::redis) struct Recent(VecDeque<Noted>);

#[derive(Debug, PartialEq, Eq)]
struct Noted {
    epoch: EpochName,
    offset: u64,
    tag: Tag,
    /// Its epoch's key vouched for it when it was noted.
    checked: bool,
}

impl Recent {
    /// Notes `incoming`'s place, if it has a tagged one; `key_of` says the
    /// key of an epoch, if it is at hand.
    pub(in crate::broker::redis) fn note<'k>(
        &mut self,
        incoming: &Incoming,
        key_of: impl FnOnce(&str) -> Option<&'k EpochKey>,
    ) {
        let Ok(msg) = incoming.message() else {
            return;
        };
        let checked = match msg.epoch.as_ref().and_then(|epoch| key_of(epoch.as_str())) {
            Some(key) if key.vouches_for(msg) => true,
            // Forged: its epoch's key gives this place another tag.
            Some(_) => return,
            None => false,
        };
        self.push(msg, checked);
    }

    /// Notes the place of an entry read from the log itself: genuine.
    pub(in crate::broker::redis) fn note_from_log(&mut self, entry: &Incoming) {
        if let Ok(msg) = entry.message() {
            self.push(msg, true);
        }
    }

    fn push(&mut self, msg: &ChatMessage, checked: bool) {
        let (Some(epoch), Some(offset), Some(tag)) = (msg.epoch, msg.offset, msg.tag) else {
            return;
        };
        if self.0.len() == RECENT {
            // The oldest unchecked place goes first; only a checked one
            // makes room for a checked one.
            match self.0.iter().position(|noted| !noted.checked) {
                Some(at) => {
                    self.0.remove(at);
                }
                None if checked => {
                    self.0.pop_front();
                }
                None => return,
            }
        }
        self.0.push_back(Noted {
            epoch,
            offset,
            tag,
            checked,
        });
    }

    /// The furthest place noted in `epoch` (the furthest, not the newest:
    /// a genuine place replayed later is behind) that `key` vouches for,
    /// or any, if the epoch's key is not known (a log written before keys
    /// were kept for earlier epochs).
    pub(super) fn furthest(&self, epoch: &str, key: Option<&str>) -> Option<u64> {
        self.0
            .iter()
            .filter(|noted| {
                let at = crate::protocol::At {
                    offset: noted.offset,
                    epoch: noted.epoch.as_str(),
                };
                noted.epoch.as_str() == epoch
                    && key.is_none_or(|key| place_tag(key, at) == noted.tag)
            })
            .map(|noted| noted.offset)
            .max()
    }

    /// Whether `incoming` is one of the places noted: the same epoch,
    /// offset and tag (a log entry that is, is what was delivered).
    pub(super) fn holds(&self, incoming: &Incoming) -> bool {
        let Ok(msg) = incoming.message() else {
            return false;
        };
        let (Some(epoch), Some(offset), Some(tag)) = (msg.epoch, msg.offset, msg.tag) else {
            return false;
        };
        self.0
            .iter()
            .any(|noted| noted.epoch == epoch && noted.offset == offset && noted.tag == tag)
    }

    /// Whether any place was noted at all.
    pub(super) fn any(&self) -> bool {
        !self.0.is_empty()
    }
}
