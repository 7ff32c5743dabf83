//! The Redis broker: many gateway nodes, one Redis.
//!
//! # Keys (hash-tagged by room, so each room's keys live in one Cluster slot)
//! - `chat:{room}:seq` — the room's seq counter (INCR).
//! - `chat:{room}:log` — recovery window: a stream capped near `window` entries whose ids are
//!   `<seq>-1`, so `since` maps straight to a range.
//! - `chat:{room}:dd:<user>/<client_msg_id>` — idempotency keys (10 minutes).
//! - `chat:{room}` — the room's pub/sub channel; `chat:nodes` carries node-targeted frames.
//! - `chat:{room}:presence` (zset `user\nnode` → expiry ms), `chat:{room}:users` (hash
//!   user → nodes holding them), `chat:{room}:names` (hash user → display name);
//!   `chat:presence-rooms` (set) lists rooms to sweep: rooms with anyone online (added by every
//!   join, removed by the sweep that finds a room empty).
//! - `chat:{room}:state` — the room's state version (see [`super::StateCheck`]): set by the
//!   publish of every room-state event, compared by checked publishes, pins and typing.
//! - `chat:{room}:pins` — the room's pin set (hash of pinned message ids), which decides pins
//!   and unpins before their events are published ([`Broker::pin_set`]).
//! - `chat:persist` — the persistence stream the history service consumes. It is the one key
//!   not tagged by room: on Redis Cluster the publish script would need per-slot persistence
//!   streams (docs/scaling.md says how); a single primary with replicas is the supported shape.
//!   Entries: `f` = the frame, and `tp` = the publisher's W3C traceparent when traces are
//!   exported.
//!
//! # Why one script per publish
//! The state check, INCR, the window append, the persistence append and PUBLISH run in one Lua
//! script: Redis runs it atomically, so seq is gapless, every subscriber sees events in seq
//! order, an event is in the persistence stream before anyone is acknowledged, and a command
//! decided on an outdated room state never gets published.
//!
//! # Subscriber
//! One pub/sub connection per node, owned by a task ([`subscriber`]). It keeps each room's last
//! delivered seq: a live event that skips seqs, or a reconnect after Redis restarted, makes it
//! fetch the missing events from the room's window first, so local delivery stays gapless and
//! in order. Rooms whose gap is no longer in the window get their sessions closed with 1012,
//! and the clients recover from history.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::{Pool, Runtime};
use futures_util::{FutureExt, StreamExt};
use proto::envelope::{NodeMessage, NodeTarget};
use proto::{MessageId, RoomId, Timestamp, UserRef};
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};

use super::{
    Broker, BrokerError, Dedupe, Events, Online, PinChange, PinOutcome, Published, Recovery,
    StateCheck, StateVersion,
};
use crate::bus;
use crate::hub::Hub;

const NODE_CHANNEL: &str = "chat:nodes";
const PERSIST_STREAM: &str = "chat:persist";
const PRESENCE_ROOMS: &str = "chat:presence-rooms";
const DEDUPE_TTL_S: u64 = 600;
/// Every Redis call gives up after this; the command answers `unavailable`.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// KEYS: seq, log, persistence stream, dedupe key, state version. ARGV: frame, window size,
/// channel, dedupe? ('1'), dedupe value, dedupe TTL, traceparent, state check ('e' expect,
/// 'c' change, '' none), version. Returns {'1', seq} (published), {'0', first publication}
/// (a repeat of the dedupe key) or {'2', version now} (stale: nothing done).
const PUBLISH_LUA: &str = r#"
if ARGV[4] == '1' then
  local prev = redis.call('GET', KEYS[4])
  if prev then return {'0', prev} end
end
if ARGV[8] == 'e' then
  local now = redis.call('GET', KEYS[5]) or '0'
  if now ~= ARGV[9] then return {'2', now} end
elseif ARGV[8] == 'c' then
  redis.call('SET', KEYS[5], ARGV[9])
end
local seq = redis.call('INCR', KEYS[1])
local rest = string.sub(ARGV[1], 2)
local frame
if rest == '}' then frame = '{"seq":' .. seq .. '}' else frame = '{"seq":' .. seq .. ',' .. rest end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-1', 'f', frame)
if ARGV[7] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'f', frame, 'tp', ARGV[7])
else
  redis.call('XADD', KEYS[3], '*', 'f', frame)
