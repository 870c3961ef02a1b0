//! Reading a message where it lies: the fast path of
//! [`PubSubConnection::next_message_in_buffer`](super::PubSubConnection::next_message_in_buffer).
//!
//! With per-client subscriptions every client's listener reads every
//! payload of its room, and the general reader (`read_reply`) made about
//! eight allocations of each: its lines, its bulk strings, its array. Most
//! of what arrives is a `message` (or a Cluster's `smessage`) already whole
//! in the read buffer; this finds its channel and payload there, without a
//! copy. Anything else (a reply, a message cut by the buffer's end, a
//! payload over the limit) is left to the general reader, which accepts
//! the same bytes as the same message (a property test below checks it).
//! PERFORMANCE.md ("Where the time goes", parse once) has the numbers.

use std::ops::Range;

/// Where the channel and payload of a (shard) message at the start of
/// `buffer` are, and its whole length: if it is all there, with bulk
/// strings of at most `max_bulk` bytes. The same bytes [`read_reply`](super::read_reply)
/// accepts as such a message, read in place.
pub(super) fn buffered_message(
    buffer: &[u8],
    max_bulk: usize,
) -> Option<(Range<usize>, Range<usize>, usize)> {
    let kind = buffer.strip_prefix(b"*3\r\n")?;
    let rest = kind
        .strip_prefix(b"$7\r\nmessage\r\n")
        .or_else(|| kind.strip_prefix(b"$8\r\nsmessage\r\n"))?;
    let mut at = buffer.len() - rest.len();
    let channel = buffered_bulk(buffer, &mut at, max_bulk)?;
    let payload = buffered_bulk(buffer, &mut at, max_bulk)?;
    Some((channel, payload, at))
}

/// The bulk string (`$n\r\n…\r\n`) at `*at` in `buffer`, if it is all
/// there and at most `max` bytes long: where its bytes are; `*at` moves
/// past it.
fn buffered_bulk(buffer: &[u8], at: &mut usize, max: usize) -> Option<Range<usize>> {
    let rest = buffer.get(*at..)?.strip_prefix(b"$")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let len = rest[..digits.min(10)].iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })?;
    if digits == 0 || digits > 10 || len > max || rest.get(digits..digits + 2)? != b"\r\n" {
        return None;
    }
    let start = *at + 1 + digits + 2;
    let end = start.checked_add(len)?;
    if buffer.get(end..end.checked_add(2)?)? != b"\r\n" {
        return None;
    }
    *at = end + 2;
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::super::Reply;
    use super::super::tests::parse;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A message read in place is the message the general reader reads
        /// (and anything else is left to it), whatever the bytes.
        #[test]
        fn messages_in_the_buffer_are_read_as_the_reader_would(
            channel in "[a-z:_]{1,20}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            cut in 0usize..200,
            noise in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut wire = format!("*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n", channel.len(), payload.len()).into_bytes();
            wire.extend_from_slice(&payload);
            wire.extend_from_slice(b"\r\n");
            let whole = wire.len();
            wire.extend_from_slice(&noise);
            match buffered_message(&wire, 1024) {
                Some((c, p, len)) => {
                    prop_assert_eq!(&wire[c], channel.as_bytes());
                    prop_assert_eq!(&wire[p], &payload[..]);
                    prop_assert_eq!(len, whole);
                }
                None => prop_assert!(false, "a whole message was not found"),
            }
            // Cut short: left to the general reader.
            let cut = cut.min(whole - 1);
            prop_assert_eq!(buffered_message(&wire[..cut], 1024), None);
            // Any bytes: found only where the general reader reads a message.
            if let Some((c, p, _)) = buffered_message(&noise, 1024) {
                prop_assert_eq!(
                    parse(&noise).unwrap(),
                    Reply::Array(vec![
                        Reply::Bulk(b"message".to_vec()),
                        Reply::Bulk(noise[c].to_vec()),
                        Reply::Bulk(noise[p].to_vec()),
                    ])
                );
            }
        }
    }

    /// Oversized payloads, replies and shard messages: only messages within
    /// the limit are read in place.
    #[test]
    fn only_whole_messages_within_the_limit_are_read_in_place() {
        let smessage = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
        let (c, p, len) = buffered_message(smessage, 1024).unwrap();
        assert_eq!(
            (&smessage[c], &smessage[p], len),
            (&b"ch"[..], &b"hi"[..], smessage.len())
        );
        let big = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2000\r\n";
        assert_eq!(buffered_message(big, 1024), None);
        assert_eq!(
            buffered_message(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", 1024),
            None
        );
        assert_eq!(
            buffered_message(b"*3\r\n$7\r\nmessage\r\n$99999999999\r\n", usize::MAX),
            None
        );
    }
}
