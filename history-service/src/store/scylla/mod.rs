//! [`ScyllaStore`]: the scaled-out store on ScyllaDB, with the `scylla` driver.
//!
//! The schema and the reasons for its shape live in `deploy/scylla/schema.cql` (embedded here
//! and applied by [`migrate`]). In short:
//! - **Messages** are partitioned by `(room, bucket)` with `bucket = seq / BUCKET_SIZE` and
//!   clustered by seq descending. A page reads the room's non-empty buckets from an index and
//!   walks them downward (newest first) or upward until it has `limit` rows ([`paging`]);
//!   callers only ever see seq cursors, never the driver's paging state.
//! - **Write timestamps are seqs** (`USING TIMESTAMP ?` = the event's seq) for everything the
//!   event stream writes. Scylla's last-write-wins then orders writes by seq, whatever order
//!   batches are replayed in: that is what makes [`Store::apply`] idempotent and convergent.
//!   The one read before writing is the guard against a reused seq ([`apply`]).
//! - **Read markers** use the same trick instead of a lightweight transaction: a marker row
//!   written `USING TIMESTAMP <marker seq>` keeps the highest seq ever written — a
//!   max-register. An LWT (`UPDATE .. IF seq < ?`) would cost four round trips of Paxos per
//!   receipt and contend on hot rooms; read-then-write would race. The one difference: `at`
//!   of a replayed receipt with the same seq may be the replay's time.
//! - **Rooms** are written only through LWTs (`IF NOT EXISTS` gives `Conflict` atomically
//!   across gateways). Members and bans are plain writes stamped by the session's monotonic
//!   clock: the gateway authorizes every change and concurrent changes of one member are
//!   last-write-wins. A counter per room keeps its member count for listings.
//! - Statements are prepared once at connect ([`statements`]), marked idempotent where they
//!   are (so the driver may retry them; reads may also be sent to a second replica when the
//!   first is slow), and the fan-out of one batch is bounded ([`MAX_IN_FLIGHT`]).
//! - The driver's own counters (requests, errors, retries, timeouts, connections) are copied
//!   into this process's metrics every [`DRIVER_METRICS_EVERY`].

mod apply;
mod config;
mod paging;
mod rows;
mod schema;
mod statements;
mod upgrade;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{stream, FutureExt, StreamExt, TryStreamExt};
use proto::rooms::{MemberInfo, MessageView, PinView, ReadMarker, Role, RoomInfo};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use scylla::client::session::Session;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{Counter, CqlTimestamp, MaybeUnset};

pub use config::{DriverSettings, ScyllaConfig, TlsSettings};
pub use schema::{migrate, schema_statements, SchemaStatement, DEFAULT_REPLICATION, SCHEMA};

use paging::{Direction, PageWalk, Query};
use rows::{
    applied, ban_info, bucket_of, collect_pages, exec_err, from_ts, id_db, member_info,
    message_view, room_info, row_err, seq_db, ts, BanRow, MemberRow, MessageRow, RoomRow,
};
use statements::Statements;

use super::{Ban, Page, RoomAccess, RoomState, Store, StoreError};

/// Seqs per message partition. 1000 keeps a partition small (≤ 1000 rows, a few MB even with
/// maximal messages; Scylla wants partitions well under 100 MB) while a newest-first page of
/// 50 almost always reads one partition. Changing it requires rewriting the table: every
/// stored row's bucket is derived from it.
pub const BUCKET_SIZE: u64 = 1000;
/// Requests of one batch in flight at once (across partitions).
pub const MAX_IN_FLIGHT: usize = 32;
/// How often the driver's counters are copied into the process's metrics.
pub const DRIVER_METRICS_EVERY: Duration = Duration::from_secs(10);

/// The ScyllaDB store. Cheap to clone (one shared session).
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    ps: Statements,
}

