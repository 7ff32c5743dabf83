//! The internal API: every [`Store`] method as `POST /internal/v1/<method>` with a JSON body,
//! so a gateway in scaled mode uses the history service's store through
//! [`crate::remote::RemoteStore`] as if it were local.
//!
//! **Not for the public network.** These routes write room state without any user check —
//! the gateway authorizes before it calls them. They are guarded by an optional shared token
//! (`x-chat-internal-token`, setting `CHAT_INTERNAL_TOKEN`); with no token configured they are
//! open, which is only acceptable where the network already keeps them private. In any
//! deployment the load balancer must not route `/internal/` from outside, and a Kubernetes
//! NetworkPolicy should admit only gateway pods to the history service's port.
//!
//! Answers: `200` with the JSON result (`null` for methods returning nothing); errors as
//! `{"error":{"code","message"}}` with `409 conflict`, `404 not_found`, `503 unavailable`,
//! `500 internal`, `401 unauthorized` (wrong token) or `400 invalid` (bad body).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use proto::errors::{ErrorCode, HttpError};
use proto::rooms::{Role, RoomInfo};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use serde::{Deserialize, Serialize};

use crate::http::HistoryApi;
use crate::store::{Ban, MemberPut, Page, Store, StoreError};

/// The header carrying the shared internal token.
pub const TOKEN_HEADER: &str = "x-chat-internal-token";
/// Path prefix of every internal route.
pub const PREFIX: &str = "/internal/v1";
/// Largest request body: an `apply` batch of a few hundred maximal messages.
const BODY_LIMIT: usize = 16 * 1024 * 1024;

// Request bodies, shared with the client in `remote.rs` so both sides cannot drift apart.

#[derive(Serialize, Deserialize)]
pub(crate) struct ApplyReq {
    pub events: Vec<ServerEvent>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct RoomReq {
    pub room: RoomId,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MessagesReq {
    pub room: RoomId,
    pub page: Page,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MessageReq {
    pub room: RoomId,
    pub id: MessageId,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct CreateRoomReq {
    pub info: RoomInfo,
    pub owner: UserRef,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct InfoReq {
    pub info: RoomInfo,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct PutMemberReq {
    pub room: RoomId,
    pub user: UserRef,
    pub role: Role,
}

/// Entries of one batched call at most (the gateway sends fewer).
pub const MAX_BATCH: usize = 1000;

#[derive(Serialize, Deserialize)]
pub(crate) struct PutMembersReq {
    pub puts: Vec<MemberPut>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MarkersOfReq {
    pub keys: Vec<(RoomId, String)>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct UserReq {
    pub room: RoomId,
    pub user: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SetMuteReq {
    pub room: RoomId,
    pub user: String,
    pub until: Option<Timestamp>,
    pub muted: bool,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct PutBanReq {
    pub room: RoomId,
    pub ban: Ban,
}

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct EmptyReq {}

/// A failed internal call, as sent on the wire.
struct Failure(ErrorCode, String);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(e.code(), e.to_string())
    }
}

impl From<JsonRejection> for Failure {
    fn from(e: JsonRejection) -> Self {
        Failure(ErrorCode::Invalid, e.body_text())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(HttpError::new(self.0, self.1))).into_response()
    }
}

type Reply<T> = Result<Json<T>, Failure>;

/// The `/internal/v1/*` routes over `api`'s store. Merge into the history service's router;
/// never into a gateway's.
pub fn internal_router<S: Store>(api: Arc<HistoryApi<S>>) -> Router {
    let token = api.internal_token().map(str::to_owned);
    Router::new()
        .route(&format!("{PREFIX}/apply"), post(apply::<S>))
        .route(&format!("{PREFIX}/last_seq"), post(last_seq::<S>))
        .route(&format!("{PREFIX}/messages"), post(messages::<S>))
        .route(&format!("{PREFIX}/message"), post(message::<S>))
        .route(&format!("{PREFIX}/pins"), post(pins::<S>))
        .route(&format!("{PREFIX}/markers"), post(markers::<S>))
        .route(&format!("{PREFIX}/create_room"), post(create_room::<S>))
        .route(&format!("{PREFIX}/update_room"), post(update_room::<S>))
        .route(&format!("{PREFIX}/delete_room"), post(delete_room::<S>))
        .route(&format!("{PREFIX}/room_state"), post(room_state::<S>))
        .route(&format!("{PREFIX}/rooms"), post(rooms::<S>))
        .route(&format!("{PREFIX}/put_member"), post(put_member::<S>))
        .route(&format!("{PREFIX}/put_members"), post(put_members::<S>))
        .route(&format!("{PREFIX}/markers_of"), post(markers_of::<S>))
        .route(&format!("{PREFIX}/remove_member"), post(remove_member::<S>))
        .route(&format!("{PREFIX}/set_mute"), post(set_mute::<S>))
        .route(&format!("{PREFIX}/put_ban"), post(put_ban::<S>))
        .route(&format!("{PREFIX}/remove_ban"), post(remove_ban::<S>))
        .route(&format!("{PREFIX}/access"), post(access::<S>))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let token = token.clone();
            async move { check_token(token.as_deref(), req, next).await }
        }))
        .with_state(api)
}

async fn check_token(expected: Option<&str>, req: Request, next: Next) -> Response {
    if let Some(expected) = expected {
        let given = req
            .headers()
            .get(TOKEN_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(given, expected.as_bytes()) {
            return Failure(ErrorCode::Unauthorized, "bad internal token".into()).into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so response timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type Api<S> = State<Arc<HistoryApi<S>>>;

async fn apply<S: Store>(
    State(api): Api<S>,
    body: Result<Json<ApplyReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().apply(&r.events).await?))
}

async fn last_seq<S: Store>(
    State(api): Api<S>,
    body: Result<Json<RoomReq>, JsonRejection>,
) -> Reply<u64> {
    let Json(r) = body?;
    Ok(Json(api.store().last_seq(&r.room).await?))
}

async fn messages<S: Store>(
    State(api): Api<S>,
    body: Result<Json<MessagesReq>, JsonRejection>,
) -> Reply<Vec<proto::rooms::MessageView>> {
    let Json(r) = body?;
    Ok(Json(api.store().messages(&r.room, r.page).await?))
}

async fn message<S: Store>(
    State(api): Api<S>,
    body: Result<Json<MessageReq>, JsonRejection>,
) -> Reply<Option<proto::rooms::MessageView>> {
    let Json(r) = body?;
    Ok(Json(api.store().message(&r.room, r.id).await?))
}

async fn pins<S: Store>(
    State(api): Api<S>,
    body: Result<Json<RoomReq>, JsonRejection>,
) -> Reply<Vec<proto::rooms::PinView>> {
    let Json(r) = body?;
    Ok(Json(api.store().pins(&r.room).await?))
}

async fn markers<S: Store>(
    State(api): Api<S>,
    body: Result<Json<RoomReq>, JsonRejection>,
) -> Reply<Vec<proto::rooms::ReadMarker>> {
    let Json(r) = body?;
    Ok(Json(api.store().markers(&r.room).await?))
}

async fn create_room<S: Store>(
    State(api): Api<S>,
    body: Result<Json<CreateRoomReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().create_room(&r.info, &r.owner).await?))
}

async fn update_room<S: Store>(
    State(api): Api<S>,
    body: Result<Json<InfoReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().update_room(&r.info).await?))
}

async fn delete_room<S: Store>(
    State(api): Api<S>,
    body: Result<Json<RoomReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().delete_room(&r.room).await?))
}

