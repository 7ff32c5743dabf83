//! The history service as a process: the routes around the APIs (`/healthz`, `/readyz`,
//! `/metrics`), the HTTP server with a capped graceful shutdown, and the stream consumer
//! kept running beside it. `main.rs` only parses configuration and calls [`run`]; tests call
//! [`run`] too, with a listener bound to port 0.
//!
//! **Ports.** By default one listener serves everything. With an internal listener
//! (`CHAT_INTERNAL_LISTEN`), the main one serves only the public API ([`crate::http`]) and the
//! internal one the gateways' API ([`crate::internal`]), `/healthz`, `/readyz` and `/metrics`:
//! a public load balancer routing to the main port cannot reach them, whatever its rules.
//!
//! **Readiness** (`/readyz`) is 200 only when the store answers a point read within
//! [`PROBE_TIMEOUT`], the process is not shutting down and, when a persistence stream is
//! configured, Redis answered `PING` once and has not been failing it for longer than
//! [`crate::redis_up::UNREADY_AFTER`] (a Redis blip hits every replica at once: see
//! [`crate::redis_up`]). A history service that cannot reach its store
//! answers every API call with 503 anyway; taking it out of the load balancer sends readers
//! to a replica that can.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use proto::{MessageId, RoomId};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::consumer::{Consumer, ConsumerConfig};
use crate::http::HistoryApi;
use crate::internal::internal_router;
use crate::redis_conn::Redis;
use crate::redis_settings::RedisSettings;
use crate::redis_up::RedisUp;
use crate::store::Store;

/// How long one readiness check may wait for the store or Redis.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once (tests start several servers in one
/// process; they share it) and returns its handle.
pub fn install_metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let handle = crate::telemetry::install_prometheus(
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .expect("static buckets are valid"),
        );
        describe_metrics();
        handle
    })
}

/// HELP text of every metric this service exports (docs/operations.md has the same table).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    crate::keys::describe_metrics();
    describe_histogram!(
        "chat_store_batch_seconds",
        Unit::Seconds,
        "Time to write one batch of persistence entries to the store (each attempt)."
    );
    describe_counter!(
        "chat_store_errors_total",
        "Failed store batch writes; the batch is retried and not acknowledged."
    );
    describe_counter!(
        "chat_stream_entries_total",
        "Persistence stream entries stored and acknowledged."
    );
    describe_gauge!(
        "chat_stream_lag",
        "Entries of the persistence streams not yet stored: never delivered plus delivered but unacknowledged."
    );
    describe_gauge!(
        "chat_stream_pending",
        "Entries delivered to a consumer of the group but not acknowledged."
    );
    describe_counter!(
        "chat_stream_claimed_total",
        "Entries taken over from an idle (presumably dead) consumer."
    );
    describe_counter!(
        "chat_stream_undecodable_total",
        "Entries skipped because their frame could not be decoded."
    );
    describe_counter!(
        "chat_store_seq_conflicts_total",
        "Messages dropped because a different message already held their seq (the first is kept)."
    );
    describe_counter!(
        "chat_scylla_requests_total",
        "Requests the ScyllaDB driver sent (as the driver counts them)."
    );
    describe_counter!(
        "chat_scylla_errors_total",
        "ScyllaDB requests that failed after the driver's retries."
    );
    describe_counter!(
        "chat_scylla_retries_total",
        "ScyllaDB requests the driver's retry policy retried."
    );
    describe_counter!(
        "chat_scylla_request_timeouts_total",
        "ScyllaDB requests that hit the client-side timeout (CHAT_SCYLLA_REQUEST_TIMEOUT_SECS)."
    );
    describe_gauge!(
        "chat_scylla_connections",
        "Open connections of the ScyllaDB driver."
    );
}

/// What `/readyz` checks besides the store.
pub struct Health {
    draining: AtomicBool,
    redis: Option<RedisSettings>,
    /// The probe's connection, opened by the first probe (it reconnects by itself).
    probe: tokio::sync::OnceCell<Redis>,
    /// What the probes found.
    redis_up: RedisUp,
}

impl Health {
    pub fn new(redis: Option<RedisSettings>) -> Self {
        Self {
            draining: AtomicBool::new(false),
            redis,
            probe: tokio::sync::OnceCell::new(),
            redis_up: RedisUp::default(),
        }
    }

