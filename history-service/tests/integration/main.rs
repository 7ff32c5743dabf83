//! One integration test binary for the history service (one link on a 2-core machine).
//!
//! - `contract`: the `Store` contract, written once, run against SQLite, against
//!   `RemoteStore` → internal API → SQLite over real HTTP, and against ScyllaDB when
//!   `SCYLLA_URI` is set (otherwise those tests print `SKIPPED: ...` and pass).
//! - `http`: the public HTTP API (docs/protocol.md) on a real socket.
//! - `consumer`: the persistence-stream consumer against a real `redis-server`.
//! - `binary`: the `history-service` executable itself (flags, `listening on`, SIGTERM).
//! - `telemetry`: traces over OTLP/HTTP to a fake collector (traceparent from the stream),
//!   HELP text on `/metrics`.

mod binary;
mod consumer;
mod contract;
mod http;
mod support;
mod telemetry;
