//! The Lua scripts the Redis broker runs, and how it names them.
//!
//! Redis runs a script whole, with nothing else in between, and a script
//! that is refused (at `maxmemory`, say) does nothing at all. One step needs
//! logic inside Redis: giving an event the next offset of its room's log,
//! writing that offset into the payload, logging it, changing the member
//! list with it *and* publishing it, so that every instance sees the same
//! order and the sender can be told the truth ([`LOG_AND_PUBLISH`]).
//! Reads that must see one moment (the log with where it begins, the member
//! list with the offset it reflects) need no logic, only that nothing runs
//! in between: they are `MULTI`/`EXEC` transactions
//! (`Queues::transaction` in `queries.rs`), which spare Redis converting
//! replies to Lua and back, a cost that grows with the reply (a big room's
//! presence). Every connection loads the script when it opens
//! (`SCRIPT LOAD`), and commands call it by SHA1 (`EVALSHA`).

/// Logs the chat messages of a run of events of one room in its room's
/// log, changes the room's member list for the joins and leaves among
/// them, and publishes each:
/// one step that Redis carries out whole or not at all, so offsets are the
/// order in which every subscriber receives, and the member list agrees
/// with the log at every offset. (One event is a run of one; why runs, see
/// `coalesce.rs`.)
///
/// `KEYS`: the log, its size in bytes, its position (`epoch`, `last`,
/// `first`), the member list. `ARGV`: the most entries and bytes to keep,
/// the room's time to live (ms), the channel, an epoch for a log that
/// starts afresh, `sharded` on a Redis Cluster (the script then
/// `SPUBLISH`es on the room's shard channel, which is in the keys' slot;
/// see `ha/cluster.rs`) or `classic`, a place key for a log that starts
/// afresh (see below), `again` for a run sent a second time (see below) or
/// `first`; then each event as its change (`""`, `join` or `leave`),
/// how many connection arguments follow, those (connection ids, with their
/// nicknames for a join), and its payload. Each payload gets the next
/// offset and the epoch written in front of its fields. Only chat messages
/// are kept in the log: joins and leaves take offsets (the member list
/// agrees with the log at each), but never push chat out of the history.
/// The oldest entries go until both bounds hold, and `first` is one past
/// the newest entry gone: the log holds every chat message from `first` on
/// (with no log kept,
/// `first` is not kept either: it is always `last + 1`). A key gets its
/// time to live when it is created, or changed by a join; the heartbeat and
/// every joiner refresh them (see `queries::refresh`), so a message
/// costs no `PEXPIRE`.
///
/// **Places that cannot be forged.** Anyone who can publish on a room's
/// channel can write any offset into a payload, the next one included. So
/// each payload also gets a `tag`: the first 16 hex digits of the SHA-1 of
/// the epoch's secret key (kept in the position hash, never published),
/// the epoch and the offset. An instance reads the key from Redis and
/// passes a place on only with its tag (`RedisBroker::vouches`).
///
/// **A new epoch for a restarted Redis.** The log's position hash keeps
/// the `run_id` of the Redis process that wrote it. A Redis that restarts
/// from a snapshot or an append-only file may bring back a log older than
/// what clients have seen, and a replica promoted by a failover may lack
/// the last writes: offsets would be given a second time, and clients
/// would skip the new messages as already seen. So a log written by
/// another Redis process takes a new epoch, and no place is given twice.
/// The log itself is kept, its offsets going on from where it stands (on a
/// Redis Cluster a room's keys also move to another master whole: a
/// resharding `MIGRATE`s them). The old epoch is remembered with where it
/// ended and its key (the last `MAX_EARLIER`, see `position.rs`): a place
/// at or before its end is still a place in this log, and one past it was
/// lost. (`INFO server` is read once per run of events, not per message. A
/// Redis that refuses `INFO` — an ACL user without it, a renamed command —
/// gets no such check, rather than refusing every message.)
///
/// **Sent again, carried out once.** A publisher whose connection closed
/// before Redis answered sends the run once more (`publisher.rs`); but
/// Redis may have carried out the first one (a connection killed by
/// `CLIENT KILL`, a proxy, a network reset, after the script ran). So a run
/// sent `again` skips a chat message whose `id` is among the log's newest
/// entries, and a join whose connections are all on the member list under
/// their nicknames already. One chat message found means the whole run was
/// carried out (a script runs whole or not at all), and it is all skipped:
/// a run of more chat messages than the log keeps pushes its own first
/// ones out, and they would not be found. (With no log kept, `--history 0`, a chat
/// message cannot be checked, and is published again.) A run that skips
/// anything still writes (the position's time to live): the `WAIT` that
/// follows (`--wait-replicas`) counts the replicas that have this
/// connection's writes, and a fresh connection with none would be told
/// that every replica has them, the first try's included.
///
/// **A leave only once.** A leave is published only if it takes one of
/// its connections off the member list: a leave sent again after a failure
/// (its first try may have landed after all) and the heartbeat's
/// reconciliation (see `ghosts.rs`) may both announce one connection's
/// leave, and the room hears it once. A leave that is dropped takes no
/// offset. (Whether a connection is on the list is read before the first
/// write, and follows the joins and leaves of the run before it.)
///
/// The first write (`HINCRBY`) comes before anything else is changed or
/// published: when Redis refuses writes (`maxmemory`), it refuses that one
/// and the script stops having done nothing. Returns how many events were
/// published.
pub const LOG_AND_PUBLISH: &str = concat!(
    next_epoch_lua!(),
    r#"
local log, bytes_key, meta, members = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max_count, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl, channel = ARGV[3], ARGV[4]
local publish = ARGV[6] == 'sharded' and 'SPUBLISH' or 'PUBLISH'
local events, i = {}, 9
while i <= #ARGV do
  local count = tonumber(ARGV[i + 1])
  events[#events + 1] = {change = ARGV[i], from = i + 2, to = i + 1 + count, payload = ARGV[i + 2 + count]}
  i = i + 3 + count
end
local again, sent = ARGV[8] == 'again', {}
if again and max_count > 0 then
  for _, old in ipairs(redis.call('LRANGE', log, -(#events + 256), -1)) do
    local id = string.match(old, '"id":"([^"]*)"')
    if id then sent[id] = true end
  end
end
local present, kept, done = {}, {}, false
for _, event in ipairs(events) do
  local keep = event.change ~= 'leave'
  if event.change == 'join' then
    local new = not again
    for j = event.from, event.to, 2 do
      new = new or redis.call('HGET', members, ARGV[j]) ~= ARGV[j + 1]
      present[ARGV[j]] = true
    end
    keep = new
  elseif event.change == '' then
    keep = not (again and sent[string.match(event.payload, '"id":"([^"]*)"') or ''])
    done = done or not keep
  elseif not keep then
    for j = event.from, event.to do
      local conn = ARGV[j]
      if present[conn] == nil then present[conn] = redis.call('HEXISTS', members, conn) == 1 end
      keep = keep or present[conn]
      present[conn] = false
    end
  end
  if keep then kept[#kept + 1] = event end
end
-- One chat message of the run found done: the run was carried out, whole.
if done then kept = {} end
if again and #kept < #events then
  -- Carried out before, on a connection now closed. The WAIT after this run
  -- (--wait-replicas) asks about this connection's writes: with none (Redis
  -- 7.2 on), it would count a replica that lacks the first try. One write
  -- (a time to live the heartbeat refreshes anyway) makes it ask about all.
  redis.call('PEXPIRE', meta, ttl)
end
events = kept
if #events == 0 then return 0 end
local run = run_id()
local position = redis.call('HMGET', meta, 'epoch', 'run', 'key', 'past')
local epoch, key = position[1], position[3]
local last = redis.call('HINCRBY', meta, 'last', #events)
if not epoch then
  epoch, key = ARGV[5], ARGV[7]
  redis.call('DEL', log, bytes_key)
  redis.call('HSET', meta, 'epoch', epoch, 'last', #events, 'first', 1, 'run', run, 'key', key)
  redis.call('PEXPIRE', meta, ttl)
  last = #events
elseif position[2] ~= run or not key then
  next_epoch(meta, epoch, last - #events, key, position[4], ARGV[5], ARGV[7], run)
  epoch, key = ARGV[5], ARGV[7]
end
local head = ',"epoch":"' .. epoch .. '","tag":"'
local payloads, logged, added = {}, {}, 0
for k, event in ipairs(events) do
  if event.change == 'join' then
    for j = event.from, event.to, 2 do redis.call('HSET', members, ARGV[j], ARGV[j + 1]) end
    redis.call('PEXPIRE', members, ttl)
  elseif event.change == 'leave' then
    for j = event.from, event.to do redis.call('HDEL', members, ARGV[j]) end
  end
  local offset = last - #events + k
  local tag = string.sub(redis.sha1hex(key .. ':' .. epoch .. ':' .. offset), 1, 16)
  local payload = '{"offset":' .. offset .. head .. tag .. '",' .. string.sub(event.payload, 2)
  payloads[k] = payload
  if event.change == '' then
    logged[#logged + 1] = payload
    added = added + #payload
  end
end
if max_count > 0 and #logged > 0 then
  local n = redis.call('RPUSH', log, unpack(logged))
  local bytes
  if n == #logged then
    bytes = added
    redis.call('SET', bytes_key, bytes, 'PX', ttl)
    redis.call('PEXPIRE', log, ttl)
  else
    bytes = redis.call('INCRBY', bytes_key, added)
  end
  local dropped, freed, newest_gone = 0, 0, nil
  if n > max_count then
    for _, old in ipairs(redis.call('LPOP', log, n - max_count)) do
      freed = freed + #old
      dropped = dropped + 1
      newest_gone = old
    end
    n = n - dropped
  end
  while n > 0 and bytes - freed > max_bytes do
    local old = redis.call('LPOP', log)
    if not old then break end
    freed = freed + #old
    dropped = dropped + 1
    newest_gone = old
    n = n - 1
  end
  if n == 0 then
    redis.call('DEL', log, bytes_key)
  elseif freed > 0 then
    redis.call('DECRBY', bytes_key, freed)
  end
  if newest_gone then
    local gone = tonumber(string.match(newest_gone, '^{"offset":(%d+)'))
    if gone then redis.call('HSET', meta, 'first', gone + 1) end
  end
end
for _, payload in ipairs(payloads) do redis.call(publish, channel, payload) end
return #payloads
"#
);

/// Lua that [`LOG_AND_PUBLISH`] and [`REPORT_SEEN`] share: `run_id()`, the
/// Redis process's id (`''` if `INFO` is refused: an ACL user without it,
/// a renamed command), and `next_epoch(...)`, which starts a new epoch for
/// a log, remembering the old one (`old`, its key `old_key`) and where it
/// `ended`, in the list of earlier epochs (`past`, at most `MAX_EARLIER`;
/// see `position.rs`). A macro, because `concat!` takes only literals.
macro_rules! next_epoch_lua {
    () => {
        r#"
local MAX_EARLIER = 4
local function run_id()
  local info = redis.pcall('INFO', 'server')
  return type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
end
local function next_epoch(meta, old, ended, old_key, past, epoch, key, run)
  local kept = {}
  for e in string.gmatch(past or '', '%S+') do kept[#kept + 1] = e end
  kept[#kept + 1] = old
  if #kept > MAX_EARLIER then
    local gone = table.remove(kept, 1)
    redis.call('HDEL', meta, 'end:' .. gone, 'key:' .. gone, 'seen:' .. gone)
  end
  redis.call('HSET', meta, 'end:' .. old, ended, 'key:' .. old, old_key or '',
    'past', table.concat(kept, ' '), 'epoch', epoch, 'run', run, 'key', key)
end
"#
    };
}
use next_epoch_lua;

/// An instance delivered offset `ARGV[2]` of epoch `ARGV[1]`, which the
/// log (position hash `KEYS[1]`) no longer holds: the Redis that gave it
/// lost it (a failover to a replica that lacked it, a restart from an
/// older snapshot). Noted as `seen:{epoch}`, so that everyone can count
/// what was lost. If that epoch is still the log's (nobody wrote since),
/// it ends here and a new one (`ARGV[3]`, key `ARGV[4]`) starts, as the
/// next write would have started it. Returns 1 if it noted anything.
pub const REPORT_SEEN: &str = concat!(
    next_epoch_lua!(),
    r#"
local meta, epoch, offset = KEYS[1], ARGV[1], tonumber(ARGV[2])
local p = redis.call('HMGET', meta, 'epoch', 'last', 'key', 'past', 'end:' .. epoch, 'seen:' .. epoch)
if p[1] == epoch then
  local last = tonumber(p[2]) or 0
  if offset <= last then return 0 end
  next_epoch(meta, epoch, last, p[3], p[4], ARGV[3], ARGV[4], run_id())
  redis.call('HSET', meta, 'seen:' .. epoch, offset)
  return 1
end
local ended, seen = tonumber(p[5]), tonumber(p[6]) or 0
if not ended or offset <= ended or offset <= seen then return 0 end
redis.call('HSET', meta, 'seen:' .. epoch, offset)
return 1
"#
);

/// Compare-and-swap on one field of a hash: if `KEYS[1]`'s field
/// `ARGV[1]` holds `ARGV[2]`, it becomes `ARGV[3]` (or is deleted, if that
/// is empty). Returns 1 if it did. A claimed nickname
/// (`--unique-nicknames`) is given back only by its holder, and taken over
/// from a dead instance only if nobody took it first.
pub const SWAP_FIELD: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"#;

/// Changes the index of idle rooms (`idle.rs`), all of whose keys are in
/// one slot: `KEYS` the sorted set (room → when it was left, in ms), the
/// hash (room → bytes) and their total; `ARGV` the room, its bytes (`-1`:
/// it is no longer idle, take it out), the budget in bytes and the rooms'
/// time to live in ms. Entries older than that go first (their rooms have
/// expired); then the least recently left go until the total fits the
/// budget. The index's keys live a time to live after their last change.
/// Returns the rooms evicted (not the expired), for the caller to forget.
pub const IDLE_INDEX: &str = r#"
local lru, sizes, total = KEYS[1], KEYS[2], KEYS[3]
local room, bytes = ARGV[1], tonumber(ARGV[2])
local budget, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function forget(name)
  local old = redis.call('HGET', sizes, name)
  if old then
    redis.call('HDEL', sizes, name)
    redis.call('DECRBY', total, old)
  end
  redis.call('ZREM', lru, name)
end
for _, name in ipairs(redis.call('ZRANGE', lru, '-inf', now - ttl, 'BYSCORE')) do
  forget(name)
end
forget(room)
if bytes >= 0 then
  redis.call('ZADD', lru, now, room)
  redis.call('HSET', sizes, room, bytes)
  redis.call('INCRBY', total, bytes)
end
local evicted = {}
while tonumber(redis.call('GET', total) or '0') > budget do
  local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
  evicted[#evicted + 1] = oldest
end
-- Unchanged for a time to live, every entry is stale: the index goes too.
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
return evicted
"#;

/// Forgets an idle room evicted from the index: deletes its log, its
/// position and its claimed nicknames — unless its member list says
/// somebody is in it now (checked in the same step). `KEYS`: the room's
/// keys in `keys::to_refresh` order. Returns 1 if it was forgotten.
pub const FORGET_ROOM: &str = r#"
if redis.call('HLEN', KEYS[4]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
return 1
"#;

/// The scripts every connection loads (`SCRIPT LOAD`) when it opens.
pub(super) const SCRIPTS: [&str; 4] = [LOG_AND_PUBLISH, SWAP_FIELD, IDLE_INDEX, FORGET_ROOM];

/// The SHA1 by which Redis knows one of [`SCRIPTS`] once loaded.
pub(super) fn sha_of(script: &'static str) -> &'static str {
    static SHAS: std::sync::OnceLock<[String; 4]> = std::sync::OnceLock::new();
    let shas = SHAS.get_or_init(|| SCRIPTS.map(|s| redis::Script::new(s).get_hash().to_owned()));
    let index = SCRIPTS
        .iter()
        .position(|s| *s == script)
        .expect("one of SCRIPTS");
    &shas[index]
}

/// True for a `NOSCRIPT` error reply.
pub(super) fn is_no_script(value: &redis::Value) -> bool {
    matches!(value, redis::Value::ServerError(e)
        if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// True for a `READONLY` error reply: the server is a replica now.
pub(super) fn is_read_only(value: &redis::Value) -> bool {
    matches!(value, redis::Value::ServerError(e) if e.code() == "READONLY")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script is called by its own SHA1, however the constant was
    /// copied at the call site.
    #[test]
    fn the_script_is_called_by_its_sha() {
        let log = String::from(LOG_AND_PUBLISH);
        assert_eq!(sha_of(LOG_AND_PUBLISH), redis::Script::new(&log).get_hash());
    }
}
