//! One-off data steps of `migrate`: filling the tables this build added from what an earlier
//! build left in the keyspace. Each step runs once per keyspace (recorded in `schema_steps`)
//! and may run again if `migrate` died midway. History-services of this build may run
//! meanwhile (they index and count what they write themselves); earlier builds must not: what
//! they write after the step passed their room is missed (docs/operations.md, "Upgrading a
//! keyspace from an earlier build"). On a new keyspace both steps find nothing to do.

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
/// Brings `room_member_counts` to each room's number of members.
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

/// Brings each room's count to its number of members: adds the difference, so a room whose
/// count new code already moved (history-service running during the upgrade) ends right, and
/// a re-run after a crash changes nothing where the counts are right already.
async fn seed_member_counts(session: &Session, ks: &str) -> Result<(), StoreError> {
    let rooms: Vec<(String,)> = scan(session, format!("SELECT id FROM {ks}.rooms")).await?;
    let current = prepare(
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
            let (current, count, add) = (&current, &count, &add);
            async move {
                let counted = first::<(Option<Counter>,)>(session, current, (room,))
                    .await?
                    .and_then(|(c,)| c)
                    .map_or(0, |c| c.0);
                let members = first::<(i64,)>(session, count, (room,))
                    .await?
                    .map_or(0, |(n,)| n);
                if members == counted {
                    return Ok(());
                }
                session
                    .execute_unpaged(add, (Counter(members - counted), room))
                    .await
                    .map(drop)
                    .map_err(exec_err)
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