end
redis.call('PUBLISH', ARGV[3], frame)
if ARGV[4] == '1' then
  redis.call('SET', KEYS[4], seq .. ':' .. ARGV[5], 'EX', ARGV[6])
end
return {'1', tostring(seq)}
"#;

/// An ephemeral frame published only while the room's state version (KEYS[1]) is ARGV[1].
const PUBLISH_CHECKED_LUA: &str = r#"
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// KEYS: seq, log, state version, pin set. Returns {last seq, state version, pinned ids
/// ('-': no pin set; else comma-separated), up to ARGV[2] frames after ARGV[1]...}.
const RECOVER_LUA: &str = r#"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
local pins = '-'
if redis.call('EXISTS', KEYS[4]) == 1 then
  local ids = {}
  for _, k in ipairs(redis.call('HKEYS', KEYS[4])) do
    if k ~= '_' then ids[#ids + 1] = k end
  end
  pins = table.concat(ids, ',')
end
local out = {tostring(last), redis.call('GET', KEYS[3]) or '0', pins}
if since >= 0 and since < last then
  local evs = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', ARGV[2])
  for _, e in ipairs(evs) do out[#out + 1] = e[2][2] end
end
return out
"#;

/// The room's pin set: a hash of pinned message ids plus a `_` field, so that a set with no
/// pins still exists. When the hash does not exist, ARGV[4] = '1' seeds it with ARGV[6..] (the
/// store's pins); '0' leaves it absent. ARGV[5]: the state version the pin was decided on
/// (KEYS[2]; '' unchecked).
const PIN_LUA: &str = r#"
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

/// KEYS: presence, users, names, the sweep's list of rooms. ARGV: user, node, expiry, name,
/// list size, room. Lists the room for the sweep on every join (the sweep takes a room off
/// the list once nobody is in it). Returns `["1" newly online / "0", count, id, name, ...]`
/// as JSON.
const PRESENCE_ADD_LUA: &str = concat!(
    online_lua!(),
    r#"
local first = '0'
if redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1] .. '\n' .. ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[1], 1) == 1 then first = '1' end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[6])
return cjson.encode(online({first}, KEYS[3], tonumber(ARGV[5])))
"#
);

/// KEYS: names. ARGV: list size. Returns `[count, id, name, ...]` as JSON.
const PRESENCE_LIST_LUA: &str = concat!(
    online_lua!(),
    r#"
return cjson.encode(online({}, KEYS[1], tonumber(ARGV[1])))
"#
);

/// Returns {'1', online count} when the user is now offline, else {'0', count}.
const PRESENCE_REMOVE_LUA: &str = r#"
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
/// KEYS: presence, users, names, the sweep's list of rooms. ARGV: now, room. A room nobody is
/// in any more leaves the list: else every node would sweep every room ever joined, forever.
const PRESENCE_SWEEP_LUA: &str = r#"
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

fn key(room: &RoomId, suffix: &str) -> String {
    format!("chat:{{{room}}}:{suffix}")
}

fn channel(room: &RoomId) -> String {
    format!("chat:{{{room}}}")
}

