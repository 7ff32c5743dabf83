//! Traces and metrics of the real `gateway` binary: OTLP/HTTP export to a fake collector on
//! loopback (spans decoded with `opentelemetry-proto`), the traceparent written into the
//! persistence stream, flush on SIGTERM, HELP lines on `/metrics`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");
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

/// The gateway binary with `env` only; returns it and its address (`listening on ADDR`).
async fn spawn_gateway(env: &[(&str, String)]) -> (Child, SocketAddr) {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHAT_LISTEN", "127.0.0.1:0")
        .env("CHAT_DATA_DIR", temp_dir())
        .env("CHAT_DRAIN_SECONDS", "1")
        .env("CHAT_LOG", "info")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("gateway binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.split("listening on ").nth(1) {
                return a.trim().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("gateway exited before listening");
    })
    .await
    .expect("gateway printed its address");
    // Keep draining its logs so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn sigterm_and_wait(child: &mut Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("gateway exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn spans_reach_an_otlp_http_collector() {
    let collector = Collector::start().await;
    let (mut gateway, addr) = spawn_gateway(&[
        ("CHAT_OTLP_ENDPOINT", format!("http://{}", collector.addr)),
        ("CHAT_OTLP_PROTOCOL", "http/protobuf".into()),
    ])
    .await;
    let room = format!("otel-{}", rand_u64());
    let mut ann = Client::connect_addr(addr, "ann", "/ws").await;
    ann.join(&room).await;
    ann.say(&room, "traced").await;
    ann.recv_type("message").await;

    // One trace per command: `command` (cmd, room) → `broker_publish`; the embedded store's
    // `store_batch` links to the publish.
    let command = collector
        .wait_for("command message", |r| {
            r.span.name == "command"
                && attr(&r.span.attributes, "cmd").as_deref() == Some("message")
                && attr(&r.span.attributes, "room").as_deref() == Some(room.as_str())
        })
        .await;
    assert_eq!(command.service, "gateway");
    assert!(
        command.span.parent_span_id.is_empty(),
        "a command is the root of its trace"
    );
    assert_eq!(command.span.links.len(), 1, "follows from its connect span");
    let connect_id = command.span.links[0].span_id.clone();
    let trace = command.span.trace_id.clone();
    let publish = collector
        .wait_for("broker_publish in the command's trace", |r| {
            r.span.name == "broker_publish" && r.span.trace_id == trace
        })
        .await;
    assert_eq!(publish.span.parent_span_id, command.span.span_id);
    collector
        .wait_for("store_batch linked to the publish", |r| {
            r.span.name == "store_batch"
                && r.span
                    .links
                    .iter()
                    .any(|l| l.trace_id == trace && l.span_id == publish.span.span_id)
        })
        .await;

    // The session's `connect` span ends with it; SIGTERM flushes what is buffered.
    drop(ann);
    sigterm_and_wait(&mut gateway).await;
    let connect = collector
        .wait_for("connect", |r| r.span.name == "connect")
        .await;
    assert_eq!(connect.span.span_id, connect_id);
    assert_eq!(
        attr(&connect.span.attributes, "user").as_deref(),
        Some("ann")
    );
    assert!(collector.requests() > 0);
}

#[tokio::test]
async fn metrics_have_help_text() {
    let (mut gateway, addr) = spawn_gateway(&[]).await;
    let room = format!("metrics-{}", rand_u64());
    let mut ann = Client::connect_addr(addr, "ann", "/ws").await;
    ann.join(&room).await;
    ann.say(&room, "counted").await;
    ann.recv_type("message").await;
    let body = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "chat_connections",
        "chat_frames_in_total",
        "chat_frames_out_total",
        "chat_outbound_queue_depth",
        "chat_fanout_seconds",
        "chat_store_batch_seconds",
    ] {
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{body}"
        );
    }
    assert!(
        body.contains("chat_outbound_queue_depth_bucket{le=\"1\"}"),
        "queue depth has frame buckets:\n{body}"
    );
    drop(ann);
    sigterm_and_wait(&mut gateway).await;
}

/// Scaled out: the persistence entry of a message carries the publish span's traceparent.
#[tokio::test]
async fn persistence_entries_carry_the_traceparent() {
    let Some(redis) = TestRedis::start().await else {
        eprintln!("SKIPPED: redis-server is not installed");
        return;
    };
    let collector = Collector::start().await;
    let (mut gateway, addr) = spawn_gateway(&[
        ("CHAT_REDIS_URL", redis.url()),
        ("CHAT_OTLP_ENDPOINT", format!("http://{}", collector.addr)),
        ("CHAT_OTLP_PROTOCOL", "http/protobuf".into()),
    ])
    .await;
    let room = format!("tp-{}", rand_u64());
    let mut ann = Client::connect_addr(addr, "ann", "/ws").await;
    ann.join(&room).await;
    let content = format!("traced-{}", rand_u64());
    ann.say(&room, &content).await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // The stream of the room's partition (the gateway runs with the default count).
    let stream = history_service::partitions::stream(history_service::partitions::of(
        &room,
        history_service::redis_settings::DEFAULT_SINGLE_PARTITIONS,
    ));
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entry = entries
        .ids
        .iter()
        .find(|e| e.get::<String>("f").is_some_and(|f| f.contains(&content)))
        .expect("the message is in its partition's persistence stream");
    let tp: String = entry.get("tp").expect("entry has a tp field");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    let publish = collector
        .wait_for("broker_publish of the traceparent", |r| {
            r.span.name == "broker_publish"
                && hex(&r.span.trace_id) == parts[1]
                && hex(&r.span.span_id) == parts[2]
        })
        .await;
    assert_eq!(
        attr(&publish.span.attributes, "room").as_deref(),
        Some(room.as_str())
    );
    drop(ann);
    sigterm_and_wait(&mut gateway).await;
}

/// A throwaway redis-server on a free port, killed on drop; `None` when not installed.
struct TestRedis {
    child: Child,
    port: u16,
}

impl TestRedis {
    async fn start() -> Option<TestRedis> {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let mut child = match Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(c) => c,
                Err(_) => return None,
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: next attempt
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Some(TestRedis { child, port });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill().await;
        }
        panic!("could not start redis-server");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
