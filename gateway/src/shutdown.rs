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
/// spread evenly over three quarters of the drain window ([`plan`]), and closed with 1012 at
/// that time (the close's reason says to come back at once: `retry_after_ms=0`), so a node's
/// clients arrive at the other nodes at a steady rate instead of stampeding. Returns when
/// every session has ended or the window (plus a little grace) is over.
pub async fn drain(node: Arc<Node>) {
    tracing::info!(seconds = node.config.drain_seconds, "draining");
    node.start_drain();
    // A session registered after this snapshot sees the node draining and closes itself
    // (`session::open` registers, then checks).
    let window_ms = node.config.drain_seconds * 1000 * 3 / 4;
    let plan = plan(node.hub.all_sessions(), window_ms);
    for (after_ms, handle) in &plan {
        let after_ms = *after_ms;
        handle.send(Bytes::from(ServerEvent::Reconnect { after_ms }.to_json()));
    }
    let started = tokio::time::Instant::now();
    let close_on_time = async {
        for (after_ms, handle) in plan {
            tokio::time::sleep_until(started + Duration::from_millis(after_ms)).await;
            handle.close_with_retry(close::RESTARTING, 0);
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

/// When each session goes, in ms from now, in time order: the window is cut into one slot
/// per session and each session leaves at a random moment of its own slot (the sessions
/// shuffled over the slots) — jittered, yet as many per second all through the window, where
/// independent random times would bunch up here and there.
pub fn plan(mut sessions: Vec<SessionHandle>, window_ms: u64) -> Vec<(u64, SessionHandle)> {
    use rand::seq::SliceRandom;
    sessions.shuffle(&mut rand::rng());
    let n = sessions.len().max(1) as u64;
    sessions
        .into_iter()
        .enumerate()
        .map(|(i, handle)| {
            let (from, to) = (i as u64 * window_ms / n, (i as u64 + 1) * window_ms / n);
            let at = if to > from {
                rand::random_range(from..to)
            } else {
                from
            };
            (at, handle)
        })
        .collect()
}

/// A session that opened after the drain began: told to reconnect within
/// [`LATE_SPREAD_MS`] (jittered) and closed now, its close carrying the same hint.
pub fn turn_away(handle: &SessionHandle) {
    let after_ms = rand::random_range(0..=LATE_SPREAD_MS);
    handle.send(Bytes::from(ServerEvent::Reconnect { after_ms }.to_json()));
    handle.close_with_retry(close::RESTARTING, after_ms as u32);
}

/// Sessions turned away while the node drains come back within this many ms.
pub const LATE_SPREAD_MS: u64 = 1000;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proto::UserRef;

    use super::*;
    use crate::outbox::Outbox;

    #[test]
    fn a_drain_spreads_its_closes_evenly_over_the_window() {
        let sessions: Vec<SessionHandle> = (0..40)
            .map(|id| {
                let user = Arc::new(UserRef {
                    id: format!("u{id}"),
                    name: "u".into(),
                });
                SessionHandle::new(id, user, false, Arc::new(Outbox::new(16)))
            })
            .collect();
        let plan = plan(sessions, 4000);
        let times: Vec<u64> = plan.iter().map(|(t, _)| *t).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "in time order");
        assert!(times.iter().all(|t| *t < 4000));
        // One per 100 ms slot: every quarter of the window holds exactly a quarter of them.
        for q in 0..4u64 {
            let within = times
                .iter()
                .filter(|t| (q * 1000..(q + 1) * 1000).contains(*t))
                .count();
            assert_eq!(within, 10, "quarter {q}");
        }
        let mut ids: Vec<u64> = plan.iter().map(|(_, h)| h.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..40).collect::<Vec<_>>(), "every session once");
    }
}
