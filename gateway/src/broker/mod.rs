//! The seam between a node and the rest of the cluster: [`Broker`], with an in-process
//! implementation ([`memory::MemoryBroker`], single node) and a Redis one
//! ([`redis::RedisBroker`], many nodes). [`AnyBroker`] picks one from config.
//!
//! # Delivery contract
//! - `publish_stored` assigns the room's next `seq` atomically across all nodes (gapless:
//!   1, 2, 3…), keeps the event in the room's recovery window, appends it to the persistence
//!   log, and delivers it to every node subscribed to the room — to each in seq order. It
//!   returns only once the event is in the log: that is when the sender may be acknowledged.
//! - A node may miss live events (Redis reconnect); it never sees them out of order. Clients
//!   close gaps with `join {since}` from the recovery window, then from history.
//! - A room's position is (epoch, seq). A broker that lost its data (a process restart of the
//!   in-process broker; Redis restarted without persistence or failed over to a replica that
//!   missed writes) starts the room in a new epoch and numbers on above every seq it or the
//!   store saw: a seq is never given to two different events, and a `since` from an older
//!   epoch is not replayed (the client fills from history).
//! - Ephemeral events (typing, join/leave, online users) and node-targeted frames are
//!   best-effort: no seq, no log, no recovery.
//! - Delivery into this node goes to the [`Hub`](crate::hub::Hub), which fans out locally.
//!   Everything else the broker learns — presence that expired on a dead node, a room's state
//!   changed on another node, a lost connection that is back — it reports to the node through
//!   [`Events`]; the node decides what follows.
//!
//! # Room state versions
//! Each room has a state version: an opaque token that every room-state change replaces
//! ([`StateCheck::Change`], in the same atomic step as the change's event). A command decided
//! on a node's cached state carries the version it was decided on ([`StateCheck::Expect`]);
//! the broker refuses it with [`BrokerError::Stale`] when the version moved on, and the node
//! decides again on fresh state (see `commands::guard`). So a change acknowledged to anyone
//! is seen by every later command on every node, without a round trip per command.

pub mod memory;
pub mod redis;

use std::future::Future;

use bytes::Bytes;
use proto::envelope::NodeTarget;
use proto::{MessageId, RoomId, Timestamp, UserRef};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The backend is unreachable or failed; the command may be retried.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The room's state version is not the one the command was decided on: nothing was done.
    #[error("the room's state changed")]
    Stale,
}

/// A room's state version (see the module docs). 0: no change since the broker's data began.
pub type StateVersion = u64;

/// A fresh state version for a change: random, so a version is never reused (also after the
/// broker lost its data and counts from nothing).
pub fn new_state_version() -> StateVersion {
    rand::random::<u64>() | 1
}

/// How a publish relates to the room's state version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateCheck {
    /// Only while the room's state is still at this version (the command was decided on it).
    Expect(StateVersion),
    /// The event changes the room's state: the version becomes this one.
    Change(StateVersion),
    /// Neither (the decision was confirmed by an earlier checked step).
    Unchecked,
}

/// What a broker reports to its node. The node registers one ([`Broker::report_to`]); the
/// broker builds no events and applies no policy of its own.
pub trait Events: Send + Sync + 'static {
    /// These users' presence in `room` expired: the node that held them stopped refreshing
    /// it (it died). They are offline now.
    fn presence_expired(&self, room: &RoomId, users: Vec<String>);
    /// Another node changed `room`'s state without a room event (a membership from a public
    /// join or leave); `note` is what that node published with it
    /// ([`NodeTarget::RoomState`]'s frame), unread by the broker.
    fn room_state_changed(&self, room: &RoomId, note: &[u8]);
    /// The broker's connection was lost and is back: what it reports may have been missed
    /// in between.
    fn reconnected(&self);
}

/// Idempotency of a publish: a repeat of `key` returns the first publication.
#[derive(Debug, Clone)]
pub struct Dedupe<'a> {
    pub key: &'a str,
    pub id: MessageId,
    pub ts: Timestamp,
}

/// The result of `publish_stored`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Published now with this seq.
    Fresh { seq: u64 },
    /// A repeat of a dedupe key: nothing was published; these are the first publication's.
    Duplicate {
        seq: u64,
        id: MessageId,
        ts: Timestamp,
    },
}

