//! Opening many connections: the shared `open_many` (bounded concurrency), the `connect` mode
//! (connect + auth + join rate and latency) and the `idle` mode (server RSS per held
//! connection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Endpoint, Target, Tokens, Ws};
use crate::servers::{self, Probes};
use crate::stats;
use crate::Common;

/// Users are shared by this many connections (the gateway allows 16 per user by default);
/// it keeps dev-token requests few when tokens come from /api/dev/token.
const CONNS_PER_USER: usize = 8;

pub struct Opened {
    pub conns: Vec<(usize, Ws)>,
    pub failures: usize,
    pub first_error: Option<String>,
    /// Microseconds from TCP connect to `joined` (or `hello` without a room).
    pub latency: Histogram<u64>,
    /// Seconds spent opening (tokens excluded).
    pub secs: f64,
}

/// Where connection i goes: `--url` number `endpoint` (modulo their count), and the room it
/// joins, if any.
pub struct Plan {
    pub endpoint: usize,
    pub room: Option<String>,
}

impl Plan {
    /// Round-robin over the endpoints.
    pub fn round_robin(i: usize, room: Option<String>) -> Self {
        Self { endpoint: i, room }
    }
}

/// Opens `n` connections with at most `--concurrency` handshakes in flight, placed by `plan`.
pub async fn open_many(
    common: &Common,
    eps: &[Endpoint],
    tokens: &Tokens,
    n: usize,
    plan: impl Fn(usize) -> Plan,
) -> Opened {
    // Tokens first, so that the timed part is connect + auth + join only.
    let mut user_tokens: HashMap<usize, Arc<str>> = HashMap::new();
    let mut first_error = None;
    if !matches!(tokens, Tokens::None) {
        for u in 0..n.div_ceil(CONNS_PER_USER) {
            match tokens.token(&format!("{}{u}", common.user_prefix)).await {
                Ok(t) => {
                    user_tokens.insert(u, t.into());
                }
                Err(e) => {
                    return Opened {
                        conns: vec![],
                        failures: n,
                        first_error: Some(format!("token: {e:#}")),
                        latency: Histogram::new(3).expect("sigfig"),
                        secs: 0.0,
                    }
                }
            }
        }
    }
    let target = common.target;
    let started = Instant::now();
    let jobs = (0..n).map(|i| {
        let Plan { endpoint, room } = plan(i);
        let ep = eps[endpoint % eps.len()].clone();
        let token = user_tokens
            .get(&(i / CONNS_PER_USER))
            .cloned()
            .unwrap_or_else(|| "".into());
        async move {
            let t = Instant::now();
            let r = async {
                let mut ws = client::open(target, &ep, &token).await?;
                if let Some(room) = room {
                    client::join(&mut ws, target, &room).await?;
                }
                anyhow::Ok(ws)
            }
            .await;
            (i, t.elapsed(), r)
        }
    });
    let mut stream = futures_util::stream::iter(jobs).buffer_unordered(common.concurrency);
    let mut conns = Vec::with_capacity(n);
    let mut failures = 0;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    while let Some((i, took, r)) = stream.next().await {
        match r {
            Ok(ws) => {
                latency.saturating_record(took.as_micros() as u64);
                conns.push((i, ws));
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Opened {
        conns,
        failures,
        first_error,
        latency,
        secs: started.elapsed().as_secs_f64(),
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct ConnectArgs {
    /// Connections to open (and hold until all are open).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Rooms to spread the joins over (0: connect + auth only).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    #[arg(long, default_value = "lgc")]
    pub room_prefix: String,
}

pub async fn connect(common: &Common, a: &ConnectArgs) -> Result<Value> {
    if a.connections == 0 || a.connections > crate::MAX_CONNECTIONS {
        bail!("--connections must be 1..={}", crate::MAX_CONNECTIONS);
    }
    let (eps, tokens) = (common.endpoints()?, common.tokens()?);
    let probes = Probes::new(common).await?;
    let before = probes.snapshot().await;
    let opened = open_many(common, &eps, &tokens, a.connections, |i| {
        Plan::round_robin(
            i,
            (a.rooms > 0).then(|| format!("{}{}", a.room_prefix, i % a.rooms)),
        )
    })
    .await;
    let after = probes.snapshot().await;
    let ok = opened.conns.len();
    let mut out = json!({
        "target": format!("{:?}", common.target).to_lowercase(),
        "url": common.url,
        "connections": a.connections,
        "opened": ok,
        "failures": opened.failures,
        "first_error": opened.first_error,
        "concurrency": common.concurrency,
        "rooms": a.rooms,
        "secs": (opened.secs * 1000.0).round() / 1000.0,
        "connects_per_s": (ok as f64 / opened.secs * 10.0).round() / 10.0,
        "latency_ms": stats::summary_ms(&opened.latency),
    });
    if let Some(o) = out.as_object_mut() {
        o.extend(probes.report(&before, &after, &[("connection", ok as u64)]));
    }
    close_all(opened.conns).await;
    Ok(out)
}

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    /// Idle connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Rooms the connections join (one each, round-robin; 0: none).
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Seconds to hold them before measuring the server's RSS (lets allocators settle).
    #[arg(long, default_value_t = 5)]
    pub hold: u64,
    #[arg(long, default_value = "lgi")]
    pub room_prefix: String,
}

pub async fn idle(common: &Common, a: &IdleArgs) -> Result<Value> {
    if a.connections == 0 || a.connections > crate::MAX_CONNECTIONS {
        bail!("--connections must be 1..={}", crate::MAX_CONNECTIONS);
    }
    if common.server_pid.is_empty() {
        bail!("idle needs --server-pid (the process whose RSS is measured)");
    }
    if a.hold > crate::MAX_SECONDS {
        bail!("--hold at most {} s", crate::MAX_SECONDS);
    }
    let (eps, tokens) = (common.endpoints()?, common.tokens()?);
    // Warm the server's paths (first connection allocates lazily built state), then baseline.
    let warm = open_many(common, &eps, &tokens, eps.len(), |i| {
        Plan::round_robin(i, None)
    })
    .await;
    close_all(warm.conns).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = servers::sample_all(&common.server_pid);
    let me_before = servers::sample("self");

    // Two halves, the server's RSS sampled after each: the second half's growth is the
    // marginal cost of a connection, free of the one-off growth the first connections cause
    // (allocator arenas, tables sized up, lazily built state).
    let (stop_tx, stop_rx) = watch::channel(false);
    let target = common.target;
    let mut tasks = Vec::new();
    let mut ok = 0;
    let mut failures = 0;
    let mut first_error = None;
    let mut connect_secs = 0.0;
    let mut mid = Vec::new();
    let halves = [a.connections / 2, a.connections - a.connections / 2];
    for (h, n) in halves.into_iter().enumerate() {
        // distinct users per half: the gateway caps connections per user
        let half_common = Common {
            user_prefix: format!("{}h{h}-", common.user_prefix),
            ..common.clone()
        };
        let offset = h * halves[0];
        let opened = open_many(&half_common, &eps, &tokens, n, |i| {
            Plan::round_robin(
                i,
                (a.rooms > 0).then(|| format!("{}{}", a.room_prefix, (offset + i) % a.rooms)),
            )
        })
        .await;
        ok += opened.conns.len();
        failures += opened.failures;
        first_error = first_error.or(opened.first_error);
        connect_secs += opened.secs;
        // Hold them: each task reads (the server's pings are answered by the websocket layer).
        tasks.extend(
            opened
                .conns
                .into_iter()
                .map(|(_, ws)| tokio::spawn(hold(ws, target, stop_rx.clone()))),
        );
        tokio::time::sleep(Duration::from_secs(a.hold)).await;
        if h == 0 {
            mid = servers::sample_all(&common.server_pid);
        }
    }
    let second_half = ok.saturating_sub(halves[0]);
    let after = servers::sample_all(&common.server_pid);
    let me_after = servers::sample("self");
    let marginal_kb: i64 = mid
        .iter()
        .zip(&after)
        .filter_map(|(m, af)| Some(af.as_ref()?.rss_kb as i64 - m.as_ref()?.rss_kb as i64))
        .sum();

    let mut per = serde_json::Map::new();
    let mut total_delta_kb: i64 = 0;
    for ((p, b), af) in common.server_pid.iter().zip(&before).zip(&after) {
        if let (Some(b), Some(af)) = (b, af) {
            let d = af.rss_kb as i64 - b.rss_kb as i64;
            total_delta_kb += d;
            per.insert(
                p.name.clone(),
                json!({"pid": p.pid, "rss_kb_before": b.rss_kb, "rss_kb_after": af.rss_kb, "delta_kb": d}),
            );
        }
    }
    let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(json!({
        "target": format!("{:?}", common.target).to_lowercase(),
        "url": common.url,
        "connections": a.connections,
        "opened": ok,
        "still_open_at_sample": still_open,
        "failures": failures,
        "first_error": first_error,
        "rooms": a.rooms,
        "connect_secs": (connect_secs * 1000.0).round() / 1000.0,
        "server": per,
        "server_rss_delta_kb": total_delta_kb,
        "server_bytes_per_connection": if ok > 0 { Some(total_delta_kb * 1024 / ok as i64) } else { None },
        "server_marginal_bytes_per_connection": if second_half > 0 { Some(marginal_kb * 1024 / second_half as i64) } else { None },
        "loadgen_rss_kb": me_after.map(|m| m.rss_kb),
        "loadgen_bytes_per_connection": match (me_before, me_after) {
            (Some(b), Some(af)) if ok > 0 => Some((af.rss_kb as i64 - b.rss_kb as i64) * 1024 / ok as i64),
            _ => None,
        },
    }))
}

async fn hold(mut ws: Ws, target: Target, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if target == Target::Socketio && t.as_str() == "2" => {
                    let _ = ws.send(Message::text("3")).await;
                }
                Some(Ok(_)) => {}
                _ => return,
            },
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return;
            }
        }
    }
}

/// Closes connections politely, a bounded number at a time.
pub async fn close_all(conns: Vec<(usize, Ws)>) {
    futures_util::stream::iter(conns)
        .for_each_concurrent(256, |(_, mut ws)| async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        })
        .await;
}
