//! The broker's Lua scripts. Each touches the keys of one room and of its partition only (one
//! hash slot), so it runs atomically on a single primary and on a Redis Cluster alike.
//!
//! The partition's epoch (`chat:{pN}:epoch`, a hash: `id`, and `until`, the time before which
//! no room of the partition may be seeded) comes first in every script that reads or numbers
//! a room's events: no epoch means Redis lost the partition's data (`'3'`); a room whose
//! counter was not seeded in the current epoch (`…:ep` ≠ the epoch's id) must be seeded
//! first (`'4'`) — see `super::epochs`.

/// KEYS: epoch, seq, ep, log, persist, dedupe key, state version. ARGV: frame, window size,
/// channel, dedupe? ('1'), dedupe value, dedupe TTL, traceparent, state check ('e' expect,
/// 'c' change, '' none), version. Returns {'1', seq, epoch, persistence entry id}
/// (published), {'0', first publication} (a repeat of the dedupe key, whose TTL it renews:
/// a write, so that a `WAIT` after it covers the first publication too), {'2', version now}
/// (stale: nothing done), {'3'} (no epoch) or {'4', epoch} (room not seeded).
pub const PUBLISH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'id')
if not epoch then return {'3'} end
if redis.call('GET', KEYS[3]) ~= epoch then return {'4', epoch} end
if ARGV[4] == '1' then
  local prev = redis.call('GET', KEYS[6])
  if prev then
    redis.call('EXPIRE', KEYS[6], ARGV[6])
    return {'0', prev}
  end
end
if ARGV[8] == 'e' then
  local now = redis.call('GET', KEYS[7]) or '0'
  if now ~= ARGV[9] then return {'2', now} end
elseif ARGV[8] == 'c' then
  redis.call('SET', KEYS[7], ARGV[9])
end
local seq = redis.call('INCR', KEYS[2])
local rest = string.sub(ARGV[1], 2)
local frame
if rest == '}' then frame = '{"seq":' .. seq .. '}' else frame = '{"seq":' .. seq .. ',' .. rest end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], seq .. '-1', 'f', frame)
local id
if ARGV[7] ~= '' then
  id = redis.call('XADD', KEYS[5], '*', 'f', frame, 'tp', ARGV[7])
else
  id = redis.call('XADD', KEYS[5], '*', 'f', frame)
end
redis.call('SPUBLISH', ARGV[3], frame)
if ARGV[4] == '1' then
  redis.call('SET', KEYS[6], seq .. ':' .. ARGV[5], 'EX', ARGV[6])
end
return {'1', tostring(seq), epoch, id}
"#;

/// An ephemeral frame published only while the room's state version (KEYS[1]) is ARGV[1].
pub const PUBLISH_CHECKED: &str = r#"
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('SPUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// KEYS: epoch, seq, ep, log, state version, pin set. ARGV: since (-1: none), window size.
/// Returns {'1', epoch, last seq, state version, Redis time (ms), pinned ids ('-': no pin
/// set; else comma-separated), up to ARGV[2] frames after ARGV[1]...}, or '3'/'4' as
/// PUBLISH.
pub const RECOVER: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'id')
if not epoch then return {'3'} end
if redis.call('GET', KEYS[3]) ~= epoch then return {'4', epoch} end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[1])
local t = redis.call('TIME')
local pins = '-'
if redis.call('EXISTS', KEYS[6]) == 1 then
  local ids = {}
  for _, k in ipairs(redis.call('HKEYS', KEYS[6])) do
    if k ~= '_' then ids[#ids + 1] = k end
  end
  pins = table.concat(ids, ',')
end
local out = {'1', epoch, tostring(last), redis.call('GET', KEYS[5]) or '0',
  string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)), pins}
if since >= 0 and since < last then
  local evs = redis.call('XRANGE', KEYS[4], (since + 1) .. '-0', '+', 'COUNT', ARGV[2])
  for _, e in ipairs(evs) do out[#out + 1] = e[2][2] end
end
return out
"#;

/// Creates or replaces the partition's epoch. KEYS: epoch. ARGV: the id expected now ('' for
/// none), the new id, the grace in ms (no room is seeded before it passed). Returns the id
/// in force afterwards: the new one, or whatever another process put there first.
pub const NEW_EPOCH: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'id') or ''
if cur ~= ARGV[1] then return cur end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'until', tostring(now + tonumber(ARGV[3])))
return ARGV[2]
"#;

