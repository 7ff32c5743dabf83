//! Presence announcements per room, and how they scale with the room's size (the node
//! announces: `Node::presence_changed`, `Node::online_changed`).
//!
//! - **Small rooms** (at most `CHAT_PRESENCE_COALESCE_ABOVE` users online): a user who comes
//!   online or goes offline is announced at once to the room (`join`/`leave`), and the room's
//!   `online_users` is coalesced per window (below).
//! - **Big rooms**: no `join`/`leave` per user — filling a room of N users would send every
//!   member a notice per joiner, O(N²) frames. Who came and went is folded into the room's
//!   next `online_users`, which then also carries `joined`/`left` (up to [`CHANGES_MAX`]
//!   users each) and `joined_count`/`left_count` (exact), besides the exact online `count`
//!   and a capped list. As large chat services do for big channels.
//!
//! The windows, per room and node: a change announces at once when the room had no
//! announcement from this node during the last interval; later changes within the interval
//! fold into one trailing announcement at its end (which opens the next window). So each
//! node sends a room at most one `online_users` per interval.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::{RoomId, UserRef};

/// Users listed in an announcement's `joined` and in its `left` at most (the counts are
/// exact).
pub const CHANGES_MAX: usize = 20;

/// A user who came online in a room, or went offline.
#[derive(Clone, Debug)]
pub enum Change {
    Joined(UserRef),
    Left(UserRef),
}

/// Users who came (or went) since the last announcement: some of them, and how many.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    pub users: Vec<UserRef>,
    pub count: u64,
}

impl Changes {
    fn add(&mut self, user: UserRef) {
        self.count += 1;
        if self.users.len() < CHANGES_MAX && !self.users.iter().any(|u| u.id == user.id) {
            self.users.push(user);
        }
    }
}

/// A room's open window.
#[derive(Default)]
struct Window {
    /// Presence changed since the last announcement.
    changed: bool,
    /// Big rooms' changes not announced yet.
    joined: Changes,
    left: Changes,
    /// Whether `joined`/`left` hold anything to announce (a folded change, even a count).
    folded: bool,
}

/// Rooms with an open window (see the module docs).
#[derive(Default)]
pub struct Online {
    open: Mutex<HashMap<RoomId, Window>>,
}

impl Online {
    /// Records that the room's presence changed (`folded`: a big room's change, to be listed
    /// in its next announcement). True when the room had no open window: the caller
    /// announces now, and a window opens.
    pub fn lead(&self, room: &RoomId, folded: Option<Change>) -> bool {
        let mut open = self.open.lock().expect("online lock");
        let (window, lead) = match open.get_mut(room) {
            Some(w) => {
                w.changed = true;
                (w, false)
            }
            None => (open.entry(room.clone()).or_default(), true),
        };
        match folded {
            Some(Change::Joined(u)) => window.joined.add(u),
            Some(Change::Left(u)) => window.left.add(u),
            None => return lead,
        }
        window.folded = true;
        lead
    }

    /// The big-room changes folded since the last announcement (None: none), which the
    /// announcement being made now carries.
    pub fn take_changes(&self, room: &RoomId) -> Option<(Changes, Changes)> {
        let mut open = self.open.lock().expect("online lock");
        let w = open.get_mut(room).filter(|w| w.folded)?;
        w.folded = false;
        Some((std::mem::take(&mut w.joined), std::mem::take(&mut w.left)))
    }

    /// At the end of a window: true when presence changed during it (announce; the next
    /// window opens), false closes the room's window.
    pub fn trail(&self, room: &RoomId) -> bool {
        let mut open = self.open.lock().expect("online lock");
        match open.get_mut(room) {
            Some(w) if w.changed => {
                w.changed = false;
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

    fn user(id: &str) -> UserRef {
        UserRef {
            id: id.into(),
            name: id.into(),
        }
    }

    #[test]
    fn changes_within_a_window_fold_into_one_trailing_announcement() {
        let o = Online::default();
        let room = RoomId::new("r").unwrap();
        assert!(o.lead(&room, None), "the first change announces at once");
        assert!(!o.lead(&room, None));
        assert!(!o.lead(&room, None));
        assert!(
            o.trail(&room),
            "the folded changes make one trailing announcement"
        );
        assert!(!o.trail(&room), "a quiet window closes");
        assert!(o.lead(&room, None), "and the next change leads again");
    }

    #[test]
    fn a_big_rooms_changes_are_counted_exactly_and_listed_in_part() {
        let o = Online::default();
        let room = RoomId::new("r").unwrap();
        assert!(o.lead(&room, Some(Change::Joined(user("a")))));
        let (joined, left) = o.take_changes(&room).expect("the leading change");
        assert_eq!((joined.count, joined.users.len(), left.count), (1, 1, 0));
        assert_eq!(o.take_changes(&room), None, "nothing new");
        for i in 0..50 {
            assert!(!o.lead(&room, Some(Change::Joined(user(&format!("j{i}"))))));
        }
        o.lead(&room, Some(Change::Left(user("a"))));
        o.lead(&room, Some(Change::Joined(user("j0")))); // again: counted, listed once
        assert!(o.trail(&room));
        let (joined, left) = o.take_changes(&room).unwrap();
        assert_eq!(joined.count, 51);
        assert_eq!(joined.users.len(), CHANGES_MAX);
        assert_eq!(left.count, 1);
        assert_eq!(left.users, vec![user("a")]);
    }
}
