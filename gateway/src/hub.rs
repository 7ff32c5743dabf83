//! The local registry: which sessions of this node are in which room, and which sessions
//! belong to which user. Sharded (64 shards each) so that joins in one room do not lock
//! others; a shard lock is never held across an `.await` (std locks, short sections).
//!
//! Fan-out enqueues the same [`Bytes`] to every local recipient with `try_send`: a full
//! queue means a slow client, which is closed with 1013 — the room never waits for it.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use bytes::Bytes;
use proto::errors::close;
use proto::server::Evicts;
use proto::{EventKind, RoomId, UserRef};

use crate::outbox::{Full, Outbound, Outbox};

const SHARDS: usize = 64;

/// Local members up to which a fan-out writes each idle member's socket itself, under the
/// room's lock (one `send` each, no task wake-up). A larger room's fan-out queues to the
/// members' writers instead, so the sends spread over every core and the lock is held for
/// queue pushes only.
pub const DIRECT_FANOUT: usize = 256;

/// Answers a session's reader holds for one write at most ([`SessionHandle::hold`]): a
/// client that sends a long burst of commands gets its answers in writes of this many. Half
/// the smallest queue a node allows (16): the room's frames for the session fit beside them.
pub const HOLD_MAX: usize = 8;

pub type SessionId = u64;

/// A handle to one session's outbound queue.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub id: SessionId,
    pub user: Arc<UserRef>,
    /// The token made this user a global admin (reads every room).
    pub global_admin: bool,
    outbox: Arc<Outbox>,
}

impl SessionHandle {
    pub fn new(id: SessionId, user: Arc<UserRef>, global_admin: bool, outbox: Arc<Outbox>) -> Self {
        Self {
            id,
            user,
            global_admin,
            outbox,
        }
    }

    /// Sends a frame: written at once to an idle session, else queued for its writer; a full
    /// queue closes the session as a slow consumer.
    pub fn send(&self, frame: Bytes) {
        self.push(Outbound::Text(frame), true);
    }

    /// Sends any outbound item, with the same slow-consumer rule.
    pub fn send_control(&self, out: Outbound) {
        self.push(out, true);
    }

    /// Queues a frame for the next [`Self::flush`] without writing it (the session's reader
    /// answering frames that came in together); at [`HOLD_MAX`] waiting items it flushes at
    /// once. A full queue is flushed first, then the frame is sent as [`Self::send`] does
    /// (closing the session only if the socket did not take the queue either).
    pub fn hold(&self, frame: Bytes) {
        match self.outbox.defer(Outbound::Text(frame.clone())) {
            Ok(d) if d.waiting >= HOLD_MAX => self.outbox.flush(),
            Ok(_) => {}
            Err(Full) => {
                self.outbox.flush();
                self.send(frame);
            }
        }
    }

    /// Writes what is queued in one write when the session is idle (see [`Outbox::flush`]).
    pub fn flush(&self) {
        self.outbox.flush();
    }

    /// Without `direct` the item always goes through the session's writer, never written by
    /// the caller: for fan-outs too large for one thread to write (see [`DIRECT_FANOUT`]).
    /// Returns the items waiting in the session's queue.
    fn push(&self, out: Outbound, direct: bool) -> usize {
        let pushed = match direct {
            // In a corked batch, written once per session when the batch ends.
            true => match crate::cork::defer(&self.outbox, out) {
                Ok(deferred) => deferred,
                Err(out) => self.outbox.push(out, true),
            },
            false => self.outbox.push(out, false),
        };
        match pushed {
            Ok(waiting) => waiting,
            Err(Full) => {
                self.too_slow();
                self.outbox.len()
            }
        }
    }

    /// A full queue: the client does not keep up; closed as a slow consumer.
    fn too_slow(&self) {
        if self.outbox.closing().is_none() {
            metrics::counter!("chat_slow_consumer_closes_total").increment(1);
        }
        self.outbox.close(close::SLOW_CONSUMER);
    }

