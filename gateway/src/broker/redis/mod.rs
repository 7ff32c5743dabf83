//! The Redis broker: many gateway nodes, one Redis primary or a Redis Cluster
//! (`history_service::redis_conn` builds the connections from the settings).
//!
//! # Keys
//! Rooms are spread over partitions (`CHAT_REDIS_PARTITIONS`, a stable hash of the room id:
//! `history_service::partitions`). Every key of a room carries its partition's hash tag, as do
//! the partition's persistence stream and epoch, so that everything one publish touches is in
//! one cluster slot ([`keys`]):
//! - `chat:{pN}:r:<room>:seq` — the room's seq counter (INCR); `…:ep` — the epoch it was
//!   seeded in; `…:floor` — no seq at or below it may be handed out again (see [`epochs`]).
//! - `…:log` — recovery window: a stream capped near `window` entries whose ids are
//!   `<seq>-1`, so `since` maps straight to a range.
//! - `…:dd:<user>/<client_msg_id>` — idempotency keys (10 minutes).
//! - `chat:{pN}:r:<room>` — the room's sharded pub/sub channel (SPUBLISH/SSUBSCRIBE): on a
//!   cluster a message goes only through the shard that owns its room. `chat:nodes` (classic
//!   pub/sub, which a cluster forwards to every node) carries node-targeted frames.
//! - `…:presence` (zset `user\nnode` → expiry ms), `…:users` (hash user → nodes holding
//!   them), `…:names` (hash user → display name); `chat:{pN}:presence-rooms` lists the
//!   partition's rooms to sweep.
//! - `…:state` — the room's state version (see [`super::StateCheck`]): set by the publish of
//!   every room-state event, compared by checked publishes, pins and typing.
//! - `…:pins` — the room's pin set, which decides pins and unpins before their events are
//!   published ([`Broker::pin_set`]).
//! - `chat:{pN}:persist` — the partition's persistence stream, consumed by the history
//!   service. Entries: `f` = the frame, and `tp` = the publisher's W3C traceparent when traces
//!   are exported. `chat:{pN}:epoch` — the partition's epoch ([`epochs`]).
//!
//! # Why one script per publish
//! The epoch check, the state check, INCR, the window append, the persistence append and
//! SPUBLISH run in one Lua script ([`scripts::PUBLISH`]): Redis runs it atomically, so seq is
//! gapless, every subscriber sees events in seq order, an event is in the persistence stream
//! before anyone is acknowledged, and a command decided on an outdated room state never gets
//! published.
//!
//! # What an acknowledgement means
//! The publisher is acknowledged once the script ran on the primary. Redis replicates
//! asynchronously, and a Redis that restarts without persistence loses everything, so the
//! node keeps what it published until the history service stored it ([`sent`]); when Redis
//! loses a partition's data, the epoch machinery ([`epochs`]) notices, numbers the partition's
//! rooms on above anything seen, and appends the kept events again. With
//! `CHAT_REDIS_WAIT_REPLICAS=N` the acknowledgement also waits until N replicas have the
//! event (`WAIT`), so a failover to one of them loses nothing acknowledged even when the
//! publishing node dies with the primary.
//!
//! # Subscriber
//! One pub/sub connection per primary ([`subscriber`]). It keeps each room's last delivered
//! seq: a live event that skips seqs, or a subscription that was lost and made again, makes
//! it fetch the missing events from the room's window first, so local delivery stays gapless
//! and in order. Rooms whose gap is no longer in the window get their sessions closed with
//! 1012, and the clients recover from history.

mod epochs;
mod keys;
mod scripts;
mod sent;
mod subscriber;
mod waits;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use history_service::redis_conn::Redis;
use history_service::redis_settings::RedisSettings;
use history_service::redis_up::RedisUp;
use history_service::AnyStore;
use proto::envelope::{NodeMessage, NodeTarget};
use proto::{MessageId, RoomId, Timestamp, UserRef};
use tokio::sync::{mpsc, oneshot};

use super::{
    Broker, BrokerError, Dedupe, Events, Online, PinChange, PinOutcome, Published, Recovery,
    StateCheck, StateVersion,
};
use crate::bus;
use crate::hub::Hub;
use keys::RoomKeys;
use scripts::Scripts;
use sent::{EntryId, Sent, SentLog};
use subscriber::SubCmd;
use waits::Waits;

