//! RocksDB implementation of [`Store`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, FlushOptions, Options,
    WriteBatch, WriteOptions, DB,
};

use super::schema::{self, ChunkMeta, HostNum, QuarantineRecord};
use super::{PutStats, Store, StoreError, VerifiedChunk};

/// Summaries in the set index carry their own version byte.
const SUMMARY_VERSION: u8 = 1;
/// Chunks stored smaller than this stay inline in the `chunks` SST files:
/// a blob file record costs ~64 bytes on top of the chunk (its header and
/// a second copy of the key), which for a tree of small files was ~2% of
/// the stored bytes. Compaction rewrites only these small values.
const MIN_BLOB_FILE_BYTES: u64 = 16 << 10;
/// Chunk batches from this size on skip the WAL (see the module doc of
/// `store`): below it the second write costs little and a flush per
/// small push would leave many tiny blob files.
const UNLOGGED_MIN_BYTES: usize = 256 << 10;
/// L0 files of `chunks` that start a compaction (RocksDB's default is 4).
const CHUNKS_L0_COMPACTION_TRIGGER: i32 = 16;

pub struct RocksStore {
    db: DB,
    dir: std::path::PathBuf,
    /// Serialises read-modify-writes of snapshot records and their index
    /// (protect racing forget must not resurrect an index entry).
    snapshot_lock: std::sync::Mutex<()>,
    /// Bytes written without the WAL since the last flush started.
    unlogged: AtomicU64,
    /// Unlogged writers hold it shared from their write until they have
    /// counted it; "take the count, flush" holds it exclusively. So a
    /// chunk that is visible (and may be reused by another push) is either
    /// counted or already flushed, and a commit that finds the count at
    /// zero cannot overtake another commit's flush that covers its chunks.
    flush_lock: RwLock<()>,
    /// Serialises every read-modify-write of `chunk_meta` (put, delete,
    /// quarantine, forgetting possession): two hosts uploading the same
    /// new chunk at once must not both become its owner, one silently
    /// losing its possession (and with it its restore of that chunk).
    chunk_lock: Mutex<()>,
    hosts: RwLock<Hosts>,
}

/// The `hosts` column family, in memory (a store has few hosts).
#[derive(Default)]
struct Hosts {
    by_name: HashMap<String, HostNum>,
    by_num: HashMap<HostNum, String>,
}

fn db_err(e: rocksdb::Error) -> StoreError {
    StoreError::Db(e.into_string())
}

impl RocksStore {
    /// Opens (creating if needed) the database under `dir`.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(cache_bytes);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        // RocksDB starts a new info LOG at every open and kept 1000 old ones.
        db_opts.set_keep_log_file_num(3);
        // Nor did it ever roll the LOG of a running server, which gains a
        // statistics dump every 10 minutes: four files of at most 8 MiB.
        db_opts.set_max_log_file_size(8 << 20);
        // Chunk data written without the WAL is made durable by flushing
        // `chunks`, `chunk_meta` and `host_chunks` at once: a crash must
        // never keep a chunk's meta (which says "stored") without its blob.
        db_opts.set_atomic_flush(true);

