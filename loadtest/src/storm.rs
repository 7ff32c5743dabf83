//! Storms: `fill` — every connection joins one room (time to fill it, frames the server sent
//! per join, server CPU), then steady fan-out in that room; `rollout` — connections over
//! several gateways, one gateway drained (SIGTERM) and started again, every client behaving
//! as the web UI's client does (moves when told, honours the close's retry hint, else backs
//! off with full jitter, re-joins with `since`): time until every client is back and joined,
//! stored events missed after recovery (must be 0), peak CPU.
//!
//! Each connection is its own user here (a room's member count is its users), unlike the
//! other modes, which share users between connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Endpoint, Target, Tokens, Ws};
use crate::servers::{self, ProcSample, ServerProc};
use crate::stats::{self, Hist};
use crate::Common;

/// One token per connection (`PREFIX<i>`), signed up front: the timed part is the storm.
async fn user_tokens(common: &Common, n: usize) -> Result<Vec<Arc<str>>> {
    let tokens = common.tokens()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = match &tokens {
            Tokens::None => String::new(),
            t => t
                .token(&format!("{}{i}", common.user_prefix))
                .await
                .context("token")?,
        };
        out.push(t.into());
    }
    Ok(out)
}

fn check_count(n: usize) -> Result<()> {
    if n == 0 || n > crate::MAX_CONNECTIONS {
        bail!("--connections must be 1..={}", crate::MAX_CONNECTIONS);
    }
    Ok(())
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// `lg:<phase>:<send time in µs>` in a frame: the phase and the send time.
fn stamp(text: &str) -> Option<(usize, u64)> {
    let rest = &text[text.find("\"lg:")? + 4..];
    let mut parts = rest.splitn(3, [':', '"']);
    let phase = parts.next()?.parse().ok()?;
    let ts = parts.next()?.parse().ok()?;
    Some((phase, ts))
}

// ------------------------------------------------------------------------------------ fill

#[derive(clap::Args, Clone, Debug)]
pub struct FillArgs {
    /// Connections (users) that join the room.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// The room's id.
    #[arg(long, default_value = "lg-fill")]
    pub room: String,
    /// Seconds to wait after the last join for the room's presence updates to settle.
    #[arg(long, default_value_t = 3)]
    pub settle: u64,
    /// Sending connections in the steady phase (0: no steady phase).
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages per second in total in the steady phase.
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Seconds of steady fan-out.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
}

/// What the fill's connection tasks share.
#[derive(Default)]
struct FillShared {
    /// Frames and bytes received since each connection's `joined`.
    frames: AtomicU64,
    bytes: AtomicU64,
    /// The steady phase's sending switch, deliveries and latencies.
    sending: AtomicBool,
    period_ns: AtomicU64,
    sent: AtomicU64,
    delivered: AtomicU64,
    latency: Hist,
}

pub async fn fill(common: &Common, a: &FillArgs) -> Result<Value> {
    check_count(a.connections)?;
    if a.senders > a.connections || a.duration > crate::MAX_SECONDS || a.settle > 60 {
        bail!(
            "--senders at most --connections, --duration at most {} s, --settle at most 60 s",
            crate::MAX_SECONDS
        );
    }
    let eps = common.endpoints()?;
    let tokens = user_tokens(common, a.connections).await?;
    let shared = Arc::new(FillShared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let target = common.target;

    let before = servers::sample_all(&common.server_pid);
    let started = Instant::now();
    let jobs = tokens.iter().enumerate().map(|(i, token)| {
        let (ep, token, room) = (eps[i % eps.len()].clone(), token.clone(), a.room.clone());
        async move {
            let t = Instant::now();
            let r = async {
                let mut ws = client::open(target, &ep, &token).await?;
                client::join(&mut ws, target, &room).await?;
                anyhow::Ok(ws)
            }
            .await;
            (i, t.elapsed(), r)
        }
    });
    let mut opening = futures_util::stream::iter(jobs).buffer_unordered(common.concurrency);
    let mut join_latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut failures, mut first_error, mut tasks) = (0, None, Vec::new());
    while let Some((i, took, r)) = opening.next().await {
        match r {
            Ok(ws) => {
                join_latency.saturating_record(took.as_micros() as u64);
                let send_room = (i < a.senders).then(|| a.room.clone());
                let conn = fill_conn(i, ws, send_room, target, shared.clone(), stop_rx.clone());
                tasks.push(tokio::spawn(conn));
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let fill_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.settle)).await;
    let after_fill = servers::sample_all(&common.server_pid);
    let fill_window = started.elapsed();
    let joined = tasks.len() as u64;
    let (frames, bytes) = (
        shared.frames.load(Ordering::Relaxed),
        shared.bytes.load(Ordering::Relaxed),
    );

    let steady = if a.senders > 0 && a.duration > 0 && joined > 0 {
        let period = 1e9 / (a.rate / a.senders as f64);
        shared.period_ns.store(period as u64, Ordering::Relaxed);
        let before = servers::sample_all(&common.server_pid);
        shared.sending.store(true, Ordering::Relaxed);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(a.duration)).await;
        shared.sending.store(false, Ordering::Relaxed);
        let send_secs = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = servers::sample_all(&common.server_pid);
        let window = t.elapsed();
        let sent = shared.sent.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let expected = sent * joined;
        json!({
            "senders": a.senders,
            "target_rate": a.rate,
            "sent": sent,
            "expected_deliveries": expected,
            "delivered": delivered,
            "delivered_ratio": if expected > 0 { (delivered as f64 / expected as f64 * 1e6).round() / 1e6 } else { 0.0 },
            "deliveries_per_s": round(delivered as f64 / send_secs),
            "latency_ms": stats::summary_ms(&shared.latency.merged()),
            "server_cpu": servers::cpu_report(&common.server_pid, &before, &after, window, &[("delivery", delivered)]),
        })
    } else {
        Value::Null
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(json!({
        "target": format!("{:?}", common.target).to_lowercase(),
        "url": common.url,
        "connections": a.connections,
        "joined": joined,
        "failures": failures,
        "first_error": first_error,
        "concurrency": common.concurrency,
        "fill_secs": (fill_secs * 1000.0).round() / 1000.0,
        "joins_per_s": round(joined as f64 / fill_secs),
        "join_latency_ms": stats::summary_ms(&join_latency),
        "settle_s": a.settle,
        "frames_received": frames,
        "frames_per_join": if joined > 0 { Some(round(frames as f64 / joined as f64)) } else { None },
        "bytes_per_join": bytes.checked_div(joined),
        "server_cpu_fill": servers::cpu_report(&common.server_pid, &before, &after_fill, fill_window, &[("join", joined)]),
        "steady": steady,
    }))
}

/// A fill connection: counts what it receives, records deliveries, and (a sender) paces its
/// sends while the steady phase runs.
async fn fill_conn(
    id: usize,
    mut ws: Ws,
    send_room: Option<String>,
    target: Target,
    shared: Arc<FillShared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = Instant::now();
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    shared.frames.fetch_add(1, Ordering::Relaxed);
                    shared.bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
                    if let Some((_, ts)) = stamp(&t) {
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                        shared.latency.record(id, stats::now_us().saturating_sub(ts));
                    } else if target == Target::Socketio && t.as_str() == "2" {
                        let _ = ws.send(Message::text("3")).await;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
            _ = tokio::time::sleep_until(next), if send_room.is_some() => {
                let period = shared.period_ns.load(Ordering::Relaxed).max(1);
                if !shared.sending.load(Ordering::Relaxed) {
                    // Each sender starts at a random point of its first period (no bursts).
                    let wait = rand::rng().random_range(0..period.max(5_000_000));
                    next = Instant::now() + Duration::from_nanos(wait);
                    continue;
                }
                let room = send_room.as_deref().unwrap_or_default();
                let content = format!("lg:1:{}", stats::now_us());
                let frame = client::message_frame(target, room, &content);
                if ws.send(Message::text(frame)).await.is_err() {
                    return;
                }
                shared.sent.fetch_add(1, Ordering::Relaxed);
                // More than a second behind: the generator is saturated; skip ahead.
                next = (next + Duration::from_nanos(period)).max(Instant::now() - Duration::from_secs(1));
            },
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return;
            }
        }
    }
}

