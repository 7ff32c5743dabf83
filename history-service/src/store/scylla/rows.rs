//! Rows as the driver reads them, and the conversions between the store's types and CQL
//! values. Every query names its columns (`*_COLS`) in the order of its row tuple.

use futures_util::TryStreamExt;
use proto::rooms::{MemberInfo, MessageView, Role, RoomInfo, Visibility};
use proto::{MessageId, RoomId, Timestamp, UserRef};
use scylla::client::pager::QueryPager;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DbError, ExecutionError, PagerExecutionError, RequestAttemptError};
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlTimestamp, CqlValue, Row};

use super::BUCKET_SIZE;
use crate::store::{Ban, StoreError, MUTED_FOREVER};

pub(super) fn exec_err(e: ExecutionError) -> StoreError {
    let bug = match &e {
        ExecutionError::BadQuery(_) => true,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => matches!(
            db,
            DbError::SyntaxError
                | DbError::Invalid
                | DbError::Unauthorized
                | DbError::ConfigError
                | DbError::AlreadyExists { .. }
        ),
        _ => false,
    };
    if bug {
        StoreError::Internal(format!("scylla: {e}"))
    } else {
        StoreError::Unavailable(format!("scylla: {e}"))
    }
}

/// Every row a paged query returns, fetched page by page.
pub(super) async fn collect_pages<R>(
    pager: Result<QueryPager, PagerExecutionError>,
) -> Result<Vec<R>, StoreError>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm> + Send + 'static,
{
    let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("scylla: {e}"));
    pager
        .map_err(|e| unavailable(&e))?
        .rows_stream::<R>()
        .map_err(row_err)?
        .try_collect()
        .await
        .map_err(|e| unavailable(&e))
}

pub(super) fn row_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("scylla result: {e}"))
}

pub(super) fn seq_db(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Message ids are u64 on the wire and bigint here: a bit-cast both ways.
pub(super) fn id_db(id: MessageId) -> i64 {
    id.0 as i64
}

pub(super) fn bucket_of(seq: u64) -> i64 {
    seq_db(seq / BUCKET_SIZE)
}

pub(super) fn ts(t: Timestamp) -> CqlTimestamp {
    CqlTimestamp(t.0)
}

pub(super) fn from_ts(t: CqlTimestamp) -> Timestamp {
    Timestamp(t.0)
}

/// `[applied]` of a lightweight transaction's result: the first column of its one row
/// (Scylla also returns the existing row's columns after it, so read it untyped).
pub(super) fn applied(res: QueryResult) -> Result<bool, StoreError> {
    let rows = res.into_rows_result().map_err(row_err)?;
    let row = rows.maybe_first_row::<Row>().map_err(row_err)?;
    Ok(matches!(
        row.and_then(|r| r.columns.into_iter().next()).flatten(),
        Some(CqlValue::Boolean(true))
    ))
}

pub(super) type MessageRow = (
    i64,                  // seq
    Option<i64>,          // id
    Option<String>,       // user_id
    Option<String>,       // user_name
    Option<String>,       // content
    Option<CqlTimestamp>, // ts
    Option<i64>,          // reply_to
    Option<CqlTimestamp>, // edited_at
    Option<bool>,         // deleted
);
pub(super) const MESSAGE_COLS: &str =
    "seq, id, user_id, user_name, content, ts, reply_to, edited_at, deleted";

pub(super) fn message_view(room: &RoomId, r: MessageRow) -> Option<MessageView> {
    let (seq, id, user_id, user_name, content, ts, reply_to, edited_at, deleted) = r;
    // A row without its message columns is a fragment (a write that raced a failed insert):
    // not a message.
    let (id, user_id, ts) = (id?, user_id?, ts?);
    let deleted = deleted.unwrap_or(false);
    Some(MessageView {
        room: room.clone(),
        id: MessageId(id as u64),
        seq: seq as u64,
        user: UserRef {
            name: user_name.unwrap_or_else(|| user_id.clone()),
            id: user_id,
        },
        // A tombstone never shows content, whatever a late edit wrote.
        content: if deleted { None } else { content },
        ts: from_ts(ts),
        reply_to: reply_to.map(|r| MessageId(r as u64)),
        edited_at: edited_at.map(from_ts),
        deleted,
    })
}

pub(super) type RoomRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<bool>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<bool>,
);
pub(super) const ROOM_COLS: &str =
    "id, name, topic, visibility, max_members, members_can_pin, owner, created_at, deleted";

/// A live room from its row; None when deleted or a fragment.
pub(super) fn room_info(r: RoomRow) -> Option<RoomInfo> {
    let (id, name, topic, vis, max_members, can_pin, owner, created_at, deleted) = r;
    if deleted.unwrap_or(false) {
        return None;
    }
    Some(RoomInfo {
        id: RoomId::new(id).ok()?,
        name: name?,
        topic: topic.unwrap_or_default(),
        visibility: Visibility::parse(vis.as_deref()?)?,
        max_members: max_members.map(|n| n.max(0) as u32),
        members_can_pin: can_pin.unwrap_or(false),
        owner,
        created_at: from_ts(created_at?),
    })
}

pub(super) type MemberRow = (
    String,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
);
pub(super) const MEMBER_COLS: &str = "user_id, user_name, role, muted, muted_until, joined_at";

/// A member from its row; None for a fragment without a role (a mute that raced a removal).
pub(super) fn member_info(r: MemberRow) -> Option<MemberInfo> {
    let (user_id, user_name, role, muted, muted_until, joined_at) = r;
    Some(MemberInfo {
        role: Role::parse(role.as_deref()?)?,
        muted_until: muted
            .unwrap_or(false)
            .then(|| muted_until.map_or(MUTED_FOREVER, from_ts)),
        joined_at: joined_at.map(from_ts).unwrap_or_default(),
        user: UserRef {
            name: user_name.unwrap_or_else(|| user_id.clone()),
            id: user_id,
        },
    })
}

pub(super) type BanRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
);
pub(super) const BAN_COLS: &str = "user_id, user_name, by_id, by_name, reason, until, at";

pub(super) fn ban_info(r: BanRow) -> Ban {
    let (user_id, user_name, by_id, by_name, reason, until, at) = r;
    let by_id = by_id.unwrap_or_default();
    Ban {
        user: UserRef {
            name: user_name.unwrap_or_else(|| user_id.clone()),
            id: user_id,
        },
        by: UserRef {
            name: by_name.unwrap_or_else(|| by_id.clone()),
            id: by_id,
        },
        reason,
        until: until.map(from_ts),
        at: at.map(from_ts).unwrap_or_default(),
    }
}
