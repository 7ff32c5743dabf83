//! Real processes for multi-node tests: redis-server, gateway binaries, nginx. Each is killed
//! when dropped, so a failing test leaves nothing running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "chat-test-{name}-{}-{}",
        std::process::id(),
        crate::support::rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether the external servers these tests need are installed; `scripts/test.sh` installs
/// them, so in CI this is always true.
pub fn have(bin: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn require(bin: &str) {
    assert!(
        have(bin),
        "{bin} is not installed: run ./scripts/test.sh, which installs it"
    );
}

/// What gateways are started against: their Redis and history settings.
pub trait Behind {
    /// `CHAT_REDIS_*` of the Redis (history services get these too).
    fn redis_env(&self) -> Vec<(&'static str, String)>;
    /// The history service gateways use.
    fn history_url(&self) -> String;
}

/// What gateways in scaled mode need behind them: a redis-server and a history service
/// (SQLite store, consuming the persistence streams).
pub struct Backend {
    pub redis: Redis,
    pub history: History,
}

impl Backend {
    pub async fn start() -> Backend {
        let redis = Redis::start().await;
        let history = History::start(redis.env(), "history-1").await;
        Backend { redis, history }
    }
}

impl Behind for Backend {
    fn redis_env(&self) -> Vec<(&'static str, String)> {
        self.redis.env()
    }
    fn history_url(&self) -> String {
        self.history.url()
    }
}

/// The Redis Cluster shape: a 3+3 Redis Cluster and two history-service replicas sharing
/// its partition streams.
pub struct ClusterBackend {
    pub cluster: super::redis_cluster::RedisCluster,
    pub histories: Vec<History>,
    /// Redis settings on top of the cluster's URL, for every process ([`Behind::redis_env`]).
    settings: Vec<(&'static str, String)>,
}

impl ClusterBackend {
    pub async fn start() -> ClusterBackend {
        Self::start_with(&[]).await
    }

    /// With Redis `settings` (`CHAT_REDIS_WAIT_REPLICAS`…) for the history services and the
    /// gateways started on it.
    pub async fn start_with(settings: &[(&'static str, &str)]) -> ClusterBackend {
        let cluster = super::redis_cluster::RedisCluster::start().await;
        let settings = settings.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Self::on(cluster, settings).await
    }

    /// On a cluster over TLS with these certificates, the product as the ACL user `chat`.
    pub async fn start_secure(
        certs: std::sync::Arc<super::production_redis::Certs>,
    ) -> ClusterBackend {
        use super::production_redis::{secret_file, CHAT_PASSWORD};
        let cluster = super::redis_cluster::RedisCluster::start_with(Some(certs.clone())).await;
        let mut settings = vec![
            ("CHAT_REDIS_USERNAME", "chat".to_string()),
            (
                "CHAT_REDIS_PASSWORD_FILE",
                secret_file(&certs.dir, "redis-password", CHAT_PASSWORD),
            ),
        ];
        settings.extend(certs.env());
        Self::on(cluster, settings).await
    }

    /// Two history services on `cluster`, every process with `settings`.
    async fn on(
        cluster: super::redis_cluster::RedisCluster,
        settings: Vec<(&'static str, String)>,
    ) -> ClusterBackend {
        let mut b = ClusterBackend {
            cluster,
            histories: Vec::new(),
            settings,
        };
        for name in ["history-1", "history-2"] {
            // Both replicas on one store: the second is a reader of the first's file, as two
            // replicas of one database would be.
            let h = match b.histories.first() {
                None => History::start(b.redis_env(), name).await,
                Some(first) => History::start_on(b.redis_env(), name, first.dir.clone()).await,
            };
            b.histories.push(h);
        }
        b
    }
}

impl Behind for ClusterBackend {
    fn redis_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CHAT_REDIS_URL", self.cluster.url()),
            ("CHAT_REDIS_MODE", "cluster".to_string()),
            (
                "CHAT_REDIS_PARTITIONS",
                super::redis_cluster::TEST_PARTITIONS.to_string(),
            ),
        ]
        .into_iter()
        .chain(self.settings.iter().cloned())
        .collect()
    }
    fn history_url(&self) -> String {
        self.histories[0].url()
    }
}

pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    /// AOF on every write; without it a restart comes back empty.
    persistent: bool,
    child: Option<Child>,
}

impl Redis {
    /// A redis-server with AOF fsync on every write, as production runs it for durability.
    pub async fn start() -> Redis {
        Self::start_with(true).await
    }

    /// A redis-server without persistence: a restart loses everything.
    pub async fn start_volatile() -> Redis {
        Self::start_with(false).await
    }

    async fn start_with(persistent: bool) -> Redis {
        require("redis-server");
        let mut r = Redis {
            port: free_port(),
            dir: tempdir("redis"),
            persistent,
            child: None,
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let aof = if self.persistent { "yes" } else { "no" };
        let port = self.port.to_string();
        let args = ["--port", &port, "--bind", "127.0.0.1", "--save", ""]
            .into_iter()
            .chain(["--appendonly", aof, "--appendfsync", "always"])
            .map(std::ffi::OsString::from)
            .chain(["--dir".into(), self.dir.clone().into_os_string()]);
        self.child = Some(redis_server(args, self.port).await);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `CHAT_REDIS_*` for a process using this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CHAT_REDIS_URL", self.url())]
    }

    /// SIGKILL, then start again on the same port (and data, when persistent).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` with `args` (a data node or a sentinel; its port among them), its output
/// dropped, killed when dropped; returns once `port` accepts connections.
pub async fn redis_server(
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
    port: u16,
) -> Child {
    require("redis-server");
    let child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    wait_for_port(port).await;
    child
}

pub async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns a binary of this workspace with `env` (and nothing else from the environment) and
/// waits for its `listening on ADDR` line; its output is drained (shown with CHAT_TEST_LOGS).
pub async fn spawn_service(
    bin: &std::path::Path,
    name: &str,
    env: &[(&str, String)],
) -> (Child, SocketAddr) {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{name} ({}) starts: {e}", bin.display()));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.split("listening on ").nth(1) {
                return a.trim().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("{name} exited before listening");
    })
    .await
    .expect("service printed its address");
    let label = name.to_string();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("CHAT_TEST_LOGS").is_some() {
                eprintln!("[{label}] {line}");
            }
        }
    });
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let label = name.to_string();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            eprintln!("[{label} stderr] {line}");
        }
    });
    (child, addr)
}

