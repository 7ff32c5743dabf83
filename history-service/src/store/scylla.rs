//! [`ScyllaStore`]: the scaled-out store on ScyllaDB, with the `scylla` driver.
//!
//! The schema and the reasons for its shape live in `deploy/scylla/schema.cql` (embedded here
//! and applied by [`migrate`]). In short:
//! - **Messages** are partitioned by `(room, bucket)` with `bucket = seq / BUCKET_SIZE` and
//!   clustered by seq descending. A page walks buckets downward (newest first) or upward
//!   until it has `limit` rows or runs out of buckets; callers only ever see seq cursors,
//!   never the driver's paging state.
//! - **Write timestamps are seqs** (`USING TIMESTAMP ?` = the event's seq) for everything the
//!   event stream writes. Scylla's last-write-wins then orders writes by seq, whatever order
//!   batches are replayed in: that is what makes [`Store::apply`] idempotent and convergent
//!   without reading first.
//! - **Read markers** use the same trick instead of a lightweight transaction: a marker row
//!   written `USING TIMESTAMP <marker seq>` keeps the highest seq ever written — a
//!   max-register. An LWT (`UPDATE .. IF seq < ?`) would cost four round trips of Paxos per
//!   receipt and contend on hot rooms; read-then-write would race. The one difference: `at`
//!   of a replayed receipt with the same seq may be the replay's time.
//! - **Rooms** are written only through LWTs (`IF NOT EXISTS` gives `Conflict` atomically
//!   across gateways). Members and bans are plain writes: the gateway authorizes every change
//!   and concurrent changes of one member are last-write-wins.
//! - Statements are prepared once at connect, marked idempotent where they are (so the
//!   driver may retry them), and the fan-out of one batch is bounded ([`MAX_IN_FLIGHT`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{stream, FutureExt, StreamExt, TryStreamExt};
use proto::rooms::{MemberInfo, MessageView, PinView, ReadMarker, Role, RoomInfo, Visibility};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, PagerExecutionError, RequestAttemptError};
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlTimestamp, CqlValue, Row};

use super::{Ban, Page, RoomAccess, RoomState, Store, StoreError, MUTED_FOREVER};

/// Seqs per message partition. 1000 keeps a partition small (≤ 1000 rows, a few MB even with
/// maximal messages; Scylla wants partitions well under 100 MB) while a newest-first page of
/// 50 almost always reads one partition. Changing it requires rewriting the table: every
/// stored row's bucket is derived from it.
pub const BUCKET_SIZE: u64 = 1000;
/// Requests of one batch in flight at once (across partitions).
pub const MAX_IN_FLIGHT: usize = 32;
/// Statements in one unlogged (single-partition) batch; keeps batches under Scylla's
/// `batch_size_warn_threshold_in_kb` with typical messages.
const MAX_BATCH_STATEMENTS: usize = 50;
/// Default replication for `migrate`: a development single node.
pub const DEFAULT_REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";
/// The schema file, embedded so the binary can migrate with nothing else on disk.
pub const SCHEMA: &str = include_str!("../../../deploy/scylla/schema.cql");

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `scylla://[user:password@]host[:port][,host2[:port]]/keyspace` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// `host:port` of the contact points (port defaults to 9042).
    pub nodes: Vec<String>,
    pub keyspace: String,
    pub credentials: Option<(String, String)>,
}

impl ScyllaConfig {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Internal(format!("bad scylla url {url:?}: {why}"));
        let rest = url
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("must start with scylla://"))?;
        let (authority, keyspace) = rest
            .split_once('/')
            .ok_or_else(|| bad("missing /keyspace"))?;
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((cred, hosts)) => {
                let (u, p) = cred
                    .split_once(':')
                    .ok_or_else(|| bad("credentials must be user:password"))?;
                (Some((u.to_owned(), p.to_owned())), hosts)
            }
            None => (None, authority),
        };
        let mut nodes = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            match host.rsplit_once(':') {
                Some((h, port)) if !h.is_empty() && !h.ends_with(':') => {
                    port.parse::<u16>().map_err(|_| bad("bad port"))?;
                    nodes.push(host.to_owned());
                }
                _ => nodes.push(format!("{host}:9042")),
            }
        }
        if !valid_keyspace(keyspace) {
            return Err(bad(
                "keyspace must be 1-48 characters of [a-z0-9_], starting with a letter",
            ));
        }
        Ok(Self {
            nodes,
            keyspace: keyspace.to_owned(),
            credentials,
        })
    }

    async fn session(&self) -> Result<Session, StoreError> {
        // LOCAL_QUORUM reads and writes overlap on every replica set (RF 3: any one replica
        // may be down); LWTs use LOCAL_SERIAL so they do not cross data centres.
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&self.nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .default_execution_profile_handle(profile.into_handle());
        if let Some((user, password)) = &self.credentials {
            builder = builder.user(user, password);
        }
        builder
            .build()
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to scylla: {e}")))
    }
}

