//! Read markers. `read {room, seq}` moves the user's marker forward only. A user reading a
//! busy room sends `read` for every message, so per node the reads of one user in one room are
//! coalesced: the first is broadcast and stored at once; later ones within [`WINDOW`] are
//! folded into one trailing broadcast and store write of the highest seq. The store keeps the
//! highest marker it is given, so replays and races between nodes never move it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use history_service::Store;
use proto::{RoomId, ServerEvent, UserRef};

use crate::broker::Broker;
use crate::node::Node;

/// Reads of one user in one room within this window produce one broadcast and one write.
pub const WINDOW: Duration = Duration::from_millis(500);
/// Markers remembered per node at most (to refuse stale reads cheaply); past it, forgotten.
const MAX_TRACKED: usize = 100_000;

#[derive(Default)]
pub struct Receipts {
    slots: Mutex<HashMap<(RoomId, String), Slot>>,
}

struct Slot {
    /// The highest marker this node broadcast.
    sent: u64,
    /// The highest read seen during the open window, not yet broadcast (0: none).
    pending: u64,
    window_open: bool,
}

enum Step {
    /// Broadcast now and open a window.
    Lead,
    /// Folded into the open window.
    Folded,
    /// Not above the known marker: nothing to do.
    Stale,
}

impl Receipts {
    fn step(&self, room: &RoomId, user: &str, seq: u64) -> Step {
        let mut slots = self.slots.lock().expect("receipts lock");
        if slots.len() >= MAX_TRACKED {
            slots.retain(|_, s| s.window_open);
        }
        let slot = slots
            .entry((room.clone(), user.to_string()))
            .or_insert(Slot {
                sent: 0,
                pending: 0,
                window_open: false,
            });
        if seq <= slot.sent.max(slot.pending) {
            Step::Stale
        } else if slot.window_open {
            slot.pending = seq;
            Step::Folded
        } else {
            slot.window_open = true;
            slot.sent = seq;
            Step::Lead
        }
    }

    /// True when this node tracks the user's marker in the room.
    fn knows(&self, room: &RoomId, user: &str) -> bool {
        let slots = self.slots.lock().expect("receipts lock");
        slots.contains_key(&(room.clone(), user.to_string()))
    }

    /// Raises the known marker to `stored` (the store's), creating the slot.
    fn seed(&self, room: &RoomId, user: &str, stored: u64) {
        let mut slots = self.slots.lock().expect("receipts lock");
        let slot = slots
            .entry((room.clone(), user.to_string()))
            .or_insert(Slot {
                sent: 0,
                pending: 0,
                window_open: false,
            });
        slot.sent = slot.sent.max(stored);
    }

    /// At the end of a window: the pending marker to broadcast (keeping the window open for
    /// another round), or None (the window closes).
    fn close_window(&self, room: &RoomId, user: &str) -> Option<u64> {
        let mut slots = self.slots.lock().expect("receipts lock");
        let slot = slots.get_mut(&(room.clone(), user.to_string()))?;
        if slot.pending > slot.sent {
            slot.sent = slot.pending;
            slot.pending = 0;
            Some(slot.sent)
        } else {
            slot.pending = 0;
            slot.window_open = false;
            None
        }
    }
}

/// Handles a `read`: returns at once with the marker the read stands for (clamped to the
/// room's last seq: a read past the end marks no future message read); broadcasting and
/// storing follow the coalescing rule.
pub async fn read(node: &Arc<Node>, room: &RoomId, user: &UserRef, seq: u64) -> u64 {
    let seq = match node.broker.recover(room, None).await {
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
    let seq = match node.broker.recover(room, None).await {
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
