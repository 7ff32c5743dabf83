//! What this node published, kept until the store has it: Redis may lose it before (a restart
//! without persistence, a failover to a replica that missed the last writes), and then this
//! copy is what puts it back (`super::epochs`).
//!
//! An event stays while its persistence entry is not known to be stored, and at least
//! [`KEEP`] after it was published: a failover is noticed within a second or two, and what
//! the store already took may still have to be checked against what Redis lost. At most
//! `max` events stay; past that the oldest stored ones go first, then the oldest of all
//! (counted in `chat_broker_sent_dropped_total`: a Redis that loses its data right then loses
//! them).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::{MessageId, RoomId, Timestamp};

/// The shortest time a published event is kept.
pub const KEEP: Duration = Duration::from_secs(10);

/// A persistence stream entry id (`<ms>-<n>`), comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId(pub u64, pub u64);

impl EntryId {
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, n) = s.split_once('-')?;
        Some(Self(ms.parse().ok()?, n.parse().ok()?))
    }
}

/// One published stored event.
#[derive(Clone, Debug)]
pub struct Sent {
    pub room: RoomId,
    pub seq: u64,
    /// The partition epoch it was numbered in.
    pub epoch: Arc<str>,
    pub entry: EntryId,
    /// As the publisher gave it (without `seq`).
    pub frame: Bytes,
    /// Its idempotency key, with the id and time it was published with, when it had one.
    pub dedupe: Option<(String, MessageId, Timestamp)>,
    /// The sender was told it is kept (an event whose publish failed afterwards, say its
    /// `WAIT`, is only remembered for its seq, unless it had an idempotency key: the sender's
    /// retry will be told it is kept).
    pub acked: bool,
    pub at: Instant,
    /// Its persistence entry is known to be stored.
    pub stored: bool,
}

/// Per partition, in publish order.
pub struct SentLog {
    parts: Vec<Mutex<VecDeque<Sent>>>,
    max: usize,
}

impl Sent {
    /// Whether it must be kept after a reset: its sender was told it is kept, or will be
    /// when it retries with its idempotency key.
    pub fn promised(&self) -> bool {
        self.acked || self.dedupe.is_some()
    }
}

impl SentLog {
    pub fn new(partitions: u16, max: usize) -> Self {
        Self {
            parts: (0..partitions).map(|_| Mutex::default()).collect(),
            // Per partition, so that one lock is all a publish takes.
            max: (max / partitions.max(1) as usize).max(16),
        }
    }

