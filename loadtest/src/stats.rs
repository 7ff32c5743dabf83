//! Measurements: sharded HDR histograms (many connection tasks record at once) and process
//! samples from /proc (CPU time, RSS) of the servers under test and of the generator itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

const SHARDS: usize = 8;
/// Highest recordable value: 60 s in microseconds.
const MAX_US: u64 = 60_000_000;

/// A histogram of microseconds that many tasks record into; shard by connection id.
pub struct Hist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Hist {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1, MAX_US, 3).expect("bounds")))
                .collect(),
        }
    }
}

impl Hist {
    pub fn record(&self, shard: usize, us: u64) {
        let mut h = self.shards[shard % SHARDS].lock().expect("poisoned");
        h.saturating_record(us.max(1));
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, MAX_US, 3).expect("bounds");
        for s in &self.shards {
            all.add(&*s.lock().expect("poisoned")).expect("same bounds");
        }
        all
    }
}

/// Percentiles of a histogram of microseconds, as milliseconds.
pub fn summary_ms(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64 / 1000.0 * 1000.0).round() / 1000.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "mean": (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Counters of one measurement step.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub delivered: AtomicU64,
    /// Sends the pacer skipped because the generator fell more than 1 s behind.
    pub missed: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// CPU time (utime + stime) and RSS of one process.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub cpu_us: u64,
    pub rss_kb: u64,
}

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Samples `/proc/<pid>` (`"self"` for the generator).
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_us: ticks * 1_000_000 / clk_tck(),
        rss_kb,
    })
}

/// Samples every pid; missing processes are skipped.
pub fn sample_all(pids: &[u32]) -> Vec<(u32, Option<ProcSample>)> {
    pids.iter().map(|p| (*p, sample(&p.to_string()))).collect()
}

/// CPU used between two samples of the same pids, per pid and per delivered message.
pub fn cpu_report(
    before: &[(u32, Option<ProcSample>)],
    after: &[(u32, Option<ProcSample>)],
    deliveries: u64,
) -> Value {
    let mut per = serde_json::Map::new();
    let mut total = 0u64;
    for ((pid, b), (_, a)) in before.iter().zip(after) {
        if let (Some(b), Some(a)) = (b, a) {
            let d = a.cpu_us.saturating_sub(b.cpu_us);
            total += d;
            per.insert(
                pid.to_string(),
                json!({"cpu_us": d, "rss_kb_after": a.rss_kb}),
            );
        }
    }
    json!({
        "per_pid": per,
        "total_cpu_us": total,
        "cpu_us_per_delivery": if deliveries > 0 { Some(((total as f64 / deliveries as f64) * 100.0).round() / 100.0) } else { None },
    })
}
