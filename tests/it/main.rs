//! End-to-end tests, compiled into one binary. Each starts a real server
//! on 127.0.0.1 with a real RocksDB and drives the real `bkp` binary.

mod audit;
mod dos;
mod email;
mod faults;
mod gc;
mod hardening;
mod incremental;
mod jobs;
mod logs;
mod metadata;
mod monitoring;
mod postgres;
mod resilience;
mod s3;
mod s3_faults;
mod security;
mod status;
mod stream;
mod tree;
mod verify;