impl ScyllaStore {
    /// Connects and prepares every statement. The schema must exist (see [`migrate`]).
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        let profiles = config.driver.profiles();
        let session = config.session(&profiles).await?;
        let ps = Statements::prepare(&session, &config.keyspace, &profiles).await?;
        let inner = Arc::new(Inner { session, ps });
        tokio::spawn(export_driver_metrics(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// [`ScyllaConfig::parse`] then [`ScyllaStore::connect`].
    pub async fn connect_url(url: &str) -> Result<Self, StoreError> {
        Self::connect(&ScyllaConfig::parse(url)?).await
    }

    fn ps(&self) -> &Statements {
        &self.inner.ps
    }

    async fn exec(
        &self,
        ps: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryResult, StoreError> {
        self.inner
            .session
            .execute_unpaged(ps, values)
            .await
            .map_err(exec_err)
    }

    /// [`Self::exec`] as a boxed future without the result, for [`Self::each`].
    fn exec_drop<'a>(
        &'a self,
        ps: &'a PreparedStatement,
        values: impl SerializeRow + Send + 'a,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move { self.exec(ps, values).await.map(drop) }.boxed()
    }

    /// Every row of a (possibly large) partition or table, fetched page by page.
    async fn all_rows<R>(
        &self,
        ps: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        let pager = self.inner.session.execute_iter(ps.clone(), values).await;
        collect_pages(pager).await
    }

    async fn rows<R>(
        &self,
        ps: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f> scylla::deserialize::row::DeserializeRow<'f, 'f>,
    {
        let res = self.exec(ps, values).await?;
        let rows = res.into_rows_result().map_err(row_err)?;
        let out = rows
            .rows::<R>()
            .map_err(row_err)?
            .collect::<Result<Vec<R>, _>>()
            .map_err(row_err)?;
        Ok(out)
    }

    async fn seq_of(&self, room: &RoomId, id: MessageId) -> Result<Option<u64>, StoreError> {
        let rows: Vec<(Option<i64>,)> = self
            .rows(&self.ps().select_seq_of, (room.as_str(), id_db(id)))
            .await?;
        Ok(rows.into_iter().next().and_then(|(s,)| s).map(|s| s as u64))
    }

    async fn message_at(&self, room: &RoomId, seq: u64) -> Result<Option<MessageView>, StoreError> {
        let rows: Vec<MessageRow> = self
            .rows(
                &self.ps().select_message,
                (room.as_str(), bucket_of(seq), seq_db(seq)),
            )
            .await?;
        Ok(rows.into_iter().next().and_then(|r| message_view(room, r)))
    }

    async fn live_room(&self, room: &RoomId) -> Result<Option<RoomInfo>, StoreError> {
        let rows: Vec<RoomRow> = self.rows(&self.ps().select_room, (room.as_str(),)).await?;
        Ok(rows.into_iter().next().and_then(room_info))
    }

    async fn require_room(&self, room: &RoomId) -> Result<(), StoreError> {
        match self.live_room(room).await? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound),
        }
    }

    async fn member(&self, room: &RoomId, user: &str) -> Result<Option<MemberInfo>, StoreError> {
        let rows: Vec<MemberRow> = self
            .rows(&self.ps().select_member, (room.as_str(), user))
            .await?;
        Ok(rows.into_iter().next().and_then(member_info))
    }

    /// Moves a room's member count by `delta` (a counter update: never retried by the
    /// driver, so a failure may leave the count off by one; it is only shown in listings).
    async fn count_members(&self, room: &RoomId, delta: i64) -> Result<(), StoreError> {
        self.exec(&self.ps().add_member_count, (Counter(delta), room.as_str()))
            .await
            .map(drop)
    }

    /// Runs `futs` with at most [`MAX_IN_FLIGHT`] at once and returns their results in the
    /// order of `futs`; the first error wins. The futures are built (boxed) before the stream
    /// so no closure over borrowed data ends up in the future's type, which trips rustc's
    /// higher-ranked `Send` check in async trait methods.
    async fn each<T: Send>(
        &self,
        futs: Vec<BoxFuture<'_, Result<T, StoreError>>>,
    ) -> Result<Vec<T>, StoreError> {
        stream::iter(futs)
            .buffered(MAX_IN_FLIGHT)
            .try_collect()
            .await
    }
}

/// Copies the driver's counters into the process's metrics until the store is dropped.
async fn export_driver_metrics(store: Weak<Inner>) {
    let mut tick = tokio::time::interval(DRIVER_METRICS_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else { return };
        let m = inner.session.get_metrics();
        metrics::counter!("chat_scylla_requests_total").absolute(
            m.get_requests_unpaged_num()
                + m.get_requests_manually_paged_num()
                + m.get_requests_automatically_paged_num(),
        );
        metrics::counter!("chat_scylla_errors_total").absolute(
            m.get_errors_unpaged_num()
                + m.get_errors_manually_paged_num()
                + m.get_errors_automatically_paged_num(),
        );
        metrics::counter!("chat_scylla_retries_total").absolute(m.get_retries_num());
        metrics::counter!("chat_scylla_request_timeouts_total").absolute(m.get_request_timeouts());
        metrics::gauge!("chat_scylla_connections").set(m.get_total_connections() as f64);
    }
}

impl Store for ScyllaStore {
    async fn apply(&self, events: &[ServerEvent]) -> Result<(), StoreError> {
        let mut messages = Vec::new();
        let mut mods = Vec::new();
        for ev in events {
            let sequenced = match ev {
                ServerEvent::Receipt { seq, .. } => *seq > 0,
                ServerEvent::Message { .. }
                | ServerEvent::MessageEdited { .. }
                | ServerEvent::MessageDeleted { .. }
                | ServerEvent::Pinned { .. }
                | ServerEvent::Unpinned { .. } => ev.seq() > 0,
                _ => continue,
            };
            if !sequenced {
                tracing::warn!(event = ?ev, "stored event without seq skipped");
                continue;
            }
            match ev {
                ServerEvent::Message { .. } => messages.push(ev),
                _ => mods.push(ev),
            }
        }
        // Messages first, so edits/deletes/pins of the same batch find them. Within phase 2
        // order does not matter: every write carries its seq as timestamp.
        self.insert_messages(messages).await?;
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> = mods
            .into_iter()
            .map(|ev| self.apply_mod(ev).boxed())
            .collect();
        for (room, seq) in crate::store::last_seqs(events) {
            let values = (seq_db(seq), seq_db(seq), room.as_str());
            writes.push(self.exec_drop(&self.ps().upsert_room_seq, values));
        }
        self.each(writes).await.map(drop)
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, StoreError> {
        let rows: Vec<(Option<i64>,)> = self
            .rows(&self.ps().select_room_seq, (room.as_str(),))
            .await?;
        let tracked = rows.into_iter().next().and_then(|(s,)| s).unwrap_or(0);
        // A keyspace written before `room_seqs` existed knows its rooms' seqs only from their
        // messages and pins.
        let newest = Page::Before {
            before: None,
            limit: 1,
        };
        let (messages, pins) =
            futures_util::try_join!(self.messages(room, newest), self.pins(room))?;
        Ok(messages
            .iter()
            .map(|m| m.seq)
            .chain(pins.iter().map(|p| p.message.seq))
            .chain([tracked.max(0) as u64])
            .max()
            .unwrap_or(0))
    }

    async fn messages(&self, room: &RoomId, page: Page) -> Result<Vec<MessageView>, StoreError> {
        let mut walk = PageWalk::new(page);
        let newest_first = walk.direction() == Direction::NewestFirst;
        let mut out = Vec::new();
        while let Some(query) = walk.next_query() {
            match query {
                Query::Buckets { from, limit } => {
                    let ps = if newest_first {
                        &self.ps().select_buckets_down
                    } else {
                        &self.ps().select_buckets_up
                    };
                    let found: Vec<(i64,)> = self
                        .rows(ps, (room.as_str(), seq_db(from), limit as i32))
                        .await?;
                    let found: Vec<u64> = found.into_iter().map(|(b,)| b as u64).collect();
                    walk.buckets_found(&found);
                }
                Query::Rows {
                    bucket,
                    cursor,
                    limit,
                } => {
                    let ps = if newest_first {
                        &self.ps().select_before
                    } else {
                        &self.ps().select_after
                    };
                    let want = limit.min(i32::MAX as usize) as i32;
                    let rows: Vec<MessageRow> = self
                        .rows(ps, (room.as_str(), seq_db(bucket), seq_db(cursor), want))
                        .await?;
                    let (fetched, last) = (rows.len(), rows.last().map(|r| r.0 as u64));
                    let before = out.len();
                    out.extend(rows.into_iter().filter_map(|r| message_view(room, r)));
                    walk.rows_read(fetched, last, out.len() - before);
                }
            }
        }
        Ok(out)
    }

    async fn message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        match self.seq_of(room, id).await? {
            Some(seq) => self.message_at(room, seq).await,
            None => Ok(None),
        }
    }

