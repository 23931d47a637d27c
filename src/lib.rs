//! grok-appservice: a Matrix application service that answers addressed messages with xAI Grok
//! models. The binary in `main.rs` is a thin shell over this library so integration tests drive
//! the same code the operator runs.

pub mod access;
pub mod answer;
pub mod backoff;
pub mod cascade;
pub mod claims;
pub mod classify;
pub mod commands;
pub mod config;
pub mod context;
pub mod crypto;
pub mod estimate;
pub mod housekeeping;
pub mod ingest;
pub mod leave_all;
pub mod limiter;
pub mod matrix;
pub mod probes;
pub mod provider;
pub mod registration;
pub mod render;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod vision;
pub mod webhook;
