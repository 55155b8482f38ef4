//! Storage. The server talks to a [`Store`]; [`rocks::RocksStore`] is the
//! one implementation and the only module that imports `rocksdb`.
//!
//! # Design
//! * A chunk is stored once, whatever host sent it, as the blob the client
//!   uploaded (compressed by the client, re-hashed by the server before it
//!   gets here: see [`VerifiedChunk`]).
//! * The store records which host has proven it holds which chunk, by
//!   uploading it: the first uploader as the owner in the chunk's
//!   `chunk_meta`, every later one in `host_chunks` (see `schema`). A host
//!   may skip an upload, and may read a chunk, only when such a record
//!   exists: asking about a hash never reveals another host's data and a
//!   hash alone never reads a chunk.
//! * A snapshot is one synced write (record and set index together), made
//!   only after every chunk its tree references was checked (see
//!   `crate::commit`) and made durable. Chunk batches of at least
//!   256 KiB skip RocksDB's write-ahead log, so chunk data is written once
//!   (to a blob file when the memtable is flushed) instead of twice; the
//!   commit first flushes the three chunk column families together
//!   (`atomic_flush`), which makes every chunk written before it durable,
//!   whichever push wrote it. Smaller batches go through the WAL, whose
//!   ordered sync at commit covers them, so small pushes do not make tiny
//!   files. An interrupted push leaves only unreferenced chunks for GC; a
//!   crash loses unflushed chunks, which no snapshot references yet.
//!
//! # Which operations may overlap
//! | pair            | allowed | what protects it                                   |
//! |-----------------|---------|----------------------------------------------------|
//! | push / push     | yes     | chunk puts are idempotent; commits are single batches |
//! | push / restore  | yes     | readers see only committed snapshots               |
//! | restore/restore | yes     | read-only                                          |
//! | verify / push   | yes     | a quarantined chunk is gone from `chunks`, so `host_has` says "missing" and the next push uploads it again; a commit that raced the quarantine fails and asks for a new push |
//! | verify / GC     | yes     | a chunk GC deleted under the scrub is recognised (its meta is gone too) and not reported; a snapshot forgotten under the drill is skipped |
//! | verify / verify | no      | one run of a kind at a time (`jobs`) |
//!
//! # Verification and quarantine
//! The verify job (`crate::verify`) re-reads chunks and rebuilds sampled
//! snapshots. A chunk that fails is moved from `chunks`/`chunk_meta` into
//! `quarantine` (kept, never deleted, for inspection); every snapshot that
//! references it gets a record in `damaged` until a later drill of it
//! passes, which happens once some push has uploaded the chunk again.

//!
//! # Faults
//! * "Stored" means the chunk's data is there, not only its `chunk_meta`
//!   (which outlives its data when a blob file is lost): `host_has`,
//!   `stored_sorted` and `put_chunks` look the data key up (without reading
//!   blob files, see `rocks::RocksStore::data_lookup`).
//! * A full disk: writes are refused with [`StoreError::Full`] before
//!   RocksDB runs out of space, and a reserve file gives GC room
//!   (`space`).
//! * A damaged file: `salvage` reports what is readable and rebuilds a
//!   database from it; a lost WAL tail is logged at open
//!   (`rocks::COMMIT_MARK_FILE`).

pub mod object;
pub mod pack;
pub mod rocks;
pub mod salvage;
pub mod schema;
pub mod space;

pub use schema::{ChunkMeta, HostNum, QuarantineRecord};

use bkp_common::blob;
use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};

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
}

/// A chunk whose blob was decoded and re-hashed by the server. The only
/// way to build one is [`VerifiedChunk::verify`], so nothing unchecked
/// reaches the store.
#[derive(Debug)]
pub struct VerifiedChunk {
    id: ChunkId,
    blob: Vec<u8>,
    raw_len: u32,
}

impl VerifiedChunk {
    pub fn verify(id: ChunkId, blob: Vec<u8>) -> Result<Self, blob::BlobError> {
        let data = blob::decode_verified(&blob, &id)?;
        Ok(Self { id, blob, raw_len: data.len() as u32 })
    }

