//! `CHAT_INTERNAL_LISTEN`: health, readiness and metrics (and history-service's internal API,
//! the gateway's server API) move to a second port, and the public port stops answering them.
//! The real binaries, as a deployment starts them.

use std::net::SocketAddr;

use crate::cluster::procs::{self, Backend, INTERNAL_TOKEN};
use crate::support::*;

/// The server API's key in the gateway test.
const API_KEY: &str = "listeners-test-server-api-key-0123456789";

async fn status(addr: SocketAddr, path: &str) -> u16 {
    http()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
        .status()
        .as_u16()
}

/// Waits until `/readyz` on `addr` answers 200.
async fn ready(addr: SocketAddr) {
    procs::wait_ready(addr).await;
}

#[tokio::test]
async fn gateway_serves_probes_and_metrics_only_on_the_internal_port() {
    // Scaled mode: the binary on Redis and a history service; else embedded.
    let backend = if scaled() {
        Some(Backend::start().await)
    } else {
        None
    };
    let internal: SocketAddr = format!("127.0.0.1:{}", procs::free_port()).parse().unwrap();
    let data = procs::tempdir("gw-internal");
    let keys = data.join("api-keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("app"), API_KEY).unwrap();
    let mut env = vec![
        ("CHAT_LISTEN", "127.0.0.1:0".to_string()),
        ("CHAT_INTERNAL_LISTEN", internal.to_string()),
        ("CHAT_DATA_DIR", data.display().to_string()),
        ("CHAT_DRAIN_SECONDS", "1".to_string()),
        ("CHAT_API_KEYS_DIR", keys.display().to_string()),
    ];
    if let Some(b) = &backend {
        env.push(("CHAT_REDIS_URL", b.redis.url()));
        env.push(("CHAT_HISTORY_URL", b.history.url()));
        env.push(("CHAT_INTERNAL_TOKEN", INTERNAL_TOKEN.to_string()));
    }
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gateway"));
    let (_child, public) = procs::spawn_service(bin, "gateway", &env).await;
    ready(internal).await;

    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(status(internal, path).await, 200, "internal {path}");
        assert_eq!(status(public, path).await, 404, "public {path}");
    }
    // What clients use stays on the public port, and only there.
    assert_eq!(status(public, "/").await, 200);
    assert_eq!(status(internal, "/").await, 404);
    assert_eq!(status(internal, "/api/rooms").await, 404);
    let mut c = Client::connect_addr(public, "ida", "/ws").await;
    c.join("lobby").await;
    // A metric appears after its first use: the session above.
    let metrics = http()
        .get(format!("http://{internal}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("chat_connections"), "{metrics}");
    // The server API: on the internal port only, and only with a key.
    let presence = "/server/v1/rooms/lobby/presence";
    assert_eq!(
        status(public, presence).await,
        404,
        "no server API on the public port"
    );
    assert_eq!(status(internal, presence).await, 401, "a key is required");
    let online = http()
        .get(format!("http://{internal}{presence}"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(online.status(), 200);
    let online: serde_json::Value = online.json().await.unwrap();
    assert_eq!(online["count"], 1, "{online}");
    assert!(
        try_connect_url(&format!("ws://{internal}/ws?token={}", token("ida")))
            .await
            .is_err(),
        "no upgrade on the internal port"
    );
}

#[tokio::test]
async fn history_service_serves_its_internal_api_probes_and_metrics_only_on_the_internal_port() {
    let internal: SocketAddr = format!("127.0.0.1:{}", procs::free_port()).parse().unwrap();
    let (_child, public, _redis) = procs::spawn_history_with(&[
        ("CHAT_INTERNAL_LISTEN", internal.to_string()),
        ("CHAT_INTERNAL_TOKEN", INTERNAL_TOKEN.to_string()),
    ])
    .await;
    ready(internal).await;

    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(status(internal, path).await, 200, "internal {path}");
        assert_eq!(status(public, path).await, 404, "public {path}");
    }
    // The public API answers on the public port only (401: it wants a token).
    assert_eq!(status(public, "/api/rooms").await, 401);
    assert_eq!(status(internal, "/api/rooms").await, 404);
    let rooms = http()
        .get(format!("http://{public}/api/rooms?token={}", token("ida")))
        .send()
        .await
        .unwrap();
    assert_eq!(rooms.status(), 200);
    // The gateways' internal API, on the internal port only: a gateway reads room state
    // through it.
    let store = history_service::remote::RemoteStore::new(
        &format!("http://{internal}"),
        Some(INTERNAL_TOKEN.into()),
    )
    .unwrap();
    use history_service::Store;
    assert!(
        store.rooms().await.is_ok(),
        "internal API on the internal port"
    );
    let public_store = history_service::remote::RemoteStore::new(
        &format!("http://{public}"),
        Some(INTERNAL_TOKEN.into()),
    )
    .unwrap();
    assert!(
        public_store.rooms().await.is_err(),
        "no internal API on the public port"
    );
}
