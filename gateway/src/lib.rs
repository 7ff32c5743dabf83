//! The chat gateway: WebSocket edge of protocol v1.
//!
//! # Layout
//! - [`config`]: flags and environment, validated before anything binds.
//! - [`http`]: routes — the WebSocket upgrade (authenticated before upgrading), API paths,
//!   health, readiness, metrics; [`server_api`]: the application backend's API (keys:
//!   [`api_keys`]), on the internal listener.
//! - [`session`]: one per socket; its reader runs [`commands`], its [`writer`] drains a bounded
//!   queue ([`outbox`]) to the socket, frames encoded by [`wire`].
//! - [`commands`]: what each client command does, one file per group; every permission
//!   decision goes through [`commands::guard`] (rules: `history_service::access`) on the
//!   node's cached [`room_state`], confirmed by the broker's state version.
//! - [`node`]: per-process state shared by sessions (hub, broker, room state, ids, drain
//!   state, typing, [`online`] announcements, [`receipts`] coalescing, [`pin_views`] for
//!   joins, store calls of join storms in [`batch`]es, token [`expiry`]), and the policy
//!   around what the hub and the broker report.
//! - [`hub`]: sharded local registry room → sessions and user → sessions; local fan-out.
//! - [`broker`]: the cluster seam — seq assignment, recovery window, presence, pub/sub —
//!   in memory (one node) or on Redis (many); [`bus`] reads frames that arrive from it.
//! - [`persist`]: embedded mode's persistence queue into the store.
//! - [`shutdown`], [`telemetry`].
//!
//! Where a room event goes: a session's command → [`commands`] validates and authorizes →
//! [`broker`] assigns seq, appends to the persistence log, publishes → on every node the
//! [`hub`] enqueues the same bytes to each local member's queue → [`writer`] writes them.

pub mod api_keys;
pub mod batch;
pub mod broker;
pub mod bus;
pub mod commands;
pub mod config;
pub mod cork;
pub mod expiry;
pub mod http;
pub mod hub;
pub mod node;
pub mod online;
pub mod outbox;
pub mod persist;
pub mod pin_views;
pub mod reassembly;
pub mod receipts;
pub mod room_state;
pub mod server_api;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod wire;
pub mod writer;

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use broker::{memory::MemoryBroker, AnyBroker};
use config::Config;
use history_service::remote::RemoteStore;
use history_service::{AnyStore, Store};
use hub::Hub;
use node::Node;

/// Why a node could not start; each names the setting to look at.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot reach redis at {addr} (CHAT_REDIS_URL / --redis-url): {error}")]
    Redis { addr: String, error: String },
    #[error("cannot open the store ({setting}): {error}")]
    Store {
        setting: &'static str,
        error: String,
    },
}

/// Builds a node from validated configuration: picks the broker and store.
pub async fn build_node(mut config: Config) -> Result<Arc<Node>, StartError> {
    config.load_secret_files().map_err(StartError::Config)?;
    config.validate().map_err(StartError::Config)?;
    telemetry::install_metrics();
    let verifier = history_service::keys::Authenticator::start(&config.key_settings())
        .await
        .map_err(StartError::Config)?;
    // A joining session holds live events until its replay is sent; bounded like its queue.
    let hub = Arc::new(Hub::new(config.outbound_queue));
    let store = Arc::new(open_store(&config).await?);
    let broker = match config.redis.settings().map_err(StartError::Config)? {
        None => {
            let persist = persist::PersistQueue::spawn(apply_to(store.clone()));
            AnyBroker::Memory(MemoryBroker::new(
                hub.clone(),
                config.recovery_window,
                Some(persist),
                Some(last_seq_from(store.clone())),
            ))
        }
        Some(settings) => AnyBroker::Redis(
            broker::redis::RedisBroker::connect(
                settings.clone(),
                hub.clone(),
                store.clone(),
                config.recovery_window,
                config.node_name(),
                std::time::Duration::from_secs(config.presence_ttl_seconds),
            )
            .await
            .map_err(|e| StartError::Redis {
                addr: settings.addr(),
                error: e.to_string(),
            })?,
        ),
    };
    Ok(Node::new(config, verifier, hub, broker, store))
}

/// The history service's API when `CHAT_HISTORY_URL` is set, else the embedded SQLite file in
/// the data directory.
async fn open_store(config: &Config) -> Result<AnyStore, StartError> {
    let store = match &config.history_url {
        Some(url) => AnyStore::Remote(
            RemoteStore::new(url, config.internal_token.clone()).map_err(|e| {
                StartError::Store {
                    setting: "CHAT_HISTORY_URL / --history-url",
                    error: e.to_string(),
                }
            })?,
        ),
        None => {
            if config.redis.url.is_some() {
                tracing::warn!(
                    "CHAT_REDIS_URL without CHAT_HISTORY_URL: room state and history live in this \
                     node's own SQLite file, not shared with other nodes; set CHAT_HISTORY_URL"
                );
            }
            let path = config.data_dir.join("history.db");
            let url = format!("sqlite://{}", path.display());
            AnyStore::connect(&url)
                .await
                .map_err(|e| StartError::Store {
                    setting: "CHAT_DATA_DIR / --data-dir",
                    error: format!("{url}: {e}"),
                })?
        }
    };
    Ok(store)
}

/// A room's last seq as the store knows it (every stored event it was given, room-state
/// events included): after a restart the room numbers on from there.
fn last_seq_from(store: Arc<AnyStore>) -> broker::memory::SeedFn {
    Arc::new(move |room| {
        let store = store.clone();
        Box::pin(async move { store.last_seq(&room).await.map_err(|e| e.to_string()) })
    })
}

/// The embedded persistence queue's writer: batches go to the store's projection.
fn apply_to(store: Arc<AnyStore>) -> persist::ApplyFn {
    Arc::new(move |events| {
        let store = store.clone();
        Box::pin(async move { store.apply(&events).await.map_err(|e| e.to_string()) })
    })
}

/// Serves `node` on an already-bound listener until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_internal(listener, None, node, shutdown).await
}

/// The routes for the cluster, never the public: health, readiness, metrics, and the server
/// API when keys are configured.
fn internal_router(node: Arc<Node>) -> axum::Router {
    let ops = http::ops_router(node.clone());
    match server_api::router(node) {
        Some(api) => ops.merge(api),
        None => ops,
    }
}

/// [`serve`], with `/healthz`, `/readyz`, `/metrics` and the server API on `internal` instead
/// of `listener` when given. The internal listener keeps answering through the drain
/// (`/readyz` 503) and stops after the public one.
pub async fn serve_with_internal(
    listener: TcpListener,
    internal: Option<TcpListener>,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (app, internal) = match internal {
        None => (
            http::public_router(node.clone()).merge(internal_router(node.clone())),
            None,
        ),
        Some(internal) => {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let ops = axum::serve(internal, internal_router(node.clone())).with_graceful_shutdown(
                async {
                    let _ = stopped.await;
                },
            );
            (
                http::public_router(node.clone()),
                Some((stop, tokio::spawn(ops.into_future()))),
            )
        }
    };
    let drained = {
        let node = node.clone();
        async move {
            shutdown.await;
            shutdown::drain(node).await;
        }
    };
    // Chat frames are small and latency-bound: without TCP_NODELAY, Nagle holds a frame
    // while an earlier one waits for the client's (delayed, up to 40 ms) ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(drained)
        .await;
    if let Some((stop, ops)) = internal {
        let _ = stop.send(());
        ops.await.map_err(std::io::Error::other)??;
    }
    served
}
