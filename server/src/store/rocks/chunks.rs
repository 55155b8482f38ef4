//! [`LocalChunks`]: chunk data in the `chunks` column family of the
//! local database, large values in RocksDB blob files (BlobDB). Its rows
//! join the metadata's batch of each put (see `ChunkStore::stage_data`),
//! so a chunk's data and its `chunk_meta` are written, and flushed, as
//! one: this backend never leaves data without metadata, nor the reverse
//! (short of a lost file, which `has_data` finds).

use std::sync::Arc;

use bkp_common::ChunkId;

use super::db::{db_err, Db};
use super::durability::Batch;
use crate::store::{schema, space, ChunkStore, StoreError, VerifiedChunk};

/// Free space a compaction must leave beside the files it rewrites.
const COMPACTION_HEADROOM: u64 = 1 << 20;

pub struct LocalChunks {
    db: Arc<Db>,
}

impl LocalChunks {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
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
        let db = self.db.raw();
        let chunks = self.db.cf(schema::CF_CHUNKS);
        // The C API drops CompactRange's status: a failed compaction shows
        // only as a new background error, and one that had no room to run
        // (RocksDB's CompactionTooLarge) as not even that, hence the room
        // check before each column family.
        let bg_errors = || db.property_int_value(rocksdb::properties::BACKGROUND_ERRORS).ok().flatten().unwrap_or(0);
        let errors_before = bg_errors();
        // Blob files only shrink when compaction relocates their live
        // blobs; an age cutoff of 1.0 makes this compaction consider all
        // of them, so every freed chunk really leaves the disk.
        db.set_options_cf(chunks, &[("blob_garbage_collection_age_cutoff", "1.0")]).map_err(db_err)?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        let mut short = None;
        // All column families: the metadata's deletes are reclaimed too.
        for name in schema::ALL_CFS {
            let cf = self.db.cf(name);
            // What the rewrite of its SST files needs at once (relocated
            // blobs that find no room fail as a background error, below).
            let need =
                db.property_int_value_cf(cf, rocksdb::properties::TOTAL_SST_FILES_SIZE).ok().flatten().unwrap_or(0);
            let free = space::free_bytes(self.db.dir()).unwrap_or(u64::MAX);
            if free < need + COMPACTION_HEADROOM {
                short.get_or_insert((name, free, need));
                continue;
            }
            db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        db.set_options_cf(chunks, &[("blob_garbage_collection_age_cutoff", "0.25")]).map_err(db_err)?;
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
        Ok(())
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
