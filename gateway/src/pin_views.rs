//! Each room's pinned messages as this node last put them together for a `joined`, so a join
//! storm reads a room's pins from the store once per node instead of once per join (scaled
//! out, each read is a round trip to the history service).
//!
//! # Why a cached copy is good enough for `joined.pins`
//! *Which* messages are pinned is never taken from the cache alone: every join's window read
//! returns the broker's pin set ([`crate::broker::Recovery::pins`]), which takes every pin
//! and unpin before its event is published, and a copy is used only when it holds exactly
//! those ids — so a pin acknowledged on any node before the join is in `joined.pins`. Without
//! a pin set (no pin changed since the broker's data began) the store's pins are current, and
//! so is a copy read from it after that. What the copy can miss is a change to a pinned
//! message's view (an edit; a pin's `by` after an unpin and a new pin): the room's `pinned`,
//! `unpinned`, `message_edited` and `message_deleted` events drop the copy as they pass
//! through this node, and a copy older than [`MAX_AGE`] is read again (the node hears a
//! room's events only while one of its sessions is in it). A broker reconnect drops them all.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::rooms::PinView;
use proto::{MessageId, RoomId};

/// A copy older than this is read again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Rooms cached at most; past it the cache is emptied (entries reload).
const MAX_CACHED: usize = 10_000;

struct Entry {
    pins: Arc<Vec<PinView>>,
    loaded: Instant,
}

#[derive(Default)]
pub struct PinViews {
    rooms: Mutex<HashMap<RoomId, Entry>>,
    /// Bumped by every drop; a copy put together before one is not cached.
    generation: AtomicU64,
}

impl PinViews {
    /// The room's cached pins when they are current for the broker's pin set `ids` (see the
    /// module docs).
    pub fn get(&self, room: &RoomId, ids: Option<&[MessageId]>) -> Option<Arc<Vec<PinView>>> {
        let rooms = self.rooms.lock().expect("pin views lock");
        let e = rooms.get(room)?;
        if e.loaded.elapsed() >= MAX_AGE {
            return None;
        }
        let same = ids.is_none_or(|ids| {
            ids.len() == e.pins.len() && {
                let cached: HashSet<MessageId> = e.pins.iter().map(|p| p.message.id).collect();
                ids.iter().all(|id| cached.contains(id))
            }
        });
        same.then(|| e.pins.clone())
    }

    /// Call before reading what [`Self::put`] will cache.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches a room's pins put together from reads that started at `generation`; dropped
    /// when the room's pins may have changed since.
    pub fn put(&self, room: &RoomId, pins: Arc<Vec<PinView>>, generation: u64) {
        let mut rooms = self.rooms.lock().expect("pin views lock");
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if rooms.len() >= MAX_CACHED {
            rooms.clear();
        }
        let loaded = Instant::now();
        rooms.insert(room.clone(), Entry { pins, loaded });
    }

    /// Drops a room's copy (one of its pinned views may have changed).
    pub fn invalidate(&self, room: &RoomId) {
        let mut rooms = self.rooms.lock().expect("pin views lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        rooms.remove(room);
    }

    /// Drops every copy (events may have been missed).
    pub fn clear(&self) {
        let mut rooms = self.rooms.lock().expect("pin views lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        rooms.clear();
    }
}

#[cfg(test)]
mod tests {
    use proto::rooms::MessageView;
    use proto::{Timestamp, UserRef};

    use super::*;

    fn pin(id: u64) -> PinView {
        let user = UserRef {
            id: "u".into(),
            name: "u".into(),
        };
        PinView {
            message: MessageView {
                room: RoomId::new("r").unwrap(),
                id: MessageId(id),
                seq: id,
                user: user.clone(),
                content: None,
                ts: Timestamp(0),
                reply_to: None,
                edited_at: None,
                deleted: false,
            },
            by: user,
            pinned_at: Timestamp(0),
        }
    }

    #[test]
    fn a_copy_serves_only_the_pin_set_it_holds() {
        let views = PinViews::default();
        let room = RoomId::new("r").unwrap();
        views.put(&room, Arc::new(vec![pin(1), pin(2)]), views.generation());
        let ids = [MessageId(2), MessageId(1)];
        assert!(
            views.get(&room, Some(&ids)).is_some(),
            "same ids, any order"
        );
        assert!(
            views.get(&room, None).is_some(),
            "no pin set: the copy stands"
        );
        assert!(
            views.get(&room, Some(&[MessageId(1)])).is_none(),
            "an unpin"
        );
        let more = [MessageId(1), MessageId(2), MessageId(3)];
        assert!(views.get(&room, Some(&more)).is_none(), "a new pin");
    }

    #[test]
    fn a_copy_read_before_a_change_is_not_cached() {
        let views = PinViews::default();
        let room = RoomId::new("r").unwrap();
        let before = views.generation();
        views.invalidate(&room); // an edit passed while the copy was being read
        views.put(&room, Arc::new(vec![pin(1)]), before);
        assert!(views.get(&room, None).is_none());
    }
}
