//! Redis as production runs it: TLS with a CA and client certificates the test generates
//! (`--tls-auth-clients yes`, no plain port), and an ACL user limited to the rules of
//! `deploy/redis/chat-user.acl` with the default user off. Two gateways and a history
//! service run the chaos clients over it (through nginx, a gateway killed under traffic so
//! its clients recover on the other), every acknowledged message is checked against
//! history, and Redis must have denied nothing (`ACL LOG`). A wrong CA and a wrong password
//! stop a gateway at start with a one-line error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::chaos::{chaos_client, check, progress, Shared, Tally, ROOM};
use super::procs::*;
use crate::support::*;

/// The password of the product's ACL user.
pub const CHAT_PASSWORD: &str = "chat-test-password";
/// A user the test (and Sentinel, replication) use for what the product may not do.
pub const ADMIN_PASSWORD: &str = "admin-test-password";

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a second
/// CA that signed nothing here; PEM files in a fresh directory (openssl CLI).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate() -> Certs {
        require("openssl");
        let dir = tempdir("certs");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=chat test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ]);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=chat test {who}"),
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.crt"),
            ]);
        }
        Certs { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// redis-server arguments: TLS only, client certificates required.
    pub fn server_args(&self, tls_port: u16) -> Vec<String> {
        [
            "--port",
            "0",
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &self.path("server.crt"),
            "--tls-key-file",
            &self.path("server.key"),
            "--tls-ca-cert-file",
            &self.path("ca.crt"),
            "--tls-auth-clients",
            "yes",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `CHAT_REDIS_*` for TLS with the client certificate.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CHAT_REDIS_CA_FILE", self.path("ca.crt")),
            ("CHAT_REDIS_CERT_FILE", self.path("client.crt")),
            ("CHAT_REDIS_KEY_FILE", self.path("client.key")),
        ]
    }

    /// The TLS material for a client of the test's own.
    pub fn client(&self) -> redis::TlsCertificates {
        let read = |f: &str| std::fs::read(self.dir.join(f)).unwrap();
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read("client.crt"),
                client_key: read("client.key"),
            }),
            root_cert: Some(read("ca.crt")),
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// redis-server arguments for the ACL users: the default user off, `chat` with the rules of
/// `deploy/redis/chat-user.acl`, and `admin` with every right.
pub fn acl_args() -> Vec<String> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/redis/chat-user.acl");
    let rules = std::fs::read_to_string(&file).unwrap();
    let rules = rules
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(str::split_whitespace);
    let mut args: Vec<String> = ["--user", "default", "off", "--user", "chat", "on"]
        .map(String::from)
        .to_vec();
    args.push(format!(">{CHAT_PASSWORD}"));
    args.extend(rules.map(String::from));
    args.extend(["--user", "admin", "on", "allkeys", "allchannels", "+@all"].map(String::from));
    args.push(format!(">{ADMIN_PASSWORD}"));
    args
}

/// A file holding `secret` (a mounted Secret), in `dir`.
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path.display().to_string()
}

/// One redis-server over TLS with the ACL users.
struct SecureRedis {
    port: u16,
    dir: PathBuf,
    _child: Child,
}

