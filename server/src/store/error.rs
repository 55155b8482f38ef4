//! The store's one error type, in a module of its own so that the schema
//! codecs (below the store's interfaces) can return it without importing
//! the interfaces.

use bkp_common::SnapshotId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("stored data is corrupt: {0}; run a verify job and restore from another copy")]
    Corrupt(String),
    #[error("data directory {0}: {1}")]
    Open(String, String),
    /// A protected snapshot is never deleted, by forget or by prune.
    #[error("snapshot {} is protected; lift the protection first with `bkp protect {} --remove`", .0.short(), .0.short())]
    Protected(SnapshotId),
    /// A write refused (or failed) for want of disk space. Reads go on;
    /// writes resume by themselves once space is freed.
    #[error("server storage is full ({0} MiB free); free space on the server (`bkp-server gc`) and push again")]
    Full(u64),
    /// The object store (backend s3) failed or did not answer, after its
    /// retries.
    #[error("object store (bucket {bucket:?}): {detail}")]
    Bucket { bucket: String, detail: String },
}
