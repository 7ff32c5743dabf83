//! Graceful shutdown: one future for SIGTERM/SIGINT, then a drain capped by a deadline below
//! the orchestrator's grace period.

use std::sync::Arc;
use std::time::Duration;

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
/// within the drain window and closed with 1012. Returns when every session has ended or the
/// window (plus a little grace) is over.
pub async fn drain(node: Arc<Node>) {
    tracing::info!(seconds = node.config.drain_seconds, "draining");
    node.start_drain();
    let deadline = Duration::from_secs(node.config.drain_seconds) + Duration::from_secs(2);
    let all = node.config.max_connections;
    let _ = tokio::time::timeout(deadline, async {
        while node.connections.available_permits() < all {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tracing::info!("drained");
}
