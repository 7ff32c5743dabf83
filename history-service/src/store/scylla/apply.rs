//! [`Store::apply`](crate::store::Store::apply) on ScyllaDB, in two phases: the batch's
//! messages, then everything that refers to a message (edits, deletes, pins, receipts).
//!
//! A seq is written once. Write timestamps are seqs, so two different messages written at
//! one seq would carry the same timestamp and ScyllaDB would merge them cell by cell (the old
//! author with the new content; a deleted old message hiding the new one). Before writing, the
//! store therefore reads the `(seq, id)` already stored in each partition of the batch and
//! keeps the first message at every seq, as the SQLite store does; a different message at a
//! taken seq is dropped and reported ([`crate::store::seq_conflict`]). Two writers racing
//! for one fresh seq can still both pass the check: the broker assigns each seq once, so
//! that takes a broker failure and a replay in the same instant.

use std::collections::{BTreeMap, HashMap};

use futures_util::FutureExt;
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::{CqlTimestamp, MaybeUnset};

use super::rows::{bucket_of, exec_err, from_ts, id_db, seq_db, ts};
use super::{ScyllaStore, BUCKET_SIZE};
use crate::store::{seq_conflict, StoreError};

/// Statements in one unlogged (single-partition) batch; keeps batches under Scylla's
/// `batch_size_warn_threshold_in_kb` with typical messages.
const MAX_BATCH_STATEMENTS: usize = 50;

/// A `message` event's fields.
#[derive(Clone, Copy)]
struct NewMessage<'a> {
    room: &'a RoomId,
    seq: u64,
    id: MessageId,
    user: &'a UserRef,
    content: &'a str,
    ts: Timestamp,
    reply_to: Option<MessageId>,
}

impl<'a> NewMessage<'a> {
    fn of(ev: &'a ServerEvent) -> Option<Self> {
        match ev {
            ServerEvent::Message {
                seq,
                room,
                id,
                user,
                content,
                ts,
                reply_to,
                ..
            } => Some(Self {
                room,
                seq: *seq,
                id: *id,
                user,
                content,
                ts: *ts,
                reply_to: *reply_to,
            }),
            _ => None,
        }
    }
}

/// What becomes of an incoming message, given what its partition already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Its seq is free: write it.
    Write,
    /// This very message is stored already (a replayed batch): nothing to write.
    Stored,
    /// A different message holds its seq: keep that one, drop this one.
    Conflict { kept: MessageId },
}

/// The verdicts for `incoming` `(seq, id)` pairs, in order, given the ids `stored` at each
/// seq: the first message at a seq wins, whether it was stored before or came earlier in the
/// same batch.
pub(super) fn keep_first(
    stored: &HashMap<u64, MessageId>,
    incoming: &[(u64, MessageId)],
) -> Vec<Verdict> {
    let mut at = stored.clone();
    incoming
        .iter()
        .map(|&(seq, id)| match at.get(&seq) {
            Some(&kept) if kept == id => Verdict::Stored,
            Some(&kept) => Verdict::Conflict { kept },
            None => {
                at.insert(seq, id);
                Verdict::Write
            }
        })
        .collect()
}

type MessageValues<'a> = (
    &'a str,
    i64,
    i64,
    i64,
    &'a str,
    &'a str,
    &'a str,
    CqlTimestamp,
    MaybeUnset<i64>,
    i64,
);

fn message_values<'a>(m: &NewMessage<'a>) -> MessageValues<'a> {
    (
        m.room.as_str(),
        bucket_of(m.seq),
        seq_db(m.seq),
        id_db(m.id),
        m.user.id.as_str(),
        m.user.name.as_str(),
        m.content,
        ts(m.ts),
        MaybeUnset::from_option(m.reply_to.map(id_db)),
        seq_db(m.seq),
    )
}

impl ScyllaStore {
    // --- phase 1: messages ----------------------------------------------------------------

