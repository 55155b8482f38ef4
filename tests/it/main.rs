//! End-to-end tests, compiled into one binary. Each starts a real server
//! on 127.0.0.1 with a real RocksDB and drives the real `bkp` binary.

mod audit;
mod browse;
mod crypt;
mod dos;
mod email;
mod excludes;
mod exitcodes;
mod faults;
mod gc;
mod gc_cost;
mod hardening;
mod incremental;
mod jobs;
mod logs;
mod metadata;
mod monitoring;
mod mount;
mod postgres;
mod reload;
mod resilience;
mod run;
mod s3;
mod s3_faults;
mod s3_offline;
mod security;
mod status;
mod stream;
mod sync;
mod timeout;
mod tree;
mod verify;
