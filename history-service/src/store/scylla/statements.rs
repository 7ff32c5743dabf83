//! Every statement the store runs, prepared once at connect.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::config::Profiles;
use super::rows::{BAN_COLS, MEMBER_COLS, MESSAGE_COLS, ROOM_COLS};
use crate::store::StoreError;

/// What a statement does, which decides how the driver may repeat it.
#[derive(Clone, Copy)]
enum Kind {
    /// Idempotent, on the reads profile: retried, and speculatively sent to a second replica
    /// when the first is slow.
    Read,
    /// Idempotent write (`USING TIMESTAMP <seq>`, or the same cells whenever repeated):
    /// retried.
    Write,
    /// Never repeated by the driver: lightweight transactions, counter updates, and upserts
    /// stamped with the client's clock.
    Once,
}

pub(super) struct Statements {
    pub insert_message: PreparedStatement,
    pub insert_message_id: PreparedStatement,
    pub insert_bucket: PreparedStatement,
    pub select_buckets_down: PreparedStatement,
    pub select_buckets_up: PreparedStatement,
    pub select_stored_ids: PreparedStatement,
    pub select_before: PreparedStatement,
    pub select_after: PreparedStatement,
    pub select_message: PreparedStatement,
    pub select_seq_of: PreparedStatement,
    pub select_deleted: PreparedStatement,
    pub select_content_time: PreparedStatement,
    pub edit_message: PreparedStatement,
    pub tombstone_message: PreparedStatement,
    pub pending_edit: PreparedStatement,
    pub pending_delete: PreparedStatement,
    pub select_pending: PreparedStatement,
    pub delete_pending: PreparedStatement,
    pub insert_pin: PreparedStatement,
    pub delete_pin: PreparedStatement,
    pub select_pins: PreparedStatement,
    pub upsert_marker: PreparedStatement,
    pub upsert_room_seq: PreparedStatement,
    pub select_room_seq: PreparedStatement,
    pub select_markers: PreparedStatement,
    pub select_marker: PreparedStatement,
    pub insert_room: PreparedStatement,
    pub update_room: PreparedStatement,
    pub delete_room: PreparedStatement,
    pub select_room: PreparedStatement,
    pub select_rooms: PreparedStatement,
    pub select_member_counts: PreparedStatement,
    pub add_member_count: PreparedStatement,
    pub insert_member: PreparedStatement,
    pub delete_member: PreparedStatement,
    pub select_member: PreparedStatement,
    pub select_members: PreparedStatement,
    pub mute_member: PreparedStatement,
    pub insert_ban: PreparedStatement,
    pub delete_ban: PreparedStatement,
    pub select_ban: PreparedStatement,
    pub select_bans: PreparedStatement,
}

