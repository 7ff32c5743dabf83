//! `online_users` announcements, coalesced per room (the windows; the node announces:
//! `Node::online_changed`). A join or leave announces the room's
//! online users at once when the room had no announcement during the last [`WINDOW`]; later
//! changes within the window fold into one trailing announcement at its end (which opens the
//! next window). A connection storm into a room of N users so costs each member a few frames
//! per window instead of one per joiner — O(N) frames instead of O(N²).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use proto::RoomId;

pub const WINDOW: Duration = Duration::from_millis(500);

/// Rooms with an open window, and whether their presence changed during it.
#[derive(Default)]
pub struct Online {
    open: Mutex<HashMap<RoomId, bool>>,
}

impl Online {
    /// True when the room had no open window: the caller announces now, and a window opens.
    pub fn lead(&self, room: &RoomId) -> bool {
        let mut open = self.open.lock().expect("online lock");
        match open.get_mut(room) {
            Some(changed) => {
                *changed = true;
                false
            }
            None => {
                open.insert(room.clone(), false);
                true
            }
        }
    }

    /// At the end of a window: true when presence changed during it (announce; the next
    /// window opens), false closes the room's window.
    pub fn trail(&self, room: &RoomId) -> bool {
        let mut open = self.open.lock().expect("online lock");
        match open.get_mut(room) {
            Some(changed) if *changed => {
                *changed = false;
                true
            }
            _ => {
                open.remove(room);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_within_a_window_fold_into_one_trailing_announcement() {
        let o = Online::default();
        let room = RoomId::new("r").unwrap();
        assert!(o.lead(&room), "the first change announces at once");
        assert!(!o.lead(&room));
        assert!(!o.lead(&room));
        assert!(
            o.trail(&room),
            "the folded changes make one trailing announcement"
        );
        assert!(!o.trail(&room), "a quiet window closes");
        assert!(o.lead(&room), "and the next change leads again");
    }
}
