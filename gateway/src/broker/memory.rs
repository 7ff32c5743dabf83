//! The in-process broker of a single node: seq counters, recovery windows, presence and
//! dedupe keys live in memory; the persistence log is a bounded channel into the embedded
//! store's writer ([`crate::persist`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::envelope::{with_seq, NodeTarget};
use proto::{MessageId, RoomId, UserRef};

use super::{
    Broker, BrokerError, Dedupe, Events, Online, PinChange, PinOutcome, Published, Recovery,
    StateCheck, StateVersion,
};
use crate::hub::Hub;
use crate::persist::PersistQueue;

const SHARDS: usize = 64;
/// How long a `client_msg_id` is remembered.
const DEDUPE_TTL: Duration = Duration::from_secs(600);
/// Dedupe keys kept at most; past it the oldest go first.
const DEDUPE_MAX: usize = 100_000;

#[derive(Default)]
struct RoomLog {
    last_seq: u64,
    recent: VecDeque<(u64, Bytes)>,
}

#[derive(Default)]
struct Dedupes {
    /// key → (seq, id, ts) of the first publication
    map: HashMap<String, (Published, Instant)>,
    order: VecDeque<(String, Instant)>,
}

impl Dedupes {
    fn get(&mut self, key: &str, now: Instant) -> Option<Published> {
        while let Some((k, at)) = self.order.front() {
            if now.duration_since(*at) < DEDUPE_TTL && self.order.len() <= DEDUPE_MAX {
                break;
            }
            self.map.remove(k);
            self.order.pop_front();
        }
        self.map.get(key).map(|(p, _)| *p)
    }

    fn put(&mut self, key: &str, p: Published, now: Instant) {
        self.map.insert(key.to_string(), (p, now));
        self.order.push_back((key.to_string(), now));
    }
}

/// Everything about the rooms that hash to one shard.
#[derive(Default)]
struct Shard {
    logs: HashMap<RoomId, RoomLog>,
    /// Keys are `room/user/client_msg_id`.
    dedupe: Dedupes,
    /// room → user id → (user, connection count)
    presence: HashMap<RoomId, HashMap<String, (UserRef, usize)>>,
    /// Pinned message ids per room that has had a pin change since start.
    pins: HashMap<RoomId, HashSet<MessageId>>,
    /// State versions of rooms whose state changed since start (absent: 0).
    versions: HashMap<RoomId, StateVersion>,
    /// Stored events published but not yet delivered, in seq order per room (see
    /// [`deliver_pending`]).
    pending: Vec<(RoomId, u64, Bytes)>,
    /// Some publisher is delivering this shard's pending events.
    delivering: bool,
}

impl Shard {
    /// Applies a state check; the caller holds the shard, so the check and what follows are
    /// one step. A `Change` is recorded by [`Shard::changed`] once the change is done.
    fn check(&self, room: &RoomId, check: StateCheck) -> Result<(), BrokerError> {
        match check {
            StateCheck::Expect(v) if v != self.version(room) => Err(BrokerError::Stale),
            _ => Ok(()),
        }
    }

    fn changed(&mut self, room: &RoomId, check: StateCheck) {
        if let StateCheck::Change(v) = check {
            self.versions.insert(room.clone(), v);
        }
    }

    fn version(&self, room: &RoomId) -> StateVersion {
        self.versions.get(room).copied().unwrap_or(0)
    }
}

type Shards = Arc<[Mutex<Shard>]>;

fn shard_of(room: &RoomId) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

/// A room's online users as [`Online`] holds them: all, sorted, when at most `list`; else any
/// `list` of them (sorted), without sorting the whole room.
fn online(users: &HashMap<String, (UserRef, usize)>, list: usize) -> Online {
    let mut some: Vec<UserRef> = users.values().take(list).map(|(u, _)| u.clone()).collect();
    some.sort_by(|a, b| a.id.cmp(&b.id));
    Online {
        count: users.len() as u64,
        users: some,
    }
}