        let table = |bloom: bool| {
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            if bloom {
                t.set_bloom_filter(10.0, false);
            }
            t.set_cache_index_and_filter_blocks(true);
            t
        };
        let cfs = schema::ALL_CFS.iter().map(|&name| {
            let mut o = Options::default();
            match name {
                schema::CF_CHUNKS => {
                    // Chunk values live in blob files, out of the LSM tree,
                    // so compactions do not rewrite chunk data. Blobs are
                    // already zstd-compressed by the client.
                    o.set_enable_blob_files(true);
                    o.set_min_blob_size(MIN_BLOB_FILE_BYTES);
                    o.set_blob_file_size(256 << 20);
                    o.set_blob_compression_type(DBCompressionType::None);
                    o.set_enable_blob_gc(true);
                    o.set_compression_type(DBCompressionType::None);
                    // Chunk keys are random, so every L0 file overlaps the
                    // whole base level and each L0 compaction rewrites all
                    // the small chunks stored inline so far (a first tree
                    // push: 190 MB rewritten, 1.0 s of CPU, while the push
                    // ran). Merging 16 L0 files at a time instead of 4
                    // means a quarter as many such rewrites; a read pays a
                    // bloom probe per extra L0 file.
                    o.set_level_zero_file_num_compaction_trigger(CHUNKS_L0_COMPACTION_TRIGGER);
                    o.set_level_zero_slowdown_writes_trigger(CHUNKS_L0_COMPACTION_TRIGGER * 2);
                    o.set_level_zero_stop_writes_trigger(CHUNKS_L0_COMPACTION_TRIGGER * 3);
                    o.set_block_based_table_factory(&table(true));
                }
                schema::CF_CHUNK_META | schema::CF_HOST_CHUNKS => {
                    // Most has-chunk lookups of a first backup miss: a
                    // memtable bloom answers them without a skiplist search.
                    o.set_memtable_prefix_bloom_ratio(0.05);
                    o.set_memtable_whole_key_filtering(true);
                    o.set_compression_type(DBCompressionType::Lz4);
                    o.set_block_based_table_factory(&table(true));
                }
                _ => {
                    o.set_compression_type(DBCompressionType::Lz4);
                    o.set_block_based_table_factory(&table(false));
                }
            }
            ColumnFamilyDescriptor::new(name, o)
        });
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(|e| {
            let msg = e.into_string();
            let hint = if msg.contains("lock") { " (is another bkp-server using this data directory?)" } else { "" };
            StoreError::Open(dir.display().to_string(), format!("{msg}{hint}"))
        })?;
        let store = Self {
            db,
            dir: dir.to_path_buf(),
            snapshot_lock: Default::default(),
            unlogged: AtomicU64::new(0),
            flush_lock: Default::default(),
            chunk_lock: Default::default(),
            hosts: Default::default(),
        };
        store.check_schema()?;
        store.load_hosts()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let cf = self.cf(schema::CF_META);
        let found = self.db.get_cf(cf, schema::META_SCHEMA_VERSION).map_err(db_err)?;
        let version = found.as_deref().map(|v| <[u8; 4]>::try_from(v).map(u32::from_le_bytes));
        match version {
            Some(Ok(schema::SCHEMA_VERSION)) => Ok(()),
            // New, or older data this build reads as it is (see SCHEMA_VERSION).
            None | Some(Ok(schema::OLDEST_SCHEMA_VERSION..schema::SCHEMA_VERSION)) => self
                .db
                .put_cf_opt(cf, schema::META_SCHEMA_VERSION, schema::SCHEMA_VERSION.to_le_bytes(), &Self::synced())
                .map_err(db_err),
            Some(v) => Err(StoreError::Corrupt(format!(
                "store schema {v:?} is not {}: this bkp-server is too old for this data directory; upgrade it",
                schema::SCHEMA_VERSION
            ))),
        }
    }

    fn load_hosts(&self) -> Result<(), StoreError> {
        let mut hosts = self.hosts.write().expect("hosts lock");
        for item in self.db.iterator_cf(self.cf(schema::CF_HOSTS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let name = std::str::from_utf8(&k).map_err(|_| StoreError::Corrupt("hosts key is not UTF-8".into()))?;
            let n = HostNum::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("hosts entry of {name}")))?;
            if hosts.by_num.insert(n, name.to_string()).is_some() {
                return Err(StoreError::Corrupt(format!("host number {} given twice", n.get())));
            }
            hosts.by_name.insert(name.to_string(), n);
        }
        Ok(())
    }

    fn host_num(&self, host: &str) -> Option<HostNum> {
        self.hosts.read().expect("hosts lock").by_name.get(host).copied()
    }

    /// The host's number, given (durably, before any chunk names it as
    /// owner) on its first upload.
    fn host_num_or_assign(&self, host: &str) -> Result<HostNum, StoreError> {
        if let Some(n) = self.host_num(host) {
            return Ok(n);
        }
        let mut hosts = self.hosts.write().expect("hosts lock");
        if let Some(&n) = hosts.by_name.get(host) {
            return Ok(n);
        }
        let n = match hosts.by_num.keys().max() {
            None => HostNum::FIRST,
            Some(m) => m.next().ok_or_else(|| StoreError::Db("no host numbers left".into()))?,
        };
        self.db.put_cf_opt(self.cf(schema::CF_HOSTS), host, n.encode(), &Self::synced()).map_err(db_err)?;
        hosts.by_name.insert(host.to_string(), n);
        hosts.by_num.insert(n, host.to_string());
        Ok(n)
    }

    fn decode_meta(id: &ChunkId, v: &[u8]) -> Result<ChunkMeta, StoreError> {
        ChunkMeta::decode(v).ok_or_else(|| StoreError::Corrupt(format!("chunk_meta of {}", id.short())))
    }

    /// The `chunk_meta` of each id, decoded. One multi_get.
    fn metas(&self, ids: impl Iterator<Item = ChunkId>) -> Result<Vec<Option<ChunkMeta>>, StoreError> {
        let ids: Vec<ChunkId> = ids.collect();
        let cf = self.cf(schema::CF_CHUNK_META);
        let found = self.db.multi_get_cf(ids.iter().map(|id| (cf, id.as_bytes().to_vec())));
        ids.iter().zip(found).map(|(id, v)| v.map_err(db_err)?.map(|v| Self::decode_meta(id, &v)).transpose()).collect()
    }

    /// For each id: does `host` hold it (owner in its meta, or a
    /// `host_chunks` record), and is it stored? With `stored_only`, an id
    /// that is not stored counts as not held without asking `host_chunks`.
    fn possession(&self, host: &str, ids: &[ChunkId], stored_only: bool) -> Result<Vec<(bool, bool)>, StoreError> {
        let me = self.host_num(host);
        let metas = self.metas(ids.iter().copied())?;
        let mut out: Vec<(bool, bool)> =
            metas.iter().map(|m| (m.is_some_and(|m| me.is_some() && m.owner == me), m.is_some())).collect();
        let ask: Vec<usize> = (0..ids.len()).filter(|&i| !out[i].0 && (out[i].1 || !stored_only)).collect();
        if !ask.is_empty() {
            let found = self.exist(self.host_keys(host, ask.iter().map(|&i| &ids[i])))?;
            for (i, f) in ask.into_iter().zip(found) {
                out[i].0 = f;
            }
        }
        Ok(out)
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn synced() -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        wo
    }

    /// Makes every chunk written without the WAL durable (one atomic
    /// flush of the chunk column families, skipped when there are none).
    fn persist_unlogged(&self) -> Result<(), StoreError> {
        let _l = self.flush_lock.write().expect("flush lock");
        let pending = self.unlogged.swap(0, Ordering::SeqCst);
        if pending == 0 {
            return Ok(());
        }
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        let cfs = [schema::CF_CHUNKS, schema::CF_CHUNK_META, schema::CF_HOST_CHUNKS].map(|n| self.cf(n));
        self.db.flush_cfs_opt(&cfs, &fo).map_err(|e| {
            // Not flushed: the next commit must try again.
            self.unlogged.fetch_add(pending, Ordering::SeqCst);
            db_err(e)
        })
    }

    /// The `host_chunks` keys of `ids` for `host`.
    fn host_keys<'a>(
        &'a self,
        host: &'a str,
        ids: impl Iterator<Item = &'a ChunkId> + 'a,
    ) -> impl Iterator<Item = (&'a ColumnFamily, Vec<u8>)> + 'a {
        let hc = self.cf(schema::CF_HOST_CHUNKS);
        ids.map(move |id| (hc, schema::host_chunk_key(host, id)))
    }

    /// For each (column family, key): does it exist? One multi_get.
    fn exist<'a>(&self, keys: impl IntoIterator<Item = (&'a ColumnFamily, Vec<u8>)>) -> Result<Vec<bool>, StoreError> {
        self.db.multi_get_cf(keys).into_iter().map(|r| r.map(|v| v.is_some()).map_err(db_err)).collect()
    }

    fn encode_summary(s: &SnapshotSummary) -> Vec<u8> {
        postcard::to_extend(s, vec![SUMMARY_VERSION]).expect("postcard to Vec")
    }

    fn decode_summary(b: &[u8]) -> Result<SnapshotSummary, StoreError> {
        match b.split_first() {
            Some((&SUMMARY_VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt(format!("snapshot summary: {e}")))
            }
            _ => Err(StoreError::Corrupt("snapshot summary version".into())),
        }
    }
}

