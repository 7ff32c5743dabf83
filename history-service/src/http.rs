//! The public HTTP API (docs/protocol.md) that the history service owns: history, pins, receipts,
//! members and the room listing. The history service serves it, and the gateway mounts the
//! same router in embedded mode ([`router`] / [`router_with`]).
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/rooms/{room}/messages?before=&after=&limit=` | [`MessagesPage`] |
//! | `GET /api/messages?room=&page=` | [`MessagesPage`] with `page` |
//! | `GET /api/rooms/{room}/pins` | `{"pins":[PinView]}` |
//! | `GET /api/rooms/{room}/receipts` | `{"markers":[{user,seq,at}]}` |
//! | `GET /api/rooms/{room}/members` | `{"members":[MemberInfo]}` |
//! | `GET /api/rooms/{room}/bans` | `{"bans":[Ban]}` in force; the room's owner and admins only |
//! | `GET /api/rooms` | `{"rooms":[RoomSummary]}` (`online_count` 0 here) |
//!
//! **Paging.** `before` pages are newest first and `next_before` is the cursor of the next
//! older page, `null` when there is none. `after` pages are oldest first with `next_after`
//! (`null`: caught up). Each page reads `limit + 1` rows so those cursors are exact, never a
//! final empty page. `page=N` is the same history in pages of 50: since seqs also number
//! edits, pins and membership events, message seqs have gaps and page N cannot be computed
//! from the last seq; it is found by walking `(N-1)*50` messages back in steps of up to 1000
//! (a few reads even deep in history; cursors are the efficient way for clients).
//!
//! **Auth.** A JWT as `Authorization: Bearer <token>` or `?token=`, verified with
//! [`proto::auth::Verifier`]. Unknown room 404, private room without membership 403 (global
//! admins may read any room), an active ban 403 `banned`, bad parameters 400.
//!
//! **Coalescing.** Page reads go through a [`SingleFlight`] keyed by (room, page request): a
//! burst of identical requests — everyone joining a hot room loads its newest page — costs one
//! store read. Authorization is still per caller, before the shared read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use proto::auth::Identity;
use proto::errors::{ErrorCode, HttpError};
use proto::rooms::{MemberInfo, MessageView, PinView, ReadMarker, RoomSummary, Visibility};
use proto::{RoomId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::access::{Access, Action, Denied};
use crate::keys::Authenticator;
use crate::singleflight::SingleFlight;
use crate::store::{Ban, Page, RoomAccess, Store, StoreError};

/// Default and maximum `limit` of a messages page.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 100;
/// Messages per `page=N` page.
pub const PAGE_SIZE: u32 = 50;
/// Rows read per step while walking back to page N.
const WALK_STEP: u32 = 1000;

/// An HTTP API failure: a protocol code (which fixes the status) and a message for humans.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Details of backend failures go to the log, not to clients.
        match e {
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                ApiError::new(ErrorCode::Unavailable, "history store unavailable; retry")
            }
            StoreError::Internal(detail) => {
                tracing::error!(%detail, "store error");
                ApiError::new(ErrorCode::Internal, "internal error")
            }
            other => ApiError::new(other.code(), other.to_string()),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        ApiError::new(d.code, d.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(HttpError::new(self.code, self.message))).into_response()
    }
}

/// A page of history. Both cursors are always present (`null` when not applicable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessagesPage {
    pub messages: Vec<MessageView>,
    /// `before` for the next older page; null when nothing is older (or on `after` pages).
    pub next_before: Option<u64>,
    /// `after` for the next newer page; null when caught up (or on `before` pages).
    pub next_after: Option<u64>,
    /// The page number, on `page=N` answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
}

/// What a page read is keyed by for coalescing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageQuery {
    Cursor(Page),
    /// `page=N` (1 = newest).
    Number(u32),
}

type PageFlights = SingleFlight<(RoomId, PageQuery), Result<Arc<MessagesPage>, ApiError>>;

/// The state behind the routes: a store, a token verifier, and the coalescer.
pub struct HistoryApi<S> {
    store: Arc<S>,
    verifier: Authenticator,
    internal_token: Option<String>,
    pages: PageFlights,
}

impl<S: Store> HistoryApi<S> {
    pub fn new(store: Arc<S>, verifier: impl Into<Authenticator>) -> Self {
        Self {
            store,
            verifier: verifier.into(),
            internal_token: None,
            pages: SingleFlight::new(),
        }
    }

    /// The shared token the internal API requires (`None`/empty: open; see
    /// [`crate::internal`]).
    pub fn with_internal_token(mut self, token: Option<String>) -> Self {
        self.internal_token = token.filter(|t| !t.is_empty());
        self
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn verifier(&self) -> &Authenticator {
        &self.verifier
    }

    pub fn internal_token(&self) -> Option<&str> {
        self.internal_token.as_deref()
    }

    /// Who the request is: the JWT from `Authorization: Bearer` or, failing that, `?token=`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Identity, ApiError> {
        let token = bearer(headers).or(query_token).unwrap_or_default();
        self.verifier
            .verify(token)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))
    }

    /// May `who` read `room`'s history, pins, receipts and members? Returns the room.
    pub async fn authorize_read(
        &self,
        who: &Identity,
        room: &RoomId,
    ) -> Result<RoomAccess, ApiError> {
        let access = self
            .store
            .access(room, &who.user.id)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no room {room}")))?;
        Access::of_room(&access, who).check(Action::Read)?;
        Ok(access)
    }

    /// A page of `room`'s history, coalesced with identical concurrent requests. Does not
    /// authorize: call [`HistoryApi::authorize_read`] first.
    pub async fn messages_page(
        &self,
        room: &RoomId,
        query: PageQuery,
    ) -> Result<Arc<MessagesPage>, ApiError> {
        let store = self.store.clone();
        let key_room = room.clone();
        let room = room.clone();
        self.pages
            .run((key_room, query), move || async move {
                load_page(&*store, &room, query).await.map(Arc::new)
            })
            .await
    }

    /// The listing of `GET /api/rooms` and `list_rooms` for `who`: public and restricted
    /// rooms, plus private rooms `who` is a member of, each with `who`'s role in it (so a
    /// client knows "my rooms" from the server). `online_count` is 0 (the gateway knows
    /// presence and fills it in).
    pub async fn list_rooms(&self, who: &Identity) -> Result<Vec<RoomSummary>, ApiError> {
        let rooms = self.store.rooms().await?;
        let mut out = Vec::with_capacity(rooms.len());
        for (info, member_count) in rooms {
            let role = self
                .store
                .access(&info.id, &who.user.id)
                .await?
                .and_then(|a| a.member)
                .map(|m| m.role);
            if info.visibility == Visibility::Private && role.is_none() {
                continue;
            }
            out.push(RoomSummary {
                id: info.id,
                name: info.name,
                topic: info.topic,
                visibility: info.visibility,
                member_count,
                online_count: 0,
                unread: None,
                role,
            });
        }
        Ok(out)
    }
}

async fn load_page<S: Store>(
    store: &S,
    room: &RoomId,
    query: PageQuery,
) -> Result<MessagesPage, ApiError> {
    match query {
        PageQuery::Cursor(Page::Before { before, limit }) => {
            let mut messages = store
                .messages(
                    room,
                    Page::Before {
                        before,
                        limit: limit + 1,
                    },
                )
                .await?;
            let more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            Ok(MessagesPage {
                next_before: if more {
                    messages.last().map(|m| m.seq)
                } else {
                    None
                },
                next_after: None,
                messages,
                page: None,
            })
        }
        PageQuery::Cursor(Page::After { after, limit }) => {
            let mut messages = store
                .messages(
                    room,
                    Page::After {
                        after,
                        limit: limit + 1,
                    },
                )
                .await?;
            let more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            Ok(MessagesPage {
                next_before: None,
                next_after: if more {
                    messages.last().map(|m| m.seq)
                } else {
                    None
                },
                messages,
                page: None,
            })
        }
        PageQuery::Number(n) => {
            let mut skip = u64::from(n.saturating_sub(1)) * u64::from(PAGE_SIZE);
            let mut before = None;
            while skip > 0 {
                let step = skip.min(u64::from(WALK_STEP)) as u32;
                let rows = store
                    .messages(
                        room,
                        Page::Before {
                            before,
                            limit: step,
                        },
                    )
                    .await?;
                let Some(last) = rows.last() else {
                    // Past the oldest message: an empty page.
                    return Ok(MessagesPage {
                        messages: Vec::new(),
                        next_before: None,
                        next_after: None,
                        page: Some(n),
                    });
                };
                before = Some(last.seq);
                skip -= rows.len() as u64;
                if rows.len() < step as usize && skip > 0 {
                    return Ok(MessagesPage {
                        messages: Vec::new(),
                        next_before: None,
                        next_after: None,
                        page: Some(n),
                    });
                }
            }
            let mut page = Box::pin(load_page(
                store,
                room,
                PageQuery::Cursor(Page::Before {
                    before,
                    limit: PAGE_SIZE,
                }),
            ))
            .await?;
            page.page = Some(n);
            Ok(page)
        }
    }
}

/// Which routes [`router_with`] mounts.
#[derive(Clone, Copy, Debug)]
pub struct RouterOptions {
    /// Mount `GET /api/rooms`. The gateway turns this off to serve the listing itself with
    /// live online counts (it can reuse [`HistoryApi::list_rooms`]).
    pub list_rooms: bool,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self { list_rooms: true }
    }
}

/// Every public route of this module.
pub fn router<S: Store>(api: Arc<HistoryApi<S>>) -> Router {
    router_with(api, RouterOptions::default())
}

pub fn router_with<S: Store>(api: Arc<HistoryApi<S>>, options: RouterOptions) -> Router {
    let mut r = Router::new()
        .route("/api/rooms/{room}/messages", get(messages::<S>))
        .route("/api/messages", get(messages_by_page::<S>))
        .route("/api/rooms/{room}/pins", get(pins::<S>))
        .route("/api/rooms/{room}/receipts", get(receipts::<S>))
        .route("/api/rooms/{room}/members", get(members::<S>))
        .route("/api/rooms/{room}/bans", get(bans::<S>));
    if options.list_rooms {
        r = r.route("/api/rooms", get(list_rooms::<S>));
    }
    r.with_state(api)
}

type Params = Query<HashMap<String, String>>;
type Api<S> = State<Arc<HistoryApi<S>>>;

fn room_param(raw: &str) -> Result<RoomId, ApiError> {
    RoomId::new(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

fn u64_param(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::invalid(format!("`{name}` must be a non-negative integer")))
        })
        .transpose()
}

/// The credential of an `Authorization: Bearer <credential>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The page a messages request asks for: `before=` or `after=` (not both), `limit=`
/// (1..=[`MAX_LIMIT`], default [`DEFAULT_LIMIT`]).
pub fn cursor_page(params: &HashMap<String, String>) -> Result<Page, ApiError> {
    let limit = match u64_param(params, "limit")? {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=u64::from(MAX_LIMIT)).contains(&n) => n as u32,
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "`limit` must be 1..={MAX_LIMIT}"
            )))
        }
    };
    match (u64_param(params, "before")?, u64_param(params, "after")?) {
        (Some(_), Some(_)) => Err(ApiError::invalid("give `before` or `after`, not both")),
        (before, None) => Ok(Page::Before { before, limit }),
        (None, Some(after)) => Ok(Page::After { after, limit }),
    }
}

