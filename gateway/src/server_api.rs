//! The server API: JSON over HTTP for the application's backend, beside the clients'
//! WebSocket. docs/server-api.md describes it, docs/server-api.openapi.json is its OpenAPI
//! description (a test holds that to [`routes`]).
//!
//! **Where.** On the internal listener (`CHAT_INTERNAL_LISTEN`), never on the public port;
//! with no internal listener, beside everything else on the one port. Only when keys are
//! configured (`CHAT_API_KEYS_DIR`): without keys there is no server API at all (404).
//!
//! **Who.** Every call carries one of the configured keys as `Authorization: Bearer <key>`
//! ([`crate::api_keys`]); anything else is 401 before the call is looked at.
//!
//! **What.** Each call that changes something is a client command run through the same code
//! a connection's command runs ([`crate::commands`]): the same validation and errors, events,
//! seqs and persistence; only the permission rules do not apply (the guard's
//! [`Actor::Server`](crate::commands::Actor)). Events name a user as their author or `by`:
//! the call's `user`/`by`/`owner`, else the system sender ([`system_sender`]). Its answer is
//! the command's [`Ack`] as JSON; a refusal is the command's error code with its HTTP status.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use history_service::http::PageQuery;
use history_service::Store;
use proto::client::{
    AddMember, Ban, CreateRoom, DeleteRoom, Mute, RemoveMember, SendMessage, SetRole, Unban,
    Unmute, UpdateRoom,
};
use proto::envelope::NodeTarget;
use proto::{ErrorCode, RoomId, UserRef};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api_keys::ApiKeys;
use crate::broker::Broker;
use crate::commands::{Ack, CommandError, Cx, Origin, Run};
use crate::http::ApiError;
use crate::node::Node;
use crate::outbox::MAX_CLOSE_REASON;

/// A user id (path or body) at most, in bytes: as long as a token's `sub` may be.
const MAX_USER_ID_BYTES: usize = 128;
/// A display name given for a user at most, in characters (as a token's `name` is cut).
const MAX_USER_NAME_CHARS: usize = 64;
/// Online users listed by a presence read at most (`count` is always exact).
pub const MAX_PRESENCE_USERS: usize = 10_000;
/// The close reason of a disconnect that gives none.
const DEFAULT_DISCONNECT_REASON: &str = "disconnected by the server";

/// Who the events of a call name when it names nobody: `{"id": "system", "name": "System"}`.
pub fn system_sender() -> UserRef {
    UserRef {
        id: "system".into(),
        name: "System".into(),
    }
}

#[derive(Clone)]
struct Api {
    node: Arc<Node>,
    keys: Arc<ApiKeys>,
}

/// One route: its method and path (as documented), and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<Api>,
}

fn at<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: axum::handler::Handler<T, Api>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method the router knows");
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

