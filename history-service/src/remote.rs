//! [`RemoteStore`]: the [`Store`] trait over the history service's internal API
//! ([`crate::internal`]) — what a gateway uses in scaled mode, where the history service owns
//! the database.
//!
//! Failures map to what a caller can act on: the service unreachable, timing out or answering
//! 5xx is [`StoreError::Unavailable`] (retry; the gateway answers `unavailable`), 409 is
//! `Conflict`, a `not_found` answer is `NotFound`; anything else (a wrong internal token, a
//! body the service refuses) is `Internal` — a deployment or version mismatch, not weather.

use std::time::Duration;

use proto::errors::{ErrorCode, HttpError};
use proto::rooms::{MessageView, PinView, ReadMarker, Role, RoomInfo};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::internal::{self, *};
use crate::store::{Ban, MemberPut, Page, RoomAccess, RoomState, Store, StoreError};

/// Connecting to the service at most this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole call at most this long (an `apply` batch included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct RemoteStore {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl RemoteStore {
    /// A store at `base_url` (`http://history:8081`), sending `token` as the internal token
    /// when given (the service's `CHAT_INTERNAL_TOKEN`).
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, StoreError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(StoreError::Internal(format!(
                "history url {base_url:?} must start with http://"
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // The gateway talks to its history service over the cluster network: no proxy.
            .no_proxy()
            .build()
            .map_err(|e| StoreError::Internal(format!("http client: {e}")))?;
        Ok(Self {
            client,
            base,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The service's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        body: &B,
    ) -> Result<R, StoreError> {
        let url = format!("{}{}/{method}", self.base, internal::PREFIX);
        let mut req = self.client.post(&url).json(body);
        if let Some(token) = &self.token {
            req = req.header(internal::TOKEN_HEADER, token);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(format!("history service {method}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| StoreError::Unavailable(format!("history service {method}: {e}")))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::Internal(format!("history service {method}: bad answer: {e}"))
            });
        }
        let error = serde_json::from_slice::<HttpError>(&bytes).ok();
        let message = error.as_ref().map_or_else(
            || String::from_utf8_lossy(&bytes).into_owned(),
            |e| e.error.message.clone(),
        );
        let code = error.map(|e| e.error.code);
        Err(match (status.as_u16(), code) {
            (409, _) => StoreError::Conflict,
            // Only our own `not_found`: a 404 from a proxy or an older service without this
            // route is a deployment problem, not "no such row".
            (404, Some(ErrorCode::NotFound)) => StoreError::NotFound,
            (s, _) if s >= 500 => {
                StoreError::Unavailable(format!("history service {method}: {status}: {message}"))
            }
            _ => StoreError::Internal(format!("history service {method}: {status}: {message}")),
        })
    }
}

impl Store for RemoteStore {
    async fn apply(&self, events: &[ServerEvent]) -> Result<(), StoreError> {
        self.call(
            "apply",
            &ApplyReq {
                events: events.to_vec(),
            },
        )
        .await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, StoreError> {
        self.call("last_seq", &RoomReq { room: room.clone() }).await
    }

    async fn messages(&self, room: &RoomId, page: Page) -> Result<Vec<MessageView>, StoreError> {
        self.call(
            "messages",
            &MessagesReq {
                room: room.clone(),
                page,
            },
        )
        .await
    }

    async fn message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        self.call(
            "message",
            &MessageReq {
                room: room.clone(),
                id,
            },
        )
        .await
    }

    async fn pins(&self, room: &RoomId) -> Result<Vec<PinView>, StoreError> {
        self.call("pins", &RoomReq { room: room.clone() }).await
    }

    async fn markers(&self, room: &RoomId) -> Result<Vec<ReadMarker>, StoreError> {
        self.call("markers", &RoomReq { room: room.clone() }).await
    }

    async fn create_room(&self, info: &RoomInfo, owner: &UserRef) -> Result<(), StoreError> {
        self.call(
            "create_room",
            &CreateRoomReq {
                info: info.clone(),
                owner: owner.clone(),
            },
        )
        .await
    }

    async fn update_room(&self, info: &RoomInfo) -> Result<(), StoreError> {
        self.call("update_room", &InfoReq { info: info.clone() })
            .await
    }

    async fn delete_room(&self, room: &RoomId) -> Result<(), StoreError> {
        self.call("delete_room", &RoomReq { room: room.clone() })
            .await
    }

    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        self.call("room_state", &RoomReq { room: room.clone() })
            .await
    }

    async fn rooms(&self) -> Result<Vec<(RoomInfo, u64)>, StoreError> {
        self.call("rooms", &EmptyReq::default()).await
    }

    async fn put_member(
        &self,
        room: &RoomId,
        user: &UserRef,
        role: Role,
    ) -> Result<(), StoreError> {
        self.call(
            "put_member",
            &PutMemberReq {
                room: room.clone(),
                user: user.clone(),
                role,
            },
        )
        .await
    }

    async fn put_members(&self, puts: &[MemberPut]) -> Result<Vec<bool>, StoreError> {
        self.call(
            "put_members",
            &PutMembersReq {
                puts: puts.to_vec(),
            },
        )
        .await
    }

    async fn markers_of(&self, keys: &[(RoomId, String)]) -> Result<Vec<Option<u64>>, StoreError> {
        self.call(
            "markers_of",
            &MarkersOfReq {
                keys: keys.to_vec(),
            },
        )
        .await
    }

    async fn remove_member(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.call(
            "remove_member",
            &UserReq {
                room: room.clone(),
                user: user.to_owned(),
            },
        )
        .await
    }

    async fn set_mute(
        &self,
        room: &RoomId,
        user: &str,
        until: Option<Timestamp>,
        muted: bool,
    ) -> Result<(), StoreError> {
        self.call(
            "set_mute",
            &SetMuteReq {
                room: room.clone(),
                user: user.to_owned(),
                until,
                muted,
            },
        )
        .await
    }

    async fn put_ban(&self, room: &RoomId, ban: &Ban) -> Result<(), StoreError> {
        self.call(
            "put_ban",
            &PutBanReq {
                room: room.clone(),
                ban: ban.clone(),
            },
        )
        .await
    }

    async fn remove_ban(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        self.call(
            "remove_ban",
            &UserReq {
                room: room.clone(),
                user: user.to_owned(),
            },
        )
        .await
    }

    async fn access(&self, room: &RoomId, user: &str) -> Result<Option<RoomAccess>, StoreError> {
        self.call(
            "access",
            &UserReq {
                room: room.clone(),
                user: user.to_owned(),
            },
        )
        .await
    }
}
