//! HTTP routes: the WebSocket upgrade (authenticated before upgrading), the gateway's own API
//! paths ([`public_router`]), and health, readiness and metrics ([`ops_router`]: on the
//! internal listener when one is configured, else beside the others; see `crate::serve`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fastwebsockets::upgrade::IncomingUpgrade;
use proto::auth::{AuthError, Identity};
use proto::errors::HttpError;
use proto::{ErrorCode, RoomId};
use serde::Deserialize;

use crate::node::Node;
use crate::{commands, session};

/// An HTTP error answer: status from the code, body `{"error":{"code","message"}}`.
pub struct ApiError(pub ErrorCode, pub String);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(code, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(HttpError::new(self.0, self.1))).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError(ErrorCode::Unauthorized, e.to_string())
    }
}

/// The web UI, compiled into the binary so one file is the whole deployable.
const UI_INDEX: &str = include_str!("../ui/index.html");
const UI_SCRIPT: &str = include_str!("../ui/app.js");
const UI_STYLE: &str = include_str!("../ui/style.css");
/// The JavaScript client library the UI is built on (`clients/js`), for other pages too.
const UI_CLIENT: &str = include_str!("../../clients/js/chat-client.js");

fn ui(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Health, readiness and metrics: for the cluster, never the public.
pub fn ops_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(node)
}