    pub(super) async fn insert_messages(
        &self,
        events: Vec<&ServerEvent>,
    ) -> Result<(), StoreError> {
        let mut partitions: BTreeMap<(&str, u64), Vec<NewMessage<'_>>> = BTreeMap::new();
        for m in events.into_iter().filter_map(NewMessage::of) {
            partitions
                .entry((m.room.as_str(), m.seq / BUCKET_SIZE))
                .or_default()
                .push(m);
        }
        // Which seqs each partition holds already, then what to write.
        let reads = partitions
            .values()
            .map(|msgs| self.stored_ids(msgs).boxed())
            .collect();
        let stored = self.each(reads).await?;
        let mut rows: Vec<Vec<MessageValues<'_>>> = Vec::new();
        let mut accepted: Vec<NewMessage<'_>> = Vec::new();
        for (msgs, stored) in partitions.values().zip(stored) {
            let pairs: Vec<(u64, MessageId)> = msgs.iter().map(|m| (m.seq, m.id)).collect();
            let mut write = Vec::new();
            for (m, verdict) in msgs.iter().zip(keep_first(&stored, &pairs)) {
                match verdict {
                    Verdict::Write => {
                        write.push(message_values(m));
                        accepted.push(*m);
                    }
                    Verdict::Stored => accepted.push(*m),
                    Verdict::Conflict { kept } => seq_conflict(m.room, m.seq, kept, m.id),
                }
            }
            rows.extend(write.chunks(MAX_BATCH_STATEMENTS).map(<[_]>::to_vec));
        }
        // One unlogged batch per partition (chunk): a single-partition batch is applied as one
        // mutation by its replicas, with no batch log.
        let writes = rows
            .into_iter()
            .filter(|r| !r.is_empty())
            .map(|rows| {
                async move {
                    let mut batch = Batch::new(BatchType::Unlogged);
                    for _ in 0..rows.len() {
                        batch.append_statement(self.ps().insert_message.clone());
                    }
                    batch.set_is_idempotent(true);
                    self.inner
                        .session
                        .batch(&batch, rows)
                        .await
                        .map_err(exec_err)
                        .map(drop)
                }
                .boxed()
            })
            .collect();
        self.each(writes).await?;
        // The id index and the bucket index only after the rows: whoever finds an id or a
        // bucket can read the message it points to. Replays write them again, in case the
        // attempt that wrote the rows died before this.
        let writes = accepted
            .iter()
            .map(|m| {
                self.exec_drop(
                    &self.ps().insert_message_id,
                    (m.room.as_str(), id_db(m.id), seq_db(m.seq), seq_db(m.seq)),
                )
            })
            .collect();
        self.each(writes).await?;
        let mut buckets: BTreeMap<(&RoomId, u64), u64> = BTreeMap::new();
        for m in &accepted {
            let newest = buckets.entry((m.room, m.seq / BUCKET_SIZE)).or_default();
            *newest = (*newest).max(m.seq);
        }
        let writes = buckets
            .iter()
            .map(|(&(room, bucket), &seq)| {
                self.exec_drop(
                    &self.ps().insert_bucket,
                    (room.as_str(), seq_db(bucket), seq_db(seq)),
                )
            })
            .collect();
        self.each(writes).await?;
        let mut rooms: Vec<&RoomId> = accepted.iter().map(|m| m.room).collect();
        rooms.sort();
        rooms.dedup();
        let folds = rooms
            .into_iter()
            .map(|room| self.fold_pending(room).boxed())
            .collect();
        self.each(folds).await.map(drop)
    }

