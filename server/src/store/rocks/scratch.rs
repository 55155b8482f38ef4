//! The GC's scratch column family (`gc_mark`): the part of a run's mark
//! set that outgrew its memory budget (see `crate::gc`). Written without
//! the WAL and never synced: a crash loses a run anyway, and the next run
//! starts by emptying it.

use bkp_common::ChunkId;
use rocksdb::WriteOptions;

use super::db::{db_err, Db};
use crate::store::{schema, StoreError};

pub(super) fn clear(db: &Db) -> Result<(), StoreError> {
    let cf = db.cf(schema::CF_GC_MARK);
    // One range tombstone over every key (all start with `c` or `h`),
    // then a compaction that drops the files it covers.
    db.raw().delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 40].as_slice()).map_err(|e| db.write_err(e))?;
    db.raw().compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
    Ok(())
}

pub(super) fn put(db: &Db, chunks: &[ChunkId], pairs: &[(u32, ChunkId)]) -> Result<(), StoreError> {
    db.ensure_room(((chunks.len() * 33 + pairs.len() * 37) * 2) as u64)?;
    let cf = db.cf(schema::CF_GC_MARK);
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    // Batches of a few MiB: the memtable, not one huge batch, takes them.
    for part in chunks.chunks(1 << 16) {
        let mut wb = rocksdb::WriteBatch::default();
        for id in part {
            wb.put_cf(cf, schema::mark_chunk_key(id), []);
        }
        db.raw().write_opt(wb, &wo).map_err(|e| db.write_err(e))?;
    }
    for part in pairs.chunks(1 << 16) {
        let mut wb = rocksdb::WriteBatch::default();
        for (h, id) in part {
            wb.put_cf(cf, schema::mark_pair_key(*h, id), []);
        }
        db.raw().write_opt(wb, &wo).map_err(|e| db.write_err(e))?;
    }
    Ok(())
}

pub(super) fn has<K: AsRef<[u8]>>(
    db: &Db,
    keys: impl Iterator<Item = K>,
    sorted: bool,
) -> Result<Vec<bool>, StoreError> {
    let cf = db.cf(schema::CF_GC_MARK);
    let keys: Vec<K> = keys.collect();
    db.raw()
        .batched_multi_get_cf(cf, keys.iter().map(|k| k.as_ref()), sorted)
        .into_iter()
        .map(|r| r.map(|v| v.is_some()).map_err(db_err))
        .collect()
}

pub(super) fn chunks(db: &Db, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>, StoreError> {
    let start = match after {
        Some(a) => schema::mark_chunk_key(a).to_vec(),
        None => vec![b'c'],
    };
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(vec![b'c' + 1]);
    let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
    let mut out = Vec::with_capacity(limit.min(1 << 16));
    for item in db.raw().iterator_cf_opt(db.cf(schema::CF_GC_MARK), ro, mode) {
        let (k, _) = item.map_err(db_err)?;
        let id = schema::split_mark_chunk_key(&k).ok_or_else(|| StoreError::Corrupt("gc_mark key".into()))?;
        if Some(&id) == after {
            continue;
        }
        out.push(id);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}
