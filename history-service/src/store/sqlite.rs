//! [`SqliteStore`]: the embedded default. One file, WAL mode, one writer thread, a few readers.
//!
//! **Why one writer thread.** SQLite allows one writer at a time; many async tasks each opening
//! a write transaction would just queue on the file lock (and fsync once each). Instead every
//! write is a request on a bounded channel to one thread, which drains what is queued, runs it
//! all in ONE transaction (each request in its own savepoint, so one failing request does not
//! undo the others) and answers each request only after the commit. Under load a batch of
//! hundreds of writes costs one commit; idle, a single write commits at once.
//!
//! **Why WAL + `synchronous=NORMAL`.** Readers never block the writer and vice versa. With
//! NORMAL a commit survives a crash of the process (the usual failure); only a power loss can
//! drop the last commits, the trade-off every WAL deployment of SQLite makes for throughput.
//!
//! **Readers** are a small fixed pool of connections used through `spawn_blocking`, so a slow
//! query never stalls the async runtime and at most [`READERS`] run at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::rooms::{MemberInfo, MessageView, PinView, ReadMarker, Role, RoomInfo, Visibility};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Ban, Page, RoomAccess, RoomState, Store, StoreError, MUTED_FOREVER};

/// Read connections in the pool.
pub const READERS: usize = 4;
/// Write requests waiting for the writer at most; more make writers wait (backpressure).
const WRITE_QUEUE: usize = 1024;
/// Write requests committed in one transaction at most.
const MAX_BATCH: usize = 256;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bumped when the schema changes; a file from a newer build is refused rather than misread.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
-- Message ids are 64-bit; stored bit-cast to INTEGER (i64). `mod_seq` is the seq of the newest
-- event that wrote `content` (the message itself, an edit or the delete): older replays lose.
CREATE TABLE IF NOT EXISTS messages (
    id        INTEGER PRIMARY KEY,
    room      TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    user_id   TEXT    NOT NULL,
    user_name TEXT    NOT NULL,
    content   TEXT,
    ts        INTEGER NOT NULL,
    reply_to  INTEGER,
    edited_at INTEGER,
    deleted   INTEGER NOT NULL DEFAULT 0,
    mod_seq   INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_room_seq ON messages (room, seq);

-- Edits/deletes that arrived before their message (a reclaimed stream batch); folded in when
-- the message is inserted.
CREATE TABLE IF NOT EXISTS pending_mods (
    room       TEXT    NOT NULL,
    id         INTEGER NOT NULL,
    edit_seq   INTEGER NOT NULL DEFAULT 0,
    content    TEXT,
    edited_at  INTEGER,
    delete_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;

-- One row per message ever pinned; `pinned` and `seq` hold the state of the newest pin/unpin.
CREATE TABLE IF NOT EXISTS pins (
    room       TEXT    NOT NULL,
    message_id INTEGER NOT NULL,
    by_id      TEXT    NOT NULL,
    by_name    TEXT    NOT NULL,
    pinned_at  INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    pinned     INTEGER NOT NULL,
    PRIMARY KEY (room, message_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS read_markers (
    room    TEXT    NOT NULL,
    user_id TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (room, user_id)
) WITHOUT ROWID;

-- The highest seq of any stored event applied per room, room-state events included (the
-- projection keeps no other trace of those): a broker that lost its data continues above it.
CREATE TABLE IF NOT EXISTS room_seqs (
    room     TEXT    PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

-- Deleted rooms keep their row (deleted = 1) so the id is never reused.
CREATE TABLE IF NOT EXISTS rooms (
    id              TEXT    PRIMARY KEY,
    name            TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    visibility      TEXT    NOT NULL,
    max_members     INTEGER,
    members_can_pin INTEGER NOT NULL,
    owner           TEXT,
    created_at      INTEGER NOT NULL,
    deleted         INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS members (
    room        TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    user_name   TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    muted       INTEGER NOT NULL DEFAULT 0,
    muted_until INTEGER,
    joined_at   INTEGER NOT NULL,
    PRIMARY KEY (room, user_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS bans (
    room      TEXT    NOT NULL,
    user_id   TEXT    NOT NULL,
    user_name TEXT    NOT NULL,
    by_id     TEXT    NOT NULL,
    by_name   TEXT    NOT NULL,
    reason    TEXT,
    until     INTEGER,
    at        INTEGER NOT NULL,
    PRIMARY KEY (room, user_id)
) WITHOUT ROWID;
"#;

/// The embedded store. Cheap to clone (one shared writer thread and reader pool); the writer
/// thread stops, after finishing its batch, when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Option` only so that `Drop` can close the channel before joining the writer.
    tx: Option<mpsc::Sender<WriteReq>>,
    writer: Option<std::thread::JoinHandle<()>>,
    readers: Arc<ReadPool>,
    /// Declared last: removes a temporary database after the connections are closed.
    _temp: Option<TempFiles>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            // The writer finishes its current batch and exits when the channel closes; joining
            // makes "drop the store, open the file again" safe (restart tests, shutdown).
            let _ = writer.join();
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, its parent directory included, and
    /// creates the schema.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_inner(path.as_ref().to_path_buf(), None)
    }

    /// A store in a fresh file under the system temp directory, removed when the store is
    /// dropped. For tests and throwaway runs.
    pub fn open_temp() -> Result<Self, StoreError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "history-{}-{}-{nanos}.db",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        Self::open_inner(path.clone(), Some(TempFiles(path)))
    }

    fn open_inner(path: PathBuf, temp: Option<TempFiles>) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let open_err = |e: rusqlite::Error| {
            StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))
        };
        let writer = Connection::open(&path).map_err(open_err)?;
        writer.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        let mode: String = writer
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Internal(format!(
                "{} does not support WAL (journal_mode={mode})",
                path.display()
            )));
        }
        writer
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        let version: i64 = writer
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Internal(format!(
                "{} has schema version {version}, newer than this build ({SCHEMA_VERSION})",
                path.display()
            )));
        }
        writer.execute_batch(SCHEMA).map_err(db_err)?;
        writer
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_err)?;

        let mut conns = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            conns.push(open_reader(&path)?);
        }
        let readers = Arc::new(ReadPool {
            path: path.clone(),
            conns: Mutex::new(conns),
            permits: Arc::new(Semaphore::new(READERS)),
        });

        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let handle = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Some(tx),
                writer: Some(handle),
                readers,
                _temp: temp,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.readers.path
    }

    async fn write(&self, op: WriteOp) -> Result<(), StoreError> {
        let stopped = || StoreError::Unavailable("the sqlite writer stopped".into());
        let tx = self.inner.tx.as_ref().ok_or_else(stopped)?;
        let (reply, done) = oneshot::channel();
        tx.send(WriteReq { op, reply })
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pool = self.inner.readers.clone();
        let permit = pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("reader pool closed".into()))?;
        // The connection goes back to the pool inside the blocking task, so a caller that
        // stops waiting (a dropped request) never loses a connection.
        tokio::task::spawn_blocking(move || {
            let conn = match pool.take() {
                Some(c) => c,
                None => open_reader(&pool.path)?,
            };
            let out = f(&conn).map_err(db_err);
            pool.give(conn);
            drop(permit);
            out
        })
        .await
        .map_err(|e| StoreError::Internal(format!("reader task failed: {e}")))?
    }
}