    /// The ids stored at the seqs of one partition's messages (one range read).
    async fn stored_ids(
        &self,
        msgs: &[NewMessage<'_>],
    ) -> Result<HashMap<u64, MessageId>, StoreError> {
        let (Some(first), Some(low), Some(high)) = (
            msgs.first(),
            msgs.iter().map(|m| m.seq).min(),
            msgs.iter().map(|m| m.seq).max(),
        ) else {
            return Ok(HashMap::new());
        };
        let rows: Vec<(i64, Option<i64>)> = self
            .rows(
                &self.ps().select_stored_ids,
                (
                    first.room.as_str(),
                    bucket_of(first.seq),
                    seq_db(low),
                    seq_db(high),
                ),
            )
            .await?;
        // A row without an id is a fragment, not a message: its seq is free.
        Ok(rows
            .into_iter()
            .filter_map(|(seq, id)| Some((seq as u64, MessageId(id? as u64))))
            .collect())
    }

    /// Folds edits/deletes that overtook their message into the message, once it exists.
    pub(super) async fn fold_pending(&self, room: &RoomId) -> Result<(), StoreError> {
        type PendingRow = (
            i64,
            Option<String>,
            Option<CqlTimestamp>,
            Option<i64>,
            Option<bool>,
            Option<i64>,
        );
        let pending: Vec<PendingRow> = self
            .all_rows(&self.ps().select_pending, (room.as_str(),))
            .await?;
        for (id, content, edited_at, edit_seq, deleted, delete_seq) in pending {
            let id = MessageId(id as u64);
            let Some(seq) = self.seq_of(room, id).await? else {
                continue;
            };
            let mut newest = 0;
            if let (Some(edit_seq), Some(content)) = (edit_seq, content) {
                let edited_at = edited_at.map(from_ts).unwrap_or_default();
                self.write_edit(room, seq, edit_seq as u64, &content, edited_at)
                    .await?;
                newest = newest.max(edit_seq);
            }
            if let (Some(true), Some(delete_seq)) = (deleted, delete_seq) {
                self.write_tombstone(room, seq, delete_seq as u64).await?;
                newest = newest.max(delete_seq);
            }
            self.exec(
                &self.ps().delete_pending,
                (newest, room.as_str(), id_db(id)),
            )
            .await?;
        }
        Ok(())
    }

    // --- phase 2: everything that refers to a message -------------------------------------

    /// An edit of a stored message. A delete is final: the edit of a deleted message is
    /// dropped, as SQLite drops it (written, its content would stay on disk behind the
    /// tombstone).
    async fn write_edit(
        &self,
        room: &RoomId,
        msg_seq: u64,
        seq: u64,
        content: &str,
        edited_at: Timestamp,
    ) -> Result<(), StoreError> {
        let at = (room.as_str(), bucket_of(msg_seq), seq_db(msg_seq));
        let deleted: Vec<(Option<bool>,)> = self.rows(&self.ps().select_deleted, at).await?;
        if deleted.first().is_some_and(|(d,)| *d == Some(true)) {
            return Ok(());
        }
        self.exec(
            &self.ps().edit_message,
            (seq_db(seq), content, ts(edited_at), at.0, at.1, at.2),
        )
        .await
        .map(drop)
    }

    /// Marks a message deleted and removes its content. The tombstone is written at the
    /// delete's seq or at the content's own write time if that is later (an edit with a
    /// higher seq that arrived first), so no content outlives a delete on disk: at equal
    /// timestamps the tombstone wins.
    async fn write_tombstone(
        &self,
        room: &RoomId,
        msg_seq: u64,
        seq: u64,
    ) -> Result<(), StoreError> {
        let at = (room.as_str(), bucket_of(msg_seq), seq_db(msg_seq));
        let written: Vec<(Option<i64>,)> = self.rows(&self.ps().select_content_time, at).await?;
        let content_time = written.first().and_then(|(t,)| *t).unwrap_or(0);
        self.exec(
            &self.ps().tombstone_message,
            (seq_db(seq).max(content_time), at.0, at.1, at.2),
        )
        .await
        .map(drop)
    }

    pub(super) async fn apply_mod(&self, ev: &ServerEvent) -> Result<(), StoreError> {
        match ev {
            ServerEvent::MessageEdited {
                seq,
                room,
                id,
                content,
                edited_at,
            } => match self.seq_of(room, *id).await? {
                Some(msg_seq) => {
                    self.write_edit(room, msg_seq, *seq, content, *edited_at)
                        .await
                }
                None => {
                    self.exec(
                        &self.ps().pending_edit,
                        (
                            seq_db(*seq),
                            content.as_str(),
                            ts(*edited_at),
                            seq_db(*seq),
                            room.as_str(),
                            id_db(*id),
                        ),
                    )
                    .await?;
                    // The message may have been inserted (and its pending mods folded)
                    // between the lookup and this write: look again so nothing is stranded.
                    if self.seq_of(room, *id).await?.is_some() {
                        self.fold_pending(room).await?;
                    }
                    Ok(())
                }
            },
            ServerEvent::MessageDeleted { seq, room, id, .. } => {
                self.exec(
                    &self.ps().delete_pin,
                    (seq_db(*seq), room.as_str(), id_db(*id)),
                )
                .await?;
                match self.seq_of(room, *id).await? {
                    Some(msg_seq) => self.write_tombstone(room, msg_seq, *seq).await,
                    None => {
                        self.exec(
                            &self.ps().pending_delete,
                            (seq_db(*seq), seq_db(*seq), room.as_str(), id_db(*id)),
                        )
                        .await?;
                        if self.seq_of(room, *id).await?.is_some() {
                            self.fold_pending(room).await?;
                        }
                        Ok(())
                    }
                }
            }
            ServerEvent::Pinned {
                seq,
                room,
                message,
                by,
                pinned_at,
            } => self
                .exec(
                    &self.ps().insert_pin,
                    (
                        room.as_str(),
                        id_db(message.id),
                        by.id.as_str(),
                        by.name.as_str(),
                        ts(*pinned_at),
                        seq_db(*seq),
                        seq_db(*seq),
                    ),
                )
                .await
                .map(drop),
            ServerEvent::Unpinned { seq, room, id, .. } => self
                .exec(
                    &self.ps().delete_pin,
                    (seq_db(*seq), room.as_str(), id_db(*id)),
                )
                .await
                .map(drop),
            ServerEvent::Receipt { room, user, seq } => self
                .exec(
                    &self.ps().upsert_marker,
                    (
                        seq_db(*seq),
                        seq_db(*seq),
                        ts(Timestamp::now()),
                        room.as_str(),
                        user.id.as_str(),
                    ),
                )
                .await
                .map(drop),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_message_at_a_seq_is_kept() {
        let (a, b, c) = (MessageId(10), MessageId(20), MessageId(30));
        let stored: HashMap<u64, MessageId> = [(1, a)].into();
        assert_eq!(
            keep_first(&stored, &[(1, a), (1, b), (2, b), (2, c), (2, b), (3, c)]),
            vec![
                Verdict::Stored,               // a replay of what is stored
                Verdict::Conflict { kept: a }, // another message at a stored seq
                Verdict::Write,                // a free seq
                Verdict::Conflict { kept: b }, // taken earlier in the same batch
                Verdict::Stored,               // the batch repeats itself
                Verdict::Write,
            ]
        );
        assert_eq!(keep_first(&HashMap::new(), &[]), vec![]);
    }

    #[test]
    fn absent_reply_to_is_unset_not_null() {
        let room = RoomId::new("r").unwrap();
        let user = UserRef {
            id: "ann".into(),
            name: "Ann".into(),
        };
        let mut m = NewMessage {
            room: &room,
            seq: 1001,
            id: MessageId(7),
            user: &user,
            content: "hi",
            ts: Timestamp(5),
            reply_to: None,
        };
        let v = message_values(&m);
        assert!(
            matches!(v.8, MaybeUnset::Unset),
            "no tombstone for a missing reply"
        );
        assert_eq!((v.1, v.2, v.9), (1, 1001, 1001), "bucket, seq, timestamp");
        m.reply_to = Some(MessageId(3));
        assert!(matches!(message_values(&m).8, MaybeUnset::Set(3)));
    }
}