/// A CQL identifier we are willing to splice into statements (keyspace names cannot be bound).
fn valid_keyspace(ks: &str) -> bool {
    !ks.is_empty()
        && ks.len() <= 48
        && ks.starts_with(|c: char| c.is_ascii_lowercase())
        && ks
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A replication map for `CREATE KEYSPACE`: `{...}` of quoted names, numbers, `:` and `,`.
fn valid_replication(r: &str) -> bool {
    let r = r.trim();
    r.starts_with('{')
        && r.ends_with('}')
        && r[1..r.len() - 1]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " '_:,.-".contains(c))
}

/// The statements of [`SCHEMA`] after `USE`, comments stripped.
pub fn schema_tables() -> Vec<String> {
    let text: String = SCHEMA
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| {
            let upper = s.to_ascii_uppercase();
            !s.is_empty() && !upper.starts_with("CREATE KEYSPACE") && !upper.starts_with("USE ")
        })
        .collect()
}

/// Creates the keyspace (with `replication`, a CQL map) and every table, idempotently.
pub async fn migrate(config: &ScyllaConfig, replication: &str) -> Result<(), StoreError> {
    if !valid_replication(replication) {
        return Err(StoreError::Internal(format!(
            "bad replication {replication:?}: expected a CQL map like {DEFAULT_REPLICATION}"
        )));
    }
    let session = config.session().await?;
    let ks = &config.keyspace;
    let create = format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}");
    // ScyllaDB ≥ 6 may create NetworkTopologyStrategy keyspaces with tablets, and tablet
    // keyspaces do not support the LWTs rooms are created with. Ask for vnodes explicitly;
    // servers that do not know the `tablets` option (Cassandra, ScyllaDB < 6) refuse it, and
    // then the plain statement is right. (SimpleStrategy keyspaces never use tablets.)
    let mut created = false;
    if replication.contains("NetworkTopologyStrategy") {
        let with_vnodes = format!("{create} AND tablets = {{'enabled': false}}");
        match session.query_unpaged(with_vnodes, &[]).await {
            Ok(_) => created = true,
            Err(e) => tracing::info!(error = %e, "keyspace without the tablets option"),
        }
    }
    if !created {
        session.query_unpaged(create, &[]).await.map_err(exec_err)?;
    }
    session
        .use_keyspace(ks.as_str(), false)
        .await
        .map_err(|e| StoreError::Unavailable(format!("USE {ks}: {e}")))?;
    // Schema changes: the driver waits for schema agreement after each one by itself.
    for statement in schema_tables() {
        session
            .query_unpaged(statement, &[])
            .await
            .map_err(exec_err)?;
    }
    tracing::info!(keyspace = %ks, "scylla schema applied");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Errors and conversions

fn exec_err(e: ExecutionError) -> StoreError {
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

fn pager_err(e: PagerExecutionError) -> StoreError {
    StoreError::Unavailable(format!("scylla: {e}"))
}

fn row_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("scylla result: {e}"))
}

