//! GC of packs ([`ChunkStore::gc_packs`](crate::store::ChunkStore::gc_packs)),
//! run by `crate::gc` after its chunk sweep, so its cost follows the
//! garbage: only packs that lost chunks are touched.
//!
//! 1. Under the GC fence (no put batch, commit or quarantine in flight)
//!    it notes the packs uploaded so far: the candidates. Only an open
//!    pack gets new locations (a put, a tree switch, a repack all write
//!    into a pack not yet uploaded), so from then on the live chunks of a
//!    candidate can only go.
//! 2. One pass over `chunk_loc` counts each pack's live bytes (metadata
//!    only, no data read).
//! 3. Packs retired by the previous run are deleted (their chunks moved
//!    then; a restore that read an old location before the move had a
//!    whole GC interval to finish), and so are candidates with no live
//!    chunk left: their `packs` rows go first, then the objects.
//! 4. Objects under `packs/` that no row names and no upload in flight
//!    holds (a crash between a PUT and its row): deleted.
//! 5. Candidates whose live bytes are below `repack_live_percent` of the
//!    pack: their live blobs are copied into new packs (create-only PUT,
//!    recorded), then, under the fence, the locations of the chunks still
//!    where they were are switched in one synced batch, which also marks
//!    the old packs retired (`packs_retired`). Retired packs stay readable
//!    until the next run deletes them: no wall clock involved.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use bkp_common::ChunkId;

use super::fetch::{MERGE_GAP, READS_IN_FLIGHT};
use super::upload::{Sealed, Up};
use super::{pack_object, Location, PackRecord, S3Chunks};
use crate::store::pack::{Kind, PackWriter, SealedPack};
use crate::store::rocks::Batch;
use crate::store::{schema, Fence, PackGcStats, StoreError};

fn db_err(e: rocksdb::Error) -> StoreError {
    StoreError::Db(e.into_string())
}

impl S3Chunks {
    fn retired(&self) -> Result<HashSet<u64>, StoreError> {
        let mut out = HashSet::new();
        for item in self.db.raw().iterator_cf(self.db.cf(schema::CF_PACKS_RETIRED), rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(db_err)?;
            out.insert(schema::pack_num(&k).ok_or_else(|| StoreError::Corrupt("packs_retired key".into()))?);
        }
        Ok(out)
    }