fn room_of_channel(ch: &str) -> Option<RoomId> {
    RoomId::new(ch.strip_prefix("chat:{")?.strip_suffix('}')?).ok()
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

enum SubCmd {
    Subscribe(RoomId, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(RoomId),
}

pub struct RedisBroker {
    pool: Pool,
    hub: Arc<Hub>,
    window: usize,
    node: String,
    worker: u16,
    presence_ttl: Duration,
    sub_tx: mpsc::Sender<SubCmd>,
    healthy: Arc<AtomicBool>,
    /// See [`RedisBroker::conn`].
    shared: std::sync::Mutex<Option<MultiplexedConnection>>,
    scripts: Scripts,
    /// The node's receiver of what this broker learns.
    events: std::sync::OnceLock<Arc<dyn Events>>,
}

struct Scripts {
    publish: redis::Script,
    publish_checked: redis::Script,
    recover: redis::Script,
    presence_add: redis::Script,
    presence_list: redis::Script,
    presence_remove: redis::Script,
    presence_sweep: redis::Script,
    pin: redis::Script,
}

impl RedisBroker {
    /// Connects, takes a worker id, and starts the subscriber and presence tasks.
    pub async fn connect(
        url: &str,
        hub: Arc<Hub>,
        window: usize,
        node: String,
        presence_ttl: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        // redis-rs gives up on a reply after 500 ms by default; an fsync stall under
        // `appendfsync always` can last longer than that, and every call here already has its
        // own deadline (CALL_TIMEOUT), so the connection uses the same one.
        let conn_config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_connection_timeout(Some(CALL_TIMEOUT));
        let manager =
            deadpool_redis::Manager::new_with_config(url, conn_config).map_err(unavailable)?;
        let pool = Pool::builder(manager)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let mut conn = tokio::time::timeout(CALL_TIMEOUT, pool.get())
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        let n: u64 = redis::cmd("INCR")
            .arg("chat:worker-seq")
            .query_async(&mut *conn)
            .await
            .map_err(unavailable)?;
        drop(conn);
        let client = redis::Client::open(url).map_err(unavailable)?;
        let (sub_tx, sub_rx) = mpsc::channel(1024);
        let healthy = Arc::new(AtomicBool::new(false));
        let broker = Arc::new(Self {
            pool,
            hub: hub.clone(),
            window,
            node,
            worker: (n % 1024) as u16,
            presence_ttl,
            sub_tx,
            healthy: healthy.clone(),
            shared: std::sync::Mutex::new(None),
            scripts: Scripts {
                publish: redis::Script::new(PUBLISH_LUA),
                publish_checked: redis::Script::new(PUBLISH_CHECKED_LUA),
                recover: redis::Script::new(RECOVER_LUA),
                presence_add: redis::Script::new(PRESENCE_ADD_LUA),
                presence_list: redis::Script::new(PRESENCE_LIST_LUA),
                presence_remove: redis::Script::new(PRESENCE_REMOVE_LUA),
                presence_sweep: redis::Script::new(PRESENCE_SWEEP_LUA),
                pin: redis::Script::new(PIN_LUA),
            },
            events: std::sync::OnceLock::new(),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(subscriber(
            client,
            Arc::downgrade(&broker),
            sub_rx,
            hub,
            healthy,
            ready_tx,
        ));
        tokio::time::timeout(CALL_TIMEOUT, ready_rx)
            .await
            .map_err(|_| unavailable("pub/sub connection timed out"))?
            .map_err(|_| unavailable("pub/sub task ended"))?;
        tokio::spawn(presence_heartbeat(Arc::downgrade(&broker)));
        Ok(broker)
    }

    /// The connection every call goes through: one multiplexed connection, which pipelines
    /// the calls of all sessions (a clone shares it). It comes from the pool, which checks it
    /// (a PING) when handing it out — once, not per call: per call, that check doubled the
    /// round trips and Redis's work per command. A call that finds it broken drops it
    /// ([`Self::outcome`]) and the next call takes a checked one from the pool.
    async fn conn(&self) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(c) = self.shared.lock().expect("redis conn lock").clone() {
            return Ok(c);
        }
        let pooled = match tokio::time::timeout(CALL_TIMEOUT, self.pool.get()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(unavailable("redis pool timed out")),
        };
        let conn: MultiplexedConnection = (*pooled).clone();
        *self.shared.lock().expect("redis conn lock") = Some(conn.clone());
        Ok(conn)
    }

    /// A call's result; a failed or timed-out call drops the shared connection.
    fn outcome<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, BrokerError> {
        let e = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) => {
                return Err(unavailable(e))
            }
            Ok(Err(e)) => unavailable(e),
            Err(_) => unavailable("redis call timed out"),
        };
        *self.shared.lock().expect("redis conn lock") = None;
        Err(e)
    }

    /// Runs a script with a timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        let mut conn = self.conn().await?;
        self.outcome(tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async(&mut conn)).await)
    }

    /// Runs a command with a timeout.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BrokerError> {
        let mut conn = self.conn().await?;
        self.outcome(tokio::time::timeout(CALL_TIMEOUT, cmd.query_async(&mut conn)).await)
    }

    /// Runs a pipeline with a timeout.
    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, BrokerError> {
        let mut conn = self.conn().await?;
        self.outcome(tokio::time::timeout(CALL_TIMEOUT, pipe.query_async(&mut conn)).await)
    }

    fn presence_expiry(&self) -> i64 {
        Timestamp::now().0 + self.presence_ttl.as_millis() as i64
    }

    /// Refreshes this node's presence entries and sweeps expired ones (other nodes' that died);
    /// returns rooms whose online set changed, for `online_users` announcements.
    async fn presence_tick(&self) -> Result<Vec<(RoomId, Vec<String>)>, BrokerError> {
        let expiry = self.presence_expiry();
        let local = self.hub.local_rooms();
        let mut pipe = redis::pipe();
        for (room, _) in &local {
            for user in self.hub.local_users(room) {
                // XX: refresh only; GT: never shorten another refresh.
                pipe.cmd("ZADD")
                    .arg(key(room, "presence"))
                    .arg("XX")
                    .arg("GT")
                    .arg(expiry)
                    .arg(format!("{}\n{}", user.id, self.node))
                    .ignore();
            }
        }
        pipe.cmd("SMEMBERS").arg(PRESENCE_ROOMS);
        let (rooms,): (Vec<String>,) = self.query_pipe(&pipe).await?;
        let now = Timestamp::now().0;
        let mut changed = Vec::new();
        for room in rooms.into_iter().filter_map(|r| RoomId::new(r).ok()) {
            let mut inv = self.scripts.presence_sweep.prepare_invoke();
            inv.key(key(&room, "presence"))
                .key(key(&room, "users"))
                .key(key(&room, "names"))
                .key(PRESENCE_ROOMS)
                .arg(now)
                .arg(room.as_str());
            let gone: Vec<String> = self.invoke(inv).await?;
            if !gone.is_empty() {
                changed.push((room, gone));
            }
        }
        Ok(changed)
    }
}

