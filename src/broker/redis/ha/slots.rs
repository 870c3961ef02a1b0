//! Redis Cluster's hash slots: which of its 16,384 slots a key is in.

/// How many hash slots a cluster has.
pub(super) const SLOTS: usize = 16_384;

/// The hash slot of a key, as the cluster computes it: CRC16 (XMODEM) of
/// its hash tag — the part between the first `{` and the next `}`, if that
/// is not empty — or else of the whole key, modulo 16,384.
pub(super) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), bit by bit:
/// keys are short, and a table would be 512 bytes to read for a few.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::keys;
    use crate::protocol::Room;

    /// The values the cluster specification and `CLUSTER KEYSLOT` give.
    #[test]
    fn slots_are_the_clusters() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{lobby}"), 10294);
        assert_eq!(slot(b"threadchat:{lobby}:log"), 10294);
        assert_eq!(slot(b"global_room"), 6151);
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(slot(b"{}x"), crc16(b"{}x") % 16384);
        assert_eq!(slot(b"a{b}c{d}"), slot(b"b"));
    }

    /// All of a room's keys and its shard channel fall in one slot,
    /// whatever its name.
    #[test]
    fn a_room_is_one_slot() {
        for name in ["lobby", "}x", "a{b}c", "%7D", "{}", "global_room"] {
            let room = if name == "global_room" {
                Room::global()
            } else {
                Room::parse(name).unwrap()
            };
            let mut keys = keys::to_refresh(&room).to_vec();
            keys.push(keys::channel(&room, true));
            let slots: Vec<u16> = keys.iter().map(|k| slot(k.as_bytes())).collect();
            assert!(slots.iter().all(|s| *s == slots[0]), "{name}: {keys:?}");
        }
        let index: Vec<u16> = keys::idle_rooms()
            .iter()
            .map(|k| slot(k.as_bytes()))
            .collect();
        assert!(index.iter().all(|s| *s == index[0]));
        assert_ne!(
            keys::tag(&Room::parse("}").unwrap()),
            keys::tag(&Room::parse("%7D").unwrap())
        );
    }
}
