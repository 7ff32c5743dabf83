//! Redis losing data, and numbering on without ever reusing a seq.
//!
//! Redis can come back without some or all of its data: a restart without persistence, a lost
//! volume, a failover to a replica that had not received the last writes. A room's counter
//! would then count again from an old value (or from 1), handing out seqs that clients
//! already saw and the store already holds for other events — and the store, which keeps the
//! first event at each seq, would drop the new ones although their senders were
//! acknowledged. So:
//!
//! - **Each partition has an epoch** (`chat:{pN}:epoch`: a random `id`, and `until`). A room's
//!   counter belongs to the epoch it was seeded in (`…:ep`); the scripts refuse to number or
//!   replay a room that is not seeded in the current epoch, and a partition without an epoch
//!   (Redis lost everything) gets a new one. A room's position is (epoch, seq): a client whose
//!   `since` comes from another epoch is answered `recovered: false`.
//! - **Losses are noticed.** A missing epoch is a loss. Each node also watches the primaries
//!   ([`RedisBroker::watch_once`], every [`WATCH_EVERY`]): a primary with a new replication id
//!   (it restarted, or a replica took over) or a partition served elsewhere is checked against
//!   what this node published there and still remembers ([`super::sent`]); when Redis lacks
//!   any of it, the node replaces the partition's epoch.
//! - **A new epoch is seeded above everything known.** When a node that saw the previous epoch
//!   replaces it, rooms may be seeded only after a grace ([`GRACE`]): meanwhile every node
//!   notices the change and reports, per room, the highest seq it published or delivered (the
//!   room's floor), and appends what it published that the store may not have yet to the
//!   persistence stream again, with its seq. A room is then seeded (the first publish or join
//!   after the grace) at the highest of its floor, what the store holds
//!   (`Store::last_seq`), what its counter still holds, and (single Redis) the counter under
//!   the key layout before partitions. An event whose seq is no longer free when its node gets
//!   to it (the node was slower than the grace) is published again as a new event.
//!
//! The guarantee: a seq is never given to two different events while the node that saw the
//! first one runs (an acknowledged one is appended again and reaches the store with its seq),
//! and what the store stored is never overwritten. A Redis loss that takes a node down with it
//! loses what only that node remembered; `CHAT_REDIS_WAIT_REPLICAS` covers a failover then.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use history_service::partitions;
use history_service::redis_conn::slot_of;
use history_service::redis_settings::Mode;
use history_service::Store;
use proto::envelope::with_seq;
use proto::{RoomId, ServerEvent};

use super::keys::{self, RoomKeys};
use super::sent::{EntryId, Sent};
use super::subscriber::SubCmd;
use super::{call, field, unavailable, RedisBroker};
use crate::broker::{Broker, BrokerError, Dedupe, Published, StateCheck};

/// Entries as XRANGE returns them: id, fields.
type StreamEntries = Vec<(String, HashMap<String, Vec<u8>>)>;

/// What [`RedisBroker::reappend`] did.
#[derive(Default)]
pub(super) struct Reappended {
    /// The persistence entry of the last event appended again.
    last_entry: Option<EntryId>,
    /// Events whose seq another event holds (or that came after the room was seeded).
    taken: usize,
}

/// How long rooms of a replaced epoch wait before they are seeded: every node's watch
/// ([`WATCH_EVERY`]) gets to report what it knows first.
pub const GRACE: Duration = Duration::from_secs(2);
/// How often a node checks the primaries and the epochs of the partitions it uses.
pub const WATCH_EVERY: Duration = Duration::from_millis(500);
/// A command waits at most this long for its room to be seeded, then answers `unavailable`.
const SEED_BUDGET: Duration = Duration::from_secs(5);
/// Events per re-append script call.
const REAPPEND_CHUNK: usize = 100;

impl RedisBroker {
    /// The partition's epoch id, creating one when the partition has none.
    pub(super) async fn epoch_in_force(&self, keys: &RoomKeys) -> Result<String, BrokerError> {
        let id: Option<String> = call(
            redis::cmd("HGET").arg(keys.epoch()).arg("id"),
            &mut self.conn(),
        )
        .await?;
        match id {
            Some(id) => Ok(id),
            None => self.new_epoch(keys.partition, "").await,
        }
    }

