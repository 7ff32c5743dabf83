//! Logs, traces and metrics setup.
//!
//! Traces (see `history_service::telemetry`, shared by both binaries) are exported only when
//! `CHAT_OTLP_ENDPOINT` is set. The gateway's spans:
//! - `connect`: one per WebSocket session, from the upgraded socket to the session's end.
//!   Sessions live for hours, so it is not the parent of what happens in it. It goes to
//!   traces only (target `traces_only`), not to logs, and costs nothing when no exporter is
//!   set:
//! - `command`: one per client command (`cmd`, `room`), the root of its own short trace,
//!   linked (follows-from) to its `connect` span;
//! - `broker_publish`: a stored event's seq assignment, persistence append and publish; its
//!   traceparent rides in the persistence stream entry (`tp`) to the history service;
//! - `store_batch`: embedded mode's persistence writer, one per batch, linked to the publishes
//!   it contains.
//!
//! Metrics: one Prometheus recorder per process, rendered on `/metrics`; every metric has a
//! HELP text ([`describe_metrics`]).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use history_service::telemetry::Telemetry;

use crate::config::Config;

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of `chat_outbound_queue_depth` (frames), up to past the largest sane queue.
const DEPTH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];

/// Installs the process-wide Prometheus recorder once (tests start several nodes in one
/// process; they share it).
/// Handles of the metrics recorded per message or per fan-out, looked up once: a lookup by
/// name hashes it and takes the registry's lock, which per message adds up.
pub struct Hot {
    pub fanout_seconds: metrics::Histogram,
    pub queue_depth_max: metrics::Gauge,
    pub publish_seconds: metrics::Histogram,
    pub frames_in: metrics::Counter,
}

/// See [`Hot`]. First called after [`install_metrics`] (a node is built before it serves).
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| Hot {
        fanout_seconds: metrics::histogram!("chat_fanout_seconds"),
        queue_depth_max: metrics::gauge!("chat_outbound_queue_depth_max"),
        publish_seconds: metrics::histogram!("chat_broker_publish_seconds"),
        frames_in: metrics::counter!("chat_frames_in_total"),
    })
}

pub fn install_metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let handle = history_service::telemetry::install_prometheus(
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ])
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full("chat_outbound_queue_depth".into()),
                    DEPTH_BUCKETS,
                )
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full("chat_store_call_batch_size".into()),
                    DEPTH_BUCKETS,
                )
                .expect("static buckets are valid"),
        );
        describe_metrics();
        handle
    })
}

/// HELP text of every metric the gateway exports (docs/operations.md has the same table).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    history_service::keys::describe_metrics();
    describe_gauge!("chat_connections", "Open WebSocket sessions on this node.");
    describe_counter!(
        "chat_frames_in_total",
        "Text and binary frames received from clients."
    );
    describe_counter!(
        "chat_frames_out_total",
        "Frames written to clients (several may share one socket write)."
    );
    describe_histogram!(
        "chat_outbound_queue_depth",
        Unit::Count,
        "Frames in a session's outbound queue when its writer takes a batch."
    );
    describe_gauge!(
        "chat_outbound_queue_depth_max",
        Unit::Count,
        "Deepest recipient outbound queue after this node's latest room fan-out."
    );
    describe_counter!(
        "chat_rate_limited_total",
        "Commands refused by the per-connection token bucket."
    );
    describe_counter!(
        "chat_slow_consumer_closes_total",
        "Sessions closed with 1013 because their outbound queue was full."
    );
    describe_histogram!(
        "chat_fanout_seconds",
        Unit::Seconds,
        "Time to enqueue one room event to every local member."
    );
    describe_histogram!(
        "chat_broker_publish_seconds",
        Unit::Seconds,
        "Round trip of the Redis publish script (seq, recovery window, persistence, publish)."
    );
    describe_histogram!(
        "chat_store_call_batch_size",
        Unit::Count,
        "Join-storm store requests (memberships, read markers) sent in one store call."
    );
    describe_histogram!(
        "chat_store_batch_seconds",
        Unit::Seconds,
        "Time to write one batch to the embedded store (each attempt)."
    );
    describe_counter!(
        "chat_token_expired_closes_total",
        "Sessions closed with 1008 because their token expired without a refresh."
    );
    describe_counter!(
        "chat_server_api_requests_total",
        "Server API calls by HTTP status (401: no or an unknown key)."
    );
}

pub fn render_metrics() -> String {
    install_metrics().render()
}

/// Initializes logging (`CHAT_LOG`, `CHAT_LOG_FORMAT`, to stdout) and, when
/// `CHAT_OTLP_ENDPOINT` is set, trace export. Call inside the runtime; call
/// [`Telemetry::shutdown`] after the server stopped so the last spans are sent.
pub fn init(config: &Config) -> Result<Telemetry, String> {
    let protocol = config.otlp_protocol.parse()?;
    history_service::telemetry::init(&history_service::telemetry::TelemetryConfig {
        service: "gateway",
        instance: Some(config.node_name()),
        log_filter: &config.log,
        log_format: &config.log_format,
        log_to_stderr: false,
        otlp_endpoint: config.otlp_endpoint.as_deref(),
        otlp_protocol: protocol,
        sample_ratio: config.trace_sample_ratio,
    })
}

/// The W3C traceparent of the current span, when traces are exported: what the persistence
/// stream carries to the history service (field `tp`).
pub fn current_traceparent() -> Option<String> {
    history_service::telemetry::traceparent(&tracing::Span::current())
}