    /// Asks the session to close with `code` (see [`Outbox::close`]).
    pub fn close(&self, code: u16) {
        self.outbox.close(code);
    }

    /// Asks the session to close with `code`, its client to come back in `retry_ms`.
    pub fn close_with_retry(&self, code: u16, retry_ms: u32) {
        self.outbox
            .close_with(code, &crate::writer::close_reason(code, Some(retry_ms)));
    }

    /// [`Self::close`] with the close frame's reason (see [`Outbox::close_with`]).
    pub fn close_with(&self, code: u16, reason: &str) {
        self.outbox.close_with(code, reason);
    }
}

struct Member {
    handle: SessionHandle,
    /// While joining: events held until the replay and `joined` are sent (see [`Hub::release`]).
    held: Option<Vec<(u64, Bytes)>>,
    /// The highest stored seq this session has been sent or has recovered up to; None until
    /// its join read the room's seq. A stored event at or below it is not sent again, so
    /// a broker may re-deliver a range (a gap fill after a reconnect) without duplicates.
    seen: Option<u64>,
}

#[derive(Default)]
struct Room {
    members: HashMap<SessionId, Member>,
}

/// What the node does around a stored room-state event (see [`crate::room_state`]).
pub trait StateObserver: Send + Sync {
    /// Before the event reaches any local session: drop cached state.
    fn state_changed(&self, room: &RoomId);
    /// A stored event that may change a pinned message's view passed (see
    /// `EventKind::changes_pins`): drop the room's cached pins.
    fn pins_changed(&self, room: &RoomId);
    /// After a `room_updated` reached the room's sessions: its settings changed (a room made
    /// private must let its readers go).
    fn updated(&self, room: &RoomId);
    /// After it: sessions the event removed from the room were taken out of it (`users` has
    /// one entry per session).
    /// `emptied` is true when the room has no local session left.
    fn evicted(&self, room: &RoomId, users: Vec<UserRef>, emptied: bool);
}

pub struct Hub {
    rooms: Vec<RwLock<HashMap<RoomId, Room>>>,
    observer: OnceLock<Arc<dyn StateObserver>>,
    users: Vec<Mutex<HashMap<String, Vec<SessionHandle>>>>,
    /// Held events per joining session before it is closed as too slow to join.
    max_held: usize,
}

/// A session joining a room ([`Hub::join`]): dropped before [`Joining::joined`], it takes the
/// session out of the room again. A join can stop anywhere: it fails, or the connection's
/// task ends mid-way (a dead socket ends the task and drops the command it was running), and
/// the session's own room list, which its end goes through, has the room only once the join
/// is done. Left in the room, the session would hold the room's events for good, and its
/// stale seq would be where a broker resumes the room after losing its subscription.
pub struct Joining<'a> {
    hub: &'a Hub,
    room: RoomId,
    session: SessionId,
    joined: bool,
}

impl Joining<'_> {
    /// The join is done: the session's room list takes it out of the room from now on.
    pub fn joined(mut self) {
        self.joined = true;
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        // No unsubscribe here (it would need an await): a node subscribed to a room without
        // local sessions drops its events, and the room's next leave on this node ends it.
        if !self.joined {
            self.hub.remove(&self.room, self.session);
        }
    }
}

/// One room's local sessions, read-locked while this lives: none can join or leave it.
struct RoomMembers<'a> {
    room: RoomId,
    shard: RwLockReadGuard<'a, HashMap<RoomId, Room>>,
}

impl RoomMembers<'_> {
    fn contains(&self, session: SessionId) -> bool {
        self.shard
            .get(&self.room)
            .is_some_and(|r| r.members.contains_key(&session))
    }
}

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

