//! `bkp-server rebuild`: a new data directory from the bucket alone.
//!
//! 1. Every pack's index (a ranged GET of its trailer, then of its index,
//!    and one of its header for its kind) gives `packs` rows and each
//!    chunk's location; a chunk found in several packs (a tree's dead copy
//!    in a data pack, a repack's source still waiting for deletion) keeps
//!    the tree pack's place, else the first found.
//! 2. Every `snapshots/` record object (checked against the id in its
//!    name) is committed again, oldest first, after its tree was walked:
//!    each chunk it references gets its `chunk_meta` (sizes from the tree
//!    entry and the location) and its host's possession, as if that host
//!    had uploaded it.
//! 3. Locations of chunks no snapshot references are dropped, so GC
//!    reclaims their bytes.
//!
//! Not carried: tokens (create them again; clients keep their config but
//! need the new token), the TLS key (a new one, so clients need the new
//! fingerprint), protected flags, job history, alerts state.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use bkp_common::blob;
use bkp_common::snapshot::Snapshot;
use bkp_common::tree::Entry;
use bkp_common::{ChunkId, SnapshotId};
use serde::Serialize;

use super::records;
use super::{pack_object, run_on, Location, PackRecord, S3Chunks};
use crate::store::object::config::StorageConfig;
use crate::store::pack::{self, Kind, PackId};
use crate::store::rocks::{Batch, RocksStore};
use crate::store::{schema, ChunkStore, StoreError};
use crate::tree_read::TreeEntries;

#[derive(Debug, Default, Serialize)]
pub struct RebuildReport {
    pub packs: u64,
    /// Pack objects whose index could not be read (named in the log).
    pub packs_unreadable: u64,
    pub chunks_located: u64,
    pub snapshots: u64,
    /// Record objects that did not decode or check (named in the log).
    pub records_bad: u64,
    /// Snapshots referencing chunks found in no pack: `verify` reports them.
    pub snapshots_incomplete: u64,
    pub hosts: u64,
    pub chunks_unreferenced: u64,
}

