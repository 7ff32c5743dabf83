//! Room state as this node knows it — settings, members, bans — loaded from the store once per
//! room and cached, each copy tagged with the room's state version it was loaded at. The
//! permission rules themselves live in `history_service::access`; `commands::guard` decides
//! with them on this cache.
//!
//! # Why a cached copy is safe to decide on
//! Every room-state change replaces the room's state version in the broker, in the same atomic
//! step as publishing its event, and a command decided on a copy carries the copy's version to
//! the broker step that acts on it, which refuses it when the version moved on (see
//! `crate::broker`). The version is read *before* the state: a change landing in between leaves
//! a copy newer than its version — harmless, the next check reloads it — never an old copy
//! with a current version.
//!
//! The cache is also kept current by cheaper means, which only save reloads: the room's own
//! state events drop the copy as they pass through the hub, public joins and leaves patch it in
//! place on every node ([`RoomStates::apply_members`], the other nodes from the joining node's
//! [`MemberNote`]; a read in flight replays them onto what it read), a broker reconnect drops
//! everything, and a copy older than [`MAX_AGE`] is reloaded whatever happened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use history_service::store::RoomState;
use history_service::{AnyStore, Store, StoreError};
use proto::rooms::{MemberInfo, Role};
use proto::{RoomId, Timestamp, UserRef};
use serde::{Deserialize, Serialize};

use crate::broker::{AnyBroker, Broker, BrokerError, StateVersion};

/// Cached rooms at most; past it the cache is emptied (cheap, always correct: entries reload).
const MAX_CACHED: usize = 10_000;
/// A copy older than this is reloaded: the backstop for a change whose event never got
/// published (its store write succeeded, then the broker failed).
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// A membership change that has no room event of its own (a public join or leave).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberChange {
    /// Added, or its name or role changed.
    Put(UserRef, Role),
    /// Removed (the user id).
    Removed(String),
}

/// The note a node publishes to the others with membership changes
/// (`NodeTarget::RoomState`): its worker id, then a newline and the changes as JSON. A note
/// without readable changes (an older node's, which is the id alone) makes the others drop
/// their copy of the room instead.
pub struct MemberNote<'a> {
    pub origin: u16,
    pub changes: &'a [MemberChange],
}

impl MemberNote<'_> {
    pub fn encode(&self) -> Bytes {
        let mut out = self.origin.to_string().into_bytes();
        out.push(b'\n');
        serde_json::to_writer(&mut out, self.changes).expect("changes serialize");
        Bytes::from(out)
    }

    /// The origin, and the changes when they can be read.
    pub fn decode(note: &[u8]) -> Option<(u16, Option<Vec<MemberChange>>)> {
        let (origin, changes) = match note.iter().position(|b| *b == b'\n') {
            Some(i) => (&note[..i], serde_json::from_slice(&note[i + 1..]).ok()),
            None => (note, None),
        };
        Some((std::str::from_utf8(origin).ok()?.parse().ok()?, changes))
    }
}

/// Why a room's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A room's state and the version it was loaded at.
#[derive(Clone, Debug)]
pub struct Versioned {
    pub state: Arc<RoomState>,
    pub version: StateVersion,
    /// Read from the store for this call (not from the cache).
    pub fresh: bool,
}

struct Entry {
    state: Arc<RoomState>,
    version: StateVersion,
    loaded: Instant,
}

/// A room whose state is being read: what happened to it meanwhile.
#[derive(Default)]
struct Loading {
    /// Reads in flight.
    reads: usize,
    /// Membership changes made meanwhile, in order: replayed onto what a read returns (each
    /// is idempotent, so one the read already saw changes nothing). Without them a join storm
    /// would never cache its room: a membership change lands during nearly every read.
    changes: Vec<MemberChange>,
    /// A change that cannot be replayed (a state event, a reconnect): reads in flight may
    /// predate it and are not cached.
    stale: bool,
}

/// Changes kept for reads in flight at most; past it they are not cached.
const MAX_REPLAYED: usize = 10_000;

#[derive(Default)]
struct Cache {
    rooms: HashMap<RoomId, Entry>,
    loading: HashMap<RoomId, Loading>,
}

pub struct RoomStates {
    store: Arc<AnyStore>,
    cache: Mutex<Cache>,
}

/// Takes a read off its room's [`Loading`] when it ends, also when its future is dropped.
struct Read<'a> {
    states: &'a RoomStates,
    room: &'a RoomId,
}

impl Read<'_> {
    /// The changes to replay onto what this read returned; None when it may predate a change
    /// that cannot be replayed.
    fn finish(&self, cache: &Cache) -> Option<Vec<MemberChange>> {
        let l = cache.loading.get(self.room)?;
        (!l.stale).then(|| l.changes.clone())
    }
}

impl Drop for Read<'_> {
    fn drop(&mut self) {
        let mut cache = self.states.lock();
        if let Some(l) = cache.loading.get_mut(self.room) {
            l.reads -= 1;
            if l.reads == 0 {
                cache.loading.remove(self.room);
            }
        }
    }
}

impl RoomStates {
    pub fn new(store: Arc<AnyStore>) -> Self {
        Self {
            store,
            cache: Mutex::default(),
        }
    }

    pub fn store(&self) -> &Arc<AnyStore> {
        &self.store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().expect("rooms lock")
    }