/// Authenticates and authorizes a read of `room`.
async fn reader<S: Store>(
    api: &HistoryApi<S>,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    room: &str,
) -> Result<(Identity, RoomId), ApiError> {
    let who = api
        .authenticate(headers, params.get("token").map(String::as_str))
        .await?;
    let room = room_param(room)?;
    api.authorize_read(&who, &room).await?;
    Ok((who, room))
}

async fn messages<S: Store>(
    State(api): Api<S>,
    Path(room): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Response, ApiError> {
    // Authenticate before looking at parameters: a stranger learns nothing but 401.
    let who = api
        .authenticate(&headers, params.get("token").map(String::as_str))
        .await?;
    let page = cursor_page(&params)?;
    let room = room_param(&room)?;
    api.authorize_read(&who, &room).await?;
    let page = api.messages_page(&room, PageQuery::Cursor(page)).await?;
    // Serialized from the shared page: coalesced callers never copy it.
    Ok(Json(&*page).into_response())
}

async fn messages_by_page<S: Store>(
    State(api): Api<S>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let who = api
        .authenticate(&headers, params.get("token").map(String::as_str))
        .await?;
    let room = params
        .get("room")
        .ok_or_else(|| ApiError::invalid("`room` is required"))?;
    let room = room_param(room)?;
    let n = match u64_param(&params, "page")? {
        None => 1,
        Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => n as u32,
        Some(_) => return Err(ApiError::invalid("`page` must be 1 or more")),
    };
    api.authorize_read(&who, &room).await?;
    let page = api.messages_page(&room, PageQuery::Number(n)).await?;
    Ok(Json(&*page).into_response())
}

#[derive(Serialize)]
struct Pins {
    pins: Vec<PinView>,
}

async fn pins<S: Store>(
    State(api): Api<S>,
    Path(room): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Json<Pins>, ApiError> {
    let (_, room) = reader(&api, &headers, &params, &room).await?;
    Ok(Json(Pins {
        pins: api.store.pins(&room).await?,
    }))
}

#[derive(Serialize)]
struct Markers {
    markers: Vec<ReadMarker>,
}

async fn receipts<S: Store>(
    State(api): Api<S>,
    Path(room): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Json<Markers>, ApiError> {
    let (_, room) = reader(&api, &headers, &params, &room).await?;
    Ok(Json(Markers {
        markers: api.store.markers(&room).await?,
    }))
}

#[derive(Serialize)]
struct Members {
    members: Vec<MemberInfo>,
}

async fn members<S: Store>(
    State(api): Api<S>,
    Path(room): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Json<Members>, ApiError> {
    let (_, room) = reader(&api, &headers, &params, &room).await?;
    let state = api
        .store
        .room_state(&room)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no room {room}")))?;
    Ok(Json(Members {
        members: state.members,
    }))
}

#[derive(Serialize)]
struct Bans {
    bans: Vec<Ban>,
}

/// The bans in force, for the room's owner and admins (and global admins): what an unban
/// needs to offer. Everyone else gets 403, members included.
async fn bans<S: Store>(
    State(api): Api<S>,
    Path(room): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Json<Bans>, ApiError> {
    let (who, room) = reader(&api, &headers, &params, &room).await?;
    let state = api
        .store
        .room_state(&room)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no room {room}")))?;
    Access::of_state(&state, &who).check(Action::ListBans)?;
    let now = Timestamp::now();
    Ok(Json(Bans {
        bans: state
            .bans
            .into_iter()
            .filter(|b| b.active_at(now))
            .collect(),
    }))
}

#[derive(Serialize)]
struct Rooms {
    rooms: Vec<RoomSummary>,
}

async fn list_rooms<S: Store>(
    State(api): Api<S>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Json<Rooms>, ApiError> {
    let who = api
        .authenticate(&headers, params.get("token").map(String::as_str))
        .await?;
    Ok(Json(Rooms {
        rooms: api.list_rooms(&who).await?,
    }))
}