/// Rebuilds the database in `db_dir` (which must hold no snapshot and no
/// chunk) from the bucket `storage` names.
pub fn rebuild(
    db_dir: &Path,
    cache_bytes: usize,
    storage: &StorageConfig,
    data_dir: &Path,
    take_over: bool,
) -> Result<RebuildReport, StoreError> {
    use crate::store::object::lease::{TakeOver, TAKE_OVER_SILENCE};
    let take_over = if take_over { TakeOver::IfSilent(TAKE_OVER_SILENCE) } else { TakeOver::Never };
    let mut s3: Option<Arc<S3Chunks>> = None;
    let store = RocksStore::open_with(db_dir, cache_bytes, |db| {
        let s = Arc::new(S3Chunks::open_taking_over(db, storage, data_dir, take_over)?);
        s3 = Some(s.clone());
        Ok(s as Arc<dyn ChunkStore>)
    })?;
    let s3 = s3.expect("opened above");
    if !store.chunk_metas(None, 1)?.is_empty() || !store.list_snapshots(None, None)?.is_empty() {
        return Err(StoreError::Open(
            data_dir.display().to_string(),
            "rebuild needs a new data directory: this one already holds chunks or snapshots".into(),
        ));
    }
    store.mark_storage_backend(b"s3")?;
    let mut report = RebuildReport::default();
    let located = s3.rebuild_locations(&mut report)?;

    let o = s3.objects.clone();
    let listed = run_on(s3.rt(), async move { o.list("snapshots").await }).map_err(|e| s3.bucket_err(e))?;
    let mut snaps: Vec<(SnapshotId, Snapshot)> = Vec::new();
    for (name, size) in listed {
        let Some(id) = records::parse_name(&name) else { continue };
        if size as usize > records::HEADER_LEN + records::MAX_RECORD_OBJECT {
            tracing::error!(object = %name, size, "snapshot record object too large: skipped");
            report.records_bad += 1;
            continue;
        }
        let o = s3.objects.clone();
        let n = name.clone();
        let bytes = run_on(s3.rt(), async move { o.get(&n).await }).map_err(|e| s3.bucket_err(e))?;
        match records::decode(&bytes, &id)
            .map_err(|e| e.to_string())
            .and_then(|r| Snapshot::decode(r).map_err(|e| e.to_string()))
        {
            Ok(s) => snaps.push((id, s)),
            Err(e) => {
                tracing::error!(object = %name, "snapshot record object skipped: {e}");
                report.records_bad += 1;
            }
        }
    }
    snaps.sort_by_key(|(_, s)| s.time_ns);

    let mut referenced: HashSet<ChunkId> = HashSet::new();
    let mut hosts: HashSet<String> = HashSet::new();
    for (id, snap) in &snaps {
        let mut held: Vec<(ChunkId, u32, u32)> = Vec::new();
        let mut complete = true;
        for t in &snap.tree {
            match (located.get(t), s3.chunk_blob(t)?) {
                (Some(loc), Some(b)) => {
                    let raw = blob::header(&b).map(|h| h.raw_len).unwrap_or(0);
                    held.push((*t, raw, loc.len));
                }
                _ => complete = false,
            }
        }
        if complete {
            for e in TreeEntries::new(&*s3, &snap.tree) {
                match e {
                    Ok(Entry::Chunks(refs)) => {
                        for r in refs {
                            match located.get(&r.id) {
                                Some(loc) => held.push((r.id, r.len, loc.len)),
                                None => complete = false,
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(snapshot = %id.short(), "tree not readable: {e}");
                        complete = false;
                        break;
                    }
                }
            }
        }
        if !complete {
            report.snapshots_incomplete += 1;
        }
        referenced.extend(held.iter().map(|h| h.0));
        for part in held.chunks(4096) {
            store.record_held(&snap.host, part)?;
        }
        let summary = store.commit_snapshot(snap, None)?;
        if summary.id != *id {
            tracing::warn!(snapshot = %id.short(), now = %summary.id.short(), "snapshot record re-encoded under a new id");
        }
        hosts.insert(snap.host.clone());
        report.snapshots += 1;
    }
    report.hosts = hosts.len() as u64;

    let unreferenced: Vec<ChunkId> = located.keys().filter(|c| !referenced.contains(c)).copied().collect();
    report.chunks_unreferenced = unreferenced.len() as u64;
    for part in unreferenced.chunks(4096) {
        let mut b = Batch::new(&s3.db);
        for c in part {
            b.delete(schema::CF_CHUNK_LOC, c.as_bytes());
        }
        s3.db.write_synced(b)?;
    }
    Ok(report)
}

impl S3Chunks {
    /// Step 1: `packs` rows and `chunk_loc` from every pack's index.
    fn rebuild_locations(&self, report: &mut RebuildReport) -> Result<HashMap<ChunkId, Location>, StoreError> {
        let o = self.objects.clone();
        let listed = run_on(self.rt(), async move { o.list("packs").await }).map_err(|e| self.bucket_err(e))?;
        let mut located: HashMap<ChunkId, (Location, Kind)> = HashMap::new();
        for (name, len) in listed {
            let Some(id) = name.strip_prefix("packs/").and_then(PackId::parse) else { continue };
            let read = |r: std::ops::Range<u64>| {
                let (o, n) = (self.objects.clone(), pack_object(&id));
                run_on(self.rt(), async move { o.get_range(&n, r).await })
            };
            let index = (|| -> Result<(Kind, Vec<pack::Entry>), String> {
                let head = read(0..pack::HEADER_LEN as u64).map_err(|e| e.to_string())?;
                let kind = pack::read_header(&head).map_err(|e| e.to_string())?;
                if len < (pack::HEADER_LEN + pack::TRAILER_LEN) as u64 {
                    return Err(format!("{len} bytes"));
                }
                let trailer = read(len - pack::TRAILER_LEN as u64..len).map_err(|e| e.to_string())?;
                let (range, sum) = pack::read_trailer(&trailer, len).map_err(|e| e.to_string())?;
                let index = read(range.clone()).map_err(|e| e.to_string())?;
                Ok((kind, pack::parse_index(&index, range, &sum).map_err(|e| e.to_string())?))
            })();
            let (kind, entries) = match index {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(pack = %name, "pack index not readable, pack skipped: {e}");
                    report.packs_unreadable += 1;
                    continue;
                }
            };
            let num = self.next_pack_num()?;
            let rec = PackRecord { id, kind, len };
            let mut b = Batch::new(&self.db);
            b.put(schema::CF_PACKS, schema::pack_key(num), rec.encode());
            self.db.write_synced(b)?;
            self.up.packs.write().expect("packs lock").insert(num, rec);
            report.packs += 1;
            for e in entries {
                let loc = Location { pack: num, offset: e.offset, len: e.len };
                let keep = located.get(&e.id).is_none_or(|(_, k)| *k != Kind::Tree && kind == Kind::Tree);
                if keep {
                    located.insert(e.id, (loc, kind));
                }
            }
        }
        let located: HashMap<ChunkId, Location> = located.into_iter().map(|(c, (l, _))| (c, l)).collect();
        let rows: Vec<(&ChunkId, &Location)> = located.iter().collect();
        for part in rows.chunks(4096) {
            let mut b = Batch::new(&self.db);
            for (c, l) in part {
                b.put(schema::CF_CHUNK_LOC, c.as_bytes(), l.encode());
            }
            self.db.write_synced(b)?;
        }
        report.chunks_located = located.len() as u64;
        Ok(located)
    }
}
