//! Wire types of chat protocol v1 (`docs/protocol.md`). No I/O, no runtime.
//!
//! # Layout
//! - [`ids`]: room ids (validated), message ids (decimal strings on the wire), user
//!   references, RFC 3339 timestamps, the client's `ref`.
//! - [`client`]: client → server commands and [`client::decode`], which turns any bytes into
//!   a typed command or a typed error (never a panic).
//! - [`server`]: server → client events. Stored room events carry `seq`.
//! - [`rooms`]: room settings, roles, and the message/pin/member views the HTTP API shares.
//! - [`errors`]: error codes, their HTTP statuses, close codes.
//! - [`auth`]: JWT claims and verification (HS256 secret, RS256/EdDSA public key, dev key).
//! - [`envelope`]: how frames travel between nodes and into the persistence stream.
//!
//! Data flow: a client frame is decoded here into a [`client::Command`]; the gateway answers
//! with [`server::ServerEvent`]s serialized once and shared by every recipient.

pub mod auth;
pub mod client;
pub mod envelope;
pub mod errors;
pub mod ids;
pub mod rooms;
pub mod server;

pub use client::{Command, Inbound};
pub use errors::ErrorCode;
pub use ids::{MessageId, Ref, RoomId, Timestamp, UserRef};
pub use server::{EventKind, ServerEvent};
