//! Batching of store calls a join storm makes by the thousand (first-time memberships, read
//! markers): each caller queues its request and waits for its own answer; one task per kind
//! runs the queue as a batch — one store call, so in scaled mode one round trip to the
//! history service — while the next batch gathers behind it. The first request after a quiet
//! spell goes out alone at once, so a batch costs no latency at low load and grows with the
//! load (group commit).

use std::future::Future;
use std::sync::Arc;

use history_service::StoreError;
use tokio::sync::{mpsc, oneshot};

/// Requests of one batch at most (the history service takes up to
/// `history_service::internal::MAX_BATCH` per call).
pub const MAX_BATCH: usize = 256;
/// Requests waiting for their batch at most; more make the caller wait (backpressure).
const QUEUE: usize = 4096;

type Reply<V> = oneshot::Sender<Result<V, StoreError>>;

/// Runs queued requests of type `K` in batches through one function (see the module docs).
pub struct Batcher<K, V> {
    tx: mpsc::Sender<(K, Reply<V>)>,
}

impl<K: Send + 'static, V: Send + 'static> Batcher<K, V> {
    /// Starts the batch task; `run` answers a batch with one value per request, in order.
    /// Call inside the runtime.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<V>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run_batches(rx, Arc::new(run)));
        Self { tx }
    }

    /// Queues `key` and waits for its answer.
    pub async fn call(&self, key: K) -> Result<V, StoreError> {
        let stopped = || StoreError::Unavailable("the batch task stopped".into());
        let (reply, answer) = oneshot::channel();
        self.tx.send((key, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run_batches<K, V, F, Fut>(mut rx: mpsc::Receiver<(K, Reply<V>)>, run: Arc<F>)
where
    F: Fn(Vec<K>) -> Fut,
    Fut: Future<Output = Result<Vec<V>, StoreError>>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (keys, replies): (Vec<K>, Vec<Reply<V>>) = batch.drain(..).unzip();
        let n = keys.len();
        metrics::histogram!("chat_store_call_batch_size").record(n as f64);
        match run(keys).await {
            Ok(values) if values.len() == n => {
                for (reply, v) in replies.into_iter().zip(values) {
                    let _ = reply.send(Ok(v));
                }
            }
            Ok(values) => {
                let e = format!("a batch of {n} got {} answers", values.len());
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Internal(e.clone())));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(copy(&e)));
                }
            }
        }
    }
}

/// The same failure for each caller of a failed batch.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Conflict => StoreError::Conflict,
        StoreError::NotFound => StoreError::NotFound,
        other => StoreError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn requests_that_wait_together_go_out_as_one_batch() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (s, g) = (sizes.clone(), gate.clone());
        let batcher = Arc::new(Batcher::spawn(move |keys: Vec<u32>| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                s.lock().unwrap().push(keys.len());
                // Held until the test lets it go, so the others queue behind it.
                g.acquire().await.unwrap().forget();
                Ok(keys.into_iter().map(|k| k * 10).collect())
            }
        }));
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        while sizes.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (2..=5)
            .map(|k| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(k).await })
            })
            .collect();
        // Let the four queue up behind the running batch (the batch task is parked on the
        // gate, so they can only be waiting in the channel).
        while batcher.tx.capacity() > QUEUE - 4 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(2);
        assert_eq!(first.await.unwrap().unwrap(), 10);
        let mut got = Vec::new();
        for r in rest {
            got.push(r.await.unwrap().unwrap());
        }
        assert_eq!(got, vec![20, 30, 40, 50], "each caller gets its own answer");
        assert_eq!(
            *sizes.lock().unwrap(),
            vec![1, 4],
            "the first alone, then one batch"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_callers() {
        let batcher = Batcher::spawn(|_keys: Vec<u32>| async {
            Err::<Vec<u32>, _>(StoreError::Unavailable("down".into()))
        });
        match batcher.call(1).await {
            Err(StoreError::Unavailable(m)) => assert_eq!(m, "down"),
            other => panic!("{other:?}"),
        }
    }
}