/// Rounds a publisher delivers for others before it hands the rest to a task of its own.
const MAX_ROUNDS: usize = 8;

/// Delivers a shard's pending stored events, corked, until none is left.
///
/// Flat combining: a publisher that finds nobody delivering its shard delivers — its own event
/// and whatever other publishers add meanwhile; they only queue theirs and go on. Under load
/// one delivery pass so carries many events, and each session gets all of its frames of the
/// pass in one write ([`crate::cork`]); at low load each publisher delivers its own event at
/// once, as before. Events leave in seq order (one deliverer per shard, a room's events
/// queued in seq order). A joiner needs no more than before: an event is in the room's window
/// before it is queued, so a join's window read either has it or the join registered in the
/// hub before the event is delivered (see `commands::join`).
fn deliver_pending(shards: &Shards, hub: &Arc<Hub>, index: usize) {
    for _ in 0..MAX_ROUNDS {
        let batch = {
            let mut shard = shards[index].lock().expect("broker shard lock");
            if shard.pending.is_empty() {
                shard.delivering = false;
                return;
            }
            std::mem::take(&mut shard.pending)
        };
        crate::cork::corked(|| {
            for (room, seq, frame) in &batch {
                hub.deliver(room, *seq, frame, None);
            }
        });
    }
    // Still busy: a publisher owes its own caller an answer; a task takes over.
    let (shards, hub) = (shards.clone(), hub.clone());
    tokio::task::spawn_blocking(move || deliver_pending(&shards, &hub, index));
}

/// Reads a room's last stored seq from the store: after a restart a room's numbering goes on
/// from there instead of starting again at 1.
pub type SeedFn =
    Arc<dyn Fn(RoomId) -> Pin<Box<dyn Future<Output = Result<u64, String>> + Send>> + Send + Sync>;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    shards: Shards,
    window: usize,
    persist: Option<PersistQueue>,
    seed: Option<SeedFn>,
    /// This process's epoch: a restart loses the windows (and seqs delivered but not yet
    /// committed), so positions from before it are of another epoch.
    epoch: String,
}

impl MemoryBroker {
    pub fn new(
        hub: Arc<Hub>,
        window: usize,
        persist: Option<PersistQueue>,
        seed: Option<SeedFn>,
    ) -> Self {
        Self {
            hub,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            window,
            persist,
            seed,
            epoch: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// Creates the room's log on first use, its seq seeded from the store.
    async fn ensure_log(&self, room: &RoomId) -> Result<(), BrokerError> {
        if self.shard(room).logs.contains_key(room) {
            return Ok(());
        }
        let last_seq = match &self.seed {
            Some(seed) => seed(room.clone()).await.map_err(BrokerError::Unavailable)?,
            None => 0,
        };
        // Two first uses may race here; both read the same value.
        self.shard(room)
            .logs
            .entry(room.clone())
            .or_insert_with(|| RoomLog {
                last_seq,
                recent: VecDeque::new(),
            });
        Ok(())
    }

    fn shard(&self, room: &RoomId) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_of(room)]
            .lock()
            .expect("broker shard lock")
    }
}

impl Broker for MemoryBroker {
    fn worker_id(&self) -> u16 {
        0
    }

    /// One node: nothing happens elsewhere to report.
    fn report_to(&self, _events: Arc<dyn Events>) {}

