//! Logs and traces for both binaries (the gateway's `telemetry` module uses this one).
//!
//! `tracing` is the only instrumentation API in the code base. [`init`] installs a subscriber
//! with the log layer (text or JSON, filtered by `CHAT_LOG`) and, only when an OTLP endpoint
//! is configured, a `tracing-opentelemetry` layer that turns this workspace's `info` spans
//! into OpenTelemetry spans and exports them in batches. Without an endpoint there is no
//! OpenTelemetry layer at all: spans cost what `tracing` spans cost, nothing more.
//!
//! The OpenTelemetry layer has its own filter (this workspace's crates at `info`), so
//! `CHAT_LOG=warn` quiets logs without losing traces, and the exporter's own HTTP/gRPC spans
//! are never exported (no feedback loop).
//!
//! Traces are sampled by ratio (`CHAT_TRACE_SAMPLE_RATIO`) at their root and parent-based
//! below it: a span with a sampled parent — local, or remote through a `traceparent` — is
//! always kept, one with an unsampled parent never, so a trace is either whole or absent.
//!
//! Trace context crosses the persistence stream as a W3C `traceparent` string: the gateway
//! writes [`traceparent`] of its publish span into each entry's `tp` field, the consumer turns
//! it back into a parent with [`remote_parent`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// One OTLP/HTTP export request at most.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// OTLP transport, as `CHAT_OTLP_PROTOCOL` names it (the OpenTelemetry spec's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC, a collector's port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies, a collector's port 4318 (`/v1/traces` is appended to an
    /// endpoint without a path).
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(format!(
                "CHAT_OTLP_PROTOCOL must be grpc or http/protobuf (got {other})"
            )),
        }
    }
}

/// What [`init`] sets up.
pub struct TelemetryConfig<'a> {
    /// `service.name` of exported spans: `gateway` or `history-service`.
    pub service: &'static str,
    /// `service.instance.id`: the node id.
    pub instance: Option<String>,
    /// Log filter, `tracing` EnvFilter syntax; an invalid one falls back to `info`.
    pub log_filter: &'a str,
    /// `json` for JSON lines, anything else for text.
    pub log_format: &'a str,
    /// Logs to stderr (history-service keeps stdout for its `listening on` line) or stdout.
    pub log_to_stderr: bool,
    /// OTLP collector; `None` → no exporter.
    pub otlp_endpoint: Option<&'a str>,
    pub otlp_protocol: OtlpProtocol,
    /// Share of root spans (new traces) recorded, 0.0-1.0; see [`sampler`].
    pub sample_ratio: f64,
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter (at most a few seconds). Call once
    /// the server has stopped.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The batch processor's shutdown blocks this thread until its worker has
            // exported; keep it off the async workers.
            let done =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                    .await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "flushing traces at shutdown failed");
            }
        }
    }
}

/// How often recorded histogram samples are folded into their buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Builds and installs the process-wide Prometheus recorder and starts its upkeep.
///
/// The recorder keeps every histogram sample until it is folded into buckets, which happens
/// on a scrape or an upkeep run; without upkeep, a node nobody scrapes grows by every sample
/// it records (the gateway records one per socket write: 1.2 KB per idle connection after a
/// join storm). The upkeep runs on its own thread so that it outlives any one Tokio runtime
/// (tests start many in one process).
pub fn install_prometheus(builder: PrometheusBuilder) -> PrometheusHandle {
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Fails only when another recorder is installed; then ours simply records nothing.
    if metrics::set_global_recorder(recorder).is_ok() {
        let upkeep = handle.clone();
        let started = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(METRICS_UPKEEP);
                upkeep.run_upkeep();
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
        }
    }
    handle
}

/// Target of spans that go to traces only, never to logs: a session's `connect` span lives as
/// long as its connection, and the log layer keeps each span's formatted fields (~270 B per
/// idle connection). Without a trace exporter nothing wants these spans and they cost nothing.
pub const TRACES_ONLY: &str = "traces_only";