    async fn pins(&self, room: &RoomId) -> Result<Vec<PinView>, StoreError> {
        type PinRow = (
            i64,
            Option<String>,
            Option<String>,
            Option<CqlTimestamp>,
            Option<i64>,
        );
        let rows: Vec<PinRow> = self
            .all_rows(&self.ps().select_pins, (room.as_str(),))
            .await?;
        // Pins are few per room; the messages are read at once so edits show.
        let mut pins: Vec<(PinView, i64)> = stream::iter(rows)
            .map(|(id, by_id, by_name, pinned_at, seq)| async move {
                let message = self.message(room, MessageId(id as u64)).await?;
                let by_id = by_id.unwrap_or_default();
                Ok::<_, StoreError>(message.filter(|m| !m.deleted).map(|message| {
                    (
                        PinView {
                            message,
                            by: UserRef {
                                name: by_name.unwrap_or_else(|| by_id.clone()),
                                id: by_id,
                            },
                            pinned_at: pinned_at.map(from_ts).unwrap_or_default(),
                        },
                        seq.unwrap_or(0),
                    )
                }))
            })
            .buffer_unordered(MAX_IN_FLIGHT)
            .try_filter_map(|p| async move { Ok(p) })
            .try_collect()
            .await?;
        pins.sort_by_key(|(p, seq)| std::cmp::Reverse((p.pinned_at, *seq)));
        Ok(pins.into_iter().map(|(p, _)| p).collect())
    }

