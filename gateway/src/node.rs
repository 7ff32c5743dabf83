//! One [`Node`] per process: configuration, the local hub, the broker, room state, id
//! generation, and the drain state. Sessions hold an `Arc<Node>`. The node is also where
//! policy around the transport lives: what follows when the hub delivers a room-state event
//! ([`StateObserver`]) or the broker reports something ([`Events`]), presence announcements,
//! typing expiry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use proto::ids::MessageIdGen;
use proto::rooms::Visibility;
use proto::server::Limits;
use proto::{RoomId, ServerEvent, UserRef};
use tokio::sync::Semaphore;

use history_service::keys::Authenticator;
use history_service::store::MemberPut;
use history_service::{AnyStore, HistoryApi, Store, StoreError};

use crate::batch::Batcher;
use crate::broker::{AnyBroker, Broker, BrokerError, Events, StateVersion};
use crate::config::Config;
use crate::expiry::Expiry;
use crate::hub::{Hub, StateObserver};
use crate::online::Change;
use crate::pin_views::PinViews;
use crate::receipts::Receipts;
use crate::room_state::{MemberChange, RoomStates};

/// How long a `typing` lasts without a repeat.
pub const TYPING_TTL: Duration = Duration::from_secs(5);
/// Users listed in one `online_users` frame at most (the count is always exact).
pub const ONLINE_LIST_MAX: usize = 100;

pub struct Node {
    pub config: Config,
    pub name: String,
    pub verifier: Authenticator,
    pub hub: Arc<Hub>,
    pub broker: AnyBroker,
    pub rooms: RoomStates,
    /// The history API over the same store (mounted on this node's HTTP router).
    pub history: Arc<HistoryApi<AnyStore>>,
    pub receipts: Receipts,
    /// Warns and closes connections whose token expires.
    pub expiry: Arc<Expiry>,
    /// Coalesces `online_users` announcements per room.
    pub online: crate::online::Online,
    /// Rooms' pinned messages for `joined.pins`, read once per room.
    pub pins: PinViews,
    /// First-time memberships (public joins), stored in batches: one store call (scaled out:
    /// one round trip to the history service) for every join waiting at the time.
    pub members: Batcher<MemberPut, bool>,
    /// Read markers for `joined.unread`, read in batches likewise.
    pub markers: Batcher<(RoomId, String), Option<u64>>,
    pub ids: MessageIdGen,
    pub connections: Arc<Semaphore>,
    /// The clock of every session's rate limiter (see `session`).
    pub clock: governor::clock::DefaultClock,
    next_session: AtomicU64,
    draining: AtomicBool,
    /// (room, user) → generation of the user's latest `typing`; expiry compares generations.
    typing: Mutex<HashMap<(RoomId, String), u64>>,
    typing_gen: AtomicU64,
}