const NODE_CHANNEL: &str = "chat:nodes";
const DEDUPE_TTL_S: u64 = 600;
/// Every Redis call gives up after this; the command answers `unavailable`.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Command connections (multiplexed): publishes spread over them, so that one `WAIT` holds up
/// only the commands queued behind it on its own connection.
const CONNECTIONS: usize = 4;
/// Published events a node keeps at most until the store has them ([`sent`]).
const SENT_MAX: usize = 200_000;
/// How long a join from before a reset waits for the history service to store what was
/// appended again (then it answers with what history has).
const AWAIT_HISTORY: Duration = Duration::from_secs(3);

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

pub struct RedisBroker {
    settings: RedisSettings,
    conns: Vec<Redis>,
    next_conn: AtomicUsize,
    hub: Arc<Hub>,
    /// The store: what it holds decides where a room's numbering goes on after a reset.
    store: Arc<AnyStore>,
    window: usize,
    node: String,
    worker: u16,
    presence_ttl: Duration,
    sub_tx: mpsc::Sender<SubCmd>,
    healthy: Arc<RedisUp>,
    scripts: Scripts,
    /// What this node published, until the store has it.
    sent: SentLog,
    /// `WAIT`s shared by the publishes they cover.
    waits: Waits,
    /// Each partition's epoch as this node last saw it ([`epochs`]).
    epochs: Mutex<HashMap<u16, Arc<str>>>,
    /// Each primary's replication id as last seen: a new one means a restart or a failover.
    replids: Mutex<HashMap<String, String>>,
    /// The node's receiver of what this broker learns.
    events: std::sync::OnceLock<Arc<dyn Events>>,
}