impl Broker for Arc<RedisBroker> {
    fn worker_id(&self) -> u16 {
        self.worker
    }

    fn report_to(&self, events: Arc<dyn Events>) {
        let _ = self.events.set(events);
    }

    async fn publish_stored(
        &self,
        room: &RoomId,
        frame: &[u8],
        dedupe: Option<Dedupe<'_>>,
        check: StateCheck,
    ) -> Result<Published, BrokerError> {
        let started = std::time::Instant::now();
        let mut inv = self.scripts.publish.prepare_invoke();
        let dd_key = dedupe
            .as_ref()
            .map_or_else(|| key(room, "dd"), |d| key(room, &format!("dd:{}", d.key)));
        let (mode, version) = match check {
            StateCheck::Expect(v) => ("e", v),
            StateCheck::Change(v) => ("c", v),
            StateCheck::Unchecked => ("", 0),
        };
        inv.key(key(room, "seq"))
            .key(key(room, "log"))
            .key(PERSIST_STREAM)
            .key(&dd_key)
            .key(key(room, "state"))
            .arg(frame)
            .arg(self.window)
            .arg(channel(room))
            .arg(if dedupe.is_some() { "1" } else { "0" })
            .arg(
                dedupe
                    .as_ref()
                    .map_or_else(String::new, |d| format!("{}:{}", d.id, d.ts.0)),
            )
            .arg(DEDUPE_TTL_S)
            // ARGV[7]: the publish span's traceparent (empty when not tracing), stored as the
            // persistence entry's `tp` so the history service's write joins the trace.
            .arg(crate::telemetry::current_traceparent().unwrap_or_default())
            .arg(mode)
            .arg(version);
        let (fresh, value): (String, String) = self.invoke(inv).await?;
        crate::telemetry::hot()
            .publish_seconds
            .record(started.elapsed());
        match fresh.as_str() {
            "1" => {
                return Ok(Published::Fresh {
                    seq: value.parse().map_err(unavailable)?,
                })
            }
            "2" => return Err(BrokerError::Stale),
            _ => {}
        }
        // "seq:id:ts" of the first publication
        let mut parts = value.splitn(3, ':').map(|p| p.parse::<u64>().ok());
        match (
            parts.next().flatten(),
            parts.next().flatten(),
            parts.next().flatten(),
        ) {
            (Some(seq), Some(id), Some(ts)) => Ok(Published::Duplicate {
                seq,
                id: proto::MessageId(id),
                ts: Timestamp(ts as i64),
            }),
            _ => Err(unavailable("corrupt dedupe entry")),
        }
    }