    async fn markers(&self, room: &RoomId) -> Result<Vec<ReadMarker>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<CqlTimestamp>)> = self
            .all_rows(&self.ps().select_markers, (room.as_str(),))
            .await?;
        let mut markers: Vec<ReadMarker> = rows
            .into_iter()
            .filter_map(|(user, seq, at)| {
                Some(ReadMarker {
                    user,
                    seq: seq? as u64,
                    at: at.map(from_ts).unwrap_or_default(),
                })
            })
            .collect();
        markers.sort_by(|a, b| b.seq.cmp(&a.seq).then_with(|| a.user.cmp(&b.user)));
        Ok(markers)
    }

    async fn marker(&self, room: &RoomId, user: &str) -> Result<Option<u64>, StoreError> {
        let rows: Vec<(Option<i64>,)> = self
            .rows(&self.ps().select_marker, (room.as_str(), user))
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|(seq,)| seq)
            .map(|s| s as u64))
    }

    async fn create_room(&self, info: &RoomInfo, owner: &UserRef) -> Result<(), StoreError> {
        let res = self
            .exec(
                &self.ps().insert_room,
                (
                    info.id.as_str(),
                    info.name.as_str(),
                    info.topic.as_str(),
                    info.visibility.as_str(),
                    MaybeUnset::from_option(
                        info.max_members.map(|n| n.min(i32::MAX as u32) as i32),
                    ),
                    info.members_can_pin,
                    owner.id.as_str(),
                    ts(info.created_at),
                ),
            )
            .await?;
        if !applied(res)? {
            return Err(StoreError::Conflict);
        }
        // Not atomic with the room row (an LWT cannot span partitions): if this fails the
        // room exists with `owner` set in its settings, which is what authorization reads.
        self.exec(
            &self.ps().insert_member,
            (
                info.id.as_str(),
                owner.id.as_str(),
                owner.name.as_str(),
                Role::Owner.as_str(),
                ts(info.created_at),
            ),
        )
        .await?;
        self.count_members(&info.id, 1).await
    }

    async fn update_room(&self, info: &RoomInfo) -> Result<(), StoreError> {
        let res = self
            .exec(
                &self.ps().update_room,
                (
                    info.name.as_str(),
                    info.topic.as_str(),
                    info.visibility.as_str(),
                    info.max_members.map(|n| n.min(i32::MAX as u32) as i32),
                    info.members_can_pin,
                    info.id.as_str(),
                ),
            )
            .await?;
        if applied(res)? {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn delete_room(&self, room: &RoomId) -> Result<(), StoreError> {
        let res = self.exec(&self.ps().delete_room, (room.as_str(),)).await?;
        if applied(res)? {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        let Some(info) = self.live_room(room).await? else {
            return Ok(None);
        };
        let members: Vec<MemberRow> = self
            .all_rows(&self.ps().select_members, (room.as_str(),))
            .await?;
        let bans: Vec<BanRow> = self
            .all_rows(&self.ps().select_bans, (room.as_str(),))
            .await?;
        let mut members: Vec<MemberInfo> = members.into_iter().filter_map(member_info).collect();
        members.sort_by(|a, b| (a.joined_at, &a.user.id).cmp(&(b.joined_at, &b.user.id)));
        let mut bans: Vec<Ban> = bans.into_iter().map(ban_info).collect();
        bans.sort_by(|a, b| (a.at, &a.user.id).cmp(&(b.at, &b.user.id)));
        Ok(Some(RoomState {
            info,
            members,
            bans,
        }))
    }

    async fn rooms(&self) -> Result<Vec<(RoomInfo, u64)>, StoreError> {
        // Two scans of small rows (one per room each), no per-room query: the counts are kept
        // as members come and go.
        let (rows, counts) = futures_util::try_join!(
            self.all_rows::<RoomRow>(&self.ps().select_rooms, ()),
            self.all_rows::<(String, Option<Counter>)>(&self.ps().select_member_counts, ()),
        )?;
        let counts: HashMap<String, i64> = counts
            .into_iter()
            .map(|(room, n)| (room, n.map_or(0, |c| c.0)))
            .collect();
        let mut out: Vec<(RoomInfo, u64)> = rows
            .into_iter()
            .filter_map(room_info)
            .map(|info| {
                let n = counts.get(info.id.as_str()).copied().unwrap_or(0).max(0) as u64;
                (info, n)
            })
            .collect();
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    }

    async fn put_member(
        &self,
        room: &RoomId,
        user: &UserRef,
        role: Role,
    ) -> Result<(), StoreError> {
        self.require_room(room).await?;
        // Read first to keep `joined_at` on a role change (an INSERT would overwrite it) and
        // to count only new memberships.
        let existing = self.member(room, &user.id).await?;
        let joined_at = existing
            .as_ref()
            .map_or_else(Timestamp::now, |m| m.joined_at);
        self.exec(
            &self.ps().insert_member,
            (
                room.as_str(),
                user.id.as_str(),
                user.name.as_str(),
                role.as_str(),
                ts(joined_at),
            ),
        )
        .await?;
        if existing.is_none() {
            self.count_members(room, 1).await?;
        }
        Ok(())
    }

    async fn remove_member(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        let existed = self.member(room, user).await?.is_some();
        self.exec(&self.ps().delete_member, (room.as_str(), user))
            .await?;
        if existed {
            self.count_members(room, -1).await?;
        }
        Ok(())
    }

    async fn set_mute(
        &self,
        room: &RoomId,
        user: &str,
        until: Option<Timestamp>,
        muted: bool,
    ) -> Result<(), StoreError> {
        if self.member(room, user).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        // Unmuted: `muted_until` is left as it is (ignored while not muted). Muted without
        // end: null, clearing an earlier end.
        let until: MaybeUnset<Option<CqlTimestamp>> = if muted {
            MaybeUnset::Set(until.map(ts))
        } else {
            MaybeUnset::Unset
        };
        self.exec(&self.ps().mute_member, (muted, until, room.as_str(), user))
            .await
            .map(drop)
    }

    async fn put_ban(&self, room: &RoomId, ban: &Ban) -> Result<(), StoreError> {
        self.require_room(room).await?;
        self.exec(
            &self.ps().insert_ban,
            (
                room.as_str(),
                ban.user.id.as_str(),
                ban.user.name.as_str(),
                ban.by.id.as_str(),
                ban.by.name.as_str(),
                ban.reason.as_deref(),
                ban.until.map(ts),
                ts(ban.at),
            ),
        )
        .await
        .map(drop)
    }

    async fn remove_ban(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.exec(&self.ps().delete_ban, (room.as_str(), user))
            .await
            .map(drop)
    }

    async fn access(&self, room: &RoomId, user: &str) -> Result<Option<RoomAccess>, StoreError> {
        let Some(info) = self.live_room(room).await? else {
            return Ok(None);
        };
        let member = self.member(room, user).await?;
        let bans: Vec<BanRow> = self
            .rows(&self.ps().select_ban, (room.as_str(), user))
            .await?;
        Ok(Some(RoomAccess {
            info,
            member,
            ban: bans.into_iter().next().map(ban_info),
        }))
    }
}