// --------------------------------------------------------------------------------- rollout

#[derive(clap::Args, Clone, Debug)]
pub struct RolloutArgs {
    /// Connections (users), spread round-robin over --url's endpoints.
    #[arg(long, default_value_t = 20_000)]
    pub connections: usize,
    /// Rooms; connection i joins room i % rooms.
    #[arg(long, default_value_t = 200)]
    pub rooms: usize,
    #[arg(long, default_value = "lgr")]
    pub room_prefix: String,
    /// Sending connections (the first ones), posting all through the rollout.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Messages per second in total.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// The gateway to drain: SIGTERM once everyone is in and --warmup has passed.
    #[arg(long)]
    pub drain_pid: u32,
    /// Shell command run once the drained gateway has exited: starts it again and prints its
    /// pid as the first line (sampled for CPU from then on).
    #[arg(long)]
    pub restart_cmd: Option<String>,
    /// Seconds of traffic before the drain.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Seconds of traffic after every client is back, before the final count.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// Seconds the rollout may take at most (drain to every client back).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Backoff of a reconnect without a hint: full jitter over [0, min(cap, start × 2^n)].
    #[arg(long, default_value_t = 500)]
    pub backoff_start_ms: u64,
    #[arg(long, default_value_t = 15_000)]
    pub backoff_cap_ms: u64,
}

