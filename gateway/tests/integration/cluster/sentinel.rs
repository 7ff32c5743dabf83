//! The single-primary shape behind Sentinel: 1 primary, 1 replica, 3 sentinels; two gateways
//! and a history service find the primary through the sentinels (`CHAT_REDIS_MODE=sentinel`).
//! Under steady traffic from writers on both gateways the primary is killed (`kill -9`), the
//! sentinels promote the replica, and every connection (commands, pub/sub, the consumer)
//! moves to it without a restart: every acknowledged message is in history exactly once and
//! in order, and every client saw each one (`super::chaos::check`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::Child;

use super::chaos::{check, progress};
use super::procs::*;
use super::production_redis::{stop_writers, two_gateways_with_writers, EnvBackend};

const MASTER: &str = "chat-primary";

/// A redis-server (data node or sentinel) on 127.0.0.1.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    async fn start(args: &[String], port: u16) -> Server {
        let child = redis_server(args, port).await;
        Server {
            port,
            child: Some(child),
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

/// 1 primary + 1 replica + 3 sentinels watching them.
struct SentinelSetup {
    primary: Server,
    replica: Server,
    sentinels: Vec<Server>,
    dir: PathBuf,
}

impl SentinelSetup {
    async fn start() -> SentinelSetup {
        let dir = tempdir("sentinel");
        let data = |port: u16, name: &str| {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ]
            .map(String::from)
            .into_iter()
            .chain(["--dir".to_string(), d.display().to_string()])
            .collect::<Vec<_>>()
        };
        let p = free_port();
        let primary = Server::start(&data(p, "primary"), p).await;
        let r = free_port();
        let mut args = data(r, "replica");
        args.extend(["--replicaof", "127.0.0.1", &p.to_string()].map(String::from));
        let replica = Server::start(&args, r).await;
        let mut sentinels = vec![];
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {p} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 10000\n",
                    dir.display()
                ),
            )
            .unwrap();
            let args = [conf.display().to_string(), "--sentinel".to_string()];
            sentinels.push(Server::start(&args, port).await);
        }
        let s = SentinelSetup {
            primary,
            replica,
            sentinels,
            dir,
        };
        s.wait_watching().await;
        s
    }

    /// Until every sentinel knows the replica and the others (a failover needs both).
    async fn wait_watching(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for s in &self.sentinels {
            let mut c = s.conn().await;
            loop {
                let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("replicas")
                    .arg(MASTER)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("sentinels")
                    .arg(MASTER)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                if replicas.len() == 1 && others.len() == 2 {
                    break;
                }
                assert!(Instant::now() < deadline, "the sentinels never met");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The primary's port as the first sentinel names it.
    async fn named_primary(&self) -> u16 {
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER)
            .query_async(&mut self.sentinels[0].conn().await)
            .await
            .unwrap();
        port
    }

    fn url(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CHAT_REDIS_MODE", "sentinel".to_string()),
            ("CHAT_REDIS_URL", self.url()),
            ("CHAT_REDIS_SENTINEL_MASTER", MASTER.to_string()),
        ]
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_sentinel_failover_under_traffic_loses_no_acknowledged_message() {
    let started = Instant::now();
    let redis = SentinelSetup::start().await;
    assert_eq!(redis.named_primary().await, redis.primary.port);
    let history = History::start(redis.env(), "history-1").await;
    let backend = EnvBackend {
        env: redis.env(),
        history,
    };
    let mut redis = redis;
    let env = [("CHAT_MESSAGES_PER_S", "100"), ("CHAT_BURST", "100")];
    let (_gateways, _lb, shared, running) = two_gateways_with_writers(&backend, &env).await;
    progress(&shared, 40, "steady traffic on the first primary").await;
    let killed = Instant::now();
    if let Some(mut c) = redis.primary.child.take() {
        c.kill().await.unwrap(); // SIGKILL
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while redis.named_primary().await != redis.replica.port {
        assert!(Instant::now() < deadline, "the sentinels never failed over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = killed.elapsed();
    progress(&shared, 10, "the replica promoted").await;
    let flowing = killed.elapsed();
    progress(&shared, 50, "traffic on the new primary").await;
    let tallies = stop_writers(&shared, running).await;
    let checked = check(&tallies, backend.history.addr, false).await;
    let conflicts = metric(backend.history.addr, "chat_store_seq_conflicts_total").await;
    eprintln!(
        "sentinel failover: {checked:?}; replica promoted {promoted:?} after the kill, 10 more \
         acks {flowing:?} after it; {conflicts} seq conflicts; {:?} in all",
        started.elapsed()
    );
    assert_eq!(conflicts, 0.0, "no stored message was offered a taken seq");
    // `check` counted the messages acknowledged after the failover in history too: the
    // consumer moved to the new primary as well.
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut redis.replica.conn().await)
        .await
        .unwrap();
    assert_eq!(role[0], redis::Value::BulkString(b"master".to_vec()));
}
