//! Starting servers and driving clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::config::Config;
use gateway::node::Node;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// An operator's HS256 secret for tests that run on a real key (at least 32 bytes, as the
/// binaries require).
pub const TEST_SECRET: &str = "test-only-hs256-secret-at-least-32-bytes";

/// How long a test waits for an expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// `CHAT_TEST_SCALED=1`: every [`Server`] runs in scaled mode — two in-process gateway nodes
/// on a real redis-server and history-service process — so suites written against the
/// embedded mode check the same contract in scaled mode (`scripts/test.sh` runs the whole
/// suite both ways). The users of a test are spread over the two nodes: the first user a test
/// connects goes to the first node, the second to the other, and so on ([`Server::addr_for`]).
pub fn scaled() -> bool {
    std::env::var_os("CHAT_TEST_SCALED").is_some()
}

/// `CHAT_TEST_REDIS=cluster` (with `CHAT_TEST_SCALED=1`): the scaled mode's Redis is a Redis
/// Cluster (3 primaries, 3 replicas) with two history-service replicas, instead of one
/// redis-server and one history service.
pub fn redis_cluster() -> bool {
    std::env::var("CHAT_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// What a scaled-mode server runs on.
enum Backend {
    Single(Box<crate::cluster::procs::Backend>),
    Cluster(crate::cluster::procs::ClusterBackend),
}

impl Backend {
    async fn start() -> Backend {
        if redis_cluster() {
            Backend::Cluster(crate::cluster::procs::ClusterBackend::start().await)
        } else {
            Backend::Single(Box::new(crate::cluster::procs::Backend::start().await))
        }
    }

    fn behind(&self) -> &dyn crate::cluster::procs::Behind {
        match self {
            Backend::Single(b) => b.as_ref(),
            Backend::Cluster(b) => b,
        }
    }
}

/// True (and says so) in scaled mode, for a test that restarts its server on the same
/// embedded store; scaled-mode restarts are covered by the cluster tests instead.
pub fn skipped_in_scaled_mode() -> bool {
    if scaled() {
        eprintln!("SKIPPED in scaled mode: restarts on the embedded store (the cluster tests restart scaled nodes)");
    }
    scaled()
}

pub struct Server {
    /// The first node's address (HTTP calls go there).
    pub addr: SocketAddr,
    /// The embedded store's directory (fresh per server unless given).
    pub data_dir: std::path::PathBuf,
    /// The first node.
    pub node: Arc<Node>,
    /// The second node, in scaled mode.
    pub other: Option<Running>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Which node each user of the test was put on (0 or 1).
    placed: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Redis and the history service, in scaled mode; stopped with the server.
    _backend: Option<Backend>,
}

/// A gateway node serving in this process.
pub struct Running {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves a node built from `config` on a fresh listener.
async fn run_node(config: Config) -> Running {
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node = gateway::build_node(config).await.expect("node starts");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let n = node.clone();
    let task = tokio::spawn(async move {
        gateway::serve(listener, n, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        node,
        stop,
        task,
    }
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        Self::start_in(temp_dir(), tweak).await
    }

    /// Starts on an existing data directory (a restart keeps the store).
    pub async fn start_in(data_dir: std::path::PathBuf, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::for_tests();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.drain_seconds = 1;
        config.data_dir = data_dir.clone();
        let backend = if scaled() {
            let b = Backend::start().await;
            for (k, v) in b.behind().redis_env() {
                match k {
                    "CHAT_REDIS_URL" => config.redis.url = Some(v),
                    "CHAT_REDIS_MODE" => config.redis.mode = v,
                    "CHAT_REDIS_PARTITIONS" => config.redis.partitions = Some(v.parse().unwrap()),
                    other => panic!("unexpected setting {other}"),
                }
            }
            config.history_url = Some(b.behind().history_url());
            config.internal_token = Some(crate::cluster::procs::INTERNAL_TOKEN.to_string());
            Some(b)
        } else {
            None
        };
        tweak(&mut config);
        let other = if backend.is_some() {
            let mut second = config.clone();
            second.node_id = Some(format!("{}-b", config.node_name()));
            second.listen = "127.0.0.1:0".parse().unwrap();
            Some(run_node(second).await)
        } else {
            None
        };
        let first = run_node(config).await;
        Server {
            addr: first.addr,
            data_dir,
            node: first.node,
            other,
            stop: Some(first.stop),
            task: Some(first.task),
            placed: Default::default(),
            _backend: backend,
        }
    }

    /// The node `user` connects to: in scaled mode users alternate between the two nodes in
    /// the order a test first connects them; embedded, the one node.
    pub fn addr_for(&self, user: &str) -> SocketAddr {
        let Some(other) = &self.other else {
            return self.addr;
        };
        let mut placed = self.placed.lock().unwrap();
        let n = placed.len();
        match *placed.entry(user.to_string()).or_insert(n % 2) {
            0 => self.addr,
            _ => other.addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Drains and stops the server; returns when it has stopped.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(o) = self.other.take() {
            let _ = o.stop.send(());
            let _ = o.task.await;
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A fresh directory under the system's temp dir (unique across runs too: a reused directory
/// would hand a test the previous run's rooms, pins and markers).
pub fn temp_dir() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "chat-gateway-test-{}-{nanos}-{}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A dev-key token for `user`.
pub fn token(user: &str) -> String {
    proto::auth::sign_hs256(
        proto::auth::DEV_SECRET,
        &proto::auth::claims(user, &user.to_uppercase(), 3600),
    )
}

pub fn admin_token(user: &str) -> String {
    let mut c = proto::auth::claims(user, user, 3600);
    c.roles = vec!["admin".into()];
    proto::auth::sign_hs256(proto::auth::DEV_SECRET, &c)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
    pub hello: Value,
    /// Frames read while looking for another one; later reads see them first, in order.
    pub pending: std::collections::VecDeque<Value>,
}

/// The HTTP status and body of a refused upgrade.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

pub async fn try_connect_url(
    url: &str,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, Refused> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err(Refused { status, body })
        }
        Err(e) => panic!("connect failed: {e}"),
    }
}

impl Client {
    pub async fn connect(server: &Server, user: &str) -> Client {
        Self::connect_path(server, user, "/ws").await
    }

    pub async fn connect_path(server: &Server, user: &str, path: &str) -> Client {
        Self::connect_addr(server.addr_for(user), user, path).await
    }

    pub async fn connect_addr(addr: SocketAddr, user: &str, path: &str) -> Client {
        Self::connect_url(&format!("ws://{addr}{path}?token={}", token(user)), user).await
    }

    /// Connects to `/ws` on `addr` with `token` (for `user`).
    pub async fn connect_with_token(addr: SocketAddr, user: &str, token: &str) -> Client {
        Self::connect_url(&format!("ws://{addr}/ws?token={token}"), user).await
    }

    async fn connect_url(url: &str, user: &str) -> Client {
        let ws = try_connect_url(url).await.expect("upgrade accepted");
        let mut c = Client::from_ws(ws, user);
        c.hello = c.recv_type("hello").await;
        c
    }

    pub fn from_ws(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, user: &str) -> Client {
        Client {
            ws,
            user: user.into(),
            hello: Value::Null,
            pending: Default::default(),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next text frame as JSON.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        self.read().await
    }

    /// The next text frame from the socket.
    async fn read(&mut self) -> Value {
        self.read_within(WAIT).await
    }

    /// The next text frame from the socket, waiting up to `within` for it.
    async fn read_within(&mut self, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {within:?}", self.user))
                .unwrap_or_else(|| panic!("{}: connection ended", self.user))
                .unwrap_or_else(|e| panic!("{}: {e}", self.user));
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("server sends JSON"),
                Message::Close(c) => panic!("{}: closed: {c:?}", self.user),
                _ => {}
            }
        }
    }

    /// The first frame of `kind`, earlier frames kept for later reads.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        self.recv_where(|v| v["type"] == kind).await
    }

    /// The first frame that matches, earlier frames kept for later reads.
    pub async fn recv_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).expect("index is valid");
        }
        loop {
            let v = self.read().await;
            if pred(&v) {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    /// Like [`Self::recv_where`], for an event that comes only after `within` of silence.
    pub async fn recv_where_within(
        &mut self,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).expect("index is valid");
        }
        loop {
            let v = self.read_within(within).await;
            if pred(&v) {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    /// Waits for a frame matching `pred` and discards everything received before it.
    pub async fn skip_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let v = self.recv_where(&pred).await;
        self.pending.clear();
        v
    }

    /// Sends a command with a ref and returns the answer carrying that ref.
    pub async fn call(&mut self, mut v: Value) -> Value {
        let r = format!("r{}", rand_u64());
        v["ref"] = json!(r);
        self.send(v).await;
        self.recv_where(|f| f["ref"] == json!(r)).await
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let v = self.call(json!({"type": "join", "room": room})).await;
        assert_eq!(v["type"], "joined", "{v}");
        v
    }

    /// Sends a message and returns its ack.
    pub async fn say(&mut self, room: &str, content: &str) -> Value {
        let v = self
            .call(json!({"type": "message", "room": room, "content": content}))
            .await;
        assert_eq!(v["type"], "ack", "{v}");
        v
    }

    /// Waits for the close frame and returns its code (skipping other frames).
    pub async fn expect_close(&mut self) -> u16 {
        self.expect_close_frame().await.0
    }

    /// Waits for the close frame and returns its code and reason (skipping other frames).
    pub async fn expect_close_frame(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("{}: not closed within {WAIT:?}", self.user),
                Ok(None) => panic!("{}: ended without a close frame", self.user),
                Ok(Some(Err(e))) => panic!("{}: error before close: {e}", self.user),
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Ok(Some(Ok(Message::Close(None)))) => {
                    return (u16::from(CloseCode::Status), String::new())
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Asserts nothing matching arrives before a `ping` round trip completes: everything
    /// the server sent before answering the ping has been seen.
    pub async fn assert_none_before_pong(&mut self, pred: impl Fn(&Value) -> bool) {
        let r = format!("sync{}", rand_u64());
        self.send(json!({"type": "ping", "ref": r})).await;
        loop {
            let v = match self.pending.pop_front() {
                Some(v) => v,
                None => self.read().await,
            };
            assert!(!pred(&v), "{}: unexpected frame {v}", self.user);
            if v["type"] == "pong" && v["ref"] == json!(r) {
                return;
            }
        }
    }
}

pub fn rand_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}
