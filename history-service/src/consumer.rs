//! The persistence-stream consumer: Redis stream `chat:persist` → [`Store::apply`].
//!
//! Gateways append every stored event (and read receipts) to the stream, field `f` = the JSON
//! server frame as sent to clients (stored events carry `seq`), optional `tp` = the W3C
//! traceparent of the request that produced it. The history services read it as consumer
//! group `history`, each under its own consumer name (the node id):
//!
//! 1. `XGROUP CREATE chat:persist history 0 MKSTREAM` at start (`BUSYGROUP` = already there).
//! 2. First our own pending entries (`XREADGROUP .. 0`: read before a restart, never acked),
//!    then new ones: `XREADGROUP GROUP history <me> COUNT 256 BLOCK 1000 STREAMS chat:persist >`;
//!    after a read that was not a full batch, a short linger (`linger`, 25 ms) lets the next
//!    batch gather, so a busy stream costs one read, one store transaction and one
//!    acknowledgement per batch rather than per entry.
//! 3. Decode each frame; an undecodable one is logged, counted
//!    (`chat_stream_undecodable_total`) and acknowledged — retrying cannot fix it.
//! 4. `store.apply(batch)`; `XACK` only after it succeeded. On a store error nothing is acked:
//!    the same batch is retried with exponential backoff (the stream buffers meanwhile).
//!    In the same MULTI the acknowledged entries are deleted (`XDEL`), so the stream holds
//!    only what is not yet stored (see `process` for why XDEL rather than XTRIM).
//! 5. Every `claim_every`, `XAUTOCLAIM` entries idle longer than `claim_idle` (their consumer
//!    died between read and ack) and process them the same way.
//!
//! Writes are idempotent and ordered by seq (see [`crate::store`]), so an entry processed
//! twice — reclaimed from a consumer that was merely slow — changes nothing: every entry ends
//! up in the store exactly once. Each batch is one `store_batch` span (child of the first
//! entry's `tp`, linked to the others'; see [`crate::telemetry`]). Metrics: `chat_store_batch_seconds` (apply latency),
//! `chat_stream_lag` (entries not yet stored: never delivered + delivered but not acked, from
//! `XINFO GROUPS`), `chat_stream_pending`, `chat_stream_entries_total`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt;
use proto::ServerEvent;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncTypedCommands, RedisError, Value};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::store::{Store, StoreError};
use crate::telemetry;

/// Links a `store_batch` span records at most (besides its parent).
const MAX_LINKS: usize = 32;

pub const STREAM: &str = "chat:persist";
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
    pub stream: String,
    pub group: String,
    /// This consumer's name in the group: stable per node (its pending entries are its own
    /// after a restart).
    pub consumer: String,
    /// Entries per read (`COUNT`).
    pub batch: usize,
    /// How long one read blocks (`BLOCK`).
    pub block: Duration,
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
            stream: STREAM.into(),
            group: GROUP.into(),
            consumer: consumer.into(),
            batch: 256,
            block: Duration::from_millis(1000),
            linger: Duration::from_millis(25),
            claim_idle: Duration::from_secs(30),
            claim_every: Duration::from_secs(10),
            lag_every: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Counters of one consumer, readable while it runs (tests, logs).
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

/// Reads the stream into `store` until `shutdown` resolves.
pub struct Consumer<S> {
    client: redis::Client,
    store: Arc<S>,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
}

/// One stream entry, decoded.
struct Entry {
    id: String,
    event: Option<ServerEvent>,
}

