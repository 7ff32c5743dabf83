//! A real Redis Cluster on loopback for the tests: 3 primaries and 3 replicas (`redis-server
//! --cluster-enabled yes` on free ports, joined by `redis-cli --cluster create`), and the
//! faults the tests inflict on it. Every process is killed when the cluster is dropped.
//!
//! `--cluster-node-timeout 1000`: a killed primary is failed over within about two seconds
//! (production keeps the default 15 s). No persistence: durability comes from the replicas.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::procs::{redis_server, require, tempdir};
use super::production_redis::{acl_args, Certs, ADMIN_PASSWORD};

/// Partitions the cluster-shape tests run with: enough to spread over the three shards,
/// fewer polling loops per history service than the default on a small test machine.
pub const TEST_PARTITIONS: u16 = 16;

pub struct Node {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// TLS everywhere (clients, cluster bus, replication) and the ACL users of
    /// `production_redis`, the product as `chat`; the test itself as `admin`.
    secure: Option<Arc<Certs>>,
}

impl Node {
    async fn spawn(&mut self) {
        let mut args: Vec<String> = match &self.secure {
            None => vec!["--port".into(), self.port.to_string()],
            Some(certs) => {
                let mut a = certs.server_args(self.port);
                a.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
                a.extend(
                    ["--masteruser", "admin", "--masterauth", ADMIN_PASSWORD].map(String::from),
                );
                a.extend(acl_args());
                a
            }
        };
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
            ]
            .map(String::from),
        );
        args.extend(["--save", "", "--appendonly", "no"].map(String::from));
        for (flag, path) in [
            ("--cluster-config-file", self.dir.join("nodes.conf")),
            ("--dir", self.dir.clone()),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        self.child = Some(redis_server(args, self.port).await);
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = match &self.secure {
            None => redis::Client::open(format!("redis://{}", self.addr())),
            Some(certs) => redis::Client::build_with_tls(
                format!("rediss://admin:{ADMIN_PASSWORD}@{}", self.addr()),
                certs.client(),
            ),
        };
        client
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.addr()))
    }

    /// `INFO <section>` of this node.
    pub async fn info(&self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.conn().await)
            .await
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port that is free, and whose cluster bus port (+10000) is too.
fn cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

pub struct RedisCluster {
    pub nodes: Vec<Node>,
}

impl RedisCluster {
    /// Without TLS or passwords.
    pub async fn start() -> RedisCluster {
        Self::start_with(None).await
    }