    /// Replaces the partition's epoch `expected` (`""`: none) by a new one; returns the id in
    /// force afterwards (another node's, when it was first).
    async fn new_epoch(&self, p: u16, expected: &str) -> Result<String, BrokerError> {
        // A node that knew an earlier epoch of the partition may hold what Redis lost: every
        // node gets the grace to report it. Without one (a fresh Redis and fresh nodes) the
        // store is all there is to know.
        let knew = self.epochs.lock().expect("epochs lock").contains_key(&p)
            || self.sent.epoch_of(p).is_some();
        let grace = if knew { GRACE } else { Duration::ZERO };
        let id = format!("{:016x}", rand::random::<u64>());
        let mut inv = self.scripts.new_epoch.prepare_invoke();
        inv.key(partitions::epoch(p))
            .arg(expected)
            .arg(&id)
            .arg(grace.as_millis() as u64);
        let now: String = self.invoke(&mut self.conn(), inv).await?;
        if now == id {
            metrics::counter!("chat_broker_epochs_total").increment(1);
            if knew {
                tracing::warn!(
                    partition = p,
                    epoch = %id,
                    "Redis lost (or may have lost) a partition's data: new epoch"
                );
            }
        }
        Ok(now)
    }

    /// Seeds the room's counter in the partition's current epoch (see the module docs).
    /// `unavailable` when the epoch's grace outlasts [`SEED_BUDGET`].
    pub(super) async fn seed(&self, room: &RoomId, keys: &RoomKeys) -> Result<(), BrokerError> {
        let deadline = Instant::now() + SEED_BUDGET;
        loop {
            let epoch = self.epoch_in_force(keys).await?;
            let stored = self
                .store
                .last_seq(room)
                .await
                .map_err(|e| unavailable(format!("the store's last seq of {room}: {e}")))?;
            let legacy: Option<u64> = match self.settings.mode {
                Mode::Single | Mode::Sentinel => {
                    call(
                        redis::cmd("GET").arg(keys::legacy_seq(room)),
                        &mut self.conn(),
                    )
                    .await?
                }
                Mode::Cluster => None,
            };
            let mut inv = self.scripts.seed.prepare_invoke();
            inv.key(keys.epoch())
                .key(keys.key("seq"))
                .key(keys.key("ep"))
                .key(keys.key("floor"))
                .key(keys.key("log"))
                .key(keys.key("pins"))
                .key(keys.key("oldlog"))
                .arg(&epoch)
                .arg(stored.max(legacy.unwrap_or(0)));
            let reply: Vec<String> = self.invoke(&mut self.conn(), inv).await?;
            match reply.first().map(String::as_str) {
                Some("1") => return Ok(()),
                Some("2") => {
                    let left = Duration::from_millis(field(&reply, 1)?);
                    if Instant::now() + left > deadline {
                        return Err(unavailable(
                            "the room is renumbered after Redis lost data; retry",
                        ));
                    }
                    tokio::time::sleep(left).await;
                }
                _ => {} // the epoch moved on meanwhile: once more
            }
        }
    }

    /// Raises the room's floor in `epoch` to `floor` and appends the acknowledged `events`
    /// (of an earlier epoch; and those with an idempotency key, see [`Sent::promised`]) to the
    /// persistence stream again where Redis lacks them and their seq is still free (see
    /// [`super::scripts::REAPPEND`]). `Err` when Redis failed or the
    /// epoch moved on (the caller keeps the events for the next round).
    pub(super) async fn reappend(
        &self,
        room: &RoomId,
        epoch: &str,
        floor: u64,
        events: &[Sent],
    ) -> Result<Reappended, BrokerError> {
        let keys = self.keys(room);
        let promised: Vec<&Sent> = events.iter().filter(|s| s.promised()).collect();
        let mut done = Reappended::default();
        let mut chunks: Vec<&[&Sent]> = promised.chunks(REAPPEND_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let mut inv = self.scripts.reappend.prepare_invoke();
            inv.key(keys.epoch())
                .key(keys.key("ep"))
                .key(keys.key("floor"))
                .key(keys.persist())
                .key(keys.key("log"))
                .key(keys.key("oldlog"))
                .arg(epoch)
                .arg(floor)
                .arg(super::DEDUPE_TTL_S);
            for s in chunk {
                let (dd_key, dd_value) = match &s.dedupe {
                    Some((key, id, ts)) => (
                        keys.key(&format!("dd:{key}")),
                        format!("{}:{id}:{}", s.seq, ts.0),
                    ),
                    None => Default::default(),
                };
                inv.arg(s.seq)
                    .arg(with_seq(&s.frame, s.seq))
                    .arg(dd_key)
                    .arg(dd_value);
            }
            let reply: Vec<String> = self.invoke(&mut self.conn(), inv).await?;
            if reply.first().map(String::as_str) != Some("1") {
                return Err(unavailable("the epoch moved on"));
            }
            if let Some(id) = reply.get(1).and_then(|id| EntryId::parse(id)) {
                done.last_entry = done.last_entry.max(Some(id));
            }
            let taken = reply.len().saturating_sub(2);
            metrics::counter!("chat_broker_reappended_total")
                .increment(chunk.len().saturating_sub(taken) as u64);
            done.taken += taken;
        }
        Ok(done)
    }

