//! The persistence-stream consumer: the partition streams `chat:{pN}:persist` →
//! [`Store::apply`].
//!
//! Gateways append every stored event (and read receipts) to the stream of the room's
//! partition ([`crate::partitions`]), field `f` = the JSON server frame as sent to clients
//! (stored events carry `seq`), optional `tp` = the W3C traceparent of the request that
//! produced it. Every history-service replica runs one loop per partition, all in consumer
//! group `history` under its own consumer name (the node id), so the replicas share each
//! partition's entries and the service scales out with them:
//!
//! 1. `XGROUP CREATE <stream> history 0 MKSTREAM` at start (`BUSYGROUP` = already there).
//! 2. First our own pending entries (`XREADGROUP .. 0`: read before a restart, never acked;
//!    again after a failed read and every `claim_every`, since a failover to a replica brings
//!    back entries as pending that this consumer had acked on the old primary), then new ones: `XREADGROUP GROUP history <me> COUNT 256 STREAMS <stream> >`. Reads do not
//!    block (a blocking read would hold the connection every partition shares): an empty
//!    read waits a little longer each time, up to `idle_max`, before the next.
//!    After a read that was not a full batch, a short linger (`linger`, 25 ms) lets the next
//!    batch gather, so a busy stream costs one read, one store transaction and one
//!    acknowledgement per batch rather than per entry.
//! 3. With `wait_replicas` (`CHAT_REDIS_WAIT_REPLICAS`), `WAIT` until that many replicas have
//!    everything read so far: an entry the primary had not replicated yet may vanish in a
//!    failover, and its seq be given to another message; stored, it would keep that seq. When
//!    the replicas do not confirm in time, the batch is dropped and this consumer's pending
//!    entries are read again — after a failover from the new primary, without what it lost.
//! 4. Decode each frame; an undecodable one is logged, counted
//!    (`chat_stream_undecodable_total`) and acknowledged — retrying cannot fix it.
//! 5. `store.apply(batch)`; `XACK` only after it succeeded. On a store error nothing is acked:
//!    the same batch is retried with exponential backoff (the stream buffers meanwhile).
//!    In the same MULTI the acknowledged entries are deleted (`XDEL`), so the stream holds
//!    only what is not yet stored (see `store_and_ack` for why XDEL rather than XTRIM).
//! 6. Every `claim_every`, `XAUTOCLAIM` entries idle longer than `claim_idle` (their consumer
//!    died between read and ack) and process them the same way.
//!
//! A room's events are in one partition stream, in seq order. Writes are idempotent and
//! ordered by seq (see [`crate::store`]), so an entry processed twice — reclaimed from a
//! consumer that was merely slow — or two replicas' batches of one room applied in either
//! order end in the same rows: every entry ends up in the store exactly once. Each batch is
//! one `store_batch` span (child of the first entry's `tp`, linked to the others'; see
//! [`crate::telemetry`]). Metrics: `chat_store_batch_seconds` (apply latency),
//! `chat_stream_lag` (entries not yet stored, all partitions: never delivered + delivered but
//! not acked, from `XINFO GROUPS`), `chat_stream_pending`, `chat_stream_entries_total`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt;
use proto::ServerEvent;
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncTypedCommands, RedisError, Value};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::partitions;
use crate::redis_conn::Redis;
use crate::redis_settings::{Mode, RedisSettings};
use crate::store::{Store, StoreError};
use crate::telemetry;

/// Links a `store_batch` span records at most (besides its parent).
const MAX_LINKS: usize = 32;

pub const GROUP: &str = "history";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

