//! The mark set of one GC run: every referenced chunk, and every (host,
//! chunk) pair a host's snapshot references. It lives in memory up to its
//! budget (`[gc] mark_memory_mb`); past that, everything marked so far
//! moves to the store's `gc_mark` scratch column family and the rest of
//! the run asks the store. Exact either way: the scratch holds the same
//! keys the hash sets would, so the sweep deletes the same chunks.

use std::collections::HashSet;

use bkp_common::ChunkId;

use crate::store::{Store, StoreError};

/// Bytes a hash set entry costs: the key and hashbrown's control byte.
const CHUNK_ENTRY: usize = std::mem::size_of::<ChunkId>() + 1;
const PAIR_ENTRY: usize = std::mem::size_of::<(u32, ChunkId)>() + 1;

pub struct MarkSet<'a> {
    store: &'a dyn Store,
    /// Memory the two sets may allocate, at most.
    budget: usize,
    chunks: HashSet<ChunkId>,
    pairs: HashSet<(u32, ChunkId)>,
    /// Keys written to the scratch so far (0: all in memory).
    spilled: u64,
}

impl<'a> MarkSet<'a> {
    /// An empty set; the scratch left by an earlier run is emptied.
    pub fn new(store: &'a dyn Store, budget_bytes: usize) -> Result<Self, StoreError> {
        store.gc_mark_clear()?;
        Ok(Self { store, budget: budget_bytes, chunks: HashSet::new(), pairs: HashSet::new(), spilled: 0 })
    }

    /// Bytes the sets hold allocated now.
    fn allocated(&self) -> usize {
        self.chunks.capacity() * CHUNK_ENTRY + self.pairs.capacity() * PAIR_ENTRY
    }

    /// Marks `ids` as referenced by host `host` (the run's numbering).
    pub fn insert(&mut self, host: u32, ids: &[ChunkId]) -> Result<(), StoreError> {
        // Checked before the sets grow: a hash set doubles its table, so
        // room for `ids` may mean twice the memory. Half the budget for
        // the tables leaves the other half for the doubling and for the
        // sorted copy `sorted_batches` makes.
        let grows = |len: usize, cap: usize| len + ids.len() > cap;
        let next = |cap: usize| (cap.max(ids.len()) * 2).max(16);
        let mut after = self.allocated();
        if grows(self.chunks.len(), self.chunks.capacity()) {
            after += (next(self.chunks.capacity()) - self.chunks.capacity()) * CHUNK_ENTRY;
        }
        if grows(self.pairs.len(), self.pairs.capacity()) {
            after += (next(self.pairs.capacity()) - self.pairs.capacity()) * PAIR_ENTRY;
        }
        if after > self.budget / 2 && !(self.chunks.is_empty() && self.pairs.is_empty()) {
            self.spill()?;
        }
        for id in ids {
            self.chunks.insert(*id);
            self.pairs.insert((host, *id));
        }
        Ok(())
    }

    /// Moves everything in memory to the scratch.
    fn spill(&mut self) -> Result<(), StoreError> {
        let chunks: Vec<ChunkId> = self.chunks.drain().collect();
        let pairs: Vec<(u32, ChunkId)> = self.pairs.drain().collect();
        self.store.gc_mark_put(&chunks, &pairs)?;
        self.spilled += (chunks.len() + pairs.len()) as u64;
        self.chunks = HashSet::new();
        self.pairs = HashSet::new();
        Ok(())
    }

    /// Ends marking: once anything spilled, the rest follows, so that
    /// every lookup has one place to ask.
    pub fn finish(&mut self) -> Result<(), StoreError> {
        if self.spilled > 0 {
            self.spill()?;
        }
        Ok(())
    }

    /// Keys written to the scratch.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Which of `ids` are marked; `sorted`: in key order.
    pub fn has(&self, ids: &[ChunkId], sorted: bool) -> Result<Vec<bool>, StoreError> {
        if self.spilled == 0 {
            return Ok(ids.iter().map(|c| self.chunks.contains(c)).collect());
        }
        self.store.gc_mark_has(ids, sorted)
    }

    /// Which of `pairs` are marked.
    pub fn has_pairs(&self, pairs: &[(u32, ChunkId)]) -> Result<Vec<bool>, StoreError> {
        if self.spilled == 0 {
            return Ok(pairs.iter().map(|p| self.pairs.contains(p)).collect());
        }
        self.store.gc_mark_has_pairs(pairs)
    }

    /// Every marked chunk once, in key order, `batch` at a time; returns
    /// how many there are.
    pub fn sorted_batches<E: From<StoreError>>(
        &self,
        batch: usize,
        mut f: impl FnMut(&[ChunkId]) -> Result<(), E>,
    ) -> Result<u64, E> {
        if self.spilled == 0 {
            let mut ids: Vec<ChunkId> = self.chunks.iter().copied().collect();
            ids.sort_unstable();
            for part in ids.chunks(batch) {
                f(part)?;
            }
            return Ok(ids.len() as u64);
        }
        let mut after = None;
        let mut n = 0u64;
        loop {
            let ids = self.store.gc_mark_chunks(after.as_ref(), batch)?;
            let Some(last) = ids.last().copied() else { break };
            n += ids.len() as u64;
            f(&ids)?;
            after = Some(last);
        }
        Ok(n)
    }
}