impl Published {
    pub fn seq(&self) -> u64 {
        match self {
            Published::Fresh { seq } | Published::Duplicate { seq, .. } => *seq,
        }
    }
}

/// What `recover` found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The room's last assigned seq when the window was read.
    pub last_seq: u64,
    /// The room's epoch: its seqs count in it (a broker that lost its data starts another).
    pub epoch: String,
    /// The room's state version when the window was read.
    pub version: StateVersion,
    /// The room's pinned message ids as the broker's pin set held them when the window was
    /// read ([`Broker::pin_set`]); None when no pin change went through the broker, so the
    /// store's pins are current. The store learns of pins from the persistence log, a moment
    /// after their acks.
    pub pins: Option<Vec<MessageId>>,
    /// Stored events with seq > since, in order (empty without `since`).
    pub events: Vec<(u64, Bytes)>,
    /// False when `since` is older than the window, or from another epoch: the client must
    /// use history.
    pub complete: bool,
}

/// Who is online in a room: the exact count, and some of them — everyone, sorted by id, when
/// they fit the number asked for; else that many of them (big rooms are listed in part:
/// listing every one of 10 000 users on every join would cost O(users) per join).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Online {
    pub count: u64,
    pub users: Vec<UserRef>,
}

/// A change to a room's pin set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinChange {
    Pin,
    Unpin,
}

impl PinChange {
    /// The change that undoes this one.
    pub fn undo(self) -> Self {
        match self {
            PinChange::Pin => PinChange::Unpin,
            PinChange::Unpin => PinChange::Pin,
        }
    }
}

/// What [`Broker::pin_set`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    Done,
    AlreadyPinned,
    NotPinned,
    /// The room already has the maximum number of pins.
    Full,
}

/// See the module docs for the delivery contract.
pub trait Broker: Send + Sync + 'static {
    /// A worker id for message ids, unique among live nodes.
    fn worker_id(&self) -> u16;

    /// Registers the node's receiver of what the broker learns (once, at node start).
    fn report_to(&self, events: std::sync::Arc<dyn Events>);

    /// Publishes a stored event. `frame` is the event serialized without `seq`.
    fn publish_stored(
        &self,
        room: &RoomId,
        frame: &[u8],
        dedupe: Option<Dedupe<'_>>,
        check: StateCheck,
    ) -> impl Future<Output = Result<Published, BrokerError>> + Send;

    /// Publishes an ephemeral room event. Typing frames are not delivered to the typist.
    /// With `expect`, only while the room's state is at that version ([`BrokerError::Stale`]).
    fn publish_ephemeral(
        &self,
        room: &RoomId,
        frame: Bytes,
        expect: Option<StateVersion>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// The room's state version now.
    fn state_version(
        &self,
        room: &RoomId,
    ) -> impl Future<Output = Result<StateVersion, BrokerError>> + Send;

    /// Sends a frame to every connection, or to one user's connections, on every node.
    fn publish_node(
        &self,
        target: NodeTarget<'_>,
        frame: Bytes,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Appends a frame that has no seq (a read receipt) to the persistence log.
    fn persist(&self, frame: Bytes) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Starts delivering `room`'s events to this node (first local member joined).
    fn subscribe(&self, room: &RoomId) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Stops delivering `room`'s events to this node (last local member left).
    fn unsubscribe(&self, room: &RoomId) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// The room's last seq and epoch and, with `since`, the stored events after it. A `since`
    /// from another epoch than the room's (`epoch`, when the client sent one) recovers
    /// nothing.
    fn recover(
        &self,
        room: &RoomId,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> impl Future<Output = Result<Recovery, BrokerError>> + Send;

    /// Marks `user` online in `room` from this node, in the same step as reading who is
    /// online now (up to `list` users): true when the user was not online before.
    fn presence_add(
        &self,
        room: &RoomId,
        user: &UserRef,
        list: usize,
    ) -> impl Future<Output = Result<(bool, Online), BrokerError>> + Send;

    /// Marks one of `user`'s connections in `room` gone: the room's online count when the
    /// user is now offline, None while they are still online.
    fn presence_remove(
        &self,
        room: &RoomId,
        user: &str,
    ) -> impl Future<Output = Result<Option<u64>, BrokerError>> + Send;

    /// Who is online in `room` across all nodes: the count, and up to `list` of them.
    fn presence(
        &self,
        room: &RoomId,
        list: usize,
    ) -> impl Future<Output = Result<Online, BrokerError>> + Send;

    /// Applies a pin change to the room's pin set, atomically across nodes, before the
    /// `pinned`/`unpinned` event is published: the store learns of pins only as the
    /// persistence log reaches it, too late to stop two pins from passing the limit or an
    /// unpin from missing a pin a moment old. `stored` (the store's pins) seeds the set the
    /// first time the room's is used; with None, a room without a set is left alone
    /// (`NotPinned`). Checked against the room's state version like a publish.
    fn pin_set(
        &self,
        room: &RoomId,
        id: MessageId,
        change: PinChange,
        max: usize,
        stored: Option<&[MessageId]>,
        check: StateCheck,
    ) -> impl Future<Output = Result<PinOutcome, BrokerError>> + Send;

    /// True while the broker can publish and receive.
    fn healthy(&self) -> bool;
}

/// The broker chosen by configuration.
pub enum AnyBroker {
    Memory(memory::MemoryBroker),
    Redis(std::sync::Arc<redis::RedisBroker>),
}

macro_rules! delegate {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBroker::Memory($b) => $e,
            AnyBroker::Redis($b) => $e,
        }
    };
}

