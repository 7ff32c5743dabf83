//! Gateway integration tests: real servers on port 0, real WebSocket clients. One test binary
//! (link time on 2 cores); modules by subject.

mod support;

mod auth;
mod authorization;
mod bad_input;
mod cluster;
mod expiry;
mod floods;
mod history;
mod hostile;
mod keys;
mod listeners;
mod messaging;
mod pins_receipts;
mod pipelining;
mod presence;
mod recovery;
mod recovery_stress;
mod rooms;
mod server_api;
mod slow_and_floods;
mod startup;
mod storms;
mod telemetry;