/// The history-service binary next to this test's gateway binary (`scripts/test.sh` builds
/// every binary first).
pub fn history_bin() -> PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gateway")).with_file_name("history-service");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The history-service binary on an SQLite store in a fresh directory, schema applied, with
/// `env` on top; in scaled mode (`CHAT_TEST_SCALED`) it also consumes a real Redis stream.
/// Returns the process, its main address, and the Redis to keep alive with it.
pub async fn spawn_history_with(env: &[(&str, String)]) -> (Child, SocketAddr, Option<Redis>) {
    let data = tempdir("history-with");
    let mut all = vec![
        ("CHAT_LISTEN", "127.0.0.1:0".to_string()),
        (
            "CHAT_STORE",
            format!("sqlite://{}/history.db", data.display()),
        ),
        ("CHAT_MIGRATE_ON_START", "true".to_string()),
        ("CHAT_DRAIN_SECONDS", "1".to_string()),
    ];
    all.extend(env.iter().cloned());
    let redis = if crate::support::scaled() {
        Some(Redis::start().await)
    } else {
        None
    };
    if let Some(r) = &redis {
        all.push(("CHAT_REDIS_URL", r.url()));
    }
    let (child, addr) = spawn_service(&history_bin(), "history", &all).await;
    (child, addr, redis)
}

