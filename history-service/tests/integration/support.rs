//! Shared test helpers: event builders, polling with a deadline, a throwaway redis-server,
//! an in-process history service on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use history_service::consumer::ConsumerConfig;
use history_service::server::{self, RunOptions};
use history_service::store::sqlite::SqliteStore;
use history_service::{HistoryApi, Store};
use proto::auth::{KeyConfig, Verifier};
use proto::rooms::{MessageView, RoomInfo, Visibility};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use tokio::sync::oneshot;

/// A unique-enough suffix so tests sharing one database (ScyllaDB) never share rooms.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{prefix}-{:x}-{:x}-{}",
        std::process::id(),
        nanos % 0xffff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn room(prefix: &str) -> RoomId {
    RoomId::new(unique(prefix)).expect("valid room id")
}

pub fn user(id: &str) -> UserRef {
    UserRef {
        id: id.into(),
        name: format!("{id} name"),
    }
}

/// A fixed base time so expectations are exact; seq `n` happened at `t(n)`.
pub fn t(n: u64) -> Timestamp {
    Timestamp(1_767_225_600_000 + n as i64 * 1000)
}

/// The id of the message at `seq` in `room`. Message ids are unique across rooms (they are
/// the primary key), so they are derived from the room too; and ordered like seqs.
pub fn mid(room: &RoomId, seq: u64) -> MessageId {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut h);
    MessageId(((h.finish() & 0x7f_ffff) << 40) | seq)
}

pub fn msg(room: &RoomId, seq: u64, author: &str) -> ServerEvent {
    ServerEvent::Message {
        seq,
        room: room.clone(),
        id: mid(room, seq),
        user: user(author),
        content: format!("message {seq}"),
        ts: t(seq),
        reply_to: None,
        client_msg_id: Some(format!("c{seq}")),
    }
}

pub fn edit(room: &RoomId, id: MessageId, seq: u64, content: &str) -> ServerEvent {
    ServerEvent::MessageEdited {
        seq,
        room: room.clone(),
        id,
        content: content.into(),
        edited_at: t(seq),
    }
}

pub fn delete(room: &RoomId, id: MessageId, seq: u64, by: &str) -> ServerEvent {
    ServerEvent::MessageDeleted {
        seq,
        room: room.clone(),
        id,
        by: user(by),
    }
}

/// The view of a fresh message `msg(room, seq, author)` would be stored as.
pub fn view(room: &RoomId, seq: u64, author: &str) -> MessageView {
    MessageView {
        room: room.clone(),
        id: mid(room, seq),
        seq,
        user: user(author),
        content: Some(format!("message {seq}")),
        ts: t(seq),
        reply_to: None,
        edited_at: None,
        deleted: false,
    }
}

pub fn pin(room: &RoomId, msg_seq: u64, seq: u64, by: &str) -> ServerEvent {
    ServerEvent::Pinned {
        seq,
        room: room.clone(),
        message: view(room, msg_seq, "author"),
        by: user(by),
        pinned_at: t(seq),
    }
}

pub fn unpin(room: &RoomId, id: MessageId, seq: u64, by: &str) -> ServerEvent {
    ServerEvent::Unpinned {
        seq,
        room: room.clone(),
        id,
        by: user(by),
    }
}

pub fn receipt(room: &RoomId, who: &str, seq: u64) -> ServerEvent {
    ServerEvent::Receipt {
        room: room.clone(),
        user: user(who),
        seq,
    }
}

pub fn room_info(id: &RoomId, visibility: Visibility) -> RoomInfo {
    RoomInfo {
        id: id.clone(),
        name: format!("Room {id}"),
        topic: "a topic".into(),
        visibility,
        max_members: Some(100),
        members_can_pin: false,
        owner: None,
        created_at: t(0),
    }
}

/// Polls `check` every 20 ms until it returns `Some` or `within` passes (then panics with
/// `what`). For conditions reached by other tasks or processes: never a fixed sleep.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private `redis-server` (no persistence) on a free port; killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

/// The persistence stream a service with the default partition count reads `room`'s events
/// from (the gateway appends them there).
pub fn persist_stream(room: &RoomId) -> String {
    use history_service::{partitions, redis_settings::DEFAULT_SINGLE_PARTITIONS};
    partitions::stream(partitions::of(room.as_str(), DEFAULT_SINGLE_PARTITIONS))
}

impl RedisServer {
    pub async fn start() -> Self {
        // A port freed a moment ago can be taken by someone else before redis binds it:
        // try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (apt-get install redis-server)");
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: port taken; next attempt
                }
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        return Self { child, port };
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Settings for a consumer of this server's persistence streams, with `partitions`.
    pub fn settings(&self, partitions: u16) -> history_service::redis_settings::RedisSettings {
        history_service::redis_settings::RedisSettings::parse(
            "single",
            &self.url(),
            Some(partitions),
            0,
            500,
        )
        .unwrap()
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dev-key verifier (tokens signed with `proto::auth::DEV_SECRET`).
pub fn dev_verifier() -> Verifier {
    Verifier::new(&KeyConfig::Dev, None, None).unwrap()
}

pub fn token(sub: &str) -> String {
    proto::auth::sign_hs256(
        proto::auth::DEV_SECRET,
        &proto::auth::claims(sub, &format!("{sub} name"), 600),
    )
}

pub fn admin_token(sub: &str) -> String {
    let mut c = proto::auth::claims(sub, sub, 600);
    c.roles = vec!["admin".into()];
    proto::auth::sign_hs256(proto::auth::DEV_SECRET, &c)
}

/// A history service (public + internal API, health, metrics) running in this process on
/// 127.0.0.1:0 over a temporary SQLite store. Stops when dropped.
pub struct Service {
    pub addr: SocketAddr,
    pub store: Arc<SqliteStore>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    pub async fn start(internal_token: Option<&str>) -> Self {
        let store = Arc::new(SqliteStore::open_temp().unwrap());
        let api = Arc::new(
            HistoryApi::new(store.clone(), dev_verifier())
                .with_internal_token(internal_token.map(str::to_owned)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(
                listener,
                api,
                RunOptions {
                    redis: None,
                    consumer: ConsumerConfig::new("unused"),
                    drain: Duration::from_secs(1),
                    internal: None,
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
        Self {
            addr,
            store,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Messages of a room, newest first, as `Page::Before` reads them (everything up to 1000).
pub async fn all_messages<S: Store>(store: &S, room: &RoomId) -> Vec<MessageView> {
    store
        .messages(
            room,
            history_service::store::Page::Before {
                before: None,
                limit: 1000,
            },
        )
        .await
        .unwrap()
}