/// The body field naming the user a call's events name (as author, owner or `by`).
#[derive(Clone, Copy)]
enum Acting {
    /// The system sender when absent.
    Optional(&'static str),
    Required(&'static str),
}

/// A route that runs client command `C` ([`command`]): the body is the command's fields
/// (those the path gives excepted), plus the `acting` field.
fn runs<C>(method: Method, path: &'static str, acting: Acting, status: StatusCode) -> Route
where
    C: Run + DeserializeOwned + Send + 'static,
{
    let handler = move |State(api): State<Api>,
                        Path(params): Path<HashMap<String, String>>,
                        body: Body| async move {
        command::<C>(&api, params, body, acting, status).await
    };
    at(method, path, handler)
}

/// Every route of the server API. The router is built from this list alone.
pub fn routes() -> Vec<Route> {
    use Method as M;
    const OK: StatusCode = StatusCode::OK;
    let by = Acting::Optional("by");
    let owner = Acting::Required("owner");
    let author = Acting::Optional("user");
    vec![
        runs::<CreateRoom>(M::POST, "/server/v1/rooms", owner, StatusCode::CREATED),
        runs::<UpdateRoom>(M::PATCH, "/server/v1/rooms/{room}", by, OK),
        runs::<DeleteRoom>(M::DELETE, "/server/v1/rooms/{room}", by, OK),
        runs::<SendMessage>(M::POST, "/server/v1/rooms/{room}/messages", author, OK),
        at(M::GET, "/server/v1/rooms/{room}/messages", history),
        runs::<AddMember>(M::POST, "/server/v1/rooms/{room}/members", by, OK),
        runs::<SetRole>(M::PATCH, "/server/v1/rooms/{room}/members/{user}", by, OK),
        runs::<RemoveMember>(M::DELETE, "/server/v1/rooms/{room}/members/{user}", by, OK),
        runs::<Ban>(M::POST, "/server/v1/rooms/{room}/bans", by, OK),
        runs::<Unban>(M::DELETE, "/server/v1/rooms/{room}/bans/{user}", by, OK),
        runs::<Mute>(M::POST, "/server/v1/rooms/{room}/mutes", by, OK),
        runs::<Unmute>(M::DELETE, "/server/v1/rooms/{room}/mutes/{user}", by, OK),
        at(M::GET, "/server/v1/rooms/{room}/presence", presence),
        at(M::GET, "/server/v1/rooms/{room}/pins", pins),
        at(M::GET, "/server/v1/rooms/{room}/receipts", receipts),
        at(M::POST, "/server/v1/users/{user}/disconnect", disconnect),
    ]
}

/// The server API's router, when keys are configured (None: no server API).
pub fn router(node: Arc<Node>) -> Option<Router> {
    let keys = Arc::new(node.config.api_keys.clone()?);
    let api = Api { node, keys };
    let mut router = Router::new();
    for route in routes() {
        router = router.route(route.path, route.handler);
    }
    // Bodies are commands: none needs more than a client's largest frame.
    let limit = DefaultBodyLimit::max(api.node.config.max_frame_bytes);
    let authenticated = axum::middleware::from_fn_with_state(api.clone(), authenticate);
    Some(
        router
            .layer(limit)
            .route_layer(authenticated)
            .with_state(api),
    )
}

/// Lets a call through with a configured key, else 401 (before the call is looked at).
async fn authenticate(State(api): State<Api>, req: Request, next: Next) -> Response {
    let presented = history_service::http::bearer(req.headers());
    let Some(key) = presented.and_then(|k| api.keys.check(k.as_bytes())) else {
        metrics::counter!("chat_server_api_requests_total", "status" => "401").increment(1);
        return ApiError::new(
            ErrorCode::Unauthorized,
            "the server API wants `Authorization: Bearer <key>` with a configured key",
        )
        .into_response();
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let key = key.to_owned();
    let response = next.run(req).await;
    let status = response.status();
    metrics::counter!("chat_server_api_requests_total", "status" => status.as_str().to_owned())
        .increment(1);
    tracing::debug!(%method, path, key, status = status.as_u16(), "server API call");
    response
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError(e.code, e.message)
    }
}

impl From<history_service::http::ApiError> for ApiError {
    fn from(e: history_service::http::ApiError) -> Self {
        ApiError(e.code, e.message)
    }
}

/// A JSON object body, refused with a clear `invalid` (or `too_large`) error; an empty body
/// is `{}`.
struct Body(serde_json::Map<String, serde_json::Value>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorCode::TooLarge
            } else {
                ErrorCode::Invalid
            };
            ApiError::new(code, e.body_text())
        })?;
        let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        serde_json::from_slice(bytes).map(Body).map_err(|e| {
            ApiError::new(
                ErrorCode::Invalid,
                format!("the body must be a JSON object: {e}"),
            )
        })
    }
}

/// A user as a call names one: `{"id", "name"?}` (the name defaults to the id).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserParam {
    id: String,
    name: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Invalid, message)
}