impl RedisBroker {
    /// Connects, checks the partition count, takes a worker id, and starts the subscriber,
    /// presence and epoch tasks.
    pub async fn connect(
        settings: RedisSettings,
        hub: Arc<Hub>,
        store: Arc<AnyStore>,
        window: usize,
        node: String,
        presence_ttl: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        let mut conns = Vec::with_capacity(CONNECTIONS);
        // A publish's WAIT may take its whole timeout on top of the call.
        let response = CALL_TIMEOUT + settings.wait_timeout;
        for _ in 0..CONNECTIONS {
            conns.push(settings.connect_with(response).await.map_err(unavailable)?);
        }
        let mut conn = conns[0].clone();
        check_partitions(&mut conn, settings.partitions).await?;
        let n: u64 = call(redis::cmd("INCR").arg("chat:worker-seq"), &mut conn).await?;
        let (sub_tx, sub_rx) = mpsc::channel(1024);
        let healthy = Arc::new(RedisUp::default());
        let broker = Arc::new(Self {
            sent: SentLog::new(settings.partitions, SENT_MAX),
            waits: Waits::new(CONNECTIONS, settings.partitions),
            settings,
            conns,
            next_conn: AtomicUsize::new(0),
            hub: hub.clone(),
            store,
            window,
            node,
            worker: (n % 1024) as u16,
            presence_ttl,
            sub_tx,
            healthy: healthy.clone(),
            scripts: Scripts::new(),
            epochs: Mutex::default(),
            replids: Mutex::default(),
            events: std::sync::OnceLock::new(),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(subscriber::run(
            Arc::downgrade(&broker),
            sub_rx,
            hub,
            healthy,
            ready_tx,
        ));
        tokio::time::timeout(CALL_TIMEOUT * 2, ready_rx)
            .await
            .map_err(|_| unavailable("pub/sub connection timed out"))?
            .map_err(|_| unavailable("pub/sub task ended"))?;
        tokio::spawn(presence_heartbeat(Arc::downgrade(&broker)));
        tokio::spawn(epochs::watch(Arc::downgrade(&broker)));
        Ok(broker)
    }

    /// A command connection (they are multiplexed; publishes take turns).
    fn conn(&self) -> Redis {
        self.numbered_conn().1
    }

    /// A command connection and its number (a publish's `WAIT` goes over the connection that
    /// wrote, see [`waits`]).
    fn numbered_conn(&self) -> (usize, Redis) {
        let i = self.next_conn.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        (i, self.conns[i].clone())
    }

    fn partitions(&self) -> u16 {
        self.settings.partitions
    }

    fn keys(&self, room: &RoomId) -> RoomKeys {
        RoomKeys::new(room, self.partitions())
    }

    /// Runs a script with a timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        conn: &mut Redis,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async(conn))
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
        // One pipeline per partition: its keys share a slot.
        let mut by_partition: BTreeMap<u16, Vec<RoomKeys>> = BTreeMap::new();
        for (room, _) in self.hub.local_rooms() {
            let keys = self.keys(&room);
            let users = self.hub.local_users(&room);
            if !users.is_empty() {
                by_partition.entry(keys.partition).or_default().push(keys);
            }
        }
        for (_, rooms) in by_partition {
            let mut pipe = redis::pipe();
            for keys in &rooms {
                let Some(room) = keys::room_of_channel(keys.channel().as_bytes()) else {
                    continue;
                };
                for user in self.hub.local_users(&room) {
                    // XX: refresh only; GT: never shorten another refresh.
                    pipe.cmd("ZADD")
                        .arg(keys.key("presence"))
                        .arg("XX")
                        .arg("GT")
                        .arg(expiry)
                        .arg(format!("{}\n{}", user.id, self.node))
                        .ignore();
                }
            }
            let _: () = tokio::time::timeout(CALL_TIMEOUT, pipe.query_async(&mut self.conn()))
                .await
                .map_err(|_| unavailable("redis call timed out"))?
                .map_err(unavailable)?;
        }
        let now = Timestamp::now().0;
        let mut changed = Vec::new();
        for p in 0..self.partitions() {
            let rooms: Vec<String> = call(
                redis::cmd("SMEMBERS").arg(keys::presence_rooms(p)),
                &mut self.conn(),
            )
            .await?;
            for room in rooms.into_iter().filter_map(|r| RoomId::new(r).ok()) {
                let keys = self.keys(&room);
                let mut inv = self.scripts.presence_sweep.prepare_invoke();
                inv.key(keys.key("presence"))
                    .key(keys.key("users"))
                    .key(keys.key("names"))
                    .key(keys.presence_rooms())
                    .arg(now)
                    .arg(room.as_str());
                let gone: Vec<String> = self.invoke(&mut self.conn(), inv).await?;
                if !gone.is_empty() {
                    changed.push((room, gone));
                }
            }
        }
        Ok(changed)
    }

    /// With `CHAT_REDIS_WAIT_REPLICAS`, waits until that many replicas have what `conn` wrote
    /// to the partition of `keys`.
    async fn replicated(
        &self,
        (i, conn): &mut (usize, Redis),
        keys: &RoomKeys,
    ) -> Result<(), BrokerError> {
        let want = self.settings.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let got = self
            .waits
            .replicas(
                *i,
                conn,
                keys.partition,
                &keys.persist(),
                want,
                self.settings.wait_timeout,
            )
            .await
            .map_err(unavailable)?;
        metrics::histogram!("chat_broker_wait_seconds").record(started.elapsed());
        if got < want {
            metrics::counter!("chat_broker_wait_short_total").increment(1);
            return Err(unavailable(format!(
                "only {got} of {want} replicas have the event"
            )));
        }
        Ok(())
    }
}

/// Runs one command with the call timeout.
async fn call<T: redis::FromRedisValue>(
    cmd: &redis::Cmd,
    conn: &mut Redis,
) -> Result<T, BrokerError> {
    tokio::time::timeout(CALL_TIMEOUT, cmd.query_async(conn))
        .await
        .map_err(|_| unavailable("redis call timed out"))?
        .map_err(unavailable)
}

/// Every process of a deployment must count partitions alike: the first one records its
/// count, the others compare.
async fn check_partitions(conn: &mut Redis, partitions: u16) -> Result<(), BrokerError> {
    let before: Option<u16> = call(
        redis::cmd("SET")
            .arg(history_service::partitions::COUNT_KEY)
            .arg(partitions)
            .arg("NX")
            .arg("GET"),
        conn,
    )
    .await?;
    match before {
        Some(n) if n != partitions => Err(BrokerError::Unavailable(format!(
            "CHAT_REDIS_PARTITIONS is {partitions} but this Redis is used with {n} partitions"
        ))),
        _ => Ok(()),
    }
}

/// Reads a script's reply fields.
fn field<T: std::str::FromStr>(reply: &[String], i: usize) -> Result<T, BrokerError> {
    reply
        .get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unavailable("bad reply from redis"))
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
        let keys = self.keys(room);
        let dd_key = dedupe
            .as_ref()
            .map_or_else(|| keys.key("dd"), |d| keys.key(&format!("dd:{}", d.key)));
        let (mode, version) = match check {
            StateCheck::Expect(v) => ("e", v),
            StateCheck::Change(v) => ("c", v),
            StateCheck::Unchecked => ("", 0),
        };
        let traceparent = crate::telemetry::current_traceparent().unwrap_or_default();
        let mut conn = self.numbered_conn();
        let mut seeded = false;
        let reply = loop {
            let mut inv = self.scripts.publish.prepare_invoke();
            inv.key(keys.epoch())
                .key(keys.key("seq"))
                .key(keys.key("ep"))
                .key(keys.key("log"))
                .key(keys.persist())
                .key(&dd_key)
                .key(keys.key("state"))
                .arg(frame)
                .arg(self.window)
                .arg(keys.channel())
                .arg(if dedupe.is_some() { "1" } else { "0" })
                .arg(
                    dedupe
                        .as_ref()
                        .map_or_else(String::new, |d| format!("{}:{}", d.id, d.ts.0)),
                )
                .arg(DEDUPE_TTL_S)
                // ARGV[7]: the publish span's traceparent (empty when not tracing), stored as
                // the persistence entry's `tp` so the history service's write joins the trace.
                .arg(&traceparent)
                .arg(mode)
                .arg(version);
            let reply: Vec<String> = self.invoke(&mut conn.1, inv).await?;
            match reply.first().map(String::as_str) {
                Some("3" | "4") if !seeded => {
                    self.seed(room, &keys).await?;
                    seeded = true;
                }
                Some("3" | "4") => return Err(unavailable("the room's numbering was reset again")),
                _ => break reply,
            }
        };
        match reply[0].as_str() {
            "1" => {
                let seq: u64 = field(&reply, 1)?;
                let sent = Sent {
                    room: room.clone(),
                    seq,
                    epoch: reply[2].as_str().into(),
                    entry: EntryId::parse(&reply[3]).unwrap_or(EntryId(0, 0)),
                    frame: Bytes::copy_from_slice(frame),
                    dedupe: dedupe.as_ref().map(|d| (d.key.to_owned(), d.id, d.ts)),
                    acked: false,
                    at: std::time::Instant::now(),
                    stored: false,
                };
                let waited = self.replicated(&mut conn, &keys).await;
                self.sent.push(
                    keys.partition,
                    Sent {
                        acked: waited.is_ok(),
                        ..sent
                    },
                );
                waited?;
                crate::telemetry::hot()
                    .publish_seconds
                    .record(started.elapsed());
                return Ok(Published::Fresh { seq });
            }
            "2" => return Err(BrokerError::Stale),
            _ => {}
        }
        // "seq:id:ts" of the first publication, which may not be replicated yet: the script
        // renewed its key (a write), and replication is in order.
        let value = reply.get(1).cloned().unwrap_or_default();
        let mut parts = value.splitn(3, ':').map(|p| p.parse::<u64>().ok());
        let first = match (
            parts.next().flatten(),
            parts.next().flatten(),
            parts.next().flatten(),
        ) {
            (Some(seq), Some(id), Some(ts)) => Published::Duplicate {
                seq,
                id: proto::MessageId(id),
                ts: Timestamp(ts as i64),
            },
            _ => return Err(unavailable("corrupt dedupe entry")),
        };
        self.replicated(&mut conn, &keys).await?;
        Ok(first)
    }

    async fn publish_ephemeral(
        &self,
        room: &RoomId,
        frame: Bytes,
        expect: Option<StateVersion>,
    ) -> Result<(), BrokerError> {
        let keys = self.keys(room);
        if let Some(v) = expect {
            let mut inv = self.scripts.publish_checked.prepare_invoke();
            inv.key(keys.key("state"))
                .arg(v)
                .arg(keys.channel())
                .arg(&frame[..]);
            let published: i64 = self.invoke(&mut self.conn(), inv).await?;
            return if published == 1 {
                Ok(())
            } else {
                Err(BrokerError::Stale)
            };
        }
        let _: i64 = call(
            redis::cmd("SPUBLISH").arg(keys.channel()).arg(&frame[..]),
            &mut self.conn(),
        )
        .await?;
        Ok(())
    }

    async fn publish_node(&self, target: NodeTarget<'_>, frame: Bytes) -> Result<(), BrokerError> {
        let payload = NodeMessage {
            target,
            frame: &frame,
        }
        .encode();
        let _: i64 = call(
            redis::cmd("PUBLISH").arg(NODE_CHANNEL).arg(payload),
            &mut self.conn(),
        )
        .await?;
        Ok(())
    }

    async fn persist(&self, frame: Bytes) -> Result<(), BrokerError> {
        // Read receipts go to the stream of their room's partition.
        let room = room_of_frame(&frame).ok_or_else(|| unavailable("a receipt without a room"))?;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(self.keys(&room).persist())
            .arg("*")
            .arg("f")
            .arg(&frame[..]);
        if let Some(tp) = crate::telemetry::current_traceparent() {
            xadd.arg("tp").arg(tp);
        }
        let _: String = call(&xadd, &mut self.conn()).await?;
        Ok(())
    }

    async fn subscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        let (done, result) = oneshot::channel();
        self.sub_tx
            .send(SubCmd::Subscribe(room.clone(), done))
            .await
            .map_err(|_| unavailable("subscriber stopped"))?;
        tokio::time::timeout(CALL_TIMEOUT * 2, result)
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
        let v: Option<StateVersion> = call(
            redis::cmd("GET").arg(self.keys(room).key("state")),
            &mut self.conn(),
        )
        .await?;
        Ok(v.unwrap_or(0))
    }

    async fn recover(
        &self,
        room: &RoomId,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Recovery, BrokerError> {
        let keys = self.keys(room);
        let mut window = self.read_window(&keys, since).await?;
        if let Window::Unseeded(_) = window {
            self.seed(room, &keys).await?;
            window = self.read_window(&keys, since).await?;
        }
        let Window::Read(w) = window else {
            return Err(unavailable("the room's numbering was reset again"));
        };
        let same_epoch = epoch.is_none_or(|e| e == w.epoch);
        if since.is_some() && !same_epoch {
            // A client of the numbering before a reset fills its gap from history: the history
            // service stores what is in the stream first (what was appended again, and what
            // the new numbering published since), or the join is answered `unavailable` and
            // retried — answered now, the client would miss what history lacks for good.
            if !self.await_history(&keys, w.now).await {
                return Err(unavailable(
                    "history has not stored the events from before the reset yet",
                ));
            }
        }
        let complete = match since {
            None => true,
            Some(s) => same_epoch && w.complete(s),
        };
        let events = if same_epoch { w.events } else { vec![] };
        Ok(Recovery {
            last_seq: w.last,
            version: w.version,
            epoch: w.epoch,
            pins: w.pins,
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
        let keys = self.keys(room);
        let mut inv = self.scripts.presence_add.prepare_invoke();
        inv.key(keys.key("presence"))
            .key(keys.key("users"))
            .key(keys.key("names"))
            .key(keys.presence_rooms())
            .arg(&user.id)
            .arg(&self.node)
            .arg(self.presence_expiry())
            .arg(&user.name)
            .arg(room.as_str())
            .arg(list);
        let out = parse_list(&self.invoke::<String>(&mut self.conn(), inv).await?)?;
        let first = out.first().is_some_and(|f| f == "1");
        let online = parse_online(out.get(1..).unwrap_or_default())?;
        Ok((first, online))
    }

    async fn presence_remove(&self, room: &RoomId, user: &str) -> Result<Option<u64>, BrokerError> {
        // Another local connection of the same user keeps the node's entry.
        if !self.hub.sessions_in(room, user).is_empty() {
            return Ok(None);
        }
        let keys = self.keys(room);
        let mut inv = self.scripts.presence_remove.prepare_invoke();
        inv.key(keys.key("presence"))
            .key(keys.key("users"))
            .key(keys.key("names"))
            .arg(user)
            .arg(&self.node);
        let (gone, count): (String, u64) = self.invoke(&mut self.conn(), inv).await?;
        Ok((gone == "1").then_some(count))
    }

    async fn presence(&self, room: &RoomId, list: usize) -> Result<Online, BrokerError> {
        let mut inv = self.scripts.presence_list.prepare_invoke();
        inv.key(self.keys(room).key("names")).arg(list);
        parse_online(&parse_list(
            &self.invoke::<String>(&mut self.conn(), inv).await?,
        )?)
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
        let keys = self.keys(room);
        let mut inv = self.scripts.pin.prepare_invoke();
        inv.key(keys.key("pins"))
            .key(keys.key("state"))
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
        let out: String = self.invoke(&mut self.conn(), inv).await?;
        Ok(match out.as_str() {
            "stale" => return Err(BrokerError::Stale),
            "done" => PinOutcome::Done,
            "pinned" => PinOutcome::AlreadyPinned,
            "full" => PinOutcome::Full,
            _ => PinOutcome::NotPinned,
        })
    }

    fn healthy(&self) -> bool {
        // Through a Redis blip every node stays ready (see `history_service::redis_up`).
        self.healthy.ready()
    }
}

/// What RECOVER read of a room.
pub(super) enum Window {
    /// The room is not numbered in its partition's current epoch (the epoch's id; None: the
    /// partition has none).
    Unseeded(Option<String>),
    Read(WindowRead),
}

pub(super) struct WindowRead {
    epoch: String,
    /// The room's last seq.
    pub last: u64,
    version: StateVersion,
    /// Redis time (ms) of the read.
    now: u64,
    /// The room's pin set (see [`Recovery::pins`]).
    pins: Option<Vec<MessageId>>,
    /// Stored events after the `since` asked for, in order.
    pub events: Vec<(u64, Bytes)>,
}

impl WindowRead {
    /// Whether `events` run from `since` up to the last seq: the window's ids are the seqs, so
    /// `last - since` events after `since` are exactly since+1..=last. (The stream's oldest
    /// entry does not tell: `MAXLEN ~` trims approximately, so the stream can reach further
    /// back than the `window` events one read returns, and a replay cut there would leave out
    /// the newest events while the session counts them as seen.) A `since` past the last seq
    /// comes from before Redis lost the room: not complete.
    pub fn complete(&self, since: u64) -> bool {
        since <= self.last && self.events.len() as u64 == self.last - since
    }
}

impl RedisBroker {
    /// Reads the room's last seq, epoch, state version and, with `since`, the window after it.
    pub(super) async fn read_window(
        &self,
        keys: &RoomKeys,
        since: Option<u64>,
    ) -> Result<Window, BrokerError> {
        let mut inv = self.scripts.recover.prepare_invoke();
        inv.key(keys.epoch())
            .key(keys.key("seq"))
            .key(keys.key("ep"))
            .key(keys.key("log"))
            .key(keys.key("state"))
            .key(keys.key("pins"))
            .arg(since.map_or(-1, |s| s as i64))
            .arg(self.window);
        let out: Vec<String> = self.invoke(&mut self.conn(), inv).await?;
        if out.first().map(String::as_str) != Some("1") {
            return Ok(Window::Unseeded(out.get(1).cloned()));
        }
        let mut events = Vec::with_capacity(out.len().saturating_sub(6));
        let (last, version, now) = (field(&out, 2)?, field(&out, 3)?, field(&out, 4)?);
        let pins = match out.get(5).map(String::as_str) {
            Some("-") => None,
            Some(list) => Some(
                list.split(',')
                    .filter(|id| !id.is_empty())
                    .map(|id| id.parse().map(MessageId).map_err(unavailable))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => return Err(unavailable("short reply")),
        };
        let mut out = out.into_iter();
        let epoch = out.nth(1).unwrap_or_default();
        for frame in out.skip(4) {
            let frame = Bytes::from(frame.into_bytes());
            let seq = bus::peek(&frame).map_or(0, |p| p.seq);
            events.push((seq, frame));
        }
        Ok(Window::Read(WindowRead {
            epoch,
            last,
            version,
            now,
            pins,
            events,
        }))
    }

    /// Waits (a few seconds at most) until the history service stored everything appended to
    /// the room's partition stream before Redis time `now` (ms; consumers delete what they
    /// stored); false when it did not.
    async fn await_history(&self, keys: &RoomKeys, now: u64) -> bool {
        let deadline = std::time::Instant::now() + AWAIT_HISTORY;
        while std::time::Instant::now() < deadline {
            let oldest: Vec<(String, redis::Value)> = match call(
                redis::cmd("XRANGE")
                    .arg(keys.persist())
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1),
                &mut self.conn(),
            )
            .await
            {
                Ok(entries) => entries,
                Err(_) => return false,
            };
            // Entry ids start with the Redis time (ms) they were appended at.
            let caught_up = oldest
                .first()
                .and_then(|(id, _)| EntryId::parse(id))
                .is_none_or(|id| id.0 > now);
            if caught_up {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(stream = %keys.persist(), "history did not catch up in time; the join is answered unavailable");
        false
    }
}

/// The room of a receipt frame (`{"type":"receipt","room":…}`).
fn room_of_frame(frame: &[u8]) -> Option<RoomId> {
    #[derive(serde::Deserialize)]
    struct Receipt {
        room: RoomId,
    }
    serde_json::from_slice::<Receipt>(frame)
        .ok()
        .map(|r| r.room)
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
