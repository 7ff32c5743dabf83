//! The embedded mode's persistence log: a bounded queue from the in-process broker into one
//! ingest task that writes batches to the store. A stored event's publisher waits until its
//! batch is committed, so an acknowledged message is on disk; fan-out never waits for it.
//! (Scaled out, the Redis persistence stream plays this role and the history service ingests.)
//! Each batch is one `store_batch` span, linked to the publishes it contains.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry::trace::SpanContext;
use proto::ServerEvent;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Why a frame was not committed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("store writer stopped")]
    Stopped,
    #[error("store did not commit in time")]
    Timeout,
}

/// Frames waiting for the store at most; a full queue makes publishers wait (backpressure on
/// senders only).
const QUEUE: usize = 8192;
const BATCH: usize = 512;
/// How long a publisher waits for its commit before answering `unavailable`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Links a `store_batch` span records at most.
const MAX_LINKS: usize = 32;

/// A frame, who waits for its commit, and the publisher's span (traced only) to link to.
type Job = (Bytes, Option<oneshot::Sender<()>>, Option<SpanContext>);

/// Writes one batch durably; the error is logged and the batch retried.
pub type ApplyFn = Arc<
    dyn Fn(Vec<ServerEvent>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone)]
pub struct PersistQueue {
    tx: mpsc::Sender<Job>,
    healthy: Arc<AtomicBool>,
}

impl PersistQueue {
    /// Starts the ingest task.
    pub fn spawn(apply: ApplyFn) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        tokio::spawn(ingest(rx, apply, healthy.clone()));
        Self { tx, healthy }
    }

    /// Appends a frame and waits until it is committed.
    pub async fn append_and_wait(&self, frame: Bytes) -> Result<(), PersistError> {
        let (done, committed) = oneshot::channel();
        self.tx
            .send((frame, Some(done), publisher()))
            .await
            .map_err(|_| PersistError::Stopped)?;
        match tokio::time::timeout(COMMIT_TIMEOUT, committed).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(PersistError::Timeout),
        }
    }

    /// Appends a frame without waiting for the commit (read receipts).
    pub async fn append(&self, frame: Bytes) -> Result<(), PersistError> {
        self.tx
            .send((frame, None, publisher()))
            .await
            .map_err(|_| PersistError::Stopped)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

async fn ingest(mut rx: mpsc::Receiver<Job>, apply: ApplyFn, healthy: Arc<AtomicBool>) {
    let mut jobs = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
        let events: Vec<ServerEvent> = jobs
            .iter()
            .filter_map(|(frame, _, _)| match serde_json::from_slice(frame) {
                Ok(ev) => Some(ev),
                Err(e) => {
                    tracing::error!(error = %e, "undecodable frame in persistence queue");
                    None
                }
            })
            .collect();
        let span = tracing::info_span!("store_batch", entries = events.len());
        for sc in jobs
            .iter()
            .filter_map(|(_, _, sc)| sc.clone())
            .take(MAX_LINKS)
        {
            span.add_link(sc);
        }
        store(&apply, &events, &healthy).instrument(span).await;
        for (_, done, _) in jobs.drain(..) {
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }
}

/// Writes one batch, retrying until the store takes it.
async fn store(apply: &ApplyFn, events: &[ServerEvent], healthy: &AtomicBool) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        match apply(events.to_vec()).await {
            Ok(()) => {
                metrics::histogram!("chat_store_batch_seconds").record(started.elapsed());
                healthy.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, batch = events.len(), "store write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The appending span (the broker publish) when traces are exported, for the batch to link.
fn publisher() -> Option<SpanContext> {
    history_service::telemetry::span_context(&tracing::Span::current())
}
