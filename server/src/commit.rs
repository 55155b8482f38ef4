//! The check a snapshot passes before it is committed: the server reads
//! the whole tree stream the client sent, checks its grammar, and checks
//! that the host has proven it holds every chunk the tree references
//! (uploaded it, in this push or an earlier one). Without that check a
//! host could name another host's chunk ids in a crafted tree and then
//! restore them.

use bkp_common::blob;
use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
use bkp_common::tree::{Entry, TreeDecoder};
use bkp_common::ChunkId;

use crate::store::{Store, StoreError};

/// Longest tree stream accepted: 1M chunks of about 1 MiB.
pub const MAX_TREE_CHUNKS: usize = 1 << 20;
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("snapshot refused: {0}")]
    Rejected(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn require_all(store: &dyn Store, host: &str, ids: &[ChunkId]) -> Result<(), CommitError> {
    let have = store.host_has(host, ids)?;
    if let Some(i) = have.iter().position(|h| !h) {
        return Err(CommitError::Rejected(format!(
            "chunk {} is referenced but was never uploaded by host {host}",
            ids[i].short()
        )));
    }
    Ok(())
}

/// Walks the tree and returns the snapshot's statistics.
pub fn check_tree(
    store: &dyn Store,
    host: &str,
    kind: SnapshotKind,
    tree: &[ChunkId],
) -> Result<SnapshotStats, CommitError> {
    if tree.is_empty() || tree.len() > MAX_TREE_CHUNKS {
        return Err(CommitError::Rejected(format!("tree of {} chunks", tree.len())));
    }
    require_all(store, host, tree)?;
    let mut dec = TreeDecoder::new();
    let mut stats = SnapshotStats::default();
    let mut pending: Vec<ChunkId> = Vec::with_capacity(BATCH);
    let mut entries = 0u64;
    for id in tree {
        let b = store
            .chunk_blob(id)?
            .ok_or_else(|| CommitError::Rejected(format!("tree chunk {} is missing", id.short())))?;
        let data = blob::decode_verified(&b, id)
            .map_err(|e| StoreError::Corrupt(format!("tree chunk {}: {e}", id.short())))?;
        dec.feed(&data);
        while let Some(e) = dec.next_entry().map_err(|e| CommitError::Rejected(e.to_string()))? {
            entries += 1;
            match e {
                Entry::Dir { .. } => stats.dirs += 1,
                Entry::File { size, .. } => {
                    stats.files += 1;
                    stats.bytes += size;
                }
                Entry::Chunks(refs) => {
                    stats.data_chunks += refs.len() as u64;
                    pending.extend(refs.iter().map(|r| r.id));
                    if pending.len() >= BATCH {
                        require_all(store, host, &pending)?;
                        pending.clear();
                    }
                }
                Entry::FileEnd { .. } => {}
                Entry::Symlink { .. } | Entry::Hardlink { .. } | Entry::Special { .. } => stats.others += 1,
            }
        }
    }
    dec.finish().map_err(|e| CommitError::Rejected(e.to_string()))?;
    require_all(store, host, &pending)?;
    if kind == SnapshotKind::Stream && (stats.files != 1 || stats.dirs + stats.others != 0) {
        return Err(CommitError::Rejected("a stream snapshot holds exactly one file".into()));
    }
    if entries == 0 {
        return Err(CommitError::Rejected("empty tree".into()));
    }
    Ok(stats)
}
