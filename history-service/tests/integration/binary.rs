//! The `history-service` executable: configuration by environment, `listening on ADDR` as the
//! first stdout line, the consumer wired to `CHAT_REDIS_URL`, `migrate`, SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use history_service::remote::RemoteStore;
use history_service::Store;
use proto::rooms::Visibility;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_history-service");

fn temp_db(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}.db", unique(name)))
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

/// A child process killed (if still running) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("CHAT_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[tokio::test]
async fn serves_consumes_and_stops_on_sigterm() {
    let redis = RedisServer::start().await;
    let db = temp_db("bin");
    let mut child = Proc(
        clean_env(&mut Command::new(BIN))
            .env("CHAT_LISTEN", "127.0.0.1:0")
            .env("CHAT_STORE", format!("sqlite://{}", db.display()))
            .env("CHAT_REDIS_URL", redis.url())
            .env("CHAT_NODE_ID", "history-test")
            .env("CHAT_INTERNAL_TOKEN", "tok")
            .env("CHAT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first stdout line: {first:?}"))
        .to_owned();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = http
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }

    // Room state through the internal API, messages through the stream, read back over HTTP.
    let remote = RemoteStore::new(&format!("http://{addr}"), Some("tok".into())).unwrap();
    let r = room("bin");
    remote
        .create_room(&room_info(&r, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    let mut conn = redis.conn().await;
    for seq in 1..=3u64 {
        let mut event = msg(&r, seq, "ann");
        if let proto::ServerEvent::Message { seq, .. } = &mut event {
            *seq = 0;
        }
        let frame = proto::envelope::with_seq(&event.to_json(), seq);
        let _: String = redis::cmd("XADD")
            .arg("chat:persist")
            .arg("*")
            .arg("f")
            .arg(frame)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let url = format!("http://{addr}/api/rooms/{r}/messages");
    eventually(
        Duration::from_secs(15),
        "messages served over HTTP",
        || async {
            let resp = http.get(&url).bearer_auth(token("zed")).send().await.ok()?;
            let body: serde_json::Value = resp.json().await.ok()?;
            (body["messages"].as_array()?.len() == 3).then_some(())
        },
    )
    .await;

    // SIGTERM: a clean exit, soon.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    drop(child);
    remove_db(&db);
}

#[test]
fn migrate_and_bad_configuration() {
    let db = temp_db("migrate");
    let out = clean_env(&mut Command::new(BIN))
        .arg("migrate")
        .env("CHAT_STORE", format!("sqlite://{}", db.display()))
        .env("CHAT_SCYLLA_REPLICATION_FACTOR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    remove_db(&db);

    // Bad settings: one line on stderr, exit 2, before binding anything.
    for (key, value) in [
        ("CHAT_STORE", "mysql://nope"),
        ("CHAT_REDIS_URL", "http://not-redis"),
        ("CHAT_JWT_PUBLIC_KEY", "/nonexistent/key.pem"),
        ("CHAT_SCYLLA_REPLICATION_FACTOR", "0"),
        ("CHAT_SCYLLA_DATACENTER", " "),
        ("CHAT_SCYLLA_REQUEST_TIMEOUT_SECS", "0"),
        ("CHAT_SCYLLA_TLS_CA_FILE", "/nonexistent/ca.pem"),
        // A client certificate without its key.
        ("CHAT_SCYLLA_TLS_CERT_FILE", "/nonexistent/client.pem"),
        ("CHAT_LOG_FORMAT", "xml"),
        ("CHAT_OTLP_PROTOCOL", "http/json"),
        ("CHAT_OTLP_ENDPOINT", "collector:4317"),
    ] {
        let out = clean_env(&mut Command::new(BIN))
            .env("CHAT_LISTEN", "127.0.0.1:0")
            .env(
                "CHAT_STORE",
                format!("sqlite://{}", temp_db("never").display()),
            )
            .env(key, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{key}: {err}");
        assert!(err.starts_with("history-service: "), "{err}");
        assert!(out.stdout.is_empty(), "nothing listened");
    }
}
