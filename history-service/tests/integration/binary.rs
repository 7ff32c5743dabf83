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
            .arg(persist_stream(&r))
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
fn migrate_creates_the_schema() {
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
}

/// Runs `history-service` (serve) with `env` over a clean environment until it exits; one still
/// running after 20 s fails the test.
async fn exit_of(env: &[(&str, String)]) -> (Option<i32>, String, Vec<u8>) {
    let db = temp_db("startup");
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd)
        .env("CHAT_LISTEN", "127.0.0.1:0")
        .env("CHAT_STORE", format!("sqlite://{}", db.display()))
        .env("CHAT_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)));
    let child = tokio::process::Command::from(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("history-service with {env:?} kept running"))
        .unwrap();
    remove_db(&db);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.stdout,
    )
}

/// Every way start-up can fail on a setting: one line on stderr naming it, a non-zero exit
/// (2 for a setting, 1 when the store cannot be opened), and no `listening on`.
#[tokio::test]
async fn each_startup_failure_is_one_line_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let a_file = temp_db("a-file");
    std::fs::write(&a_file, "x").unwrap();
    let not_a_key = temp_db("not-a-key");
    std::fs::write(&not_a_key, "not a PEM key").unwrap();
    let under_a_file = format!("sqlite://{}/history.db", a_file.display());

    // (setting, value, exit status, what the line must also contain)
    let cases: Vec<(&str, String, i32, Vec<&str>)> = vec![
        (
            "CHAT_JWT_SECRET",
            "short".into(),
            2,
            vec!["5 bytes", "at least 32", "openssl rand -base64 48"],
        ),
        ("CHAT_LISTEN", "nope".into(), 2, vec!["'nope'", "--listen"]),
        (
            "CHAT_LISTEN",
            taken.clone(),
            2,
            vec![taken.as_str(), "in use", "--listen"],
        ),
        ("CHAT_STORE", "mysql://nope".into(), 2, vec!["mysql"]),
        (
            "CHAT_STORE",
            under_a_file,
            1,
            vec!["cannot open the store", "--store"],
        ),
        (
            "CHAT_REDIS_URL",
            "http://not-redis".into(),
            2,
            vec!["redis://"],
        ),
        (
            "CHAT_JWT_PUBLIC_KEY",
            "/nonexistent/key.pem".into(),
            2,
            vec!["/nonexistent/key.pem"],
        ),
        (
            "CHAT_JWT_PUBLIC_KEY",
            not_a_key.display().to_string(),
            2,
            vec!["invalid key"],
        ),
        ("CHAT_SCYLLA_REPLICATION_FACTOR", "0".into(), 2, vec![]),
        ("CHAT_SCYLLA_DATACENTER", " ".into(), 2, vec![]),
        ("CHAT_SCYLLA_REQUEST_TIMEOUT_SECS", "0".into(), 2, vec![]),
        (
            "CHAT_SCYLLA_TLS_CA_FILE",
            "/nonexistent/ca.pem".into(),
            2,
            vec!["/nonexistent/ca.pem"],
        ),
        // A client certificate without its key.
        (
            "CHAT_SCYLLA_TLS_CERT_FILE",
            "/nonexistent/client.pem".into(),
            2,
            vec![],
        ),
        ("CHAT_LOG_FORMAT", "xml".into(), 2, vec![]),
        ("CHAT_OTLP_PROTOCOL", "http/json".into(), 2, vec![]),
        ("CHAT_OTLP_ENDPOINT", "collector:4317".into(), 2, vec![]),
        (
            "CHAT_DRAIN_SECONDS",
            "soon".into(),
            2,
            vec!["--drain-seconds"],
        ),
    ];
    for (setting, value, code, wanted) in cases {
        let (status, err, stdout) = exit_of(&[(setting, value.clone())]).await;
        let case = format!("{setting}={value}: {err:?}");
        assert_eq!(status, Some(code), "{case}");
        assert_eq!(err.lines().count(), 1, "one line: {case}");
        assert!(err.starts_with("history-service: "), "{case}");
        assert!(err.contains(setting), "names {setting}: {case}");
        for w in wanted {
            assert!(err.contains(w), "says {w:?}: {case}");
        }
        assert!(stdout.is_empty(), "nothing listened: {case}");
    }
    remove_db(&a_file);
    remove_db(&not_a_key);
}