    /// Live (bytes, chunks) per pack, and, for the packs of `want`, their
    /// live chunks.
    #[allow(clippy::type_complexity)]
    fn liveness(
        &self,
        want: &HashSet<u64>,
    ) -> Result<(HashMap<u64, (u64, u64)>, HashMap<u64, Vec<(ChunkId, Location)>>), StoreError> {
        let mut live: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut chunks: HashMap<u64, Vec<(ChunkId, Location)>> = HashMap::new();
        for item in self.db.raw().iterator_cf(self.db.cf(schema::CF_CHUNK_LOC), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let id = ChunkId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("chunk_loc key".into()))?;
            let loc =
                Location::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("chunk_loc of {}", id.short())))?;
            let e = live.entry(loc.pack).or_default();
            e.0 += loc.len as u64;
            e.1 += 1;
            if want.contains(&loc.pack) {
                chunks.entry(loc.pack).or_default().push((id, loc));
            }
        }
        Ok((live, chunks))
    }

    /// Drops the rows of these packs, then their objects.
    fn delete_packs(&self, nums: &[u64]) -> Result<u64, StoreError> {
        if nums.is_empty() {
            return Ok(0);
        }
        let names: Vec<String> = {
            let packs = self.up.packs.read().expect("packs lock");
            nums.iter().filter_map(|n| packs.get(n)).map(|r| pack_object(&r.id)).collect()
        };
        let mut b = Batch::new(&self.db);
        for n in nums {
            b.delete(schema::CF_PACKS, schema::pack_key(*n));
            b.delete(schema::CF_PACKS_RETIRED, schema::pack_key(*n));
        }
        self.db.write_synced(b)?;
        {
            let mut packs = self.up.packs.write().expect("packs lock");
            for n in nums {
                packs.remove(n);
            }
        }
        let o = self.objects.clone();
        let count = names.len() as u64;
        super::run_on(self.rt(), async move { o.delete(&names).await }).map_err(|e| self.bucket_err(e))?;
        Ok(count)
    }

    /// Pack objects no row names and no upload holds.
    fn delete_orphans(&self) -> Result<u64, StoreError> {
        let o = self.objects.clone();
        let listed = super::run_on(self.rt(), async move { o.list("packs").await }).map_err(|e| self.bucket_err(e))?;
        let orphans: Vec<String> = {
            let st = self.up.lock();
            let packs = self.up.packs.read().expect("packs lock");
            let known: HashSet<String> = packs
                .values()
                .map(|r| r.id)
                .chain(st.sealed.iter().map(|(_, s)| s.id))
                .map(|id| pack_object(&id))
                .collect();
            listed.into_iter().map(|(n, _)| n).filter(|n| !known.contains(n)).collect()
        };
        if orphans.is_empty() {
            return Ok(0);
        }
        tracing::info!(count = orphans.len(), "deleting pack objects no metadata names (left by a crash)");
        let o = self.objects.clone();
        let count = orphans.len() as u64;
        super::run_on(self.rt(), async move { o.delete(&orphans).await }).map_err(|e| self.bucket_err(e))?;
        Ok(count)
    }

    /// Reads the live blobs of one old pack.
    fn read_live(&self, rec: &PackRecord, live: &[(ChunkId, Location)]) -> Result<Vec<bytes::Bytes>, StoreError> {
        let ranges: Vec<Range<u64>> = live.iter().map(|(_, l)| l.offset..l.offset + l.len as u64).collect();
        let (o, name) = (self.objects.clone(), pack_object(&rec.id));
        super::run_on(self.rt(), async move { o.get_ranges(&name, &ranges, MERGE_GAP, READS_IN_FLIGHT).await })
            .map_err(|e| self.bucket_err(e))
    }

    /// Uploads `w` and, under the fence, moves the chunks it holds there
    /// (those still at their old place) and retires `old`.
    fn finish_repack(
        &self,
        w: PackWriter,
        moved: &[(ChunkId, Location)],
        old: &[u64],
        fence: &Fence<'_>,
    ) -> Result<(), StoreError> {
        let num = self.next_pack_num()?;
        let SealedPack { id, kind, bytes, entries } = w.finish();
        {
            let mut st = self.up.lock();
            st.sealed.push((num, Sealed { id, kind, bytes: bytes.into(), up: Up::Queued }));
            self.up.kick(&mut st);
        }
        self.up.wait_stored(&[num])?;
        let mut switch = || {
            let ids: Vec<ChunkId> = moved.iter().map(|(c, _)| *c).collect();
            let now = self.locations(&ids)?;
            let mut b = Batch::new(&self.db);
            for (((cid, was), e), cur) in moved.iter().zip(&entries).zip(now) {
                // Deleted or quarantined meanwhile: left as it is.
                if cur.as_ref() == Some(was) {
                    b.put(
                        schema::CF_CHUNK_LOC,
                        cid.as_bytes(),
                        Location { pack: num, offset: e.offset, len: e.len }.encode(),
                    );
                }
            }
            for n in old {
                b.put(schema::CF_PACKS_RETIRED, schema::pack_key(*n), []);
            }
            self.db.write_synced(b)
        };
        fence(&mut switch)
    }

    pub(super) fn pack_gc(&self, fence: &Fence<'_>) -> Result<PackGcStats, StoreError> {
        let mut stats = PackGcStats { objects_deleted: self.delete_stale_records(fence)?, ..Default::default() };
        let mut candidates = HashSet::new();
        let mut retired = HashSet::new();
        fence(&mut || {
            candidates = self.up.packs.read().expect("packs lock").keys().copied().collect();
            retired = self.retired()?;
            Ok(())
        })?;
        let packs: HashMap<u64, PackRecord> = self.up.packs.read().expect("packs lock").clone();
        let (live, _) = self.liveness(&HashSet::new())?;
        let live_of = |n: &u64| live.get(n).copied().unwrap_or_default();

        let mut gone: Vec<u64> = Vec::new();
        for n in &retired {
            if live_of(n).1 == 0 {
                gone.push(*n);
            } else {
                tracing::warn!(pack = n, "a retired pack still holds live chunks: kept");
            }
        }
        let dead: Vec<u64> = candidates.iter().copied().filter(|n| !retired.contains(n) && live_of(n).1 == 0).collect();
        stats.bytes_deleted = gone.iter().chain(&dead).filter_map(|n| packs.get(n)).map(|r| r.len).sum();
        gone.extend(&dead);
        stats.objects_deleted += self.delete_packs(&gone)?;
        stats.objects_deleted += self.delete_orphans()?;

        let pct = self.repack_live_percent as u64;
        let mut sparse: Vec<u64> = candidates
            .iter()
            .copied()
            .filter(|n| !retired.contains(n))
            .filter(|n| {
                let (bytes, count) = live_of(n);
                count > 0 && packs.get(n).is_some_and(|r| bytes * 100 < r.len * pct)
            })
            .collect();
        sparse.sort_unstable();
        if sparse.is_empty() {
            return Ok(stats);
        }
        let want: HashSet<u64> = sparse.iter().copied().collect();
        let (_, chunks) = self.liveness(&want)?;
        for kind in [Kind::Data, Kind::Tree] {
            let mut w = PackWriter::new(kind);
            let (mut moved, mut old) = (Vec::new(), Vec::new());
            for n in sparse.iter().filter(|n| packs.get(*n).is_some_and(|r| r.kind == kind)) {
                let Some(list) = chunks.get(n) else { continue };
                let blobs = self.read_live(&packs[n], list)?;
                for ((cid, loc), blob) in list.iter().zip(&blobs) {
                    w.add(cid, blob);
                    moved.push((*cid, *loc));
                    stats.bytes_rewritten += blob.len() as u64;
                }
                old.push(*n);
                stats.packs_repacked += 1;
                if w.len() >= self.pack_size {
                    let full = std::mem::replace(&mut w, PackWriter::new(kind));
                    self.finish_repack(full, &moved, &old, fence)?;
                    moved.clear();
                    old.clear();
                }
            }
            if !w.is_empty() {
                self.finish_repack(w, &moved, &old, fence)?;
            }
        }
        tracing::info!(?stats, "pack gc");
        Ok(stats)
    }
}
