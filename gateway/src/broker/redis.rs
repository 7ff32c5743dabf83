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
//!   `chat:presence-rooms` (set) lists rooms to sweep.
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::{Pool, Runtime};
use futures_util::StreamExt;
use proto::envelope::{NodeMessage, NodeTarget};
use proto::{MessageId, RoomId, Timestamp, UserRef};
use tokio::sync::{mpsc, oneshot};

use super::{
    Broker, BrokerError, Dedupe, Events, PinChange, PinOutcome, Published, Recovery, StateCheck,
    StateVersion,
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

/// KEYS: seq, log, state version. Returns {last seq, state version, up to ARGV[2] frames after
/// ARGV[1]...}.
const RECOVER_LUA: &str = r#"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
local out = {tostring(last), redis.call('GET', KEYS[3]) or '0'}
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

const PRESENCE_ADD_LUA: &str = r#"
local added = redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1] .. '\n' .. ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
if added == 1 then
  return redis.call('HINCRBY', KEYS[2], ARGV[1], 1) == 1 and 1 or 0
end
return 0
"#;

const PRESENCE_REMOVE_LUA: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1] .. '\n' .. ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    return 1
  end
end
return 0
"#;

/// Removes presence entries whose node stopped refreshing them; returns users now offline.
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
    scripts: Scripts,
    /// The node's receiver of what this broker learns.
    events: std::sync::OnceLock<Arc<dyn Events>>,
}