    async fn publish_stored(
        &self,
        room: &RoomId,
        frame: &[u8],
        dedupe: Option<Dedupe<'_>>,
        check: StateCheck,
    ) -> Result<Published, BrokerError> {
        self.ensure_log(room).await?;
        let now = Instant::now();
        let (published, stored, lead) = {
            // One critical section per room: the dedupe check, the state check, seq assignment
            // and queueing for delivery, so events are delivered in seq order.
            let mut shard = self.shard(room);
            if let Some(d) = &dedupe {
                if let Some(first) = shard.dedupe.get(d.key, now) {
                    return Ok(first);
                }
            }
            shard.check(room, check)?;
            shard.changed(room, check);
            let log = shard.logs.entry(room.clone()).or_default();
            log.last_seq += 1;
            let seq = log.last_seq;
            let stored = Bytes::from(with_seq(frame, seq));
            log.recent.push_back((seq, stored.clone()));
            while log.recent.len() > self.window {
                log.recent.pop_front();
            }
            shard.pending.push((room.clone(), seq, stored.clone()));
            if let Some(d) = &dedupe {
                let first = Published::Duplicate {
                    seq,
                    id: d.id,
                    ts: d.ts,
                };
                shard.dedupe.put(d.key, first, now);
            }
            let lead = !std::mem::replace(&mut shard.delivering, true);
            (Published::Fresh { seq }, stored, lead)
        };
        if lead {
            deliver_pending(&self.shards, &self.hub, shard_of(room));
        }
        if let Some(p) = &self.persist {
            p.append_and_wait(stored)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        }
        Ok(published)
    }

    async fn publish_ephemeral(
        &self,
        room: &RoomId,
        frame: Bytes,
        expect: Option<StateVersion>,
    ) -> Result<(), BrokerError> {
        let peek = crate::bus::peek(&frame);
        let except = peek.as_ref().and_then(crate::bus::excluded_user);
        let shard = self.shard(room);
        if let Some(v) = expect {
            shard.check(room, StateCheck::Expect(v))?;
        }
        // Delivered under the shard, like a stored event: a state change cannot slip between
        // the check and the delivery.
        self.hub.deliver(room, 0, &frame, except);
        Ok(())
    }

    async fn state_version(&self, room: &RoomId) -> Result<StateVersion, BrokerError> {
        Ok(self.shard(room).version(room))
    }

    async fn publish_node(&self, target: NodeTarget<'_>, frame: Bytes) -> Result<(), BrokerError> {
        match target {
            NodeTarget::All => self.hub.deliver_all(&frame),
            NodeTarget::User(u) => self.hub.deliver_user(u, &frame),
            NodeTarget::Disconnect(u) => self
                .hub
                .disconnect_user(u, &String::from_utf8_lossy(&frame)),
            // One node: the announcing node is this one, and it updated its own cache.
            NodeTarget::RoomState(_) => {}
        }
        Ok(())
    }