impl Node {
    pub fn new(
        config: Config,
        verifier: Authenticator,
        hub: Arc<Hub>,
        broker: AnyBroker,
        store: Arc<AnyStore>,
    ) -> Arc<Self> {
        let name = config.node_name();
        let ids = MessageIdGen::new(broker.worker_id());
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let history = Arc::new(
            HistoryApi::new(store.clone(), verifier.clone())
                .with_internal_token(config.internal_token.clone()),
        );
        let markers = {
            let store = store.clone();
            Batcher::spawn(move |keys: Vec<(RoomId, String)>| {
                let store = store.clone();
                async move { store.markers_of(&keys).await }
            })
        };
        let node = Arc::new_cyclic(|me: &Weak<Node>| {
            let me = me.clone();
            let members = Batcher::spawn(move |puts: Vec<MemberPut>| {
                let me = me.clone();
                async move {
                    let node = me.upgrade().ok_or_else(|| {
                        StoreError::Unavailable("the node is shutting down".into())
                    })?;
                    node.put_members(puts).await
                }
            });
            Self {
                name,
                verifier,
                hub,
                broker,
                rooms: RoomStates::new(store),
                history,
                receipts: Receipts::default(),
                expiry: Expiry::start(config.token_expiring()),
                online: Default::default(),
                pins: PinViews::default(),
                members,
                markers,
                ids,
                connections,
                clock: Default::default(),
                next_session: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                typing: Mutex::default(),
                typing_gen: AtomicU64::new(0),
                config,
            }
        });
        let observer = Arc::new(Observer(Arc::downgrade(&node)));
        node.hub.observe(observer.clone());
        node.broker.report_to(observer);
        node
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.config.max_frame_bytes,
            max_content_chars: self.config.max_content_chars,
            messages_per_s: self.config.messages_per_s,
        }
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: readiness off, no new upgrades ([`crate::shutdown::drain`] tells the
    /// sessions already here to reconnect).
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn ready(&self) -> bool {
        !self.is_draining() && self.broker.healthy()
    }

    /// Memberships changed without a room event (someone joined or left a public room, after
    /// the store has it): this node updates its cached state in place, and so does every
    /// other node from the announcement, which carries the changes (a node that cannot read
    /// them drops its copy instead). The announcement names this node (its worker id) so that
    /// it does not apply its own changes twice. Best effort: a node that misses it holds a
    /// stale member list until the room's next state event (or [`crate::room_state::MAX_AGE`]),
    /// and moderation reads fresh state anyway.
    pub async fn membership_changed(&self, room: &RoomId, changes: &[MemberChange]) {
        self.rooms.apply_members(room, changes);
        let target = proto::envelope::NodeTarget::RoomState(room.as_str());
        let note = crate::room_state::MemberNote {
            origin: self.broker.worker_id(),
            changes,
        };
        if let Err(e) = self.broker.publish_node(target, note.encode()).await {
            tracing::warn!(error = %e, %room, "could not announce a membership change");
        }
    }

    /// Stores a batch of first-time memberships ([`Self::members`]) and announces them, one
    /// announcement per room.
    async fn put_members(&self, puts: Vec<MemberPut>) -> Result<Vec<bool>, StoreError> {
        let stored = self.rooms.store().put_members(&puts).await?;
        let mut by_room: HashMap<&RoomId, Vec<MemberChange>> = HashMap::new();
        for (p, _) in puts.iter().zip(&stored).filter(|(_, ok)| **ok) {
            let change = MemberChange::Put(p.user.clone(), p.role);
            by_room.entry(&p.room).or_default().push(change);
        }
        for (room, changes) in by_room {
            self.membership_changed(room, &changes).await;
        }
        Ok(stored)
    }

    /// Publishes an ephemeral event to a room; failures are logged, not returned (best effort).
    pub async fn publish_ephemeral(&self, room: &RoomId, ev: &ServerEvent) {
        self.publish_ephemeral_frame(room, Bytes::from(ev.to_json()))
            .await;
    }

    /// Publishes an already serialized ephemeral frame (best effort, like the above).
    pub async fn publish_ephemeral_frame(&self, room: &RoomId, frame: Bytes) {
        if let Err(e) = self.broker.publish_ephemeral(room, frame, None).await {
            tracing::debug!(error = %e, %room, "ephemeral publish failed");
        }
    }

    /// Sends a site-wide notice to every connection on every node.
    pub async fn notice(&self, content: String) -> Result<(), BrokerError> {
        let frame = ServerEvent::Notice {
            content,
            ts: proto::Timestamp::now(),
        }
        .to_json();
        self.broker
            .publish_node(proto::envelope::NodeTarget::All, Bytes::from(frame))
            .await
    }

    /// A user came online in a room or went offline; `online` is the room's online count
    /// after the change. A small room is told at once (`join`/`leave`); a big one's change is
    /// folded into its next `online_users` (see [`crate::online`]).
    pub async fn presence_changed(self: &Arc<Self>, room: &RoomId, change: Change, online: u64) {
        if online > self.config.presence_coalesce_above {
            self.online_changed(room, Some(change)).await;
            return;
        }
        let notice = match change {
            Change::Joined(user) => ServerEvent::Join {
                room: room.clone(),
                user,
            },
            Change::Left(user) => ServerEvent::Leave {
                room: room.clone(),
                user,
            },
        };
        self.publish_ephemeral(room, &notice).await;
        self.online_changed(room, None).await;
    }

    /// The room's presence changed (`folded`: a big room's change, see
    /// [`Self::presence_changed`]): announce its online users now, or at the end of the room's
    /// open window (see [`crate::online`]).
    pub async fn online_changed(self: &Arc<Self>, room: &RoomId, folded: Option<Change>) {
        if !self.online.lead(room, folded) {
            return;
        }
        self.publish_online(room).await;
        let node = self.clone();
        let room = room.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(node.config.presence_interval()).await;
                if !node.online.trail(&room) {
                    return;
                }
                node.publish_online(&room).await;
            }
        });
    }

    /// Announces the room's online users (capped list, exact count), with the big-room changes
    /// folded since the last announcement.
    pub async fn publish_online(&self, room: &RoomId) {
        let changes = self.online.take_changes(room);
        let Ok(online) = self.broker.presence(room, ONLINE_LIST_MAX).await else {
            return;
        };
        // A big room's announcements always say what changed (nothing, at times), so that its
        // clients know they get no `join`/`leave` one by one.
        let changes = changes.or_else(|| {
            (online.count > self.config.presence_coalesce_above).then(Default::default)
        });
        let (joined, left) = changes.unzip();
        self.publish_ephemeral(
            room,
            &ServerEvent::OnlineUsers {
                room: room.clone(),
                users: online.users,
                count: online.count,
                joined_count: joined.as_ref().map(|c| c.count),
                joined: joined.map(|c| c.users),
                left_count: left.as_ref().map(|c| c.count),
                left: left.map(|c| c.users),
            },
        )
        .await;
    }

    /// Relays `typing` — only while the room's state is at `version`, the one the typist's
    /// permission was decided on — and (re)arms its expiry: without a repeat within
    /// [`TYPING_TTL`] the room gets `stop_typing` from this node.
    pub async fn typing(
        self: &Arc<Self>,
        room: &RoomId,
        user: &UserRef,
        version: StateVersion,
    ) -> Result<(), BrokerError> {
        let frame = ServerEvent::Typing {
            room: room.clone(),
            user: user.clone(),
        };
        self.broker
            .publish_ephemeral(room, Bytes::from(frame.to_json()), Some(version))
            .await?;
        let gen = self.typing_gen.fetch_add(1, Ordering::Relaxed) + 1;
        let key = (room.clone(), user.id.clone());
        self.typing
            .lock()
            .expect("typing lock")
            .insert(key.clone(), gen);
        let node = self.clone();
        let user = user.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TYPING_TTL).await;
            let expired = {
                let mut t = node.typing.lock().expect("typing lock");
                if t.get(&key) == Some(&gen) {
                    t.remove(&key);
                    true
                } else {
                    false
                }
            };
            if expired {
                let (room, _) = key;
                node.publish_ephemeral(&room.clone(), &ServerEvent::StopTyping { room, user })
                    .await;
            }
        });
        Ok(())
    }

    /// Ends a `typing` now (explicit `stop_typing`, a sent message, a leave); no-op when the
    /// user was not typing.
    pub async fn stop_typing(&self, room: &RoomId, user: &UserRef, always: bool) {
        let was = self
            .typing
            .lock()
            .expect("typing lock")
            .remove(&(room.clone(), user.id.clone()))
            .is_some();
        if was || always {
            self.publish_ephemeral(
                room,
                &ServerEvent::StopTyping {
                    room: room.clone(),
                    user: user.clone(),
                },
            )
            .await;
        }
    }
}

