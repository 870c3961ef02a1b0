//! Who is in a room: member lists, checked against the liveness of the
//! instances their connections belong to, and claimed nicknames
//! (`--unique-nicknames`).
//!
//! A room's member list is a hash (connection id → nickname) changed by
//! the log script with each join and leave. An instance that crashed
//! leaves its members behind: a connection id names its instance, and a
//! member whose instance's liveness key has expired (30 s after its last
//! heartbeat) is left out of lists and removed. On a cluster the liveness
//! keys are on any master, so each is checked as a job of its own.

use std::time::Duration;

use super::ghosts::swap_nickname;
use super::heartbeat::keep_alive;
use super::job::Route;
use super::keys;
use super::queries::{Queues, from_value};
use crate::broker::api::{Place, Presence};
use crate::broker::error::BrokerError;
use crate::protocol::{ConnId, Room};

/// Most attempts to claim a nickname that is given back while it is
/// being claimed.
const CLAIM_TRIES: usize = 3;

/// A room's members and claimed nicknames, read and changed through the
/// query threads.
pub(super) struct Members<'a> {
    pub(super) queues: &'a Queues,
    /// How long a room's keys live after their last use (`--room-ttl`).
    pub(super) room_ttl: Duration,
    /// This instance's id: alive, whatever Redis says (see [`Self::alive`]).
    pub(super) own: String,
}

impl Members<'_> {
    /// Who is in `room` (see `Broker::presence`): the whole list of a
    /// small room, without members of dead instances; the count and a
    /// sample of a big one.
    pub(super) fn presence(&self, room: &Room, limit: usize) -> Result<Presence, BrokerError> {
        let members = keys::members(room);
        // The room's size decides how it is listed: whole, or a sample (one
        // HSCAN step) when big. A size that changes in between only makes
        // the list a little longer or the sample a little shorter.
        let mut hlen = redis::cmd("HLEN");
        hlen.arg(&members);
        let size: usize = from_value(
            self.queues
                .run(Route::room(room), vec![hlen.clone()])?
                .into_iter()
                .next(),
        )?;
        let whole = size <= limit;
        let mut list = redis::cmd(if whole { "HGETALL" } else { "HSCAN" });
        list.arg(&members);
        if !whole {
            list.arg(0).arg("COUNT").arg(limit);
        }
        let mut position = redis::cmd("HMGET");
        position.arg(keys::meta(room)).arg("epoch").arg("last");
        let ((epoch, last), count, list): ((Option<String>, Option<u64>), usize, redis::Value) =
            self.queues.transaction(room, vec![position, hlen, list])?;
        let entries: Vec<(String, String)> = if whole {
            from_value(Some(list))?
        } else {
            from_value::<(String, Vec<(String, String)>)>(Some(list))?.1
        };
        let at = epoch
            .zip(last)
            .map(|(epoch, offset)| Place { offset, epoch });
        if whole {
            // Small room: the exact list, without members of dead instances.
            let nicknames = self.live_members(room, entries)?;
            return Ok(Presence {
                count: nicknames.len(),
                nicknames,
                at,
            });
        }
        // Big room: the count, and a sample of names from one HSCAN step
        // (members of dead instances are cleaned up by full listings).
        let mut nicknames: Vec<String> = entries.into_iter().map(|(_, n)| n).collect();
        nicknames.sort();
        nicknames.truncate(limit);
        Ok(Presence {
            count,
            nicknames,
            at,
        })
    }

    /// The nicknames of `entries` (connection, nickname) whose instance is
    /// alive, sorted; members of instances that died are removed for
    /// everyone.
    fn live_members(
        &self,
        room: &Room,
        entries: Vec<(String, String)>,
    ) -> Result<Vec<String>, BrokerError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut instances: Vec<&str> = entries
            .iter()
            .filter_map(|(conn, _)| ConnId::instance_of(conn))
            .collect();
        instances.sort_unstable();
        instances.dedup();
        let alive = self.alive(&instances)?;
        let is_alive = |conn: &str| {
            ConnId::instance_of(conn)
                .and_then(|i| instances.binary_search(&i).ok())
                .is_some_and(|n| alive[n])
        };
        let (live, ghosts): (Vec<_>, Vec<_>) = entries.iter().partition(|(conn, _)| is_alive(conn));
        if !ghosts.is_empty() {
            // Members of instances that died: clean them up for everyone.
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(keys::members(room));
            for (conn, _) in &ghosts {
                hdel.arg(conn);
            }
            self.queues.run_detached(Route::room(room), vec![hdel]);
        }
        let mut members: Vec<String> = live.into_iter().map(|(_, n)| n.clone()).collect();
        members.sort();
        Ok(members)
    }

    /// Which of `instances` are alive (their liveness key exists): one
    /// `EXISTS` each, each a job of its own, since on a cluster their keys
    /// are on any master.
    ///
    /// This instance is alive, whatever its key says: a Redis restarted
    /// empty (or flushed) has lost it until the next heartbeat, and taking
    /// that for a crash would list nobody of this instance — not even the
    /// client being welcomed — and delete its members for everyone. A key
    /// found missing is put back at once.
    fn alive(&self, instances: &[&str]) -> Result<Vec<bool>, BrokerError> {
        let checks = instances
            .iter()
            .map(|i| {
                let key = keys::instance(i);
                let mut exists = redis::cmd("EXISTS");
                exists.arg(&key);
                (Route::key(&key), vec![exists])
            })
            .collect();
        let answers = self.queues.run_each(checks)?;
        Ok(instances
            .iter()
            .zip(answers)
            .map(|(instance, answer)| {
                let exists = from_value::<bool>(answer.into_iter().next()).unwrap_or(false);
                if !exists && *instance == self.own {
                    let key = keys::instance(instance);
                    self.queues
                        .run_detached(Route::key(&key), vec![keep_alive(&key)]);
                    return true;
                }
                exists
            })
            .collect())
    }

    /// Claims `nickname` in `room` for `conn` (see
    /// `Broker::claim_nickname`): `HSETNX` in a transaction that also reads
    /// who holds it; a holder whose instance died loses it, by a
    /// compare-and-swap, so that two claimants cannot both take it over.
    pub(super) fn claim(
        &self,
        room: &Room,
        nickname: &str,
        conn: &ConnId,
    ) -> Result<bool, BrokerError> {
        let names = keys::nicknames(room);
        // A name given back between the two steps is tried again, a few
        // times: each try is a fresh race, never a loop without end.
        for _ in 0..CLAIM_TRIES {
            let mut claim = redis::cmd("HSETNX");
            claim.arg(&names).arg(nickname).arg(conn.as_str());
            let mut expire = redis::cmd("PEXPIRE");
            expire.arg(&names).arg(self.room_ttl.as_millis() as u64);
            let mut holder = redis::cmd("HGET");
            holder.arg(&names).arg(nickname);
            let (claimed, _, holder): (bool, bool, Option<String>) =
                self.queues.transaction(room, vec![claim, expire, holder])?;
            let holder = match holder {
                _ if claimed => return Ok(true),
                Some(holder) if holder == conn.as_str() => return Ok(true),
                Some(holder) => holder,
                None => continue,
            };
            // Held: by a live connection, unless its instance died.
            let instance = ConnId::instance_of(&holder).unwrap_or_default();
            if self.alive(&[instance])?.first().copied().unwrap_or(true) {
                return Ok(false);
            }
            let swap = swap_nickname(room, nickname, &holder, conn.as_str());
            let reply = self
                .queues
                .run(Route::room(room), vec![swap])?
                .into_iter()
                .next();
            if from_value::<bool>(reply)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
