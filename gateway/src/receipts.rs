//! Read markers: the per-node bookkeeping that coalesces reads (the `read` command itself is
//! `commands::receipts`). A user reading a busy room sends `read` for every message, so per
//! node the reads of one user in one room are coalesced: the first is broadcast and stored at
//! once; later ones within [`WINDOW`] are folded into one trailing broadcast and store write of
//! the highest seq. The store keeps the highest marker it is given, so replays and races
//! between nodes never move it back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use proto::RoomId;

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

pub enum Step {
    /// Broadcast now and open a window.
    Lead,
    /// Folded into the open window.
    Folded,
    /// Not above the known marker: nothing to do.
    Stale,
}

impl Receipts {
    pub fn step(&self, room: &RoomId, user: &str, seq: u64) -> Step {
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
    pub fn knows(&self, room: &RoomId, user: &str) -> bool {
        let slots = self.slots.lock().expect("receipts lock");
        slots.contains_key(&(room.clone(), user.to_string()))
    }

    /// Raises the known marker to `stored` (the store's), creating the slot.
    pub fn seed(&self, room: &RoomId, user: &str, stored: u64) {
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
    pub fn close_window(&self, room: &RoomId, user: &str) -> Option<u64> {
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
