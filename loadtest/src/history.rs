//! History: append rate (closed-loop writers, each waiting for its `ack`), how long until the
//! store serves the last acknowledged message, then paginated page reads
//! (`GET /api/rooms/{room}/messages?before=&limit=`) at a bounded concurrency. Chat target only.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target, Ws};
use crate::idle::Plan;
use crate::servers::Probes;
use crate::stats;
use crate::Common;

#[derive(clap::Args, Clone, Debug)]
pub struct HistoryArgs {
    /// Room to write and read (created on first join).
    #[arg(long, default_value = "lg-history")]
    pub room: String,
    /// Messages to append before reading (0: read only).
    #[arg(long, default_value_t = 5000)]
    pub messages: u64,
    /// Writer connections (closed loop: next message after the previous ack).
    #[arg(long, default_value_t = 20)]
    pub writers: usize,
    /// Page reads.
    #[arg(long, default_value_t = 2000)]
    pub reads: usize,
    /// Page reads in flight.
    #[arg(long, default_value_t = 16)]
    pub read_concurrency: usize,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

pub async fn history(common: &Common, a: &HistoryArgs) -> Result<Value> {
    if common.target != Target::Chat {
        bail!("history runs against the chat target only");
    }
    if a.messages > 1_000_000 || a.reads > 1_000_000 || a.writers == 0 || a.writers > 1000 {
        bail!("--messages and --reads at most 1e6, --writers 1..=1000");
    }
    let (eps, tokens) = (common.endpoints()?, common.tokens()?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(a.read_concurrency.max(1))
        .build()?;
    let reader_token = tokens
        .token(&format!("{}reader", common.user_prefix))
        .await?;
    let base = eps[0].http_base();

    // Append.
    let probes = Probes::new(common).await?;
    let before = probes.snapshot().await;
    let opened = crate::idle::open_many(common, &eps, &tokens, a.writers, |i| {
        Plan::round_robin(i, Some(a.room.clone()))
    })
    .await;
    if opened.failures > 0 {
        bail!(
            "writers failed to connect: {}",
            opened.first_error.unwrap_or_default()
        );
    }
    let per_writer = a.messages.div_ceil(a.writers as u64);
    let started = Instant::now();
    let handles: Vec<_> = opened
        .conns
        .into_iter()
        .map(|(i, ws)| {
            let room = a.room.clone();
            tokio::spawn(write_loop(i, ws, room, per_writer))
        })
        .collect();
    let mut ack_lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut acked, mut errors, mut max_seq) = (0u64, 0u64, 0u64);
    for h in handles {
        let w = h.await.map_err(|e| anyhow!("writer panicked: {e}"))?;
        ack_lat.add(&w.latency).expect("bounds");
        acked += w.acked;
        errors += w.errors;
        max_seq = max_seq.max(w.max_seq);
    }
    let append_secs = started.elapsed().as_secs_f64();
    // Until the store serves the newest acknowledged message.
    let mut stored_secs = None;
    if max_seq > 0 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(v) = get_page(&http, &base, &a.room, &reader_token, None, 1).await {
                if v["messages"][0]["seq"].as_u64().unwrap_or(0) >= max_seq {
                    stored_secs = Some(started.elapsed().as_secs_f64());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after = probes.snapshot().await;

    // Read pages.
    let newest = get_page(&http, &base, &a.room, &reader_token, None, 1)
        .await
        .context("first history page")?;
    let top = newest["messages"][0]["seq"].as_u64().unwrap_or(0);
    let mut read_lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut read_errors, mut read_msgs) = (0u64, 0u64);
    let read_start = Instant::now();
    let jobs = (0..a.reads).map(|_| {
        let before = if top > 1 {
            Some(rand::rng().random_range(2..=top + 1))
        } else {
            None
        };
        let (http, base, room, token) = (
            http.clone(),
            base.clone(),
            a.room.clone(),
            reader_token.clone(),
        );
        let limit = a.limit;
        async move {
            let t = Instant::now();
            let r = get_page(&http, &base, &room, &token, before, limit).await;
            (t.elapsed(), r)
        }
    });
    let mut s = futures_util::stream::iter(jobs).buffer_unordered(a.read_concurrency.max(1));
    while let Some((took, r)) = s.next().await {
        match r {
            Ok(v) => {
                read_lat.saturating_record(took.as_micros() as u64);
                read_msgs += v["messages"].as_array().map_or(0, |m| m.len() as u64);
            }
            Err(_) => read_errors += 1,
        }
    }
    let read_secs = read_start.elapsed().as_secs_f64();
    let mut append = json!({
        "writers": a.writers,
        "acked": acked,
        "errors": errors,
        "secs": round3(append_secs),
        "acked_per_s": (acked as f64 / append_secs).round(),
        "ack_latency_ms": stats::summary_ms(&ack_lat),
        "newest_seq": max_seq,
        "stored_after_secs": stored_secs.map(round3),
        "stored_per_s": stored_secs.map(|s| (acked as f64 / s).round()),
    });
    if let Some(o) = append.as_object_mut() {
        o.extend(probes.report(&before, &after, &[("message", acked)]));
    }
    Ok(json!({
        "target": "chat",
        "url": common.url,
        "room": a.room,
        "append": append,
        "read": {
            "reads": a.reads,
            "errors": read_errors,
            "concurrency": a.read_concurrency,
            "limit": a.limit,
            "messages_returned": read_msgs,
            "reads_per_s": (a.reads as f64 / read_secs).round(),
            "latency_ms": stats::summary_ms(&read_lat),
        },
    }))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

async fn get_page(
    http: &reqwest::Client,
    base: &str,
    room: &str,
    token: &str,
    before: Option<u64>,
    limit: u32,
) -> Result<Value> {
    let mut url = format!("{base}/api/rooms/{room}/messages?limit={limit}");
    if let Some(b) = before {
        url.push_str(&format!("&before={b}"));
    }
    Ok(http
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

struct Written {
    acked: u64,
    errors: u64,
    max_seq: u64,
    latency: Histogram<u64>,
}

async fn write_loop(id: usize, mut ws: Ws, room: String, n: u64) -> Written {
    let mut w = Written {
        acked: 0,
        errors: 0,
        max_seq: 0,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    };
    let mut k = 0u64;
    while k < n {
        let frame = json!({"type": "message", "room": room, "content": format!("history {id}/{k}"), "ref": k});
        let t = Instant::now();
        if ws.send(Message::text(frame.to_string())).await.is_err() {
            break;
        }
        // Wait for this ref's ack or error.
        let answer = tokio::time::timeout(client::STEP_TIMEOUT, async {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    if !t.contains("\"ref\":") {
                        continue;
                    }
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v["ref"].as_u64() == Some(k) {
                        return Some(v);
                    }
                }
            }
            None
        })
        .await;
        match answer {
            Ok(Some(v)) if v["type"] == "ack" => {
                w.acked += 1;
                w.max_seq = w.max_seq.max(v["seq"].as_u64().unwrap_or(0));
                w.latency.saturating_record(t.elapsed().as_micros() as u64);
                k += 1;
            }
            Ok(Some(v)) => {
                w.errors += 1;
                let wait = v["retry_after_ms"].as_u64().unwrap_or(50).min(2000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if w.errors > 10 * n + 100 {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = ws.close(None).await;
    w
}