/// Keeps this node's view of rooms current as their state events pass through the hub, and
/// acts on what the broker reports.
struct Observer(Weak<Node>);

impl Events for Observer {
    fn presence_expired(&self, room: &RoomId, users: Vec<String>) {
        let Some(node) = self.0.upgrade() else { return };
        let room = room.clone();
        tokio::spawn(async move {
            let online = match node.broker.presence(&room, 0).await {
                Ok(o) => o.count,
                Err(_) => 0,
            };
            // Their node is gone, and with it their display names: the id stands in.
            for id in users {
                let user = UserRef {
                    name: id.clone(),
                    id,
                };
                node.presence_changed(&room, Change::Left(user), online)
                    .await;
            }
        });
    }

    fn room_state_changed(&self, room: &RoomId, note: &[u8]) {
        let Some(node) = self.0.upgrade() else { return };
        match crate::room_state::MemberNote::decode(note) {
            // Its own announcement: the node updated its copy as it made the changes.
            Some((origin, _)) if origin == node.broker.worker_id() => {}
            Some((_, Some(changes))) => node.rooms.apply_members(room, &changes),
            _ => node.rooms.invalidate(room),
        }
    }

    fn reconnected(&self) {
        if let Some(node) = self.0.upgrade() {
            node.rooms.clear();
            node.pins.clear();
        }
    }
}

