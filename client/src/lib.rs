//! bkp client library: configuration, connection, push pipeline,
//! restore. The `bkp` binary only parses arguments and calls [`cli`].

pub mod backup_def;
pub mod browse;
pub mod cli;
pub mod config;
pub mod conn;
pub mod crypt;
pub mod error;
pub mod mount;
pub mod parallel_hash;
pub mod progress;
pub mod push;
pub mod restore;
pub mod run;

pub use conn::Client;
pub use error::ClientError;