struct Scripts {
    publish: redis::Script,
    publish_checked: redis::Script,
    recover: redis::Script,
    presence_add: redis::Script,
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
            scripts: Scripts {
                publish: redis::Script::new(PUBLISH_LUA),
                publish_checked: redis::Script::new(PUBLISH_CHECKED_LUA),
                recover: redis::Script::new(RECOVER_LUA),
                presence_add: redis::Script::new(PRESENCE_ADD_LUA),
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

    async fn conn(&self) -> Result<deadpool_redis::Connection, BrokerError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.pool.get()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("redis pool timed out")),
        }
    }

    /// Runs a script with a timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        let mut conn = self.conn().await?;
        tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async(&mut *conn))
            .await
            .map_err(|_| unavailable("redis call timed out"))?
            .map_err(unavailable)
    }

    fn presence_expiry(&self) -> i64 {
        Timestamp::now().0 + self.presence_ttl.as_millis() as i64
    }

    /// Refreshes this node's presence entries and sweeps expired ones (other nodes' that died);
    /// returns rooms whose online set changed, for `online_users` announcements.
    async fn presence_tick(&self) -> Result<Vec<(RoomId, Vec<String>)>, BrokerError> {
        let expiry = self.presence_expiry();
        let local = self.hub.local_rooms();
        let mut conn = self.conn().await?;
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
        let (rooms,): (Vec<String>,) =
            tokio::time::timeout(CALL_TIMEOUT, pipe.query_async(&mut *conn))
                .await
                .map_err(|_| unavailable("redis call timed out"))?
                .map_err(unavailable)?;
        drop(conn);
        let now = Timestamp::now().0;
        let mut changed = Vec::new();
        for room in rooms.into_iter().filter_map(|r| RoomId::new(r).ok()) {
            let mut inv = self.scripts.presence_sweep.prepare_invoke();
            inv.key(key(&room, "presence"))
                .key(key(&room, "users"))
                .key(key(&room, "names"))
                .arg(now);
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
        metrics::histogram!("chat_broker_publish_seconds").record(started.elapsed());
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
        let mut conn = self.conn().await?;
        let r: Result<i64, _> = tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(channel(room))
                .arg(&frame[..])
                .query_async(&mut *conn),
        )
        .await
        .map_err(|_| unavailable("redis call timed out"))?;
        r.map(|_| ()).map_err(unavailable)
    }

    async fn publish_node(&self, target: NodeTarget<'_>, frame: Bytes) -> Result<(), BrokerError> {
        let payload = NodeMessage {
            target,
            frame: &frame,
        }
        .encode();
        let mut conn = self.conn().await?;
        let r: Result<i64, _> = tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(NODE_CHANNEL)
                .arg(payload)
                .query_async(&mut *conn),
        )
        .await
        .map_err(|_| unavailable("redis call timed out"))?;
        r.map(|_| ()).map_err(unavailable)
    }

    async fn persist(&self, frame: Bytes) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(PERSIST_STREAM).arg("*").arg("f").arg(&frame[..]);
        if let Some(tp) = crate::telemetry::current_traceparent() {
            xadd.arg("tp").arg(tp);
        }
        let r: Result<String, _> = tokio::time::timeout(CALL_TIMEOUT, xadd.query_async(&mut *conn))
            .await
            .map_err(|_| unavailable("redis call timed out"))?;
        r.map(|_| ()).map_err(unavailable)
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
        let mut conn = self.conn().await?;
        let v: Option<StateVersion> = tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("GET")
                .arg(key(room, "state"))
                .query_async(&mut *conn),
        )
        .await
        .map_err(|_| unavailable("redis call timed out"))?
        .map_err(unavailable)?;
        Ok(v.unwrap_or(0))
    }

    async fn recover(&self, room: &RoomId, since: Option<u64>) -> Result<Recovery, BrokerError> {
        let mut inv = self.scripts.recover.prepare_invoke();
        inv.key(key(room, "seq"))
            .key(key(room, "log"))
            .key(key(room, "state"))
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
        let Some(since) = since else {
            return Ok(Recovery {
                last_seq,
                version,
                events: vec![],
                complete: true,
            });
        };
        let mut events = Vec::with_capacity(out.len().saturating_sub(2));
        for frame in out.into_iter().skip(2) {
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
            events,
            complete,
        })
    }

    async fn presence_add(&self, room: &RoomId, user: &UserRef) -> Result<bool, BrokerError> {
        let mut inv = self.scripts.presence_add.prepare_invoke();
        inv.key(key(room, "presence"))
            .key(key(room, "users"))
            .key(key(room, "names"))
            .arg(&user.id)
            .arg(&self.node)
            .arg(self.presence_expiry())
            .arg(&user.name);
        let first: i64 = self.invoke(inv).await?;
        let mut conn = self.conn().await?;
        let _: Result<i64, _> = redis::cmd("SADD")
            .arg(PRESENCE_ROOMS)
            .arg(room.as_str())
            .query_async(&mut *conn)
            .await;
        Ok(first == 1)
    }

    async fn presence_remove(&self, room: &RoomId, user: &str) -> Result<bool, BrokerError> {
        // Another local connection of the same user keeps the node's entry.
        if !self.hub.sessions_in(room, user).is_empty() {
            return Ok(false);
        }
        let mut inv = self.scripts.presence_remove.prepare_invoke();
        inv.key(key(room, "presence"))
            .key(key(room, "users"))
            .key(key(room, "names"))
            .arg(user)
            .arg(&self.node);
        let gone: i64 = self.invoke(inv).await?;
        Ok(gone == 1)
    }

    async fn presence(&self, room: &RoomId) -> Result<Vec<UserRef>, BrokerError> {
        let mut conn = self.conn().await?;
        let names: HashMap<String, String> = tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("HGETALL")
                .arg(key(room, "names"))
                .query_async(&mut *conn),
        )
        .await
        .map_err(|_| unavailable("redis call timed out"))?
        .map_err(unavailable)?;
        let mut users: Vec<UserRef> = names
            .into_iter()
            .map(|(id, name)| UserRef { id, name })
            .collect();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(users)
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
                    let payload = msg.get_payload_bytes();
                    if msg.get_channel_name() == NODE_CHANNEL {
                        match NodeMessage::decode(payload) {
                            Some(NodeMessage { target: NodeTarget::All, frame }) => hub.deliver_all(&Bytes::copy_from_slice(frame)),
                            Some(NodeMessage { target: NodeTarget::User(u), frame }) => hub.deliver_user(u, &Bytes::copy_from_slice(frame)),
                            Some(NodeMessage { target: NodeTarget::Disconnect(u), frame }) => hub.disconnect_user(u, &String::from_utf8_lossy(frame)),
                            Some(NodeMessage { target: NodeTarget::RoomState(r), frame }) => {
                                // The frame names the announcing node; it updated its own cache.
                                let Some(b) = broker.upgrade() else { return };
                                let own = frame == b.worker.to_string().as_bytes();
                                if let (false, Ok(room), Some(events)) = (own, RoomId::new(r), b.events.get()) {
                                    events.room_state_changed(&room);
                                }
                            }
                            None => tracing::warn!("undecodable node message"),
                        }
                        continue;
                    }
                    let Some(room) = room_of_channel(msg.get_channel_name()) else { continue };
                    let Some(peek) = bus::peek(payload) else {
                        tracing::warn!(%room, "undecodable room frame");
                        continue;
                    };
                    let frame = Bytes::copy_from_slice(payload);
                    if peek.seq == 0 {
                        hub.deliver(&room, 0, &frame, bus::excluded_user(&peek));
                        continue;
                    }
                    match last.get(&room).copied() {
                        Some(seen) if peek.seq <= seen => continue, // already delivered by a catch-up
                        Some(seen) if peek.seq > seen + 1 => {
                            let Some(b) = broker.upgrade() else { return };
                            catch_up(&b, &hub, &room, seen, &mut last).await;
                            if last.get(&room).is_some_and(|s| peek.seq <= *s) {
                                continue;
                            }
                        }
                        _ => {}
                    }
                    last.insert(room.clone(), peek.seq);
                    hub.deliver(&room, peek.seq, &frame, None);
                }
            }
        }
        healthy.store(false, Ordering::Relaxed);
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
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