    /// One round of the watch: the primaries, then the partitions this node uses.
    async fn watch_once(self: &Arc<Self>) {
        if let Err(e) = self.check_primaries().await {
            tracing::debug!(error = %e, "checking the primaries failed");
        }
        let mut parts: BTreeSet<u16> = self.sent.partitions().into_iter().collect();
        for (room, _) in self.hub.local_rooms() {
            parts.insert(self.keys(&room).partition);
        }
        let checks = parts.into_iter().map(|p| self.check_partition(p));
        for r in futures_util::future::join_all(checks).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "checking a partition failed");
            }
        }
    }

    /// Which primary serves each partition this node published to, and under which
    /// replication id: a change (a restart, a failover, a migrated slot) is checked against
    /// what this node published there.
    async fn check_primaries(self: &Arc<Self>) -> Result<(), BrokerError> {
        let parts = self.sent.partitions();
        if parts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let primaries = conn.primaries(&self.settings).await.map_err(unavailable)?;
        let mut replids: HashMap<String, String> = HashMap::new();
        for prim in &primaries {
            let info = conn
                .replication_info(&prim.addr)
                .await
                .map_err(unavailable)?;
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("master_replid:"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            replids.insert(prim.addr.clone(), id);
        }
        for p in parts {
            let slot = slot_of(&partitions::stream(p));
            let Some(prim) = primaries.iter().find(|x| x.owns(slot)) else {
                continue;
            };
            let now = format!("{} {}", prim.addr, replids[&prim.addr]);
            let before = self
                .replids
                .lock()
                .expect("replids lock")
                .insert(format!("p{p}"), now.clone());
            if before.is_some_and(|b| b != now) {
                tracing::info!(partition = p, primary = %now, "partition served anew; checking what Redis kept");
                self.verify(p).await?;
            }
        }
        Ok(())
    }

    /// Checks that Redis still has what this node published to partition `p` in its current
    /// epoch; replaces the epoch when it does not.
    async fn verify(self: &Arc<Self>, p: u16) -> Result<(), BrokerError> {
        let Some(epoch) = self.epochs.lock().expect("epochs lock").get(&p).cloned() else {
            return Ok(());
        };
        for (room, events) in self.sent.of_epoch(p, &epoch) {
            let keys = self.keys(&room);
            let mut inv = self.scripts.verify.prepare_invoke();
            inv.key(keys.epoch()).key(keys.key("log")).arg(&*epoch);
            for s in &events {
                inv.arg(s.seq).arg(with_seq(&s.frame, s.seq));
            }
            let reply: Vec<String> = self.invoke(&mut self.conn(), inv).await?;
            match reply.first().map(String::as_str) {
                Some("1") if reply.len() > 1 => {
                    tracing::warn!(partition = p, %room, missing = ?&reply[1..], "Redis lost published events");
                    self.new_epoch(p, &epoch).await?;
                    return self.check_partition(p).await;
                }
                Some("1") => {}
                _ => return self.check_partition(p).await,
            }
        }
        Ok(())
    }

    /// The partition's epoch as Redis has it now: a new one is handled
    /// ([`Self::epoch_changed`]); in the same one, this node's events the stream no longer
    /// holds are stored.
    async fn check_partition(self: &Arc<Self>, p: u16) -> Result<(), BrokerError> {
        let before = Instant::now();
        let mut inv = self.scripts.confirm.prepare_invoke();
        inv.key(partitions::epoch(p)).key(partitions::stream(p));
        let reply: Vec<String> = self.invoke(&mut self.conn(), inv).await?;
        let mut id = reply.first().cloned().unwrap_or_default();
        if id.is_empty() {
            // Redis lost the partition, epoch and all.
            id = self.new_epoch(p, "").await?;
        }
        let known = self
            .epochs
            .lock()
            .expect("epochs lock")
            .insert(p, id.as_str().into());
        let newest = self.sent.epoch_of(p);
        if known.is_some_and(|k| *k != *id) || newest.is_some_and(|e| *e != *id) {
            self.epoch_changed(p, &id).await;
        }
        let oldest = reply.get(1).and_then(|s| EntryId::parse(s));
        self.sent.confirm(p, &id, oldest, before);
        Ok(())
    }

    /// Partition `p` is in epoch `epoch` now: this node reports what it knows of the rooms'
    /// numbering before (floors), closes its sessions there (their clients rejoin from the new
    /// epoch), and puts what it published back in the stream; once the history service took
    /// that, whatever acknowledged event it still lacks is published again ([`reconcile`]).
    async fn epoch_changed(self: &Arc<Self>, p: u16, epoch: &str) {
        metrics::counter!("chat_broker_resets_total").increment(1);
        let _ = self
            .sub_tx
            .send(SubCmd::EpochChanged(p, epoch.into()))
            .await;
        let old = self.sent.take_other_epochs(p, epoch);
        tracing::warn!(
            partition = p,
            epoch,
            events = old.len(),
            "partition epoch changed; appending this node's unstored events again"
        );
        let mut by_room: HashMap<RoomId, Vec<Sent>> = HashMap::new();
        for s in old {
            by_room.entry(s.room.clone()).or_default().push(s);
        }
        let mut last_entry = None;
        let mut check = Vec::new();
        for (room, events) in by_room {
            let floor = events.iter().map(|s| s.seq).max().unwrap_or(0);
            match self.reappend(&room, epoch, floor, &events).await {
                Ok(done) => {
                    last_entry = last_entry.max(done.last_entry);
                    if done.taken > 0 {
                        tracing::warn!(%room, taken = done.taken, "seqs of acknowledged events were taken meanwhile");
                    }
                    check.extend(events.into_iter().filter(Sent::promised));
                }
                Err(e) => {
                    tracing::warn!(error = %e, %room, "re-appending failed; next round");
                    for s in events {
                        self.sent.push(p, s);
                    }
                }
            }
        }
        if !check.is_empty() {
            tokio::spawn(reconcile(self.clone(), p, last_entry, check));
        }
    }

    /// The id of the oldest entry of partition `p`'s stream (None: empty).
    async fn oldest_entry(&self, p: u16) -> Result<Option<EntryId>, BrokerError> {
        let oldest: Vec<(String, redis::Value)> = call(
            redis::cmd("XRANGE")
                .arg(partitions::stream(p))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1),
            &mut self.conn(),
        )
        .await?;
        Ok(oldest.first().and_then(|(id, _)| EntryId::parse(id)))
    }

    /// Deletes `s`'s idempotency key while it names `s`'s publication.
    async fn forget_dedupe(&self, s: &Sent) -> Result<(), BrokerError> {
        let Some((key, id, ts)) = &s.dedupe else {
            return Ok(());
        };
        let keys = self.keys(&s.room);
        let mut inv = self.scripts.forget.prepare_invoke();
        inv.key(keys.key(&format!("dd:{key}")))
            .arg(format!("{}:{id}:{}", s.seq, ts.0));
        self.invoke::<i64>(&mut self.conn(), inv).await.map(drop)
    }

    /// What Redis holds at `s`'s seq: `Some(true)` `s` itself, `Some(false)` another event,
    /// None nothing (or it cannot tell). The room's window is checked, then the window kept
    /// aside when the room was seeded in the new epoch.
    async fn at_seq(&self, s: &Sent) -> Option<bool> {
        let keys = self.keys(&s.room);
        let id = format!("{}-1", s.seq);
        let frame = with_seq(&s.frame, s.seq);
        for window in ["log", "oldlog"] {
            let found: StreamEntries = call(
                redis::cmd("XRANGE").arg(keys.key(window)).arg(&id).arg(&id),
                &mut self.conn(),
            )
            .await
            .ok()?;
            if let Some((_, fields)) = found.first() {
                return Some(fields.get("f") == Some(&frame));
            }
        }
        None
    }
}

