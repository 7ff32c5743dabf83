//! One-off data steps of `migrate`: filling the tables this build added from what an earlier
//! build left in the keyspace. Each step runs once per keyspace (recorded in `schema_steps`)
//! and may run again if `migrate` died midway. Nothing may write to the keyspace while they
//! run: docs/operations.md ("Upgrading a keyspace") stops history-service first. On a new
//! keyspace both find nothing to do.

use futures_util::{stream, StreamExt, TryStreamExt};
use proto::Timestamp;
use scylla::client::session::Session;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{Counter, CqlTimestamp};

use super::rows::{collect_pages, exec_err, row_err};
use super::{BUCKET_SIZE, MAX_IN_FLIGHT};
use crate::store::StoreError;

/// Fills `message_buckets` from the buckets of the rooms in `room_heads` (the table earlier
/// builds paged with; this one never writes it).
const MESSAGE_BUCKETS: &str = "message_buckets";
/// Seeds `room_member_counts` with each room's members.
const MEMBER_COUNTS: &str = "room_member_counts";

pub async fn run(session: &Session, ks: &str) -> Result<(), StoreError> {
    if !done(session, ks, MESSAGE_BUCKETS).await? {
        fill_message_buckets(session, ks).await?;
        mark_done(session, ks, MESSAGE_BUCKETS).await?;
    }
    if !done(session, ks, MEMBER_COUNTS).await? {
        seed_member_counts(session, ks).await?;
        mark_done(session, ks, MEMBER_COUNTS).await?;
    }
    Ok(())
}

async fn done(session: &Session, ks: &str, step: &str) -> Result<bool, StoreError> {
    let ps = prepare(
        session,
        format!("SELECT step FROM {ks}.schema_steps WHERE step = ?"),
    )
    .await?;
    Ok(first::<(String,)>(session, &ps, (step,)).await?.is_some())
}

async fn mark_done(session: &Session, ks: &str, step: &str) -> Result<(), StoreError> {
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.schema_steps (step, done_at) VALUES (?, ?)"),
            (step, CqlTimestamp(Timestamp::now().0)),
        )
        .await
        .map_err(exec_err)?;
    tracing::info!(step, "schema step done");
    Ok(())
}

/// Every (room, bucket) below the room's recorded head that holds a message gets its index
/// row; written like the store writes it (idempotent, timestamp = a seq in the bucket).
async fn fill_message_buckets(session: &Session, ks: &str) -> Result<(), StoreError> {
    let legacy = session
        .get_cluster_state()
        .get_keyspace(ks)
        .is_some_and(|k| k.tables.contains_key("room_heads"));
    if !legacy {
        return Ok(());
    }
    let heads: Vec<(String, Option<i64>)> = scan(
        session,
        format!("SELECT room, last_seq FROM {ks}.room_heads"),
    )
    .await?;
    let probe = prepare(
        session,
        format!("SELECT seq FROM {ks}.messages WHERE room = ? AND bucket = ? LIMIT 1"),
    )
    .await?;
    let insert = prepare(
        session,
        format!("INSERT INTO {ks}.message_buckets (room, bucket) VALUES (?, ?) USING TIMESTAMP ?"),
    )
    .await?;
    let buckets = heads.iter().flat_map(|(room, head)| {
        let last = head.unwrap_or(0).max(0) as u64 / BUCKET_SIZE;
        (0..=last).map(move |b| (room.as_str(), b as i64))
    });
    let filled: Vec<bool> = stream::iter(buckets)
        .map(|(room, bucket)| {
            let (probe, insert) = (&probe, &insert);
            async move {
                let Some((seq,)) = first::<(i64,)>(session, probe, (room, bucket)).await? else {
                    return Ok(false);
                };
                session
                    .execute_unpaged(insert, (room, bucket, seq))
                    .await
                    .map_err(exec_err)?;
                Ok::<_, StoreError>(true)
            }
        })
        .buffer_unordered(MAX_IN_FLIGHT)
        .try_collect()
        .await?;
    tracing::info!(
        rooms = heads.len(),
        buckets = filled.iter().filter(|f| **f).count(),
        "message bucket index filled"
    );
    Ok(())
}

/// Each room without a count gets its current number of members (a re-run after a crash
/// skips the rooms already counted).
async fn seed_member_counts(session: &Session, ks: &str) -> Result<(), StoreError> {
    let rooms: Vec<(String,)> = scan(session, format!("SELECT id FROM {ks}.rooms")).await?;
    let existing = prepare(
        session,
        format!("SELECT members FROM {ks}.room_member_counts WHERE room = ?"),
    )
    .await?;
    let count = prepare(
        session,
        format!("SELECT COUNT(*) FROM {ks}.members WHERE room = ?"),
    )
    .await?;
    let add = prepare(
        session,
        format!("UPDATE {ks}.room_member_counts SET members = members + ? WHERE room = ?"),
    )
    .await?;
    stream::iter(&rooms)
        .map(|(room,)| {
            let (existing, count, add) = (&existing, &count, &add);
            async move {
                let seeded = first::<(Option<Counter>,)>(session, existing, (room,)).await?;
                let members = first::<(i64,)>(session, count, (room,)).await?;
                match (seeded, members) {
                    (None, Some((n,))) if n > 0 => session
                        .execute_unpaged(add, (Counter(n), room))
                        .await
                        .map(drop)
                        .map_err(exec_err),
                    _ => Ok(()),
                }
            }
        })
        .buffer_unordered(MAX_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    tracing::info!(rooms = rooms.len(), "member counts seeded");
    Ok(())
}

async fn prepare(session: &Session, cql: String) -> Result<PreparedStatement, StoreError> {
    session
        .prepare(cql.as_str())
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot prepare `{cql}`: {e}")))
}

/// Every row of an unprepared query, page by page.
async fn scan<R>(session: &Session, cql: String) -> Result<Vec<R>, StoreError>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm> + Send + 'static,
{
    collect_pages(session.query_iter(cql, ()).await).await
}

/// The first row a prepared statement returns, if any.
async fn first<R>(
    session: &Session,
    ps: &PreparedStatement,
    values: impl SerializeRow,
) -> Result<Option<R>, StoreError>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm>,
{
    let res = session
        .execute_unpaged(ps, values)
        .await
        .map_err(exec_err)?;
    let rows = res.into_rows_result().map_err(row_err)?;
    rows.maybe_first_row::<R>().map_err(row_err)
}