impl Statements {
    pub async fn prepare(
        session: &Session,
        ks: &str,
        profiles: &Profiles,
    ) -> Result<Self, StoreError> {
        let prep = |cql: String, kind: Kind| async move {
            let mut ps = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot prepare `{cql}`: {e}")))?;
            ps.set_is_idempotent(!matches!(kind, Kind::Once));
            if matches!(kind, Kind::Read) {
                ps.set_execution_profile_handle(Some(profiles.reads.clone()));
            }
            Ok::<_, StoreError>(ps)
        };
        use Kind::{Once, Read, Write};
        Ok(Self {
            // `reply_to` is bound unset when absent: a null would write a tombstone per row.
            insert_message: prep(
                format!(
                    "INSERT INTO {ks}.messages (room, bucket, seq, id, user_id, user_name, content,
                                                ts, reply_to, deleted)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false) USING TIMESTAMP ?"
                ),
                Write,
            )
            .await?,
            insert_message_id: prep(
                format!(
                    "INSERT INTO {ks}.message_ids (room, id, seq) VALUES (?, ?, ?)
                     USING TIMESTAMP ?"
                ),
                Write,
            )
            .await?,
            insert_bucket: prep(
                format!(
                    "INSERT INTO {ks}.message_buckets (room, bucket) VALUES (?, ?)
                     USING TIMESTAMP ?"
                ),
                Write,
            )
            .await?,
            select_buckets_down: prep(
                format!(
                    "SELECT bucket FROM {ks}.message_buckets WHERE room = ? AND bucket <= ?
                     LIMIT ?"
                ),
                Read,
            )
            .await?,
            select_buckets_up: prep(
                format!(
                    "SELECT bucket FROM {ks}.message_buckets WHERE room = ? AND bucket >= ?
                     ORDER BY bucket ASC LIMIT ?"
                ),
                Read,
            )
            .await?,
            select_stored_ids: prep(
                format!(
                    "SELECT seq, id FROM {ks}.messages
                     WHERE room = ? AND bucket = ? AND seq >= ? AND seq <= ?"
                ),
                Read,
            )
            .await?,
            select_before: prep(
                format!(
                    "SELECT {MESSAGE_COLS} FROM {ks}.messages
                     WHERE room = ? AND bucket = ? AND seq < ? LIMIT ?"
                ),
                Read,
            )
            .await?,
            select_after: prep(
                format!(
                    "SELECT {MESSAGE_COLS} FROM {ks}.messages
                     WHERE room = ? AND bucket = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
                ),
                Read,
            )
            .await?,
            select_message: prep(
                format!(
                    "SELECT {MESSAGE_COLS} FROM {ks}.messages
                     WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                Read,
            )
            .await?,
            select_seq_of: prep(
                format!("SELECT seq FROM {ks}.message_ids WHERE room = ? AND id = ?"),
                Read,
            )
            .await?,
            select_deleted: prep(
                format!(
                    "SELECT deleted FROM {ks}.messages WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                Read,
            )
            .await?,
            select_content_time: prep(
                format!(
                    "SELECT WRITETIME(content) FROM {ks}.messages
                     WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                Read,
            )
            .await?,
            edit_message: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET content = ?, edited_at = ?
                     WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                Write,
            )
            .await?,
            tombstone_message: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET content = null, deleted = true
                     WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                Write,
            )
            .await?,
            pending_edit: prep(
                format!(
                    "UPDATE {ks}.pending_mods USING TIMESTAMP ?
                     SET content = ?, edited_at = ?, edit_seq = ? WHERE room = ? AND id = ?"
                ),
                Write,
            )
            .await?,
            pending_delete: prep(
                format!(
                    "UPDATE {ks}.pending_mods USING TIMESTAMP ?
                     SET deleted = true, delete_seq = ? WHERE room = ? AND id = ?"
                ),
                Write,
            )
            .await?,
            select_pending: prep(
                format!(
                    "SELECT id, content, edited_at, edit_seq, deleted, delete_seq
                     FROM {ks}.pending_mods WHERE room = ?"
                ),
                Read,
            )
            .await?,
            delete_pending: prep(
                format!(
                    "DELETE FROM {ks}.pending_mods USING TIMESTAMP ? WHERE room = ? AND id = ?"
                ),
                Write,
            )
            .await?,
            insert_pin: prep(
                format!(
                    "INSERT INTO {ks}.pins (room, message_id, by_id, by_name, pinned_at, seq)
                     VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ),
                Write,
            )
            .await?,
            delete_pin: prep(
                format!(
                    "DELETE FROM {ks}.pins USING TIMESTAMP ? WHERE room = ? AND message_id = ?"
                ),
                Write,
            )
            .await?,
            select_pins: prep(
                format!(
                    "SELECT message_id, by_id, by_name, pinned_at, seq FROM {ks}.pins
                     WHERE room = ?"
                ),
                Read,
            )
            .await?,
            upsert_marker: prep(
                format!(
                    "UPDATE {ks}.read_markers USING TIMESTAMP ? SET seq = ?, at = ?
                     WHERE room = ? AND user_id = ?"
                ),
                Write,
            )
            .await?,
            upsert_room_seq: prep(
                format!("UPDATE {ks}.room_seqs USING TIMESTAMP ? SET last_seq = ? WHERE room = ?"),
                Write,
            )
            .await?,
            select_room_seq: prep(
                format!("SELECT last_seq FROM {ks}.room_seqs WHERE room = ?"),
                Read,
            )
            .await?,
            select_markers: prep(
                format!("SELECT user_id, seq, at FROM {ks}.read_markers WHERE room = ?"),
                Read,
            )
            .await?,
            select_marker: prep(
                format!("SELECT seq FROM {ks}.read_markers WHERE room = ? AND user_id = ?"),
                Read,
            )
            .await?,
            // `max_members` is bound unset when absent (a new row has nothing to clear).
            insert_room: prep(
                format!(
                    "INSERT INTO {ks}.rooms ({ROOM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, false)
                     IF NOT EXISTS"
                ),
                Once,
            )
            .await?,
            update_room: prep(
                format!(
                    "UPDATE {ks}.rooms SET name = ?, topic = ?, visibility = ?, max_members = ?,
                                           members_can_pin = ?
                     WHERE id = ? IF deleted = false"
                ),
                Once,
            )
            .await?,
            delete_room: prep(
                format!("UPDATE {ks}.rooms SET deleted = true WHERE id = ? IF EXISTS"),
                Once,
            )
            .await?,
            select_room: prep(
                format!("SELECT {ROOM_COLS} FROM {ks}.rooms WHERE id = ?"),
                Read,
            )
            .await?,
            select_rooms: prep(format!("SELECT {ROOM_COLS} FROM {ks}.rooms"), Read).await?,
            select_member_counts: prep(
                format!("SELECT room, members FROM {ks}.room_member_counts"),
                Read,
            )
            .await?,
            add_member_count: prep(
                format!("UPDATE {ks}.room_member_counts SET members = members + ? WHERE room = ?"),
                Once,
            )
            .await?,
            insert_member: prep(
                format!(
                    "INSERT INTO {ks}.members (room, user_id, user_name, role, joined_at)
                     VALUES (?, ?, ?, ?, ?)"
                ),
                Once,
            )
            .await?,
            delete_member: prep(
                format!("DELETE FROM {ks}.members WHERE room = ? AND user_id = ?"),
                Once,
            )
            .await?,
            select_member: prep(
                format!("SELECT {MEMBER_COLS} FROM {ks}.members WHERE room = ? AND user_id = ?"),
                Read,
            )
            .await?,
            select_members: prep(
                format!("SELECT {MEMBER_COLS} FROM {ks}.members WHERE room = ?"),
                Read,
            )
            .await?,
            // `muted_until` is bound unset on an unmute (ignored while not muted) and null on
            // a mute without end (it clears an earlier end).
            mute_member: prep(
                format!(
                    "UPDATE {ks}.members SET muted = ?, muted_until = ?
                     WHERE room = ? AND user_id = ?"
                ),
                Once,
            )
            .await?,
            // `reason` and `until` are bound null when absent on purpose: a ban replaces the
            // user's earlier one, whose values must not survive.
            insert_ban: prep(
                format!("INSERT INTO {ks}.bans (room, {BAN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                Once,
            )
            .await?,
            delete_ban: prep(
                format!("DELETE FROM {ks}.bans WHERE room = ? AND user_id = ?"),
                Once,
            )
            .await?,
            select_ban: prep(
                format!("SELECT {BAN_COLS} FROM {ks}.bans WHERE room = ? AND user_id = ?"),
                Read,
            )
            .await?,
            select_bans: prep(
                format!("SELECT {BAN_COLS} FROM {ks}.bans WHERE room = ?"),
                Read,
            )
            .await?,
        })
    }
}
