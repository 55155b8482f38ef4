//! [`LocalChunks`]: chunk data in the `chunks` column family of the
//! local database, large values in RocksDB blob files (BlobDB). Its rows
//! join the metadata's batch of each put (see `ChunkStore::stage_data`),
//! so a chunk's data and its `chunk_meta` are written, and flushed, as
//! one: this backend never leaves data without metadata, nor the reverse
//! (short of a lost file, which `has_data` finds).

use std::sync::Arc;

use bkp_common::ChunkId;

use super::db::{db_err, Db, MIN_BLOB_FILE_BYTES};
use super::durability::Batch;
use crate::store::schema::ChunkMeta;
use crate::store::{schema, space, ChunkStore, ReclaimOptions, ReclaimStats, StoreError, VerifiedChunk};

/// Free space a compaction must leave beside the files it rewrites.
const COMPACTION_HEADROOM: u64 = 1 << 20;
/// What a blob file spends per chunk besides its bytes: the record
/// header and a copy of the key.
const BLOB_RECORD_OVERHEAD: u64 = 32 + 32;
/// What an SST file spends per chunk: its key (with RocksDB's sequence
/// number) and a blob reference or the value's framing, index and filter.
const SST_RECORD_OVERHEAD: u64 = 32 + 8 + 16;
const LIVE_BLOB_FILE_SIZE: &str = "rocksdb.live-blob-file-size";
const LIVE_BLOB_FILE_GARBAGE_SIZE: &str = "rocksdb.live-blob-file-garbage-size";
const NUM_BLOB_FILES: &str = "rocksdb.num-blob-files";

/// Chunk bytes the store still records, where they are stored.
#[derive(Debug, Default)]
struct LiveBytes {
    /// In blob files, record overhead included.
    blob: u64,
    /// In the SST files of `chunks` (small chunks, and every chunk's key).
    inline: u64,
}

pub struct LocalChunks {
    db: Arc<Db>,
}