/// Removes a temporary database (and its WAL files) on drop.
struct TempFiles(PathBuf);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

struct ReadPool {
    path: PathBuf,
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    // A std Mutex on purpose: held for a push/pop only, never across an await.
    fn take(&self) -> Option<Connection> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn give(&self, conn: Connection) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    // Readers never write: a bug that tries fails loudly instead of racing the writer.
    conn.pragma_update(None, "query_only", true)
        .map_err(db_err)?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------------
// Errors and conversions

fn db_err(e: rusqlite::Error) -> StoreError {
    db_err_ref(&e)
}

fn db_err_ref(e: &rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::DiskFull
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::OutOfMemory
                    | C::FileLockingProtocolFailed
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(format!("sqlite: {e}")),
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// Message ids are u64 on the wire and i64 in SQLite: a bit-cast both ways, so every id
/// round-trips (ids from [`proto::ids::MessageIdGen`] fit in 63 bits anyway).
fn id_db(id: MessageId) -> i64 {
    id.0 as i64
}

fn id_from(v: i64) -> MessageId {
    MessageId(v as u64)
}

fn seq_db(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn conv_err(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, msg.into())
}

fn room_id(s: String) -> rusqlite::Result<RoomId> {
    RoomId::new(s.clone()).map_err(|_| conv_err(format!("bad room id {s:?}")))
}

const MESSAGE_COLS: &str =
    "id, room, seq, user_id, user_name, content, ts, reply_to, edited_at, deleted";

fn message_row(r: &Row<'_>) -> rusqlite::Result<MessageView> {
    let deleted: bool = r.get(9)?;
    Ok(MessageView {
        id: id_from(r.get(0)?),
        room: room_id(r.get(1)?)?,
        seq: r.get::<_, i64>(2)? as u64,
        user: UserRef {
            id: r.get(3)?,
            name: r.get(4)?,
        },
        // A tombstone never shows content, whatever a late edit wrote.
        content: if deleted { None } else { r.get(5)? },
        ts: Timestamp(r.get(6)?),
        reply_to: r.get::<_, Option<i64>>(7)?.map(id_from),
        edited_at: r.get::<_, Option<i64>>(8)?.map(Timestamp),
        deleted,
    })
}

const ROOM_COLS: &str =
    "id, name, topic, visibility, max_members, members_can_pin, owner, created_at";

fn room_row(r: &Row<'_>) -> rusqlite::Result<RoomInfo> {
    let vis: String = r.get(3)?;
    Ok(RoomInfo {
        id: room_id(r.get(0)?)?,
        name: r.get(1)?,
        topic: r.get(2)?,
        visibility: Visibility::parse(&vis)
            .ok_or_else(|| conv_err(format!("bad visibility {vis:?}")))?,
        max_members: r.get::<_, Option<i64>>(4)?.map(|n| n as u32),
        members_can_pin: r.get(5)?,
        owner: r.get(6)?,
        created_at: Timestamp(r.get(7)?),
    })
}

const MEMBER_COLS: &str = "user_id, user_name, role, muted, muted_until, joined_at";

fn member_row(r: &Row<'_>) -> rusqlite::Result<MemberInfo> {
    let role: String = r.get(2)?;
    let muted: bool = r.get(3)?;
    let until: Option<i64> = r.get(4)?;
    Ok(MemberInfo {
        user: UserRef {
            id: r.get(0)?,
            name: r.get(1)?,
        },
        role: Role::parse(&role).ok_or_else(|| conv_err(format!("bad role {role:?}")))?,
        muted_until: muted.then(|| until.map_or(MUTED_FOREVER, Timestamp)),
        joined_at: Timestamp(r.get(5)?),
    })
}

const BAN_COLS: &str = "user_id, user_name, by_id, by_name, reason, until, at";

fn ban_row(r: &Row<'_>) -> rusqlite::Result<Ban> {
    Ok(Ban {
        user: UserRef {
            id: r.get(0)?,
            name: r.get(1)?,
        },
        by: UserRef {
            id: r.get(2)?,
            name: r.get(3)?,
        },
        reason: r.get(4)?,
        until: r.get::<_, Option<i64>>(5)?.map(Timestamp),
        at: Timestamp(r.get(6)?),
    })
}

// ---------------------------------------------------------------------------------------------
// The writer thread

enum WriteOp {
    Apply(Vec<ServerEvent>),
    CreateRoom(RoomInfo, UserRef),
    UpdateRoom(RoomInfo),
    DeleteRoom(RoomId),
    PutMember(RoomId, UserRef, Role),
    RemoveMember(RoomId, String),
    SetMute(RoomId, String, Option<Timestamp>, bool),
    PutBan(RoomId, Ban),
    RemoveBan(RoomId, String),
}

struct WriteReq {
    op: WriteOp,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Why one request failed: an answer for the caller, or a database error.
enum OpError {
    Answer(StoreError),
    Db(rusqlite::Error),
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        OpError::Db(e)
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteReq>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut conn, &batch);
        // Answer only now: every Ok below is on disk.
        for (req, result) in batch.drain(..).zip(results) {
            let _ = req.reply.send(result);
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &[WriteReq]) -> Vec<Result<(), StoreError>> {
    let run = |conn: &mut Connection| -> rusqlite::Result<Vec<Result<(), StoreError>>> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(batch.len());
        for req in batch {
            let sp = tx.savepoint()?;
            match run_op(&sp, &req.op) {
                Ok(()) => {
                    sp.commit()?;
                    out.push(Ok(()));
                }
                // Dropping the savepoint rolls this request back and keeps the others.
                Err(OpError::Answer(e)) => out.push(Err(e)),
                Err(OpError::Db(e)) => {
                    tracing::warn!(error = %e, "sqlite write request failed");
                    out.push(Err(db_err(e)));
                }
            }
        }
        tx.commit()?;
        Ok(out)
    };
    match run(conn) {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(error = %e, requests = batch.len(), "sqlite commit failed");
            batch.iter().map(|_| Err(db_err_ref(&e))).collect()
        }
    }
}

fn run_op(c: &Connection, op: &WriteOp) -> Result<(), OpError> {
    match op {
        WriteOp::Apply(events) => {
            for ev in events {
                apply_event(c, ev)?;
            }
            for (room, seq) in super::last_seqs(events) {
                c.prepare_cached(
                    "INSERT INTO room_seqs (room, last_seq) VALUES (?1, ?2)
                     ON CONFLICT (room) DO UPDATE SET last_seq = excluded.last_seq
                     WHERE excluded.last_seq > room_seqs.last_seq",
                )?
                .execute(params![room.as_str(), seq_db(seq)])?;
            }
            Ok(())
        }
        WriteOp::CreateRoom(info, owner) => {
            let inserted = c
                .prepare_cached(
                    "INSERT INTO rooms (id, name, topic, visibility, max_members, members_can_pin,
                                        owner, created_at, deleted)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0)",
                )?
                .execute(params![
                    info.id.as_str(),
                    info.name,
                    info.topic,
                    info.visibility.as_str(),
                    info.max_members.map(i64::from),
                    info.members_can_pin,
                    owner.id,
                    info.created_at.0
                ]);
            match inserted {
                Err(e) if is_constraint(&e) => return Err(OpError::Answer(StoreError::Conflict)),
                other => other?,
            };
            upsert_member(c, &info.id, owner, Role::Owner, info.created_at)?;
            Ok(())
        }
        WriteOp::UpdateRoom(info) => {
            let n = c
                .prepare_cached(
                    "UPDATE rooms SET name = ?2, topic = ?3, visibility = ?4, max_members = ?5,
                                      members_can_pin = ?6
                     WHERE id = ?1 AND deleted = 0",
                )?
                .execute(params![
                    info.id.as_str(),
                    info.name,
                    info.topic,
                    info.visibility.as_str(),
                    info.max_members.map(i64::from),
                    info.members_can_pin
                ])?;
            found(n)
        }
        WriteOp::DeleteRoom(room) => {
            let n = c
                .prepare_cached("UPDATE rooms SET deleted = 1 WHERE id = ?1")?
                .execute([room.as_str()])?;
            found(n)
        }
        WriteOp::PutMember(room, user, role) => {
            require_room(c, room)?;
            upsert_member(c, room, user, *role, Timestamp::now())?;
            Ok(())
        }
        WriteOp::RemoveMember(room, user) => {
            c.prepare_cached("DELETE FROM members WHERE room = ?1 AND user_id = ?2")?
                .execute([room.as_str(), user])?;
            Ok(())
        }
        WriteOp::SetMute(room, user, until, muted) => {
            let until = if *muted { until.map(|t| t.0) } else { None };
            let n = c
                .prepare_cached(
                    "UPDATE members SET muted = ?3, muted_until = ?4
                     WHERE room = ?1 AND user_id = ?2",
                )?
                .execute(params![room.as_str(), user, muted, until])?;
            found(n)
        }
        WriteOp::PutBan(room, ban) => {
            require_room(c, room)?;
            c.prepare_cached(
                "INSERT INTO bans (room, user_id, user_name, by_id, by_name, reason, until, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (room, user_id) DO UPDATE SET
                     user_name = excluded.user_name, by_id = excluded.by_id,
                     by_name = excluded.by_name, reason = excluded.reason,
                     until = excluded.until, at = excluded.at",
            )?
            .execute(params![
                room.as_str(),
                ban.user.id,
                ban.user.name,
                ban.by.id,
                ban.by.name,
                ban.reason,
                ban.until.map(|t| t.0),
                ban.at.0
            ])?;
            Ok(())
        }
        WriteOp::RemoveBan(room, user) => {
            c.prepare_cached("DELETE FROM bans WHERE room = ?1 AND user_id = ?2")?
                .execute([room.as_str(), user])?;
            Ok(())
        }
    }
}

