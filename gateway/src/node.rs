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
use history_service::{AnyStore, HistoryApi};

use crate::broker::{AnyBroker, Broker, BrokerError, Events, StateVersion};
use crate::config::Config;
use crate::expiry::Expiry;
use crate::hub::{Hub, StateObserver};
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
    pub ids: MessageIdGen,
    pub connections: Arc<Semaphore>,
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
        let node = Arc::new(Self {
            name,
            verifier,
            hub,
            broker,
            rooms: RoomStates::new(store),
            history,
            receipts: Receipts::default(),
            expiry: Expiry::start(config.token_expiring()),
            online: Default::default(),
            ids,
            connections,
            next_session: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            typing: Mutex::default(),
            typing_gen: AtomicU64::new(0),
            config,
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

    /// A membership changed without a room event (someone joined or left a public room, after
    /// the store has it): this node updates its cached state in place, every other node drops
    /// its cached state of the room. The announcement names this node (its worker id) so that
    /// it does not drop its own, just-updated copy when the announcement comes back. Best
    /// effort: a node that misses it holds a stale member list until the room's next state
    /// event, and moderation reads fresh state anyway.
    pub async fn membership_changed(&self, room: &RoomId, change: MemberChange) {
        self.rooms.apply_member(room, &change);
        let target = proto::envelope::NodeTarget::RoomState(room.as_str());
        let origin = Bytes::from(self.broker.worker_id().to_string());
        if let Err(e) = self.broker.publish_node(target, origin).await {
            tracing::warn!(error = %e, %room, "could not announce a membership change");
        }
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

    /// The room's presence changed: announce its online users now, or at the end of the
    /// room's open window (see [`crate::online`]).
    pub async fn online_changed(self: &Arc<Self>, room: &RoomId) {
        if !self.online.lead(room) {
            return;
        }
        self.publish_online(room).await;
        let node = self.clone();
        let room = room.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::online::WINDOW).await;
                if !node.online.trail(&room) {
                    return;
                }
                node.publish_online(&room).await;
            }
        });
    }

    /// Announces the room's online users (capped list, exact count).
    pub async fn publish_online(&self, room: &RoomId) {
        let Ok(mut users) = self.broker.presence(room).await else {
            return;
        };
        let count = users.len() as u64;
        users.truncate(ONLINE_LIST_MAX);
        self.publish_ephemeral(
            room,
            &ServerEvent::OnlineUsers {
                room: room.clone(),
                users,
                count,
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
            // Their node is gone, and with it their display names: the id stands in.
            for id in users {
                let user = UserRef {
                    name: id.clone(),
                    id,
                };
                let leave = ServerEvent::Leave {
                    room: room.clone(),
                    user,
                };
                node.publish_ephemeral(&room, &leave).await;
            }
            node.online_changed(&room).await;
        });
    }

    fn room_state_changed(&self, room: &RoomId) {
        if let Some(node) = self.0.upgrade() {
            node.rooms.invalidate(room);
        }
    }

    fn reconnected(&self) {
        if let Some(node) = self.0.upgrade() {
            node.rooms.clear();
        }
    }
}

impl StateObserver for Observer {
    fn state_changed(&self, room: &RoomId) {
        if let Some(node) = self.0.upgrade() {
            node.rooms.invalidate(room);
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
            changed |= self
                .broker
                .presence_remove(room, &user.id)
                .await
                .unwrap_or(false);
        }
        if changed {
            self.online_changed(room).await;
        }
    }
}