async fn room_state<S: Store>(
    State(api): Api<S>,
    body: Result<Json<RoomReq>, JsonRejection>,
) -> Reply<Option<crate::store::RoomState>> {
    let Json(r) = body?;
    Ok(Json(api.store().room_state(&r.room).await?))
}

async fn rooms<S: Store>(
    State(api): Api<S>,
    body: Result<Json<EmptyReq>, JsonRejection>,
) -> Reply<Vec<(RoomInfo, u64)>> {
    let _ = body?;
    Ok(Json(api.store().rooms().await?))
}

async fn put_member<S: Store>(
    State(api): Api<S>,
    body: Result<Json<PutMemberReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(
        api.store().put_member(&r.room, &r.user, r.role).await?,
    ))
}

fn check_batch(len: usize) -> Result<(), Failure> {
    if len > MAX_BATCH {
        return Err(Failure(
            ErrorCode::TooLarge,
            format!("at most {MAX_BATCH} entries per call"),
        ));
    }
    Ok(())
}

async fn put_members<S: Store>(
    State(api): Api<S>,
    body: Result<Json<PutMembersReq>, JsonRejection>,
) -> Reply<Vec<bool>> {
    let Json(r) = body?;
    check_batch(r.puts.len())?;
    Ok(Json(api.store().put_members(&r.puts).await?))
}

async fn markers_of<S: Store>(
    State(api): Api<S>,
    body: Result<Json<MarkersOfReq>, JsonRejection>,
) -> Reply<Vec<Option<u64>>> {
    let Json(r) = body?;
    check_batch(r.keys.len())?;
    Ok(Json(api.store().markers_of(&r.keys).await?))
}

async fn remove_member<S: Store>(
    State(api): Api<S>,
    body: Result<Json<UserReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().remove_member(&r.room, &r.user).await?))
}

async fn set_mute<S: Store>(
    State(api): Api<S>,
    body: Result<Json<SetMuteReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(
        api.store()
            .set_mute(&r.room, &r.user, r.until, r.muted)
            .await?,
    ))
}

async fn put_ban<S: Store>(
    State(api): Api<S>,
    body: Result<Json<PutBanReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().put_ban(&r.room, &r.ban).await?))
}

async fn remove_ban<S: Store>(
    State(api): Api<S>,
    body: Result<Json<UserReq>, JsonRejection>,
) -> Reply<()> {
    let Json(r) = body?;
    Ok(Json(api.store().remove_ban(&r.room, &r.user).await?))
}

async fn access<S: Store>(
    State(api): Api<S>,
    body: Result<Json<UserReq>, JsonRejection>,
) -> Reply<Option<crate::store::RoomAccess>> {
    let Json(r) = body?;
    Ok(Json(api.store().access(&r.room, &r.user).await?))
}