/// Installs the process's subscriber: logs, and traces when an endpoint is set. Must run
/// inside the Tokio runtime (the gRPC exporter's client lives on it). Errors are about the
/// endpoint (a bad URL); a second call in one process keeps the first subscriber.
pub fn init(config: &TelemetryConfig<'_>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_new(config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, ansi) = if config.log_to_stderr {
        (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
    } else {
        (
            BoxMakeWriter::new(std::io::stdout),
            std::io::IsTerminal::is_terminal(&std::io::stdout()),
        )
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(writer);
    let filter = filter.and(filter_fn(|meta| meta.target() != TRACES_ONLY));
    let logs = if config.log_format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_ansi(ansi).with_filter(filter).boxed()
    };

    let provider = config
        .otlp_endpoint
        .map(|endpoint| tracer_provider(config, endpoint))
        .transpose()?;
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(config.service))
            .with_filter(
                Targets::new()
                    .with_target("gateway", LevelFilter::INFO)
                    .with_target("history_service", LevelFilter::INFO)
                    .with_target(TRACES_ONLY, LevelFilter::INFO),
            )
    });
    // Without an exporter the traces layer is left out, not added as `None`: an absent
    // optional layer counts as wanting every span, so the registry would keep a slot for each
    // `connect` span (~200 B per idle connection) that no layer ever reads.
    let registry = tracing_subscriber::registry().with(logs);
    let _ = match traces {
        Some(traces) => registry.with(traces).try_init(),
        None => registry.try_init(),
    };
    Ok(Telemetry { provider })
}

fn tracer_provider(
    config: &TelemetryConfig<'_>,
    endpoint: &str,
) -> Result<SdkTracerProvider, String> {
    let bad = |e: opentelemetry_otlp::ExporterBuildError| format!("CHAT_OTLP_ENDPOINT: {e}");
    let exporter = match config.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(bad)?,
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(http_traces_url(endpoint)?)
            .with_http_client(OnRuntime::new()?)
            .build()
            .map_err(bad)?,
    };
    let mut resource = Resource::builder().with_service_name(config.service);
    if let Some(instance) = &config.instance {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance.clone(),
        ));
    }
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampler(config.sample_ratio))
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The OTLP/HTTP client: hyper, its requests spawned on our Tokio runtime. (The SDK's batch
/// processor exports from its own thread, where hyper would find no reactor; the gRPC client
/// needs no such help, tonic's channel already runs on the runtime it was built in.)
#[derive(Debug)]
struct OnRuntime {
    client: Arc<dyn HttpClient>,
    runtime: tokio::runtime::Handle,
}

impl OnRuntime {
    fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "trace export needs a Tokio runtime".to_owned())?;
        Ok(Self {
            client: Arc::new(HyperClient::with_default_connector(EXPORT_TIMEOUT, None)),
            runtime,
        })
    }
}

impl HttpClient for OnRuntime {
    fn send_bytes<'a, 'f>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'f>>
    where
        'a: 'f,
        Self: 'f,
    {
        let client = self.client.clone();
        let sent = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move { sent.await? })
    }
}

/// OTLP/HTTP wants the signal's full URL: `http://collector:4318` → `…/v1/traces`; a URL
/// with a path is taken as given.
fn http_traces_url(endpoint: &str) -> Result<String, String> {
    let uri: axum::http::Uri = endpoint
        .parse()
        .map_err(|e| format!("CHAT_OTLP_ENDPOINT: invalid URL {endpoint}: {e}"))?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(format!(
            "CHAT_OTLP_ENDPOINT must be an http:// or https:// URL (got {endpoint})"
        ));
    }
    Ok(match uri.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_owned(),
    })
}

/// Parent-based ratio sampling: a new trace is recorded with probability `ratio` (decided by
/// its trace id, so every service decides the same for the same trace); a span with a parent
/// follows the parent's decision.
pub fn sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

/// `CHAT_TRACE_SAMPLE_RATIO` must be a ratio.
pub fn validate_sample_ratio(ratio: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(format!(
            "CHAT_TRACE_SAMPLE_RATIO must be between 0.0 and 1.0 (got {ratio})"
        ))
    }
}