    async fn publish_ephemeral(
        &self,
        room: &RoomId,
        frame: Bytes,
        expect: Option<StateVersion>,
    ) -> Result<(), BrokerError> {
        if let Some(v) = expect {
            let mut inv = self.scripts.publish_checked.prepare_invoke();
            inv.key(key(room, "state"))
                .arg(v)
                .arg(channel(room))
                .arg(&frame[..]);
            let published: i64 = self.invoke(inv).await?;
            return if published == 1 {
                Ok(())
            } else {
                Err(BrokerError::Stale)
            };
        }
        let publish = redis::cmd("PUBLISH")
            .arg(channel(room))
            .arg(&frame[..])
            .clone();
        self.query::<i64>(&publish).await.map(drop)
    }

    async fn publish_node(&self, target: NodeTarget<'_>, frame: Bytes) -> Result<(), BrokerError> {
        let payload = NodeMessage {
            target,
            frame: &frame,
        }
        .encode();
        let publish = redis::cmd("PUBLISH").arg(NODE_CHANNEL).arg(payload).clone();
        self.query::<i64>(&publish).await.map(drop)
    }

    async fn persist(&self, frame: Bytes) -> Result<(), BrokerError> {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(PERSIST_STREAM).arg("*").arg("f").arg(&frame[..]);
        if let Some(tp) = crate::telemetry::current_traceparent() {
            xadd.arg("tp").arg(tp);
        }
        self.query::<String>(&xadd).await.map(drop)
    }

