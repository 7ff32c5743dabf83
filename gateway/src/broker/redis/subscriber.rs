//! The node's pub/sub: one RESP3 connection per primary that serves a room with local members
//! (sharded channels are served by the primary that owns their slot), and the node channel
//! on one of them. One task owns them all: it subscribes as told, delivers into the hub, and
//! when a connection is lost (or a slot moved away: Redis unsubscribes its channels) it
//! reads where the rooms live now, subscribes them there, and fills each room's gap from its
//! window — so local delivery stays gapless and in order. Pushes already received are
//! delivered as one corked batch (up to [`READ_BATCH`]): each session's frames of the batch go
//! out in one write ([`crate::cork`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use history_service::redis_conn::{slot_of, Primary};
use history_service::redis_up::RedisUp;
use proto::envelope::{NodeMessage, NodeTarget};
use proto::RoomId;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::keys::{self, RoomKeys};
use super::{unavailable, RedisBroker, Window, CALL_TIMEOUT, NODE_CHANNEL};
use crate::broker::BrokerError;
use crate::bus;
use crate::hub::Hub;

pub(super) enum SubCmd {
    Subscribe(RoomId, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(RoomId),
    /// The partition is in a new epoch: report the highest seq delivered of its rooms, and
    /// close their sessions (their clients rejoin in the new epoch and fill from history).
    EpochChanged(u16, Arc<str>),
}

/// Pushes delivered as one batch at most (see the module docs).
const READ_BATCH: usize = 256;

/// A room event that arrived after a gap in its room's seqs: the gap is filled from the
/// window first.
struct Gap {
    room: RoomId,
    seen: u64,
    seq: u64,
    frame: Bytes,
}

/// A connection to one primary; `gen` tells its pushes from an earlier connection's.
struct Conn {
    gen: u64,
    conn: MultiplexedConnection,
}

struct Subscriber {
    broker: Weak<RedisBroker>,
    hub: Arc<Hub>,
    healthy: Arc<RedisUp>,
    primaries: Vec<Primary>,
    /// By primary address.
    conns: HashMap<String, Conn>,
    next_gen: u64,
    pushes: mpsc::UnboundedSender<(u64, PushInfo)>,
    /// Subscribed rooms, and the primary whose connection carries each.
    rooms: HashMap<RoomId, String>,
    /// Rooms whose subscription was lost, to be made again (and their gap filled).
    lost: HashSet<RoomId>,
    /// The primary whose connection carries the node channel.
    nodes_on: Option<String>,
    /// Last seq delivered per subscribed room.
    last: HashMap<RoomId, u64>,
}

/// The subscriber task. `ready` fires once the node channel is subscribed.
pub(super) async fn run(
    broker: Weak<RedisBroker>,
    mut cmds: mpsc::Receiver<SubCmd>,
    hub: Arc<Hub>,
    healthy: Arc<RedisUp>,
    ready: oneshot::Sender<()>,
) {
    let (pushes, mut pushed) = mpsc::unbounded_channel();
    let mut sub = Subscriber {
        broker,
        hub,
        healthy,
        primaries: Vec::new(),
        conns: HashMap::new(),
        next_gen: 0,
        pushes,
        rooms: HashMap::new(),
        lost: HashSet::new(),
        nodes_on: None,
        last: HashMap::new(),
    };
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    let mut next_repair = Instant::now();
    loop {
        if sub.broken() && Instant::now() >= next_repair {
            if sub.repair().await {
                backoff = Duration::from_millis(50);
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            } else {
                sub.healthy.set(false);
                tracing::warn!(?backoff, "redis pub/sub unreachable; retrying");
                next_repair = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        let wait = if sub.broken() {
            next_repair.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return,
                Some(cmd) => sub.command(cmd).await,
            },
            push = pushed.recv() => match push {
                None => return,
                Some(first) => {
                    // Everything already received, as one batch.
                    let mut batch = VecDeque::from([first]);
                    while batch.len() < READ_BATCH {
                        match pushed.try_recv() {
                            Ok(p) => batch.push_back(p),
                            Err(_) => break,
                        }
                    }
                    sub.pushed(batch).await;
                }
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

impl Subscriber {
    /// Something to subscribe again.
    fn broken(&self) -> bool {
        self.nodes_on.is_none() || !self.lost.is_empty()
    }

    async fn command(&mut self, cmd: SubCmd) {
        match cmd {
            SubCmd::Subscribe(room, done) => {
                // Commands run in order: once an earlier SSUBSCRIBE of this room was confirmed,
                // the channel is live for this joiner too.
                if self.rooms.contains_key(&room) {
                    let _ = done.send(Ok(()));
                    return;
                }
                let r = self.subscribe(&room).await;
                if r.is_ok() {
                    self.lost.remove(&room);
                }
                let _ = done.send(r);
            }
            SubCmd::Unsubscribe(room) => {
                // A join may have raced the leave: keep the channel while anyone is local.
                if self.hub.sessions_count(&room) > 0 {
                    return;
                }
                self.last.remove(&room);
                self.lost.remove(&room);
                if let Some(addr) = self.rooms.remove(&room) {
                    let ch = RoomKeys::new(&room, self.partitions()).channel().to_owned();
                    if let Some(c) = self.conns.get_mut(&addr) {
                        let _ = tokio::time::timeout(
                            CALL_TIMEOUT,
                            redis::cmd("SUNSUBSCRIBE")
                                .arg(&ch)
                                .query_async::<Value>(&mut c.conn),
                        )
                        .await;
                    }
                }
            }
            SubCmd::EpochChanged(p, epoch) => {
                let Some(b) = self.broker.upgrade() else {
                    return;
                };
                let n = self.partitions();
                let rooms: Vec<RoomId> = self
                    .hub
                    .local_rooms()
                    .into_iter()
                    .map(|(r, _)| r)
                    .filter(|r| RoomKeys::new(r, n).partition == p)
                    .collect();
                for room in rooms {
                    if let Some(seq) = self.last.remove(&room) {
                        if let Err(e) = b.reappend(&room, &epoch, seq, &[]).await {
                            tracing::warn!(error = %e, %room, "could not report a room's floor");
                        }
                    }
                    // Seqs delivered here may have been given to other events before the loss
                    // was noticed: the clients start over from the new epoch.
                    self.hub.close_room(&room, proto::errors::close::RESTARTING);
                }
            }
        }
    }

    fn partitions(&self) -> u16 {
        self.broker.upgrade().map_or(1, |b| b.partitions())
    }

    /// The primary that serves `slot`, as last read.
    fn owner(&self, slot: u16) -> Option<String> {
        self.primaries
            .iter()
            .find(|p| p.owns(slot))
            .map(|p| p.addr.clone())
    }

    /// Reads which primary serves which slots.
    async fn refresh(&mut self) -> Result<(), BrokerError> {
        let b = self
            .broker
            .upgrade()
            .ok_or_else(|| unavailable("stopped"))?;
        let mut conn = b.conn();
        let primaries = tokio::time::timeout(CALL_TIMEOUT, conn.primaries(&b.settings))
            .await
            .map_err(|_| unavailable("redis call timed out"))?
            .map_err(unavailable)?;
        self.primaries = primaries;
        Ok(())
    }

    /// The connection to the primary at `addr`, opened when there is none.
    async fn conn(&mut self, addr: &str) -> Result<&mut MultiplexedConnection, BrokerError> {
        if !self.conns.contains_key(addr) {
            let b = self
                .broker
                .upgrade()
                .ok_or_else(|| unavailable("stopped"))?;
            let info = b.settings.node_info(addr, redis::ProtocolVersion::RESP3);
            let client = redis::Client::open(info).map_err(unavailable)?;
            self.next_gen += 1;
            let gen = self.next_gen;
            let pushes = self.pushes.clone();
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_push_sender(move |p: PushInfo| pushes.send((gen, p)).map_err(drop));
            let conn = tokio::time::timeout(
                CALL_TIMEOUT,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .map_err(|_| unavailable("connecting timed out"))?
            .map_err(unavailable)?;
            self.conns.insert(addr.to_owned(), Conn { gen, conn });
        }
        Ok(&mut self.conns.get_mut(addr).expect("just made").conn)
    }

    /// SSUBSCRIBEs the room's channel on the primary that serves it.
    async fn subscribe(&mut self, room: &RoomId) -> Result<(), BrokerError> {
        let ch = RoomKeys::new(room, self.partitions()).channel().to_owned();
        for attempt in 0..2 {
            if self.primaries.is_empty() || attempt > 0 {
                self.refresh().await?;
            }
            let addr = self
                .owner(slot_of(&ch))
                .ok_or_else(|| unavailable("no primary serves the room's slot"))?;
            let conn = self.conn(&addr).await?;
            let r = tokio::time::timeout(
                CALL_TIMEOUT,
                redis::cmd("SSUBSCRIBE").arg(&ch).query_async::<Value>(conn),
            )
            .await
            .map_err(|_| unavailable("subscribe timed out"))?;
            match r {
                Ok(_) => {
                    self.rooms.insert(room.clone(), addr);
                    return Ok(());
                }
                // The slot moved: read the map again and go where it is now.
                Err(e) if e.code() == Some("MOVED") => continue,
                Err(e) => {
                    self.drop_conn(&addr);
                    return Err(unavailable(e));
                }
            }
        }
        Err(unavailable("the room's slot keeps moving"))
    }

    /// Subscribes what was lost again; true when nothing is left to do.
    async fn repair(&mut self) -> bool {
        if self.refresh().await.is_err() {
            return false;
        }
        if self.nodes_on.is_none() {
            let Some(addr) = self.primaries.first().map(|p| p.addr.clone()) else {
                return false;
            };
            let subscribed = match self.conn(&addr).await {
                Ok(conn) => tokio::time::timeout(
                    CALL_TIMEOUT,
                    redis::cmd("SUBSCRIBE")
                        .arg(NODE_CHANNEL)
                        .query_async::<Value>(conn),
                )
                .await
                .is_ok_and(|r| r.is_ok()),
                Err(_) => false,
            };
            if !subscribed {
                self.drop_conn(&addr);
                return false;
            }
            self.nodes_on = Some(addr);
            // Node frames (room-state changes among them) sent meanwhile were missed.
            if let Some(events) = self.broker.upgrade().and_then(|b| b.events.get().cloned()) {
                events.reconnected();
            }
        }
        let lost: Vec<RoomId> = self.lost.iter().cloned().collect();
        for room in lost {
            if self.hub.sessions_count(&room) == 0 {
                self.lost.remove(&room);
                self.last.remove(&room);
                continue;
            }
            if self.subscribe(&room).await.is_err() {
                continue;
            }
            self.lost.remove(&room);
            // Events published while the room was not subscribed: fetch them before any live
            // one, from the lowest seq a local session has (the hub drops what a session
            // already got). Joins that had not recorded their seq yet are closed: they may
            // have read it before the loss (see `Hub::resume_point`).
            let delivered = self.last.remove(&room);
            if let Some(seen) = self.hub.resume_point(&room) {
                self.catch_up(&room, seen, delivered).await;
            }
        }
        let fixed = !self.broken();
        if fixed {
            self.healthy.set(true);
            tracing::info!(rooms = self.rooms.len(), "redis pub/sub connected");
        }
        fixed
    }

    /// Delivers a batch of pushes corked; a gap needs an await (the window read), so the cork
    /// ends before it and a new one starts after.
    async fn pushed(&mut self, mut batch: VecDeque<(u64, PushInfo)>) {
        while !batch.is_empty() {
            let gap = crate::cork::corked(|| {
                while let Some((gen, push)) = batch.pop_front() {
                    if let Some(gap) = self.route(gen, push) {
                        return Some(gap);
                    }
                }
                None
            });
            if let Some(Gap {
                room,
                seen,
                seq,
                frame,
            }) = gap
            {
                self.catch_up(&room, seen, None).await;
                if self.last.get(&room).is_none_or(|s| seq > *s) {
                    self.last.insert(room.clone(), seq);
                    self.hub.deliver(&room, seq, &frame, None);
                }
            }
        }
    }

    /// Handles one push, or returns the gap that must be filled before its event.
    fn route(&mut self, gen: u64, push: PushInfo) -> Option<Gap> {
        match push.kind {
            PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return None;
                };
                let room = keys::room_of_channel(&ch)?;
                return self.deliver(room, Bytes::from(payload));
            }
            PushKind::Message => {
                if let Some(Value::BulkString(payload)) = push.data.get(1) {
                    self.node_frame(payload);
                }
            }
            PushKind::Disconnection => {
                let addr = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.gen == gen)
                    .map(|(a, _)| a.clone())?;
                self.drop_conn(&addr);
            }
            PushKind::SUnsubscribe => {
                // Not asked for (an asked-for one removed the room first): the slot moved to
                // another primary.
                let Some(Value::BulkString(ch)) = push.data.first() else {
                    return None;
                };
                let room = keys::room_of_channel(ch)?;
                let on = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.gen == gen)
                    .map(|(a, _)| a);
                if on.is_some() && self.rooms.get(&room) == on {
                    tracing::info!(%room, "the room's slot moved; subscribing where it is now");
                    self.rooms.remove(&room);
                    self.lost.insert(room);
                }
            }
            _ => {}
        }
        None
    }

    /// Closes the connection to `addr` (it failed): its subscriptions are lost.
    fn drop_conn(&mut self, addr: &str) {
        self.conns.remove(addr);
        self.healthy.set(false);
        tracing::warn!(
            primary = addr,
            "redis pub/sub connection lost; subscribing again"
        );
        let gone: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, a)| a.as_str() == addr)
            .map(|(r, _)| r.clone())
            .collect();
        for room in gone {
            self.rooms.remove(&room);
            self.lost.insert(room);
        }
        if self.nodes_on.as_deref() == Some(addr) {
            self.nodes_on = None;
        }
    }

    fn node_frame(&self, payload: &[u8]) {
        match NodeMessage::decode(payload) {
            Some(NodeMessage {
                target: NodeTarget::All,
                frame,
            }) => self.hub.deliver_all(&Bytes::copy_from_slice(frame)),
            Some(NodeMessage {
                target: NodeTarget::User(u),
                frame,
            }) => self.hub.deliver_user(u, &Bytes::copy_from_slice(frame)),
            Some(NodeMessage {
                target: NodeTarget::Disconnect(u),
                frame,
            }) => self.hub.disconnect_user(u, &String::from_utf8_lossy(frame)),
            Some(NodeMessage {
                target: NodeTarget::RoomState(r),
                frame,
            }) => {
                let Some(b) = self.broker.upgrade() else {
                    return;
                };
                if let (Ok(room), Some(events)) = (RoomId::new(r), b.events.get()) {
                    events.room_state_changed(&room, frame);
                }
            }
            None => tracing::warn!("undecodable node message"),
        }
    }

    /// A live room frame: delivered in seq order, or the gap to fill from the window first.
    fn deliver(&mut self, room: RoomId, frame: Bytes) -> Option<Gap> {
        let Some(peek) = bus::peek(&frame) else {
            tracing::warn!(%room, "undecodable room frame");
            return None;
        };
        if peek.seq == 0 {
            self.hub
                .deliver(&room, 0, &frame, bus::excluded_user(&peek));
            return None;
        }
        match self.last.get(&room).copied() {
            Some(seen) if peek.seq <= seen => return None, // already delivered by a catch-up
            Some(seen) if peek.seq > seen + 1 => {
                return Some(Gap {
                    room,
                    seen,
                    seq: peek.seq,
                    frame,
                })
            }
            _ => {}
        }
        self.last.insert(room.clone(), peek.seq);
        self.hub.deliver(&room, peek.seq, &frame, None);
        None
    }

    /// Delivers a room's events after `seen` from its window; when the window no longer
    /// reaches back that far, or the room was renumbered after Redis lost data (then
    /// `delivered`, the highest seq this node delivered, is reported as the room's floor),
    /// closes the room's local sessions (1012) so their clients recover.
    async fn catch_up(&mut self, room: &RoomId, seen: u64, delivered: Option<u64>) {
        let Some(b) = self.broker.upgrade() else {
            return;
        };
        let keys = b.keys(room);
        let w = match b.read_window(&keys, Some(seen)).await {
            Ok(Window::Read(w)) => w,
            Ok(Window::Unseeded(epoch)) => {
                // Not seeded in the current epoch (or no epoch at all): Redis lost the room.
                // What this node delivered bounds the new numbering from below; the sessions
                // rejoin, and their join seeds the room.
                let epoch = match epoch {
                    Some(e) => Ok(e),
                    None => b.epoch_in_force(&keys).await,
                };
                if let Ok(epoch) = epoch {
                    let floor = delivered.unwrap_or(seen).max(seen);
                    let _ = b.reappend(room, &epoch, floor, &[]).await;
                }
                tracing::warn!(%room, seen, "the room was renumbered; closing local sessions");
                self.hub.close_room(room, proto::errors::close::RESTARTING);
                self.last.remove(room);
                return;
            }
            Err(e) => {
                // Delivering newer events now would skip the gap for good: make the room's
                // clients reconnect and recover from the window (or history) instead.
                tracing::warn!(error = %e, %room, seen, "catch-up failed; closing local sessions");
                self.hub.close_room(room, proto::errors::close::RESTARTING);
                self.last.remove(room);
                return;
            }
        };
        let last = w.last;
        if !w.complete(seen) {
            tracing::warn!(%room, seen, last, "gap beyond the recovery window; closing local sessions");
            self.hub.close_room(room, proto::errors::close::RESTARTING);
            self.last.insert(room.clone(), last);
            return;
        }
        if last > seen {
            tracing::info!(%room, seen, last, "filling a gap from the window");
        }
        for (seq, frame) in w.events {
            if seq > seen {
                self.hub.deliver(room, seq, &frame, None);
            }
        }
        // The live events still queued on the connection up to here were just delivered.
        self.last.insert(room.clone(), last.max(seen));
    }
}