impl RedisBroker {
    /// Whether the store will still get `s` with its seq: Redis holds it there, and the store
    /// has not reached that seq yet (with `CHAT_REDIS_WAIT_REPLICAS` the history service waits
    /// for a replica before storing). Once the store holds a later seq, another event took
    /// `s`'s seq there.
    async fn on_its_way(&self, s: &Sent) -> bool {
        if self.at_seq(s).await != Some(true) {
            return false;
        }
        self.store
            .last_seq(&s.room)
            .await
            .is_ok_and(|last| last < s.seq)
    }
}

/// How long [`reconcile`] waits for the history service to store what was appended again.
const RECONCILE_WAIT: Duration = Duration::from_secs(60);

/// Once the history service stored what was appended again (up to `last_entry`), publishes
/// again, as new events, the acknowledged ones it still lacks: their seq was given to another
/// event before the loss was noticed (a failover that lost writes numbers on from where the
/// replica was until a node notices), and the store kept that one. Messages are checked by
/// id; edits, deletes, pins and unpins are published again when another event holds their
/// seq (their effect is idempotent); room-state events are not (the store took their change
/// when it was made).
async fn reconcile(
    broker: Arc<RedisBroker>,
    p: u16,
    last_entry: Option<EntryId>,
    events: Vec<Sent>,
) {
    let deadline = Instant::now() + RECONCILE_WAIT;
    if let Some(last) = last_entry {
        while Instant::now() < deadline {
            let oldest = broker.oldest_entry(p).await;
            if oldest.is_ok_and(|o| o.is_none_or(|o| o > last)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for s in events {
        let Ok(event) = serde_json::from_slice::<ServerEvent>(&s.frame) else {
            continue;
        };
        let missing = match &event {
            ServerEvent::Message { id, .. } => match broker.store.message(&s.room, *id).await {
                Ok(Some(_)) => false,
                Ok(None) => !broker.on_its_way(&s).await,
                Err(e) => {
                    tracing::error!(error = %e, room = %s.room, seq = s.seq, "cannot check a message against the store");
                    continue;
                }
            },
            ServerEvent::MessageEdited { .. }
            | ServerEvent::MessageDeleted { .. }
            | ServerEvent::Pinned { .. }
            | ServerEvent::Unpinned { .. } => broker.at_seq(&s).await == Some(false),
            _ => false,
        };
        if !missing {
            continue;
        }
        // With its idempotency key, which then names this publication: a retry of its sender
        // gets it (the key may still name the lost one).
        if let Err(e) = broker.forget_dedupe(&s).await {
            tracing::error!(error = %e, room = %s.room, seq = s.seq, "could not publish an event again");
            continue;
        }
        let dedupe = s.dedupe.as_ref().map(|(key, id, ts)| Dedupe {
            key,
            id: *id,
            ts: *ts,
        });
        match Broker::publish_stored(&broker, &s.room, &s.frame, dedupe, StateCheck::Unchecked)
            .await
        {
            Ok(Published::Fresh { seq }) => {
                metrics::counter!("chat_broker_republished_total").increment(1);
                tracing::warn!(room = %s.room, old = s.seq, new = seq, "acknowledged event published again under a new seq");
            }
            Ok(Published::Duplicate { seq, .. }) => {
                tracing::info!(room = %s.room, old = s.seq, seq, "its sender's retry was published meanwhile");
            }
            // Published or not, it is among this node's sent events again.
            Err(e) => {
                tracing::warn!(error = %e, room = %s.room, seq = s.seq, "publishing an event again did not complete")
            }
        }
    }
}

/// Runs [`RedisBroker::watch_once`] every [`WATCH_EVERY`] while the broker lives.
pub(super) async fn watch(broker: Weak<RedisBroker>) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(b) = broker.upgrade() else { return };
        b.watch_once().await;
    }
}
