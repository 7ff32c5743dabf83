//! The persistence-stream consumer against a real `redis-server`: entries appended the way the
//! gateway appends them (to the stream of the room's partition) land in the store, survive
//! restarts and dead consumers, are kept while the store is down, and are deleted from the
//! stream once stored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use history_service::consumer::{Consumer, ConsumerConfig, ConsumerStats, GROUP};
use history_service::partitions;
use history_service::store::sqlite::SqliteStore;
use history_service::store::{Ban, Page, RoomAccess, RoomState, Store, StoreError};
use proto::rooms::{MessageView, PinView, ReadMarker, Role, RoomInfo};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use tokio::sync::oneshot;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
/// Partitions the tests' consumers read (rooms spread over them).
const PARTITIONS: u16 = 4;

/// The stream of `room`'s partition.
fn stream(room: &RoomId) -> String {
    partitions::stream(partitions::of(room.as_str(), PARTITIONS))
}

/// Appends a stored event exactly as the gateway's publish script does: the frame is
/// serialized without `seq`, the seq is put in front (`{"seq":N,` + rest), and the result is
/// `XADD chat:{pN}:persist * f <frame>` (N: the room's partition).
async fn publish(conn: &mut redis::aio::MultiplexedConnection, event: &ServerEvent, seq: u64) {
    let frame = proto::envelope::with_seq(&event.to_json(), seq);
    let room = event.room().expect("a room event");
    xadd(conn, &stream(room), &frame).await;
}

/// `XADD <stream> * f <frame>`, as the gateway's `persist` does for receipts.
async fn xadd(conn: &mut redis::aio::MultiplexedConnection, stream: &str, frame: &[u8]) {
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("f")
        .arg(frame)
        .query_async(conn)
        .await
        .unwrap();
}

/// `XGROUP CREATE <stream> history 0 MKSTREAM`, as a consumer does at start.
async fn create_group(conn: &mut redis::aio::MultiplexedConnection, stream: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await
        .unwrap();
}

/// `XREADGROUP GROUP history <consumer> STREAMS <stream> >`: what the group had not delivered
/// becomes pending for `consumer` (one that read and never acknowledged).
async fn read_as(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    consumer: &str,
) -> redis::Value {
    redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap()
}

/// A message event as the gateway builds it before publishing (seq 0: not in the JSON).
fn unsequenced(room: &RoomId, n: u64) -> ServerEvent {
    let mut event = msg(room, n, "ann");
    if let ServerEvent::Message { seq, .. } = &mut event {
        *seq = 0;
    }
    event
}

/// Entries in every partition stream.
async fn xlen(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let mut n = 0;
    for p in 0..PARTITIONS {
        n += redis::cmd("XLEN")
            .arg(partitions::stream(p))
            .query_async::<u64>(conn)
            .await
            .unwrap();
    }
    n
}