fn found(changed: usize) -> Result<(), OpError> {
    if changed == 0 {
        Err(OpError::Answer(StoreError::NotFound))
    } else {
        Ok(())
    }
}

fn require_room(c: &Connection, room: &RoomId) -> Result<(), OpError> {
    let live: Option<i64> = c
        .prepare_cached("SELECT 1 FROM rooms WHERE id = ?1 AND deleted = 0")?
        .query_row([room.as_str()], |r| r.get(0))
        .optional()?;
    match live {
        Some(_) => Ok(()),
        None => Err(OpError::Answer(StoreError::NotFound)),
    }
}

fn upsert_member(
    c: &Connection,
    room: &RoomId,
    user: &UserRef,
    role: Role,
    joined_at: Timestamp,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO members (room, user_id, user_name, role, muted, muted_until, joined_at)
         VALUES (?1, ?2, ?3, ?4, 0, NULL, ?5)
         ON CONFLICT (room, user_id) DO UPDATE SET
             user_name = excluded.user_name, role = excluded.role",
    )?
    .execute(params![
        room.as_str(),
        user.id,
        user.name,
        role.as_str(),
        joined_at.0
    ])?;
    Ok(())
}

/// One event of the projection. Every statement is guarded by the event's seq, so applying
/// events again, or older ones after newer ones, converges to the same rows.
fn apply_event(c: &Connection, ev: &ServerEvent) -> rusqlite::Result<()> {
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
        } => {
            if *seq == 0 {
                return skip_unsequenced("message", room, *id);
            }
            insert_message(c, *seq, room, *id, user, content, *ts, *reply_to)
        }
        ServerEvent::MessageEdited {
            seq,
            room,
            id,
            content,
            edited_at,
        } => {
            if *seq == 0 {
                return skip_unsequenced("message_edited", room, *id);
            }
            edit_message(c, *seq, room, *id, content, *edited_at)
        }
        ServerEvent::MessageDeleted { seq, room, id, by } => {
            if *seq == 0 {
                return skip_unsequenced("message_deleted", room, *id);
            }
            delete_message(c, *seq, room, *id, by)
        }
        ServerEvent::Pinned {
            seq,
            room,
            message,
            by,
            pinned_at,
        } => {
            if *seq == 0 {
                return skip_unsequenced("pinned", room, message.id);
            }
            set_pin(c, *seq, room, message.id, by, *pinned_at, true)
        }
        ServerEvent::Unpinned { seq, room, id, by } => {
            if *seq == 0 {
                return skip_unsequenced("unpinned", room, *id);
            }
            set_pin(c, *seq, room, *id, by, Timestamp(0), false)
        }
        ServerEvent::Receipt { room, user, seq } => {
            if *seq == 0 {
                return Ok(());
            }
            c.prepare_cached(
                "INSERT INTO read_markers (room, user_id, seq, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (room, user_id) DO UPDATE SET seq = excluded.seq, at = excluded.at
                 WHERE excluded.seq > read_markers.seq",
            )?
            .execute(params![
                room.as_str(),
                user.id,
                seq_db(*seq),
                Timestamp::now().0
            ])?;
            Ok(())
        }
        _ => Ok(()),
    }
}