pub struct History {
    pub addr: SocketAddr,
    redis: Vec<(&'static str, String)>,
    name: String,
    /// The SQLite store's directory: a restart reopens the same file.
    pub dir: PathBuf,
    /// Another replica owns the directory (it removes it).
    shared: bool,
    child: Option<Child>,
}

impl History {
    /// A history service named `name` (its consumer name) on a fresh store, consuming the
    /// persistence streams of the Redis `redis` describes.
    pub async fn start(redis: Vec<(&'static str, String)>, name: &str) -> History {
        let mut h = History {
            addr: "127.0.0.1:0".parse().unwrap(),
            redis,
            name: name.to_string(),
            dir: tempdir("history"),
            shared: false,
            child: None,
        };
        h.spawn().await;
        h
    }

    /// A second replica on the store in `dir`.
    pub async fn start_on(redis: Vec<(&'static str, String)>, name: &str, dir: PathBuf) -> History {
        let mut h = History {
            addr: "127.0.0.1:0".parse().unwrap(),
            redis,
            name: name.to_string(),
            dir,
            shared: true,
            child: None,
        };
        h.spawn().await;
        h
    }

    /// Starts the binary on `self.addr` (port 0 the first time: it picks one, which later
    /// restarts reuse so that gateways and nginx keep finding it).
    async fn spawn(&mut self) {
        let mut env = vec![
            ("CHAT_LISTEN", self.addr.to_string()),
            (
                "CHAT_STORE",
                format!("sqlite://{}/history.db", self.dir.display()),
            ),
            ("CHAT_NODE_ID", self.name.clone()),
            ("CHAT_INTERNAL_TOKEN", INTERNAL_TOKEN.to_string()),
            ("CHAT_DRAIN_SECONDS", "1".to_string()),
            ("CHAT_LOG", "info".to_string()),
        ];
        env.extend(self.redis.iter().cloned());
        let (child, addr) = spawn_service(&history_bin(), &self.name, &env).await;
        wait_ready(addr).await;
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL (no drain, no flush), then start again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        if !self.shared {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub const INTERNAL_TOKEN: &str = "cluster-test-internal-token";

pub struct Gateway {
    pub addr: SocketAddr,
    pub node: String,
    child: Child,
}

impl Gateway {
    /// Starts the gateway binary on a free port with `env` on top of test defaults.
    pub async fn start(backend: &impl Behind, node: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_on(backend, node, 0, env).await
    }

    pub async fn start_on(
        backend: &impl Behind,
        node: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut all = backend.redis_env();
        all.extend([
            ("CHAT_LISTEN", format!("127.0.0.1:{port}")),
            ("CHAT_HISTORY_URL", backend.history_url()),
            ("CHAT_INTERNAL_TOKEN", INTERNAL_TOKEN.to_string()),
            ("CHAT_NODE_ID", node.to_string()),
            ("CHAT_LOG", "info".to_string()),
            ("CHAT_DRAIN_SECONDS", "2".to_string()),
            ("CHAT_PRESENCE_TTL_SECONDS", "3".to_string()),
            ("CHAT_DATA_DIR", tempdir(node).display().to_string()),
        ]);
        all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gateway"));
        let (child, addr) = spawn_service(bin, node, &all).await;
        wait_ready(addr).await;
        Gateway {
            addr,
            node: node.into(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub async fn sigkill(mut self) {
        let _ = self.child.kill().await;
    }

    pub fn sigterm(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    pub async fn wait_exit(mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("exited in time")
            .unwrap()
    }
}

/// The value of a metric on the process serving `/metrics` at `addr` (0 when absent; the
/// first series when labelled).
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = crate::support::http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `/readyz` answers 200.
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Nginx {
    pub addr: SocketAddr,
    prefix: PathBuf,
}

impl Nginx {
    /// nginx from deploy/nginx/local.conf.template in front of `gateways`.
    pub async fn start(gateways: &[SocketAddr], history: SocketAddr) -> Nginx {
        require("nginx");
        let prefix = tempdir("nginx");
        let port = free_port();
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/nginx/local.conf.template"
        ))
        .unwrap();
        let upstreams: String = gateways.iter().map(|g| format!("server {g};\n")).collect();
        let conf = template
            .replace("@PREFIX@", prefix.to_str().unwrap())
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@GATEWAYS@", &upstreams)
            .replace("@HISTORY@", &history.to_string());
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let status = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .status()
            .await
            .expect("nginx runs");
        assert!(
            status.success(),
            "nginx failed to start: {}",
            std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
        );
        wait_for_port(port).await;
        Nginx {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            prefix,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.prefix.join("nginx.pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", pid.trim()])
                .status();
        }
    }
}