/// What every rollout client reports into.
#[derive(Default)]
struct Fleet {
    /// Clients joined right now.
    joined: AtomicUsize,
    /// Connection attempts; refused upgrades; moves the server asked for (`reconnect`).
    attempts: AtomicU64,
    refused: AtomicU64,
    moved: AtomicU64,
    /// Clients that were told to move and have joined again since.
    moved_back: AtomicU64,
    /// Joins answered `recovered: false`, and the events their clients would read from
    /// history.
    not_recovered: AtomicU64,
    from_history: AtomicU64,
    /// Stored events a client's stream skipped (live or replayed), and ones it got twice.
    gaps: AtomicU64,
    duplicates: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    sending: AtomicBool,
    period_ns: AtomicU64,
    /// Time from losing a connection to being joined again, µs.
    downtime: Hist,
    /// Each client's room and last stored seq of it, at the end.
    last: Mutex<HashMap<usize, (String, u64)>>,
}

pub async fn rollout(common: &Common, a: &RolloutArgs) -> Result<Value> {
    check_count(a.connections)?;
    if common.target != Target::Chat {
        bail!("rollout needs --target chat (recovery with `since` is the gateway's)");
    }
    if a.rooms == 0 || a.rooms > a.connections || a.senders > a.connections {
        bail!("--rooms must be 1..=--connections and --senders at most --connections");
    }
    if a.timeout > crate::MAX_SECONDS || a.warmup > 60 || a.settle > 60 || a.rate <= 0.0 {
        bail!(
            "--timeout at most {} s, --warmup and --settle at most 60 s, --rate > 0",
            crate::MAX_SECONDS
        );
    }
    let eps = Arc::new(common.endpoints()?);
    let tokens = user_tokens(common, a.connections).await?;
    let fleet = Arc::new(Fleet::default());
    let period = 1e9 / (a.rate / a.senders.max(1) as f64);
    fleet.period_ns.store(period as u64, Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let watched = Arc::new(Mutex::new(common.server_pid.clone()));
    let cpu = Arc::new(Mutex::new(CpuPeaks::default()));
    let sampling = tokio::spawn(sample_cpu(cpu.clone(), watched.clone()));

    // Every room's first member first: its join creates the room, whose `room_created`
    // goes to every connection open at the time.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(a.connections);
    for ids in [0..a.rooms, a.rooms..a.connections] {
        for i in ids {
            let c = RolloutClient {
                id: i,
                room: format!("{}{}", a.room_prefix, i % a.rooms),
                token: tokens[i].clone(),
                eps: eps.clone(),
                endpoint: i % eps.len(),
                sender: i < a.senders,
                fleet: fleet.clone(),
                backoff: (a.backoff_start_ms, a.backoff_cap_ms),
            };
            tasks.push(tokio::spawn(c.run(stop_rx.clone())));
            // At most --concurrency handshakes in flight.
            while tasks.len() - fleet.joined.load(Ordering::Relaxed) >= common.concurrency {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if started.elapsed() > Duration::from_secs(a.timeout) {
                    bail!("opening took more than --timeout");
                }
            }
        }
        while fleet.joined.load(Ordering::Relaxed) < tasks.len() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if started.elapsed() > Duration::from_secs(a.timeout) {
                let joined = fleet.joined.load(Ordering::Relaxed);
                bail!("only {joined} of {} joined within --timeout", tasks.len());
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();

    fleet.sending.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    cpu.lock().expect("cpu").reset();
    let pids_before = watched.lock().expect("pids").clone();
    let before = servers::sample_all(&pids_before);
    let drain_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &a.drain_pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -TERM {} failed", a.drain_pid);
    }
    let deadline = drain_at + Duration::from_secs(a.timeout);
    let (mut exited, mut restarted, mut all_back, mut went_down) = (None, None, None, false);
    while Instant::now() < deadline && (all_back.is_none() || exited.is_none()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let joined = fleet.joined.load(Ordering::Relaxed);
        went_down |= joined < a.connections;
        if exited.is_none() && !alive(a.drain_pid) {
            exited = Some(drain_at.elapsed().as_secs_f64());
            if let Some(cmd) = &a.restart_cmd {
                let pid = restart(cmd)?;
                let name = format!("restarted-{pid}");
                watched.lock().expect("pids").push(ServerProc { name, pid });
                restarted = Some((pid, drain_at.elapsed().as_secs_f64()));
            }
        }
        // Back: everyone joined, and every client the node told to move has moved.
        let moved = fleet.moved.load(Ordering::Relaxed);
        let everyone_moved = moved > 0 && fleet.moved_back.load(Ordering::Relaxed) == moved;
        if went_down && everyone_moved && joined == a.connections && all_back.is_none() {
            all_back = Some(drain_at.elapsed().as_secs_f64());
        }
    }
    tokio::time::sleep(Duration::from_secs(a.settle)).await;
    fleet.sending.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids_after = watched.lock().expect("pids").clone();
    let after = servers::sample_all(&pids_after);
    // A restarted process counts from its start.
    let mut since_drain = before.clone();
    since_drain.resize(pids_after.len(), Some(ProcSample::default()));
    sampling.abort();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    // Every client of a room must end at the room's last seq, with no gap on the way.
    let last = fleet.last.lock().expect("last").clone();
    let mut room_last: HashMap<&str, u64> = HashMap::new();
    for (room, seq) in last.values() {
        let e = room_last.entry(room).or_default();
        *e = (*e).max(*seq);
    }
    let behind: u64 = last
        .values()
        .map(|(room, seq)| room_last[room.as_str()] - seq)
        .sum();
    let gaps = fleet.gaps.load(Ordering::Relaxed);
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let peaks = cpu.lock().expect("cpu").report();
    Ok(json!({
        "target": "chat",
        "url": common.url,
        "connections": a.connections,
        "rooms": a.rooms,
        "open_secs": round(open_secs),
        "drained_node_exited_after_s": exited.map(round),
        "restarted": restarted.map(|(pid, at)| json!({"pid": pid, "after_s": round(at)})),
        "all_back_and_joined_after_s": all_back.map(|s| (s * 1000.0).round() / 1000.0),
        "downtime_ms": stats::summary_ms(&fleet.downtime.merged()),
        "connection_attempts": count(&fleet.attempts),
        "refused_upgrades": count(&fleet.refused),
        "moves_asked": count(&fleet.moved),
        "moved_and_back": count(&fleet.moved_back),
        "messages": {"sent": count(&fleet.sent), "acked": count(&fleet.acked), "errors": count(&fleet.errors)},
        "missed_events": gaps + behind,
        "missed_detail": {"gaps_in_streams": gaps, "behind_at_end": behind},
        "joins_not_recovered": count(&fleet.not_recovered),
        "events_left_to_history": count(&fleet.from_history),
        "duplicates": count(&fleet.duplicates),
        "peak_cpu_cores": peaks,
        "server_cpu_drain_to_end": servers::cpu_report(&pids_after, &since_drain, &after, drain_at.elapsed(), &[]),
    }))
}

/// Alive, and not a zombie (exited, not yet reaped by its parent).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.get(s.rfind(')')? + 2..)
                .map(|rest| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Runs the restart command; its first line of output is the new pid.
fn restart(cmd: &str) -> Result<u32> {
    use std::io::BufRead;
    let mut child = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    line.trim()
        .parse()
        .with_context(|| format!("--restart-cmd printed {line:?}, not a pid"))
}

/// Peak CPU use (cores) per process and in total, from samples every 200 ms.
#[derive(Default)]
struct CpuPeaks {
    per_pid: HashMap<u32, f64>,
    total: f64,
}

impl CpuPeaks {
    fn reset(&mut self) {
        *self = Self::default();
    }

    fn report(&self) -> Value {
        let cores = |c: f64| json!((c * 100.0).round() / 100.0);
        let per: serde_json::Map<String, Value> = self
            .per_pid
            .iter()
            .map(|(p, c)| (p.to_string(), cores(*c)))
            .collect();
        json!({"total": cores(self.total), "per_pid": per})
    }
}

async fn sample_cpu(peaks: Arc<Mutex<CpuPeaks>>, procs: Arc<Mutex<Vec<ServerProc>>>) {
    let mut prev: HashMap<u32, (Instant, ProcSample)> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Instant::now();
        let list: Vec<u32> = procs.lock().expect("pids").iter().map(|p| p.pid).collect();
        let mut total = 0.0;
        let mut p = peaks.lock().expect("cpu");
        for pid in list {
            let Some(s) = servers::sample(&pid.to_string()) else {
                prev.remove(&pid);
                continue;
            };
            if let Some((t, before)) = prev.insert(pid, (now, s)) {
                let cpu_us = s.cpu_us.saturating_sub(before.cpu_us) as f64;
                let cores = cpu_us / (now - t).as_micros().max(1) as f64;
                total += cores;
                let e = p.per_pid.entry(pid).or_default();
                *e = e.max(cores);
            }
        }
        p.total = p.total.max(total);
    }
}

/// A frame's room id: `room` is the id, or the room's settings (with `id`).
fn room_of(f: &Value) -> Option<&str> {
    f["room"].as_str().or_else(|| f["room"]["id"].as_str())
}

/// Why a connection ended, for the next attempt's timing.
enum Ended {
    /// The server said when to come back (`reconnect {after_ms}`, or a close's
    /// `retry_after_ms`).
    Hinted(Duration),
    /// No hint: back off.
    Lost,
    Stopped,
}

struct RolloutClient {
    id: usize,
    room: String,
    token: Arc<str>,
    eps: Arc<Vec<Endpoint>>,
    endpoint: usize,
    sender: bool,
    fleet: Arc<Fleet>,
    backoff: (u64, u64),
}

/// A rollout client's position in its room's stream, how long it has been down, and whether
/// the server told it to move.
#[derive(Default)]
struct Position {
    last: Option<u64>,
    down_since: Option<Instant>,
    moving: bool,
}

impl RolloutClient {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut at = Position::default();
        let mut attempt = 0u32;
        loop {
            self.fleet.attempts.fetch_add(1, Ordering::Relaxed);
            let ep = self.eps[self.endpoint % self.eps.len()].clone();
            let ended = match client::open(Target::Chat, &ep, &self.token).await {
                Ok(ws) => {
                    attempt = 0;
                    self.session(ws, &mut at, &mut stop).await
                }
                Err(e) => {
                    if format!("{e:#}").contains("503") {
                        self.fleet.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ended::Lost
                }
            };
            let wait = match ended {
                Ended::Stopped => break,
                Ended::Hinted(d) => d,
                Ended::Lost => {
                    let (start, cap) = self.backoff;
                    let ceiling = cap.min(start.saturating_mul(1 << attempt.min(20)));
                    attempt += 1;
                    Duration::from_millis(rand::rng().random_range(0..=ceiling))
                }
            };
            at.down_since.get_or_insert_with(Instant::now);
            // Another endpoint next time, as a load balancer picks another upstream.
            self.endpoint += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => break,
            }
        }
        if let Some(seq) = at.last {
            let mut last = self.fleet.last.lock().expect("last");
            last.insert(self.id, (self.room.clone(), seq));
        }
    }

    /// One connection: joins (with `since` once it has a position), follows the room's
    /// stored events, sends when a sender, until the connection ends.
    async fn session(
        &self,
        mut ws: Ws,
        at: &mut Position,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut join = json!({"type": "join", "room": self.room, "ref": "j"});
        // What the join asks to recover from (a `room_created` seen before the first
        // `joined` moves `at.last`, not what this join asked).
        let since = at.last;
        if let Some(since) = since {
            join["since"] = json!(since);
        }
        if ws.send(Message::text(join.to_string())).await.is_err() {
            return Ended::Lost;
        }
        let mut joined = false;
        let mut move_at: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(3600);
        let mut next_send = far();
        let ended = loop {
            let wake = move_at.map_or(next_send, |m| m.min(next_send));
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(f) = serde_json::from_str::<Value>(&t) else { continue };
                        match f["type"].as_str().unwrap_or_default() {
                            "joined" if room_of(&f) == Some(self.room.as_str()) => {
                                self.on_joined(&f, since, at);
                                joined = true;
                                if self.sender {
                                    next_send = Instant::now();
                                }
                            }
                            "ack" => { self.fleet.acked.fetch_add(1, Ordering::Relaxed); }
                            "error" => {
                                self.fleet.errors.fetch_add(1, Ordering::Relaxed);
                                if f["ref"] == "j" {
                                    break Ended::Lost;
                                }
                            }
                            "reconnect" => {
                                if !at.moving {
                                    self.fleet.moved.fetch_add(1, Ordering::Relaxed);
                                    at.moving = true;
                                }
                                let after = Duration::from_millis(f["after_ms"].as_u64().unwrap_or(0));
                                move_at = Some(Instant::now() + after);
                            }
                            "receipt" => {}
                            _ if room_of(&f) == Some(self.room.as_str()) => {
                                if let Some(seq) = f["seq"].as_u64().filter(|s| *s > 0) {
                                    self.on_event(seq, at);
                                }
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        let hint = c.as_ref().and_then(|c| retry_hint(c.reason.as_str()));
                        break match (move_at, hint) {
                            (Some(m), _) => Ended::Hinted(m.saturating_duration_since(Instant::now())),
                            (None, Some(ms)) => Ended::Hinted(Duration::from_millis(ms)),
                            (None, None) => Ended::Lost,
                        };
                    }
                    Some(Ok(_)) => {}
                    _ => break match move_at {
                        Some(m) => Ended::Hinted(m.saturating_duration_since(Instant::now())),
                        None => Ended::Lost,
                    },
                },
                _ = tokio::time::sleep_until(wake) => {
                    if move_at.is_some_and(|m| Instant::now() >= m) {
                        // Told to move: go now, as the web UI's client does.
                        let _ = ws.close(None).await;
                        break Ended::Hinted(Duration::ZERO);
                    }
                    if self.fleet.sending.load(Ordering::Relaxed) {
                        let frame = json!({"type": "message", "room": self.room, "content": "rollout"});
                        if ws.send(Message::text(frame.to_string())).await.is_err() {
                            break Ended::Lost;
                        }
                        self.fleet.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    let period = self.fleet.period_ns.load(Ordering::Relaxed).max(2);
                    let jittered = rand::rng().random_range(period / 2..=period * 3 / 2);
                    next_send = Instant::now() + Duration::from_nanos(jittered);
                }
                _ = stop.changed() => {
                    let _ = ws.close(None).await;
                    break Ended::Stopped;
                }
            }
        };
        if joined {
            self.fleet.joined.fetch_sub(1, Ordering::Relaxed);
        }
        ended
    }

    fn on_joined(&self, f: &Value, since: Option<u64>, at: &mut Position) {
        let seq = f["seq"].as_u64().unwrap_or(0);
        if let (Some(_), Some(last)) = (since, at.last) {
            if f["recovered"] == true {
                // The replay came before `joined`: the stream must have reached its seq.
                self.fleet
                    .gaps
                    .fetch_add(seq.saturating_sub(last), Ordering::Relaxed);
            } else {
                self.fleet.not_recovered.fetch_add(1, Ordering::Relaxed);
                self.fleet
                    .from_history
                    .fetch_add(seq.saturating_sub(last), Ordering::Relaxed);
            }
        }
        at.last = Some(at.last.map_or(seq, |l| l.max(seq)));
        self.fleet.joined.fetch_add(1, Ordering::Relaxed);
        if std::mem::take(&mut at.moving) {
            self.fleet.moved_back.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t) = at.down_since.take() {
            self.fleet
                .downtime
                .record(self.id, t.elapsed().as_micros() as u64);
        }
    }

    fn on_event(&self, seq: u64, at: &mut Position) {
        match at.last {
            Some(l) if seq <= l => {
                self.fleet.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Some(l) => {
                self.fleet.gaps.fetch_add(seq - l - 1, Ordering::Relaxed);
                at.last = Some(seq);
            }
            None => at.last = Some(seq),
        }
    }
}

/// The `retry_after_ms=N` of a close reason.
fn retry_hint(reason: &str) -> Option<u64> {
    let rest = &reason[reason.find("retry_after_ms=")? + "retry_after_ms=".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_and_stamps_are_read_from_frames() {
        assert_eq!(retry_hint("node restarting; retry_after_ms=250"), Some(250));
        assert_eq!(retry_hint("node restarting"), None);
        assert_eq!(stamp(r#"{"content":"lg:1:123","x":1}"#), Some((1, 123)));
        assert_eq!(stamp(r#"{"content":"hello"}"#), None);
    }
}