/// What clients use: the UI, the WebSocket upgrade and the API paths.
pub fn public_router(node: Arc<Node>) -> Router {
    // History, pins, receipts and members are the history API's, over this node's store
    // (embedded SQLite, or the history service through its internal API when scaled out).
    let history = history_service::http::router_with(
        node.history.clone(),
        history_service::http::RouterOptions { list_rooms: false },
    );
    Router::new()
        .route(
            "/",
            get(|| async { ui("text/html; charset=utf-8", UI_INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { ui("text/javascript; charset=utf-8", UI_SCRIPT) }),
        )
        .route(
            "/style.css",
            get(|| async { ui("text/css; charset=utf-8", UI_STYLE) }),
        )
        .route(
            "/client.js",
            get(|| async { ui("text/javascript; charset=utf-8", UI_CLIENT) }),
        )
        .route("/ws", get(ws_upgrade))
        .route("/ws/room/{room}", get(ws_upgrade_room))
        .route("/api/dev/token", post(dev_token))
        .route("/api/rooms", get(rooms))
        .route("/api/admin/notice", post(admin_notice))
        .with_state(node)
        .merge(history)
}

#[derive(Deserialize, Default)]
pub struct TokenQuery {
    token: Option<String>,
}

/// The token from `?token=`, `Authorization: Bearer`, or the `chat_token` cookie, in that order
/// (borrowed: a connect storm verifies thousands per second).
pub fn token_from<'a>(query: &'a TokenQuery, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(t) = &query.token {
        return Some(t);
    }
    if let Some(t) = history_service::http::bearer(headers) {
        return Some(t);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == "chat_token")
        .map(|(_, v)| v)
}

pub async fn authenticate(
    node: &Node,
    query: &TokenQuery,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    let token = token_from(query, headers).ok_or(AuthError::Missing)?;
    Ok(node.verifier.verify(token).await?)
}

async fn ws_upgrade(
    State(node): State<Arc<Node>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: IncomingUpgrade,
) -> Response {
    upgrade(node, q, headers, ws, None).await
}

async fn ws_upgrade_room(
    State(node): State<Arc<Node>>,
    Path(room): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: IncomingUpgrade,
) -> Response {
    match RoomId::new(room) {
        Ok(room) => upgrade(node, q, headers, ws, Some(room)).await,
        Err(e) => ApiError::new(ErrorCode::Invalid, e.to_string()).into_response(),
    }
}

/// Every refusal happens here, before the upgrade, as a plain HTTP answer.
async fn upgrade(
    node: Arc<Node>,
    q: TokenQuery,
    headers: HeaderMap,
    ws: IncomingUpgrade,
    room: Option<RoomId>,
) -> Response {
    let identity = match authenticate(&node, &q, &headers).await {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if let (Some(allowed), Some(origin)) =
        (&node.config.allowed_origins, headers.get(header::ORIGIN))
    {
        let origin = origin.to_str().unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            return ApiError::new(
                ErrorCode::Forbidden,
                format!("origin {origin} is not allowed"),
            )
            .into_response();
        }
    }
    if node.is_draining() {
        return ApiError::new(
            ErrorCode::Unavailable,
            "node is draining; reconnect elsewhere",
        )
        .into_response();
    }
    if node.hub.user_connections(&identity.user.id) >= node.config.max_connections_per_user {
        return ApiError::new(ErrorCode::RateLimited, "too many connections for this user")
            .into_response();
    }
    let Ok(permit) = node.connections.clone().try_acquire_owned() else {
        return ApiError::new(ErrorCode::Unavailable, "node is at its connection limit")
            .into_response();
    };
    let (response, fut) = match ws.upgrade() {
        Ok(x) => x,
        Err(e) => {
            return ApiError::new(ErrorCode::Invalid, format!("bad upgrade: {e}")).into_response()
        }
    };
    tokio::spawn(async move {
        match fut.await {
            // Its own task: the session's future is all an idle connection keeps.
            Ok(ws) => {
                tokio::spawn(session::run(Box::new(session::Start {
                    node,
                    ws,
                    identity,
                    auto_join: room,
                    permit,
                })));
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    response.into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    name: String,
    #[serde(default)]
    admin: bool,
}

/// Mints a token with the built-in development key. Absent (404) whenever a real key is set.
async fn dev_token(State(node): State<Arc<Node>>, body: Option<Json<DevTokenRequest>>) -> Response {
    if !node.verifier.is_dev() {
        return ApiError::new(ErrorCode::NotFound, "not found").into_response();
    }
    let Some(Json(req)) = body else {
        return ApiError::new(ErrorCode::Invalid, "body must be {\"name\": \"...\"}")
            .into_response();
    };
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 64 {
        return ApiError::new(ErrorCode::Invalid, "name must be 1-64 characters").into_response();
    }
    // The user id is derived from the name: in dev mode, a name is an identity.
    let sub: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { '-' })
        .collect();
    let mut claims = proto::auth::claims(&sub, name, 24 * 3600);
    if req.admin {
        claims.roles = vec!["admin".into()];
    }
    let token = proto::auth::sign_hs256(proto::auth::DEV_SECRET, &claims);
    Json(serde_json::json!({ "token": token, "user": { "id": sub, "name": name } })).into_response()
}

async fn rooms(
    State(node): State<Arc<Node>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let who = match authenticate(&node, &q, &headers).await {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    match commands::list_rooms(&node, &who).await {
        Ok(rooms) => Json(serde_json::json!({ "rooms": rooms })).into_response(),
        Err(e) => ApiError::new(e.code, e.message).into_response(),
    }
}

#[derive(Deserialize)]
struct NoticeRequest {
    content: String,
}

async fn admin_notice(
    State(node): State<Arc<Node>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    body: Option<Json<NoticeRequest>>,
) -> Response {
    let id = match authenticate(&node, &q, &headers).await {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if !id.admin {
        return ApiError::new(ErrorCode::Forbidden, "global admins only").into_response();
    }
    let Some(Json(req)) = body else {
        return ApiError::new(ErrorCode::Invalid, "body must be {\"content\": \"...\"}")
            .into_response();
    };
    let len = req.content.chars().count();
    if len == 0 || len > node.config.max_content_chars {
        return ApiError::new(
            ErrorCode::Invalid,
            "content must be 1..=max_content_chars characters",
        )
        .into_response();
    }
    match node.notice(req.content).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "ok": true })),
        )
            .into_response(),
        Err(e) => ApiError::new(ErrorCode::Unavailable, e.to_string()).into_response(),
    }
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.ready() {
        (StatusCode::OK, "ready").into_response()
    } else if node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "backend unavailable").into_response()
    }
}

async fn metrics_text() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
        .into_response()
}
