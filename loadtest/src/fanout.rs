//! Fan-out and ramp: N rooms × M members, S of them also senders at a total rate R. Each
//! message's content is `lg:<step>:<send time in µs>`; every receiving connection records
//! now − send time into the step's histogram and counts the delivery. Expected deliveries of
//! a step = messages sent × members per room (the sender receives its own message too, on
//! both targets).
//!
//! `ramp` runs the same rooms through steps of rising rate, with a quiet drain between steps,
//! and stops at the first step below the bar (delivered < 99.9 % or p99 ≥ 100 ms).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target, Ws};
use crate::idle::Plan;
use crate::servers::{self, Probes};
use crate::stats::{self, Counters, Hist};
use crate::Common;

#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    /// Rooms.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members (connections) per room.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Sending connections in total (spread over the rooms; each is also a member).
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages per second in total, over all senders.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of warm-up before the measurement (not reported).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Seconds to wait after the last send for late deliveries.
    #[arg(long, default_value_t = 2)]
    pub drain: u64,
    /// Room id prefix (rooms are PREFIX0..PREFIXn-1).
    #[arg(long, default_value = "lg")]
    pub room_prefix: String,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RampArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// Rate factor between steps.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 100_000.0)]
    pub max_rate: f64,
    /// Most steps.
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Required delivered ratio.
    #[arg(long, default_value_t = 0.999)]
    pub min_delivered: f64,
    /// p99 delivery latency must stay below this many milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,
}

/// What the connection tasks share with the conductor.
struct Shared {
    target: Target,
    step: AtomicUsize,
    sending: AtomicBool,
    /// Nanoseconds between two sends of one sender.
    period_ns: AtomicU64,
    steps: Vec<(Counters, Hist)>,
    closed: AtomicU64,
}

pub async fn fanout(common: &Common, a: &FanoutArgs) -> Result<Value> {
    let ramp = RampArgs {
        fanout: a.clone(),
        factor: 1.0,
        max_rate: a.rate,
        max_steps: 1,
        min_delivered: 0.0,
        max_p99_ms: f64::MAX,
    };
    let mut out = run(common, &ramp).await?;
    let step = out["steps"][0].take();
    out["result"] = step;
    if let Some(o) = out.as_object_mut() {
        for k in ["steps", "highest_sustainable_rate", "criteria"] {
            o.remove(k);
        }
    }
    Ok(out)
}

pub async fn ramp(common: &Common, a: &RampArgs) -> Result<Value> {
    run(common, a).await
}