impl Broker for AnyBroker {
    fn worker_id(&self) -> u16 {
        delegate!(self, b => b.worker_id())
    }
    fn report_to(&self, events: std::sync::Arc<dyn Events>) {
        delegate!(self, b => b.report_to(events))
    }
    async fn publish_stored(
        &self,
        room: &RoomId,
        frame: &[u8],
        dedupe: Option<Dedupe<'_>>,
        check: StateCheck,
    ) -> Result<Published, BrokerError> {
        use tracing::Instrument;
        // One span per stored publish; the Redis broker writes its traceparent into the
        // persistence entry so the history service's write joins the trace.
        let span = tracing::info_span!("broker_publish", otel.kind = "producer", room = %room);
        async { delegate!(self, b => b.publish_stored(room, frame, dedupe, check).await) }
            .instrument(span)
            .await
    }
    async fn publish_ephemeral(
        &self,
        room: &RoomId,
        frame: Bytes,
        expect: Option<StateVersion>,
    ) -> Result<(), BrokerError> {
        delegate!(self, b => b.publish_ephemeral(room, frame, expect).await)
    }
    async fn state_version(&self, room: &RoomId) -> Result<StateVersion, BrokerError> {
        delegate!(self, b => b.state_version(room).await)
    }
    async fn publish_node(&self, target: NodeTarget<'_>, frame: Bytes) -> Result<(), BrokerError> {
        delegate!(self, b => b.publish_node(target, frame).await)
    }
    async fn persist(&self, frame: Bytes) -> Result<(), BrokerError> {
        delegate!(self, b => b.persist(frame).await)
    }
    async fn subscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        delegate!(self, b => b.subscribe(room).await)
    }
    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        delegate!(self, b => b.unsubscribe(room).await)
    }
    async fn recover(
        &self,
        room: &RoomId,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Recovery, BrokerError> {
        delegate!(self, b => b.recover(room, since, epoch).await)
    }
    async fn presence_add(
        &self,
        room: &RoomId,
        user: &UserRef,
        list: usize,
    ) -> Result<(bool, Online), BrokerError> {
        delegate!(self, b => b.presence_add(room, user, list).await)
    }
    async fn presence_remove(&self, room: &RoomId, user: &str) -> Result<Option<u64>, BrokerError> {
        delegate!(self, b => b.presence_remove(room, user).await)
    }
    async fn presence(&self, room: &RoomId, list: usize) -> Result<Online, BrokerError> {
        delegate!(self, b => b.presence(room, list).await)
    }
    async fn pin_set(
        &self,
        room: &RoomId,
        id: MessageId,
        change: PinChange,
        max: usize,
        stored: Option<&[MessageId]>,
        check: StateCheck,
    ) -> Result<PinOutcome, BrokerError> {
        delegate!(self, b => b.pin_set(room, id, change, max, stored, check).await)
    }
    fn healthy(&self) -> bool {
        delegate!(self, b => b.healthy())
    }
}