/// Pending entries of the group (all consumers) in `room`'s partition stream.
async fn pending(conn: &mut redis::aio::MultiplexedConnection, room: &RoomId) -> u64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream(room))
        .arg(GROUP)
        .query_async(conn)
        .await
        .unwrap();
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            other => panic!("XPENDING: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

/// A consumer running in a task; `stop` ends it the way SIGTERM does.
struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<ConsumerStats>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn fast(name: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(name);
    c.idle_max = Duration::from_millis(20);
    c.retry_min = Duration::from_millis(20);
    c.retry_max = Duration::from_millis(200);
    c
}

fn start<S: Store>(redis: &RedisServer, store: Arc<S>, config: ConsumerConfig) -> Running {
    let consumer = Consumer::new(redis.settings(PARTITIONS), store, config);
    let stats = consumer.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        consumer
            .run(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running { stop, task, stats }
}

async fn stored_seqs<S: Store>(store: &S, room: &RoomId) -> Vec<u64> {
    let mut v: Vec<u64> = all_messages(store, room)
        .await
        .iter()
        .map(|m| m.seq)
        .collect();
    v.sort();
    v
}

/// Waits until `room` holds exactly `want` (sorted seqs).
async fn wait_stored<S: Store>(store: &S, room: &RoomId, want: &[u64]) {
    eventually(WAIT, &format!("messages {want:?} stored"), || async {
        (stored_seqs(store, room).await == want).then_some(())
    })
    .await;
}

async fn wait_stream_empty(conn: &mut redis::aio::MultiplexedConnection, room: &RoomId) {
    let mut c = conn.clone();
    eventually(WAIT, "acknowledged entries deleted from the stream", || {
        let mut c = c.clone();
        async move { (xlen(&mut c).await == 0).then_some(()) }
    })
    .await;
    assert_eq!(pending(&mut c, room).await, 0, "nothing left pending");
}

#[tokio::test]
async fn stores_what_the_gateway_appends_and_deletes_acknowledged_entries() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let store = Arc::new(SqliteStore::open_temp().unwrap());
    let r = room("stream");

    // Entries appended before any history service ever ran count too.
    publish(&mut conn, &unsequenced(&r, 1), 1).await;
    let running = start(&redis, store.clone(), fast("h1"));
    for seq in 2..=5 {
        publish(&mut conn, &unsequenced(&r, seq), seq).await;
    }
    let edit = ServerEvent::MessageEdited {
        seq: 0,
        room: r.clone(),
        id: mid(&r, 2),
        content: "edited".into(),
        edited_at: t(6),
    };
    publish(&mut conn, &edit, 6).await;
    xadd(&mut conn, &stream(&r), &receipt(&r, "bob", 6).to_json()).await;
    // Garbage cannot be stored by any retry: acknowledged (and deleted) anyway.
    xadd(&mut conn, &stream(&r), b"{not json").await;
    xadd(
        &mut conn,
        &partitions::stream(0),
        br#"{"type":"no_such_event"}"#,
    )
    .await;

    wait_stored(&*store, &r, &[1, 2, 3, 4, 5]).await;
    eventually(WAIT, "edit and receipt stored", || async {
        let m = store.message(&r, mid(&r, 2)).await.unwrap()?;
        let markers = store.markers(&r).await.unwrap();
        (m.content.as_deref() == Some("edited")
            && markers.iter().any(|m| m.user == "bob" && m.seq == 6))
        .then_some(())
    })
    .await;
    wait_stream_empty(&mut conn, &r).await;
    assert_eq!(running.stats.undecodable.load(Ordering::Relaxed), 2);
    assert_eq!(running.stats.acked.load(Ordering::Relaxed), 9);
    assert_eq!(running.stats.deleted.load(Ordering::Relaxed), 9);
    let m = store.message(&r, mid(&r, 3)).await.unwrap().unwrap();
    assert_eq!(m, view(&r, 3, "ann"));
    running.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_everything_read_but_not_acknowledged() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let store = Arc::new(SqliteStore::open_temp().unwrap());
    let r = room("restart");

    // A consumer stores a first batch, then stops; more entries arrive while it is down.
    let running = start(&redis, store.clone(), fast("h1"));
    for seq in 1..=3 {
        publish(&mut conn, &unsequenced(&r, seq), seq).await;
    }
    wait_stored(&*store, &r, &[1, 2, 3]).await;
    // (Stopped between apply and ack, those would stay pending too: also fine, but this test
    // wants a known pending list below.)
    wait_stream_empty(&mut conn, &r).await;
    running.stop().await;
    for seq in 4..=6 {
        publish(&mut conn, &unsequenced(&r, seq), seq).await;
    }

    // "Crash between read and ack": h1 reads 4..=6 into its pending list and dies.
    let read = read_as(&mut conn, &stream(&r), "h1").await;
    assert!(
        matches!(read, redis::Value::Array(ref a) if !a.is_empty()),
        "{read:?}"
    );
    assert_eq!(pending(&mut conn, &r).await, 3);
    publish(&mut conn, &unsequenced(&r, 7), 7).await;

    // The same consumer name starts again: its own pending entries first, then new ones.
    let running = start(&redis, store.clone(), fast("h1"));
    wait_stored(&*store, &r, &[1, 2, 3, 4, 5, 6, 7]).await;
    wait_stream_empty(&mut conn, &r).await;
    running.stop().await;
}

#[tokio::test]
async fn entries_of_a_dead_consumer_are_reclaimed() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let store = Arc::new(SqliteStore::open_temp().unwrap());
    let r = room("reclaim");
    create_group(&mut conn, &stream(&r)).await;
    for seq in 1..=4 {
        publish(&mut conn, &unsequenced(&r, seq), seq).await;
    }
    // Another replica ("dead") read them and vanished.
    read_as(&mut conn, &stream(&r), "dead").await;
    assert_eq!(pending(&mut conn, &r).await, 4);

    let mut config = fast("alive");
    config.claim_idle = Duration::from_millis(200);
    config.claim_every = Duration::from_millis(100);
    let running = start(&redis, store.clone(), config);
    publish(&mut conn, &unsequenced(&r, 5), 5).await;
    wait_stored(&*store, &r, &[1, 2, 3, 4, 5]).await;
    wait_stream_empty(&mut conn, &r).await;
    assert_eq!(running.stats.claimed.load(Ordering::Relaxed), 4);
    running.stop().await;
}

