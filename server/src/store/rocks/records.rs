//! The small records: job runs, store metadata (the scheduler's and the
//! push failures' included), quarantined chunks, damaged snapshots. Each
//! write is synced.

use bkp_common::{ChunkId, SnapshotId};

use super::db::{db_err, Db};
use super::RocksStore;
use rocksdb::WriteBatch;

use crate::report::JobRecord;
use crate::store::schema::{self, AlertState, Damage, PushFailure, QuarantineRecord, ScheduledSince, ScrubCursor};
use crate::store::StoreError;

impl RocksStore {
    fn put_synced(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.raw().put_cf_opt(self.cf(cf), key, value, &Db::synced()).map_err(|e| self.db.write_err(e))
    }

    pub fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.put_synced(schema::CF_JOBS, &schema::job_key(rec.start_ns, rec.kind.as_str()), &schema::encode_job(rec))
    }

    /// Deletes the records of runs started before `before_ns` (one range
    /// tombstone: keys start with the start time, big-endian).
    pub fn trim_jobs(&self, before_ns: u64) -> Result<u64, StoreError> {
        let cf = self.cf(schema::CF_JOBS);
        let end = before_ns.to_be_bytes();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut n = 0u64;
        for item in self.db.raw().iterator_cf_opt(cf, ro, rocksdb::IteratorMode::Start) {
            item.map_err(db_err)?;
            n += 1;
        }
        if n > 0 {
            let mut wb = WriteBatch::default();
            wb.delete_range_cf(cf, [0u8; 8].as_slice(), end.as_slice());
            self.db.raw().write_opt(wb, &Db::synced()).map_err(|e| self.db.write_err(e))?;
        }
        Ok(n)
    }

    /// The newest `limit` records, newest first; one that does not decode
    /// fails the listing (`Corrupt`, naming the record).
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.db
            .raw()
            .iterator_cf(self.cf(schema::CF_JOBS), rocksdb::IteratorMode::End)
            .take(limit)
            .map(|r| r.map_err(db_err).and_then(|(_, v)| schema::decode_job(&v)))
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

    pub(super) fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.raw().get_cf(self.cf(schema::CF_META), key).map_err(db_err)
    }

    pub(super) fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put_synced(schema::CF_META, key, value)
    }

    pub fn scheduled_since(&self) -> Result<Option<ScheduledSince>, StoreError> {
        self.meta_get(schema::META_SCHEDULED_SINCE)?.map(|b| schema::decode_scheduled_since(&b)).transpose()
    }

    pub fn set_scheduled_since(&self, s: &ScheduledSince) -> Result<(), StoreError> {
        self.meta_put(schema::META_SCHEDULED_SINCE, &schema::encode_scheduled_since(s))
    }

    pub fn sync_state(&self, name: &str) -> Result<Option<crate::store::schema::SyncState>, StoreError> {
        self.meta_get(&schema::sync_state_key(name))?.map(|b| schema::decode_sync_state(&b)).transpose()
    }

    pub fn set_sync_state(&self, name: &str, s: &crate::store::schema::SyncState) -> Result<(), StoreError> {
        self.meta_put(&schema::sync_state_key(name), &schema::encode_sync_state(s))
    }

    /// Every set's push failures. A record that does not decode is logged
    /// and left out (it only costs that set's old count).
    pub fn push_failures(&self) -> Result<Vec<PushFailure>, StoreError> {
        let prefix = schema::PUSH_FAILURE_PREFIX;
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf(self.cf(schema::CF_META), mode) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(prefix) {
                break;
            }
            match schema::decode_push_failure(&v) {
                Ok(f) => out.push(f),
                Err(e) => tracing::warn!("{e}; that set's earlier failures are forgotten"),
            }
        }
        Ok(out)
    }

    /// Writes these sets' failure records and deletes those of `delete`, in
    /// one synced write.
    pub fn put_push_failures(&self, put: &[PushFailure], delete: &[(String, String)]) -> Result<(), StoreError> {
        let cf = self.cf(schema::CF_META);
        let mut b = WriteBatch::default();
        for (host, name) in delete {
            b.delete_cf(cf, schema::push_failure_key(host, name));
        }
        for f in put {
            b.put_cf(cf, schema::push_failure_key(&f.host, &f.name), schema::encode_push_failure(f));
        }
        self.db.raw().write_opt(b, &Db::synced()).map_err(|e| self.db.write_err(e))
    }

    /// At open: a push failure table an older build wrote as one record
    /// becomes one record per set (one write: both, or the old one still).
    /// An old table that does not decode is dropped, as that build did.
    pub(super) fn migrate_push_failures(&self) -> Result<(), StoreError> {
        let Some(old) = self.meta_get(schema::META_PUSH_FAILURES_V1)? else { return Ok(()) };
        let sets = schema::decode_push_failures_v1(&old).unwrap_or_else(|e| {
            tracing::warn!("{e}; the push failures reported before this upgrade are forgotten");
            Vec::new()
        });
        let cf = self.cf(schema::CF_META);
        let mut b = WriteBatch::default();
        for f in &sets {
            b.put_cf(cf, schema::push_failure_key(&f.host, &f.name), schema::encode_push_failure(f));
        }
        b.delete_cf(cf, schema::META_PUSH_FAILURES_V1);
        self.db.raw().write_opt(b, &Db::synced()).map_err(|e| self.db.write_err(e))
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
