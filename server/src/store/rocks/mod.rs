//! RocksDB implementation of the store: [`RocksStore`] is the
//! [`MetaStore`] (snapshots, possession, jobs, ...) over a database handle
//! ([`Db`]) it shares with its chunk data backend, by default
//! [`LocalChunks`] (chunk data in the same database). The only module that
//! imports `rocksdb`.
//!
//! | file          | concern                                                        |
//! |---------------|----------------------------------------------------------------|
//! | `db`          | opening, RocksDB tuning, disk-space checks                     |
//! | `durability`  | unlogged put batches, the flush at commit, the commit mark     |
//! | `hosts`       | host numbers (the `owner` of a chunk's meta)                   |
//! | `possession`  | `chunk_meta`, who holds what, puts and deletes of chunks       |
//! | `provenance`  | `sync_chunks`, which sync jobs delivered which chunk's bytes   |
//! | `chunks`      | [`LocalChunks`], the chunk data                                |
//! | `snapshots`   | snapshot records and the set index                             |
//! | `records`     | jobs, meta, quarantine, damage                                 |
//! | `scratch`     | the GC's spilled mark set (`gc_mark`)                          |

mod chunks;
mod db;
pub mod durability;
mod hosts;
mod possession;
mod provenance;
mod records;
mod scratch;
mod snapshots;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Arc, Mutex};

use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};

pub use chunks::LocalChunks;
pub use db::Db;
pub use durability::{Batch, COMMIT_MARK_FILE};

use super::schema::{
    self, AlertState, ChunkMeta, Damage, HostNum, PushFailure, QuarantineRecord, ScheduledSince, ScrubCursor,
};
use super::{ChunkStore, MetaStore, PutStats, StoreError, VerifiedChunk};
use crate::report::JobRecord;

pub struct RocksStore {
    db: Arc<Db>,
    /// Where chunk data lives; its rows join this store's put batches.
    data: Arc<dyn ChunkStore>,
    /// Serialises read-modify-writes of snapshot records and their index
    /// (protect racing forget must not resurrect an index entry).
    snapshot_lock: Mutex<()>,
    /// Serialises every read-modify-write of `chunk_meta` (put, delete,
    /// quarantine, forgetting possession): two hosts uploading the same
    /// new chunk at once must not both become its owner, one silently
    /// losing its possession (and with it its restore of that chunk).
    chunk_lock: Mutex<()>,
    hosts: hosts::Hosts,
    /// Acknowledged commits so far, also kept in `meta` (in each commit's
    /// batch) and in [`COMMIT_MARK_FILE`]; held across a commit's write.
    commits: Mutex<u64>,
}

impl RocksStore {
    /// Marks the directory with its chunk data backend (synced), as
    /// `open_store` does; `rebuild` marks a new directory once it has
    /// checked that it is empty.
    pub fn mark_storage_backend(&self, name: &[u8]) -> Result<(), StoreError> {
        self.db.mark_storage_backend(name)
    }

    /// Opens (creating if needed) the database under `dir`, chunk data
    /// included ([`LocalChunks`]).
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open_with(dir, cache_bytes, |db| Ok(Arc::new(LocalChunks::new(db))))
    }

    /// Opens the database under `dir` with the chunk data backend `data`
    /// makes from its handle (an object store keeps its chunk locations in
    /// this database, in the same batches as the metadata).
    pub fn open_with(
        dir: &Path,
        cache_bytes: usize,
        data: impl FnOnce(Arc<Db>) -> Result<Arc<dyn ChunkStore>, StoreError>,
    ) -> Result<Self, StoreError> {
        let db = Arc::new(Db::open(dir, cache_bytes)?);
        let store = Self {
            data: data(db.clone())?,
            hosts: hosts::Hosts::load(db.clone())?,
            db,
            snapshot_lock: Default::default(),
            chunk_lock: Default::default(),
            commits: Mutex::new(0),
        };
        store.check_commits()?;
        store.migrate_push_failures()?;
        store.index_protected()?;
        Ok(store)
    }

    /// The chunk data backend.
    pub fn data(&self) -> &Arc<dyn ChunkStore> {
        &self.data
    }

    pub(super) fn host_num(&self, host: &str) -> Option<HostNum> {
        self.hosts.num(host)
    }

    pub(super) fn host_name_of(&self, n: HostNum) -> Option<String> {
        self.hosts.name(n)
    }

    pub(super) fn host_num_or_assign(&self, host: &str) -> Result<HostNum, StoreError> {
        self.hosts.num_or_assign(host)
    }

    pub(super) fn raw_db(&self) -> &rocksdb::DB {
        self.db.raw()
    }

    pub(super) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf(name)
    }
}