async fn run(common: &Common, r: &RampArgs) -> Result<Value> {
    let a = &r.fanout;
    if a.rooms == 0 || a.members == 0 || a.senders == 0 {
        bail!("--rooms, --members and --senders must be at least 1");
    }
    let total = a.rooms * a.members;
    if total > crate::MAX_CONNECTIONS {
        bail!(
            "{total} connections exceed the limit of {}",
            crate::MAX_CONNECTIONS
        );
    }
    if a.senders > total {
        bail!(
            "--senders ({}) exceeds rooms × members ({total})",
            a.senders
        );
    }
    if a.duration > crate::MAX_SECONDS || r.max_steps == 0 || r.max_steps > 40 {
        bail!(
            "--duration must be at most {} s and --max-steps 1..=40",
            crate::MAX_SECONDS
        );
    }
    let (eps, tokens) = (common.endpoints()?, common.tokens()?);
    let probes = Probes::new(common).await?;
    // Connection i is in room i % rooms; connections 0..senders send (with senders = rooms:
    // one sender per room).
    let rooms: Vec<String> = (0..a.rooms)
        .map(|i| format!("{}{i}", a.room_prefix))
        .collect();
    let t0 = Instant::now();
    let opened = crate::idle::open_many(common, &eps, &tokens, total, |i| Plan {
        endpoint: endpoint_of(i, a.rooms),
        room: Some(rooms[i % a.rooms].clone()),
    })
    .await;
    let connect_secs = t0.elapsed().as_secs_f64();
    if opened.failures > 0 {
        bail!(
            "{} of {total} connections failed (first error: {})",
            opened.failures,
            opened.first_error.unwrap_or_default()
        );
    }

    let shared = Arc::new(Shared {
        target: common.target,
        step: AtomicUsize::new(0),
        sending: AtomicBool::new(false),
        period_ns: AtomicU64::new(0),
        steps: (0..=r.max_steps).map(|_| Default::default()).collect(),
        closed: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(total);
    for (i, ws) in opened.conns.into_iter() {
        let room = (i < a.senders).then(|| rooms[i % a.rooms].clone());
        tasks.push(tokio::spawn(conn_task(
            i,
            ws,
            room,
            shared.clone(),
            stop_rx.clone(),
        )));
    }

    let set_rate = |rate: f64| {
        let per_sender = rate / a.senders as f64;
        shared
            .period_ns
            .store((1e9 / per_sender) as u64, Ordering::Relaxed);
    };

    // Step 0 is the warm-up at the first rate.
    set_rate(a.rate);
    shared.step.store(0, Ordering::Relaxed);
    shared.sending.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    shared.sending.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.drain.min(2))).await;

    let mut steps = Vec::new();
    let mut best: Option<f64> = None;
    let mut rate = a.rate;
    for k in 1..=r.max_steps {
        if rate > r.max_rate {
            break;
        }
        set_rate(rate);
        let before = probes.snapshot().await;
        let me_before = servers::sample("self");
        shared.step.store(k, Ordering::Relaxed);
        let started = Instant::now();
        shared.sending.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(a.duration)).await;
        shared.sending.store(false, Ordering::Relaxed);
        let send_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(a.drain)).await;
        let after = probes.snapshot().await;
        let me_after = servers::sample("self");

        let (c, h) = &shared.steps[k];
        let h = h.merged();
        let sent = Counters::get(&c.sent);
        let delivered = Counters::get(&c.delivered);
        let expected = sent * a.members as u64;
        let ratio = if expected > 0 {
            delivered as f64 / expected as f64
        } else {
            0.0
        };
        let p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
        let ok = expected > 0 && ratio >= r.min_delivered && p99_ms < r.max_p99_ms;
        let mut step = json!({
            "target_rate": rate,
            "sent": sent,
            "sent_per_s": round(sent as f64 / send_secs),
            "acked": Counters::get(&c.acked),
            "errors": Counters::get(&c.errors),
            "missed_sends": Counters::get(&c.missed),
            "expected_deliveries": expected,
            "delivered": delivered,
            "delivered_ratio": (ratio * 1e6).round() / 1e6,
            "deliveries_per_s": round(delivered as f64 / send_secs),
            "latency_ms": stats::summary_ms(&h),
            "loadgen_cpu_us": match (me_before, me_after) {
                (Some(b), Some(a)) => Some(a.cpu_us - b.cpu_us),
                _ => None,
            },
            "connections_closed_so_far": shared.closed.load(Ordering::Relaxed),
            "passed": ok,
        });
        if let Some(o) = step.as_object_mut() {
            o.extend(probes.report(
                &before,
                &after,
                &[("message", sent), ("delivery", delivered)],
            ));
        }
        steps.push(step);
        if !ok {
            break;
        }
        best = Some(rate);
        rate *= r.factor;
        if r.factor <= 1.0 {
            break;
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    Ok(json!({
        "target": format!("{:?}", common.target).to_lowercase(),
        "url": common.url,
        "rooms": a.rooms,
        "members_per_room": a.members,
        "connections": total,
        "senders": a.senders,
        "connect_secs": round(connect_secs),
        "duration_s": a.duration,
        "steps": steps,
        "highest_sustainable_rate": best,
        "criteria": {"min_delivered": r.min_delivered, "max_p99_ms": r.max_p99_ms},
    }))
}