    fn part(&self, p: u16) -> std::sync::MutexGuard<'_, VecDeque<Sent>> {
        self.parts[p as usize].lock().expect("sent log lock")
    }

    pub fn push(&self, p: u16, sent: Sent) {
        let mut q = self.part(p);
        if q.len() >= self.max {
            let drop_at = q.iter().position(|s| s.stored).unwrap_or(0);
            if let Some(gone) = q.remove(drop_at) {
                if !gone.stored {
                    metrics::counter!("chat_broker_sent_dropped_total").increment(1);
                }
            }
        }
        q.push_back(sent);
    }

    /// Partitions holding any event.
    pub fn partitions(&self) -> Vec<u16> {
        (0..self.parts.len() as u16)
            .filter(|&p| !self.part(p).is_empty())
            .collect()
    }

    /// The partition's stream in `epoch`, as read at `read_at`, held nothing older than
    /// `oldest` (None: nothing at all): events of that epoch published before the read with
    /// older entries are stored. Then forgets stored events older than [`KEEP`].
    pub fn confirm(&self, p: u16, epoch: &str, oldest: Option<EntryId>, read_at: Instant) {
        let mut q = self.part(p);
        for s in q
            .iter_mut()
            .filter(|s| &*s.epoch == epoch && s.at < read_at)
        {
            if oldest.is_none_or(|o| s.entry < o) {
                s.stored = true;
            }
        }
        q.retain(|s| !(s.stored && read_at.duration_since(s.at) >= KEEP));
    }

    /// Takes the partition's events numbered in another epoch than `epoch` (Redis lost theirs).
    pub fn take_other_epochs(&self, p: u16, epoch: &str) -> Vec<Sent> {
        let mut q = self.part(p);
        let (old, keep): (VecDeque<Sent>, VecDeque<Sent>) =
            q.drain(..).partition(|s| &*s.epoch != epoch);
        *q = keep;
        old.into()
    }

    /// The partition's events of `epoch`, by room (to check what Redis still has).
    pub fn of_epoch(&self, p: u16, epoch: &str) -> HashMap<RoomId, Vec<Sent>> {
        let mut out: HashMap<RoomId, Vec<Sent>> = HashMap::new();
        for s in self.part(p).iter().filter(|s| &*s.epoch == epoch) {
            out.entry(s.room.clone()).or_default().push(s.clone());
        }
        out
    }

    /// The epoch of the partition's newest event.
    pub fn epoch_of(&self, p: u16) -> Option<Arc<str>> {
        self.part(p).back().map(|s| s.epoch.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(room: &str, seq: u64, epoch: &str, entry: u64, at: Instant) -> Sent {
        Sent {
            room: RoomId::new(room).unwrap(),
            seq,
            epoch: epoch.into(),
            entry: EntryId(entry, 0),
            frame: Bytes::from_static(b"{}"),
            dedupe: None,
            acked: true,
            at,
            stored: false,
        }
    }

    fn seqs(log: &SentLog, epoch: &str) -> Vec<(u64, bool)> {
        let a = RoomId::new("a").unwrap();
        let by_room = log.of_epoch(0, epoch);
        by_room
            .get(&a)
            .map(|v| v.iter().map(|s| (s.seq, s.stored)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn events_stay_until_stored_and_kept_long_enough() {
        let log = SentLog::new(1, 100);
        let t0 = Instant::now();
        for i in 1..=4 {
            log.push(0, sent("a", i, "e1", i * 10, t0));
        }
        // Read before they were published: says nothing about them.
        log.confirm(0, "e1", None, t0);
        assert!(seqs(&log, "e1").iter().all(|(_, stored)| !stored));
        // The stream's oldest entry is the third: the first two are stored, kept for now.
        log.confirm(0, "e1", Some(EntryId(30, 0)), t0 + Duration::from_millis(1));
        assert_eq!(
            seqs(&log, "e1"),
            vec![(1, true), (2, true), (3, false), (4, false)]
        );
        // Past KEEP the stored ones go; the others stay however old.
        let later = t0 + KEEP;
        log.confirm(0, "e1", Some(EntryId(30, 0)), later);
        assert_eq!(seqs(&log, "e1"), vec![(3, false), (4, false)]);
        // Another epoch's stream says nothing about these.
        log.confirm(0, "e2", None, later);
        assert_eq!(seqs(&log, "e1"), vec![(3, false), (4, false)]);
        log.confirm(0, "e1", None, later);
        assert!(log.partitions().is_empty());
    }

    #[test]
    fn a_reset_takes_the_older_epochs() {
        let log = SentLog::new(2, 100);
        let t0 = Instant::now();
        log.push(1, sent("a", 1, "e1", 1, t0));
        log.push(1, sent("b", 7, "e1", 2, t0));
        log.push(1, sent("a", 2, "e2", 3, t0));
        let old = log.take_other_epochs(1, "e2");
        assert_eq!(old.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![1, 7]);
        assert_eq!(log.epoch_of(1).as_deref(), Some("e2"));
        assert_eq!(log.of_epoch(1, "e2").len(), 1);
    }

    #[test]
    fn past_the_limit_stored_events_go_first() {
        let log = SentLog::new(1, 16);
        let t0 = Instant::now();
        for i in 1..=16 {
            log.push(0, sent("a", i, "e", i, t0));
        }
        log.confirm(0, "e", Some(EntryId(3, 0)), t0 + Duration::from_millis(1)); // 1, 2 stored
        log.push(0, sent("a", 17, "e", 17, t0));
        let left: Vec<u64> = seqs(&log, "e").into_iter().map(|(s, _)| s).collect();
        assert_eq!(left.len(), 16);
        assert!(!left.contains(&1) && left.contains(&2) && left.contains(&17));
    }
}
