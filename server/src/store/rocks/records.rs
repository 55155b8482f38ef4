//! The small records: job runs, store metadata, quarantined chunks,
//! damaged snapshots. Each write is synced.

use bkp_common::{ChunkId, SnapshotId};

use super::db::{db_err, Db};
use super::RocksStore;
use crate::store::schema::{self, QuarantineRecord};
use crate::store::StoreError;

impl RocksStore {
    fn put_synced(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.raw().put_cf_opt(self.cf(cf), key, value, &Db::synced()).map_err(|e| self.db.write_err(e))
    }

    pub(crate) fn put_job(&self, start_ns: u64, kind: &str, record: &[u8]) -> Result<(), StoreError> {
        self.put_synced(schema::CF_JOBS, &schema::job_key(start_ns, kind), record)
    }

    pub(crate) fn jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.db
            .raw()
            .iterator_cf(self.cf(schema::CF_JOBS), rocksdb::IteratorMode::End)
            .take(limit)
            .map(|r| r.map(|(_, v)| v.to_vec()).map_err(db_err))
            .collect()
    }

    pub(crate) fn quarantined(&self) -> Result<Vec<(ChunkId, QuarantineRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf(self.cf(schema::CF_QUARANTINE), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let id = ChunkId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("quarantine key length".into()))?;
            let mut rec = QuarantineRecord::decode(&v)
                .ok_or_else(|| StoreError::Corrupt(format!("quarantine record of {}", id.short())))?;
            rec.blob = Vec::new();
            out.push((id, rec));
        }
        Ok(out)
    }

    pub(crate) fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.raw().get_cf(self.cf(schema::CF_META), key).map_err(db_err)
    }

    pub(crate) fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put_synced(schema::CF_META, key, value)
    }

    pub(crate) fn damaged(&self) -> Result<Vec<(SnapshotId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf(self.cf(schema::CF_DAMAGED), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let id = SnapshotId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("damaged key length".into()))?;
            out.push((id, v.to_vec()));
        }
        Ok(out)
    }

    pub(crate) fn put_damaged(&self, id: &SnapshotId, record: &[u8]) -> Result<(), StoreError> {
        self.put_synced(schema::CF_DAMAGED, id.as_bytes(), record)
    }

    pub(crate) fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.db
            .raw()
            .delete_cf_opt(self.cf(schema::CF_DAMAGED), id.as_bytes(), &Db::synced())
            .map_err(|e| self.db.write_err(e))
    }
}