/// The `--url` connection i goes to: it is member k = i / rooms of room r = i % rooms, and
/// member k of room r goes to URL r + k. A room's members alternate over the URLs (every
/// message crosses nodes), and so do the rooms' first members (the senders).
fn endpoint_of(i: usize, rooms: usize) -> usize {
    i % rooms + i / rooms
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// One connection: reads (recording deliveries), answers Engine.IO pings and, when it is a
/// sender, paces its own sends from the shared period.
async fn conn_task(
    id: usize,
    mut ws: Ws,
    send_room: Option<String>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let sender = send_room.is_some();
    let room = send_room.unwrap_or_default();
    let mut next = Instant::now();
    // Each step starts every sender at a random point of its first period: senders that all
    // started together would send in bursts, and latency would measure the bursts.
    let mut staggered = false;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => on_text(id, &t, &shared, &mut ws).await,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    shared.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep_until(next), if sender => {
                let now = Instant::now();
                if !shared.sending.load(Ordering::Relaxed) {
                    next = now + Duration::from_millis(5);
                    staggered = false;
                    continue;
                }
                if !staggered {
                    let period = shared.period_ns.load(Ordering::Relaxed).max(1);
                    next = now + Duration::from_nanos(rand::rng().random_range(0..period));
                    staggered = true;
                    continue;
                }
                let step = shared.step.load(Ordering::Relaxed);
                let content = format!("lg:{step}:{}", stats::now_us());
                let frame = client::message_frame(shared.target, &room, &content);
                if ws.send(Message::text(frame)).await.is_err() {
                    shared.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let c = &shared.steps[step].0;
                c.sent.fetch_add(1, Ordering::Relaxed);
                next += Duration::from_nanos(shared.period_ns.load(Ordering::Relaxed));
                if next + Duration::from_secs(1) < now {
                    // More than a second behind: the generator is saturated; skip ahead.
                    let behind = (now - next).as_nanos() as u64;
                    c.missed.fetch_add(behind / shared.period_ns.load(Ordering::Relaxed).max(1), Ordering::Relaxed);
                    next = now;
                }
            },
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return;
            }
        }
    }
}

async fn on_text(id: usize, t: &str, shared: &Shared, ws: &mut Ws) {
    if let Some(i) = t.find("\"lg:") {
        let rest = &t[i + 4..];
        let mut parts = rest.splitn(3, [':', '"']);
        let step: usize = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        let ts: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if let Some((c, h)) = shared.steps.get(step) {
            c.delivered.fetch_add(1, Ordering::Relaxed);
            h.record(id, stats::now_us().saturating_sub(ts));
        }
        return;
    }
    match shared.target {
        Target::Chat => {
            let step = shared.step.load(Ordering::Relaxed);
            if t.starts_with("{\"type\":\"ack\"") || t.contains("\"type\":\"ack\"") {
                shared.steps[step].0.acked.fetch_add(1, Ordering::Relaxed);
            } else if t.contains("\"type\":\"error\"") {
                shared.steps[step].0.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Target::Socketio => {
            if t == "2" {
                let _ = ws.send(Message::text("3")).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::endpoint_of;

    /// On two URLs, every room of every shape has members on both, and the senders
    /// (connections 0..rooms) are split evenly.
    #[test]
    fn members_of_a_room_alternate_over_the_urls() {
        for (rooms, members) in [(250, 4), (1000, 2), (1, 200), (20, 50), (10, 100)] {
            for r in 0..rooms {
                let nodes: Vec<usize> = (0..members)
                    .map(|k| endpoint_of(k * rooms + r, rooms) % 2)
                    .collect();
                assert!(
                    nodes.contains(&0) && nodes.contains(&1),
                    "{rooms}x{members} room {r}"
                );
            }
            let senders_on_0 = (0..rooms)
                .filter(|&i| endpoint_of(i, rooms).is_multiple_of(2))
                .count();
            assert_eq!(senders_on_0, rooms.div_ceil(2), "{rooms}x{members}");
        }
    }
}