impl LocalChunks {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    /// One pass over `chunk_meta` (no chunk data read): what the chunk
    /// files would hold with no garbage. Chunks a push is adding meanwhile
    /// count as live before they reach a file, so garbage is if anything
    /// underestimated, and never relocated for nothing.
    fn live_bytes(&self) -> Result<LiveBytes, StoreError> {
        let mut live = LiveBytes::default();
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        let it = self.db.raw().iterator_cf_opt(self.db.cf(schema::CF_CHUNK_META), ro, rocksdb::IteratorMode::Start);
        for item in it {
            let (_, v) = item.map_err(db_err)?;
            let Some(m) = ChunkMeta::decode(&v) else { continue };
            let len = m.stored_len as u64;
            live.inline += SST_RECORD_OVERHEAD;
            if len >= MIN_BLOB_FILE_BYTES {
                live.blob += len + BLOB_RECORD_OVERHEAD;
            } else {
                live.inline += len;
            }
        }
        Ok(live)
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
        let db = self.db.raw();
        let cf = self.db.cf(schema::CF_CHUNKS);
        let no_io = || {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_read_tier(rocksdb::ReadTier::BlockCache);
            ro.set_verify_checksums(false);
            ro
        };
        let ask = |want: &[usize], ro: &rocksdb::ReadOptions| {
            db.batched_multi_get_cf_opt(cf, want.iter().map(|&i| ids[i].as_bytes()), sorted, ro)
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
                    let mut it = db.raw_iterator_cf_opt(cf, ro);
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
}

impl ChunkStore for LocalChunks {
    fn has_data(&self, ids: &[&ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError> {
        self.data_lookup(ids, sorted)
    }

    fn stage_data(&self, chunks: &[&VerifiedChunk], batch: &mut Batch<'_>) -> Result<(), StoreError> {
        for c in chunks {
            batch.put(schema::CF_CHUNKS, c.id.as_bytes(), &c.blob);
        }
        Ok(())
    }

    fn stage_delete(&self, ids: &[ChunkId], batch: &mut Batch<'_>) -> Result<(), StoreError> {
        for id in ids {
            batch.delete(schema::CF_CHUNKS, id.as_bytes());
        }
        Ok(())
    }

    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        // Every reader of a blob (restore, scrub, drill) checks it against
        // its blake3 id, which catches what RocksDB's crc32c would; the
        // crc runs in software (RocksDB is built without SSE4.2) and
        // showed up among the top symbols of a restore's server profile.
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        self.db.raw().get_cf_opt(self.db.cf(schema::CF_CHUNKS), id.as_bytes(), &ro).map_err(db_err)
    }

    /// Nothing of its own: its rows are in the metadata's batches, which
    /// the commit makes durable (`Db::persist_unlogged`).
    fn persist(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// None, ever: data and metadata are one write and one atomic flush.
    /// (Listing the `chunks` keys would read every blob file: RocksDB's
    /// iterators load blob values.)
    fn orphan_candidates(&self, _after: Option<&ChunkId>, _limit: usize) -> Result<Vec<ChunkId>, StoreError> {
        Ok(Vec::new())
    }

    fn reclaim_space(&self) -> Result<(), StoreError> {
        self.reclaim_space_with(&ReclaimOptions { garbage_ratio: 0.0 }).map(|_| ())
    }

    /// Metadata column families are compacted whole (their deletes go);
    /// chunk data only where it pays, from an estimate of its garbage:
    /// the SST files of `chunks` when their size is at most the garbage,
    /// blob files only when more than
    /// `garbage_ratio` of their bytes is garbage, the oldest quarter per
    /// pass, until the garbage is under half of that.
    fn reclaim_space_with(&self, opts: &ReclaimOptions) -> Result<ReclaimStats, StoreError> {
        let db = self.db.raw();
        let chunks = self.db.cf(schema::CF_CHUNKS);
        // The C API drops CompactRange's status: a failed compaction shows
        // only as a new background error, and one that had no room to run
        // (RocksDB's CompactionTooLarge) as not even that, hence the room
        // check before each compaction.
        let bg_errors = || db.property_int_value(rocksdb::properties::BACKGROUND_ERRORS).ok().flatten().unwrap_or(0);
        let errors_before = bg_errors();
        let (written_before, relocated_before) = self.db.write_counters();
        let prop = |cf, name: &str| db.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0);
        let mut compact_opts = rocksdb::CompactOptions::default();
        compact_opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        let mut short = None;
        // Compacts one column family whole if there is room for `extra`
        // bytes of relocated blobs beside the rewrite of its SST files.
        let mut compact = |name: &'static str, extra: u64| {
            let cf = self.db.cf(name);
            let need = prop(cf, rocksdb::properties::LIVE_SST_FILES_SIZE.as_str()) + extra;
            let free = space::free_bytes(self.db.dir()).unwrap_or(u64::MAX);
            if free < need + COMPACTION_HEADROOM {
                short.get_or_insert((name, free, need));
                return false;
            }
            db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &compact_opts);
            true
        };
        for name in schema::ALL_CFS.into_iter().filter(|&n| n != schema::CF_CHUNKS) {
            compact(name, 0);
        }

        // Chunks still in the memtable are not in any blob file yet, but
        // `chunk_meta` counts them: flushed first, so the estimate below
        // compares like with like.
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        let cfs = [schema::CF_CHUNKS, schema::CF_CHUNK_META, schema::CF_HOST_CHUNKS].map(|n| self.db.cf(n));
        db.flush_cfs_opt(&cfs, &fo).map_err(|e| self.db.write_err(e))?;
        let live = self.live_bytes()?;
        let blob_total = prop(chunks, LIVE_BLOB_FILE_SIZE);
        let sst_total = prop(chunks, rocksdb::properties::LIVE_SST_FILES_SIZE.as_str());
        let blob_garbage = blob_total.saturating_sub(live.blob);
        let inline_garbage = sst_total.saturating_sub(live.inline);
        let mut stats = ReclaimStats {
            garbage_before: blob_garbage + inline_garbage,
            data_bytes_before: blob_total,
            ..Default::default()
        };
        let worth = |garbage: u64, total: u64, ratio: f64| garbage > 0 && garbage as f64 > ratio * total as f64;
        let full = opts.garbage_ratio <= 0.0;
        let relocate = worth(blob_garbage, blob_total, opts.garbage_ratio);
        // Step 1, SST files only (blob GC stays off): drops deleted keys
        // and the small chunks stored inline, frees every blob file with
        // nothing live left, and makes RocksDB's garbage figures exact. It
        // rewrites the SST files of `chunks` (keys, blob references, small
        // chunks; each level the data passes through, measured about twice
        // their size), so it runs when that is at most the garbage, or
        // before a relocation. It also leaves every key in one
        // level, so that the relocation below moves each blob once (a
        // compaction per level, each relocating again, made the old
        // cutoff-1.0 reclaim write up to twice the live data).
        let garbage = blob_garbage + inline_garbage;
        let sst_pass = relocate || (garbage > 0 && (full || garbage >= sst_total));
        if sst_pass && compact(schema::CF_CHUNKS, 0) && relocate {
            // Step 2: the oldest quarter of the blob files (at least one)
            // per pass: their live blobs are moved to new files, which
            // are the newest, so each pass takes the next oldest. Until
            // the garbage is under half the threshold (none, for a full
            // reclaim); a quarter at a time also needs only a quarter of
            // the room.
            let set = |on: bool, cutoff: f64| {
                let cutoff = cutoff.to_string();
                db.set_options_cf(
                    chunks,
                    &[
                        ("enable_blob_garbage_collection", if on { "true" } else { "false" }),
                        ("blob_garbage_collection_age_cutoff", cutoff.as_str()),
                    ],
                )
                .map_err(db_err)
            };
            for pass in 0..if full { 8 } else { 4 } {
                let total = prop(chunks, LIVE_BLOB_FILE_SIZE);
                let ratio = if pass == 0 { opts.garbage_ratio } else { opts.garbage_ratio / 2.0 };
                if !worth(prop(chunks, LIVE_BLOB_FILE_GARBAGE_SIZE), total, ratio) {
                    break;
                }
                let files = prop(chunks, NUM_BLOB_FILES).max(1);
                // RocksDB relocates the files before index cutoff x files.
                let cutoff = ((files.div_ceil(4) as f64 + 0.5) / files as f64).min(1.0);
                set(true, cutoff)?;
                let ran = compact(schema::CF_CHUNKS, (total as f64 * cutoff) as u64);
                set(false, cutoff)?;
                if !ran {
                    break;
                }
                stats.relocation_passes += 1;
            }
        }
        let (written, relocated) = self.db.write_counters();
        stats.bytes_rewritten = written.saturating_sub(written_before);
        stats.bytes_relocated = relocated.saturating_sub(relocated_before);
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
                self.db.dir().display()
            )));
        }
        Ok(stats)
    }

    /// The whole database directory (metadata included), reserve left out.
    fn disk_bytes(&self) -> Result<u64, StoreError> {
        let rd = std::fs::read_dir(self.db.dir()).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != space::RESERVE_FILE)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum())
    }
}