/// A failover to a replica brings back the replica's view of the group: entries this consumer
/// had read and acknowledged on the old primary are pending for it again, while it reads only
/// new entries. It must store them (they may be ones the old primary never replicated as
/// stored) without waiting for XAUTOCLAIM's idle time, or the stream never drains.
#[tokio::test]
async fn entries_pending_again_for_a_running_consumer_are_read_again() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let store = Arc::new(SqliteStore::open_temp().unwrap());
    let r = room("failover");
    let mut config = fast("h1");
    // Far beyond the test's wait: XAUTOCLAIM must not be what stores them.
    config.claim_idle = Duration::from_secs(600);
    config.claim_every = Duration::from_millis(200);
    let running = start(&redis, store.clone(), config);
    publish(&mut conn, &unsequenced(&r, 1), 1).await;
    wait_stored(&*store, &r, &[1]).await;
    wait_stream_empty(&mut conn, &r).await;

    // What the new primary holds: entries appended before, read by h1, never acknowledged
    // there. Made here by reading them as h1 from another connection.
    let _: () = redis::cmd("MULTI").query_async(&mut conn).await.unwrap();
    for seq in 2..=4 {
        publish(&mut conn, &unsequenced(&r, seq), seq).await;
    }
    read_as(&mut conn, &stream(&r), "h1").await;
    let _: redis::Value = redis::cmd("EXEC").query_async(&mut conn).await.unwrap();
    assert_eq!(pending(&mut conn, &r).await, 3);

    wait_stored(&*store, &r, &[1, 2, 3, 4]).await;
    wait_stream_empty(&mut conn, &r).await;
    assert_eq!(running.stats.claimed.load(Ordering::Relaxed), 0);
    running.stop().await;
}

/// A build before partitions left entries in its one stream, `chat:persist`: acknowledged
/// messages the old history service had not stored, one of them read by an old consumer that
/// is gone. The new history service stores them all, beside the partitions' entries.
#[tokio::test]
async fn entries_left_in_the_stream_of_an_earlier_build_are_stored() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let store = Arc::new(SqliteStore::open_temp().unwrap());
    let r = room("upgrade");
    let legacy = partitions::LEGACY_STREAM;
    create_group(&mut conn, legacy).await;
    for seq in 1..=3 {
        let frame = proto::envelope::with_seq(&unsequenced(&r, seq).to_json(), seq);
        xadd(&mut conn, legacy, &frame).await;
        if seq == 1 {
            read_as(&mut conn, legacy, "old-pod").await;
        }
    }

    let mut config = fast("h1");
    config.claim_idle = Duration::from_millis(200);
    config.claim_every = Duration::from_millis(100);
    let running = start(&redis, store.clone(), config);
    publish(&mut conn, &unsequenced(&r, 4), 4).await;
    wait_stored(&*store, &r, &[1, 2, 3, 4]).await;
    let c = conn.clone();
    eventually(WAIT, "the old stream emptied", || {
        let mut c = c.clone();
        async move {
            let n: u64 = redis::cmd("XLEN")
                .arg(legacy)
                .query_async(&mut c)
                .await
                .unwrap();
            (n == 0).then_some(())
        }
    })
    .await;
    assert_eq!(running.stats.claimed.load(Ordering::Relaxed), 1);
    running.stop().await;
}

