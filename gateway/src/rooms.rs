//! Room state as this node knows it — settings, members, bans, loaded from the store once and
//! cached — and the permission rules of PROTOCOL.md evaluated against it.
//!
//! The cache is kept current by the room's own stored events: every node delivers a room's
//! events through its hub, and the hub drops the room's cache entry *before* fanning out a
//! room-state event (see [`crate::hub::Hub::deliver`]), so a client that has seen `muted` or
//! `banned` can never act on the old state. The writer of a change stores it before
//! publishing, so the reload after an invalidation reads the new state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use history_service::store::{Ban, RoomState};
use history_service::{AnyStore, Store, StoreError};
use proto::auth::Identity;
use proto::rooms::{MemberInfo, Role, RoomInfo, Visibility};
use proto::{RoomId, Timestamp, UserRef};

/// Cached rooms at most; past it the cache is emptied (cheap, always correct: entries reload).
const MAX_CACHED: usize = 10_000;

/// Stored event types that change room state (and so invalidate the cache).
pub const STATE_EVENTS: &[&str] = &[
    "room_created",
    "room_updated",
    "room_deleted",
    "member_added",
    "member_removed",
    "member_updated",
    "banned",
    "unbanned",
    "muted",
    "unmuted",
];

/// A membership change that has no room event of its own (a public join or leave).
#[derive(Clone, Debug)]
pub enum MemberChange {
    /// Added, or its name or role changed.
    Put(UserRef, Role),
    /// Removed (the user id).
    Removed(String),
}

pub struct Rooms {
    store: Arc<AnyStore>,
    cache: Mutex<HashMap<RoomId, Arc<RoomState>>>,
    /// Bumped by every invalidation; a load that raced one does not fill the cache with what
    /// it read before the change.
    generation: AtomicU64,
}

impl Rooms {
    pub fn new(store: Arc<AnyStore>) -> Self {
        Self {
            store,
            cache: Mutex::default(),
            generation: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<AnyStore> {
        &self.store
    }

    /// The room's state; None when it does not exist (or was deleted).
    pub async fn state(&self, room: &RoomId) -> Result<Option<Arc<RoomState>>, StoreError> {
        if let Some(s) = self.cache.lock().expect("rooms lock").get(room) {
            return Ok(Some(s.clone()));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(state) = self.store.room_state(room).await? else {
            return Ok(None);
        };
        let state = Arc::new(state);
        let mut cache = self.cache.lock().expect("rooms lock");
        if self.generation.load(Ordering::Acquire) == generation {
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(room.clone(), state.clone());
        }
        Ok(Some(state))
    }

    /// Applies a membership change this node just stored to its cached state, in place: a
    /// join storm into a public room then costs no reload of the whole member list per join.
    /// Like an invalidation it bumps the generation, so a load that read the store before the
    /// change does not put its older copy in the cache.
    pub fn apply_member(&self, room: &RoomId, change: &MemberChange) {
        let mut cache = self.cache.lock().expect("rooms lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        let Some(state) = cache.get_mut(room) else {
            return;
        };
        // Copy-on-write: a command holding the old state keeps a consistent one.
        let members = &mut Arc::make_mut(state).members;
        match change {
            // As the stores do: a member's name and role change, the mute and join time stay.
            MemberChange::Put(user, role) => {
                match members.iter_mut().find(|x| x.user.id == user.id) {
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
                }
            }
            MemberChange::Removed(user) => members.retain(|x| &x.user.id != user),
        }
    }

    /// Forgets a room's cached state (its state changed).
    pub fn invalidate(&self, room: &RoomId) {
        let mut cache = self.cache.lock().expect("rooms lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        cache.remove(room);
    }
}

/// What one user may do in one room, from its state at one instant.
pub struct Access<'a> {
    pub state: &'a RoomState,
    pub member: Option<&'a MemberInfo>,
    pub ban: Option<&'a Ban>,
    pub global_admin: bool,
    pub now: Timestamp,
}

impl<'a> Access<'a> {
    pub fn of(state: &'a RoomState, who: &Identity) -> Self {
        let now = Timestamp::now();
        Self {
            member: state.members.iter().find(|m| m.user.id == who.user.id),
            ban: state
                .bans
                .iter()
                .find(|b| b.user.id == who.user.id && b.active_at(now)),
            global_admin: who.admin,
            state,
            now,
        }
    }

    pub fn info(&self) -> &RoomInfo {
        &self.state.info
    }

    pub fn role(&self) -> Option<Role> {
        self.member.map(|m| m.role)
    }

    pub fn banned(&self) -> bool {
        self.ban.is_some() && !self.global_admin
    }

    /// Room admin or owner, or a global admin.
    pub fn moderates(&self) -> bool {
        self.global_admin || self.role() >= Some(Role::Admin)
    }

    /// May join and read: public and restricted rooms for anyone, private for members.
    pub fn may_read(&self) -> bool {
        !self.banned()
            && (self.info().visibility != Visibility::Private
                || self.member.is_some()
                || self.global_admin)
    }

    /// May post and type: public rooms for anyone who may read, the others for members.
    pub fn may_post(&self) -> bool {
        self.may_read()
            && (self.info().visibility == Visibility::Public
                || self.member.is_some()
                || self.global_admin)
    }

    /// Until when the user is muted (None: not muted now).
    pub fn muted_until(&self) -> Option<Timestamp> {
        self.member
            .and_then(|m| m.muted_until)
            .filter(|t| *t > self.now)
    }

    pub fn may_pin(&self) -> bool {
        self.moderates() || (self.info().members_can_pin && self.member.is_some())
    }

    /// Members (not counting readers of restricted rooms).
    pub fn member_count(&self) -> usize {
        self.state.members.len()
    }

    /// The target's membership in this room.
    pub fn member_of(&self, user: &str) -> Option<&'a MemberInfo> {
        self.state.members.iter().find(|m| m.user.id == user)
    }

    /// May this user act on `target` (kick, ban, mute, change role)? Moderators act on lower
    /// roles only; nobody acts on the owner; global admins act on anyone but the owner.
    pub fn outranks(&self, target: &str) -> bool {
        let theirs = self.member_of(target).map(|m| m.role);
        if theirs == Some(Role::Owner) {
            return false;
        }
        if self.global_admin || self.role() == Some(Role::Owner) {
            return true;
        }
        self.role() >= Some(Role::Admin) && theirs.unwrap_or(Role::Member) < Role::Admin
    }
}