    pub fn id(&self) -> &ChunkId {
        &self.id
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutStats {
    pub new_chunks: u32,
    pub new_bytes: u64,
}

pub trait Store: Send + Sync + 'static {
    /// For each id: may `host` reuse this chunk without uploading it? True
    /// only when the host has proven it holds the chunk and the chunk is
    /// still stored.
    fn host_has(&self, host: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError>;
    /// For each id: has `host` proven it holds this chunk? (Its possession
    /// record only: whether the chunk is still stored is the read's to
    /// find out.)
    fn host_holds(&self, host: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError>;
    /// For each id of `ids`, which must be sorted and free of repeats: is
    /// the chunk stored, its data included? (Sorted keys let RocksDB look
    /// up neighbours in one pass over each block.)
    fn stored_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError>;
    /// As [`Store::stored_sorted`], from `chunk_meta` alone: the store's
    /// own record of what it holds, without touching chunk data (what GC
    /// checks its references against).
    fn recorded_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError>;
    /// Stores chunks and records that `host` holds them.
    fn put_chunks(&self, host: &str, chunks: &[VerifiedChunk]) -> Result<PutStats, StoreError>;
    /// The stored blob of a chunk.
    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a checked snapshot durably; returns its id and summary.
    fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotSummary, StoreError>;
    fn snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>, StoreError>;
    /// Removes a snapshot (record and index) durably. Its chunks stay
    /// until garbage collection. Returns false if it did not exist, and
    /// [`StoreError::Protected`] if it is protected: the check and the
    /// delete are one step, so a protect racing a prune cannot lose.
    fn delete_snapshot(&self, id: &SnapshotId) -> Result<bool, StoreError>;
    /// Marks a snapshot protected (prune never removes it) or not.
    fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<bool, StoreError>;
    /// Up to `limit` (host, chunk) possession records of `host_chunks`
    /// after `after` (owners are in [`ChunkMeta`]).
    fn host_chunks(
        &self,
        after: Option<&(String, ChunkId)>,
        limit: usize,
    ) -> Result<Vec<(String, ChunkId)>, StoreError>;
    /// Deletes chunks; returns the stored bytes freed.
    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<u64, StoreError>;
    /// Ends these hosts' possession of these chunks, wherever it is
    /// recorded (a `host_chunks` key, or the owner of the chunk's meta).
    fn forget_possession(&self, keys: &[(String, ChunkId)]) -> Result<(), StoreError>;
    /// The host a [`ChunkMeta::owner`] names.
    fn host_name(&self, n: HostNum) -> Option<String>;
    /// Compacts so that deleted data really leaves the disk (blob files
    /// included). Fails when a compaction failed, or had no room to run.
    fn reclaim_space(&self) -> Result<(), StoreError>;
    /// Gives the disk space reserve back when free space is short, so
    /// that deletes and compactions (GC) have room; returns the bytes
    /// released. The store makes the reserve again once there is room.
    fn release_reserve_if_short(&self) -> u64;
    /// Bytes the database occupies on disk.
    fn disk_bytes(&self) -> Result<u64, StoreError>;
    fn put_job(&self, start_ns: u64, kind: &str, record: &[u8]) -> Result<(), StoreError>;
    /// The newest `limit` job records, newest first.
    fn jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Up to `limit` stored chunks after `after`, in key order, with their
    /// sizes.
    fn chunk_metas(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<(ChunkId, ChunkMeta)>, StoreError>;
    fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>, StoreError>;
    /// Takes a chunk out of service in one synced write: its blob (if any)
    /// goes to the quarantine with `reason`, and it is no longer stored.
    fn quarantine_chunk(&self, id: &ChunkId, reason: &str, now_ns: u64) -> Result<(), StoreError>;
    /// Quarantined chunks (blobs left out).
    fn quarantined(&self) -> Result<Vec<(ChunkId, QuarantineRecord)>, StoreError>;
    fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Damage records of snapshots that failed verification.
    fn damaged(&self) -> Result<Vec<(SnapshotId, Vec<u8>)>, StoreError>;
    fn put_damaged(&self, id: &SnapshotId, record: &[u8]) -> Result<(), StoreError>;
    fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError>;
    /// Summaries, oldest first, filtered by host and set name.
    fn list_snapshots(&self, host: Option<&str>, name: Option<&str>) -> Result<Vec<SnapshotSummary>, StoreError>;
}