fn skip_unsequenced(kind: &str, room: &RoomId, id: MessageId) -> rusqlite::Result<()> {
    tracing::warn!(kind, %room, %id, "stored event without seq skipped");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn insert_message(
    c: &Connection,
    seq: u64,
    room: &RoomId,
    id: MessageId,
    user: &UserRef,
    content: &str,
    ts: Timestamp,
    reply_to: Option<MessageId>,
) -> rusqlite::Result<()> {
    let n = c
        .prepare_cached(
            "INSERT OR IGNORE INTO messages
                 (id, room, seq, user_id, user_name, content, ts, reply_to, edited_at, deleted, mod_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, 0, ?3)",
        )?
        .execute(params![
            id_db(id),
            room.as_str(),
            seq_db(seq),
            user.id,
            user.name,
            content,
            ts.0,
            reply_to.map(id_db)
        ])?;
    if n == 0 {
        // A replay (same id) is expected; a different id at the same seq is a broken invariant
        // upstream (seq assigned twice): keep the first, report it.
        let at_seq: Option<i64> = c
            .prepare_cached("SELECT id FROM messages WHERE room = ?1 AND seq = ?2")?
            .query_row(params![room.as_str(), seq_db(seq)], |r| r.get(0))
            .optional()?;
        if let Some(other) = at_seq.filter(|&o| o != id_db(id)) {
            super::seq_conflict(room, seq, id_from(other), id);
        }
        return Ok(());
    }
    // Edits or a delete that overtook this message are folded in now.
    let pending = c
        .prepare_cached(
            "SELECT edit_seq, content, edited_at, delete_seq FROM pending_mods
             WHERE room = ?1 AND id = ?2",
        )?
        .query_row(params![room.as_str(), id_db(id)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    if let Some((edit_seq, content, edited_at, delete_seq)) = pending {
        c.prepare_cached("DELETE FROM pending_mods WHERE room = ?1 AND id = ?2")?
            .execute(params![room.as_str(), id_db(id)])?;
        if edit_seq > 0 {
            edit_message(
                c,
                edit_seq as u64,
                room,
                id,
                content.as_deref().unwrap_or_default(),
                Timestamp(edited_at.unwrap_or(0)),
            )?;
        }
        if delete_seq > 0 {
            tombstone(c, delete_seq as u64, room, id)?;
        }
    }
    Ok(())
}

fn message_exists(c: &Connection, room: &RoomId, id: MessageId) -> rusqlite::Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM messages WHERE id = ?1 AND room = ?2")?
            .query_row(params![id_db(id), room.as_str()], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

fn edit_message(
    c: &Connection,
    seq: u64,
    room: &RoomId,
    id: MessageId,
    content: &str,
    edited_at: Timestamp,
) -> rusqlite::Result<()> {
    // A delete is final, and only a newer edit replaces content.
    let n = c
        .prepare_cached(
            "UPDATE messages SET content = ?3, edited_at = ?4, mod_seq = ?5
             WHERE id = ?1 AND room = ?2 AND deleted = 0 AND mod_seq < ?5",
        )?
        .execute(params![
            id_db(id),
            room.as_str(),
            content,
            edited_at.0,
            seq_db(seq)
        ])?;
    if n == 0 && !message_exists(c, room, id)? {
        c.prepare_cached(
            "INSERT INTO pending_mods (room, id, edit_seq, content, edited_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (room, id) DO UPDATE SET edit_seq = excluded.edit_seq,
                 content = excluded.content, edited_at = excluded.edited_at
             WHERE excluded.edit_seq > pending_mods.edit_seq",
        )?
        .execute(params![
            room.as_str(),
            id_db(id),
            seq_db(seq),
            content,
            edited_at.0
        ])?;
    }
    Ok(())
}

fn tombstone(c: &Connection, seq: u64, room: &RoomId, id: MessageId) -> rusqlite::Result<usize> {
    c.prepare_cached(
        "UPDATE messages SET content = NULL, deleted = 1, mod_seq = MAX(mod_seq, ?3)
         WHERE id = ?1 AND room = ?2",
    )?
    .execute(params![id_db(id), room.as_str(), seq_db(seq)])
}

fn delete_message(
    c: &Connection,
    seq: u64,
    room: &RoomId,
    id: MessageId,
    by: &UserRef,
) -> rusqlite::Result<()> {
    if tombstone(c, seq, room, id)? == 0 {
        c.prepare_cached(
            "INSERT INTO pending_mods (room, id, delete_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (room, id) DO UPDATE SET
                 delete_seq = MAX(pending_mods.delete_seq, excluded.delete_seq)",
        )?
        .execute(params![room.as_str(), id_db(id), seq_db(seq)])?;
    }
    // A deleted message is unpinned as of the delete's seq.
    set_pin(c, seq, room, id, by, Timestamp(0), false)
}

fn set_pin(
    c: &Connection,
    seq: u64,
    room: &RoomId,
    id: MessageId,
    by: &UserRef,
    pinned_at: Timestamp,
    pinned: bool,
) -> rusqlite::Result<()> {
    // The newest pin/unpin of a message wins; an unpin keeps who pinned it and when.
    let sql = if pinned {
        "INSERT INTO pins (room, message_id, by_id, by_name, pinned_at, seq, pinned)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)
         ON CONFLICT (room, message_id) DO UPDATE SET by_id = excluded.by_id,
             by_name = excluded.by_name, pinned_at = excluded.pinned_at, seq = excluded.seq,
             pinned = 1
         WHERE excluded.seq > pins.seq"
    } else {
        "INSERT INTO pins (room, message_id, by_id, by_name, pinned_at, seq, pinned)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)
         ON CONFLICT (room, message_id) DO UPDATE SET seq = excluded.seq, pinned = 0
         WHERE excluded.seq > pins.seq"
    };
    c.prepare_cached(sql)?.execute(params![
        room.as_str(),
        id_db(id),
        by.id,
        by.name,
        pinned_at.0,
        seq_db(seq)
    ])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reads

fn load_room(c: &Connection, room: &str) -> rusqlite::Result<Option<RoomInfo>> {
    c.prepare_cached(&format!(
        "SELECT {ROOM_COLS} FROM rooms WHERE id = ?1 AND deleted = 0"
    ))?
    .query_row([room], room_row)
    .optional()
}

impl Store for SqliteStore {
    async fn apply(&self, events: &[ServerEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Apply(events.to_vec())).await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            // Messages and pins too: a file written before `room_seqs` existed has its rooms'
            // seqs only there.
            c.prepare_cached(
                "SELECT MAX(
                     COALESCE((SELECT last_seq FROM room_seqs WHERE room = ?1), 0),
                     COALESCE((SELECT MAX(seq) FROM messages WHERE room = ?1), 0),
                     COALESCE((SELECT MAX(seq) FROM pins WHERE room = ?1), 0))",
            )?
            .query_row([room.as_str()], |r| r.get::<_, i64>(0))
            .map(|s| s.max(0) as u64)
        })
        .await
    }

    async fn messages(&self, room: &RoomId, page: Page) -> Result<Vec<MessageView>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            let (sql, cursor, limit) = match page {
                Page::Before { before, limit } => (
                    format!(
                        "SELECT {MESSAGE_COLS} FROM messages WHERE room = ?1 AND seq < ?2
                         ORDER BY seq DESC LIMIT ?3"
                    ),
                    before.map_or(i64::MAX, seq_db),
                    limit,
                ),
                Page::After { after, limit } => (
                    format!(
                        "SELECT {MESSAGE_COLS} FROM messages WHERE room = ?1 AND seq > ?2
                         ORDER BY seq ASC LIMIT ?3"
                    ),
                    seq_db(after),
                    limit,
                ),
            };
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![room.as_str(), cursor, i64::from(limit)],
                message_row,
            )?;
            rows.collect()
        })
        .await
    }

    async fn message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE id = ?1 AND room = ?2"
            ))?
            .query_row(params![id_db(id), room.as_str()], message_row)
            .optional()
        })
        .await
    }

    async fn pins(&self, room: &RoomId) -> Result<Vec<PinView>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT m.id, m.room, m.seq, m.user_id, m.user_name, m.content, m.ts, m.reply_to,
                        m.edited_at, m.deleted, p.by_id, p.by_name, p.pinned_at
                 FROM pins p JOIN messages m ON m.id = p.message_id AND m.room = p.room
                 WHERE p.room = ?1 AND p.pinned = 1 AND m.deleted = 0
                 ORDER BY p.pinned_at DESC, p.seq DESC",
            )?;
            let rows = stmt.query_map([room.as_str()], |r| {
                Ok(PinView {
                    message: message_row(r)?,
                    by: UserRef {
                        id: r.get(10)?,
                        name: r.get(11)?,
                    },
                    pinned_at: Timestamp(r.get(12)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn markers(&self, room: &RoomId) -> Result<Vec<ReadMarker>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT user_id, seq, at FROM read_markers WHERE room = ?1
                 ORDER BY seq DESC, user_id",
            )?;
            let rows = stmt.query_map([room.as_str()], |r| {
                Ok(ReadMarker {
                    user: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    at: Timestamp(r.get(2)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn marker(&self, room: &RoomId, user: &str) -> Result<Option<u64>, StoreError> {
        let (room, user) = (room.clone(), user.to_string());
        self.read(move |c| {
            c.prepare_cached("SELECT seq FROM read_markers WHERE room = ?1 AND user_id = ?2")?
                .query_row([room.as_str(), user.as_str()], |r| r.get::<_, i64>(0))
                .optional()
                .map(|seq| seq.map(|s| s as u64))
        })
        .await
    }

    async fn markers_of(&self, keys: &[(RoomId, String)]) -> Result<Vec<Option<u64>>, StoreError> {
        let keys = keys.to_vec();
        // One reader for the whole batch, one prepared statement.
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT seq FROM read_markers WHERE room = ?1 AND user_id = ?2")?;
            keys.iter()
                .map(|(room, user)| {
                    stmt.query_row([room.as_str(), user.as_str()], |r| r.get::<_, i64>(0))
                        .optional()
                        .map(|seq| seq.map(|s| s as u64))
                })
                .collect()
        })
        .await
    }

    async fn create_room(&self, info: &RoomInfo, owner: &UserRef) -> Result<(), StoreError> {
        self.write(WriteOp::CreateRoom(info.clone(), owner.clone()))
            .await
    }

    async fn update_room(&self, info: &RoomInfo) -> Result<(), StoreError> {
        self.write(WriteOp::UpdateRoom(info.clone())).await
    }

    async fn delete_room(&self, room: &RoomId) -> Result<(), StoreError> {
        self.write(WriteOp::DeleteRoom(room.clone())).await
    }

    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            let Some(info) = load_room(c, room.as_str())? else {
                return Ok(None);
            };
            let members = c
                .prepare_cached(&format!(
                    "SELECT {MEMBER_COLS} FROM members WHERE room = ?1 ORDER BY joined_at, user_id"
                ))?
                .query_map([room.as_str()], member_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let bans = c
                .prepare_cached(&format!(
                    "SELECT {BAN_COLS} FROM bans WHERE room = ?1 ORDER BY at, user_id"
                ))?
                .query_map([room.as_str()], ban_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(RoomState {
                info,
                members,
                bans,
            }))
        })
        .await
    }

    async fn rooms(&self) -> Result<Vec<(RoomInfo, u64)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT r.id, r.name, r.topic, r.visibility, r.max_members, r.members_can_pin,
                        r.owner, r.created_at,
                        (SELECT COUNT(*) FROM members m WHERE m.room = r.id)
                 FROM rooms r WHERE r.deleted = 0 ORDER BY r.id",
            )?;
            let rows = stmt.query_map([], |r| Ok((room_row(r)?, r.get::<_, i64>(8)? as u64)))?;
            rows.collect()
        })
        .await
    }

    async fn put_member(
        &self,
        room: &RoomId,
        user: &UserRef,
        role: Role,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::PutMember(room.clone(), user.clone(), role))
            .await
    }

    async fn remove_member(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.write(WriteOp::RemoveMember(room.clone(), user.to_owned()))
            .await
    }

    async fn set_mute(
        &self,
        room: &RoomId,
        user: &str,
        until: Option<Timestamp>,
        muted: bool,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::SetMute(
            room.clone(),
            user.to_owned(),
            until,
            muted,
        ))
        .await
    }

    async fn put_ban(&self, room: &RoomId, ban: &Ban) -> Result<(), StoreError> {
        self.write(WriteOp::PutBan(room.clone(), ban.clone())).await
    }

    async fn remove_ban(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.write(WriteOp::RemoveBan(room.clone(), user.to_owned()))
            .await
    }

    async fn access(&self, room: &RoomId, user: &str) -> Result<Option<RoomAccess>, StoreError> {
        let (room, user) = (room.clone(), user.to_owned());
        self.read(move |c| {
            let Some(info) = load_room(c, room.as_str())? else {
                return Ok(None);
            };
            let member = c
                .prepare_cached(&format!(
                    "SELECT {MEMBER_COLS} FROM members WHERE room = ?1 AND user_id = ?2"
                ))?
                .query_row([room.as_str(), &user], member_row)
                .optional()?;
            let ban = c
                .prepare_cached(&format!(
                    "SELECT {BAN_COLS} FROM bans WHERE room = ?1 AND user_id = ?2"
                ))?
                .query_row([room.as_str(), &user], ban_row)
                .optional()?;
            Ok(Some(RoomAccess { info, member, ban }))
        })
        .await
    }
}
