//! `bkp-server check` and `bkp-server salvage`: what of a damaged database
//! is intact, and a new database rebuilt from that.
//!
//! The damaged database is opened read-only with RocksDB's paranoid checks
//! off, so a file whose blocks fail their checksum does not stop the open;
//! reads that reach it fail instead. Each column family is read forward
//! until the first error, then backward from its end until an error or a
//! key already read: a bad block costs the records in it (and, when its
//! index is bad, the rest of its file), not those around it. Keys other
//! column families know (a summary in `sets` names its snapshot, a
//! `chunk_meta` its chunk) are then looked up one by one, which reaches
//! records past the damage that the scans could not. Every record is
//! checked before it counts as readable: a snapshot against its id (a
//! hash of its bytes), a chunk against its id, the rest by decoding.
//!
//! Salvage writes what is readable into `db.salvage` beside `db`, repairs
//! what the pieces need to agree (a summary without its snapshot is
//! dropped, a snapshot without a summary gets one, protected when the
//! `protected/` record of it survived, a chunk without its
//! meta gets one, a meta without its chunk goes, every snapshot's host
//! holds the chunks it references), then renames `db` to
//! `db.damaged-<unix seconds>` (kept for inspection; delete it when done)
//! and `db.salvage` to `db`.

// unsafe: fcntl(F_GETLK) probe of RocksDB's own LOCK file; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{blob, ChunkId, SnapshotId};
use rocksdb::{Options, WriteBatch, DB};
use serde::Serialize;

use super::rocks::RocksStore;
use super::schema::{self, ChunkMeta, HostNum, QuarantineRecord};
use super::{ChunkStore, StoreError};

/// Bytes of records per write batch of the rebuild.
const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Default, Clone, Serialize)]
pub struct CfReport {
    pub name: String,
    /// Records read and found valid.
    pub readable: u64,
    /// Records read whose bytes are wrong (bad hash, do not decode).
    pub invalid: u64,
    /// Records other column families name that could not be read.
    pub unreadable: u64,
    /// The first read error (it names the damaged file).
    pub error: Option<String>,
}