    /// From now on `/readyz` answers 503.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

struct Probe<S> {
    api: Arc<HistoryApi<S>>,
    health: Arc<Health>,
}

/// Everything the service answers on one port: the public API, the internal API, health and
/// metrics.
pub fn app<S: Store>(api: Arc<HistoryApi<S>>, health: Arc<Health>) -> Router {
    crate::http::router(api.clone()).merge(internal_app(api, health))
}

/// What only the cluster may reach: the internal API, health and metrics.
pub fn internal_app<S: Store>(api: Arc<HistoryApi<S>>, health: Arc<Health>) -> Router {
    let probe = Arc::new(Probe {
        api: api.clone(),
        health,
    });
    let ops = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(render_metrics))
        .with_state(probe);
    internal_router(api).merge(ops)
}

async fn render_metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        install_metrics().render(),
    )
        .into_response()
}

async fn readyz<S: Store>(State(p): State<Arc<Probe<S>>>) -> Response {
    if p.health.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    // A point read of a message that cannot exist: one index lookup on SQLite, one partition
    // read on ScyllaDB, one call to the service for a remote store.
    let room = RoomId::new("readyz-probe").expect("valid room id");
    let store = tokio::time::timeout(PROBE_TIMEOUT, p.api.store().message(&room, MessageId(0)));
    match store.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store check failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
        Err(_) => {
            tracing::warn!("readiness: store check timed out");
            return (StatusCode::SERVICE_UNAVAILABLE, "store timed out\n").into_response();
        }
    }
    if let Some(settings) = &p.health.redis {
        let ping = async {
            let conn = p
                .health
                .probe
                .get_or_try_init(|| settings.connect())
                .await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn.clone())
                .await
        };
        let failed = match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_string()),
        };
        p.health.redis_up.set(failed.is_none());
        if let Some(e) = failed {
            tracing::warn!(error = %e, "readiness: redis check failed");
            // Unready only after a long outage (see `crate::redis_up`).
            if !p.health.redis_up.ready() {
                return (StatusCode::SERVICE_UNAVAILABLE, "redis unavailable\n").into_response();
            }
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// How [`run`] runs.
pub struct RunOptions {
    /// The Redis whose persistence streams to consume, when any.
    pub redis: Option<RedisSettings>,
    /// Consumer settings (its name is the node id).
    pub consumer: ConsumerConfig,
    /// After the shutdown signal, in-flight requests get at most this long to finish.
    pub drain: Duration,
    /// The internal listener, when the internal API, health and metrics get their own port.
    pub internal: Option<TcpListener>,
}

/// Serves `api` on `listener` (and consumes the stream when `options.redis` is set) until
/// `shutdown` resolves; then `/readyz` turns 503, the consumer stops (whatever it read but did
/// not acknowledge stays pending for the next start or another replica), and in-flight
/// requests get `options.drain` to finish.
pub async fn run<S: Store>(
    listener: TcpListener,
    api: Arc<HistoryApi<S>>,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    install_metrics();
    let health = Arc::new(Health::new(options.redis.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    {
        let health = health.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            health.start_drain();
            let _ = stop_tx.send(true);
        });
    }

    let consumer = options.redis.map(|settings| {
        tokio::spawn(consume_forever(
            settings,
            api.store().clone(),
            options.consumer,
            stopped(),
        ))
    });

    let (public, internal) = match options.internal {
        None => (app(api, health), None),
        Some(internal) => (
            crate::http::router(api.clone()),
            Some(
                axum::serve(internal, internal_app(api, health)).with_graceful_shutdown(stopped()),
            ),
        ),
    };
    let server = axum::serve(listener, public).with_graceful_shutdown(stopped());
    let servers = async move {
        match internal {
            None => server.await,
            Some(internal) => {
                tokio::try_join!(server.into_future(), internal.into_future()).map(drop)
            }
        }
    };
    let drain = options.drain;
    let cap = stopped();
    tokio::select! {
        r = servers => r?,
        _ = async { cap.await; tokio::time::sleep(drain).await } => {
            tracing::warn!(?drain, "drain window over; closing remaining connections");
        }
    }
    if let Some(consumer) = consumer {
        let _ = consumer.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs the consumer until `shutdown`, starting it again (with backoff) when Redis cannot be
/// reached at start: the API keeps serving meanwhile and `/readyz` reports Redis down.
async fn consume_forever<S: Store>(
    settings: RedisSettings,
    store: Arc<S>,
    config: ConsumerConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut backoff = config.retry_min;
    loop {
        let consumer = Consumer::new(settings.clone(), store.clone(), config.clone());
        match consumer.run(&mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "cannot start the stream consumer; retrying");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(config.retry_max);
            }
        }
    }
}