    /// The room's state, cached when there is a current copy; None when the room does not
    /// exist (or was deleted).
    pub async fn get(
        &self,
        broker: &AnyBroker,
        room: &RoomId,
    ) -> Result<Option<Versioned>, LoadError> {
        if let Some(e) = self.lock().rooms.get(room) {
            if e.loaded.elapsed() < MAX_AGE {
                return Ok(Some(Versioned {
                    state: e.state.clone(),
                    version: e.version,
                    fresh: false,
                }));
            }
        }
        self.load(broker, room).await
    }

    /// The room's state read now (version first, then the store), cached for later calls.
    pub async fn load(
        &self,
        broker: &AnyBroker,
        room: &RoomId,
    ) -> Result<Option<Versioned>, LoadError> {
        self.lock().loading.entry(room.clone()).or_default().reads += 1;
        let read = Read { states: self, room };
        let version = broker.state_version(room).await?;
        let Some(mut state) = self.store.room_state(room).await? else {
            drop(read);
            self.invalidate(room);
            return Ok(None);
        };
        // (`read` ends after `cache` unlocks: dropped in reverse order, and its end locks.)
        let mut cache = self.lock();
        let replay = read.finish(&cache);
        if let Some(changes) = &replay {
            for change in changes {
                apply(&mut state.members, change);
            }
        }
        let state = Arc::new(state);
        if replay.is_some() {
            if cache.rooms.len() >= MAX_CACHED {
                cache.rooms.clear();
            }
            let entry = Entry {
                state: state.clone(),
                version,
                loaded: Instant::now(),
            };
            cache.rooms.insert(room.clone(), entry);
        }
        Ok(Some(Versioned {
            state,
            version,
            fresh: true,
        }))
    }

    /// Applies membership changes already stored to this node's cached copy, in place: a
    /// join storm into a public room then costs no reload of the whole member list per join.
    /// Reads of the room in flight replay them onto what they read. (Plain memberships of
    /// public rooms are not versioned: nothing a member of a public room may do depends on
    /// them but `max_members` and `members_can_pin`, which tolerate a moment's delay.)
    pub fn apply_members(&self, room: &RoomId, changes: &[MemberChange]) {
        let mut cache = self.lock();
        if let Some(l) = cache.loading.get_mut(room) {
            l.changes.extend_from_slice(changes);
            l.stale |= l.changes.len() > MAX_REPLAYED;
        }
        let Some(entry) = cache.rooms.get_mut(room) else {
            return;
        };
        // Copy-on-write: a command holding the old state keeps a consistent one. One copy
        // for the whole batch: in a storm every copy is of a member list being filled.
        let members = &mut Arc::make_mut(&mut entry.state).members;
        for change in changes {
            apply(members, change);
        }
    }

    /// Forgets a room's cached state (its state changed).
    pub fn invalidate(&self, room: &RoomId) {
        let mut cache = self.lock();
        cache.rooms.remove(room);
        if let Some(l) = cache.loading.get_mut(room) {
            l.stale = true;
        }
    }

    /// Forgets every room's cached state (changes may have been missed).
    pub fn clear(&self) {
        let mut cache = self.lock();
        cache.rooms.clear();
        for l in cache.loading.values_mut() {
            l.stale = true;
        }
    }
}

/// One change, as the stores make it: a member's name and role change, the mute and join
/// time stay.
fn apply(members: &mut Vec<MemberInfo>, change: &MemberChange) {
    match change {
        MemberChange::Put(user, role) => match members.iter_mut().find(|x| x.user.id == user.id) {
            Some(x) => {
                x.user = user.clone();
                x.role = *role;
            }
            None => members.push(MemberInfo {
                user: user.clone(),
                role: *role,
                muted_until: None,
                joined_at: Timestamp::now(),
            }),
        },
        MemberChange::Removed(user) => members.retain(|x| &x.user.id != user),
    }
}

#[cfg(test)]
mod tests {
    use history_service::store::sqlite::SqliteStore;

    use super::*;

    fn user(id: &str) -> UserRef {
        UserRef {
            id: id.into(),
            name: id.into(),
        }
    }

    #[test]
    fn a_read_in_flight_replays_the_membership_changes_made_meanwhile() {
        let states = RoomStates::new(Arc::new(AnyStore::Sqlite(
            SqliteStore::open_temp().unwrap(),
        )));
        let room = RoomId::new("r").unwrap();
        let start = |states: &RoomStates| {
            states.lock().loading.entry(room.clone()).or_default().reads += 1;
        };
        start(&states);
        let read = Read {
            states: &states,
            room: &room,
        };
        let ann = MemberChange::Put(user("ann"), Role::Member);
        states.apply_members(&room, std::slice::from_ref(&ann));
        let replay = read.finish(&states.lock());
        assert_eq!(replay, Some(vec![ann]), "a join during the read");
        drop(read);
        assert!(states.lock().loading.is_empty(), "the last read ended");

        start(&states);
        let read = Read {
            states: &states,
            room: &room,
        };
        states.invalidate(&room); // a state event during the read
        assert_eq!(read.finish(&states.lock()), None, "not cached");
    }

    #[test]
    fn a_member_note_carries_its_changes_and_an_old_one_only_its_origin() {
        let ann = UserRef {
            id: "ann".into(),
            name: "Ann".into(),
        };
        let changes = vec![
            MemberChange::Put(ann, Role::Member),
            MemberChange::Removed("bob".into()),
        ];
        let note = MemberNote {
            origin: 7,
            changes: &changes,
        }
        .encode();
        assert_eq!(MemberNote::decode(&note), Some((7, Some(changes))));
        assert_eq!(
            MemberNote::decode(b"7"),
            Some((7, None)),
            "an older node's note"
        );
        assert_eq!(MemberNote::decode(b"x\n[]"), None);
    }
}