/// Seeds a room's counter in the epoch ARGV[1]: above ARGV[2] (what the store and the old key
/// layout hold), the room's floor (what live nodes reported) and what the counter holds now.
/// The window of the numbering before is kept aside (`oldlog`, a minute) for REAPPEND to
/// check against, and the pin set starts over (the store decides pins from now on). KEYS:
/// epoch, seq, ep, floor, log, pins, oldlog. Returns {'1'} (seeded, by this call or
/// another), {'0'} (the epoch moved on) or {'2', ms} (the epoch's grace has ms left: nothing
/// done).
pub const SEED: &str = r#"
local e = redis.call('HMGET', KEYS[1], 'id', 'until')
if e[1] ~= ARGV[1] then return {'0'} end
if redis.call('GET', KEYS[3]) == ARGV[1] then return {'1'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(e[2] or '0') - now
if left > 0 then return {'2', tostring(left)} end
local base = math.max(tonumber(ARGV[2]), tonumber(redis.call('GET', KEYS[4]) or '0'),
  tonumber(redis.call('GET', KEYS[2]) or '0'))
redis.call('SET', KEYS[2], string.format('%d', base))
redis.call('SET', KEYS[4], string.format('%d', base))
redis.call('SET', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[6], KEYS[7])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[7])
  redis.call('PEXPIRE', KEYS[7], 60000)
end
return {'1'}
"#;

/// After a reset, what a node knows of a room's numbering before it: ARGV[2] (the highest seq
/// it published or delivered) raises the room's floor while the room is not seeded in epoch
/// ARGV[1]. The events (ARGV[4..]: seq, frame, dedupe key, dedupe value — '' without — for
/// each) are appended to the persistence stream again with their seq, their dedupe key set
/// again for ARGV[3] seconds, when Redis has no event at that seq (its window, or the window
/// kept aside at seeding, shows what it has) and none of the new epoch can get it (seq ≤
/// floor). Left alone: an event Redis still has, and one whose dedupe key names another
/// publication (its sender's retry went through meanwhile). KEYS: epoch, ep, floor, persist,
/// log, oldlog. Returns {'1', id of the last entry appended or '', seqs another event holds
/// or that came too late…} or {'0'} (the epoch moved on).
pub const REAPPEND: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return {'0'} end
local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
if redis.call('GET', KEYS[2]) ~= ARGV[1] and tonumber(ARGV[2]) > floor then
  floor = tonumber(ARGV[2])
  redis.call('SET', KEYS[3], ARGV[2])
end
local out = {'1', ''}
for i = 4, #ARGV, 4 do
  local id = ARGV[i] .. '-1'
  local e = redis.call('XRANGE', KEYS[5], id, id)
  if not e[1] then e = redis.call('XRANGE', KEYS[6], id, id) end
  local retried = ARGV[i + 2] ~= '' and redis.call('GET', ARGV[i + 2])
  if e[1] then
    if e[1][2][2] ~= ARGV[i + 1] then out[#out + 1] = ARGV[i] end
  elseif retried and retried ~= ARGV[i + 3] then
    -- its sender's retry is the publication that counts
  elseif tonumber(ARGV[i]) <= floor then
    out[2] = redis.call('XADD', KEYS[4], '*', 'f', ARGV[i + 1])
    if ARGV[i + 2] ~= '' then
      redis.call('SET', ARGV[i + 2], ARGV[i + 3], 'NX', 'EX', ARGV[3])
    end
  else
    out[#out + 1] = ARGV[i]
  end
end
return out
"#;

/// Deletes the idempotency key KEYS[1] while it still names the publication ARGV[1]: an
/// event published again must not be answered with the publication the store lost.
pub const FORGET: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// What the persistence stream of a partition still holds: KEYS: epoch, persist. Returns
/// {epoch id or '', id of the stream's oldest entry or ''}. Consumers delete what they
/// stored, so entries older than the oldest one left are stored.
pub const CONFIRM: &str = r#"
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local f = ''
if first[1] then f = first[1][1] end
return {redis.call('HGET', KEYS[1], 'id') or '', f}
"#;

/// Which of a room's events (ARGV[2..]: seq, frame, seq, frame…), published in epoch
/// ARGV[1], Redis no longer has: the window holds another frame at its seq, or none while
/// reaching back past it. KEYS: epoch, log. Returns {'1', missing seqs…} or {'0'} (the epoch
/// moved on).
pub const VERIFY: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return {'0'} end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = math.huge
if first[1] then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
local missing = {'1'}
for i = 2, #ARGV, 2 do
  local e = redis.call('XRANGE', KEYS[2], ARGV[i] .. '-1', ARGV[i] .. '-1')
  if e[1] then
    if e[1][2][2] ~= ARGV[i + 1] then missing[#missing + 1] = ARGV[i] end
  elseif tonumber(ARGV[i]) >= oldest or not first[1] then
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
"#;

/// The room's pin set: a hash of pinned message ids plus a `_` field, so that a set with no
/// pins still exists. When the hash does not exist, ARGV[4] = '1' seeds it with ARGV[6..] (the
/// store's pins); '0' leaves it absent. ARGV[5]: the state version the pin was decided on
/// (KEYS[2]; '' unchecked).
pub const PIN: &str = r#"
if ARGV[5] ~= '' and (redis.call('GET', KEYS[2]) or '0') ~= ARGV[5] then return 'stale' end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] ~= '1' then return 'absent' end
  redis.call('HSET', KEYS[1], '_', '1')
  for i = 6, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], '1') end
