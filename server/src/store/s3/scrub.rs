//! The scrub on the bucket ([`ChunkStore::scrub_container`](crate::store::ChunkStore::scrub_container)):
//! pack by pack, each read whole with one GET (sequential, not a ranged
//! GET per chunk, and never from the local cache, which would prove
//! nothing about the bucket), every chunk still located there checked by
//! the caller (decoded, re-hashed).
//!
//! * A bad chunk is quarantined by the caller, which drops its location:
//!   the next push of the same data uploads it again into a new pack.
//! * A pack holding a bad chunk, or whose index does not check, is copied
//!   aside to `quarantine/<pack>` (create-only) for inspection; GC never
//!   touches that prefix.
//! * A pack missing from the bucket: every chunk located in it (one pass
//!   over `chunk_loc`, only then) is reported missing, and the caller
//!   finds every snapshot that references one.
//!
//! Packs are walked in the order of their names (blake3 hashes, spread
//! evenly like chunk ids), so the scrub's slices and its resumable cursor
//! work on them as they do on chunks.

use bkp_common::ChunkId;

use super::{pack_object, Location, S3Chunks};
use crate::store::object::ObjectError;
use crate::store::pack::{self, PackId};
use crate::store::{schema, Container, ContainerCheck, ContainerScrub, StoreError};

/// Where a damaged pack is copied.
pub fn quarantine_object(id: &PackId) -> String {
    format!("quarantine/{}", id.to_hex())
}

impl S3Chunks {
    /// The uploaded packs, sorted by name.
    pub(super) fn scrub_list(&self) -> Vec<Container> {
        let mut out: Vec<Container> = self
            .up
            .packs
            .read()
            .expect("packs lock")
            .iter()
            .map(|(num, r)| Container { id: r.id.0, num: *num, bytes: r.len })
            .collect();
        out.sort_unstable_by_key(|c| c.id);
        out
    }

