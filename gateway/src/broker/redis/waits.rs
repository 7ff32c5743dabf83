//! `WAIT` for replicas (`CHAT_REDIS_WAIT_REPLICAS`), shared by every publish it covers.
//!
//! `WAIT` blocks the client connection it is sent on until the replicas have everything that
//! connection wrote before it, and our command connections are multiplexed: one `WAIT` per
//! publish held every publish queued behind it on the connection for a replication round
//! trip each (at 5,000 msg/s half the messages missed the benchmark's window). So there is at
//! most one `WAIT` in flight per connection and partition; a publish whose write returned
//! before that `WAIT` was sent is covered by it, and the others share the next one. Under load
//! one `WAIT` covers many publishes; alone, a publish waits for one round trip, as before.
//!
//! Per partition, because on a Redis Cluster the `WAIT` goes to the primary that owns the
//! partition's slot and covers only what was written there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use history_service::redis_conn::Redis;
use tokio::sync::{watch, Mutex};

/// What one `WAIT` answered: how many replicas confirmed, or why it failed.
type Answer = Result<u32, String>;

/// One connection's `WAIT`s to one partition's primary.
struct Gate {
    /// Held while a `WAIT` is in flight.
    lead: Mutex<()>,
    /// `WAIT`s started so far: the n-th started covers every write that returned before it.
    started: AtomicU64,
    /// The latest finished `WAIT`: (its number, its answer). A later one covers everything an
    /// earlier one did, so only the highest number is kept.
    done: watch::Sender<(u64, Answer)>,
}

impl Gate {
    fn new() -> Self {
        Self {
            lead: Mutex::new(()),
            started: AtomicU64::new(0),
            done: watch::Sender::new((0, Ok(0))),
        }
    }
}

/// The gates of every command connection × partition.
pub struct Waits {
    partitions: usize,
    gates: Vec<Gate>,
}

impl Waits {
    pub fn new(connections: usize, partitions: u16) -> Self {
        let partitions = usize::from(partitions.max(1));
        Self {
            partitions,
            gates: (0..connections * partitions).map(|_| Gate::new()).collect(),
        }
    }

    /// How many replicas (up to `want`) have everything connection number `i` (`conn`) wrote
    /// to partition `partition` (whose key `key` routes the `WAIT`) before this call.
    pub async fn replicas(
        &self,
        i: usize,
        conn: &mut Redis,
        partition: u16,
        key: &str,
        want: u32,
        timeout: Duration,
    ) -> Answer {
        let gate = &self.gates[i * self.partitions + usize::from(partition) % self.partitions];
        // Our write has returned: a `WAIT` numbered above what has started now covers it.
        let need = gate.started.load(Ordering::SeqCst) + 1;
        let mut done = gate.done.subscribe();
        loop {
            {
                let (n, answer) = &*done.borrow_and_update();
                if *n >= need {
                    return answer.clone();
                }
            }
            if let Ok(lead) = gate.lead.try_lock() {
                let n = gate.started.fetch_add(1, Ordering::SeqCst) + 1;
                let answer = conn
                    .wait_replicas(key, want, timeout)
                    .await
                    .map_err(|e| e.to_string());
                drop(lead);
                gate.done.send_modify(|(last, a)| {
                    if n > *last {
                        (*last, *a) = (n, answer.clone());
                    }
                });
                return answer;
            }
            // A `WAIT` is in flight; it may have started before our write: wait for its end,
            // then look again (it covers us, or we lead the next one).
            if done.changed().await.is_err() {
                return Err("broker shutting down".into());
            }
        }
    }
}
