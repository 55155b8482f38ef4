//! Storage, as two interfaces: [`ChunkStore`] (chunk data: put, get,
//! delete, presence, reclaim) and [`MetaStore`] (everything else:
//! `chunk_meta`, possession, snapshots, jobs, meta, quarantine, damage).
//! [`rocks::RocksStore`] is the metadata store over the local RocksDB;
//! its chunk data backend is [`rocks::LocalChunks`] (the same database)
//! or, later, an object store. `rocks` is the only module that imports
//! `rocksdb`. [`Store`] is both at once, for callers not yet split.
//!
//! # One write per put
//! `MetaStore::put_chunks` decides which chunks are new (and which lost
//! their data), has the chunk data backend add their data to its batch
//! ([`ChunkStore::stage_data`]), adds the `chunk_meta` and `host_chunks`
//! rows, and writes the batch once (`rocks::Db::write_put`). So the local
//! backend writes data and metadata as one RocksDB batch, unlogged from
//! 256 KiB and flushed atomically at commit, exactly as before the split;
//! an object store adds the rows of its own index (each chunk's pack and
//! offset) to the same batch. Deletes and quarantine work the same way
//! ([`ChunkStore::stage_delete`]). A commit calls [`ChunkStore::persist`]
//! (an object store uploads its open packs) before its snapshot is written.
//!
//! What a crash may leave, per backend:
//! * metadata without data: tolerated everywhere. `has_data` says no, so
//!   `host_has` says "missing" and the next push uploads the chunk again
//!   (what a lost blob file leaves today). A backend must never answer
//!   `has_data` yes for data it cannot read back.
//! * data without metadata (a backend that writes its data before the
//!   batch, e.g. a pack PUT): an orphan, listed by
//!   [`ChunkStore::orphan_candidates`] and deleted by GC when no
//!   `chunk_meta` records it. The local backend cannot leave one.
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
//! See the table in the server crate's doc (`crate`, "Which operations may
//! overlap"): what the store guarantees there is that chunk puts are
//! idempotent, a commit and a snapshot delete are each one write, and a
//! quarantine is one synced write.
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
//!   `stored_sorted` and `put_chunks` ask [`ChunkStore::has_data`] (the
//!   local backend answers without reading blob files, see
//!   `rocks::LocalChunks`).
//! * A full disk: writes are refused with [`StoreError::Full`] before
//!   RocksDB runs out of space, and a reserve file gives GC room
//!   (`space`).
//! * A damaged file: `salvage` reports what is readable and rebuilds a
//!   database from it; a lost WAL tail is logged at open
//!   (`rocks::COMMIT_MARK_FILE`).

mod error;
pub mod object;
pub mod pack;
pub mod rocks;
pub mod s3;
pub mod salvage;
pub mod schema;
pub mod space;

pub use error::StoreError;
pub use schema::{AlertState, ChunkMeta, Damage, HostNum, PushFailure, QuarantineRecord, ScheduledSince, ScrubCursor};

use bkp_common::blob;
use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};

use crate::report::JobRecord;

/// A chunk whose blob was decoded and re-hashed by the server (or, for a
/// sealed chunk, whose key hash and ciphertext hash were checked: see
/// `bkp_common::seal`). The only way to build one is
/// [`VerifiedChunk::verify`], so nothing unchecked reaches the store.
#[derive(Debug)]
pub struct VerifiedChunk {
    id: ChunkId,
    blob: Vec<u8>,
    raw_len: u32,
}

impl VerifiedChunk {
    pub fn verify(id: ChunkId, blob: Vec<u8>) -> Result<Self, blob::BlobError> {
        let checked = blob::check(&blob, &id)?;
        Ok(Self { id, blob, raw_len: checked.raw_len })
    }

    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    /// The blob as uploaded (and checked).
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// The length of the chunk's data, decompressed.
    pub fn raw_len(&self) -> u32 {
        self.raw_len
    }
}

/// Runs a step under the GC fence (the write side of the sessions' fence:
/// no put batch, commit or quarantine runs meanwhile).
pub type Fence<'a> = dyn Fn(&mut dyn FnMut() -> Result<(), StoreError>) -> Result<(), StoreError> + 'a;