impl StateObserver for Observer {
    fn state_changed(&self, room: &RoomId) {
        if let Some(node) = self.0.upgrade() {
            node.rooms.invalidate(room);
        }
    }

    fn pins_changed(&self, room: &RoomId) {
        if let Some(node) = self.0.upgrade() {
            node.pins.invalidate(room);
        }
    }

    fn updated(&self, room: &RoomId) {
        let Some(node) = self.0.upgrade() else { return };
        let room = room.clone();
        tokio::spawn(async move { node.let_readers_go(&room).await });
    }

    fn evicted(&self, room: &RoomId, users: Vec<UserRef>, emptied: bool) {
        let Some(node) = self.0.upgrade() else { return };
        let room = room.clone();
        tokio::spawn(async move { node.after_eviction(&room, users, emptied).await });
    }
}

impl Node {
    /// After a room's settings changed: when it is now private, the local sessions that may no
    /// longer read it (readers of what was a public or restricted room) leave it, told `left`.
    async fn let_readers_go(self: &Arc<Self>, room: &RoomId) {
        let state = match self.rooms.get(&self.broker, room).await {
            Ok(Some(copy)) if copy.state.info.visibility == Visibility::Private => copy.state,
            Ok(_) => return,
            Err(e) => {
                // Their next command is checked against the store anyway; only reading stays.
                tracing::warn!(error = %e, %room, "could not check readers of a room made private");
                return;
            }
        };
        let (out, emptied) = self.hub.take_if(room, |h| {
            !h.global_admin && !state.members.iter().any(|m| m.user.id == h.user.id)
        });
        for h in &out {
            h.send(Bytes::from(
                ServerEvent::Left {
                    r#ref: None,
                    room: room.clone(),
                }
                .to_json(),
            ));
        }
        let users = out.iter().map(|h| (*h.user).clone()).collect();
        self.after_eviction(room, users, emptied).await;
    }

    /// Presence and subscription after sessions were taken out of a room (one user entry
    /// per session).
    async fn after_eviction(self: &Arc<Self>, room: &RoomId, users: Vec<UserRef>, emptied: bool) {
        if emptied {
            if let Err(e) = self.broker.unsubscribe(room).await {
                tracing::warn!(error = %e, %room, "unsubscribe failed");
            }
        }
        let mut changed = false;
        for user in users {
            changed |= matches!(
                self.broker.presence_remove(room, &user.id).await,
                Ok(Some(_))
            );
        }
        // The eviction's own event told the room who left.
        if changed {
            self.online_changed(room, None).await;
        }
    }
}