/// Transitional: callers holding one `Arc<dyn Store>` reach the chunk
/// data through the metadata store.
impl ChunkStore for RocksStore {
    fn has_data(&self, ids: &[&ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError> {
        self.data.has_data(ids, sorted)
    }
    fn stage_data(&self, chunks: &[&VerifiedChunk], batch: &mut Batch<'_>) -> Result<(), StoreError> {
        self.data.stage_data(chunks, batch)
    }
    fn stage_delete(&self, ids: &[ChunkId], batch: &mut Batch<'_>) -> Result<(), StoreError> {
        self.data.stage_delete(ids, batch)
    }
    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        self.data.chunk_blob(id)
    }
    fn chunk_blobs(&self, ids: &[ChunkId], max_bytes: usize) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.data.chunk_blobs(ids, max_bytes)
    }
    fn read_batch_bytes(&self) -> usize {
        self.data.read_batch_bytes()
    }
    fn keep_trees(&self, trees: &[ChunkId]) -> Result<(), StoreError> {
        self.data.keep_trees(trees)
    }
    fn persist(&self) -> Result<(), StoreError> {
        self.data.persist()
    }
    fn record_snapshot(&self, id: &SnapshotId, record: &[u8]) -> Result<(), StoreError> {
        self.data.record_snapshot(id, record)
    }
    fn forget_snapshot(&self, id: &SnapshotId) {
        self.data.forget_snapshot(id)
    }
    fn orphan_candidates(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>, StoreError> {
        self.data.orphan_candidates(after, limit)
    }
    fn gc_packs(&self, fence: &crate::store::Fence<'_>) -> Result<crate::store::PackGcStats, StoreError> {
        self.data.gc_packs(fence)
    }
    fn containers(&self) -> Result<Option<Vec<crate::store::Container>>, StoreError> {
        self.data.containers()
    }
    fn scrub_container(
        &self,
        c: &crate::store::Container,
        check: &mut crate::store::ContainerCheck<'_>,
    ) -> Result<crate::store::ContainerScrub, StoreError> {
        self.data.scrub_container(c, check)
    }
    fn reclaim_space(&self) -> Result<(), StoreError> {
        self.data.reclaim_space()
    }
    fn reclaim_space_with(
        &self,
        opts: &crate::store::ReclaimOptions,
    ) -> Result<crate::store::ReclaimStats, StoreError> {
        self.data.reclaim_space_with(opts)
    }
    fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.data.disk_bytes()
    }
    fn backend_stats(&self) -> Option<crate::store::BackendStats> {
        self.data.backend_stats()
    }
}