    /// With `secure`: TLS with these certificates everywhere, and the ACL users.
    pub async fn start_with(secure: Option<Arc<Certs>>) -> RedisCluster {
        require("redis-server");
        require("redis-cli");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let mut n = Node {
                port: cluster_port(),
                dir: tempdir("redis-cluster"),
                child: None,
                secure: secure.clone(),
            };
            n.spawn().await;
            nodes.push(n);
        }
        let mut cli = Command::new("redis-cli");
        if let Some(certs) = &secure {
            cli.args(["--tls", "--cacert", &certs.path("ca.crt")])
                .args(["--cert", &certs.path("client.crt")])
                .args(["--key", &certs.path("client.key")])
                .args(["--user", "admin", "--pass", ADMIN_PASSWORD]);
        }
        let status = cli
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(Node::addr))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy().await;
        cluster
    }

    /// Every node as a seed, as `CHAT_REDIS_URL` takes them.
    pub fn url(&self) -> String {
        let scheme = match self.nodes[0].secure {
            None => "redis",
            Some(_) => "rediss",
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://{}", n.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node says the cluster is ok, every slot is served, and every
    /// replica is in sync with its primary.
    pub async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let mut conn = n.conn().await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let repl = n.info("replication").await;
                ok &= info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"));
            }
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the redis cluster never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node serving `slot` as primary now.
    pub async fn primary_of(&self, slot: u16) -> usize {
        let live = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let v: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut live.conn().await)
            .await
            .unwrap();
        let redis::Value::Array(ranges) = v else {
            panic!("CLUSTER SLOTS: {v:?}")
        };
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                continue;
            };
            let (
                Some(redis::Value::Int(a)),
                Some(redis::Value::Int(b)),
                Some(redis::Value::Array(node)),
            ) = (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            if (*a as u16..=*b as u16).contains(&slot) {
                let Some(redis::Value::Int(port)) = node.get(1) else {
                    continue;
                };
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == *port)
                    .expect("a node of this cluster");
            }
        }
        panic!("no primary serves slot {slot}")
    }

    /// The replica of the primary `primary` (by its `INFO replication`).
    pub async fn replica_of(&self, primary: usize) -> usize {
        let port = self.nodes[primary].port;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_some()
                && n.info("replication")
                    .await
                    .contains(&format!("master_port:{port}"))
            {
                return i;
            }
        }
        panic!("node {primary} has no replica")
    }

    /// Sends `signal` (`STOP`, `CONT`) to node `i`: a stopped replica misses what its primary
    /// writes meanwhile.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i]
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Makes primary `i` drop its replication links (`CLIENT KILL TYPE replica`): what it
    /// writes next reaches no replica until one reconnects.
    pub async fn cut_replicas(&self, i: usize) {
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query_async(&mut self.nodes[i].conn().await)
            .await
            .unwrap();
    }

    /// SIGKILL node `i` (no shutdown, no save).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts node `i` again on its port and cluster config: it rejoins the cluster (a
    /// former primary whose replica took over comes back as a replica).
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].spawn().await;
    }

    /// Starts node `i` again as a new, empty node (no cluster config: it claims no slots, not
    /// even for a moment) and makes it a replica of node `primary`.
    pub async fn rejoin_as_replica(&mut self, i: usize, primary: usize) {
        let _ = std::fs::remove_file(self.nodes[i].dir.join("nodes.conf"));
        self.nodes[i].spawn().await;
        let mut conn = self.nodes[i].conn().await;
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut self.nodes[primary].conn().await)
            .await
            .unwrap();
        let _: () = redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(self.nodes[primary].port)
            .query_async(&mut conn)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r: redis::RedisResult<()> = redis::cmd("CLUSTER")
                .arg("REPLICATE")
                .arg(&id)
                .query_async(&mut conn)
                .await;
            if r.is_ok() {
                return;
            }
            // It does not know the primary yet: the handshake is under way.
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} never became a replica: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `CLUSTER MYID` of node `i`.
    async fn id_of(&self, i: usize) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut self.nodes[i].conn().await)
            .await
            .unwrap()
    }

    /// Moves `slot` from its primary to primary `to` the way `redis-cli --cluster reshard`
    /// does: IMPORTING on the target, MIGRATING on the source, its keys moved one `MIGRATE` at
    /// a time (clients meanwhile get `ASK` for a key already moved, `TRYAGAIN` for a script
    /// whose keys are split), then the slot assigned to the target on every primary.
    pub async fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.primary_of(slot).await;
        assert_ne!(from, to, "slot {slot} is on node {to} already");
        let (from_id, to_id) = (self.id_of(from).await, self.id_of(to).await);
        let mut source = self.nodes[from].conn().await;
        let mut target = self.nodes[to].conn().await;
        let setslot = |state: &str, id: &str| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(id);
            c
        };
        let _: () = setslot("IMPORTING", &from_id)
            .query_async(&mut target)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", &to_id)
            .query_async(&mut source)
            .await
            .unwrap();
        let mut moved = 0;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1)
                .query_async(&mut source)
                .await
                .unwrap();
            let Some(key) = keys.first() else { break };
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg(key)
                .arg(0)
                .arg(5000)
                .query_async(&mut source)
                .await
                .unwrap();
            moved += 1;
            // Paced, so that traffic runs into the half-moved slot for a while (this is the
            // fault's timing, not a wait for anything).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(moved > 0, "slot {slot} held no keys");
        eprintln!("slot {slot}: {moved} keys moved from node {from} to node {to}");
        // Target first, then source (the order `redis-cli --cluster` uses); the other
        // nodes learn it by gossip.
        for conn in [&mut target, &mut source] {
            let _: () = setslot("NODE", &to_id).query_async(conn).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.primary_of(slot).await != to {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster never learned that node {to} serves slot {slot}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A live primary other than node `i`.
    pub async fn primary_other_than(&self, i: usize) -> usize {
        for (j, n) in self.nodes.iter().enumerate() {
            if j != i && n.child.is_some() && n.info("replication").await.contains("role:master") {
                return j;
            }
        }
        panic!("no primary besides node {i}")
    }

    /// Waits until the node serving `slot` is not node `i` (its replica took over).
    pub async fn wait_failover(&self, slot: u16, from: usize) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.primary_of(slot).await;
            if now != from {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failover of slot {slot}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