impl CfReport {
    pub fn intact(&self) -> bool {
        self.invalid == 0 && self.unreadable == 0 && self.error.is_none()
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    pub db: String,
    pub cfs: Vec<CfReport>,
}

impl CheckReport {
    pub fn intact(&self) -> bool {
        self.cfs.iter().all(CfReport::intact)
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SalvageReport {
    pub read: CheckReport,
    pub snapshots: u64,
    /// Set index entries made for snapshots whose entry was lost.
    pub summaries_rebuilt: u64,
    /// Set index entries dropped: their snapshot was lost.
    pub summaries_dropped: u64,
    pub chunks: u64,
    /// Chunk metas made for chunks whose meta was lost.
    pub metas_rebuilt: u64,
    /// Chunk metas dropped: their chunk was lost.
    pub metas_dropped: u64,
    /// Possession records added so each snapshot's host can read it.
    pub possession_added: u64,
    /// Snapshots that reference chunks that were lost.
    pub snapshots_incomplete: u64,
    /// Where the damaged database now is.
    pub damaged_kept_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Refused(String),
}

fn read_only(db_dir: &Path) -> Result<DB, StoreError> {
    let mut opts = Options::default();
    // A file that fails its checks must not stop the open.
    opts.set_paranoid_checks(false);
    let names =
        DB::list_cf(&opts, db_dir).map_err(|e| StoreError::Open(db_dir.display().to_string(), e.into_string()))?;
    DB::open_cf_for_read_only(&opts, db_dir, names, false)
        .map_err(|e| StoreError::Open(db_dir.display().to_string(), e.into_string()))
}

/// Whether a record (key, value) of a column family decodes.
type Valid = dyn Fn(&[u8], &[u8]) -> bool;
/// Keys of one column family that were read.
type Seen = HashSet<Vec<u8>>;
/// Gets each valid record of one column family.
type CfSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;
/// Gets each valid record with its column family's name.
type RecordSink<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// Reads one column family as the module doc says, handing each valid
/// record to `out` (which returns false to stop everything).
fn read_cf(
    db: &DB,
    name: &str,
    extra_keys: &mut dyn Iterator<Item = Vec<u8>>,
    valid: &Valid,
    out: &mut CfSink<'_>,
) -> Result<(CfReport, Seen), StoreError> {
    let mut rep = CfReport { name: name.to_string(), ..Default::default() };
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let Some(cf) = db.cf_handle(name) else {
        rep.error = Some(format!("column family {name} is missing"));
        return Ok((rep, seen));
    };
    let mut take = |k: &[u8], v: &[u8], rep: &mut CfReport, seen: &mut HashSet<Vec<u8>>| {
        if !seen.insert(k.to_vec()) {
            return Ok(false);
        }
        if valid(k, v) {
            rep.readable += 1;
            out(k, v)?;
        } else {
            rep.invalid += 1;
        }
        Ok::<_, StoreError>(true)
    };
    let mut it = db.raw_iterator_cf(&cf);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        take(k, v, &mut rep, &mut seen)?;
        it.next();
    }
    if let Err(e) = it.status() {
        rep.error = Some(e.into_string());
        let mut back = db.raw_iterator_cf(&cf);
        back.seek_to_last();
        while let (Some(k), Some(v)) = (back.key(), back.value()) {
            if !take(k, v, &mut rep, &mut seen)? {
                break;
            }
            back.prev();
        }
    }
    for k in extra_keys {
        if seen.contains(&k) {
            continue;
        }
        match db.get_cf(&cf, &k) {
            Ok(Some(v)) => {
                take(&k, &v, &mut rep, &mut seen)?;
            }
            Ok(None) => {}
            Err(e) => {
                rep.unreadable += 1;
                rep.error.get_or_insert(e.into_string());
            }
        }
    }
    Ok((rep, seen))
}

fn valid_for(name: &str) -> Box<Valid> {
    match name {
        schema::CF_CHUNKS => Box::new(|k, v| ChunkId::from_slice(k).is_some_and(|id| blob::check(v, &id).is_ok())),
        schema::CF_CHUNK_META => Box::new(|k, v| k.len() == 32 && ChunkMeta::decode(v).is_some()),
        schema::CF_HOST_CHUNKS => Box::new(|k, _| schema::split_host_chunk_key(k).is_some()),
        schema::CF_HOSTS => Box::new(|k, v| std::str::from_utf8(k).is_ok() && HostNum::decode(v).is_some()),
        schema::CF_SNAPSHOTS => Box::new(|k, v| {
            SnapshotId::from_slice(k).is_some_and(|id| SnapshotId::of(v) == id && Snapshot::decode(v).is_ok())
        }),
        schema::CF_SETS => Box::new(|_, v| schema::decode_summary(v).is_ok()),
        schema::CF_QUARANTINE => Box::new(|k, v| k.len() == 32 && QuarantineRecord::decode(v).is_some()),
        schema::CF_DAMAGED => Box::new(|k, _| k.len() == 32),
        _ => Box::new(|_, _| true),
    }
}

/// Reads every column family of the damaged database in an order that
/// lets later ones use the keys earlier ones named; `out` gets each valid
/// record with its column family.
fn read_all(db: &DB, out: &mut RecordSink<'_>) -> Result<CheckReport, StoreError> {
    let mut report = CheckReport { db: db.path().display().to_string(), cfs: Vec::new() };
    let mut snapshot_ids: Vec<Vec<u8>> = Vec::new();
    let mut meta_keys: Vec<Vec<u8>> = Vec::new();
    let order = [
        schema::CF_META,
        schema::CF_HOSTS,
        schema::CF_SETS,
        schema::CF_SNAPSHOTS,
        schema::CF_CHUNK_META,
        schema::CF_CHUNKS,
        schema::CF_HOST_CHUNKS,
        schema::CF_JOBS,
        schema::CF_QUARANTINE,
        schema::CF_DAMAGED,
    ];
    for name in order {
        let mut extra: Box<dyn Iterator<Item = Vec<u8>>> = match name {
            schema::CF_SNAPSHOTS => Box::new(std::mem::take(&mut snapshot_ids).into_iter()),
            schema::CF_CHUNKS => Box::new(std::mem::take(&mut meta_keys).into_iter()),
            _ => Box::new(std::iter::empty()),
        };
        let valid = valid_for(name);
        let mut sink = |k: &[u8], v: &[u8]| {
            match name {
                schema::CF_SETS => {
                    if let Ok(s) = schema::decode_summary(v) {
                        snapshot_ids.push(s.id.as_bytes().to_vec());
                    }
                }
                schema::CF_CHUNK_META => meta_keys.push(k.to_vec()),
                _ => {}
            }
            out(name, k, v)
        };
        let (rep, _) = read_cf(db, name, &mut extra, &*valid, &mut sink)?;
        report.cfs.push(rep);
    }
    Ok(report)
}

/// What of the database under `db_dir` is readable, per column family.
pub fn check(db_dir: &Path) -> Result<CheckReport, StoreError> {
    let db = read_only(db_dir)?;
    read_all(&db, &mut |_, _, _| Ok(()))
}

/// Refuses while a process holds the database's lock (a running server).
fn ensure_unlocked(db_dir: &Path) -> Result<(), SalvageError> {
    let lock = db_dir.join("LOCK");
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(&lock) else { return Ok(()) };
    // RocksDB locks with fcntl(F_SETLK); so does this test of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: a valid descriptor and a flock struct that lives across the call.
    let r = unsafe { libc::fcntl(fd, libc::F_GETLK, &mut fl) };
    if r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short {
        return Err(SalvageError::Refused(format!(
            "{} is in use (process {} holds its lock): stop bkp-server first",
            db_dir.display(),
            fl.l_pid
        )));
    }
    Ok(())
}

/// Rebuilds the database under `db_dir` from what is readable; see the
/// module doc.
pub fn salvage(db_dir: &Path) -> Result<SalvageReport, SalvageError> {
    ensure_unlocked(db_dir)?;
    let new_dir = db_dir.with_extension("salvage");
    if new_dir.exists() {
        std::fs::remove_dir_all(&new_dir).map_err(|e| SalvageError::Io(new_dir.display().to_string(), e))?;
    }
    let damaged = read_only(db_dir)?;
    let store = RocksStore::open(&new_dir, 64 << 20)?;
    let mut report = SalvageReport::default();
    let mut batch = WriteBatch::default();
    let mut chunk_ids: HashSet<ChunkId> = HashSet::new();
    let mut metas: HashSet<ChunkId> = HashSet::new();
    let mut snapshots: Vec<(SnapshotId, Snapshot)> = Vec::new();
    let mut summaries: HashSet<SnapshotId> = HashSet::new();
    let mut summary_keys: Vec<(SnapshotId, Vec<u8>)> = Vec::new();
    // Protected snapshots, from either record of the flag (see
    // `schema::PROTECTED_PREFIX`): a summary rebuilt here keeps it.
    let mut protected: HashSet<SnapshotId> = HashSet::new();
    let db = store.raw_db();
    report.read = read_all(&damaged, &mut |name, k, v| {
        match name {
            // The schema version is the new store's own.
            schema::CF_META if k == schema::META_SCHEMA_VERSION => return Ok(()),
            schema::CF_META if k.starts_with(schema::PROTECTED_PREFIX) => {
                protected.extend(SnapshotId::from_slice(&k[schema::PROTECTED_PREFIX.len()..]));
            }
            schema::CF_SNAPSHOTS => {
                let id = SnapshotId::from_slice(k).expect("validated");
                snapshots.push((id, Snapshot::decode(v).expect("validated")));
            }
            schema::CF_SETS => {
                let s = schema::decode_summary(v).expect("validated");
                if s.protected {
                    protected.insert(s.id);
                }
                summaries.insert(s.id);
                summary_keys.push((s.id, k.to_vec()));
            }
            schema::CF_CHUNKS => {
                chunk_ids.insert(ChunkId::from_slice(k).expect("validated"));
            }
            schema::CF_CHUNK_META => {
                metas.insert(ChunkId::from_slice(k).expect("validated"));
            }
            _ => {}
        }
        batch.put_cf(store.cf(name), k, v);
        if batch.size_in_bytes() >= BATCH_BYTES {
            db.write(std::mem::take(&mut batch)).map_err(|e| StoreError::Db(e.into_string()))?;
        }
        Ok(())
    })?;
    drop(damaged);
    let w = |b: WriteBatch| db.write(b).map_err(|e| StoreError::Db(e.into_string()));
    w(batch)?;

    // Make the pieces agree.
    let kept: HashSet<SnapshotId> = snapshots.iter().map(|(id, _)| *id).collect();
    let mut fix = WriteBatch::default();
    for (id, key) in &summary_keys {
        if !kept.contains(id) {
            fix.delete_cf(store.cf(schema::CF_SETS), key);
            report.summaries_dropped += 1;
        }
    }
    for (id, snap) in &snapshots {
        if !summaries.contains(id) {
            let key = schema::set_key(&snap.host, &snap.name, snap.time_ns, id);
            let summary = SnapshotSummary { protected: protected.contains(id), ..snap.summary(*id) };
            fix.put_cf(store.cf(schema::CF_SETS), key, schema::encode_summary(&summary));
            report.summaries_rebuilt += 1;
        }
        if protected.contains(id) {
            fix.put_cf(store.cf(schema::CF_META), schema::protected_key(id), b"");
        }
    }
    for id in &metas {
        if !chunk_ids.contains(id) {
            fix.delete_cf(store.cf(schema::CF_CHUNK_META), id.as_bytes());
            report.metas_dropped += 1;
        }
    }
    w(fix)?;
    let mut fix = WriteBatch::default();
    for id in &chunk_ids {
        if !metas.contains(id) {
            let b = store.chunk_blob(id)?.unwrap_or_default();
            let raw_len = blob::check(&b, id).map_or(0, |c| c.raw_len);
            let meta = ChunkMeta { raw_len, stored_len: b.len() as u32, owner: None };
            fix.put_cf(store.cf(schema::CF_CHUNK_META), id.as_bytes(), meta.encode());
            report.metas_rebuilt += 1;
        }
    }
    w(fix)?;
    report.chunks = chunk_ids.len() as u64;
    report.snapshots = snapshots.len() as u64;
    // The hosts must be known to the store before possession is asked.
    drop(store);
    let store = RocksStore::open(&new_dir, 64 << 20)?;
    for (_, snap) in &snapshots {
        let mut refs: Vec<ChunkId> = Vec::new();
        let walked = crate::commit::walk_tree(&store, &snap.tree, &mut |ids| {
            refs.extend_from_slice(ids);
            Ok(())
        });
        refs.sort_unstable();
        refs.dedup();
        let stored = store.recorded_sorted(&refs)?;
        let holds = store.host_holds(&snap.host, &refs)?;
        if walked.is_err() || stored.iter().any(|s| !s) {
            report.snapshots_incomplete += 1;
        }
        let mut fix = WriteBatch::default();
        for ((id, s), h) in refs.iter().zip(&stored).zip(&holds) {
            if *s && !*h {
                fix.put_cf(store.cf(schema::CF_HOST_CHUNKS), schema::host_chunk_key(&snap.host, id), []);
                report.possession_added += 1;
            }
        }
        store.raw_db().write(fix).map_err(|e| StoreError::Db(e.into_string()))?;
    }
    store.raw_db().flush_wal(true).map_err(|e| StoreError::Db(e.into_string()))?;
    drop(store);

    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let aside: PathBuf = db_dir.with_extension(format!("damaged-{secs}"));
    std::fs::rename(db_dir, &aside).map_err(|e| SalvageError::Io(db_dir.display().to_string(), e))?;
    // The damaged copy needs no reserve of its own.
    let _ = std::fs::remove_file(aside.join(super::space::RESERVE_FILE));
    std::fs::rename(&new_dir, db_dir).map_err(|e| SalvageError::Io(new_dir.display().to_string(), e))?;
    report.damaged_kept_at = aside.display().to_string();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};