    /// Every chunk located in pack `num` (a pass over `chunk_loc`).
    fn located_in(&self, num: u64) -> Result<Vec<(ChunkId, Location)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf(self.db.cf(schema::CF_CHUNK_LOC), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StoreError::Db(e.into_string()))?;
            let id = ChunkId::from_slice(&k).ok_or_else(|| StoreError::Corrupt("chunk_loc key".into()))?;
            let loc =
                Location::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("chunk_loc of {}", id.short())))?;
            if loc.pack == num {
                out.push((id, loc));
            }
        }
        Ok(out)
    }

    pub(super) fn scrub_pack(
        &self,
        c: &Container,
        check: &mut ContainerCheck<'_>,
    ) -> Result<ContainerScrub, StoreError> {
        let id = PackId(c.id);
        let name = pack_object(&id);
        let o = self.objects.clone();
        let n = name.clone();
        let mut out = ContainerScrub::default();
        let bytes = match super::run_on(self.rt(), async move { o.get(&n).await }) {
            Ok(b) => b,
            Err(ObjectError::NotFound(_)) => {
                tracing::error!(pack = %name, "pack missing from the bucket: every chunk in it is reported");
                out.missing = true;
                for (cid, _) in self.located_in(c.num)? {
                    out.chunks += 1;
                    if check(&cid, None)?.is_some() {
                        out.bad += 1;
                    }
                }
                return Ok(out);
            }
            Err(e) => return Err(self.bucket_err(e)),
        };
        // The chunks located here: from the pack's index (checked against
        // the blob headers), looked up in `chunk_loc`; a pack whose index
        // does not check is damaged, and its chunks come from `chunk_loc`.
        let whole = PackId::of(&bytes) == id;
        let live: Vec<(ChunkId, Location)> = match pack::parse(&bytes) {
            Ok((_, entries)) if whole => {
                let ids: Vec<ChunkId> = entries.iter().map(|e| e.id).collect();
                self.locations(&ids)?
                    .into_iter()
                    .zip(&entries)
                    .filter_map(|(loc, e)| {
                        loc.filter(|l| l.pack == c.num && l.offset == e.offset && l.len == e.len).map(|l| (e.id, l))
                    })
                    .collect()
            }
            parsed => {
                tracing::error!(pack = %name, whole, index = ?parsed.err(), "pack damaged (its bytes do not hash to its name)");
                self.located_in(c.num)?
            }
        };
        for (cid, loc) in &live {
            let blob = bytes.get(loc.offset as usize..loc.offset as usize + loc.len as usize);
            out.chunks += 1;
            out.bytes += loc.len as u64;
            // A range past the pack's end is a blob that is not there.
            if check(cid, Some(blob.unwrap_or_default()))?.is_some() {
                out.bad += 1;
            }
        }
        if out.bad > 0 || !whole {
            let o = self.objects.clone();
            let aside = quarantine_object(&id);
            let a = aside.clone();
            super::run_on(self.rt(), async move { o.put_new(&a, bytes).await }).map_err(|e| self.bucket_err(e))?;
            tracing::warn!(pack = %name, copy = %aside, bad = out.bad, "damaged pack copied aside");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bkp_common::ChunkId;
    use object_store::{ObjectStoreExt, PutPayload};

    use super::super::tests::{chunk, open, quick};
    use crate::store::object::faulty::Faulty;
    use crate::store::object::Objects;
    use crate::store::rocks::RocksStore;
    use crate::store::{pack, ChunkStore, Store, StoreError, VerifiedChunk};
    use crate::verify::scrub;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// The pack holding `id`, and its bytes.
    fn pack_of(f: &Arc<Faulty>, id: &ChunkId) -> (String, Vec<u8>) {
        let o = Objects::new(f.clone(), "srv", quick());
        let rt = rt();
        for (name, _) in rt.block_on(o.list("packs")).unwrap() {
            let bytes = rt.block_on(o.get(&name)).unwrap().to_vec();
            if pack::parse(&bytes).unwrap().1.iter().any(|e| e.id == *id) {
                return (name, bytes);
            }
        }
        panic!("no pack holds {}", id.short())
    }

    fn scrub_all(s: &RocksStore, slices: u32, full: bool) -> (scrub::ScrubReport, Vec<(ChunkId, String)>) {
        let mut bad = Vec::new();
        let r = scrub::run(s, slices, full, None, 5, &mut |id, why| {
            bad.push((id, why));
            Ok::<(), StoreError>(())
        })
        .unwrap();
        (r, bad)
    }

    /// Three packs; one has a flipped byte in a blob, one is deleted from
    /// the bucket. The scrub reads each pack with one GET (not the cache),
    /// reports exactly the bad chunk and every chunk of the missing pack,
    /// copies the damaged pack aside; once quarantined (locations
    /// dropped) those chunks are missing, the next put stores them again,
    /// and a scrub then finds nothing.
    #[test]
    fn the_scrub_reads_whole_packs_and_finds_damage_and_loss() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let groups: Vec<Vec<VerifiedChunk>> =
            (0..3).map(|g| (0..5).map(|i| chunk(3000 + g * 10 + i, 210 << 10)).collect()).collect();
        {
            let s = open(dir.path(), &f).unwrap();
            for g in &groups {
                s.put_chunks("h", g).unwrap();
                crate::store::ChunkStore::persist(&s).unwrap();
            }
        }
        let victim = groups[1][2].id();
        let (damaged, mut bytes) = pack_of(&f, victim);
        let entry = pack::parse(&bytes).unwrap().1.into_iter().find(|e| e.id == *victim).unwrap();
        bytes[entry.offset as usize + 100] ^= 0x40;
        let (lost, _) = pack_of(&f, groups[2][0].id());
        let rt = rt();
        let path = |n: &str| object_store::path::Path::from(format!("srv/{n}"));
        rt.block_on(f.put(&path(&damaged), PutPayload::from(bytes.clone()))).unwrap();
        rt.block_on(f.delete(&path(&lost))).unwrap();

        let s = open(dir.path(), &f).unwrap();
        // Cached copies prove nothing about the bucket: one is read first.
        s.chunk_blob(groups[0][0].id()).unwrap();
        let gets = f.gets();
        let (r, bad) = scrub_all(&s, 7, true);
        assert_eq!(f.gets() - gets, 3, "one GET per pack, the cached chunk's pack included");
        assert_eq!((r.packs_checked, r.packs_missing, r.chunks_checked), (3, 1, 15), "{r:?}");
        assert!(r.cycle_completed);
        let mut want: Vec<ChunkId> = groups[2].iter().map(|c| *c.id()).chain([*victim]).collect();
        want.sort();
        let mut got: Vec<ChunkId> = bad.iter().map(|(id, _)| *id).collect();
        got.sort();
        assert_eq!(got, want, "{bad:?}");
        assert!(bad.iter().filter(|(id, _)| id != victim).all(|(_, why)| why.contains("pack is missing")), "{bad:?}");
        let o = Objects::new(f.clone(), "srv", quick());
        let name = damaged.strip_prefix("packs/").unwrap();
        let aside = rt.block_on(o.get(&format!("quarantine/{name}"))).unwrap();
        assert!(aside[..] == bytes[..], "the damaged pack is copied aside as it was");
        assert_eq!(rt.block_on(o.list("quarantine")).unwrap().len(), 1, "only the damaged pack");

        for id in &got {
            s.quarantine_chunk(id, "scrub", 5).unwrap();
        }
        assert_eq!(s.host_has("h", &got).unwrap(), vec![false; got.len()], "the locations are dropped");
        let again: Vec<VerifiedChunk> = groups[2].iter().chain([&groups[1][2]]).map(chunk_again).collect();
        s.put_chunks("h", &again).unwrap();
        crate::store::ChunkStore::persist(&s).unwrap();
        assert!(
            s.chunk_blob(victim).unwrap().as_deref() == Some(groups[1][2].blob()),
            "read from its new place, not from what was cached of the old one"
        );
        let (r, bad) = scrub_all(&s, 7, true);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(r.chunks_checked, 15, "{r:?}");
    }

    fn chunk_again(c: &VerifiedChunk) -> VerifiedChunk {
        VerifiedChunk::verify(*c.id(), c.blob().to_vec()).unwrap()
    }

    /// Scheduled runs in slices cover every pack exactly once per cycle,
    /// and a run stopped by its deadline goes on where it stopped.
    #[test]
    fn the_pack_scrub_goes_on_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let s = open(dir.path(), &f).unwrap();
        for g in 0..12u64 {
            s.put_chunks("h", &[chunk(4000 + g, 50 << 10)]).unwrap();
            crate::store::ChunkStore::persist(&s).unwrap();
        }
        let store: &dyn Store = &s;
        let mut packs = 0;
        let mut runs = 0;
        loop {
            runs += 1;
            let r = scrub::run(store, 4, false, None, runs, &mut |_, _| Ok(())).unwrap();
            packs += r.packs_checked;
            if r.cycle_completed {
                break;
            }
            assert!(runs < 10);
        }
        assert_eq!(packs, 12, "every pack once in the cycle ({runs} runs)");
        assert!((2..=5).contains(&runs), "{runs} runs for 4 slices");
        // A deadline already past: one pack per run, each run going on.
        let mut packs = 0;
        for i in 0..12 {
            let r = scrub::run(store, 1, false, Some(std::time::Instant::now()), 100 + i, &mut |_, _| Ok(())).unwrap();
            assert_eq!(r.packs_checked, 1, "run {i}: {r:?}");
            packs += r.packs_checked;
            assert_eq!(r.cycle_completed, i == 11, "run {i}: {r:?}");
        }
        assert_eq!(packs, 12);
    }
}
