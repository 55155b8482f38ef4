//! `sync_chunks`: which `[[sync]]` jobs delivered each chunk's bytes.
//! A copy records a chunk stored here for another host as its host's
//! without a transfer only when the same job delivered it before
//! (`crate::sync::local`): a primary that once sent the bytes could send
//! them again, so its claim costs nothing; a primary that never did gets
//! no chunk by naming it.

use bkp_common::ChunkId;

use super::db::db_err;
use super::durability::Batch;
use super::RocksStore;
use crate::store::schema::{self, Delivered};
use crate::store::StoreError;

impl RocksStore {
    fn delivered(&self, ids: &[ChunkId]) -> Result<Vec<Delivered>, StoreError> {
        let cf = self.cf(schema::CF_SYNC_CHUNKS);
        let found = self.db.raw().multi_get_cf(ids.iter().map(|id| (cf, id.as_bytes().to_vec())));
        ids.iter()
            .zip(found)
            .map(|(id, v)| {
                Ok(match v.map_err(db_err)? {
                    None => Delivered::default(),
                    Some(v) => Delivered::decode(&v).unwrap_or_else(|| {
                        // Costs a transfer, nothing else: the next delivery rewrites it.
                        tracing::warn!(chunk = %id.short(), "sync_chunks record does not decode; treated as empty");
                        Delivered::default()
                    }),
                })
            })
            .collect()
    }

    pub fn delivered_by(&self, remote: &str, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        Ok(self.delivered(ids)?.iter().map(|d| d.contains(remote)).collect())
    }

    /// Unlogged, as the chunk puts it follows: made durable with them.
    pub fn record_delivered(&self, remote: &str, ids: &[ChunkId]) -> Result<(), StoreError> {
        // Under the chunk lock, so a GC's delete of the chunk (which
        // deletes its record too) is not undone by a stale rewrite.
        let _l = self.chunk_lock.lock().expect("chunk lock");
        let mut batch = Batch::new(&self.db);
        let mut any = false;
        for (id, mut d) in ids.iter().zip(self.delivered(ids)?) {
            if d.add(remote) {
                batch.put(schema::CF_SYNC_CHUNKS, id.as_bytes(), d.encode());
                any = true;
            }
        }
        if any {
            self.db.write_put(batch)?;
        }
        Ok(())
    }
}