/// Takes out of the room the sessions a state event removes: the subject of `banned` and
/// `member_removed`, everyone on `room_deleted`. They have already been sent the event.
/// Returns the user of every session removed (a user once per session: presence counts
/// connections, and each removed one must be uncounted once).
fn evict(
    shard: &mut HashMap<RoomId, Room>,
    room: &RoomId,
    evicts: Evicts,
    frame: &[u8],
) -> Vec<UserRef> {
    let subject = match evicts {
        Evicts::Everyone => None,
        Evicts::Subject => match crate::bus::peek(frame).and_then(|p| p.user) {
            Some(u) => Some(u.id),
            None => return Vec::new(),
        },
    };
    let Some(entry) = shard.get_mut(room) else {
        return Vec::new();
    };
    let mut users: Vec<UserRef> = Vec::new();
    entry.members.retain(|_, m| {
        let out = subject.as_ref().is_none_or(|s| *s == m.handle.user.id);
        if out {
            users.push((*m.handle.user).clone());
        }
        !out
    });
    if entry.members.is_empty() {
        shard.remove(room);
    }
    users
}

impl Hub {
    pub fn new(max_held: usize) -> Self {
        Self {
            rooms: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            users: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            observer: OnceLock::new(),
            max_held,
        }
    }

    /// Sets the observer of room-state events (once, at node start).
    pub fn observe(&self, observer: Arc<dyn StateObserver>) {
        let _ = self.observer.set(observer);
    }

    /// True while the session is in the room (joined or joining).
    pub fn contains(&self, room: &RoomId, session: SessionId) -> bool {
        let shard = self.room_shard(room).read().expect("hub lock");
        shard
            .get(room)
            .is_some_and(|r| r.members.contains_key(&session))
    }

    fn room_shard(&self, room: &RoomId) -> &RwLock<HashMap<RoomId, Room>> {
        &self.rooms[shard_of(room.as_str())]
    }