    fn snapshot(name: &str) -> Snapshot {
        Snapshot {
            host: "web01".into(),
            name: name.into(),
            time_ns: 1_000,
            kind: SnapshotKind::Stream,
            stats: SnapshotStats::default(),
            tree: vec![ChunkId::of(name.as_bytes())],
            client: "test".into(),
        }
    }

    #[test]
    fn a_rebuilt_summary_keeps_the_protected_flag() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        {
            let store = RocksStore::open(&db_dir, 8 << 20).unwrap();
            let kept = store.commit_snapshot(&snapshot("kept"), None).unwrap();
            let loose = store.commit_snapshot(&snapshot("loose"), None).unwrap();
            assert!(store.set_protected(&kept.id, true).unwrap());
            // Both summaries lost (as with a damaged `sets` file): only the
            // snapshot records and the `protected/` record remain.
            for s in [&kept, &loose] {
                let key = schema::set_key(&s.host, &s.name, s.time_ns, &s.id);
                store.raw_db().delete_cf(store.cf(schema::CF_SETS), key).unwrap();
            }
            assert!(store.list_snapshots(None, None).unwrap().is_empty());
        }
        let report = salvage(&db_dir).unwrap();
        assert_eq!(report.summaries_rebuilt, 2);
        let store = RocksStore::open(&db_dir, 8 << 20).unwrap();
        let flags: Vec<(String, bool)> =
            store.list_snapshots(None, None).unwrap().into_iter().map(|s| (s.name, s.protected)).collect();
        assert!(flags.contains(&("kept".into(), true)) && flags.contains(&("loose".into(), false)), "{flags:?}");
        // Still refused by forget and prune.
        let kept = store.list_snapshots(None, Some("kept")).unwrap().pop().unwrap();
        assert!(matches!(store.delete_snapshot(&kept.id), Err(StoreError::Protected(_))));
        // And lifting the protection lifts both records.
        assert!(store.set_protected(&kept.id, false).unwrap());
        assert!(store.delete_snapshot(&kept.id).unwrap());
    }