fn seq_db(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Message ids are u64 on the wire and bigint here: a bit-cast both ways.
fn id_db(id: MessageId) -> i64 {
    id.0 as i64
}

fn bucket_of(seq: u64) -> i64 {
    seq_db(seq / BUCKET_SIZE)
}

fn ts(t: Timestamp) -> CqlTimestamp {
    CqlTimestamp(t.0)
}

fn from_ts(t: CqlTimestamp) -> Timestamp {
    Timestamp(t.0)
}

/// `[applied]` of a lightweight transaction's result: the first column of its one row
/// (Scylla also returns the existing row's columns after it, so read it untyped).
fn applied(res: QueryResult) -> Result<bool, StoreError> {
    let rows = res.into_rows_result().map_err(row_err)?;
    let row = rows.maybe_first_row::<Row>().map_err(row_err)?;
    Ok(matches!(
        row.and_then(|r| r.columns.into_iter().next()).flatten(),
        Some(CqlValue::Boolean(true))
    ))
}

type MessageRow = (
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
const MESSAGE_COLS: &str = "seq, id, user_id, user_name, content, ts, reply_to, edited_at, deleted";

fn message_view(room: &RoomId, r: MessageRow) -> Option<MessageView> {
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

type RoomRow = (
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
const ROOM_COLS: &str =
    "id, name, topic, visibility, max_members, members_can_pin, owner, created_at, deleted";

/// A live room from its row; None when deleted or a fragment.
fn room_info(r: RoomRow) -> Option<RoomInfo> {
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

type MemberRow = (
    String,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
);
const MEMBER_COLS: &str = "user_id, user_name, role, muted, muted_until, joined_at";

/// A member from its row; None for a fragment without a role (a mute that raced a removal).
fn member_info(r: MemberRow) -> Option<MemberInfo> {
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

type BanRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
);
const BAN_COLS: &str = "user_id, user_name, by_id, by_name, reason, until, at";

fn ban_info(r: BanRow) -> Ban {
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

// ---------------------------------------------------------------------------------------------
// The store

struct Statements {
    insert_message: PreparedStatement,
    insert_message_id: PreparedStatement,
    bump_head: PreparedStatement,
    select_head: PreparedStatement,
    select_before: PreparedStatement,
    select_after: PreparedStatement,
    select_message: PreparedStatement,
    select_seq_of: PreparedStatement,
    edit_message: PreparedStatement,
    tombstone_message: PreparedStatement,
    pending_edit: PreparedStatement,
    pending_delete: PreparedStatement,
    select_pending: PreparedStatement,
    delete_pending: PreparedStatement,
    insert_pin: PreparedStatement,
    delete_pin: PreparedStatement,
    select_pins: PreparedStatement,
    upsert_marker: PreparedStatement,
    select_markers: PreparedStatement,
    select_marker: PreparedStatement,
    insert_room: PreparedStatement,
    update_room: PreparedStatement,
    delete_room: PreparedStatement,
    select_room: PreparedStatement,
    select_rooms: PreparedStatement,
    count_members: PreparedStatement,
    insert_member: PreparedStatement,
    delete_member: PreparedStatement,
    select_member: PreparedStatement,
    select_members: PreparedStatement,
    mute_member: PreparedStatement,
    insert_ban: PreparedStatement,
    delete_ban: PreparedStatement,
    select_ban: PreparedStatement,
    select_bans: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Self, StoreError> {
        // Idempotent statements may be retried or speculatively executed by the driver;
        // LWTs and plain upserts with wall-clock timestamps are left non-idempotent.
        let prep = |cql: String, idempotent: bool| async move {
            let mut ps = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot prepare `{cql}`: {e}")))?;
            ps.set_is_idempotent(idempotent);
            Ok::<_, StoreError>(ps)
        };
        Ok(Self {
            insert_message: prep(
                format!(
                "INSERT INTO {ks}.messages (room, bucket, seq, id, user_id, user_name, content, ts,
                                            reply_to, deleted)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false) USING TIMESTAMP ?"
            ),
                true,
            )
            .await?,
            insert_message_id: prep(
                format!(
                "INSERT INTO {ks}.message_ids (room, id, seq) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ),
                true,
            )
            .await?,
            bump_head: prep(
                format!("UPDATE {ks}.room_heads USING TIMESTAMP ? SET last_seq = ? WHERE room = ?"),
                true,
            )
            .await?,
            select_head: prep(
                format!("SELECT last_seq FROM {ks}.room_heads WHERE room = ?"),
                true,
            )
            .await?,
            select_before: prep(
                format!(
                    "SELECT {MESSAGE_COLS} FROM {ks}.messages
                 WHERE room = ? AND bucket = ? AND seq < ? LIMIT ?"
                ),
                true,
            )
            .await?,
            select_after: prep(
                format!(
                    "SELECT {MESSAGE_COLS} FROM {ks}.messages
                 WHERE room = ? AND bucket = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
                ),
                true,
            )
            .await?,
            select_message: prep(
                format!(
                "SELECT {MESSAGE_COLS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND seq = ?"
            ),
                true,
            )
            .await?,
            select_seq_of: prep(
                format!("SELECT seq FROM {ks}.message_ids WHERE room = ? AND id = ?"),
                true,
            )
            .await?,
            edit_message: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET content = ?, edited_at = ?
                 WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                true,
            )
            .await?,
            tombstone_message: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET content = null, deleted = true
                 WHERE room = ? AND bucket = ? AND seq = ?"
                ),
                true,
            )
            .await?,
            pending_edit: prep(
                format!(
                    "UPDATE {ks}.pending_mods USING TIMESTAMP ?
                 SET content = ?, edited_at = ?, edit_seq = ? WHERE room = ? AND id = ?"
                ),
                true,
            )
            .await?,
            pending_delete: prep(
                format!(
                    "UPDATE {ks}.pending_mods USING TIMESTAMP ?
                 SET deleted = true, delete_seq = ? WHERE room = ? AND id = ?"
                ),
                true,
            )
            .await?,
            select_pending: prep(
                format!(
                    "SELECT id, content, edited_at, edit_seq, deleted, delete_seq
                 FROM {ks}.pending_mods WHERE room = ?"
                ),
                true,
            )
            .await?,
            delete_pending: prep(
                format!(
                    "DELETE FROM {ks}.pending_mods USING TIMESTAMP ? WHERE room = ? AND id = ?"
                ),
                true,
            )
            .await?,
            insert_pin: prep(
                format!(
                    "INSERT INTO {ks}.pins (room, message_id, by_id, by_name, pinned_at, seq)
                 VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
            )
            .await?,
            delete_pin: prep(
                format!(
                    "DELETE FROM {ks}.pins USING TIMESTAMP ? WHERE room = ? AND message_id = ?"
                ),
                true,
            )
            .await?,
            select_pins: prep(
                format!(
                "SELECT message_id, by_id, by_name, pinned_at, seq FROM {ks}.pins WHERE room = ?"
            ),
                true,
            )
            .await?,
            upsert_marker: prep(
                format!(
                    "UPDATE {ks}.read_markers USING TIMESTAMP ? SET seq = ?, at = ?
                 WHERE room = ? AND user_id = ?"
                ),
                true,
            )
            .await?,
            select_markers: prep(
                format!("SELECT user_id, seq, at FROM {ks}.read_markers WHERE room = ?"),
                true,
            )
            .await?,
            select_marker: prep(
                format!("SELECT seq FROM {ks}.read_markers WHERE room = ? AND user_id = ?"),
                true,
            )
            .await?,
            insert_room: prep(
                format!(
                    "INSERT INTO {ks}.rooms ({ROOM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, false)
                 IF NOT EXISTS"
                ),
                false,
            )
            .await?,
            update_room: prep(
                format!(
                    "UPDATE {ks}.rooms SET name = ?, topic = ?, visibility = ?, max_members = ?,
                                       members_can_pin = ?
                 WHERE id = ? IF deleted = false"
                ),
                false,
            )
            .await?,
            delete_room: prep(
                format!("UPDATE {ks}.rooms SET deleted = true WHERE id = ? IF EXISTS"),
                false,
            )
            .await?,
            select_room: prep(
                format!("SELECT {ROOM_COLS} FROM {ks}.rooms WHERE id = ?"),
                true,
            )
            .await?,
            select_rooms: prep(format!("SELECT {ROOM_COLS} FROM {ks}.rooms"), true).await?,
            count_members: prep(
                format!("SELECT COUNT(*) FROM {ks}.members WHERE room = ?"),
                true,
            )
            .await?,
            insert_member: prep(
                format!(
                    "INSERT INTO {ks}.members (room, user_id, user_name, role, joined_at)
                 VALUES (?, ?, ?, ?, ?)"
                ),
                false,
            )
            .await?,
            delete_member: prep(
                format!("DELETE FROM {ks}.members WHERE room = ? AND user_id = ?"),
                false,
            )
            .await?,
            select_member: prep(
                format!("SELECT {MEMBER_COLS} FROM {ks}.members WHERE room = ? AND user_id = ?"),
                true,
            )
            .await?,
            select_members: prep(
                format!("SELECT {MEMBER_COLS} FROM {ks}.members WHERE room = ?"),
                true,
            )
            .await?,
            mute_member: prep(
                format!(
                "UPDATE {ks}.members SET muted = ?, muted_until = ? WHERE room = ? AND user_id = ?"
            ),
                false,
            )
            .await?,
            insert_ban: prep(
                format!("INSERT INTO {ks}.bans (room, {BAN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                false,
            )
            .await?,
            delete_ban: prep(
                format!("DELETE FROM {ks}.bans WHERE room = ? AND user_id = ?"),
                false,
            )
            .await?,
            select_ban: prep(
                format!("SELECT {BAN_COLS} FROM {ks}.bans WHERE room = ? AND user_id = ?"),
                true,
            )
            .await?,
            select_bans: prep(
                format!("SELECT {BAN_COLS} FROM {ks}.bans WHERE room = ?"),
                true,
            )
            .await?,
        })
    }
}

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
        let session = config.session().await?;
        let ps = Statements::prepare(&session, &config.keyspace).await?;
        Ok(Self {
            inner: Arc::new(Inner { session, ps }),
        })
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

    /// Every row of a (possibly large) partition, fetched page by page.
    async fn all_rows<R>(
        &self,
        ps: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        self.inner
            .session
            .execute_iter(ps.clone(), values)
            .await
            .map_err(pager_err)?
            .rows_stream::<R>()
            .map_err(row_err)?
            .try_collect()
            .await
            .map_err(|e| StoreError::Unavailable(format!("scylla: {e}")))
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

    async fn head(&self, room: &RoomId) -> Result<Option<u64>, StoreError> {
        let rows: Vec<(Option<i64>,)> = self.rows(&self.ps().select_head, (room.as_str(),)).await?;
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

    /// Runs `futs` with at most [`MAX_IN_FLIGHT`] at once; the first error wins. The futures are
    /// built (boxed) before the stream so no closure over borrowed data ends up in the
    /// future's type, which trips rustc's higher-ranked `Send` check in async trait methods.
    async fn each<T: Send>(
        &self,
        futs: Vec<BoxFuture<'_, Result<T, StoreError>>>,
    ) -> Result<Vec<T>, StoreError> {
        stream::iter(futs)
            .buffer_unordered(MAX_IN_FLIGHT)
            .try_collect()
            .await
    }

    // --- apply, phase 1: messages -------------------------------------------------------------

    async fn insert_messages(&self, msgs: Vec<&ServerEvent>) -> Result<(), StoreError> {
        type Values<'a> = (
            &'a str,
            i64,
            i64,
            i64,
            &'a str,
            &'a str,
            &'a str,
            CqlTimestamp,
            Option<i64>,
            i64,
        );
        // One unlogged batch per partition: a single-partition batch is applied as one
        // mutation by its replicas, with no batch log.
        let mut partitions: BTreeMap<(&str, i64), Vec<Values<'_>>> = BTreeMap::new();
        let mut ids = Vec::new();
        let mut heads: HashMap<&RoomId, u64> = HashMap::new();
        for ev in &msgs {
            if let ServerEvent::Message {
                seq,
                room,
                id,
                user,
                content,
                ts: at,
                reply_to,
                ..
            } = ev
            {
                partitions
                    .entry((room.as_str(), bucket_of(*seq)))
                    .or_default()
                    .push((
                        room.as_str(),
                        bucket_of(*seq),
                        seq_db(*seq),
                        id_db(*id),
                        user.id.as_str(),
                        user.name.as_str(),
                        content.as_str(),
                        ts(*at),
                        reply_to.map(id_db),
                        seq_db(*seq),
                    ));
                ids.push((room, *id, *seq));
                let head = heads.entry(room).or_default();
                *head = (*head).max(*seq);
            }
        }
        let batches: Vec<Vec<Values<'_>>> = partitions
            .into_values()
            .flat_map(|rows| {
                rows.chunks(MAX_BATCH_STATEMENTS)
                    .map(<[_]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect();
        let writes = batches
            .into_iter()
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
        // The id index and the heads only after the rows: whoever finds an id or a head can
        // read the message it points to.
        let writes = ids
            .into_iter()
            .map(|(room, id, seq)| {
                self.exec_drop(
                    &self.ps().insert_message_id,
                    (room.as_str(), id_db(id), seq_db(seq), seq_db(seq)),
                )
            })
            .collect();
        self.each(writes).await?;
        let rooms: Vec<&RoomId> = heads.keys().copied().collect();
        let writes = heads
            .into_iter()
            .map(|(room, seq)| {
                self.exec_drop(
                    &self.ps().bump_head,
                    (seq_db(seq), seq_db(seq), room.as_str()),
                )
            })
            .collect();
        self.each(writes).await?;
        let folds = rooms
            .into_iter()
            .map(|room| self.fold_pending(room).boxed())
            .collect();
        self.each(folds).await.map(drop)
    }

    /// Folds edits/deletes that overtook their message into the message, once it exists.
    async fn fold_pending(&self, room: &RoomId) -> Result<(), StoreError> {
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

    // --- apply, phase 2: everything that refers to a message ---------------------------------

    async fn write_edit(
        &self,
        room: &RoomId,
        msg_seq: u64,
        seq: u64,
        content: &str,
        edited_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.exec(
            &self.ps().edit_message,
            (
                seq_db(seq),
                content,
                ts(edited_at),
                room.as_str(),
                bucket_of(msg_seq),
                seq_db(msg_seq),
            ),
        )
        .await
        .map(drop)
    }

    async fn write_tombstone(
        &self,
        room: &RoomId,
        msg_seq: u64,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.exec(
            &self.ps().tombstone_message,
            (
                seq_db(seq),
                room.as_str(),
                bucket_of(msg_seq),
                seq_db(msg_seq),
            ),
        )
        .await
        .map(drop)
    }

    async fn apply_mod(&self, ev: &ServerEvent) -> Result<(), StoreError> {
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
        let writes = mods
            .into_iter()
            .map(|ev| self.apply_mod(ev).boxed())
            .collect();
        self.each(writes).await.map(drop)
    }

    async fn messages(&self, room: &RoomId, page: Page) -> Result<Vec<MessageView>, StoreError> {
        let Some(head) = self.head(room).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        match page {
            Page::Before { before, limit } => {
                let limit = limit as usize;
                // Exclusive upper bound; nothing is stored above the head.
                let upper = before.map_or(head + 1, |b| b.min(head + 1));
                if upper <= 1 || limit == 0 {
                    return Ok(out);
                }
                let mut bucket = (upper - 1) / BUCKET_SIZE;
                loop {
                    let want = (limit - out.len()).min(i32::MAX as usize) as i32;
                    let rows: Vec<MessageRow> = self
                        .rows(
                            &self.ps().select_before,
                            (room.as_str(), seq_db(bucket), seq_db(upper), want),
                        )
                        .await?;
                    out.extend(rows.into_iter().filter_map(|r| message_view(room, r)));
                    if out.len() >= limit || bucket == 0 {
                        break;
                    }
                    bucket -= 1;
                }
            }
            Page::After { after, limit } => {
                let limit = limit as usize;
                if after >= head || limit == 0 {
                    return Ok(out);
                }
                let mut bucket = (after + 1) / BUCKET_SIZE;
                while bucket <= head / BUCKET_SIZE && out.len() < limit {
                    let want = (limit - out.len()).min(i32::MAX as usize) as i32;
                    let rows: Vec<MessageRow> = self
                        .rows(
                            &self.ps().select_after,
                            (room.as_str(), seq_db(bucket), seq_db(after), want),
                        )
                        .await?;
                    out.extend(rows.into_iter().filter_map(|r| message_view(room, r)));
                    bucket += 1;
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
                    info.max_members.map(|n| n.min(i32::MAX as u32) as i32),
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
        .await
        .map(drop)
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
        // A full scan of a small table (one row per room), then one COUNT per room, bounded
        // in flight. Listings are cheap enough at thousands of rooms; callers may cache.
        let rows: Vec<RoomRow> = self.all_rows(&self.ps().select_rooms, ()).await?;
        let live: Vec<RoomInfo> = rows.into_iter().filter_map(room_info).collect();
        let mut out: Vec<(RoomInfo, u64)> = stream::iter(live)
            .map(|info| async move {
                let counted: Vec<(i64,)> = self
                    .rows(&self.ps().count_members, (info.id.as_str(),))
                    .await?;
                let n = counted.first().map_or(0, |(n,)| *n).max(0) as u64;
                Ok::<_, StoreError>((info, n))
            })
            .buffer_unordered(MAX_IN_FLIGHT)
            .try_collect()
            .await?;
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
        // Read first to keep `joined_at` on a role change (an INSERT would overwrite it).
        let joined_at = self
            .member(room, &user.id)
            .await?
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
        .await
        .map(drop)
    }

    async fn remove_member(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.exec(&self.ps().delete_member, (room.as_str(), user))
            .await
            .map(drop)
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
        let until = if muted { until.map(ts) } else { None };
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
