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
    Broker, BrokerError, Dedupe, Events, PinChange, PinOutcome, Published, Recovery, StateCheck,
    StateVersion,
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

/// Reads a room's last stored seq from the store: after a restart a room's numbering goes on
/// from there instead of starting again at 1.
pub type SeedFn =
    Arc<dyn Fn(RoomId) -> Pin<Box<dyn Future<Output = Result<u64, String>> + Send>> + Send + Sync>;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    shards: Vec<Mutex<Shard>>,
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
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        room.hash(&mut h);
        self.shards[(h.finish() as usize) % SHARDS]
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
        let (published, stored) = {
            // One critical section per room: the dedupe check, seq assignment and delivery,
            // so concurrent publishers deliver in seq order.
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
            self.hub.deliver(room, seq, &stored, None);
            if let Some(d) = &dedupe {
                let first = Published::Duplicate {
                    seq,
                    id: d.id,
                    ts: d.ts,
                };
                shard.dedupe.put(d.key, first, now);
            }
            (Published::Fresh { seq }, stored)
        };
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
        let Some(log) = shard.logs.get(room) else {
            return Ok(Recovery {
                last_seq: 0,
                version,
                epoch: self.epoch.clone(),
                events: vec![],
                complete: true,
            });
        };
        let Some(since) = since.filter(|_| epoch.is_none_or(|e| e == self.epoch)) else {
            return Ok(Recovery {
                last_seq: log.last_seq,
                version,
                epoch: self.epoch.clone(),
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
            events,
            complete,
        })
    }

    async fn presence_add(&self, room: &RoomId, user: &UserRef) -> Result<bool, BrokerError> {
        let mut shard = self.shard(room);
        let users = shard.presence.entry(room.clone()).or_default();
        let e = users
            .entry(user.id.clone())
            .or_insert_with(|| (user.clone(), 0));
        e.1 += 1;
        Ok(e.1 == 1)
    }

    async fn presence_remove(&self, room: &RoomId, user: &str) -> Result<bool, BrokerError> {
        let mut shard = self.shard(room);
        let Some(users) = shard.presence.get_mut(room) else {
            return Ok(false);
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
        if users.is_empty() {
            shard.presence.remove(room);
        }
        Ok(gone)
    }

    async fn presence(&self, room: &RoomId) -> Result<Vec<UserRef>, BrokerError> {
        let shard = self.shard(room);
        let mut users: Vec<UserRef> = shard
            .presence
            .get(room)
            .map(|u| u.values().map(|(u, _)| u.clone()).collect())
            .unwrap_or_default();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(users)
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
