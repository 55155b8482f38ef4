//! Opening the database and its RocksDB tuning, and the disk-space checks
//! every write goes through. [`Db`] is the one handle both halves of the
//! store share: the metadata ([`super::RocksStore`]) and the local chunk
//! data ([`super::LocalChunks`]), so that a put can be one write.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::RwLock;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options, WriteOptions, DB,
};

use crate::store::error::StoreError;
use crate::store::schema;
use crate::store::space::{self, Reserve};

/// Chunks stored smaller than this stay inline in the `chunks` SST files:
/// a blob file record costs ~64 bytes on top of the chunk (its header and
/// a second copy of the key), which for a tree of small files was ~2% of
/// the stored bytes. Compaction rewrites only these small values.
pub(super) const MIN_BLOB_FILE_BYTES: u64 = 16 << 10;
/// L0 files of `chunks` that start a compaction (RocksDB's default is 4).
const CHUNKS_L0_COMPACTION_TRIGGER: i32 = 16;
/// Free space a write must leave beside what the memtables will need
/// when flushed (WAL, MANIFEST, the flush's own files).
pub(super) const WRITE_HEADROOM: u64 = 8 << 20;

/// The open database, its directory, the disk reserve, and the state of
/// the durability protocol (see `durability`).
pub struct Db {
    pub(super) db: DB,
    /// The options it was opened with: their statistics count what
    /// compactions write (`write_counters`).
    opts: Options,
    pub(super) dir: PathBuf,
    /// Bytes written without the WAL since the last flush started.
    pub(super) unlogged: AtomicU64,
    /// Unlogged writers hold it shared from their write until they have
    /// counted it; "take the count, flush" holds it exclusively. So a
    /// chunk that is visible (and may be reused by another push) is either
    /// counted or already flushed, and a commit that finds the count at
    /// zero cannot overtake another commit's flush that covers its chunks.
    pub(super) flush_lock: RwLock<()>,
    pub(super) reserve: Reserve,
}

pub(super) fn db_err(e: rocksdb::Error) -> StoreError {
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

impl Db {
    /// Opens (creating if needed) the database under `dir` and checks its
    /// schema version.
    pub(super) fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
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
        // Tickers only (no histograms or timers): what GC's compactions
        // write, for its report.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);

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
                    // Off between GC runs: with it on, every background
                    // compaction of `chunks` relocated the live blobs of
                    // the oldest quarter of the blob files, garbage or not
                    // (random chunk keys: every SST references every blob
                    // file). GC turns it on for the files it chooses
                    // (`LocalChunks::reclaim_space_with`).
                    o.set_enable_blob_gc(false);
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
        let db = Self {
            db,
            opts: db_opts,
            dir: dir.to_path_buf(),
            unlogged: AtomicU64::new(0),
            flush_lock: Default::default(),
            reserve: Reserve::new(dir),
        };
        db.check_schema()?;
        db.reserve.ensure(WRITE_HEADROOM);
        Ok(db)
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

    pub fn raw(&self) -> &DB {
        &self.db
    }

    /// Bytes compactions have written since the open, and live blob bytes
    /// they relocated (part of the first).
    pub fn write_counters(&self) -> (u64, u64) {
        use rocksdb::statistics::Ticker;
        (
            self.opts.get_ticker_count(Ticker::CompactWriteBytes),
            self.opts.get_ticker_count(Ticker::BlobDbGcBytesRelocated),
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    pub fn synced() -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        wo
    }

    /// A write's error; "no space" releases the reserve and becomes
    /// [`StoreError::Full`].
    pub fn write_err(&self, e: rocksdb::Error) -> StoreError {
        let msg = e.into_string();
        if !is_no_space(&msg) {
            return StoreError::Db(msg);
        }
        tracing::error!("storage write failed: {msg}");
        self.reserve.release();
        StoreError::Full(space::free_bytes(&self.dir).unwrap_or(0) >> 20)
    }

    /// The chunk data backend this directory is marked with (`meta`
    /// `storage_backend`; only s3 marks it), read before the backend opens.
    pub fn storage_backend(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(schema::CF_META), schema::META_STORAGE_BACKEND).map_err(db_err)
    }

    pub fn mark_storage_backend(&self, name: &[u8]) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(self.cf(schema::CF_META), schema::META_STORAGE_BACKEND, name, &Self::synced())
            .map_err(|e| self.write_err(e))
    }

    /// Does `chunk_meta` record any chunk?
    pub fn has_chunk_meta(&self) -> Result<bool, StoreError> {
        let mut it = self.db.iterator_cf(self.cf(schema::CF_CHUNK_META), rocksdb::IteratorMode::Start);
        Ok(it.next().transpose().map_err(db_err)?.is_some())
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
    pub fn ensure_room(&self, extra: u64) -> Result<(), StoreError> {
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
    pub(super) fn release_reserve(&self) -> u64 {
        let free = space::free_bytes(&self.dir).unwrap_or(0);
        if free < self.memtable_bytes() + WRITE_HEADROOM + 2 * self.reserve.size() {
            self.reserve.release()
        } else {
            0
        }
    }
}
