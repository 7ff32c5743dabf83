//! `read`: the user has read the room up to `seq`. The marker only moves forward; reads are
//! coalesced per node ([`crate::receipts`]).

use std::sync::Arc;

use bytes::Bytes;
use history_service::Store;
use proto::client::Read;
use proto::{ErrorCode, RoomId, ServerEvent, UserRef};

use super::{err, must_be_in, Ack, Result, RunOnSession, SessionCx};
use crate::broker::Broker;
use crate::node::Node;
use crate::receipts::{Step, WINDOW};

impl RunOnSession for Read {
    async fn run(self, cx: &mut SessionCx<'_>) -> Result<Option<ServerEvent>> {
        let Read { room, seq } = self;
        must_be_in(cx.node, cx.caller, &room).await?;
        if seq == 0 {
            return Err(err(ErrorCode::Invalid, "seq must be at least 1"));
        }
        let seq = read(cx.node, &room, cx.caller.user(), seq).await;
        // Reads are frequent: answered only when the client asks (sends a `ref`).
        let r#ref = cx.r#ref.clone();
        Ok(r#ref.is_some().then(|| Ack::seq(seq).into_event(r#ref)))
    }
}

/// Handles a `read`: returns at once with the marker the read stands for (clamped to the
/// room's last seq: a read past the end marks no future message read); broadcasting and
/// storing follow the coalescing rule.
async fn read(node: &Arc<Node>, room: &RoomId, user: &UserRef, seq: u64) -> u64 {
    let seq = match node.broker.recover(room, None, None).await {
        Ok(r) => seq.min(r.last_seq),
        Err(e) => {
            tracing::warn!(error = %e, %room, "receipt dropped: broker unavailable");
            return seq;
        }
    };
    if !node.receipts.knows(room, &user.id) {
        // First read of this user here (or after a restart): start from the stored marker, so
        // an older read is not broadcast as if the marker went back.
        match node.rooms.store().marker(room, &user.id).await {
            Ok(stored) => node.receipts.seed(room, &user.id, stored.unwrap_or(0)),
            Err(e) => tracing::warn!(error = %e, %room, "read markers unavailable"),
        }
    }
    match node.receipts.step(room, &user.id, seq) {
        Step::Stale | Step::Folded => {}
        Step::Lead => {
            publish(node, room, user, seq).await;
            let node = node.clone();
            let (room, user) = (room.clone(), user.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(WINDOW).await;
                    match node.receipts.close_window(&room, &user.id) {
                        Some(seq) => publish(&node, &room, &user, seq).await,
                        None => break,
                    }
                }
            });
        }
    }
    seq
}

async fn publish(node: &Node, room: &RoomId, user: &UserRef, seq: u64) {
    // A marker past the room's last event would mark future messages read.
    let seq = match node.broker.recover(room, None, None).await {
        Ok(r) => seq.min(r.last_seq),
        Err(e) => {
            tracing::warn!(error = %e, %room, "receipt dropped: broker unavailable");
            return;
        }
    };
    let frame = Bytes::from(
        ServerEvent::Receipt {
            room: room.clone(),
            user: user.clone(),
            seq,
        }
        .to_json(),
    );
    if let Err(e) = node.broker.persist(frame.clone()).await {
        tracing::warn!(error = %e, %room, "receipt not stored");
    }
    node.publish_ephemeral_frame(room, frame).await;
}
