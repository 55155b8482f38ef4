//! bkp client library: configuration, connection, push pipeline,
//! restore. The `bkp` binary only parses arguments and calls [`cli`].

pub mod cache;
pub mod cli;
pub mod config;
pub mod conn;
pub mod error;
pub mod fetch;
pub mod incremental;
pub mod list;
pub mod par;
pub mod pipeline;
pub mod progress;
pub mod push;
pub mod restore;
pub mod safepath;
pub mod select;
pub mod walk;
pub mod write;

pub use conn::Client;
pub use error::ClientError;
