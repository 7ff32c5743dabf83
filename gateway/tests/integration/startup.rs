//! Start-up failures of the real `gateway` binary: each one is a single line on stderr that
//! names the setting to change, and exit status 2.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// Runs the gateway with `env` on top of a minimal environment (a free port, a fresh data
/// directory) until it exits; a gateway still running after 20 s fails the test.
async fn exit_of(env: &[(&str, String)]) -> (Option<i32>, String) {
    let data_dir = temp_dir();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHAT_LISTEN", "127.0.0.1:0")
        .env("CHAT_DATA_DIR", &data_dir)
        .env("CHAT_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("gateway binary starts");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("gateway with {env:?} kept running"))
        .unwrap();
    let _ = std::fs::remove_dir_all(data_dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn each_startup_failure_is_one_line_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let files = temp_dir();
    let a_file = files.join("not-a-directory");
    std::fs::write(&a_file, "x").unwrap();
    let not_a_key = files.join("key.pem");
    std::fs::write(&not_a_key, "not a PEM key").unwrap();
    let redis = format!("redis://user:hunter2@127.0.0.1:{}", closed_port());
    let short_keys = files.join("api-keys");
    std::fs::create_dir_all(&short_keys).unwrap();
    std::fs::write(short_keys.join("app"), "hunter2\n").unwrap();

    // (setting, value, what the line must also contain)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "CHAT_JWT_SECRET",
            "short".into(),
            vec!["5 bytes", "at least 32", "openssl rand -base64 48"],
        ),
        (
            "CHAT_JWT_SECRET",
            "x".repeat(31),
            vec!["31 bytes", "openssl rand"],
        ),
        (
            "CHAT_LISTEN",
            taken.clone(),
            vec![taken.as_str(), "in use", "--listen"],
        ),
        ("CHAT_LISTEN", "nope".into(), vec!["'nope'", "--listen"]),
        (
            "CHAT_DATA_DIR",
            a_file.display().to_string(),
            vec!["--data-dir", "cannot open the store"],
        ),
        (
            "CHAT_JWT_PUBLIC_KEY",
            "/nonexistent/key.pem".into(),
            vec!["/nonexistent/key.pem"],
        ),
        (
            "CHAT_JWT_PUBLIC_KEY",
            not_a_key.display().to_string(),
            vec!["invalid key"],
        ),
        (
            "CHAT_REDIS_URL",
            "http://not-redis".into(),
            vec!["redis://"],
        ),
        (
            "CHAT_REDIS_URL",
            redis.clone(),
            vec![&redis["redis://user:hunter2@".len()..], "--redis-url"],
        ),
        ("CHAT_HISTORY_URL", "history:8081".into(), vec!["http://"]),
        ("CHAT_DRAIN_SECONDS", "soon".into(), vec!["--drain-seconds"]),
        (
            "CHAT_API_KEYS_DIR",
            "/nonexistent/api-keys".into(),
            vec!["/nonexistent/api-keys"],
        ),
        (
            "CHAT_API_KEYS_DIR",
            short_keys.display().to_string(),
            vec!["app is 7 bytes", "at least 32", "openssl rand"],
        ),
        (
            "CHAT_TOKEN_EXPIRING_SECONDS",
            "0".into(),
            vec!["between 1 and 86400"],
        ),
    ];
    for (setting, value, wanted) in cases {
        let (status, err) = exit_of(&[(setting, value.clone())]).await;
        let case = format!("{setting}={value}: {err:?}");
        assert_eq!(status, Some(2), "{case}");
        assert_eq!(err.lines().count(), 1, "one line: {case}");
        assert!(err.starts_with("gateway: "), "{case}");
        assert!(err.contains(setting), "names {setting}: {case}");
        for w in wanted {
            assert!(err.contains(w), "says {w:?}: {case}");
        }
        assert!(!err.contains("hunter2"), "no password in logs: {case}");
    }
    let _ = std::fs::remove_dir_all(files);
}