/// An object store backend's figures (metrics, and the bucket alert).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendStats {
    pub puts: u64,
    pub gets: u64,
    /// Failed attempts (retried or not).
    pub errors: u64,
    pub retries: u64,
    pub bytes_put: u64,
    pub bytes_got: u64,
    /// Bytes of sealed packs waiting for (or in) their upload.
    pub upload_queue_bytes: u64,
    /// Packs recorded as stored, and their bytes.
    pub packs: u64,
    pub pack_bytes: u64,
    /// Seconds the bucket has not answered, if it does not.
    pub unreachable_secs: Option<u64>,
    /// `[storage] unreachable_alert_secs`.
    pub unreachable_alert_secs: u64,
}

/// What [`ChunkStore::gc_packs`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PackGcStats {
    /// Objects deleted from the bucket (dead, retired and orphan packs).
    pub objects_deleted: u64,
    /// Bytes of the dead and retired packs deleted.
    pub bytes_deleted: u64,
    /// Packs whose live chunks were copied into new packs.
    pub packs_repacked: u64,
    /// Blob bytes copied by those repacks.
    pub bytes_rewritten: u64,
}

/// A container of chunks (an object store's pack), as the scrub walks
/// them: `id` is its name (a blake3 hash, so ids spread evenly over the
/// key space, as chunk ids do, and the scrub's slices and cursor work on
/// them unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Container {
    pub id: [u8; 32],
    /// The backend's own number for it.
    pub num: u64,
    pub bytes: u64,
}

/// Called by [`ChunkStore::scrub_container`] with each live chunk of the
/// container and its blob (`None`: the container is missing); returns why
/// the chunk is bad, if it is (the caller has quarantined it by then).
pub type ContainerCheck<'a> = dyn FnMut(&ChunkId, Option<&[u8]>) -> Result<Option<String>, StoreError> + 'a;

/// What [`ChunkStore::scrub_container`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ContainerScrub {
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks found bad (or missing).
    pub bad: u64,
    /// The container was missing from the store.
    pub missing: bool,
}

/// How far [`ChunkStore::reclaim_space_with`] goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReclaimOptions {
    /// Rewrite a part of the store (relocate its live chunks) only when
    /// more than this share of it is garbage: 0.0 reclaims everything.
    pub garbage_ratio: f64,
}

/// What [`ChunkStore::reclaim_space_with`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Bytes the reclaim wrote: compaction output, relocated chunks
    /// included (and any compaction that ran meanwhile).
    pub bytes_rewritten: u64,
    /// Live chunk bytes moved out of files with garbage.
    pub bytes_relocated: u64,
    /// Garbage the store held before: estimated from its own records.
    pub garbage_before: u64,
    /// Bytes of the chunk data files before (blob files, for the local
    /// backend).
    pub data_bytes_before: u64,
    /// Relocation passes run (each over the oldest quarter of the files).
    pub relocation_passes: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutStats {
    pub new_chunks: u32,
    pub new_bytes: u64,
}

