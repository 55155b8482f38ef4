//! The server's one reader of a snapshot's tree stream: fetch each tree
//! chunk from the chunk store, check that it hashes to its id, decode its
//! entries (`bkp_common::tree`). The commit check, GC's mark phase and
//! the verify drill all read trees through [`TreeEntries`]; each decides
//! what a missing chunk or a malformed stream means for it.

use bkp_common::blob::{self, BlobError};
use bkp_common::tree::{Entry, TreeDecoder, TreeError};
use bkp_common::ChunkId;

use crate::store::{ChunkStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum TreeReadError {
    /// A tree chunk the store does not have (never uploaded, quarantined,
    /// or lost).
    #[error("tree chunk {} is missing", .0.short())]
    Missing(ChunkId),
    /// A tree chunk whose blob does not decode or hash to its id.
    #[error("tree chunk {}: {}", .0.short(), .1)]
    Bad(ChunkId, BlobError),
    /// The stream does not decode or breaks the grammar.
    #[error(transparent)]
    Decode(#[from] TreeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The entries of the tree stream made of `tree`'s chunks, in order,
/// reading one chunk at a time. Ends after the first error.
pub struct TreeEntries<'a> {
    store: &'a dyn ChunkStore,
    tree: &'a [ChunkId],
    next: usize,
    dec: TreeDecoder,
    done: bool,
}

impl<'a> TreeEntries<'a> {
    pub fn new(store: &'a dyn ChunkStore, tree: &'a [ChunkId]) -> Self {
        Self { store, tree, next: 0, dec: TreeDecoder::new(), done: false }
    }

    fn step(&mut self) -> Result<Option<Entry>, TreeReadError> {
        loop {
            if let Some(e) = self.dec.next_entry()? {
                return Ok(Some(e));
            }
            let Some(id) = self.tree.get(self.next) else {
                self.dec.finish()?;
                return Ok(None);
            };
            self.next += 1;
            let b = self.store.chunk_blob(id)?.ok_or(TreeReadError::Missing(*id))?;
            let data = blob::decode_verified(&b, id).map_err(|e| TreeReadError::Bad(*id, e))?;
            self.dec.feed(&data);
        }
    }
}

impl Iterator for TreeEntries<'_> {
    type Item = Result<Entry, TreeReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step();
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rocks::RocksStore;
    use crate::store::VerifiedChunk;
    use bkp_common::tree::{Meta, TreeEncoder};

    fn put(store: &RocksStore, data: &[u8]) -> ChunkId {
        let c = VerifiedChunk::verify(ChunkId::of(data), blob::encode(data, 1)).unwrap();
        store.put_chunks("h", &[c]).unwrap();
        ChunkId::of(data)
    }

    #[test]
    fn reads_entries_across_chunks_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(&dir.path().join("db"), 8 << 20).unwrap();
        let mut enc = TreeEncoder::new();
        for i in 0..3 {
            enc.push(&Entry::Dir { path: format!("d{i}").into_bytes(), meta: Meta::default() });
        }
        let bytes = enc.take();
        // Cut mid-record: the decoder must carry the rest over.
        let (a, b) = bytes.split_at(bytes.len() / 2);
        let tree = [put(&store, a), put(&store, b)];
        let paths: Vec<Vec<u8>> =
            TreeEntries::new(&store, &tree).map(|e| e.unwrap().path().unwrap().to_vec()).collect();
        assert_eq!(paths, [b"d0".to_vec(), b"d1".to_vec(), b"d2".to_vec()]);

        // The first half alone ends inside a record.
        let r: Vec<_> = TreeEntries::new(&store, &tree[..1]).collect();
        assert!(matches!(r.last(), Some(Err(TreeReadError::Decode(TreeError::Truncated)))), "{r:?}");
        let gone = ChunkId::of(b"never stored");
        let mut it = TreeEntries::new(&store, std::slice::from_ref(&gone));
        assert!(matches!(it.next(), Some(Err(TreeReadError::Missing(id))) if id == gone));
        assert!(it.next().is_none(), "ends after an error");
        // A chunk that is no tree stream.
        let junk = [put(&store, b"not a tree")];
        assert!(matches!(TreeEntries::new(&store, &junk).next(), Some(Err(TreeReadError::Decode(TreeError::Magic)))));
    }
}
