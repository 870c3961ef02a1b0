//! Parse once per instance: with per-client subscriptions, every client's
//! subscriber thread reads its own copy of each payload from Redis, and
//! without this module each would parse the JSON and encode the client's
//! frame again — the same work, once per client.
//!
//! [`ParseOnce`] keeps the payloads parsed lately on this instance, in a
//! fixed table of [`SLOTS`] slots (a payload's slot is chosen by a hash of
//! its bytes). A subscriber that finds its payload there, byte for byte,
//! shares the [`Parsed`] message and its encoded frames; otherwise it parses
//! the payload and leaves it in the slot for the others. Only the bytes
//! decide: a forged payload is parsed and judged like any other, and one
//! that merely shares a slot replaces what is there, so the worst a
//! publisher can do by choosing payloads is make every subscriber parse
//! again, which is what it did before this module. Each reader still
//! makes its own [`Incoming`], with its own
//! [`waiting_since`](Incoming::waiting_since).
//!
//! Bounded: [`SLOTS`] entries per core, and payloads over [`LARGEST`]
//! bytes are parsed without being kept: at most about 8 MiB per core with
//! big payloads, hundreds of KiB with chat-sized ones.
//!
//! Measured with `make bench`'s scenario (b) (100 clients, 10 senders flat
//! out, per-client subscriptions): parsing and encoding were a third of the
//! server's CPU per delivery (docs/PERFORMANCE.md, "Where the time goes").

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::broker::random::random_u64;
use crate::protocol::{Incoming, Parsed};

/// Slots in a core's table: enough for the messages a room's subscribers read
/// while the slowest is a few hundred messages behind the fastest.
const SLOTS: usize = 1024;

/// Payloads bigger than this are parsed by each reader, not kept.
const LARGEST: usize = 2048;

/// The payloads parsed lately on this instance (see the module doc): one
/// table per core.
///
/// Per core, because sharing costs more than parsing here. A thread that
/// takes a parsed message takes a reference to it (an atomic count), and
/// its slot's lock; with one table, every one of a room's subscribers, on
/// whichever core, counted on the same few cache lines, and each count
/// moved a line from the other core (bench (b): a third of what the table
/// saved went into that). A thread uses the table of the core it runs on,
/// so each message is parsed about once per core.
pub(super) struct ParseOnce {
    tables: Box<[Table]>,
    /// Keys the hash with a secret of this process, so that nobody can pick
    /// payloads that share a slot on purpose.
    seed: u64,
}

/// One core's slots.
type Table = Box<[Mutex<Option<Slot>>]>;

/// A payload and what it parsed to.
struct Slot {
    payload: Box<[u8]>,
    parsed: Arc<Parsed>,
}

impl Default for ParseOnce {
    fn default() -> ParseOnce {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let table = || (0..SLOTS).map(|_| Mutex::new(None)).collect();
        ParseOnce {
            tables: (0..cores).map(|_| table()).collect(),
            seed: random_u64(),
        }
    }
}

impl ParseOnce {
    /// `payload`, parsed here or by another reader lately, waiting since
    /// `since`.
    pub(super) fn incoming(&self, payload: &[u8], since: Instant) -> Incoming {
        if payload.len() > LARGEST {
            return Incoming::parse(payload, since);
        }
        let slot = &self.table()[self.slot_of(payload)];
        // Only ever *tried*: a hundred subscriber threads read each payload
        // at about the same moment, and one that waited for a slot's lock
        // would sleep and be woken (a thread switch dearer than the parse).
        // Whoever finds the slot busy parses for itself.
        if let Ok(kept) = slot.try_lock()
            && let Some(kept) = &*kept
            && *kept.payload == *payload
        {
            return Incoming::from_parsed(Arc::clone(&kept.parsed), since);
        }
        // Parsed outside the lock: nobody waits for anybody's parsing.
        let parsed = Arc::new(Parsed::parse(payload));
        if let Ok(mut kept) = slot.try_lock() {
            *kept = Some(Slot {
                payload: payload.into(),
                parsed: Arc::clone(&parsed),
            });
        }
        Incoming::from_parsed(parsed, since)
    }

    /// The table of the core this thread runs on now (a thread that moves
    /// meanwhile only shares less).
    fn table(&self) -> &Table {
        &self.tables[current_cpu() % self.tables.len()]
    }

    /// The slot of `payload`: a multiply-and-rotate hash over its 8-byte
    /// words (FxHash's), keyed by the seed.
    fn slot_of(&self, payload: &[u8]) -> usize {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mix = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
        let mut words = payload.chunks_exact(8);
        let mut h = self.seed;
        for word in &mut words {
            h = mix(h, u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        for &byte in words.remainder() {
            h = mix(h, u64::from(byte));
        }
        (h >> 32) as usize % SLOTS
    }
}

/// The core the calling thread runs on (a vDSO read on Linux: no system
/// call); 0 where that cannot be known.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn current_cpu() -> usize {
    // SAFETY: `sched_getcpu` takes no arguments and touches no memory of
    // ours; it returns a number, -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or(0)
}

/// Other systems: one table for all.
#[cfg(not(target_os = "linux"))]
fn current_cpu() -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Format;

    const CHAT: &[u8] = br#"{"nickname":"alice","message":"hi","conn":"c1"}"#;

    /// Two readers of one payload share its parsed message (and so its
    /// frames); each keeps its own time.
    #[test]
    fn readers_of_one_payload_share_its_parsing() {
        let once = ParseOnce::default();
        let (t1, t2) = (Instant::now(), Instant::now());
        let (a, b) = (once.incoming(CHAT, t1), once.incoming(CHAT, t2));
        let (fa, fb) = (a.frame(Format::Json), b.frame(Format::Json));
        assert_eq!(fa, fb);
        assert!(fa.is_some());
        assert_eq!((a.waiting_since(), b.waiting_since()), (t1, t2));
        assert_eq!(a.message().unwrap().nickname, "alice");
    }

    /// A payload differing in one byte is parsed for itself, whatever slot
    /// it lands in; junk stays junk.
    #[test]
    fn only_the_same_bytes_share() {
        let once = ParseOnce::default();
        let now = Instant::now();
        let _ = once.incoming(CHAT, now);
        let other = br#"{"nickname":"alicf","message":"hi","conn":"c1"}"#;
        assert_eq!(
            once.incoming(other, now).message().unwrap().nickname,
            "alicf"
        );
        assert!(once.incoming(b"{not json", now).message().is_err());
        assert!(once.incoming(b"{not json", now).message().is_err());
    }

    /// Payloads too big to keep are still parsed.
    #[test]
    fn big_payloads_are_parsed_each_time() {
        let once = ParseOnce::default();
        let text = "x".repeat(LARGEST);
        let big = format!(r#"{{"nickname":"bob","message":"{text}"}}"#);
        let incoming = once.incoming(big.as_bytes(), Instant::now());
        assert_eq!(incoming.message().unwrap().message, text);
    }
}
