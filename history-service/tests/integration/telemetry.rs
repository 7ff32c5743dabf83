//! Traces of the real `history-service` binary: a persistence entry's `tp` (W3C traceparent)
//! becomes the parent of the consumer's `store_batch` span, exported over OTLP/HTTP to a fake
//! collector on loopback (decoded with `opentelemetry-proto`); HELP lines on `/metrics`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use history_service::remote::RemoteStore;
use history_service::Store;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use proto::rooms::Visibility;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_history-service");
/// Spans are exported in batches every 100 ms here (OTEL_BSP_SCHEDULE_DELAY).
const SPAN_WAIT: Duration = Duration::from_secs(15);

/// A received span with its resource's `service.name`.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

/// A fake OTLP/HTTP collector: `POST /v1/traces` with protobuf bodies, decoded and kept.
pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (s, r) = (spans.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let (spans, requests) = (s.clone(), r.clone());
                async move {
                    // Only non-empty, decodable exports count.
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return Err(axum::http::StatusCode::BAD_REQUEST);
                    };
                    if req.resource_spans.is_empty() {
                        return Err(axum::http::StatusCode::BAD_REQUEST);
                    }
                    requests.fetch_add(1, Ordering::Relaxed);
                    let mut got = spans.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .as_ref()
                            .and_then(|r| attr(&r.attributes, "service.name"))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                got.push(Received {
                                    service: service.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    Ok((
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    ))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Collector {
            addr,
            spans,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Waits for a span matching `pred`.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Received) -> bool) -> Received {
        let deadline = tokio::time::Instant::now() + SPAN_WAIT;
        loop {
            if let Some(r) = self.spans.lock().unwrap().iter().find(|r| pred(r)) {
                return r.clone();
            }
            if tokio::time::Instant::now() >= deadline {
                let names: Vec<String> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|r| r.span.name.clone())
                    .collect();
                panic!(
                    "no span {what} within {SPAN_WAIT:?} ({} requests; spans: {names:?})",
                    self.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A string or integer attribute as a string.
pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match v.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn store_batch_joins_the_trace_of_the_entry() {
    let redis = RedisServer::start().await;
    let collector = Collector::start().await;
    let db = std::env::temp_dir().join(format!("{}.db", unique("otel")));
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHAT_LISTEN", "127.0.0.1:0")
        .env("CHAT_STORE", format!("sqlite://{}", db.display()))
        .env("CHAT_MIGRATE_ON_START", "true")
        .env("CHAT_REDIS_URL", redis.url())
        .env("CHAT_NODE_ID", "history-otel")
        .env("CHAT_INTERNAL_TOKEN", "tok")
        .env("CHAT_LOG", "warn")
        .env("CHAT_OTLP_ENDPOINT", format!("http://{}", collector.addr))
        .env("CHAT_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap_or_default();
    let addr: SocketAddr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first stdout line: {first:?}"))
        .parse()
        .unwrap();

    let remote = RemoteStore::new(&format!("http://{addr}"), Some("tok".into())).unwrap();
    let r = room("otel");
    remote
        .create_room(&room_info(&r, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent_id = "b7ad6b7169203331";
    let mut event = msg(&r, 1, "ann");
    if let proto::ServerEvent::Message { seq, .. } = &mut event {
        *seq = 0;
    }
    let frame = proto::envelope::with_seq(&event.to_json(), 1);
    let mut conn = redis.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(persist_stream(&r))
        .arg("*")
        .arg("f")
        .arg(frame)
        .arg("tp")
        .arg(format!("00-{trace_id}-{parent_id}-01"))
        .query_async(&mut conn)
        .await
        .unwrap();

    let batch = collector
        .wait_for("store_batch in the entry's trace", |r| {
            r.span.name == "store_batch" && hex(&r.span.trace_id) == trace_id
        })
        .await;
    assert_eq!(hex(&batch.span.parent_span_id), parent_id);
    assert_eq!(batch.service, "history-service");
    assert_eq!(
        attr(&batch.span.attributes, "entries").as_deref(),
        Some("1")
    );
    assert!(collector.requests() > 0);

    // The consumer's metrics, with HELP text.
    let body = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in ["chat_store_batch_seconds", "chat_stream_entries_total"] {
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{body}"
        );
    }

    let _ = child.start_kill();
    let _ = child.wait().await;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}