/// Consumer settings; [`ConsumerConfig::new`] has the production defaults.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub group: String,
    /// This consumer's name in the group: stable per node (its pending entries are its own
    /// after a restart).
    pub consumer: String,
    /// Entries per read (`COUNT`).
    pub batch: usize,
    /// Longest wait between two reads of an idle partition.
    pub idle_max: Duration,
    /// After a read that returned less than a full batch, how long to wait before the next
    /// one, so entries gather into larger batches: every batch costs a read, a store
    /// transaction and an acknowledgement, whatever its size. Delays when history has an
    /// entry, never an acknowledgement to a client (the entry is durable in the stream).
    pub linger: Duration,
    /// Entries idle longer than this are taken over from their (presumably dead) consumer.
    pub claim_idle: Duration,
    /// How often to look for such entries.
    pub claim_every: Duration,
    /// How often to refresh the lag gauges.
    pub lag_every: Duration,
    /// Backoff bounds while the store fails.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl ConsumerConfig {
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            group: GROUP.into(),
            consumer: consumer.into(),
            batch: 256,
            idle_max: Duration::from_millis(50),
            linger: Duration::from_millis(25),
            claim_idle: Duration::from_secs(30),
            claim_every: Duration::from_secs(10),
            lag_every: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Counters of one consumer (all its partitions), readable while it runs (tests, logs).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Entries acknowledged after their batch was stored (undecodable ones included).
    pub acked: AtomicU64,
    pub undecodable: AtomicU64,
    /// Entries taken over from other consumers by XAUTOCLAIM.
    pub claimed: AtomicU64,
    /// Failed `apply` attempts.
    pub store_errors: AtomicU64,
    /// Entries deleted from the stream after they were acknowledged.
    pub deleted: AtomicU64,
}

/// Reads every partition stream into `store` until `shutdown` resolves.
pub struct Consumer<S> {
    settings: RedisSettings,
    store: Arc<S>,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
    /// When a partition loop last warned that Redis failed (ms since `started`): every loop
    /// sees the same outage, one warning in a while is enough.
    warned: AtomicU64,
    started: Instant,
}

/// Redis failures of all partition loops are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// One stream entry, decoded.
struct Entry {
    id: String,
    event: Option<ServerEvent>,
}

/// Lag and pending entries per partition; the gauges show the sums.
struct Lag {
    lag: Vec<AtomicU64>,
    pending: Vec<AtomicU64>,
}

impl Lag {
    fn new(streams: usize) -> Self {
        Self {
            lag: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            pending: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn set(&self, i: usize, lag: u64, pending: u64) {
        self.lag[i].store(lag, Ordering::Relaxed);
        self.pending[i].store(pending, Ordering::Relaxed);
        let sum = |v: &[AtomicU64]| v.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>();
        metrics::gauge!("chat_stream_lag").set(sum(&self.lag) as f64);
        metrics::gauge!("chat_stream_pending").set(sum(&self.pending) as f64);
    }
}

/// One partition's loop: its stream, the shared connection, the shared counters.
struct Partition<'a, S> {
    /// Its place in [`Lag`].
    index: usize,
    stream: String,
    conn: Redis,
    /// How long a reply may take on `conn` (to connect again alike).
    response: Duration,
    consumer: &'a Consumer<S>,
    lag: &'a Lag,
}

/// Reads of a partition failing this long: the connection is made again from the seed nodes.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

impl<S: Store> Consumer<S> {
    pub fn new(settings: RedisSettings, store: Arc<S>, config: ConsumerConfig) -> Self {
        Self {
            settings,
            store,
            config,
            stats: Arc::default(),
            warned: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        }
    }