impl Store for RocksStore {
    fn host_has(&self, host: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        Ok(self.possession(host, ids, true)?.into_iter().map(|(held, stored)| held && stored).collect())
    }

    fn host_holds(&self, host: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        Ok(self.possession(host, ids, false)?.into_iter().map(|(held, _)| held).collect())
    }

    fn stored_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must be sorted and unique");
        // One forward pass of an iterator: a few `next` steps reach a
        // nearby id far cheaper than a point lookup (measured on 78,000
        // ids of an 80,000-chunk store: 100 ms as a sorted multi_get);
        // ids far apart are reached by seeking.
        const STEPS_BEFORE_SEEK: usize = 8;
        let mut it = self.db.raw_iterator_cf(self.cf(schema::CF_CHUNK_META));
        let mut out = Vec::with_capacity(ids.len());
        let mut positioned = false;
        for id in ids {
            let want = &id.as_bytes()[..];
            let mut steps = 0;
            while positioned && it.valid() && it.key().is_some_and(|k| k < want) && steps < STEPS_BEFORE_SEEK {
                it.next();
                steps += 1;
            }
            if !positioned || (it.valid() && it.key().is_some_and(|k| k < want)) {
                it.seek(want);
                positioned = true;
            }
            if !it.valid() {
                // Past the last key: nothing further is stored.
                it.status().map_err(db_err)?;
                out.resize(ids.len(), false);
                break;
            }
            out.push(it.key() == Some(want));
        }
        Ok(out)
    }

    fn put_chunks(&self, host: &str, chunks: &[VerifiedChunk]) -> Result<PutStats, StoreError> {
        let me = self.host_num_or_assign(host)?;
        let meta_cf = self.cf(schema::CF_CHUNK_META);
        let _l = self.chunk_lock.lock().expect("chunk lock");
        let existing = self.metas(chunks.iter().map(|c| c.id))?;
        let mut batch = WriteBatch::default();
        let mut stats = PutStats::default();
        for (c, found) in chunks.iter().zip(existing) {
            match found {
                None => {
                    let meta = ChunkMeta { raw_len: c.raw_len, stored_len: c.blob.len() as u32, owner: Some(me) };
                    batch.put_cf(self.cf(schema::CF_CHUNKS), c.id.as_bytes(), &c.blob);
                    batch.put_cf(meta_cf, c.id.as_bytes(), meta.encode());
                    stats.new_chunks += 1;
                    stats.new_bytes += c.blob.len() as u64;
                }
                Some(m) if m.owner == Some(me) => {}
                Some(_) => batch.put_cf(self.cf(schema::CF_HOST_CHUNKS), schema::host_chunk_key(host, &c.id), []),
            }
        }
        let bytes = batch.size_in_bytes();
        if bytes >= UNLOGGED_MIN_BYTES {
            let mut wo = WriteOptions::default();
            wo.disable_wal(true);
            let _counting = self.flush_lock.read().expect("flush lock");
            self.db.write_opt(batch, &wo).map_err(db_err)?;
            self.unlogged.fetch_add(bytes as u64, Ordering::SeqCst);
        } else {
            self.db.write(batch).map_err(db_err)?;
        }
        Ok(stats)
    }

    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        // Every reader of a blob (restore, scrub, drill) checks it against
        // its blake3 id, which catches what RocksDB's crc32c would; the
        // crc runs in software (RocksDB is built without SSE4.2) and
        // showed up among the top symbols of a restore's server profile.
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        self.db.get_cf_opt(self.cf(schema::CF_CHUNKS), id.as_bytes(), &ro).map_err(db_err)
    }

    fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotSummary, StoreError> {
        let record = snapshot.encode();
        let id = SnapshotId::of(&record);
        let summary = snapshot.summary(id);
        self.persist_unlogged()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(schema::CF_SNAPSHOTS), id.as_bytes(), &record);
        batch.put_cf(
            self.cf(schema::CF_SETS),
            schema::set_key(&snapshot.host, &snapshot.name, snapshot.time_ns, &id),
            Self::encode_summary(&summary),
        );
        // Acknowledged means on disk, and with it every chunk written before.
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        Ok(summary)
    }

    fn snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>, StoreError> {
        match self.db.get_cf(self.cf(schema::CF_SNAPSHOTS), id.as_bytes()).map_err(db_err)? {
            None => Ok(None),
            Some(b) => {
                Snapshot::decode(&b).map(Some).map_err(|e| StoreError::Corrupt(format!("snapshot {}: {e}", id.short())))
            }
        }
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<bool, StoreError> {
        let _l = self.snapshot_lock.lock().expect("snapshot lock");
        let Some(snap) = self.snapshot(id)? else { return Ok(false) };
        let set_key = schema::set_key(&snap.host, &snap.name, snap.time_ns, id);
        if let Some(v) = self.db.get_cf(self.cf(schema::CF_SETS), &set_key).map_err(db_err)? {
            if Self::decode_summary(&v)?.protected {
                return Err(StoreError::Protected(*id));
            }
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(schema::CF_SNAPSHOTS), id.as_bytes());
        batch.delete_cf(self.cf(schema::CF_SETS), set_key);
        // A forgotten snapshot no longer needs healing, nor alerting on.
        batch.delete_cf(self.cf(schema::CF_DAMAGED), id.as_bytes());
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        Ok(true)
    }

    fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<bool, StoreError> {
        let _l = self.snapshot_lock.lock().expect("snapshot lock");
        let Some(snap) = self.snapshot(id)? else { return Ok(false) };
        let key = schema::set_key(&snap.host, &snap.name, snap.time_ns, id);
        let cf = self.cf(schema::CF_SETS);
        let Some(v) = self.db.get_cf(cf, &key).map_err(db_err)? else { return Ok(false) };
        let mut summary = Self::decode_summary(&v)?;
        summary.protected = protected;
        self.db.put_cf_opt(cf, key, Self::encode_summary(&summary), &Self::synced()).map_err(db_err)?;
        Ok(true)
    }

    fn host_chunks(
        &self,
        after: Option<&(String, ChunkId)>,
        limit: usize,
    ) -> Result<Vec<(String, ChunkId)>, StoreError> {
        let start = after.map(|(h, c)| schema::host_chunk_key(h, c)).unwrap_or_default();
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::with_capacity(limit);
        for item in self.db.iterator_cf(self.cf(schema::CF_HOST_CHUNKS), mode) {
            let (k, _) = item.map_err(db_err)?;
            if after.is_some() && k.as_ref() == start.as_slice() {
                continue;
            }
            out.push(schema::split_host_chunk_key(&k).ok_or_else(|| StoreError::Corrupt("host_chunks key".into()))?);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<u64, StoreError> {
        let meta_cf = self.cf(schema::CF_CHUNK_META);
        let _l = self.chunk_lock.lock().expect("chunk lock");
        let metas = self.db.multi_get_cf(ids.iter().map(|id| (meta_cf, id.as_bytes().to_vec())));
        let mut freed = 0u64;
        let mut batch = WriteBatch::default();
        for (id, m) in ids.iter().zip(metas) {
            // A meta that does not decode is deleted all the same.
            if let Some(m) = m.map_err(db_err)?.as_deref().and_then(ChunkMeta::decode) {
                freed += m.stored_len as u64;
            }
            batch.delete_cf(self.cf(schema::CF_CHUNKS), id.as_bytes());
            batch.delete_cf(meta_cf, id.as_bytes());
        }
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        Ok(freed)
    }

    fn forget_possession(&self, keys: &[(String, ChunkId)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let _l = self.chunk_lock.lock().expect("chunk lock");
        let metas = self.metas(keys.iter().map(|(_, c)| *c))?;
        let mut batch = WriteBatch::default();
        for ((h, c), m) in keys.iter().zip(metas) {
            batch.delete_cf(self.cf(schema::CF_HOST_CHUNKS), schema::host_chunk_key(h, c));
            if let Some(mut m) = m.filter(|m| m.owner.is_some() && m.owner == self.host_num(h)) {
                m.owner = None;
                batch.put_cf(self.cf(schema::CF_CHUNK_META), c.as_bytes(), m.encode());
            }
        }
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)
    }

    fn host_name(&self, n: HostNum) -> Option<String> {
        self.hosts.read().expect("hosts lock").by_num.get(&n).cloned()
    }

    fn reclaim_space(&self) -> Result<(), StoreError> {
        let chunks = self.cf(schema::CF_CHUNKS);
        // Blob files only shrink when compaction relocates their live
        // blobs; an age cutoff of 1.0 makes this compaction consider all
        // of them, so every freed chunk really leaves the disk.
        self.db.set_options_cf(chunks, &[("blob_garbage_collection_age_cutoff", "1.0")]).map_err(db_err)?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for name in schema::ALL_CFS {
            self.db.compact_range_cf_opt(self.cf(name), None::<&[u8]>, None::<&[u8]>, &opts);
        }
        self.db.set_options_cf(chunks, &[("blob_garbage_collection_age_cutoff", "0.25")]).map_err(db_err)?;
        Ok(())
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(rd.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
    }

    fn put_job(&self, start_ns: u64, kind: &str, record: &[u8]) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(self.cf(schema::CF_JOBS), schema::job_key(start_ns, kind), record, &Self::synced())
            .map_err(db_err)
    }

    fn jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.db
            .iterator_cf(self.cf(schema::CF_JOBS), rocksdb::IteratorMode::End)
            .take(limit)
            .map(|r| r.map(|(_, v)| v.to_vec()).map_err(db_err))
            .collect()
    }

    fn chunk_metas(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<(ChunkId, ChunkMeta)>, StoreError> {
        let start = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        for item in self.db.iterator_cf(self.cf(schema::CF_CHUNK_META), mode) {
            let (k, v) = item.map_err(db_err)?;
            let id = ChunkId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("chunk_meta key length".into()))?;
            if Some(&id) == after {
                continue;
            }
            out.push((id, Self::decode_meta(&id, &v)?));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>, StoreError> {
        Ok(self.metas(std::iter::once(*id))?.pop().flatten())
    }

    fn quarantine_chunk(&self, id: &ChunkId, reason: &str, now_ns: u64) -> Result<(), StoreError> {
        let _l = self.chunk_lock.lock().expect("chunk lock");
        let blob = self.chunk_blob(id)?.unwrap_or_default();
        let rec = QuarantineRecord { found_ns: now_ns, reason: reason.to_string(), blob };
        let mut batch = WriteBatch::default();
        // The owner keeps its possession as a `host_chunks` record, so that
        // its snapshots heal once any host uploads the chunk again. (A meta
        // that does not decode may be why the chunk is quarantined.)
        let owner = self.db.get_cf(self.cf(schema::CF_CHUNK_META), id.as_bytes()).map_err(db_err)?;
        if let Some(host) = owner.as_deref().and_then(ChunkMeta::decode).and_then(|m| self.host_name(m.owner?)) {
            batch.put_cf(self.cf(schema::CF_HOST_CHUNKS), schema::host_chunk_key(&host, id), []);
        }
        batch.put_cf(self.cf(schema::CF_QUARANTINE), id.as_bytes(), rec.encode());
        batch.delete_cf(self.cf(schema::CF_CHUNKS), id.as_bytes());
        batch.delete_cf(self.cf(schema::CF_CHUNK_META), id.as_bytes());
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)
    }

    fn quarantined(&self) -> Result<Vec<(ChunkId, QuarantineRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(schema::CF_QUARANTINE), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let id = ChunkId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("quarantine key length".into()))?;
            let mut rec = QuarantineRecord::decode(&v)
                .ok_or_else(|| StoreError::Corrupt(format!("quarantine record of {}", id.short())))?;
            rec.blob = Vec::new();
            out.push((id, rec));
        }
        Ok(out)
    }

    fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(schema::CF_META), key).map_err(db_err)
    }

    fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf_opt(self.cf(schema::CF_META), key, value, &Self::synced()).map_err(db_err)
    }

    fn damaged(&self) -> Result<Vec<(SnapshotId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(schema::CF_DAMAGED), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let id = SnapshotId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("damaged key length".into()))?;
            out.push((id, v.to_vec()));
        }
        Ok(out)
    }

    fn put_damaged(&self, id: &SnapshotId, record: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf_opt(self.cf(schema::CF_DAMAGED), id.as_bytes(), record, &Self::synced()).map_err(db_err)
    }

    fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.db.delete_cf_opt(self.cf(schema::CF_DAMAGED), id.as_bytes(), &Self::synced()).map_err(db_err)
    }

    fn list_snapshots(&self, host: Option<&str>, name: Option<&str>) -> Result<Vec<SnapshotSummary>, StoreError> {
        let prefix = match (host, name) {
            (Some(h), Some(n)) => schema::set_prefix(h, n),
            (Some(h), None) => schema::host_prefix(h),
            (None, _) => Vec::new(),
        };
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(schema::CF_SETS), &prefix) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let s = Self::decode_summary(&v)?;
            if host.is_none() && name.is_some_and(|n| n != s.name) {
                continue;
            }
            out.push(s);
        }
        out.sort_by_key(|s| s.time_ns);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::blob;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};

    fn chunk(data: &[u8]) -> VerifiedChunk {
        VerifiedChunk::verify(ChunkId::of(data), blob::encode(data, 3)).unwrap()
    }

    #[test]
    fn host_index_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        let a = chunk(b"aaaa");
        let ids = [*a.id(), ChunkId::of(b"zz")];
        assert_eq!(s.host_has("h1", &ids).unwrap(), [false, false]);
        let st = s.put_chunks("h1", &[a]).unwrap();
        assert_eq!(st.new_chunks, 1);
        assert_eq!(s.host_has("h1", &ids).unwrap(), [true, false]);
        assert_eq!(s.host_holds("h1", &ids).unwrap(), [true, false]);
        // Another host does not learn that h1 holds the chunk...
        assert_eq!(s.host_has("h2", &ids).unwrap(), [false, false]);
        assert_eq!(s.host_holds("h2", &ids).unwrap(), [false, false]);
        // ...and its upload is stored once.
        assert_eq!(s.put_chunks("h2", &[chunk(b"aaaa")]).unwrap().new_chunks, 0);
        assert_eq!(s.host_has("h2", &ids).unwrap(), [true, false]);
        assert_eq!(blob::decode(&s.chunk_blob(&ids[0]).unwrap().unwrap()).unwrap(), b"aaaa");
    }

    fn host_chunk_records(s: &RocksStore) -> usize {
        s.host_chunks(None, 1 << 20).unwrap().len()
    }

    #[test]
    fn first_uploader_owns_later_ones_get_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        let (a, b) = (chunk(b"a"), chunk(b"b"));
        let ids = [*a.id(), *b.id()];
        s.put_chunks("h1", &[a, b]).unwrap();
        // The uploader's possession is its meta's owner: no key of its own.
        assert_eq!(host_chunk_records(&s), 0);
        assert_eq!(s.chunk_meta(&ids[0]).unwrap().unwrap().owner, s.host_num("h1"));
        s.put_chunks("h1", &[chunk(b"a")]).unwrap();
        assert_eq!(host_chunk_records(&s), 0);
        s.put_chunks("h2", &[chunk(b"a")]).unwrap();
        assert_eq!(s.host_chunks(None, 10).unwrap(), [("h2".to_string(), ids[0])]);
        assert_eq!(s.host_has("h1", &ids).unwrap(), [true, true]);
        assert_eq!(s.host_has("h2", &ids).unwrap(), [true, false]);

        // Forgetting works on either kind of record, and only for that host.
        s.forget_possession(&[("h1".into(), ids[0]), ("h2".into(), ids[1])]).unwrap();
        assert_eq!(s.host_holds("h1", &ids).unwrap(), [false, true]);
        assert_eq!(s.host_holds("h2", &ids).unwrap(), [true, false]);
        assert_eq!(s.chunk_meta(&ids[0]).unwrap().unwrap().owner, None);
        s.forget_possession(&[("h2".into(), ids[0])]).unwrap();
        assert_eq!(s.host_holds("h2", &ids).unwrap(), [false, false]);
        assert!(s.chunk_meta(&ids[0]).unwrap().is_some(), "the chunk itself stays");

        // Host numbers survive a reopen.
        let n1 = s.host_num("h1");
        drop(s);
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(s.host_num("h1"), n1);
        assert_ne!(s.host_num("h2"), n1);
        assert_eq!(s.host_holds("h1", &ids).unwrap(), [false, true]);
    }

    #[test]
    fn quarantine_keeps_the_owners_possession() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        let a = chunk(b"a");
        let id = *a.id();
        s.put_chunks("h1", &[a]).unwrap();
        s.quarantine_chunk(&id, "test", 1).unwrap();
        assert_eq!(s.host_has("h1", &[id]).unwrap(), [false], "not stored any more");
        assert_eq!(s.host_holds("h1", &[id]).unwrap(), [true]);
        // Another host uploads it again: h1's snapshots can read it again.
        s.put_chunks("h2", &[chunk(b"a")]).unwrap();
        assert_eq!(s.host_has("h1", &[id]).unwrap(), [true]);
        assert_eq!(s.chunk_meta(&id).unwrap().unwrap().owner, s.host_num("h2"));
    }

    #[test]
    fn hosts_racing_on_new_chunks_all_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(RocksStore::open(dir.path(), 8 << 20).unwrap());
        let ids: Vec<ChunkId> = (0..2000u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let threads: Vec<_> = ["h1", "h2", "h3"]
            .into_iter()
            .map(|h| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for part in (0..2000u32).collect::<Vec<_>>().chunks(50) {
                        let batch: Vec<_> = part.iter().map(|i| chunk(&i.to_le_bytes())).collect();
                        s.put_chunks(h, &batch).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        for h in ["h1", "h2", "h3"] {
            assert!(s.host_has(h, &ids).unwrap().iter().all(|&b| b), "{h} lost possession");
        }
        assert_eq!(host_chunk_records(&s), 2 * ids.len());
    }

    #[test]
    fn schema_1_store_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let a = chunk(b"a");
        let id = *a.id();
        {
            // What a schema 1 server wrote: a v1 meta, a host_chunks record.
            let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
            s.db.put_cf(s.cf(schema::CF_META), schema::META_SCHEMA_VERSION, 1u32.to_le_bytes()).unwrap();
            s.db.put_cf(s.cf(schema::CF_CHUNKS), id.as_bytes(), &a.blob).unwrap();
            s.db.put_cf(s.cf(schema::CF_CHUNK_META), id.as_bytes(), [1, 1, 0, 0, 0, 9, 0, 0, 0]).unwrap();
            s.db.put_cf(s.cf(schema::CF_HOST_CHUNKS), schema::host_chunk_key("h1", &id), []).unwrap();
        }
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        let version = s.db.get_cf(s.cf(schema::CF_META), schema::META_SCHEMA_VERSION).unwrap();
        assert_eq!(version.as_deref(), Some(&2u32.to_le_bytes()[..]));
        assert_eq!(s.host_has("h1", &[id]).unwrap(), [true]);
        assert_eq!(s.host_has("h2", &[id]).unwrap(), [false]);
        assert_eq!(s.chunk_meta(&id).unwrap().unwrap(), ChunkMeta { raw_len: 1, stored_len: 9, owner: None });
        // h1 uploading it again adds nothing; h2 gets a record.
        s.put_chunks("h1", &[chunk(b"a")]).unwrap();
        s.put_chunks("h2", &[chunk(b"a")]).unwrap();
        assert_eq!(host_chunk_records(&s), 2);
        assert_eq!(s.host_has("h2", &[id]).unwrap(), [true]);
        // A newer schema than this build knows is refused.
        s.db.put_cf(s.cf(schema::CF_META), schema::META_SCHEMA_VERSION, 3u32.to_le_bytes()).unwrap();
        drop(s);
        let Err(e) = RocksStore::open(dir.path(), 8 << 20) else { panic!("schema 3 opened") };
        assert!(e.to_string().contains("upgrade"), "{e}");
    }

    #[test]
    fn stored_sorted_agrees_with_point_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        let stored: Vec<VerifiedChunk> = (0..200u32).map(|i| chunk(&i.to_le_bytes())).collect();
        s.put_chunks("h", &stored[..150]).unwrap();
        // The rest go into a second SST, so the iterator merges levels too.
        s.persist_unlogged().unwrap();
        s.db.flush_cf(s.cf(schema::CF_CHUNK_META)).unwrap();
        s.put_chunks("h", &stored[150..]).unwrap();
        // Every 7th stored chunk asked about, runs of neighbours, ids that
        // sort before, between and after all stored ones.
        let mut ask: Vec<ChunkId> = stored.iter().step_by(7).map(|c| *c.id()).collect();
        ask.extend(stored[40..60].iter().map(|c| *c.id()));
        ask.extend((0..50u32).map(|i| ChunkId::of(&(1000 + i).to_le_bytes())));
        ask.extend([ChunkId::from_bytes([0; 32]), ChunkId::from_bytes([0xff; 32])]);
        ask.sort_unstable();
        ask.dedup();
        let want: Vec<bool> = ask.iter().map(|id| s.chunk_meta(id).unwrap().is_some()).collect();
        assert!(want.iter().filter(|&&b| b).count() >= 40 && want.iter().any(|&b| !b));
        assert_eq!(s.stored_sorted(&ask).unwrap(), want);
        assert_eq!(s.stored_sorted(&[]).unwrap(), Vec::<bool>::new());
    }

    #[test]
    fn snapshots_survive_reopen_and_list_by_set() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |host: &str, name: &str, t| Snapshot {
            host: host.into(),
            name: name.into(),
            time_ns: t,
            kind: SnapshotKind::Tree,
            stats: SnapshotStats::default(),
            tree: vec![],
            client: "test".into(),
        };
        let id = {
            let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
            s.commit_snapshot(&mk("ab", "db", 2)).unwrap();
            s.commit_snapshot(&mk("a", "db", 1)).unwrap();
            s.commit_snapshot(&mk("a", "files", 3)).unwrap().id
        };
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(s.list_snapshots(Some("a"), None).unwrap().len(), 2);
        assert_eq!(s.list_snapshots(Some("a"), Some("db")).unwrap().len(), 1);
        assert_eq!(s.list_snapshots(None, Some("db")).unwrap().len(), 2);
        assert_eq!(s.list_snapshots(None, None).unwrap().iter().map(|x| x.time_ns).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(s.snapshot(&id).unwrap().unwrap().name, "files");
    }
}