    async fn subscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.sub_tx
            .send(SubCmd::Subscribe(room.clone(), tx))
            .await
            .map_err(|_| unavailable("subscriber stopped"))?;
        tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .map_err(|_| unavailable("subscribe timed out"))?
            .map_err(|_| unavailable("subscriber stopped"))?
    }

    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        self.sub_tx
            .send(SubCmd::Unsubscribe(room.clone()))
            .await
            .map_err(|_| unavailable("subscriber stopped"))
    }

    async fn state_version(&self, room: &RoomId) -> Result<StateVersion, BrokerError> {
        let get = redis::cmd("GET").arg(key(room, "state")).clone();
        let v: Option<StateVersion> = self.query(&get).await?;
        Ok(v.unwrap_or(0))
    }

    async fn recover(&self, room: &RoomId, since: Option<u64>) -> Result<Recovery, BrokerError> {
        let mut inv = self.scripts.recover.prepare_invoke();
        inv.key(key(room, "seq"))
            .key(key(room, "log"))
            .key(key(room, "state"))
            .key(key(room, "pins"))
            .arg(since.map_or(-1, |s| s as i64))
            .arg(self.window);
        let out: Vec<Vec<u8>> = self.invoke(inv).await?;
        let num = |b: Option<&Vec<u8>>| -> Result<u64, BrokerError> {
            std::str::from_utf8(b.ok_or_else(|| unavailable("short reply"))?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| unavailable("bad reply"))
        };
        let last_seq = num(out.first())?;
        let version = num(out.get(1))?;
        let pins = match out.get(2).map(Vec::as_slice) {
            Some(b"-") => None,
            Some(list) => Some(
                std::str::from_utf8(list)
                    .map_err(unavailable)?
                    .split(',')
                    .filter(|id| !id.is_empty())
                    .map(|id| id.parse().map(MessageId).map_err(unavailable))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => return Err(unavailable("short reply")),
        };
        let Some(since) = since else {
            return Ok(Recovery {
                last_seq,
                version,
                pins,
                events: vec![],
                complete: true,
            });
        };
        let mut events = Vec::with_capacity(out.len().saturating_sub(3));
        for frame in out.into_iter().skip(3) {
            let seq = bus::peek(&frame).map_or(0, |p| p.seq);
            events.push((seq, Bytes::from(frame)));
        }
        // Complete when the replay runs from `since` up to the last seq: the stream's ids are
        // the seqs, so `last - since` events after `since` are exactly since+1..=last. (The
        // stream's oldest entry does not tell: `MAXLEN ~` trims approximately, so the stream
        // can reach further back than the `window` events one read returns, and a replay cut
        // there would leave out the newest events while the session counts them as seen.)
        // A `since` past the last seq comes from before Redis lost the room: not recovered.
        let complete = since <= last_seq && events.len() as u64 == last_seq - since;
        Ok(Recovery {
            last_seq,
            version,
            pins,
            events,
            complete,
        })
    }

    async fn presence_add(
        &self,
        room: &RoomId,
        user: &UserRef,
        list: usize,
    ) -> Result<(bool, Online), BrokerError> {
        let mut inv = self.scripts.presence_add.prepare_invoke();
        inv.key(key(room, "presence"))
            .key(key(room, "users"))
            .key(key(room, "names"))
            .key(PRESENCE_ROOMS)
            .arg(&user.id)
            .arg(&self.node)
            .arg(self.presence_expiry())
            .arg(&user.name)
            .arg(list)
            .arg(room.as_str());
        let out = parse_list(&self.invoke::<String>(inv).await?)?;
        let first = out.first().is_some_and(|f| f == "1");
        let online = parse_online(out.get(1..).unwrap_or_default())?;
        Ok((first, online))
    }

    async fn presence_remove(&self, room: &RoomId, user: &str) -> Result<Option<u64>, BrokerError> {
        // Another local connection of the same user keeps the node's entry.
        if !self.hub.sessions_in(room, user).is_empty() {
            return Ok(None);
        }
        let mut inv = self.scripts.presence_remove.prepare_invoke();
        inv.key(key(room, "presence"))
            .key(key(room, "users"))
            .key(key(room, "names"))
            .arg(user)
            .arg(&self.node);
        let (gone, count): (String, u64) = self.invoke(inv).await?;
        Ok((gone == "1").then_some(count))
    }

    async fn presence(&self, room: &RoomId, list: usize) -> Result<Online, BrokerError> {
        let mut inv = self.scripts.presence_list.prepare_invoke();
        inv.key(key(room, "names")).arg(list);
        parse_online(&parse_list(&self.invoke::<String>(inv).await?)?)
    }

    async fn pin_set(
        &self,
        room: &RoomId,
        id: MessageId,
        change: PinChange,
        max: usize,
        stored: Option<&[MessageId]>,
        check: StateCheck,
    ) -> Result<PinOutcome, BrokerError> {
        let mut inv = self.scripts.pin.prepare_invoke();
        inv.key(key(room, "pins"))
            .key(key(room, "state"))
            .arg(match change {
                PinChange::Pin => "pin",
                PinChange::Unpin => "unpin",
            })
            .arg(id.0)
            .arg(max)
            .arg(if stored.is_some() { "1" } else { "0" })
            .arg(match check {
                StateCheck::Expect(v) => v.to_string(),
                _ => String::new(),
            });
        for s in stored.unwrap_or_default() {
            inv.arg(s.0);
        }
        let out: String = self.invoke(inv).await?;
        Ok(match out.as_str() {
            "stale" => return Err(BrokerError::Stale),
            "done" => PinOutcome::Done,
            "pinned" => PinOutcome::AlreadyPinned,
            "full" => PinOutcome::Full,
            _ => PinOutcome::NotPinned,
        })
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// A presence script's JSON-encoded list of strings.
fn parse_list(json: &str) -> Result<Vec<String>, BrokerError> {
    serde_json::from_str(json).map_err(unavailable)
}

/// Reads a presence script's `count, id, name, ...` reply.
fn parse_online(out: &[String]) -> Result<Online, BrokerError> {
    let (count, pairs) = out
        .split_first()
        .ok_or_else(|| unavailable("short reply"))?;
    let mut users: Vec<UserRef> = pairs
        .chunks_exact(2)
        .map(|p| UserRef {
            id: p[0].clone(),
            name: p[1].clone(),
        })
        .collect();
    users.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Online {
        count: count.parse().map_err(unavailable)?,
        users,
    })
}

/// Refreshes presence every third of its TTL; announces users whose node died.
async fn presence_heartbeat(broker: std::sync::Weak<RedisBroker>) {
    loop {
        let ttl = match broker.upgrade() {
            Some(b) => b.presence_ttl,
            None => return,
        };
        tokio::time::sleep(ttl / 3).await;
        let Some(b) = broker.upgrade() else { return };
        match b.presence_tick().await {
            Ok(changed) => {
                if let Some(events) = b.events.get() {
                    for (room, gone) in changed {
                        events.presence_expired(&room, gone);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "presence refresh failed"),
        }
    }
}

/// The node's pub/sub connection: subscribes as told, delivers into the hub, and on a lost
/// connection reconnects with backoff, resubscribes every local room and fills each room's
/// gap from its window.
async fn subscriber(
    client: redis::Client,
    broker: std::sync::Weak<RedisBroker>,
    mut cmds: mpsc::Receiver<SubCmd>,
    hub: Arc<Hub>,
    healthy: Arc<AtomicBool>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    // Last seq delivered per subscribed room (since the subscription began).
    let mut last: HashMap<RoomId, u64> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let conn = tokio::time::timeout(CALL_TIMEOUT, client.get_async_pubsub()).await;
        let (mut sink, mut stream) = match conn {
            Ok(Ok(c)) => c.split(),
            _ => {
                healthy.store(false, Ordering::Relaxed);
                tracing::warn!(?backoff, "redis pub/sub unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut channels: Vec<String> = vec![NODE_CHANNEL.to_string()];
        let rooms: Vec<RoomId> = hub.local_rooms().into_iter().map(|(r, _)| r).collect();
        channels.extend(rooms.iter().map(channel));
        if sink.subscribe(&channels).await.is_err() {
            tokio::time::sleep(backoff).await;
            continue;
        }
        // Rooms whose SUBSCRIBE Redis confirmed on this connection.
        let mut subscribed: HashSet<RoomId> = rooms.iter().cloned().collect();
        // Events published while we were away: fetch them before any live one, from the
        // lowest seq a local session has (the hub drops what a session already got). Joins
        // that had not recorded their seq yet are closed: they may have read it before the
        // loss (see `Hub::resume_point`).
        last.clear();
        let Some(b) = broker.upgrade() else { return };
        for room in &rooms {
            if let Some(seen) = hub.resume_point(room) {
                catch_up(&b, &hub, room, seen, &mut last).await;
            }
        }
        // Room-state changes announced while the connection was down were missed.
        if let Some(events) = b.events.get() {
            events.reconnected();
        }
        drop(b);
        healthy.store(true, Ordering::Relaxed);
        backoff = Duration::from_millis(100);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        tracing::info!(rooms = rooms.len(), "redis pub/sub connected");

        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(SubCmd::Subscribe(room, done)) => {
                        // Commands run in order: once an earlier SUBSCRIBE of this room was
                        // confirmed, the channel is live for this joiner too.
                        if subscribed.contains(&room) {
                            let _ = done.send(Ok(()));
                            continue;
                        }
                        let r = sink.subscribe(channel(&room)).await.map_err(unavailable);
                        let failed = r.is_err();
                        let _ = done.send(r);
                        if failed {
                            break;
                        }
                        subscribed.insert(room);
                    }
                    Some(SubCmd::Unsubscribe(room)) => {
                        // A join may have raced the leave: keep the channel while anyone is local.
                        if hub.sessions_count(&room) == 0 {
                            last.remove(&room);
                            subscribed.remove(&room);
                            if sink.unsubscribe(channel(&room)).await.is_err() {
                                break;
                            }
                        }
                    }
                },
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    // Everything the connection already read, as one batch: delivered corked,
                    // each session's frames of the batch go out in one write.
                    let mut batch = VecDeque::from([msg]);
                    while batch.len() < READ_BATCH {
                        match stream.next().now_or_never() {
                            Some(Some(m)) => batch.push_back(m),
                            _ => break,
                        }
                    }
                    let Some(b) = broker.upgrade() else { return };
                    while !batch.is_empty() {
                        // A gap needs an await (the window read): the cork ends before it.
                        let gap = crate::cork::corked(|| {
                            while let Some(msg) = batch.pop_front() {
                                if let Some(gap) = route(&b, &hub, &mut last, &msg) {
                                    return Some(gap);
                                }
                            }
                            None
                        });
                        if let Some(Gap { room, seen, seq, frame }) = gap {
                            catch_up(&b, &hub, &room, seen, &mut last).await;
                            if last.get(&room).is_none_or(|s| seq > *s) {
                                last.insert(room.clone(), seq);
                                hub.deliver(&room, seq, &frame, None);
                            }
                        }
                    }
                }
            }
        }
        healthy.store(false, Ordering::Relaxed);
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

/// Pub/sub messages delivered as one batch at most (see the subscriber).
const READ_BATCH: usize = 256;

/// A room event that arrived after a gap in its room's seqs: the gap is filled from the
/// window first.
struct Gap {
    room: RoomId,
    seen: u64,
    seq: u64,
    frame: Bytes,
}

/// Delivers one pub/sub message into this node, or returns the gap that must be filled first.
fn route(
    b: &Arc<RedisBroker>,
    hub: &Hub,
    last: &mut HashMap<RoomId, u64>,
    msg: &redis::Msg,
) -> Option<Gap> {
    let payload = msg.get_payload_bytes();
    if msg.get_channel_name() == NODE_CHANNEL {
        match NodeMessage::decode(payload) {
            Some(NodeMessage {
                target: NodeTarget::All,
                frame,
            }) => hub.deliver_all(&Bytes::copy_from_slice(frame)),
            Some(NodeMessage {
                target: NodeTarget::User(u),
                frame,
            }) => hub.deliver_user(u, &Bytes::copy_from_slice(frame)),
            Some(NodeMessage {
                target: NodeTarget::Disconnect(u),
                frame,
            }) => hub.disconnect_user(u, &String::from_utf8_lossy(frame)),
            Some(NodeMessage {
                target: NodeTarget::RoomState(r),
                frame,
            }) => {
                if let (Ok(room), Some(events)) = (RoomId::new(r), b.events.get()) {
                    events.room_state_changed(&room, frame);
                }
            }
            None => tracing::warn!("undecodable node message"),
        }
        return None;
    }
    let room = room_of_channel(msg.get_channel_name())?;
    let Some(peek) = bus::peek(payload) else {
        tracing::warn!(%room, "undecodable room frame");
        return None;
    };
    let frame = Bytes::copy_from_slice(payload);
    if peek.seq == 0 {
        hub.deliver(&room, 0, &frame, bus::excluded_user(&peek));
        return None;
    }
    match last.get(&room).copied() {
        Some(seen) if peek.seq <= seen => return None, // already delivered by a catch-up
        Some(seen) if peek.seq > seen + 1 => {
            return Some(Gap {
                room,
                seen,
                seq: peek.seq,
                frame,
            })
        }
        _ => {}
    }
    last.insert(room.clone(), peek.seq);
    hub.deliver(&room, peek.seq, &frame, None);
    None
}

/// Delivers a room's events after `seen` from its window; when the window no longer reaches
/// back that far, closes the room's local sessions (1012) so their clients recover.
async fn catch_up(
    b: &Arc<RedisBroker>,
    hub: &Hub,
    room: &RoomId,
    seen: u64,
    last: &mut HashMap<RoomId, u64>,
) {
    match Broker::recover(b, room, Some(seen)).await {
        Ok(rec) if rec.complete => {
            if rec.last_seq > seen {
                tracing::info!(%room, seen, last = rec.last_seq, "filling a gap from the window");
            }
            for (seq, frame) in rec.events {
                if seq > seen {
                    hub.deliver(room, seq, &frame, None);
                }
            }
            // The live events still queued on the connection up to here were just delivered.
            last.insert(room.clone(), rec.last_seq.max(seen));
        }
        Ok(rec) => {
            tracing::warn!(%room, seen, last = rec.last_seq, "gap beyond the recovery window; closing local sessions");
            hub.close_room(room, proto::errors::close::RESTARTING);
            last.insert(room.clone(), rec.last_seq);
        }
        Err(e) => {
            // Delivering newer events now would skip the gap for good: make the room's
            // clients reconnect and recover from the window (or history) instead.
            tracing::warn!(error = %e, %room, seen, "catch-up failed; closing local sessions");
            hub.close_room(room, proto::errors::close::RESTARTING);
            last.remove(room);
        }
    }
}