    /// Logs a Redis failure of one partition loop, unless another did a moment ago.
    fn redis_failed(&self, stream: &str, what: &str, e: &RedisError) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.warned.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, stream, "{what} failed; retrying (every partition, reported once per {WARN_EVERY:?})");
        } else {
            tracing::debug!(error = %e, stream, "{what} failed; retrying");
        }
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` resolves. Returns an error only if Redis cannot be reached at
    /// start; later Redis failures are retried (the connection reconnects by itself).
    ///
    /// Cancel-safe in the way that matters: whatever was read but not yet acknowledged when
    /// it stops stays pending, and is re-read by this consumer name on restart or claimed by
    /// another consumer after `claim_idle`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ConsumerError> {
        // A WAIT may take its whole timeout; the store's own retries are not Redis calls.
        let response = self.settings.timeout + self.settings.wait_timeout;
        let mut conn = self.settings.connect_with(response).await?;
        let mut streams: Vec<String> = (0..self.settings.partitions)
            .map(partitions::stream)
            .collect();
        if self.settings.mode == Mode::Single
            && conn
                .exists(partitions::LEGACY_STREAM)
                .await
                .unwrap_or(false)
        {
            // Left by a build before partitions: stored like a partition's entries (their
            // seqs are below anything the new numbering gives out).
            tracing::info!(
                stream = partitions::LEGACY_STREAM,
                "draining the persistence stream of an earlier build"
            );
            streams.push(partitions::LEGACY_STREAM.to_owned());
        }
        let lag = Lag::new(streams.len());
        let mut loops = Vec::with_capacity(streams.len());
        for (i, stream) in streams.into_iter().enumerate() {
            let part = Partition {
                index: i,
                stream,
                conn: conn.clone(),
                response,
                consumer: &self,
                lag: &lag,
            };
            part.create_group().await?;
            loops.push(part.consume());
        }
        tokio::pin!(shutdown);
        tokio::select! {
            biased;
            _ = &mut shutdown => {}
            _ = futures_util::future::join_all(loops) => {}
        }
        tracing::info!(consumer = %self.config.consumer, "stream consumer stopped");
        Ok(())
    }
}

impl<S: Store> Partition<'_, S> {
    async fn create_group(&self) -> Result<(), ConsumerError> {
        // `0`, not `$`: gateways may have appended entries before the first history service
        // ever started, and those are acknowledged messages too. (Only the first creation
        // counts; later starts get BUSYGROUP.) MKSTREAM: the stream may not exist yet.
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.consumer.config.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The partition's loop; never returns (stopped by `run`'s select).
    async fn consume(mut self) {
        let c = &self.consumer.config;
        // Our own pending entries first: read before a crash or restart, never acknowledged.
        let mut cursor = "0".to_owned();
        let mut next_claim = Instant::now() + c.claim_every;
        let mut next_lag = Instant::now();
        let mut redis_backoff = c.retry_min;
        let mut idle = Duration::from_millis(1);
        let mut failing_since: Option<Instant> = None;
        loop {
            if Instant::now() >= next_lag {
                self.update_lag().await;
                next_lag = Instant::now() + c.lag_every;
            }
            if Instant::now() >= next_claim {
                self.claim().await;
                next_claim = Instant::now() + c.claim_every;
                // Our own pending entries again, now and then: a primary that failed over to
                // its replica brings back the replica's view, in which entries this consumer
                // read (and stored) from the old primary are pending again, and a read on
                // `>` never returns them. Left there, they keep the stream from draining
                // (gateways wait for that before recovering a room after a reset).
                cursor = "0".into();
            }
            let opts = StreamReadOptions::default()
                .group(&c.group, &c.consumer)
                .count(c.batch);
            let read: Result<Option<StreamReadReply>, RedisError> = self
                .conn
                .xread_options(&[self.stream.as_str()], &[cursor.as_str()], &opts)
                .await;
            let ids = match read {
                Ok(reply) => {
                    redis_backoff = c.retry_min;
                    failing_since = None;
                    reply
                        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect::<Vec<_>>())
                        .unwrap_or_default()
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // The stream or group was deleted under us (Redis lost its data, an
                        // operator): recreate and carry on.
                        let _ = self.create_group().await;
                    }
                    self.consumer
                        .redis_failed(&self.stream, "reading the persistence stream", &e);
                    tokio::time::sleep(redis_backoff).await;
                    redis_backoff = (redis_backoff * 2).min(c.retry_max);
                    // After a failure, our own pending entries first (see above: a failover
                    // may have made entries this consumer read pending again).
                    cursor = "0".into();
                    failing_since.get_or_insert_with(Instant::now);
                    if failing_since.is_some_and(|t| t.elapsed() >= RECONNECT_AFTER) {
                        // A cluster client can keep a slot map that points at a primary that
                        // died before its replica took over, and dial it for good: start
                        // again from the seed nodes.
                        if let Ok(fresh) = self.consumer.settings.connect_with(self.response).await
                        {
                            tracing::warn!(stream = %self.stream, "reconnected to Redis after failing reads");
                            self.conn = fresh;
                        }
                        failing_since = None;
                    }
                    continue;
                }
            };
            if cursor != ">" && ids.is_empty() {
                // Own backlog drained: from now on only new entries.
                cursor = ">".into();
                continue;
            }
            if ids.is_empty() {
                tokio::time::sleep(idle).await;
                idle = (idle * 2).min(c.idle_max);
                continue;
            }
            idle = Duration::from_millis(1);
            if cursor != ">" {
                // Continue the backlog after the last entry seen.
                cursor = ids.last().map(|e| e.id.clone()).unwrap_or_default();
            }
            if !self.replicated().await {
                // Read again what this consumer holds, from the primary serving the stream
                // now: after a failover it lacks what the old primary did not replicate, and
                // that must not be stored (its seq may go to another event).
                cursor = "0".into();
                tokio::time::sleep(redis_backoff).await;
                redis_backoff = (redis_backoff * 2).min(c.retry_max);
                continue;
            }
            let full = ids.len() >= c.batch;
            self.process(ids).await;
            if !full && !c.linger.is_zero() {
                tokio::time::sleep(c.linger).await;
            }
        }
    }

    /// With `CHAT_REDIS_WAIT_REPLICAS`, whether that many replicas have what was read (`WAIT`
    /// after the read: replication is in order, so the entries read are replicated once the
    /// read's own write is). False: the batch is not stored, and is read again.
    async fn replicated(&mut self) -> bool {
        let settings = &self.consumer.settings;
        if settings.wait_replicas == 0 {
            return true;
        }
        match self
            .conn
            .wait_replicas(&self.stream, settings.wait_replicas, settings.wait_timeout)
            .await
        {
            Ok(n) if n >= settings.wait_replicas => return true,
            Ok(n) => {
                tracing::warn!(replicas = n, stream = %self.stream, "entries not replicated yet; not storing them")
            }
            Err(e) => self.consumer.redis_failed(&self.stream, "WAIT", &e),
        }
        false
    }

    /// Stores a batch (retrying until it succeeds), then acknowledges it, in one `store_batch`
    /// span. Its parent is the trace of the batch's first entry that carries a `tp`
    /// (traceparent) field, so a one-message batch shows up in that message's trace; the
    /// other traced entries become links.
    async fn process(&mut self, raw: Vec<StreamId>) {
        let entries: Vec<Entry> = raw.iter().map(|e| self.decode(e)).collect();
        let span = tracing::info_span!(
            "store_batch",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %self.stream,
            entries = entries.len(),
            first = %entries.first().map_or("", |e| e.id.as_str()),
        );
        if !span.is_disabled() {
            let mut parents = raw
                .iter()
                .filter_map(|e| e.get::<String>("tp"))
                .filter_map(|tp| telemetry::remote_parent(&tp));
            if let Some(parent) = parents.next() {
                let _ = span.set_parent(parent);
            }
            for cx in parents.take(MAX_LINKS) {
                span.add_link(cx.span().span_context().clone());
            }
        }
        self.store_and_ack(entries).instrument(span).await
    }

    async fn store_and_ack(&mut self, entries: Vec<Entry>) {
        let events: Vec<ServerEvent> = entries.iter().filter_map(|e| e.event.clone()).collect();
        let mut backoff = self.consumer.config.retry_min;
        loop {
            let started = Instant::now();
            let result = self.consumer.store.apply(&events).await;
            metrics::histogram!("chat_store_batch_seconds").record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => break,
                Err(e) => {
                    self.consumer
                        .stats
                        .store_errors
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("chat_store_errors_total").increment(1);
                    let level_unavailable = matches!(e, StoreError::Unavailable(_));
                    if level_unavailable {
                        tracing::warn!(error = %e, ?backoff, "store unavailable; batch not acked, retrying");
                    } else {
                        tracing::error!(error = %e, ?backoff, "store failed; batch not acked, retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.consumer.config.retry_max);
                }
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        // Acknowledge, then delete the entries, in one MULTI so they never drift apart.
        //
        // Why delete: nothing else ever shrinks a persistence stream (the gateways' XADD has no
        // MAXLEN, on purpose: a cap would drop messages whenever this service is down long
        // enough), so acknowledged entries would pile up in Redis memory forever. Why XDEL of
        // exactly these ids and not `XTRIM MINID <lowest pending id>`: MINID trims by id order,
        // and entries older than this batch may still be pending for another consumer (one
        // that died and is about to be reclaimed, or one that is merely slow); computing a
        // safe MINID would need XPENDING across the group and still race with new reads. XDEL
        // removes only what this group has just stored and acknowledged. This is correct while
        // `history` is the only consumer group of the stream; another group would need its
        // own entries kept (then trim by the minimum of the groups' acknowledged positions).
        // Both commands are idempotent, so retrying the pair after a failure is safe.
        let mut backoff = self.consumer.config.retry_min;
        loop {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .xack(&self.stream, &self.consumer.config.group, &ids)
                .xdel(&self.stream, &ids);
            match pipe.query_async::<(u64, u64)>(&mut self.conn).await {
                Ok((_, deleted)) => {
                    self.consumer
                        .stats
                        .deleted
                        .fetch_add(deleted, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    // Stored but not acked: harmless to store again later, but ack now if
                    // Redis comes back so the entries do not get reclaimed and rewritten.
                    self.consumer.redis_failed(&self.stream, "XACK/XDEL", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.consumer.config.retry_max);
                }
            }
        }
        self.consumer
            .stats
            .acked
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        metrics::counter!("chat_stream_entries_total").increment(ids.len() as u64);
    }

    fn decode(&self, entry: &StreamId) -> Entry {
        let event = match entry.map.get("f") {
            Some(Value::BulkString(bytes)) => {
                serde_json::from_slice::<ServerEvent>(bytes).map_err(|e| e.to_string())
            }
            Some(Value::SimpleString(s)) => {
                serde_json::from_str::<ServerEvent>(s).map_err(|e| e.to_string())
            }
            Some(_) => Err("field `f` is not a string".into()),
            None => Err("no field `f`".into()),
        };
        match event {
            Ok(ev) => Entry {
                id: entry.id.clone(),
                event: Some(ev),
            },
            Err(why) => {
                tracing::error!(id = %entry.id, %why, "undecodable persistence entry skipped");
                self.consumer
                    .stats
                    .undecodable
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!("chat_stream_undecodable_total").increment(1);
                Entry {
                    id: entry.id.clone(),
                    event: None,
                }
            }
        }
    }

    /// Takes over entries idle longer than `claim_idle` and processes them.
    async fn claim(&mut self) {
        let c = self.consumer.config.clone();
        let mut start = "0-0".to_owned();
        loop {
            let reply = self
                .conn
                .xautoclaim_options(
                    &self.stream,
                    &c.group,
                    &c.consumer,
                    c.claim_idle.as_millis() as u64,
                    &start,
                    StreamAutoClaimOptions::default().count(c.batch),
                )
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    self.consumer.redis_failed(&self.stream, "XAUTOCLAIM", &e);
                    return;
                }
            };
            if !reply.claimed.is_empty() {
                tracing::info!(
                    entries = reply.claimed.len(),
                    "claimed persistence entries from an idle consumer"
                );
                self.consumer
                    .stats
                    .claimed
                    .fetch_add(reply.claimed.len() as u64, Ordering::Relaxed);
                metrics::counter!("chat_stream_claimed_total")
                    .increment(reply.claimed.len() as u64);
                self.process(reply.claimed).await;
            }
            // "0-0": the whole pending list was scanned.
            if reply.next_stream_id == "0-0" || reply.next_stream_id.is_empty() {
                return;
            }
            start = reply.next_stream_id;
        }
    }

    async fn update_lag(&mut self) {
        let groups = match self.conn.xinfo_groups(&self.stream).await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "XINFO GROUPS failed");
                return;
            }
        };
        let by_name: HashMap<&str, _> =
            groups.groups.iter().map(|g| (g.name.as_str(), g)).collect();
        if let Some(g) = by_name.get(self.consumer.config.group.as_str()) {
            // `lag` (Redis ≥ 7): entries never delivered to the group; nil when Redis cannot
            // tell (after XDEL/XTRIM of undelivered entries) — then pending alone is reported.
            let lag = g.lag.unwrap_or(0) + g.pending;
            self.lag.set(self.index, lag as u64, g.pending as u64);
        }
    }
}