    /// Adds a joining session to a room (see [`Joining`]).
    pub fn join(&self, room: &RoomId, handle: SessionHandle) -> Joining<'_> {
        let session = handle.id;
        self.add(room, handle);
        Joining {
            hub: self,
            room: room.clone(),
            session,
            joined: false,
        }
    }

    /// Adds a session to a room in the holding state.
    pub fn add(&self, room: &RoomId, handle: SessionHandle) {
        let mut shard = self.room_shard(room).write().expect("hub lock");
        let entry = shard.entry(room.clone()).or_default();
        entry.members.insert(
            handle.id,
            Member {
                handle,
                held: Some(Vec::new()),
                seen: None,
            },
        );
    }

    /// Records that a joining session has every stored event up to `seq` (its replay, or the
    /// room's seq when it asked for none): later ones reach it, earlier ones never again.
    pub fn seen_up_to(&self, room: &RoomId, session: SessionId, seq: u64) {
        let mut shard = self.room_shard(room).write().expect("hub lock");
        if let Some(m) = shard
            .get_mut(room)
            .and_then(|r| r.members.get_mut(&session))
        {
            m.seen = Some(seq);
        }
    }

    /// Ends the holding state: sends held stored events above the session's seen seq and
    /// every held ephemeral event, in arrival order, then lets events through directly. Runs
    /// under the shard's write lock, so no live event can slip between the held ones and the
    /// next.
    pub fn release(&self, room: &RoomId, session: SessionId) {
        let mut shard = self.room_shard(room).write().expect("hub lock");
        if let Some(m) = shard
            .get_mut(room)
            .and_then(|r| r.members.get_mut(&session))
        {
            for (seq, frame) in m.held.take().unwrap_or_default() {
                if seq == 0 {
                    m.handle.send(frame);
                } else if m.seen.is_none_or(|s| seq > s) {
                    m.seen = Some(seq);
                    m.handle.send(frame);
                }
            }
        }
    }

    /// Where a broker resumes a room after losing its subscription: the lowest seq a local
    /// session of the room is known to have (None when none has one yet).
    ///
    /// A session still joining that has not recorded its seq yet ([`Self::seen_up_to`]) may
    /// have read the room's seq before the subscription was lost: the events published
    /// until it was back would then be fetched for nobody, and the join would answer
    /// `recovered: true` without them. It is closed (1012) instead; its client rejoins with
    /// `since`. Under the shard lock, so that a join records its seq either before (and is
    /// counted) or after (and is closed).
    pub fn resume_point(&self, room: &RoomId) -> Option<u64> {
        let shard = self.room_shard(room).read().expect("hub lock");
        let members = &shard.get(room)?.members;
        for m in members.values().filter(|m| m.seen.is_none()) {
            m.handle.close(close::RESTARTING);
        }
        members.values().filter_map(|m| m.seen).min()
    }

    /// Removes a session from a room: None when it was not in it (never joined, or already
    /// taken out by an eviction), else whether it was the room's last local session.
    pub fn take(&self, room: &RoomId, session: SessionId) -> Option<bool> {
        let mut shard = self.room_shard(room).write().expect("hub lock");
        let entry = shard.get_mut(room)?;
        entry.members.remove(&session)?;
        if entry.members.is_empty() {
            shard.remove(room);
            Some(true)
        } else {
            Some(false)
        }
    }

    /// Removes a session from a room; returns true when it was the room's last local session.
    pub fn remove(&self, room: &RoomId, session: SessionId) -> bool {
        let mut shard = self.room_shard(room).write().expect("hub lock");
        let Some(entry) = shard.get_mut(room) else {
            return false;
        };
        if entry.members.remove(&session).is_none() {
            return false;
        }
        if entry.members.is_empty() {
            shard.remove(room);
            true
        } else {
            false
        }
    }

    /// Fans a room event out to local sessions. `seq` is 0 for ephemeral events.
    /// `except_user` (typing) is skipped. Returns the number of recipients.
    pub fn deliver(
        &self,
        room: &RoomId,
        seq: u64,
        frame: &Bytes,
        except_user: Option<&str>,
    ) -> usize {
        let started = std::time::Instant::now();
        let kind = (seq > 0).then(|| crate::bus::kind_of(frame)).flatten();
        let state_event = kind.filter(|k| k.changes_room_state());
        if let (Some(_), Some(o)) = (state_event, self.observer.get()) {
            o.state_changed(room);
        }
        if let (Some(_), Some(o)) = (kind.filter(|k| k.changes_pins()), self.observer.get()) {
            o.pins_changed(room);
        }
        let mut shard = self.room_shard(room).write().expect("hub lock");
        let Some(entry) = shard.get_mut(room) else {
            return 0;
        };
        let mut n = 0;
        let mut deepest = 0;
        let direct = entry.members.len() <= DIRECT_FANOUT;
        for m in entry.members.values_mut() {
            if except_user.is_some_and(|u| u == m.handle.user.id) {
                continue;
            }
            match &mut m.held {
                Some(held) if held.len() >= self.max_held => m.handle.close(close::SLOW_CONSUMER),
                Some(held) => held.push((seq, frame.clone())),
                None if seq > 0 && m.seen.is_some_and(|s| seq <= s) => continue,
                None => {
                    if seq > 0 {
                        m.seen = Some(seq);
                    }
                    let waiting = m.handle.push(Outbound::Text(frame.clone()), direct);
                    deepest = deepest.max(waiting);
                }
            }
            n += 1;
        }
        let evicted = match state_event.and_then(EventKind::evicts) {
            Some(evicts) => evict(&mut shard, room, evicts, frame),
            None => Vec::new(),
        };
        let emptied = !shard.contains_key(room);
        drop(shard);
        crate::telemetry::hot()
            .fanout_seconds
            .record(started.elapsed());
        // The deepest recipient queue after this fan-out: a growing value means clients fall
        // behind (the soak test watches it).
        crate::telemetry::hot().queue_depth_max.set(deepest as f64);
        if let Some(o) = self.observer.get() {
            if !evicted.is_empty() {
                o.evicted(room, evicted, emptied);
            }
            if state_event == Some(EventKind::RoomUpdated) {
                o.updated(room);
            }
        }
        n
    }

    /// Takes out of the room every session `out` picks; returns them, and whether the room
    /// has no local session left.
    pub fn take_if(
        &self,
        room: &RoomId,
        out: impl Fn(&SessionHandle) -> bool,
    ) -> (Vec<SessionHandle>, bool) {
        let mut shard = self.room_shard(room).write().expect("hub lock");
        let Some(entry) = shard.get_mut(room) else {
            return (Vec::new(), false);
        };
        let mut taken = Vec::new();
        entry.members.retain(|_, m| {
            let go = out(&m.handle);
            if go {
                taken.push(m.handle.clone());
            }
            !go
        });
        let emptied = entry.members.is_empty() && !taken.is_empty();
        if emptied {
            shard.remove(room);
        }
        (taken, emptied)
    }

    /// Local sessions' distinct users in a room.
    pub fn local_users(&self, room: &RoomId) -> Vec<UserRef> {
        let shard = self.room_shard(room).read().expect("hub lock");
        let mut users: Vec<UserRef> = shard
            .get(room)
            .map(|r| {
                r.members
                    .values()
                    .map(|m| (*m.handle.user).clone())
                    .collect()
            })
            .unwrap_or_default();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        users.dedup_by(|a, b| a.id == b.id);
        users
    }

    /// Rooms with at least one local session, and how many sessions each.
    pub fn local_rooms(&self) -> Vec<(RoomId, usize)> {
        self.rooms
            .iter()
            .flat_map(|s| {
                let s = s.read().expect("hub lock");
                s.iter()
                    .map(|(k, v)| (k.clone(), v.members.len()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many local sessions are in a room.
    pub fn sessions_count(&self, room: &RoomId) -> usize {
        let shard = self.room_shard(room).read().expect("hub lock");
        shard.get(room).map_or(0, |r| r.members.len())
    }

    /// Closes every local session in a room with `code`.
    pub fn close_room(&self, room: &RoomId, code: u16) {
        let shard = self.room_shard(room).read().expect("hub lock");
        for m in shard.get(room).into_iter().flat_map(|r| r.members.values()) {
            m.handle.close(code);
        }
    }

    /// Sessions of `user` in `room` on this node.
    pub fn sessions_in(&self, room: &RoomId, user: &str) -> Vec<SessionId> {
        let shard = self.room_shard(room).read().expect("hub lock");
        shard
            .get(room)
            .map(|r| {
                r.members
                    .values()
                    .filter(|m| m.handle.user.id == user)
                    .map(|m| m.handle.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Registers a connection of its user; returns the user's connection count on this node
    /// including this one.
    pub fn register(&self, handle: SessionHandle) -> usize {
        let mut shard = self.users[shard_of(&handle.user.id)]
            .lock()
            .expect("hub lock");
        let list = shard.entry(handle.user.id.clone()).or_default();
        list.push(handle);
        list.len()
    }

    pub fn unregister(&self, user: &str, session: SessionId) {
        let mut shard = self.users[shard_of(user)].lock().expect("hub lock");
        if let Some(list) = shard.get_mut(user) {
            list.retain(|h| h.id != session);
            if list.is_empty() {
                shard.remove(user);
            }
        }
    }

    pub fn user_connections(&self, user: &str) -> usize {
        let shard = self.users[shard_of(user)].lock().expect("hub lock");
        shard.get(user).map_or(0, Vec::len)
    }

    /// Sends a frame to every local connection of `user` (see [`Self::deliver_all`] for a
    /// stored room event).
    pub fn deliver_user(&self, user: &str, frame: &Bytes) {
        let members = self.members_of_event(frame);
        let shard = self.users[shard_of(user)].lock().expect("hub lock");
        for h in shard.get(user).into_iter().flatten() {
            if !members.as_ref().is_some_and(|m| m.contains(h.id)) {
                h.send(frame.clone());
            }
        }
    }

    /// Closes every local connection of `user` with 1008 and `reason`.
    pub fn disconnect_user(&self, user: &str, reason: &str) {
        let shard = self.users[shard_of(user)].lock().expect("hub lock");
        for h in shard.get(user).into_iter().flatten() {
            h.close_with(close::POLICY, reason);
        }
    }

    /// Sends a frame to every local connection.
    ///
    /// A stored room event sent this way (`room_created` to everyone, `member_added` to its
    /// user) is also on the room's stream, and a session in the room (joined or joining) gets
    /// it from there — once, in seq order, after the replay of its join: it is skipped here,
    /// or it would get the seq twice. The room's shard stays read-locked until the frame is
    /// queued, so a session that joins the room meanwhile gets it here before its join's
    /// replay, never in the middle of the room's events.
    pub fn deliver_all(&self, frame: &Bytes) {
        let members = self.members_of_event(frame);
        for shard in &self.users {
            let shard = shard.lock().expect("hub lock");
            for h in shard.values().flatten() {
                if !members.as_ref().is_some_and(|m| m.contains(h.id)) {
                    h.push(Outbound::Text(frame.clone()), false); // the largest fan-out there is
                }
            }
        }
    }

    /// For a stored room event, its room's members, read-locked (see [`Self::deliver_all`]).
    fn members_of_event(&self, frame: &[u8]) -> Option<RoomMembers<'_>> {
        let (room, _) = crate::bus::stored_room(frame)?;
        let shard = self.room_shard(&room).read().expect("hub lock");
        Some(RoomMembers { room, shard })
    }

    /// Every local connection (for draining).
    pub fn all_sessions(&self) -> Vec<SessionHandle> {
        self.users
            .iter()
            .flat_map(|s| {
                s.lock()
                    .expect("hub lock")
                    .values()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64, user: &str, cap: usize) -> (SessionHandle, Arc<Outbox>) {
        let rx = Arc::new(Outbox::new(cap));
        let u = Arc::new(UserRef {
            id: user.into(),
            name: user.into(),
        });
        (SessionHandle::new(id, u, false, rx.clone()), rx)
    }

    fn text(o: Outbound) -> Bytes {
        match o {
            Outbound::Text(b) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn held_events_are_filtered_by_seq_and_kept_in_order() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (h, rx) = session(1, "a", 16);
        hub.add(&room, h);
        for (seq, body) in [(4u64, "4"), (0, "typing"), (5, "5"), (6, "6")] {
            hub.deliver(&room, seq, &Bytes::from(body), None);
        }
        assert!(rx.try_pop().is_none(), "nothing passes while holding");
        hub.seen_up_to(&room, 1, 5);
        hub.release(&room, 1);
        let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_pop().map(text)).collect();
        assert_eq!(got, vec![Bytes::from("typing"), Bytes::from("6")]);
        hub.deliver(&room, 7, &Bytes::from("7"), None);
        assert_eq!(text(rx.try_pop().unwrap()), Bytes::from("7"));
    }

    #[test]
    fn full_queue_closes_the_slow_session_only() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (slow, slow_rx) = session(1, "slow", 2);
        let (fast, fast_rx) = session(2, "fast", 64);
        for h in [slow, fast] {
            hub.add(&room, h.clone());
            hub.seen_up_to(&room, h.id, 0);
            hub.release(&room, h.id);
        }
        for i in 0..10 {
            hub.deliver(&room, i + 1, &Bytes::from(format!("{i}")), None);
        }
        assert_eq!(slow_rx.closing(), Some(close::SLOW_CONSUMER));
        assert_eq!(fast_rx.closing(), None);
        assert_eq!(std::iter::from_fn(|| fast_rx.try_pop()).count(), 10);
    }

    #[test]
    fn except_user_and_last_member() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (a, arx) = session(1, "a", 8);
        let (b, brx) = session(2, "b", 8);
        hub.add(&room, a);
        hub.add(&room, b);
        hub.release(&room, 1);
        hub.release(&room, 2);
        assert_eq!(hub.deliver(&room, 0, &Bytes::from("t"), Some("a")), 1);
        assert!(arx.try_pop().is_none());
        assert!(brx.try_pop().is_some());
        assert_eq!(hub.local_users(&room).len(), 2);
        assert!(!hub.remove(&room, 1));
        assert!(hub.remove(&room, 2));
        assert_eq!(hub.deliver(&room, 1, &Bytes::from("x"), None), 0);
    }

    #[test]
    fn a_join_dropped_before_it_is_done_leaves_the_room() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (a, _) = session(1, "a", 8);
        let (b, _) = session(2, "b", 8);
        drop(hub.join(&room, a));
        assert!(!hub.contains(&room, 1), "a join that stopped mid-way");
        hub.join(&room, b).joined();
        assert!(hub.contains(&room, 2), "a finished join stays");
    }

    #[test]
    fn resuming_closes_joins_that_have_not_recorded_their_seq() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (early, early_rx) = session(1, "a", 8);
        let (recorded, recorded_rx) = session(2, "b", 8);
        hub.add(&room, early);
        hub.add(&room, recorded);
        hub.seen_up_to(&room, 2, 4);
        assert_eq!(hub.resume_point(&room), Some(4));
        assert_eq!(early_rx.closing(), Some(close::RESTARTING));
        assert_eq!(recorded_rx.closing(), None);
    }

    #[test]
    fn a_join_that_would_hold_too_many_events_is_closed_not_thinned() {
        let hub = Hub::new(2);
        let room = RoomId::new("r").unwrap();
        let (h, rx) = session(1, "a", 16);
        hub.add(&room, h);
        for seq in 1..=2u64 {
            hub.deliver(&room, seq, &Bytes::from(seq.to_string()), None);
        }
        assert_eq!(rx.closing(), None, "two held events fit");
        hub.deliver(&room, 3, &Bytes::from("3"), None);
        assert_eq!(
            rx.closing(),
            Some(close::SLOW_CONSUMER),
            "the third cannot be held: the client must rejoin rather than miss it"
        );
    }

    #[test]
    fn an_announced_room_event_skips_the_sessions_in_its_room() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (inside, in_rx) = session(1, "a", 8);
        let (outside, out_rx) = session(2, "a", 8);
        hub.register(inside.clone());
        hub.register(outside);
        hub.add(&room, inside);
        let created = Bytes::from(r#"{"seq":1,"type":"room_created","room":{"id":"r"}}"#);
        let added = Bytes::from(r#"{"seq":2,"type":"member_added","room":"r","user":{"id":"a"}}"#);
        let notice = Bytes::from(r#"{"type":"notice","content":"hi"}"#);
        hub.deliver_all(&created);
        hub.deliver_user("a", &added);
        hub.deliver_all(&notice);
        let inside_got: Vec<Bytes> = std::iter::from_fn(|| in_rx.try_pop().map(text)).collect();
        let outside_got: Vec<Bytes> = std::iter::from_fn(|| out_rx.try_pop().map(text)).collect();
        assert_eq!(
            inside_got,
            vec![notice.clone()],
            "room events come from the room"
        );
        assert_eq!(outside_got, vec![created, added, notice]);
    }

    #[test]
    fn a_redelivered_range_reaches_each_session_once() {
        let hub = Hub::new(100);
        let room = RoomId::new("r").unwrap();
        let (a, arx) = session(1, "a", 16);
        let (b, brx) = session(2, "b", 16);
        hub.add(&room, a);
        hub.add(&room, b);
        hub.seen_up_to(&room, 1, 3);
        hub.release(&room, 1);
        hub.seen_up_to(&room, 2, 5);
        hub.release(&room, 2);
        assert_eq!(hub.resume_point(&room), Some(3));
        // A gap fill after a reconnect resends from the lowest seen seq.
        for seq in 4..=6u64 {
            hub.deliver(&room, seq, &Bytes::from(seq.to_string()), None);
        }
        hub.deliver(&room, 5, &Bytes::from("5"), None);
        let a_got: Vec<Bytes> = std::iter::from_fn(|| arx.try_pop().map(text)).collect();
        let b_got: Vec<Bytes> = std::iter::from_fn(|| brx.try_pop().map(text)).collect();
        assert_eq!(
            a_got,
            vec![Bytes::from("4"), Bytes::from("5"), Bytes::from("6")]
        );
        assert_eq!(b_got, vec![Bytes::from("6")]);
        assert_eq!(hub.resume_point(&room), Some(6));
    }
}
