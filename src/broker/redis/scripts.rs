//! The Lua scripts the Redis broker runs, and how it names them.
//!
//! Redis runs a script whole, with nothing else in between, and a script
//! that is refused (at `maxmemory`, say) does nothing at all. Two steps
//! need that: recording a chat message in its room's history *and*
//! publishing it, so that the sender can be told the truth
//! ([`RECORD_AND_PUBLISH`]); and reading a history's newest id without
//! sending the message over the wire ([`HISTORY_MARK`]). Every connection
//! loads both when it opens (`SCRIPT LOAD`), and commands call them by SHA1
//! (`EVALSHA`).

/// Appends a chat message to its room's history and publishes it, in one
/// step that Redis carries out whole or not at all.
///
/// `KEYS`: the history list, its size in bytes. `ARGV`: the payload, the
/// most messages and bytes to keep, the rooms' time to live (ms), the
/// channel. The oldest messages go until both bounds hold; a message
/// bigger than the byte bound on its own is published but not kept. The
/// size key is reset whenever the list starts afresh, so it cannot drift
/// from the list for long. Returns `PUBLISH`'s answer.
pub const RECORD_AND_PUBLISH: &str = r"
local payload = ARGV[1]
local max_count, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
local n = redis.call('RPUSH', KEYS[1], payload)
local bytes
if n == 1 then
  bytes = #payload
  redis.call('SET', KEYS[2], bytes)
else
  bytes = redis.call('INCRBY', KEYS[2], #payload)
end
while n > 0 and (n > max_count or bytes > max_bytes) do
  local old = redis.call('LPOP', KEYS[1])
  if not old then break end
  bytes = redis.call('DECRBY', KEYS[2], #old)
  n = n - 1
end
if n == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return redis.call('PUBLISH', ARGV[5], payload)
";

/// The id of the newest message in a room's history (`KEYS`: the history
/// list), without sending the message itself over the wire: a joiner's
/// mark (see `Broker::history_mark`). `false` (nil) when there is none.
pub const HISTORY_MARK: &str = r"
local newest = redis.call('LINDEX', KEYS[1], -1)
if not newest then return false end
local ok, message = pcall(cjson.decode, newest)
if ok and type(message) == 'table' and type(message.id) == 'string' then
  return message.id
end
return false
";

/// The scripts every connection loads (`SCRIPT LOAD`) when it opens.
pub(super) const SCRIPTS: [&str; 2] = [RECORD_AND_PUBLISH, HISTORY_MARK];

/// The SHA1 by which Redis knows one of [`SCRIPTS`] once loaded.
pub(super) fn sha_of(script: &'static str) -> &'static str {
    static SHAS: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each script is called by its own SHA1, however the constant was
    /// copied at the call site.
    #[test]
    fn each_script_has_its_own_sha() {
        let record = String::from(RECORD_AND_PUBLISH);
        assert_eq!(
            sha_of(RECORD_AND_PUBLISH),
            redis::Script::new(&record).get_hash()
        );
        assert_eq!(
            sha_of(HISTORY_MARK),
            redis::Script::new(HISTORY_MARK).get_hash()
        );
        assert_ne!(sha_of(RECORD_AND_PUBLISH), sha_of(HISTORY_MARK));
    }
}
