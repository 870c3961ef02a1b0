//! The gap fill's decisions, on logs and listeners made up for each case:
//! where delivery stopped, what follows, and what is missing.

use super::*;
use crate::broker::places::EpochKey;
use crate::protocol::place_tag;

fn entry(key: &str, epoch: &str, offset: u64) -> Arc<Incoming> {
    let tag = place_tag(key, crate::protocol::At { offset, epoch });
    let json = format!(
        r#"{{"nickname":"n","message":"m{offset}","offset":{offset},"epoch":"{epoch}","tag":"{:016x}"}}"#,
        tag.0
    );
    Arc::new(Incoming::parse(json.as_bytes(), Instant::now()))
}

fn log(key: &str, epoch: &str, first: u64, last: u64) -> LogRead {
    LogRead {
        epoch: Some(epoch.into()),
        key: Some(key.into()),
        first,
        last,
        entries: (first..=last).map(|o| entry(key, epoch, o)).collect(),
        ..LogRead::default()
    }
}

/// A log of epoch `e` (key `old`) up to `end`, failed over to epoch `f`
/// (key `new`) that has gone on to `last`.
fn failed_over(end: u64, seen: Option<u64>, last: u64) -> LogRead {
    let mut log = log("old", "e", 1, end);
    log.entries
        .extend((end + 1..=last).map(|o| entry("new", "f", o)));
    log.epoch = Some("f".into());
    log.key = Some("new".into());
    log.last = last;
    let earlier = Earlier {
        epoch: "e".into(),
        end,
        seen,
    };
    log.earlier = vec![(earlier, Some("old".into()))];
    log
}

/// After a failover that kept what was delivered, the listener goes on
/// from its place into the new epoch, and nothing is missing.
#[test]
fn a_failover_that_kept_everything_loses_nothing() {
    let mut recent = Recent::default();
    recent.note(&entry("old", "e", 4), |_| None);
    let fill = fill(&failed_over(5, None, 7), &recent, 0);
    assert_eq!(offsets(&fill), vec![5, 6, 7]);
    assert_eq!((fill.gap.missing, fill.seen), (None, None));
}

/// A listener that delivered places the new master never had gets what
/// follows the old epoch's end, is told of a loss, and reports how far
/// it got, so that others learn the count.
#[test]
fn places_the_failover_lost_are_reported() {
    let mut recent = Recent::default();
    for offset in 4..=7 {
        recent.note(&entry("old", "e", offset), |_| None);
    }
    recent.note(&entry("forger", "e", 99), |_| None);
    let fill = fill(&failed_over(5, None, 8), &recent, 0);
    assert_eq!(offsets(&fill), vec![6, 7, 8]);
    assert_eq!(fill.gap.missing.unwrap().count, None);
    assert_eq!(fill.seen, Some(("e".into(), 7)));
}

/// A Redis back from an older copy, written to by nobody yet, still has
/// the old epoch: what was delivered past its end is reported (and
/// the epoch ends there), and a loss is announced.
#[test]
fn a_log_behind_what_was_delivered_is_reported() {
    let mut recent = Recent::default();
    recent.note(&entry("k", "e", 4), |_| None);
    recent.note(&entry("k", "e", 5), |_| None);
    let fill = fill(&log("k", "e", 1, 3), &recent, 0);
    assert_eq!(offsets(&fill), Vec::<u64>::new());
    assert_eq!(fill.gap.missing.unwrap().count, None);
    assert_eq!(fill.seen, Some(("e".into(), 5)));
}

/// A listener that stopped before the old epoch's end is told exactly
/// how many the failover lost, when another instance reported them.
#[test]
fn a_reported_loss_is_counted() {
    let mut recent = Recent::default();
    recent.note(&entry("old", "e", 3), |_| None);
    let fill = fill(&failed_over(5, Some(7), 8), &recent, 0);
    assert_eq!(offsets(&fill), vec![4, 5, 6, 7, 8]);
    assert_eq!(fill.gap.missing.unwrap().count, Some(2));
    assert_eq!(fill.seen, None);
}

fn offsets(fill: &Fill) -> Vec<u64> {
    fill.messages
        .iter()
        .map(|m| m.message().unwrap().offset.unwrap())
        .collect()
}

/// What came after the last place delivered is filled, all of it.
#[test]
fn a_gap_the_log_holds_is_filled_exactly() {
    let mut recent = Recent::default();
    recent.note(&entry("k", "e", 4), |_| None);
    let fill = fill(&log("k", "e", 1, 9), &recent, 0);
    assert_eq!(offsets(&fill), vec![5, 6, 7, 8, 9]);
    assert_eq!(fill.gap.missing, None);
    assert_eq!(fill.upto, Some(("e".into(), 9)));
}

