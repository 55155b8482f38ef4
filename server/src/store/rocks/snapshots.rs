//! Snapshot records (`snapshots`) and the set index (`sets`, each entry a
//! snapshot summary), and the commit that writes both.

use bkp_common::snapshot::{Incomplete, Snapshot, SnapshotSummary};
use bkp_common::SnapshotId;

use super::db::db_err;
use super::durability::Batch;
use super::RocksStore;
use crate::store::{schema, StoreError};

impl RocksStore {
    /// The commit count `meta` holds, checked against the commit mark.
    pub(super) fn check_commits(&self) -> Result<(), StoreError> {
        let stored = self
            .db
            .raw()
            .get_cf(self.cf(schema::CF_META), schema::META_COMMIT_COUNT)
            .map_err(db_err)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        self.db.check_commit_mark(stored);
        *self.commits.lock().expect("commits lock") = stored;
        Ok(())
    }

    pub fn commit_snapshot(
        &self,
        snapshot: &Snapshot,
        incomplete: Option<Incomplete>,
    ) -> Result<SnapshotSummary, StoreError> {
        let record = snapshot.encode();
        let id = SnapshotId::of(&record);
        let summary = SnapshotSummary { incomplete, ..snapshot.summary(id) };
        self.db.ensure_room(record.len() as u64)?;
        // Every chunk put before, data and metadata, is durable first.
        self.data.keep_trees(&snapshot.tree)?;
        self.data.persist()?;
        self.db.persist_unlogged()?;
        self.data.record_snapshot(&id, &record)?;
        let mut commits = self.commits.lock().expect("commits lock");
        let count = *commits + 1;
        let mut batch = Batch::new(&self.db);
        batch.put(schema::CF_META, schema::META_COMMIT_COUNT, count.to_le_bytes());
        batch.put(schema::CF_SNAPSHOTS, id.as_bytes(), &record);
        batch.put(
            schema::CF_SETS,
            schema::set_key(&snapshot.host, &snapshot.name, snapshot.time_ns, &id),
            schema::encode_summary(&summary),
        );
        // Acknowledged means on disk, and with it every chunk written before.
        self.db.write_synced(batch)?;
        *commits = count;
        self.db.write_commit_mark(count);
        Ok(summary)
    }

    /// At open, once: a `protected/` key for every summary protected
    /// before those keys existed.
    pub(super) fn index_protected(&self) -> Result<(), StoreError> {
        let meta = self.cf(schema::CF_META);
        if self.db.raw().get_cf(meta, schema::META_PROTECTED_INDEX).map_err(db_err)?.is_some() {
            return Ok(());
        }
        let mut batch = Batch::new(&self.db);
        for s in self.list_snapshots(None, None)?.iter().filter(|s| s.protected) {
            batch.put(schema::CF_META, schema::protected_key(&s.id), b"");
        }
        batch.put(schema::CF_META, schema::META_PROTECTED_INDEX, [1]);
        self.db.write_synced(batch)
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>, StoreError> {
        match self.db.raw().get_cf(self.cf(schema::CF_SNAPSHOTS), id.as_bytes()).map_err(db_err)? {
            None => Ok(None),
            Some(b) => {
                Snapshot::decode(&b).map(Some).map_err(|e| StoreError::Corrupt(format!("snapshot {}: {e}", id.short())))
            }
        }
    }

    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<bool, StoreError> {
        let _l = self.snapshot_lock.lock().expect("snapshot lock");
        let Some(snap) = self.snapshot(id)? else { return Ok(false) };
        let set_key = schema::set_key(&snap.host, &snap.name, snap.time_ns, id);
        if let Some(v) = self.db.raw().get_cf(self.cf(schema::CF_SETS), &set_key).map_err(db_err)? {
            if schema::decode_summary(&v)?.protected {
                return Err(StoreError::Protected(*id));
            }
        }
        let mut batch = Batch::new(&self.db);
        batch.delete(schema::CF_SNAPSHOTS, id.as_bytes());
        batch.delete(schema::CF_SETS, set_key);
        batch.delete(schema::CF_META, schema::protected_key(id));
        // A forgotten snapshot no longer needs healing, nor alerting on.
        batch.delete(schema::CF_DAMAGED, id.as_bytes());
        self.db.write_synced(batch)?;
        self.data.forget_snapshot(id);
        Ok(true)
    }

    pub fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<bool, StoreError> {
        let _l = self.snapshot_lock.lock().expect("snapshot lock");
        let Some(snap) = self.snapshot(id)? else { return Ok(false) };
        let key = schema::set_key(&snap.host, &snap.name, snap.time_ns, id);
        let cf = self.cf(schema::CF_SETS);
        let Some(v) = self.db.raw().get_cf(cf, &key).map_err(db_err)? else { return Ok(false) };
        let mut summary = schema::decode_summary(&v)?;
        summary.protected = protected;
        let mut batch = Batch::new(&self.db);
        batch.put(schema::CF_SETS, key, schema::encode_summary(&summary));
        match protected {
            true => batch.put(schema::CF_META, schema::protected_key(id), b""),
            false => batch.delete(schema::CF_META, schema::protected_key(id)),
        }
        self.db.write_synced(batch)?;
        Ok(true)
    }

    pub fn list_snapshots(&self, host: Option<&str>, name: Option<&str>) -> Result<Vec<SnapshotSummary>, StoreError> {
        let prefix = match (host, name) {
            (Some(h), Some(n)) => schema::set_prefix(h, n),
            (Some(h), None) => schema::host_prefix(h),
            (None, _) => Vec::new(),
        };
        let mut out = Vec::new();
        for item in self.db.raw().prefix_iterator_cf(self.cf(schema::CF_SETS), &prefix) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let s = schema::decode_summary(&v)?;
            if host.is_none() && name.is_some_and(|n| n != s.name) {
                continue;
            }
            out.push(s);
        }
        out.sort_by_key(|s| s.time_ns);
        Ok(out)
    }
}
