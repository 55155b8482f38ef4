//! bkp-server: QUIC endpoint, authentication, snapshot commits and the
//! RocksDB chunk store. See `store` for the storage design and
//! docs/ARCHITECTURE.md for the whole system.

pub mod alerts;
pub mod audit;
pub mod cli;
pub mod commit;
pub mod config;
mod connection;
pub mod control;
pub mod freshness;
pub mod gc;
mod http;
pub mod jobs;
#[cfg(test)]
mod layering;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod perms;
pub mod prune;
pub mod push_failures;
pub mod retention;
pub mod schedule;
pub mod server;
pub mod service;
pub mod sessions;
pub mod state;
pub mod status;
mod status_html;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod verify;

pub use server::{bind, run, serve};
pub use state::ServerState;
