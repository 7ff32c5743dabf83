//! [`AnyStore`]: the store a binary picks from its configuration, as one concrete type.
//!
//! An enum rather than `dyn Store`: the set of backends is ours and closed, `Store` returns
//! `impl Future` (not object safe), and a `match` per call costs nothing next to the I/O.

use proto::rooms::{MessageView, PinView, ReadMarker, Role, RoomInfo};
use proto::{MessageId, RoomId, ServerEvent, Timestamp, UserRef};

use super::scylla::{DriverSettings, ScyllaConfig, ScyllaStore};
use super::sqlite::SqliteStore;
use super::{Ban, MemberPut, Page, RoomAccess, RoomState, Store, StoreError};
use crate::remote::RemoteStore;

pub enum AnyStore {
    Sqlite(SqliteStore),
    Scylla(ScyllaStore),
    /// The history service's internal API (a gateway in scaled mode).
    Remote(RemoteStore),
}

/// Where a store URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://<path>`: `sqlite://./data/history.db` (relative), `sqlite:///var/lib/x.db`.
    Sqlite(std::path::PathBuf),
    /// `scylla://[user:password@]host[:port][,host2[:port]]/keyspace`.
    Scylla(ScyllaConfig),
    /// `http://host:port` of a history service (no internal token; see [`RemoteStore::new`]).
    Remote(String),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::Internal(format!(
                    "bad store url {url:?}: sqlite:// needs a file path"
                )));
            }
            Ok(StoreUrl::Sqlite(path.into()))
        } else if url.starts_with("scylla://") {
            Ok(StoreUrl::Scylla(ScyllaConfig::parse(url)?))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            Ok(StoreUrl::Remote(url.to_owned()))
        } else {
            Err(StoreError::Internal(format!(
                "bad store url {url:?}: expected sqlite://<path>, scylla://<hosts>/<keyspace> or http://<history service>"
            )))
        }
    }
}

impl AnyStore {
    /// Opens the store `url` names (see [`StoreUrl`]) with the driver's default settings.
    /// SQLite creates its schema on open; ScyllaDB needs [`AnyStore::migrate`] first.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &DriverSettings::default()).await
    }

    /// [`AnyStore::connect`], with `scylla` as the driver settings of a `scylla://` store.
    pub async fn connect_with(url: &str, scylla: &DriverSettings) -> Result<Self, StoreError> {
        Ok(match StoreUrl::parse(url)? {
            StoreUrl::Sqlite(path) => {
                // Opening runs schema DDL and may create directories: keep it off the runtime.
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(path))
                    .await
                    .map_err(|e| StoreError::Internal(e.to_string()))??;
                AnyStore::Sqlite(store)
            }
            StoreUrl::Scylla(config) => {
                AnyStore::Scylla(ScyllaStore::connect(&config.with_driver(scylla.clone())).await?)
            }
            StoreUrl::Remote(base) => AnyStore::Remote(RemoteStore::new(&base, None)?),
        })
    }

    /// Applies the schema idempotently: ScyllaDB keyspace (with `replication`, a CQL map),
    /// tables and one-off data steps, connecting with `scylla`; SQLite creates its schema by
    /// opening the file. Nothing to do for a remote store.
    pub async fn migrate(
        url: &str,
        replication: &str,
        scylla: &DriverSettings,
    ) -> Result<(), StoreError> {
        match StoreUrl::parse(url)? {
            StoreUrl::Sqlite(path) => {
                tokio::task::spawn_blocking(move || SqliteStore::open(path).map(drop))
                    .await
                    .map_err(|e| StoreError::Internal(e.to_string()))?
            }
            StoreUrl::Scylla(config) => {
                super::scylla::migrate(&config.with_driver(scylla.clone()), replication).await
            }
            StoreUrl::Remote(_) => Ok(()),
        }
    }

    /// `sqlite`, `scylla` or `remote`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Scylla(_) => "scylla",
            AnyStore::Remote(_) => "remote",
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call,
            AnyStore::Scylla($s) => $call,
            AnyStore::Remote($s) => $call,
        }
    };
}

impl Store for AnyStore {
    async fn apply(&self, events: &[ServerEvent]) -> Result<(), StoreError> {
        delegate!(self, s => s.apply(events).await)
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, StoreError> {
        delegate!(self, s => s.last_seq(room).await)
    }

    async fn messages(&self, room: &RoomId, page: Page) -> Result<Vec<MessageView>, StoreError> {
        delegate!(self, s => s.messages(room, page).await)
    }

    async fn message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        delegate!(self, s => s.message(room, id).await)
    }

    async fn pins(&self, room: &RoomId) -> Result<Vec<PinView>, StoreError> {
        delegate!(self, s => s.pins(room).await)
    }

    async fn markers(&self, room: &RoomId) -> Result<Vec<ReadMarker>, StoreError> {
        delegate!(self, s => s.markers(room).await)
    }

    async fn marker(&self, room: &RoomId, user: &str) -> Result<Option<u64>, StoreError> {
        delegate!(self, s => s.marker(room, user).await)
    }

    async fn create_room(&self, info: &RoomInfo, owner: &UserRef) -> Result<(), StoreError> {
        delegate!(self, s => s.create_room(info, owner).await)
    }

    async fn update_room(&self, info: &RoomInfo) -> Result<(), StoreError> {
        delegate!(self, s => s.update_room(info).await)
    }

    async fn delete_room(&self, room: &RoomId) -> Result<(), StoreError> {
        delegate!(self, s => s.delete_room(room).await)
    }

    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>, StoreError> {
        delegate!(self, s => s.room_state(room).await)
    }

    async fn rooms(&self) -> Result<Vec<(RoomInfo, u64)>, StoreError> {
        delegate!(self, s => s.rooms().await)
    }

    async fn put_member(
        &self,
        room: &RoomId,
        user: &UserRef,
        role: Role,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.put_member(room, user, role).await)
    }

    async fn put_members(&self, puts: &[MemberPut]) -> Result<Vec<bool>, StoreError> {
        delegate!(self, s => s.put_members(puts).await)
    }

    async fn markers_of(&self, keys: &[(RoomId, String)]) -> Result<Vec<Option<u64>>, StoreError> {
        delegate!(self, s => s.markers_of(keys).await)
    }

    async fn remove_member(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        delegate!(self, s => s.remove_member(room, user).await)
    }

    async fn set_mute(
        &self,
        room: &RoomId,
        user: &str,
        until: Option<Timestamp>,
        muted: bool,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.set_mute(room, user, until, muted).await)
    }

    async fn put_ban(&self, room: &RoomId, ban: &Ban) -> Result<(), StoreError> {
        delegate!(self, s => s.put_ban(room, ban).await)
    }

    async fn remove_ban(&self, room: &RoomId, user: &str) -> Result<(), StoreError> {
        delegate!(self, s => s.remove_ban(room, user).await)
    }

    async fn access(&self, room: &RoomId, user: &str) -> Result<Option<RoomAccess>, StoreError> {
        delegate!(self, s => s.access(room, user).await)
    }
}
