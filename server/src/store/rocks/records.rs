//! The small records: job runs, store metadata, quarantined chunks,
//! damaged snapshots. Each write is synced.

use bkp_common::{ChunkId, SnapshotId};

use super::db::{db_err, Db};
use super::RocksStore;
use crate::store::schema::{self, AlertState, Damage, QuarantineRecord, ScrubCursor};
use crate::store::StoreError;

impl RocksStore {
    fn put_synced(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.raw().put_cf_opt(self.cf(cf), key, value, &Db::synced()).map_err(|e| self.db.write_err(e))
    }

    pub fn put_job(&self, start_ns: u64, kind: &str, record: &[u8]) -> Result<(), StoreError> {
        self.put_synced(schema::CF_JOBS, &schema::job_key(start_ns, kind), record)
    }

    pub fn jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.db
            .raw()
            .iterator_cf(self.cf(schema::CF_JOBS), rocksdb::IteratorMode::End)
            .take(limit)
            .map(|r| r.map(|(_, v)| v.to_vec()).map_err(db_err))
            .collect()
    }

    pub fn quarantined(&self) -> Result<Vec<(ChunkId, QuarantineRecord)>, StoreError> {
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

    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .meta_get(schema::META_SCHEMA_VERSION)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_le_bytes))
    }

    pub fn scrub_cursor(&self) -> Result<ScrubCursor, StoreError> {
        self.meta_get(schema::META_SCRUB_CURSOR)?.map_or(Ok(ScrubCursor::default()), |b| ScrubCursor::decode(&b))
    }

    pub fn set_scrub_cursor(&self, c: &ScrubCursor) -> Result<(), StoreError> {
        self.meta_put(schema::META_SCRUB_CURSOR, &c.encode())
    }

    pub fn alert_state(&self) -> Result<AlertState, StoreError> {
        Ok(match self.meta_get(schema::META_ALERT_STATE)? {
            None => AlertState::new(),
            // The state only suppresses repeats: if it cannot be read, notify afresh.
            Some(b) => schema::decode_alert_state(&b).unwrap_or_else(|e| {
                tracing::warn!("{e}; alerts that are firing are notified again");
                AlertState::new()
            }),
        })
    }

    pub fn set_alert_state(&self, s: &AlertState) -> Result<(), StoreError> {
        self.meta_put(schema::META_ALERT_STATE, &schema::encode_alert_state(s))
    }

    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.raw().get_cf(self.cf(schema::CF_META), key).map_err(db_err)
    }

    pub fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put_synced(schema::CF_META, key, value)
    }

    /// A record that does not decode is logged and left out (the next
    /// drill of its snapshot writes it again, or heals it).
    pub fn damaged(&self) -> Result<Vec<(SnapshotId, Damage)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf(self.cf(schema::CF_DAMAGED), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let id = SnapshotId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("damaged key length".into()))?;
            match Damage::decode(&v) {
                Ok(d) => out.push((id, d)),
                Err(e) => tracing::warn!(snapshot = %id.short(), "unreadable damage record: {e}"),
            }
        }
        Ok(out)
    }

    pub fn put_damaged(&self, id: &SnapshotId, d: &Damage) -> Result<(), StoreError> {
        self.put_synced(schema::CF_DAMAGED, id.as_bytes(), &d.encode())
    }

    pub fn delete_damaged(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.db
            .raw()
            .delete_cf_opt(self.cf(schema::CF_DAMAGED), id.as_bytes(), &Db::synced())
            .map_err(|e| self.db.write_err(e))
    }
}