    #[test]
    fn a_store_protected_before_the_second_record_gets_it_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        let id = {
            let store = RocksStore::open(&db_dir, 8 << 20).unwrap();
            let s = store.commit_snapshot(&snapshot("old"), None).unwrap();
            store.set_protected(&s.id, true).unwrap();
            // As an older build left it: the flag only in the summary.
            let meta = store.cf(schema::CF_META);
            store.raw_db().delete_cf(meta, schema::protected_key(&s.id)).unwrap();
            store.raw_db().delete_cf(meta, schema::META_PROTECTED_INDEX).unwrap();
            s.id
        };
        {
            let store = RocksStore::open(&db_dir, 8 << 20).unwrap();
            let meta = store.cf(schema::CF_META);
            assert!(store.raw_db().get_cf(meta, schema::protected_key(&id)).unwrap().is_some());
            let s = store.list_snapshots(None, None).unwrap().pop().unwrap();
            let key = schema::set_key(&s.host, &s.name, s.time_ns, &s.id);
            store.raw_db().delete_cf(store.cf(schema::CF_SETS), key).unwrap();
        }
        salvage(&db_dir).unwrap();
        let store = RocksStore::open(&db_dir, 8 << 20).unwrap();
        assert!(store.list_snapshots(None, None).unwrap()[0].protected);
    }
}