/// A user id as a token's `sub` would be: 1-128 bytes, and no control characters (the node
/// channel's addressing is line-based).
fn user_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_USER_ID_BYTES || id.chars().any(char::is_control) {
        return Err(invalid(format!(
            "a user id is 1-{MAX_USER_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// The user the `acting` field of `body` names (taken out of it), validated as a token's
/// `sub` and `name` would be; the system sender when an optional field is absent.
fn acting_user(
    acting: Acting,
    body: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<UserRef, ApiError> {
    let (Acting::Optional(field) | Acting::Required(field)) = acting;
    let value = match (body.remove(field), acting) {
        (Some(value), _) => value,
        (None, Acting::Optional(_)) => return Ok(system_sender()),
        (None, Acting::Required(_)) => {
            return Err(invalid(format!("invalid body: missing field `{field}`")))
        }
    };
    let UserParam { id, name } = serde_json::from_value(value)
        .map_err(|e| invalid(format!("`{field}` must be {{\"id\", \"name\"?}}: {e}")))?;
    user_id(&id)?;
    let name = match name {
        Some(n) if n.trim().is_empty() => return Err(invalid(format!("`{field}.name` is blank"))),
        Some(n) if n.chars().count() > MAX_USER_NAME_CHARS => {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("`{field}.name` is over {MAX_USER_NAME_CHARS} characters"),
            ))
        }
        Some(n) => n,
        None => id.clone(),
    };
    Ok(UserRef { id, name })
}

/// Runs client command `C` as the server: its fields from the body and the path (the path's
/// `room` and `user` win), acting as the user the body's `acting` field names.
async fn command<C: Run + DeserializeOwned>(
    api: &Api,
    params: HashMap<String, String>,
    Body(mut body): Body,
    acting: Acting,
    status: StatusCode,
) -> Answer {
    let as_user = acting_user(acting, &mut body)?;
    if let Some(user) = params.get("user") {
        user_id(user)?;
    }
    body.extend(params.into_iter().map(|(k, v)| (k, v.into())));
    let command: C =
        serde_json::from_value(body.into()).map_err(|e| invalid(format!("invalid body: {e}")))?;
    let mut cx = Cx {
        node: &api.node,
        origin: Origin::Server { as_user },
    };
    let ack: Ack = command.run(&mut cx).await?;
    Ok((status, Json(ack)).into_response())
}

type Answer = Result<Response, ApiError>;

/// Closes every connection of the user, on every node, with 1008 and the body's `reason`.
async fn disconnect(
    State(api): State<Api>,
    Path(user): Path<String>,
    Body(mut body): Body,
) -> Answer {
    user_id(&user)?;
    let reason = match body.remove("reason") {
        None => DEFAULT_DISCONNECT_REASON.to_owned(),
        Some(serde_json::Value::String(r)) => r,
        Some(_) => return Err(invalid("`reason` must be a string")),
    };
    if reason.len() > MAX_CLOSE_REASON {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("reason is over {MAX_CLOSE_REASON} bytes (a WebSocket close reason)"),
        ));
    }
    api.node
        .broker
        .publish_node(NodeTarget::Disconnect(&user), Bytes::from(reason))
        .await
        .map_err(CommandError::from)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "ok": true })),
    )
        .into_response())
}

fn room_id(raw: String) -> Result<RoomId, ApiError> {
    RoomId::new(raw).map_err(|e| invalid(e.to_string()))
}

/// The room, when it exists (reads of a room that does not are `not_found`).
async fn existing(api: &Api, room: String) -> Result<RoomId, ApiError> {
    let room = room_id(room)?;
    let node = &api.node;
    match node.rooms.get(&node.broker, &room).await {
        Ok(Some(_)) => Ok(room),
        Ok(None) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no room {room}"),
        )),
        Err(e) => Err(CommandError::from(e).into()),
    }
}

async fn presence(State(api): State<Api>, Path(room): Path<String>) -> Answer {
    let room = existing(&api, room).await?;
    let online = api
        .node
        .broker
        .presence(&room, MAX_PRESENCE_USERS)
        .await
        .map_err(CommandError::from)?;
    let body = serde_json::json!({ "users": online.users, "count": online.count });
    Ok(Json(body).into_response())
}

async fn history(
    State(api): State<Api>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    let page = history_service::http::cursor_page(&params)?;
    let room = existing(&api, room).await?;
    let page = api
        .node
        .history
        .messages_page(&room, PageQuery::Cursor(page))
        .await?;
    Ok(Json(&*page).into_response())
}

async fn pins(State(api): State<Api>, Path(room): Path<String>) -> Answer {
    let room = existing(&api, room).await?;
    let pins = api
        .node
        .rooms
        .store()
        .pins(&room)
        .await
        .map_err(CommandError::from)?;
    Ok(Json(serde_json::json!({ "pins": pins })).into_response())
}

async fn receipts(State(api): State<Api>, Path(room): Path<String>) -> Answer {
    let room = existing(&api, room).await?;
    let markers = api
        .node
        .rooms
        .store()
        .markers(&room)
        .await
        .map_err(CommandError::from)?;
    Ok(Json(serde_json::json!({ "markers": markers })).into_response())
}