/// A store whose `apply` fails while `down` is set (reads go through).
struct Flaky {
    inner: SqliteStore,
    down: AtomicBool,
}

impl Store for Flaky {
    async fn apply(&self, events: &[ServerEvent]) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down for the test".into()));
        }
        self.inner.apply(events).await
    }
    async fn messages(&self, room: &RoomId, page: Page) -> Result<Vec<MessageView>, StoreError> {
        self.inner.messages(room, page).await
    }
    async fn message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        self.inner.message(room, id).await
    }
    async fn pins(&self, room: &RoomId) -> Result<Vec<PinView>, StoreError> {
        self.inner.pins(room).await
    }
    async fn markers(&self, room: &RoomId) -> Result<Vec<ReadMarker>, StoreError> {
        self.inner.markers(room).await
    }
    async fn create_room(&self, info: &RoomInfo, owner: &UserRef) -> Result<(), StoreError> {
        self.inner.create_room(info, owner).await
    }
    async fn update_room(&self, info: &RoomInfo) -> Result<(), StoreError> {
        self.inner.update_room(info).await
    }
    async fn delete_room(&self, room: &RoomId) -> Result<(), StoreError> {
        self.inner.delete_room(room).await
    }
    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        self.inner.room_state(room).await
    }
    async fn rooms(&self) -> Result<Vec<(RoomInfo, u64)>, StoreError> {
        self.inner.rooms().await
    }
    async fn put_member(
        &self,
        room: &RoomId,
        user: &UserRef,
        role: Role,
    ) -> Result<(), StoreError> {
        self.inner.put_member(room, user, role).await
    }
    async fn remove_member(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.inner.remove_member(room, user).await
    }
    async fn set_mute(
        &self,
        room: &RoomId,
        user: &str,
        until: Option<Timestamp>,
        muted: bool,
    ) -> Result<(), StoreError> {
        self.inner.set_mute(room, user, until, muted).await
    }
    async fn put_ban(&self, room: &RoomId, ban: &Ban) -> Result<(), StoreError> {
        self.inner.put_ban(room, ban).await
    }
    async fn remove_ban(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.inner.remove_ban(room, user).await
    }
    async fn access(&self, room: &RoomId, user: &str) -> Result<Option<RoomAccess>, StoreError> {
        self.inner.access(room, user).await
    }
}

#[tokio::test]
async fn nothing_is_acknowledged_while_the_store_is_down() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let store = Arc::new(Flaky {
        inner: SqliteStore::open_temp().unwrap(),
        down: AtomicBool::new(true),
    });
    let r = room("down");
    let running = start(&redis, store.clone(), fast("h1"));
    for seq in 1..=3 {
        publish(&mut conn, &unsequenced(&r, seq), seq).await;
    }
    let stats = running.stats.clone();
    eventually(WAIT, "a few failed attempts", || async {
        (stats.store_errors.load(Ordering::Relaxed) >= 3).then_some(())
    })
    .await;
    assert_eq!(stats.acked.load(Ordering::Relaxed), 0);
    assert_eq!(
        xlen(&mut conn).await,
        3,
        "the stream buffers while the store is down"
    );
    assert!(stored_seqs(&*store, &r).await.is_empty());

    store.down.store(false, Ordering::SeqCst);
    wait_stored(&*store, &r, &[1, 2, 3]).await;
    wait_stream_empty(&mut conn, &r).await;
    running.stop().await;
}
