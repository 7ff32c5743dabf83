//! The history service: the product's durable state behind one trait, the HTTP API that
//! reads it, and the consumer that fills it from the persistence stream. A library (the
//! gateway embeds the store and the API in single-node mode) and a binary (`src/main.rs`, the
//! separate service when scaled out).
//!
//! # Layout
//! - [`store`]: the [`store::Store`] trait (the contract with the gateway) and its types;
//!   [`store::sqlite`] (embedded default: WAL, one batching writer thread, a reader pool),
//!   [`store::scylla`] (scaled out: seq-bucketed partitions, seq-as-write-timestamp
//!   idempotence, schema in `deploy/scylla/schema.cql`), [`store::AnyStore`] (picked by URL).
//! - [`remote`]: [`remote::RemoteStore`], the same trait over HTTP — a scaled-out gateway's
//!   view of the history service.
//! - [`internal`]: the `/internal/v1/*` routes that serve `RemoteStore` (never public).
//! - [`http`]: the public HTTP API (`/api/rooms/{room}/messages`, pins, receipts, members,
//!   rooms), built from a [`http::HistoryApi`] over any store; the gateway mounts it too.
//! - [`singleflight`]: coalesces identical concurrent reads (a hot room's newest page).
//! - [`consumer`]: the Redis persistence streams (one per partition) → `Store::apply`, acked
//!   (and deleted from the stream) after the write, dead consumers' entries reclaimed.
//! - [`redis_conn`]: connections to Redis (one primary or a Redis Cluster) for both binaries;
//!   [`partitions`]: which keys a room and its persistence stream live under.
//! - [`server`]: the process around them: `/healthz`, `/readyz`, `/metrics`, the consumer
//!   beside the HTTP server, graceful shutdown. `src/main.rs` parses the configuration
//!   (flags and `CHAT_*` variables) and calls [`server::run`]; `history-service migrate`
//!   applies the schema.
//! - [`keys`]: the keys client tokens are verified with (configured keys, keys by `kid`, a
//!   JWKS fetched and refreshed over HTTP) for both binaries; [`secrets`]: secret settings
//!   read from files (`CHAT_*_FILE`).
//! - [`telemetry`]: logs and OpenTelemetry traces for both binaries (the gateway's telemetry
//!   uses it), W3C `traceparent` in and out of the persistence stream.
//! - [`startup`]: both binaries' start-up failures (a bad setting, a taken address) as one
//!   line naming the setting.
//!
//! # Data flow
//! Scaled out: gateway → (Redis stream `chat:{pN}:persist` of the room's partition) → [`consumer::Consumer`] →
//! `Store::apply` → ScyllaDB; clients read history through [`http`]; gateways read and write
//! room state through [`remote::RemoteStore`] → [`internal`] → the store. Embedded: the
//! gateway calls a [`store::sqlite::SqliteStore`] directly and mounts [`http::router`].

pub mod access;
pub mod consumer;
pub mod http;
pub mod internal;
pub mod keys;
pub mod partitions;
pub mod redis_conn;
pub mod redis_settings;
pub mod redis_up;
pub mod remote;
pub mod secrets;
pub mod sentinel;
pub mod server;
pub mod singleflight;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use http::{router, HistoryApi};
pub use store::{AnyStore, Store, StoreError};
