//! The durability protocol: when a write is on disk.
//!
//! * A put ([`Db::write_put`]) of at least [`UNLOGGED_MIN_BYTES`] skips
//!   the write-ahead log, so chunk data is written once (to a blob file at
//!   the memtable flush) instead of twice. Smaller ones go through the WAL.
//! * A commit first calls [`Db::persist_unlogged`]: one atomic flush of
//!   `chunks`, `chunk_meta` and `host_chunks`, which makes every put
//!   before it durable, whichever push wrote it; then its own synced
//!   batch, whose ordered WAL sync also covers the small logged puts.
//! * After each acknowledged commit the count of commits is written to
//!   [`COMMIT_MARK_FILE`] beside the database, so an open can tell when
//!   recovery dropped acknowledged commits (`Db::check_commit_mark`).

use std::sync::atomic::Ordering;

use rocksdb::{FlushOptions, WriteBatch, WriteOptions};

use super::db::Db;
use crate::store::error::StoreError;
use crate::store::schema;

/// Put batches from this size on skip the WAL (see the module doc):
/// below it the second write costs little and a flush per small push
/// would leave many tiny blob files.
const UNLOGGED_MIN_BYTES: usize = 256 << 10;
/// Written after each acknowledged commit: the commit count it reached.
pub const COMMIT_MARK_FILE: &str = "bkp-commit-mark";

/// One atomic write to the database: the rows of a put, both the
/// metadata's (`chunk_meta`, `host_chunks`) and those the chunk data
/// backend adds (see `ChunkStore::stage_data`).
pub struct Batch<'a> {
    db: &'a Db,
    pub(super) wb: WriteBatch,
}

impl<'a> Batch<'a> {
    pub fn new(db: &'a Db) -> Self {
        Self { db, wb: WriteBatch::default() }
    }

    pub fn put(&mut self, cf: &str, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.wb.put_cf(self.db.cf(cf), key, value);
    }

    pub fn delete(&mut self, cf: &str, key: impl AsRef<[u8]>) {
        self.wb.delete_cf(self.db.cf(cf), key);
    }

    pub fn db(&self) -> &'a Db {
        self.db
    }
}

impl Db {
    /// Writes a put's batch: without the WAL when it is large (counted
    /// for the next [`Db::persist_unlogged`]), else through it.
    pub fn write_put(&self, batch: Batch<'_>) -> Result<(), StoreError> {
        let bytes = batch.wb.size_in_bytes();
        if bytes >= UNLOGGED_MIN_BYTES {
            let mut wo = WriteOptions::default();
            wo.disable_wal(true);
            let _counting = self.flush_lock.read().expect("flush lock");
            self.db.write_opt(batch.wb, &wo).map_err(|e| self.write_err(e))?;
            self.unlogged.fetch_add(bytes as u64, Ordering::SeqCst);
        } else {
            self.db.write(batch.wb).map_err(|e| self.write_err(e))?;
        }
        Ok(())
    }

    /// Writes a batch synced: on disk when this returns.
    pub fn write_synced(&self, batch: Batch<'_>) -> Result<(), StoreError> {
        self.db.write_opt(batch.wb, &Self::synced()).map_err(|e| self.write_err(e))
    }

    /// Makes every put written without the WAL durable (one atomic flush
    /// of the chunk column families, skipped when there are none).
    pub fn persist_unlogged(&self) -> Result<(), StoreError> {
        let _l = self.flush_lock.write().expect("flush lock");
        let pending = self.unlogged.swap(0, Ordering::SeqCst);
        if pending == 0 {
            return Ok(());
        }
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        // `chunk_loc` too: an object store's locations ride in the same
        // unlogged batches as the metadata they belong to.
        let cfs = [schema::CF_CHUNKS, schema::CF_CHUNK_META, schema::CF_HOST_CHUNKS, schema::CF_CHUNK_LOC]
            .map(|n| self.cf(n));
        self.db.flush_cfs_opt(&cfs, &fo).map_err(|e| {
            // Not flushed: the next commit must try again.
            self.unlogged.fetch_add(pending, Ordering::SeqCst);
            self.write_err(e)
        })
    }

    /// Compares the commits the database holds (`stored`, from `meta`)
    /// with the count the last acknowledged commit wrote beside it: fewer
    /// means the recovery of the write-ahead log dropped acknowledged
    /// commits (a lost or truncated WAL tail), which RocksDB does without
    /// a word.
    pub(super) fn check_commit_mark(&self, stored: u64) {
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
    }

    /// Records that `count` commits were acknowledged. Not synced: a mark
    /// that lags behind only hides a loss, never reports one that did not
    /// happen (the commit itself was synced).
    pub(super) fn write_commit_mark(&self, count: u64) {
        let mark = self.dir.join(COMMIT_MARK_FILE);
        let tmp = mark.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, count.to_le_bytes()).and_then(|()| std::fs::rename(&tmp, &mark)) {
            tracing::warn!("writing {}: {e}", mark.display());
        }
    }
}