impl SecureRedis {
    async fn start(certs: &Certs) -> SecureRedis {
        let port = free_port();
        let dir = tempdir("redis-tls");
        let mut args = certs.server_args(port);
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(String::from));
        args.extend(acl_args());
        args.extend(["--dir".to_string(), dir.display().to_string()]);
        let child = redis_server(args, port).await;
        SecureRedis {
            port,
            dir,
            _child: child,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// A connection as `admin`, over TLS with the client certificate.
    async fn admin(&self, certs: &Certs) -> redis::aio::MultiplexedConnection {
        let url = format!("rediss://admin:{ADMIN_PASSWORD}@127.0.0.1:{}", self.port);
        redis::Client::build_with_tls(url, certs.client())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for SecureRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What `ACL LOG` holds: every command, key or channel Redis refused a user.
pub async fn acl_denials(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(conn)
        .await
        .unwrap();
    log.iter().map(|entry| format!("{entry:?}")).collect()
}

/// The Redis settings of a process, and the history service, for gateways to start on.
pub struct EnvBackend {
    pub env: Vec<(&'static str, String)>,
    pub history: History,
}

impl Behind for EnvBackend {
    fn redis_env(&self) -> Vec<(&'static str, String)> {
        self.env.clone()
    }
    fn history_url(&self) -> String {
        self.history.url()
    }
}

/// Two gateways on `backend` (with `env`) behind nginx, the chaos room, and 4 chaos clients
/// writing through nginx.
pub async fn two_gateways_with_writers(
    backend: &EnvBackend,
    env: &[(&str, &str)],
) -> (Vec<Gateway>, Nginx, Arc<Shared>, Vec<JoinHandle<Tally>>) {
    let gateways = vec![
        Gateway::start(backend, "g1", env).await,
        Gateway::start(backend, "g2", env).await,
    ];
    let addrs: Vec<_> = gateways.iter().map(|g| g.addr).collect();
    let lb = Nginx::start(&addrs, backend.history.addr).await;
    let mut owner = Client::connect_addr(lb.addr, "owner", "/ws").await;
    owner.join(ROOM).await;
    let shared = Shared::new(4);
    let running = (0..4)
        .map(|i| tokio::spawn(chaos_client(lb.addr, format!("c{i}"), shared.clone())))
        .collect();
    (gateways, lb, shared, running)
}

/// Stops the writers and collects what each saw.
pub async fn stop_writers(shared: &Shared, running: Vec<JoinHandle<Tally>>) -> Vec<Tally> {
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut tallies = vec![];
    for c in running {
        tallies.push(c.await.unwrap());
    }
    tallies
}

/// The gateway binary started with `env` (Redis settings) that must fail: its exit status and
/// the last line of its error output.
async fn failed_start(env: &[(&'static str, String)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHAT_LISTEN", "127.0.0.1:0")
        .env(
            "CHAT_DATA_DIR",
            tempdir("failed-start").display().to_string(),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.kill_on_drop(true).output())
        .await
        .expect("the gateway gave up in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_string();
    (out.status.code(), last)
}

#[tokio::test]
async fn tls_with_client_certificates_and_an_acl_user_carry_the_chaos_clients() {
    let started = std::time::Instant::now();
    let certs = Certs::generate();
    let redis = SecureRedis::start(&certs).await;
    let mut env = vec![
        ("CHAT_REDIS_URL", redis.url()),
        ("CHAT_REDIS_USERNAME", "chat".to_string()),
        (
            "CHAT_REDIS_PASSWORD_FILE",
            secret_file(&certs.dir, "redis-password", CHAT_PASSWORD),
        ),
    ];
    env.extend(certs.env());
    let history = History::start(env.clone(), "history-1").await;
    let backend = EnvBackend { env, history };
    let (mut gateways, _lb, shared, running) = two_gateways_with_writers(&backend, &[]).await;
    progress(&shared, 40, "steady traffic over TLS").await;
    gateways.remove(0).sigkill().await; // its clients reconnect to g2 and recover from Redis
    progress(&shared, 40, "a gateway killed").await;
    let tallies = stop_writers(&shared, running).await;
    let checked = check(&tallies, backend.history.addr, true).await;
    eprintln!("tls + acl: {checked:?}, {:?}", started.elapsed());
    assert!(
        checked.reconnects >= 1,
        "clients of the killed gateway came back"
    );

    let denied = acl_denials(&mut redis.admin(&certs).await).await;
    assert!(denied.is_empty(), "Redis refused the product: {denied:?}");

    // A CA that did not sign the server's certificate, a wrong password: one line each.
    let env = &backend.env;
    let other_ca = certs.path("other-ca.crt");
    let wrong_password = replaced(
        &replaced(env, "CHAT_REDIS_PASSWORD_FILE", None),
        "CHAT_REDIS_PASSWORD",
        Some("not-the-password"),
    );
    let reach = "cannot reach redis at 127.0.0.1";
    for (env, want, detail) in [
        (
            replaced(env, "CHAT_REDIS_CA_FILE", Some(&other_ca)),
            reach,
            "UnknownIssuer",
        ),
        (wrong_password, reach, "WRONGPASS"),
        // Settings that contradict each other stop it before it connects.
        (
            replaced(env, "CHAT_REDIS_KEY_FILE", None),
            "CHAT_REDIS_CERT_FILE is set without CHAT_REDIS_KEY_FILE",
            "",
        ),
    ] {
        let (code, line) = failed_start(&env).await;
        assert_eq!(code, Some(2), "{line}");
        assert!(line.contains(want) && line.contains(detail), "{line}");
    }
}

/// `env` with `key` set to `value` (unset with `None`).
fn replaced(
    env: &[(&'static str, String)],
    key: &'static str,
    value: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut env: Vec<_> = env.iter().filter(|(k, _)| *k != key).cloned().collect();
    env.extend(value.map(|v| (key, v.to_string())));
    env
}

/// A Redis Cluster as production runs it: TLS for clients, the cluster bus and replication,
/// client certificates required, the product as the ACL user. Two gateways and two history
/// services carry the chaos clients while the room's primary is killed and its replica takes
/// over (the new primary is found over TLS too); every acknowledged message is checked
/// against history, and no node refused the product anything.
#[tokio::test]
async fn a_redis_cluster_over_tls_with_an_acl_user_fails_over_under_traffic() {
    let certs = Arc::new(Certs::generate());
    let mut backend = ClusterBackend::start_secure(certs.clone()).await;
    let env = [("CHAT_MESSAGES_PER_S", "100"), ("CHAT_BURST", "100")];
    let gateways = [
        Gateway::start(&backend, "g1", &env).await,
        Gateway::start(&backend, "g2", &env).await,
    ];
    let lb = Nginx::start(
        &[gateways[0].addr, gateways[1].addr],
        backend.histories[0].addr,
    )
    .await;
    let mut owner = Client::connect_addr(lb.addr, "owner", "/ws").await;
    owner.join(ROOM).await;
    let shared = Shared::new(4);
    let running = (0..4)
        .map(|i| tokio::spawn(chaos_client(lb.addr, format!("c{i}"), shared.clone())))
        .collect();
    progress(&shared, 30, "steady traffic on a TLS cluster").await;

    let slot = history_service::redis_conn::slot_of(&history_service::partitions::stream(
        history_service::partitions::of(ROOM, super::redis_cluster::TEST_PARTITIONS),
    ));
    let cluster = &mut backend.cluster;
    let primary = cluster.primary_of(slot).await;
    cluster.kill(primary).await;
    cluster.wait_failover(slot, primary).await;
    progress(&shared, 40, "the room's primary killed").await;
    cluster.restart(primary).await;
    cluster.wait_healthy().await;
    let tallies = stop_writers(&shared, running).await;
    let checked = check(&tallies, backend.histories[0].addr, false).await;
    eprintln!("redis cluster over tls + acl, a primary killed: {checked:?}");
    assert!(checked.acked > 0 && checked.stored >= checked.acked);

    for (i, node) in backend.cluster.nodes.iter().enumerate() {
        let denied = acl_denials(&mut node.conn().await).await;
        assert!(
            denied.is_empty(),
            "node {i} refused the product: {denied:?}"
        );
    }
}