/// Chunk data: the bytes of verified chunks, by id. Knows nothing of
/// hosts, possession or snapshots (that is [`MetaStore`]'s). The local
/// backend is [`rocks::LocalChunks`]; an object store is the second.
///
/// A backend keeps whatever index it needs (an object store: each
/// chunk's pack and offset) in the local database, in the rows it adds
/// to the metadata's batches ([`ChunkStore::stage_data`],
/// [`ChunkStore::stage_delete`]), so a put is one atomic write of data
/// index and metadata together.
pub trait ChunkStore: Send + Sync + 'static {
    /// For each id: is its data stored and readable? `sorted`: the ids are
    /// in key order and unique (lets the lookup share work between
    /// neighbours). Must not read the data itself where that can be
    /// avoided: a push asks this of every chunk it sends.
    fn has_data(&self, ids: &[&ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError>;
    /// Adds the data of `chunks` (or what stands for it) to `batch`, the
    /// metadata store's write that records them. See the module doc for
    /// what a backend may and may not leave behind in a crash.
    fn stage_data(&self, chunks: &[&VerifiedChunk], batch: &mut rocks::durability::Batch<'_>)
        -> Result<(), StoreError>;
    /// Adds the removal of these chunks' data to `batch` (ids with no data
    /// are skipped).
    fn stage_delete(&self, ids: &[ChunkId], batch: &mut rocks::durability::Batch<'_>) -> Result<(), StoreError>;
    /// The stored blob of a chunk, as uploaded (readers check its hash).
    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError>;
    /// The blobs of the first of `ids`, in order, until `max_bytes` are
    /// read or a chunk is missing (`None`, then the last item). A backend
    /// with slow reads fetches them together (an object store: neighbours
    /// merged into one ranged GET, many GETs in flight); the default reads
    /// one after the other.
    fn chunk_blobs(&self, ids: &[ChunkId], max_bytes: usize) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let (mut out, mut bytes) = (Vec::new(), 0);
        for id in ids {
            let blob = self.chunk_blob(id)?;
            bytes += blob.as_ref().map_or(0, Vec::len);
            let stop = blob.is_none() || bytes >= max_bytes;
            out.push(blob);
            if stop {
                break;
            }
        }
        Ok(out)
    }
    /// How many blob bytes a fetch should ask [`ChunkStore::chunk_blobs`]
    /// for at once: enough to keep the backend busy, little enough to hold.
    fn read_batch_bytes(&self) -> usize {
        1 << 20
    }
    /// Told by a commit, after its tree was checked and before
    /// [`ChunkStore::persist`]: these are the snapshot's tree chunks. An
    /// object store keeps them apart (tree packs, and a local copy, so
    /// reading a tree never needs the bucket); the local backend has
    /// nothing to do.
    fn keep_trees(&self, _trees: &[ChunkId]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Told by a commit after [`ChunkStore::persist`], before its local
    /// batch: the snapshot record to keep beside the data (an object
    /// store writes it to the bucket, from which `rebuild` reads it).
    fn record_snapshot(&self, _id: &SnapshotId, _record: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Told after a snapshot was deleted (best effort: GC removes what is
    /// left).
    fn forget_snapshot(&self, _id: &SnapshotId) {}
    /// Makes the data of every chunk staged so far durable. A commit calls
    /// it before its snapshot is written; acknowledged means stored.
    fn persist(&self) -> Result<(), StoreError>;
    /// Up to `limit` ids, in key order after `after`, whose data may be
    /// stored without any metadata: what a crash between a backend's own
    /// data write and the batch that records it leaves behind. GC deletes
    /// those that have no `chunk_meta`. Must not list data of a put still
    /// in flight. Empty for a backend whose data is in the batch itself.
    fn orphan_candidates(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>, StoreError>;
    /// After GC's chunk sweep: a backend that keeps chunks in containers
    /// (an object store's packs) deletes the dead ones and rewrites the
    /// sparse ones, running its location switches under `fence`. The
    /// local backend has none.
    fn gc_packs(&self, _fence: &Fence<'_>) -> Result<PackGcStats, StoreError> {
        Ok(PackGcStats::default())
    }
    /// The containers chunks are kept in, sorted by id, for a scrub that
    /// reads each whole and in order ([`ChunkStore::scrub_container`]);
    /// `None`: no containers (the local backend), chunks are scrubbed one
    /// by one.
    fn containers(&self) -> Result<Option<Vec<Container>>, StoreError> {
        Ok(None)
    }
    /// Reads one container whole (one sequential read), and calls `check`
    /// with each chunk whose data lives there. A container holding a bad
    /// chunk is copied aside, for inspection.
    fn scrub_container(&self, _c: &Container, _check: &mut ContainerCheck<'_>) -> Result<ContainerScrub, StoreError> {
        Ok(ContainerScrub::default())
    }
    /// Makes deleted data really leave the disk (or bucket). Fails when
    /// that failed, or had no room to run.
    fn reclaim_space(&self) -> Result<(), StoreError>;
    /// [`ChunkStore::reclaim_space`], rewriting only what `opts` says is
    /// worth it, with what it rewrote. A backend without its own policy
    /// reclaims everything and reports no rewrite.
    fn reclaim_space_with(&self, _opts: &ReclaimOptions) -> Result<ReclaimStats, StoreError> {
        self.reclaim_space().map(|()| ReclaimStats::default())
    }
    /// Bytes the store occupies on disk.
    fn disk_bytes(&self) -> Result<u64, StoreError>;
    /// An object store's request figures; `None` for the local backend.
    fn backend_stats(&self) -> Option<BackendStats> {
        None
    }
}

/// Everything but chunk data: which chunks are recorded (`chunk_meta`)
/// and who holds them, snapshots and their sets, jobs, store metadata,
/// quarantine and damage records, the disk reserve. [`rocks::RocksStore`]
/// implements it over the local RocksDB; methods that write chunks
/// (`put_chunks`, `delete_chunks`, `quarantine_chunk`) or ask whether a
/// chunk is stored (`host_has`, `stored_sorted`) go through its
/// [`ChunkStore`] for the data part.
pub trait MetaStore: Send + Sync + 'static {
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
    /// As [`MetaStore::stored_sorted`], from `chunk_meta` alone: the
    /// store's own record of what it holds, without touching chunk data
    /// (what GC checks its references against).
    fn recorded_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError>;
    /// Stores chunks (data through the [`ChunkStore`], in the same write)
    /// and records that `host` holds them.
    fn put_chunks(&self, host: &str, chunks: &[VerifiedChunk]) -> Result<PutStats, StoreError>;
    /// For each id: has the `[[sync]]` job `remote` delivered this chunk's
    /// bytes here (for any host)? See `crate::sync::local`.
    fn delivered_by(&self, remote: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError>;
    /// Records that `remote` delivered these chunks' bytes (after they were
    /// verified and stored).
    fn record_delivered(&self, remote: &str, ids: &[ChunkId]) -> Result<(), StoreError>;
    /// Deletes chunks, metadata and data (and their `sync_chunks` record)
    /// in one write; returns the stored bytes freed.
    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<u64, StoreError>;
    /// Up to `limit` (host, chunk) possession records of `host_chunks`
    /// after `after` (owners are in [`ChunkMeta`]).
    fn host_chunks(
        &self,
        after: Option<&(String, ChunkId)>,
        limit: usize,
    ) -> Result<Vec<(String, ChunkId)>, StoreError>;
    /// Ends these hosts' possession of these chunks, wherever it is
    /// recorded (a `host_chunks` key, or the owner of the chunk's meta).
    fn forget_possession(&self, keys: &[(String, ChunkId)]) -> Result<(), StoreError>;
    /// The host a [`ChunkMeta::owner`] names.
    fn host_name(&self, n: HostNum) -> Option<String>;
    /// Up to `limit` recorded chunks after `after`, in key order, with
    /// their sizes.
    fn chunk_metas(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<(ChunkId, ChunkMeta)>, StoreError>;
    fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>, StoreError>;
    /// Takes a chunk out of service in one synced write: its blob (if any)
    /// goes to the quarantine with `reason`, and it is no longer stored.
    fn quarantine_chunk(&self, id: &ChunkId, reason: &str, now_ns: u64) -> Result<(), StoreError>;
    /// Quarantined chunks (blobs left out).
    fn quarantined(&self) -> Result<Vec<(ChunkId, QuarantineRecord)>, StoreError>;
    /// Writes a checked snapshot durably, after every chunk put before it
    /// ([`ChunkStore::persist`]); returns its id and summary.
    fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotSummary, StoreError> {
        self.commit_snapshot_with(snapshot, None)
    }
    /// [`MetaStore::commit_snapshot`], its summary marked with what the
    /// push could not read.
    fn commit_snapshot_with(
        &self,
        snapshot: &Snapshot,
        incomplete: Option<bkp_common::snapshot::Incomplete>,
    ) -> Result<SnapshotSummary, StoreError>;
    /// Makes every chunk put so far durable without a commit (what a
    /// commit does first): a long sync calls it every few dozen MiB so a
    /// crash does not make it fetch those chunks again.
    fn persist_chunks(&self) -> Result<(), StoreError>;
    fn snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>, StoreError>;
    /// Removes a snapshot (record and index) durably. Its chunks stay
    /// until garbage collection. Returns false if it did not exist, and
    /// [`StoreError::Protected`] if it is protected: the check and the
    /// delete are one step, so a protect racing a prune cannot lose.
    fn delete_snapshot(&self, id: &SnapshotId) -> Result<bool, StoreError>;
    /// Marks a snapshot protected (prune never removes it) or not.
    fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<bool, StoreError>;
    /// Summaries, oldest first, filtered by host and set name.
    fn list_snapshots(&self, host: Option<&str>, name: Option<&str>) -> Result<Vec<SnapshotSummary>, StoreError>;
    /// Stores a job run's record (versioned JSON, `schema::encode_job`).
    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError>;
    /// The newest `limit` job records, newest first; one that does not
    /// decode fails the listing with `Corrupt`.
    fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError>;
    /// When the scheduler first found each job kind scheduled (`None`:
    /// never noted; `Corrupt`: unreadable).
    fn scheduled_since(&self) -> Result<Option<ScheduledSince>, StoreError>;
    fn set_scheduled_since(&self, s: &ScheduledSince) -> Result<(), StoreError>;
    /// The `[[sync]]` job `name`'s record (`None`: never run; `Corrupt`:
    /// unreadable).
    fn sync_state(&self, name: &str) -> Result<Option<crate::store::schema::SyncState>, StoreError>;
    fn set_sync_state(&self, name: &str, s: &crate::store::schema::SyncState) -> Result<(), StoreError>;
    /// Every set's reported push failures (see `crate::push_failures`).
    fn push_failures(&self) -> Result<Vec<PushFailure>, StoreError>;
    /// Writes these sets' failure records and deletes those of `delete`
    /// (host, name), in one synced write: a report writes its own set's.
    fn put_push_failures(&self, put: &[PushFailure], delete: &[(String, String)]) -> Result<(), StoreError>;
    /// The store's schema version (`None` only before the first open
    /// wrote it): reading it tells whether the database answers.
    fn schema_version(&self) -> Result<Option<u32>, StoreError>;
    /// Where the verify job's scrub stands (the start, when never run).
    fn scrub_cursor(&self) -> Result<ScrubCursor, StoreError>;
    fn set_scrub_cursor(&self, c: &ScrubCursor) -> Result<(), StoreError>;
    /// Which alerts were last notified (none, when unreadable: the state
    /// only suppresses repeats).
    fn alert_state(&self) -> Result<AlertState, StoreError>;
    fn set_alert_state(&self, s: &AlertState) -> Result<(), StoreError>;
    /// Damage records of snapshots that failed verification.
    fn damaged(&self) -> Result<Vec<(SnapshotId, Damage)>, StoreError>;
    fn put_damaged(&self, id: &SnapshotId, d: &Damage) -> Result<(), StoreError>;
    fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError>;
    /// Gives the disk space reserve back when free space is short, so
    /// that deletes and compactions (GC) have room; returns the bytes
    /// released. The store makes the reserve again once there is room.
    fn release_reserve_if_short(&self) -> u64;

    /// GC scratch (`gc_mark`): empties it; a run starts with this.
    fn gc_mark_clear(&self) -> Result<(), StoreError>;
    /// Adds marked chunks, and (host number, chunk) pairs, not durably.
    fn gc_mark_put(&self, chunks: &[ChunkId], pairs: &[(u32, ChunkId)]) -> Result<(), StoreError>;
    /// Which of `chunks` are marked; `sorted`: they are in key order.
    fn gc_mark_has(&self, chunks: &[ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError>;
    /// Which of `pairs` are marked.
    fn gc_mark_has_pairs(&self, pairs: &[(u32, ChunkId)]) -> Result<Vec<bool>, StoreError>;
    /// Up to `limit` marked chunks after `after`, in key order.
    fn gc_mark_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>, StoreError>;
    /// Job records that started before `before_ns` go; returns how many.
    fn trim_jobs(&self, before_ns: u64) -> Result<u64, StoreError>;
}

/// Transitional: both halves in one object, for callers that hold one
/// `Arc<dyn Store>` (it upcasts to `&dyn MetaStore` and `&dyn ChunkStore`).
pub trait Store: MetaStore + ChunkStore {}

impl<T: MetaStore + ChunkStore + ?Sized> Store for T {}
