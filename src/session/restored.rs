//! What a client is told when its relay is back after a loss: whether
//! what was sent meanwhile follows, and what could not be recovered, how
//! much and since when. One notice, in words a person at a terminal reads.

use crate::broker::Gap;

/// What a client is told when the relay is back: what was sent meanwhile
/// follows, and whatever could not be recovered, how much and since when.
pub(super) fn notice(gap: &Gap) -> String {
    let follow = match gap.recovered {
        0 => String::new(),
        1 => "the one message or event sent meanwhile follows".to_owned(),
        n => format!("the {n} messages and events sent meanwhile follow"),
    };
    let Some(missing) = &gap.missing else {
        return match gap.recovered {
            0 => "reconnected to the chat relay; nothing was sent meanwhile".to_owned(),
            _ => format!("reconnected to the chat relay; nothing was lost: {follow}"),
        };
    };
    let since = clock(missing.since);
    let lost = match missing.count {
        Some(1) => format!("1 message or event sent since {since} could not be recovered"),
        Some(n) => format!("{n} messages and events sent since {since} could not be recovered"),
        None => format!("messages sent since {since} may be missing"),
    };
    let after = match gap.recovered {
        0 => String::new(),
        _ => format!("; after them, {follow}"),
    };
    format!(
        "reconnected to the chat relay; {lost} ({}){after}",
        missing.why
    )
}

/// `HH:MM:SS UTC` of a time in Unix milliseconds.
fn clock(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client is told when the relay is back says what was lost,
    /// how much and since when, or that nothing was.
    #[test]
    fn the_restored_notice_says_what_was_lost() {
        let gap = |recovered, missing| Gap { recovered, missing };
        assert_eq!(
            notice(&gap(3, None)),
            "reconnected to the chat relay; nothing was lost: the 3 messages and events \
             sent meanwhile follow"
        );
        assert_eq!(
            notice(&gap(0, None)),
            "reconnected to the chat relay; nothing was sent meanwhile"
        );
        let missing = |count| {
            Some(crate::broker::Missing {
                count,
                since: 81_065_000,
                why: "why",
            })
        };
        assert_eq!(
            notice(&gap(3, missing(Some(7)))),
            "reconnected to the chat relay; 7 messages and events sent since 22:31:05 UTC \
             could not be recovered (why); after them, the 3 messages and events sent \
             meanwhile follow"
        );
        assert_eq!(
            notice(&gap(0, missing(None))),
            "reconnected to the chat relay; messages sent since 22:31:05 UTC may be missing (why)"
        );
    }
}