impl<S: Store> Consumer<S> {
    pub fn new(client: redis::Client, store: Arc<S>, config: ConsumerConfig) -> Self {
        Self {
            client,
            store,
            config,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` resolves. Returns an error only if Redis cannot be reached at
    /// start; later Redis failures are retried (the connection manager reconnects).
    ///
    /// Cancel-safe in the way that matters: whatever was read but not yet acknowledged when
    /// it stops stays pending, and is re-read by this consumer name on restart or claimed by
    /// another consumer after `claim_idle`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ConsumerError> {
        // Blocking reads need a response timeout longer than BLOCK (the default is 500 ms);
        // this connection is used by this loop only, so the blocking read delays nobody.
        let cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.config.block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let mut conn = self.client.get_connection_manager_with_config(cfg).await?;
        self.create_group(&mut conn).await?;
        tokio::pin!(shutdown);
        tokio::select! {
            biased;
            _ = &mut shutdown => {}
            _ = self.consume(&mut conn) => {}
        }
        tracing::info!(consumer = %self.config.consumer, "stream consumer stopped");
        Ok(())
    }

    async fn create_group(&self, conn: &mut ConnectionManager) -> Result<(), ConsumerError> {
        // `0`, not `$`: gateways may have appended entries before the first history service
        // ever started, and those are acknowledged messages too. (Only the first creation
        // counts; later starts get BUSYGROUP.) MKSTREAM: the stream may not exist yet.
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The main loop; never returns (stopped by `run`'s select).
    async fn consume(&self, conn: &mut ConnectionManager) {
        let c = &self.config;
        // Our own pending entries first: read before a crash or restart, never acknowledged.
        let mut cursor = "0".to_owned();
        let mut next_claim = Instant::now() + c.claim_every;
        let mut next_lag = Instant::now();
        let mut redis_backoff = c.retry_min;
        loop {
            if Instant::now() >= next_lag {
                self.update_lag(conn).await;
                next_lag = Instant::now() + c.lag_every;
            }
            if Instant::now() >= next_claim {
                self.claim(conn).await;
                next_claim = Instant::now() + c.claim_every;
            }
            let opts = StreamReadOptions::default()
                .group(&c.group, &c.consumer)
                .count(c.batch)
                .block(c.block.as_millis() as usize);
            let read: Result<Option<StreamReadReply>, RedisError> = conn
                .xread_options(&[c.stream.as_str()], &[cursor.as_str()], &opts)
                .await;
            let ids = match read {
                Ok(reply) => {
                    redis_backoff = c.retry_min;
                    reply
                        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect::<Vec<_>>())
                        .unwrap_or_default()
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // The stream or group was deleted under us (FLUSHALL, an operator):
                        // recreate and carry on.
                        let _ = self.create_group(conn).await;
                    }
                    tracing::warn!(error = %e, "reading the persistence stream failed; retrying");
                    tokio::time::sleep(redis_backoff).await;
                    redis_backoff = (redis_backoff * 2).min(c.retry_max);
                    continue;
                }
            };
            if cursor != ">" && ids.is_empty() {
                // Own backlog drained: from now on only new entries.
                cursor = ">".into();
                continue;
            }
            if !ids.is_empty() {
                if cursor != ">" {
                    // Continue the backlog after the last entry seen.
                    cursor = ids.last().map(|e| e.id.clone()).unwrap_or_default();
                }
                let full = ids.len() >= c.batch;
                self.process(conn, ids).await;
                if !full && !c.linger.is_zero() {
                    tokio::time::sleep(c.linger).await;
                }
            }
        }
    }

    /// Stores a batch (retrying until it succeeds), then acknowledges it, in one `store_batch`
    /// span. Its parent is the trace of the batch's first entry that carries a `tp`
    /// (traceparent) field, so a one-message batch shows up in that message's trace; the
    /// other traced entries become links.
    async fn process(&self, conn: &mut ConnectionManager, raw: Vec<StreamId>) {
        let entries: Vec<Entry> = raw.iter().map(|e| self.decode(e)).collect();
        let span = tracing::info_span!(
            "store_batch",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %self.config.stream,
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
        self.store_and_ack(conn, entries).instrument(span).await
    }

    async fn store_and_ack(&self, conn: &mut ConnectionManager, entries: Vec<Entry>) {
        let events: Vec<ServerEvent> = entries.iter().filter_map(|e| e.event.clone()).collect();
        let mut backoff = self.config.retry_min;
        loop {
            let started = Instant::now();
            let result = self.store.apply(&events).await;
            metrics::histogram!("chat_store_batch_seconds").record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => break,
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("chat_store_errors_total").increment(1);
                    let level_unavailable = matches!(e, StoreError::Unavailable(_));
                    if level_unavailable {
                        tracing::warn!(error = %e, ?backoff, "store unavailable; batch not acked, retrying");
                    } else {
                        tracing::error!(error = %e, ?backoff, "store failed; batch not acked, retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        // Acknowledge, then delete the entries, in one MULTI so they never drift apart.
        //
        // Why delete: nothing else ever shrinks `chat:persist` (the gateways' XADD has no
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
        let mut backoff = self.config.retry_min;
        loop {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .xack(&self.config.stream, &self.config.group, &ids)
                .xdel(&self.config.stream, &ids);
            match pipe.query_async::<(u64, u64)>(conn).await {
                Ok((_, deleted)) => {
                    self.stats.deleted.fetch_add(deleted, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    // Stored but not acked: harmless to store again later, but ack now if
                    // Redis comes back so the entries do not get reclaimed and rewritten.
                    tracing::warn!(error = %e, "XACK/XDEL failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
            }
        }
        self.stats
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
                self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("chat_stream_undecodable_total").increment(1);
                Entry {
                    id: entry.id.clone(),
                    event: None,
                }
            }
        }
    }

    /// Takes over entries idle longer than `claim_idle` and processes them.
    async fn claim(&self, conn: &mut ConnectionManager) {
        let c = &self.config;
        let mut start = "0-0".to_owned();
        loop {
            let reply = conn
                .xautoclaim_options(
                    &c.stream,
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
                    tracing::warn!(error = %e, "XAUTOCLAIM failed");
                    return;
                }
            };
            if !reply.claimed.is_empty() {
                tracing::info!(
                    entries = reply.claimed.len(),
                    "claimed persistence entries from an idle consumer"
                );
                self.stats
                    .claimed
                    .fetch_add(reply.claimed.len() as u64, Ordering::Relaxed);
                metrics::counter!("chat_stream_claimed_total")
                    .increment(reply.claimed.len() as u64);
                self.process(conn, reply.claimed).await;
            }
            // "0-0": the whole pending list was scanned.
            if reply.next_stream_id == "0-0" || reply.next_stream_id.is_empty() {
                return;
            }
            start = reply.next_stream_id;
        }
    }

    async fn update_lag(&self, conn: &mut ConnectionManager) {
        let groups = match conn.xinfo_groups(&self.config.stream).await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "XINFO GROUPS failed");
                return;
            }
        };
        let by_name: HashMap<&str, _> =
            groups.groups.iter().map(|g| (g.name.as_str(), g)).collect();
        if let Some(g) = by_name.get(self.config.group.as_str()) {
            // `lag` (Redis ≥ 7): entries never delivered to the group; nil when Redis cannot
            // tell (after XDEL/XTRIM of undelivered entries) — then pending alone is reported.
            let lag = g.lag.unwrap_or(0) + g.pending;
            metrics::gauge!("chat_stream_lag").set(lag as f64);
            metrics::gauge!("chat_stream_pending").set(g.pending as f64);
        }
    }
}
