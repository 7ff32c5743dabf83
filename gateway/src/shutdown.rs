//! Graceful shutdown: one future for SIGTERM/SIGINT, then a drain capped by a deadline below
//! the orchestrator's grace period.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::errors::close;
use proto::ServerEvent;

use crate::hub::SessionHandle;
use crate::node::Node;

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Drains the node: readiness turns 503, sessions are told to reconnect at jittered times
/// within the drain window and closed with 1012 at that time, so a node's clients spread
/// their reconnects instead of stampeding. Returns when every session has ended or the
/// window (plus a little grace) is over.
pub async fn drain(node: Arc<Node>) {
    tracing::info!(seconds = node.config.drain_seconds, "draining");
    node.start_drain();
    // A session registered after this snapshot sees the node draining and closes itself
    // (`session::open` registers, then checks).
    let window_ms = node.config.drain_seconds * 1000 * 3 / 4;
    let mut plan: Vec<(u64, SessionHandle)> = node
        .hub
        .all_sessions()
        .into_iter()
        .map(|handle| {
            let after_ms = rand::random_range(0..=window_ms);
            handle.send(Bytes::from(ServerEvent::Reconnect { after_ms }.to_json()));
            (after_ms, handle)
        })
        .collect();
    plan.sort_unstable_by_key(|(after_ms, _)| *after_ms);
    let started = tokio::time::Instant::now();
    let close_on_time = async {
        for (after_ms, handle) in plan {
            tokio::time::sleep_until(started + Duration::from_millis(after_ms)).await;
            handle.close(close::RESTARTING);
        }
        std::future::pending::<()>().await
    };
    let deadline = Duration::from_secs(node.config.drain_seconds) + Duration::from_secs(2);
    let all = node.config.max_connections;
    let ended = async {
        while node.connections.available_permits() < all {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(deadline, async {
        tokio::select! {
            _ = close_on_time => {}
            _ = ended => {}
        }
    })
    .await;
    tracing::info!("drained");
}