impl MetaStore for RocksStore {
    fn host_has(&self, host: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        RocksStore::host_has(self, host, ids)
    }
    fn host_holds(&self, host: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        RocksStore::host_holds(self, host, ids)
    }
    fn stored_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        RocksStore::stored_sorted(self, ids)
    }
    fn recorded_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        RocksStore::recorded_sorted(self, ids)
    }
    fn put_chunks(&self, host: &str, chunks: &[VerifiedChunk]) -> Result<PutStats, StoreError> {
        RocksStore::put_chunks(self, host, chunks)
    }
    fn delivered_by(&self, remote: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        RocksStore::delivered_by(self, remote, ids)
    }
    fn record_delivered(&self, remote: &str, ids: &[ChunkId]) -> Result<(), StoreError> {
        RocksStore::record_delivered(self, remote, ids)
    }
    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<u64, StoreError> {
        RocksStore::delete_chunks(self, ids)
    }
    fn host_chunks(
        &self,
        after: Option<&(String, ChunkId)>,
        limit: usize,
    ) -> Result<Vec<(String, ChunkId)>, StoreError> {
        RocksStore::host_chunks(self, after, limit)
    }
    fn forget_possession(&self, keys: &[(String, ChunkId)]) -> Result<(), StoreError> {
        RocksStore::forget_possession(self, keys)
    }
    fn host_name(&self, n: HostNum) -> Option<String> {
        self.host_name_of(n)
    }
    fn chunk_metas(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<(ChunkId, ChunkMeta)>, StoreError> {
        RocksStore::chunk_metas(self, after, limit)
    }
    fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>, StoreError> {
        RocksStore::chunk_meta(self, id)
    }
    fn quarantine_chunk(&self, id: &ChunkId, reason: &str, now_ns: u64) -> Result<(), StoreError> {
        RocksStore::quarantine_chunk(self, id, reason, now_ns)
    }
    fn quarantined(&self) -> Result<Vec<(ChunkId, QuarantineRecord)>, StoreError> {
        RocksStore::quarantined(self)
    }
    fn commit_snapshot_with(
        &self,
        snapshot: &Snapshot,
        incomplete: Option<bkp_common::snapshot::Incomplete>,
    ) -> Result<SnapshotSummary, StoreError> {
        RocksStore::commit_snapshot(self, snapshot, incomplete)
    }
    fn persist_chunks(&self) -> Result<(), StoreError> {
        self.data.persist()?;
        self.db.persist_unlogged()
    }
    fn snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>, StoreError> {
        RocksStore::snapshot(self, id)
    }
    fn delete_snapshot(&self, id: &SnapshotId) -> Result<bool, StoreError> {
        RocksStore::delete_snapshot(self, id)
    }
    fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<bool, StoreError> {
        RocksStore::set_protected(self, id, protected)
    }
    fn list_snapshots(&self, host: Option<&str>, name: Option<&str>) -> Result<Vec<SnapshotSummary>, StoreError> {
        RocksStore::list_snapshots(self, host, name)
    }
    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        RocksStore::put_job(self, rec)
    }
    fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        RocksStore::jobs(self, limit)
    }
    fn scheduled_since(&self) -> Result<Option<ScheduledSince>, StoreError> {
        RocksStore::scheduled_since(self)
    }
    fn set_scheduled_since(&self, s: &ScheduledSince) -> Result<(), StoreError> {
        RocksStore::set_scheduled_since(self, s)
    }
    fn sync_state(&self, name: &str) -> Result<Option<crate::store::schema::SyncState>, StoreError> {
        RocksStore::sync_state(self, name)
    }
    fn set_sync_state(&self, name: &str, s: &crate::store::schema::SyncState) -> Result<(), StoreError> {
        RocksStore::set_sync_state(self, name, s)
    }
    fn push_failures(&self) -> Result<Vec<PushFailure>, StoreError> {
        RocksStore::push_failures(self)
    }
    fn put_push_failures(&self, put: &[PushFailure], delete: &[(String, String)]) -> Result<(), StoreError> {
        RocksStore::put_push_failures(self, put, delete)
    }
    fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        RocksStore::schema_version(self)
    }
    fn scrub_cursor(&self) -> Result<ScrubCursor, StoreError> {
        RocksStore::scrub_cursor(self)
    }
    fn set_scrub_cursor(&self, c: &ScrubCursor) -> Result<(), StoreError> {
        RocksStore::set_scrub_cursor(self, c)
    }
    fn alert_state(&self) -> Result<AlertState, StoreError> {
        RocksStore::alert_state(self)
    }
    fn set_alert_state(&self, s: &AlertState) -> Result<(), StoreError> {
        RocksStore::set_alert_state(self, s)
    }
    fn damaged(&self) -> Result<Vec<(SnapshotId, Damage)>, StoreError> {
        RocksStore::damaged(self)
    }
    fn put_damaged(&self, id: &SnapshotId, d: &Damage) -> Result<(), StoreError> {
        RocksStore::put_damaged(self, id, d)
    }
    fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError> {
        RocksStore::delete_damaged(self, id)
    }
    fn release_reserve_if_short(&self) -> u64 {
        self.db.release_reserve()
    }
    fn gc_mark_clear(&self) -> Result<(), StoreError> {
        scratch::clear(&self.db)
    }
    fn gc_mark_put(&self, chunks: &[ChunkId], pairs: &[(u32, ChunkId)]) -> Result<(), StoreError> {
        scratch::put(&self.db, chunks, pairs)
    }
    fn gc_mark_has(&self, chunks: &[ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError> {
        scratch::has(&self.db, chunks.iter().map(schema::mark_chunk_key), sorted)
    }
    fn gc_mark_has_pairs(&self, pairs: &[(u32, ChunkId)]) -> Result<Vec<bool>, StoreError> {
        scratch::has(&self.db, pairs.iter().map(|(h, c)| schema::mark_pair_key(*h, c)), false)
    }
    fn gc_mark_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>, StoreError> {
        scratch::chunks(&self.db, after, limit)
    }
    fn trim_jobs(&self, before_ns: u64) -> Result<u64, StoreError> {
        RocksStore::trim_jobs(self, before_ns)
    }
}