/// A forged place (no valid tag) after the genuine one moves nothing.
#[test]
fn a_forged_place_does_not_move_the_start() {
    let mut recent = Recent::default();
    recent.note(&entry("k", "e", 4), |_| None);
    recent.note(&entry("forger", "e", 8), |_| None);
    let fill = fill(&log("k", "e", 1, 9), &recent, 0);
    assert_eq!(offsets(&fill), vec![5, 6, 7, 8, 9]);
    assert_eq!(fill.gap.missing, None);
}

/// A log that no longer reaches back says how many are gone.
#[test]
fn a_log_that_does_not_reach_back_counts_what_is_gone() {
    let mut recent = Recent::default();
    recent.note(&entry("k", "e", 4), |_| None);
    let fill = fill(&log("k", "e", 12, 14), &recent, 7);
    assert_eq!(offsets(&fill), vec![12, 13, 14]);
    let missing = fill.gap.missing.unwrap();
    assert_eq!((missing.count, missing.since), (Some(7), 7));
}

/// A new epoch whose log no longer holds the last place delivered:
/// all of it is new, and what is gone is not known.
#[test]
fn a_new_epoch_is_delivered_whole_with_an_unknown_loss() {
    let mut recent = Recent::default();
    recent.note(&entry("old", "e", 40), |_| None);
    let fill = fill(&log("k", "f", 1, 3), &recent, 0);
    assert_eq!(offsets(&fill), vec![1, 2, 3]);
    assert_eq!(fill.gap.missing.unwrap().count, None);
}

/// A log that moved (a new epoch, its entries kept and its offsets
/// going on) is followed from the last entry delivered.
#[test]
fn a_moved_log_is_followed_across_its_new_epoch() {
    let mut moved = log("old", "e", 1, 5);
    moved.entries.extend((6..=8).map(|o| entry("new", "f", o)));
    moved.epoch = Some("f".into());
    moved.key = Some("new".into());
    moved.last = 8;
    let mut recent = Recent::default();
    recent.note(&entry("old", "e", 4), |_| None);
    let fill = fill(&moved, &recent, 0);
    assert_eq!(offsets(&fill), vec![5, 6, 7, 8]);
    assert_eq!(fill.gap.missing, None);
}

/// A log that lost what was delivered last (a failover) is followed
/// from the furthest place it holds, with a loss of unknown size.
#[test]
fn a_log_that_lost_what_was_delivered_says_so() {
    let mut failed_over = log("old", "e", 1, 5);
    failed_over
        .entries
        .extend((6..=7).map(|o| entry("new", "f", o)));
    failed_over.epoch = Some("f".into());
    failed_over.key = Some("new".into());
    failed_over.last = 7;
    let mut recent = Recent::default();
    recent.note(&entry("old", "e", 5), |_| None);
    recent.note(&entry("old", "e", 6), |_| None);
    let fill = fill(&failed_over, &recent, 0);
    assert_eq!(offsets(&fill), vec![6, 7]);
    assert_eq!(fill.gap.missing.unwrap().count, None);
}

/// A flood of forged places in the current epoch, whose key is at
/// hand, is not noted; one in made-up epochs pushes out only other
/// unchecked places: the start stays where delivery stopped.
#[test]
fn a_flood_of_forged_places_does_not_crowd_out_genuine_ones() {
    let key = Arc::new(EpochKey::new("k"));
    let at_hand = |epoch: &str| (epoch == "e").then_some(&*key);
    let mut recent = Recent::default();
    recent.note(&entry("k", "e", 4), at_hand);
    for offset in 5..50 {
        recent.note(&entry("forger", "e", offset), at_hand);
        recent.note(&entry("forger", "made-up", offset), at_hand);
    }
    let fill = fill(&log("k", "e", 1, 9), &recent, 0);
    assert_eq!(offsets(&fill), vec![5, 6, 7, 8, 9]);
    assert_eq!(fill.gap.missing, None);
}

/// A genuine place replayed later does not move the start back.
#[test]
fn a_replayed_place_does_not_move_the_start_back() {
    let mut recent = Recent::default();
    recent.note(&entry("k", "e", 6), |_| None);
    recent.note(&entry("k", "e", 2), |_| None);
    assert_eq!(
        offsets(&fill(&log("k", "e", 1, 9), &recent, 0)),
        vec![7, 8, 9]
    );
}