/// Checks an endpoint the way [`init`] will use it, for configuration validation.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    http_traces_url(endpoint).map(drop)
}

/// The W3C `traceparent` of `span`, when it is being traced (an exporter is installed and the
/// span is sampled or recording).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The span context of `span`, when it is being traced: to link to it from another span.
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// A remote parent from a `traceparent` string; `None` when it is malformed.
pub fn remote_parent(traceparent: &str) -> Option<opentelemetry::Context> {
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    let cx = TraceContextPropagator::new().extract(&One(traceparent));
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this binary that installs the global subscriber.
    #[test]
    fn without_an_exporter_a_traces_only_span_is_never_created() {
        let _telemetry = init(&TelemetryConfig {
            service: "test",
            instance: None,
            log_filter: "info",
            log_format: "text",
            log_to_stderr: true,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            sample_ratio: 1.0,
        })
        .unwrap();
        let connect = tracing::info_span!(target: TRACES_ONLY, "connect");
        assert!(connect.is_disabled(), "no layer wants it: no registry slot");
        let logged = tracing::info_span!("command");
        assert!(
            !logged.is_disabled(),
            "the log layer still sees ordinary spans"
        );
    }

    #[test]
    fn http_endpoint_gets_the_traces_path() {
        assert_eq!(
            http_traces_url("http://c:4318").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://c/x/v1/traces").unwrap(),
            "http://c/x/v1/traces"
        );
        assert!(http_traces_url("collector:4318").is_err());
        assert!(validate_endpoint("not a url").is_err());
    }

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = remote_parent(tp).expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_remote());
        assert!(remote_parent("garbage").is_none());
        assert!(remote_parent("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none());
    }

    #[test]
    fn untraced_span_has_no_traceparent() {
        let span = tracing::info_span!("x");
        assert!(traceparent(&span).is_none());
        assert!(span_context(&span).is_none());
    }

    #[test]
    fn protocol_parses() {
        assert_eq!("grpc".parse::<OtlpProtocol>().unwrap(), OtlpProtocol::Grpc);
        assert_eq!(
            "http/protobuf".parse::<OtlpProtocol>().unwrap(),
            OtlpProtocol::HttpProtobuf
        );
        assert!("http/json".parse::<OtlpProtocol>().is_err());
    }

    #[test]
    fn sampling_is_by_ratio_at_the_root_and_follows_the_parent() {
        use opentelemetry::trace::{SpanKind, TraceId};
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
        let decide = |sampler: &Sampler, parent: Option<&str>, trace_id: TraceId| {
            let cx = parent.map(|tp| remote_parent(tp).expect("valid traceparent"));
            sampler
                .should_sample(
                    cx.as_ref(),
                    trace_id,
                    "command",
                    &SpanKind::Internal,
                    &[],
                    &[],
                )
                .decision
        };
        let sampled = |d: SamplingDecision| d == SamplingDecision::RecordAndSample;
        // The SDK compares the trace id's low 64 bits, shifted right by one, with ratio x 2^63.
        let low = TraceId::from(1u128);
        let high = TraceId::from(u128::from(u64::MAX));
        let half = sampler(0.5);
        assert!(sampled(decide(&half, None, low)), "below the ratio");
        assert!(!sampled(decide(&half, None, high)), "above the ratio");
        let none = sampler(0.0);
        let all = sampler(1.0);
        assert!(!sampled(decide(&none, None, low)));
        assert!(sampled(decide(&all, None, high)));
        // With a parent its decision wins, whatever the ratio.
        let kept = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let dropped = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert!(sampled(decide(&none, Some(kept), high)));
        assert!(!sampled(decide(&all, Some(dropped), low)));
    }

    #[test]
    fn sample_ratio_must_be_a_ratio() {
        assert!(validate_sample_ratio(0.0).is_ok());
        assert!(validate_sample_ratio(0.01).is_ok());
        assert!(validate_sample_ratio(1.0).is_ok());
        assert!(validate_sample_ratio(1.5).is_err());
        assert!(validate_sample_ratio(-0.1).is_err());
        assert!(validate_sample_ratio(f64::NAN).is_err());
    }
}