end
if ARGV[1] == 'pin' then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 'pinned' end
  if redis.call('HLEN', KEYS[1]) - 1 >= tonumber(ARGV[3]) then return 'full' end
  redis.call('HSET', KEYS[1], ARGV[2], '1')
  return 'done'
end
if redis.call('HDEL', KEYS[1], ARGV[2]) == 1 then return 'done' end
return 'absent'
"#;

/// KEYS: presence, users, names, the partition's presence rooms. ARGV: user, node, expiry,
/// name, room.
/// Lua: `online(out, names, max)` appends the room's online count to `out`, then up to `max`
/// (id, name) pairs from its names hash: all of them when they fit (HGETALL), else the first
/// `max` an HSCAN finds — a big room is listed in part rather than read whole on every join.
/// The scripts return the list JSON-encoded, one string: parsing 200 reply items per join
/// was a tenth of a join storm's gateway CPU.
macro_rules! online_lua {
    () => {
        r#"
local function online(out, names, max)
  local count = redis.call('HLEN', names)
  out[#out + 1] = tostring(count)
  if max <= 0 then return out end
  if count <= max then
    for _, v in ipairs(redis.call('HGETALL', names)) do out[#out + 1] = v end
    return out
  end
  local cursor, n = '0', 0
  repeat
    local r = redis.call('HSCAN', names, cursor, 'COUNT', max)
    cursor = r[1]
    for i = 1, #r[2], 2 do
      if n < max then
        out[#out + 1] = r[2][i]
        out[#out + 1] = r[2][i + 1]
        n = n + 1
      end
    end
  until cursor == '0' or n >= max
  return out
end
"#
    };
}

/// KEYS: presence, users, names, the partition's presence rooms. ARGV: user, node, expiry,
/// name, room, list size. Lists the room for the sweep (every time: the sweep takes a room
/// off the list once nobody is left in it). Returns `["1" newly online / "0", count, id,
/// name, ...]` as JSON.
pub const PRESENCE_ADD: &str = concat!(
    online_lua!(),
    r#"
local first = '0'
if redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1] .. '\n' .. ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[1], 1) == 1 then first = '1' end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
return cjson.encode(online({first}, KEYS[3], tonumber(ARGV[6])))
"#
);

/// KEYS: names. ARGV: list size. Returns `[count, id, name, ...]` as JSON.
pub const PRESENCE_LIST: &str = concat!(
    online_lua!(),
    r#"
return cjson.encode(online({}, KEYS[1], tonumber(ARGV[1])))
"#
);

/// Returns {'1', online count} when the user is now offline, else {'0', count}.
pub const PRESENCE_REMOVE: &str = r#"
local gone = '0'
if redis.call('ZREM', KEYS[1], ARGV[1] .. '\n' .. ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    gone = '1'
  end
end
return {gone, tostring(redis.call('HLEN', KEYS[3]))}
"#;

/// Removes presence entries whose node stopped refreshing them; returns users now offline.
/// KEYS: presence, users, names, the partition's presence rooms. ARGV: now, room. A room
/// nobody is in any more leaves the sweep's list (else every room ever joined would be swept
/// by every node forever); the next join lists it again.
pub const PRESENCE_SWEEP: &str = r#"
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local gone = {}
for _, m in ipairs(dead) do
  redis.call('ZREM', KEYS[1], m)
  local user = string.match(m, '^(.*)\n')
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    redis.call('HDEL', KEYS[3], user)
    gone[#gone + 1] = user
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[2])
end
return gone
"#;

/// Every script, loaded once per process.
pub struct Scripts {
    pub publish: redis::Script,
    pub publish_checked: redis::Script,
    pub recover: redis::Script,
    pub new_epoch: redis::Script,
    pub seed: redis::Script,
    pub reappend: redis::Script,
    pub forget: redis::Script,
    pub confirm: redis::Script,
    pub verify: redis::Script,
    pub presence_add: redis::Script,
    pub presence_list: redis::Script,
    pub presence_remove: redis::Script,
    pub presence_sweep: redis::Script,
    pub pin: redis::Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            publish: redis::Script::new(PUBLISH),
            publish_checked: redis::Script::new(PUBLISH_CHECKED),
            recover: redis::Script::new(RECOVER),
            new_epoch: redis::Script::new(NEW_EPOCH),
            seed: redis::Script::new(SEED),
            reappend: redis::Script::new(REAPPEND),
            forget: redis::Script::new(FORGET),
            confirm: redis::Script::new(CONFIRM),
            verify: redis::Script::new(VERIFY),
            presence_add: redis::Script::new(PRESENCE_ADD),
            presence_list: redis::Script::new(PRESENCE_LIST),
            presence_remove: redis::Script::new(PRESENCE_REMOVE),
            presence_sweep: redis::Script::new(PRESENCE_SWEEP),
            pin: redis::Script::new(PIN),
        }
    }
}
