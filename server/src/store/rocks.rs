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
use super::space::{self, Reserve};
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
/// Free space a write must leave beside what the memtables will need
/// when flushed (WAL, MANIFEST, the flush's own files).
const WRITE_HEADROOM: u64 = 8 << 20;
/// Free space a compaction must leave beside the files it rewrites.
const COMPACTION_HEADROOM: u64 = 1 << 20;
/// Written after each acknowledged commit: the commit count it reached
/// (see `check_commits`).
pub const COMMIT_MARK_FILE: &str = "bkp-commit-mark";

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
    reserve: Reserve,
    /// Acknowledged commits so far, also kept in `meta` (in each commit's
    /// batch) and in [`COMMIT_MARK_FILE`]; held across a commit's write.
    commits: Mutex<u64>,
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

fn is_no_space(msg: &str) -> bool {
    msg.contains("No space left") || msg.contains("NoSpace") || msg.contains("no space")
}

/// The database file a RocksDB message names, if any.
fn named_file(msg: &str) -> Option<&str> {
    msg.split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '\'' || c == '"')
        .map(|w| w.trim_end_matches(':'))
        .find(|w| w.ends_with(".sst") || w.ends_with(".blob") || w.ends_with(".log") || w.contains("MANIFEST-"))
}

/// Why the database would not open, and what to do about it.
fn open_hint(msg: &str, db_dir: &Path) -> String {
    let data = db_dir.parent().unwrap_or(db_dir).display();
    if msg.contains("While lock file") || msg.contains("/LOCK") {
        " (is another bkp-server using this data directory?)".into()
    } else if msg.contains("Corruption") || msg.contains("checksum mismatch") {
        let file = named_file(msg).map_or_else(|| "a database file".to_string(), |f| format!("database file {f}"));
        format!(
            " ({file} is damaged; nothing was changed. `bkp-server check --data {data}` reports what is intact; \
             `bkp-server salvage --data {data}` rebuilds the store from it and keeps the damaged one aside)"
        )
    } else {
        String::new()
    }
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
            let hint = open_hint(&msg, dir);
            StoreError::Open(dir.display().to_string(), format!("{msg}{hint}"))
        })?;
        let reserve = Reserve::new(dir);
        let store = Self {
            db,
            dir: dir.to_path_buf(),
            snapshot_lock: Default::default(),
            unlogged: AtomicU64::new(0),
            flush_lock: Default::default(),
            chunk_lock: Default::default(),
            hosts: Default::default(),
            reserve,
            commits: Mutex::new(0),
        };
        store.check_schema()?;
        store.load_hosts()?;
        store.check_commits()?;
        store.reserve.ensure(WRITE_HEADROOM);
        Ok(store)
    }

    /// Compares the commits the database holds with the count the last
    /// acknowledged commit wrote beside it: fewer means the recovery of the
    /// write-ahead log dropped acknowledged commits (a lost or truncated
    /// WAL tail), which RocksDB does without a word.
    fn check_commits(&self) -> Result<(), StoreError> {
        let stored = self
            .meta_get(schema::META_COMMIT_COUNT)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        let marked = std::fs::read(self.dir.join(COMMIT_MARK_FILE))
            .ok()
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes);
        if let Some(m) = marked.filter(|&m| m > stored) {
            tracing::error!(
                acknowledged = m,
                recovered = stored,
                "the database came back without the last {} acknowledged snapshot commit(s): recovery dropped \
                 the end of the write-ahead log in {} (lost or truncated, e.g. by a disk or file system fault). \
                 Those snapshots are gone: push again, then run `bkp-server verify --full`",
                m - stored,
                self.dir.display()
            );
        }
        *self.commits.lock().expect("commits lock") = stored;
        Ok(())
    }

    /// A write's error; "no space" releases the reserve and becomes
    /// [`StoreError::Full`].
    fn write_err(&self, e: rocksdb::Error) -> StoreError {
        let msg = e.into_string();
        if !is_no_space(&msg) {
            return StoreError::Db(msg);
        }
        tracing::error!("storage write failed: {msg}");
        self.reserve.release();
        StoreError::Full(space::free_bytes(&self.dir).unwrap_or(0) >> 20)
    }

    /// Bytes the memtables hold: what their flush will write.
    fn memtable_bytes(&self) -> u64 {
        [schema::CF_CHUNKS, schema::CF_CHUNK_META, schema::CF_HOST_CHUNKS]
            .iter()
            .filter_map(|n| {
                self.db.property_int_value_cf(self.cf(n), rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES).ok().flatten()
            })
            .sum()
    }

    /// Refuses a write of about `extra` bytes that would leave too little
    /// free space to flush what is in memory. Refusing here keeps RocksDB
    /// out of its stopped state: reads go on and writes resume as soon as
    /// space is freed. Spare room makes the reserve again.
    fn ensure_room(&self, extra: u64) -> Result<(), StoreError> {
        let Ok(free) = space::free_bytes(&self.dir) else { return Ok(()) };
        let need = self.memtable_bytes() + extra + WRITE_HEADROOM;
        if free < need {
            tracing::warn!(free_mib = free >> 20, need_mib = need >> 20, "write refused: disk nearly full");
            return Err(StoreError::Full(free >> 20));
        }
        if free > need + 4 * self.reserve.size() && !self.reserve.present() {
            self.reserve.ensure(need);
        }
        Ok(())
    }

    /// Gives the reserve back to the disk when free space is short, so a
    /// GC can delete and compact. Returns the bytes released.
    fn release_reserve(&self) -> u64 {
        let free = space::free_bytes(&self.dir).unwrap_or(0);
        if free < self.memtable_bytes() + WRITE_HEADROOM + 2 * self.reserve.size() {
            self.reserve.release()
        } else {
            0
        }
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
        self.db
            .put_cf_opt(self.cf(schema::CF_HOSTS), host, n.encode(), &Self::synced())
            .map_err(|e| self.write_err(e))?;
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

    /// For each id: is its key in `chunks`? Without reading blob files:
    /// a chunk's blob is read only as a last resort (see
    /// [`Self::data_lookup`]). A missing one is logged. `sorted`: the ids
    /// are in key order.
    fn data_present(&self, ids: &[&ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError> {
        let out = self.data_lookup(ids, sorted)?;
        for (id, _) in ids.iter().zip(&out).filter(|(_, p)| !**p) {
            tracing::warn!(
                chunk = %id.short(),
                "chunk has its chunk_meta but no data: treated as missing (the next push uploads it again); \
                 run `bkp-server verify --full`"
            );
        }
        Ok(out)
    }

    /// RocksDB's C API has no lookup that stops at a blob index (the
    /// entry that points into a blob file), and a plain get of a 1 MiB
    /// chunk reads the whole megabyte (measured: 1.7 ms per chunk). So:
    /// 1. a get that may not do I/O: a value, "not found", or "Cannot read
    ///    blob(s)" (the key is there, its value in a blob file) answer;
    ///    "no blocking io" (the SST block is not cached) does not;
    /// 2. for those, a seek bounded *by the key itself* reads the SST
    ///    blocks that hold it into the block cache and stops before the
    ///    value (the bound is checked first), then the no-I/O get again;
    /// 3. a plain get for whatever is still open (a cache too small).
    fn data_lookup(&self, ids: &[&ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cf = self.cf(schema::CF_CHUNKS);
        let no_io = || {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_read_tier(rocksdb::ReadTier::BlockCache);
            ro.set_verify_checksums(false);
            ro
        };
        let ask = |want: &[usize], ro: &rocksdb::ReadOptions| {
            self.db
                .batched_multi_get_cf_opt(cf, want.iter().map(|&i| ids[i].as_bytes()), sorted, ro)
                .into_iter()
                .map(|r| match r {
                    Ok(v) => Ok(Some(v.is_some())),
                    Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
                        Ok(e.into_string().contains("Cannot read blob").then_some(true))
                    }
                    Err(e) => Err(db_err(e)),
                })
                .collect::<Result<Vec<Option<bool>>, StoreError>>()
        };
        let mut out: Vec<Option<bool>> = vec![None; ids.len()];
        let mut open: Vec<usize> = (0..ids.len()).collect();
        for step in 0..3 {
            if open.is_empty() {
                break;
            }
            if step == 1 {
                for &i in &open {
                    let mut ro = no_io();
                    ro.set_read_tier(rocksdb::ReadTier::All);
                    ro.set_iterate_upper_bound(ids[i].as_bytes().to_vec());
                    let mut it = self.db.raw_iterator_cf_opt(cf, ro);
                    it.seek(ids[i].as_bytes());
                    it.status().map_err(db_err)?;
                }
            }
            let mut ro = no_io();
            // A plain get reads blob values whole (up to 4 MiB each): a few
            // at a time, so 8192 ids of one request never sit in memory at once.
            let per_ask = if step == 2 { 16 } else { open.len() };
            if step == 2 {
                ro.set_read_tier(rocksdb::ReadTier::All);
            }
            for part in open.chunks(per_ask) {
                for (&i, f) in part.iter().zip(ask(part, &ro)?) {
                    out[i] = f;
                }
            }
            open.retain(|&i| out[i].is_none());
        }
        Ok(out.into_iter().map(|p| p.unwrap_or(false)).collect())
    }

    /// For each id: does `host` hold it (owner in its meta, or a
    /// `host_chunks` record), and is it stored? With `stored_only`, an id
    /// that is not stored counts as not held without asking `host_chunks`,
    /// and stored means its data too, not only its `chunk_meta` (what a
    /// lost blob file leaves behind).
    fn possession(&self, host: &str, ids: &[ChunkId], stored_only: bool) -> Result<Vec<(bool, bool)>, StoreError> {
        let me = self.host_num(host);
        let mut metas = self.metas(ids.iter().copied())?;
        if stored_only {
            let with_meta: Vec<usize> = (0..ids.len()).filter(|&i| metas[i].is_some()).collect();
            let present = self.data_present(&with_meta.iter().map(|&i| &ids[i]).collect::<Vec<_>>(), false)?;
            for (i, p) in with_meta.into_iter().zip(present) {
                if !p {
                    metas[i] = None;
                }
            }
        }
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

    pub(super) fn raw_db(&self) -> &DB {
        &self.db
    }

    pub(super) fn cf(&self, name: &str) -> &ColumnFamily {
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
            self.write_err(e)
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

    pub(super) fn encode_summary(s: &SnapshotSummary) -> Vec<u8> {
        postcard::to_extend(s, vec![SUMMARY_VERSION]).expect("postcard to Vec")
    }

    pub(super) fn decode_summary(b: &[u8]) -> Result<SnapshotSummary, StoreError> {
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
        let mut out = self.recorded_sorted(ids)?;
        let with_meta: Vec<usize> = (0..ids.len()).filter(|&i| out[i]).collect();
        let present = self.data_present(&with_meta.iter().map(|&i| &ids[i]).collect::<Vec<_>>(), true)?;
        for (i, p) in with_meta.into_iter().zip(present) {
            out[i] = p;
        }
        Ok(out)
    }

    fn recorded_sorted(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
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
        self.ensure_room(chunks.iter().map(|c| c.blob.len() as u64).sum())?;
        let me = self.host_num_or_assign(host)?;
        let meta_cf = self.cf(schema::CF_CHUNK_META);
        let _l = self.chunk_lock.lock().expect("chunk lock");
        let existing = self.metas(chunks.iter().map(|c| c.id))?;
        // A chunk whose meta outlived its data is written again.
        let known: Vec<usize> = (0..chunks.len()).filter(|&i| existing[i].is_some()).collect();
        let present = self.data_present(&known.iter().map(|&i| &chunks[i].id).collect::<Vec<_>>(), false)?;
        let mut batch = WriteBatch::default();
        let mut stats = PutStats::default();
        for (i, p) in known.into_iter().zip(present) {
            if !p {
                batch.put_cf(self.cf(schema::CF_CHUNKS), chunks[i].id.as_bytes(), &chunks[i].blob);
                stats.new_bytes += chunks[i].blob.len() as u64;
            }
        }
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
            self.db.write_opt(batch, &wo).map_err(|e| self.write_err(e))?;
            self.unlogged.fetch_add(bytes as u64, Ordering::SeqCst);
        } else {
            self.db.write(batch).map_err(|e| self.write_err(e))?;
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
        self.ensure_room(record.len() as u64)?;
        self.persist_unlogged()?;
        let mut commits = self.commits.lock().expect("commits lock");
        let count = *commits + 1;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(schema::CF_META), schema::META_COMMIT_COUNT, count.to_le_bytes());
        batch.put_cf(self.cf(schema::CF_SNAPSHOTS), id.as_bytes(), &record);
        batch.put_cf(
            self.cf(schema::CF_SETS),
            schema::set_key(&snapshot.host, &snapshot.name, snapshot.time_ns, &id),
            Self::encode_summary(&summary),
        );
        // Acknowledged means on disk, and with it every chunk written before.
        self.db.write_opt(batch, &Self::synced()).map_err(|e| self.write_err(e))?;
        *commits = count;
        // Not synced: a mark that lags behind only hides a loss, never
        // reports one that did not happen (the commit itself was synced).
        let mark = self.dir.join(COMMIT_MARK_FILE);
        let tmp = mark.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, count.to_le_bytes()).and_then(|()| std::fs::rename(&tmp, &mark)) {
            tracing::warn!("writing {}: {e}", mark.display());
        }
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
        self.db.write_opt(batch, &Self::synced()).map_err(|e| self.write_err(e))?;
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
        self.db.put_cf_opt(cf, key, Self::encode_summary(&summary), &Self::synced()).map_err(|e| self.write_err(e))?;
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
        self.db.write_opt(batch, &Self::synced()).map_err(|e| self.write_err(e))?;
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
        self.db.write_opt(batch, &Self::synced()).map_err(|e| self.write_err(e))
    }

    fn host_name(&self, n: HostNum) -> Option<String> {
        self.hosts.read().expect("hosts lock").by_num.get(&n).cloned()
    }

    fn reclaim_space(&self) -> Result<(), StoreError> {
        let chunks = self.cf(schema::CF_CHUNKS);
        // The C API drops CompactRange's status: a failed compaction shows
        // only as a new background error, and one that had no room to run
        // (RocksDB's CompactionTooLarge) as not even that, hence the room
        // check before each column family.
        let bg_errors =
            || self.db.property_int_value(rocksdb::properties::BACKGROUND_ERRORS).ok().flatten().unwrap_or(0);
        let errors_before = bg_errors();
        // Blob files only shrink when compaction relocates their live
        // blobs; an age cutoff of 1.0 makes this compaction consider all
        // of them, so every freed chunk really leaves the disk.
        self.db.set_options_cf(chunks, &[("blob_garbage_collection_age_cutoff", "1.0")]).map_err(db_err)?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        let mut short = None;
        for name in schema::ALL_CFS {
            let cf = self.cf(name);
            // What the rewrite of its SST files needs at once (relocated
            // blobs that find no room fail as a background error, below).
            let need = self
                .db
                .property_int_value_cf(cf, rocksdb::properties::TOTAL_SST_FILES_SIZE)
                .ok()
                .flatten()
                .unwrap_or(0);
            let free = space::free_bytes(&self.dir).unwrap_or(u64::MAX);
            if free < need + COMPACTION_HEADROOM {
                short.get_or_insert((name, free, need));
                continue;
            }
            self.db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        self.db.set_options_cf(chunks, &[("blob_garbage_collection_age_cutoff", "0.25")]).map_err(db_err)?;
        if let Some((name, free, need)) = short {
            return Err(StoreError::Db(format!(
                "not enough free space to compact {name} ({} MiB free, about {} MiB needed): the deleted data \
                 still takes its space; free some space on the server and run gc again",
                free >> 20,
                (need + COMPACTION_HEADROOM) >> 20
            )));
        }
        let errors = bg_errors().saturating_sub(errors_before);
        if errors > 0 {
            return Err(StoreError::Db(format!(
                "{errors} compaction(s) failed (see the RocksDB LOG in {}): the deleted data may still take its space",
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn release_reserve_if_short(&self) -> u64 {
        self.release_reserve()
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != space::RESERVE_FILE)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum())
    }

    fn put_job(&self, start_ns: u64, kind: &str, record: &[u8]) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(self.cf(schema::CF_JOBS), schema::job_key(start_ns, kind), record, &Self::synced())
            .map_err(|e| self.write_err(e))
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
        self.db.write_opt(batch, &Self::synced()).map_err(|e| self.write_err(e))
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
        self.db.put_cf_opt(self.cf(schema::CF_META), key, value, &Self::synced()).map_err(|e| self.write_err(e))
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
        self.db
            .put_cf_opt(self.cf(schema::CF_DAMAGED), id.as_bytes(), record, &Self::synced())
            .map_err(|e| self.write_err(e))
    }

    fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.db
            .delete_cf_opt(self.cf(schema::CF_DAMAGED), id.as_bytes(), &Self::synced())
            .map_err(|e| self.write_err(e))
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
    fn a_chunk_whose_data_is_gone_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        // Small chunks stay inline in SSTs, large ones go to blob files.
        let big = |n: u8| {
            // Incompressible, so stored at its 40 KiB.
            let mut d = vec![0; 40 << 10];
            blake3::Hasher::new().update(&[n]).finalize_xof().fill(&mut d);
            VerifiedChunk::verify(ChunkId::of(&d), blob::encode(&d, 1)).unwrap()
        };
        let all = [chunk(b"small-1"), chunk(b"small-2"), big(1), big(2)];
        let ids: Vec<ChunkId> = all.iter().map(|c| *c.id()).collect();
        s.put_chunks("h", &all).unwrap();
        let check = |s: &RocksStore, want: [bool; 4]| {
            assert_eq!(s.host_has("h", &ids).unwrap(), want);
            let mut sorted: Vec<(ChunkId, bool)> = ids.iter().copied().zip(want).collect();
            sorted.sort();
            let (sids, swant): (Vec<ChunkId>, Vec<bool>) = sorted.into_iter().unzip();
            assert_eq!(s.stored_sorted(&sids).unwrap(), swant);
        };
        check(&s, [true; 4]);
        // In the memtable, then in SST and blob files, then with a cold cache.
        s.db.delete_cf(s.cf(schema::CF_CHUNKS), ids[0].as_bytes()).unwrap();
        check(&s, [false, true, true, true]);
        s.db.delete_cf(s.cf(schema::CF_CHUNKS), ids[2].as_bytes()).unwrap();
        s.db.flush_cf(s.cf(schema::CF_CHUNKS)).unwrap();
        check(&s, [false, true, false, true]);
        drop(s);
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        check(&s, [false, true, false, true]);
        assert!(s.chunk_meta(&ids[2]).unwrap().is_some(), "the meta stayed");
        // Uploading them again writes the data; the meta is kept.
        assert_eq!(s.put_chunks("h", &[chunk(b"small-1"), big(1)]).unwrap().new_chunks, 0);
        check(&s, [true; 4]);
        assert!(s.chunk_blob(&ids[2]).unwrap().is_some());
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
