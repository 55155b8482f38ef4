//! Tree chunks apart from data. A chunk's blob does not say whether it is
//! part of a tree stream (a tree is cut like any stream; only its first
//! chunk starts with "BKPT"), so the hook is the commit: the snapshot's
//! `tree` lists the tree chunks, and the commit has just walked and checked
//! them ([`ChunkStore::keep_trees`](crate::store::ChunkStore::keep_trees)).
//!
//! At its commit, every tree chunk without a local copy yet
//! 1. is written into a tree pack (kind 2) of its own, PUT and recorded
//!    before anything names it;
//! 2. then, in one synced batch, gets its local copy (`tree_chunks`) and
//!    its location switched to the tree pack.
//!
//! So commit checks, GC marking and drills read trees from local disk (a
//! bucket that is down does not stop them), and a rebuild finds every tree
//! in tree packs, which are small and read first. The copy the chunk got
//! in a data pack when it was uploaded is dead from then on (trees are
//! well under 1% of the data). A crash between the two steps leaves the
//! old location (still valid) and a tree pack nothing names: a dead pack.

use bkp_common::ChunkId;

use super::upload::{Sealed, Up};
use super::{Location, S3Chunks};
use crate::store::pack::{Kind, PackWriter, SealedPack};
use crate::store::rocks::Batch;
use crate::store::{schema, StoreError};

impl S3Chunks {
    /// The local copy of a tree chunk.
    pub(super) fn tree_copy(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.db.raw().get_cf(self.db.cf(schema::CF_TREE_CHUNKS), id.as_bytes()).ok().flatten()
    }

    pub(super) fn keep_tree_chunks(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        let mut todo: Vec<ChunkId> = ids.to_vec();
        todo.sort_unstable();
        todo.dedup();
        let cf = self.db.cf(schema::CF_TREE_CHUNKS);
        let have = self.db.raw().multi_get_cf(todo.iter().map(|id| (cf, id.as_bytes().to_vec())));
        let mut missing = Vec::new();
        for (id, h) in todo.iter().zip(have) {
            if h.map_err(|e| StoreError::Db(e.into_string()))?.is_none() {
                missing.push(*id);
            }
        }
        // Already in a tree pack (a rebuild, or a copy lost with its
        // directory): only the local copy is written.
        let in_tree_pack: Vec<bool> = {
            let locs = self.locations(&missing)?;
            let packs = self.up.packs.read().expect("packs lock");
            locs.iter()
                .map(|l| l.and_then(|l| packs.get(&l.pack).map(|r| r.kind == Kind::Tree)).unwrap_or(false))
                .collect()
        };
        let placed: Vec<ChunkId> = missing.iter().zip(&in_tree_pack).filter(|(_, t)| **t).map(|(c, _)| *c).collect();
        if !placed.is_empty() {
            let blobs = self.batch_read(&placed, usize::MAX)?;
            let mut b = Batch::new(&self.db);
            for (c, blob) in placed.iter().zip(&blobs) {
                if let Some(blob) = blob {
                    b.put(schema::CF_TREE_CHUNKS, c.as_bytes(), blob);
                }
            }
            self.db.write_synced(b)?;
        }
        let missing: Vec<ChunkId> = missing.iter().zip(&in_tree_pack).filter(|(_, t)| !**t).map(|(c, _)| *c).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let blobs = self.batch_read(&missing, usize::MAX)?;
        if blobs.len() < missing.len() || blobs.iter().any(Option::is_none) {
            let id = missing[blobs.len().saturating_sub(1).min(missing.len() - 1)];
            return Err(StoreError::Corrupt(format!(
                "tree chunk {} of this commit is not stored; push again",
                id.short()
            )));
        }
        let num = self.next_pack_num()?;
        let mut w = PackWriter::new(Kind::Tree);
        let entries: Vec<_> =
            missing.iter().zip(&blobs).map(|(id, b)| w.add(id, b.as_deref().unwrap_or_default())).collect();
        let SealedPack { id, kind, bytes, .. } = w.finish();
        {
            let mut st = self.up.lock();
            st.sealed.push((num, Sealed { id, kind, bytes: bytes.into(), up: Up::Queued }));
            self.up.kick(&mut st);
        }
        self.up.wait_stored(&[num])?;
        let mut b = Batch::new(&self.db);
        for ((cid, e), blob) in missing.iter().zip(&entries).zip(&blobs) {
            b.put(schema::CF_TREE_CHUNKS, cid.as_bytes(), blob.as_deref().unwrap_or_default());
            b.put(schema::CF_CHUNK_LOC, cid.as_bytes(), Location { pack: num, offset: e.offset, len: e.len }.encode());
        }
        self.db.write_synced(b)
    }
}
