//! A room log's position hash, read whole: its epoch, the offsets it holds,
//! its epoch's key, and the epochs it had before.
//!
//! **Why earlier epochs are kept.** A log found under another Redis process
//! takes a new epoch (`scripts::LOG_AND_PUBLISH`): a replica promoted by a
//! failover, or a Redis restarted from a snapshot, may lack the newest
//! entries, and the offsets after its last would be given again. The log's
//! entries are kept, though, and a client whose place is among them can
//! still be given everything after it. So the script notes, per earlier
//! epoch, where it *ended* (the last offset the new Redis had) and its key.
//! A place in an earlier epoch at or before its end is a place in this log;
//! one past it was given by the old Redis and lost with it. An instance
//! that delivered such a place says so (`scripts::REPORT_SEEN`): the count of what
//! was lost is then known to everyone who asks.
//!
//! Fields: `epoch`, `first`, `last`, `key`, `run` (the Redis process), and
//! `past` (earlier epochs, oldest first, at most four: `MAX_EARLIER` in
//! the script; a client away for more failovers is told its place is gone) with
//! `end:{epoch}`, `key:{epoch}` and `seen:{epoch}` for each.

use std::collections::HashMap;

use crate::broker::Earlier;

/// A position hash, parsed.
#[derive(Debug, Default, Clone)]
pub(super) struct Position {
    /// `None`: the room has no log.
    pub(super) epoch: Option<String>,
    pub(super) key: Option<String>,
    pub(super) first: Option<u64>,
    pub(super) last: Option<u64>,
    /// Earlier epochs, oldest first, each with its key.
    pub(super) earlier: Vec<(Earlier, Option<String>)>,
}

impl Position {
    /// From the fields `HGETALL` returned.
    pub(super) fn from_fields(mut fields: HashMap<String, String>) -> Position {
        let number = |text: Option<String>| text.and_then(|text| text.parse().ok());
        let past = fields.remove("past").unwrap_or_default();
        let earlier = past
            .split_whitespace()
            .filter_map(|epoch| {
                let end = number(fields.remove(&format!("end:{epoch}")))?;
                let key = fields
                    .remove(&format!("key:{epoch}"))
                    .filter(|k| !k.is_empty());
                let seen = number(fields.remove(&format!("seen:{epoch}")));
                let epoch = epoch.to_owned();
                Some((Earlier { epoch, end, seen }, key))
            })
            .collect();
        Position {
            epoch: fields.remove("epoch"),
            key: fields.remove("key"),
            first: number(fields.remove("first")),
            last: number(fields.remove("last")),
            earlier,
        }
    }

    /// The earlier epochs, without their keys.
    pub(super) fn earlier(&self) -> Vec<Earlier> {
        self.earlier.iter().map(|(e, _)| e.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_epochs_are_read_oldest_first_and_junk_is_skipped() {
        let fields = [
            ("epoch", "c"),
            ("last", "40"),
            ("first", "3"),
            ("key", "kc"),
            ("past", "a b x"),
            ("end:a", "10"),
            ("key:a", "ka"),
            ("end:b", "30"),
            ("seen:b", "33"),
            ("key:b", ""),
        ];
        let position = Position::from_fields(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        assert_eq!(position.epoch.as_deref(), Some("c"));
        assert_eq!((position.first, position.last), (Some(3), Some(40)));
        let earlier = position.earlier();
        assert_eq!(earlier.len(), 2, "x has no end: skipped");
        assert_eq!((earlier[0].end, earlier[0].lost()), (10, 0));
        assert_eq!((earlier[1].end, earlier[1].lost()), (30, 3));
        assert_eq!(position.earlier[0].1.as_deref(), Some("ka"));
        assert_eq!(position.earlier[1].1, None);
    }
}