    async fn persist(&self, frame: Bytes) -> Result<(), BrokerError> {
        if let Some(p) = &self.persist {
            p.append(frame)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    async fn subscribe(&self, _room: &RoomId) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _room: &RoomId) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn recover(
        &self,
        room: &RoomId,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Recovery, BrokerError> {
        self.ensure_log(room).await?;
        let shard = self.shard(room);
        let version = shard.version(room);
        let pins = shard
            .pins
            .get(room)
            .map(|ids| ids.iter().copied().collect());
        let Some(log) = shard.logs.get(room) else {
            return Ok(Recovery {
                last_seq: 0,
                version,
                epoch: self.epoch.clone(),
                pins,
                events: vec![],
                complete: true,
            });
        };
        let Some(since) = since.filter(|_| epoch.is_none_or(|e| e == self.epoch)) else {
            return Ok(Recovery {
                last_seq: log.last_seq,
                version,
                epoch: self.epoch.clone(),
                pins,
                events: vec![],
                complete: since.is_none(),
            });
        };
        let oldest = log.recent.front().map_or(log.last_seq + 1, |(s, _)| *s);
        // Complete when nothing after `since` fell out of the window.
        // A `since` past the last seq comes from before a restart that lost the window.
        let complete = since <= log.last_seq && (since + 1 >= oldest || since == log.last_seq);
        let events = log
            .recent
            .iter()
            .filter(|(s, _)| *s > since)
            .cloned()
            .collect();
        Ok(Recovery {
            last_seq: log.last_seq,
            version,
            epoch: self.epoch.clone(),
            pins,
            events,
            complete,
        })
    }

    async fn presence_add(
        &self,
        room: &RoomId,
        user: &UserRef,
        list: usize,
    ) -> Result<(bool, Online), BrokerError> {
        let mut shard = self.shard(room);
        let users = shard.presence.entry(room.clone()).or_default();
        let e = users
            .entry(user.id.clone())
            .or_insert_with(|| (user.clone(), 0));
        e.1 += 1;
        let first = e.1 == 1;
        Ok((first, online(users, list)))
    }

    async fn presence_remove(&self, room: &RoomId, user: &str) -> Result<Option<u64>, BrokerError> {
        let mut shard = self.shard(room);
        let Some(users) = shard.presence.get_mut(room) else {
            return Ok(None);
        };
        let gone = match users.get_mut(user) {
            Some(e) if e.1 > 1 => {
                e.1 -= 1;
                false
            }
            Some(_) => {
                users.remove(user);
                true
            }
            None => false,
        };
        let count = users.len() as u64;
        if users.is_empty() {
            shard.presence.remove(room);
        }
        Ok(gone.then_some(count))
    }

    async fn presence(&self, room: &RoomId, list: usize) -> Result<Online, BrokerError> {
        let shard = self.shard(room);
        Ok(shard
            .presence
            .get(room)
            .map(|users| online(users, list))
            .unwrap_or_default())
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
        let mut shard = self.shard(room);
        shard.check(room, check)?;
        let pins = match (shard.pins.contains_key(room), stored) {
            (false, None) => return Ok(PinOutcome::NotPinned),
            (false, Some(stored)) => shard
                .pins
                .entry(room.clone())
                .or_insert_with(|| stored.iter().copied().collect()),
            (true, _) => shard.pins.get_mut(room).expect("checked"),
        };
        Ok(match change {
            PinChange::Pin if pins.contains(&id) => PinOutcome::AlreadyPinned,
            PinChange::Pin if pins.len() >= max => PinOutcome::Full,
            PinChange::Pin => {
                pins.insert(id);
                PinOutcome::Done
            }
            PinChange::Unpin if pins.remove(&id) => PinOutcome::Done,
            PinChange::Unpin => PinOutcome::NotPinned,
        })
    }

    fn healthy(&self) -> bool {
        self.persist.as_ref().is_none_or(|p| p.healthy())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::SessionHandle;
    use crate::outbox::{Outbound, Outbox};

    /// Concurrent publishers into one room: whoever delivers (flat combining), a member gets
    /// every event once, in seq order, and each publisher's seq is its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishes_reach_a_member_once_each_in_seq_order() {
        const PUBLISHERS: u64 = 8;
        const EACH: u64 = 200;
        let hub = Arc::new(Hub::new(100_000));
        let broker = Arc::new(MemoryBroker::new(hub.clone(), 10, None, None));
        let room = RoomId::new("r").unwrap();
        let outbox: Arc<Outbox> = Arc::new(Outbox::new(100_000));
        let user = Arc::new(UserRef {
            id: "m".into(),
            name: "m".into(),
        });
        let joining = hub.join(&room, SessionHandle::new(1, user, false, outbox.clone()));
        hub.seen_up_to(&room, 1, 0);
        hub.release(&room, 1);
        joining.joined();
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|_| {
                let (broker, room) = (broker.clone(), room.clone());
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for _ in 0..EACH {
                        let p = broker
                            .publish_stored(
                                &room,
                                br#"{"type":"message"}"#,
                                None,
                                StateCheck::Unchecked,
                            )
                            .await
                            .unwrap();
                        seqs.push(p.seq());
                    }
                    seqs
                })
            })
            .collect();
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        acked.sort_unstable();
        let all: Vec<u64> = (1..=PUBLISHERS * EACH).collect();
        assert_eq!(acked, all, "every publisher got its own seq");
        let mut got = Vec::new();
        while let Some(out) = outbox.try_pop() {
            if let Outbound::Text(frame) = out {
                got.push(crate::bus::peek(&frame).unwrap().seq);
            }
        }
        assert_eq!(got, all, "delivered once each, in seq order");
    }
}
