//! Measurements of the generator's side: sharded HDR histograms (many connection tasks record
//! at once) and step counters. What the servers spent is `servers`.

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
