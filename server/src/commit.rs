//! Reading a snapshot's tree on the server, for two callers:
//!
//! * the check a snapshot passes before it is committed: grammar, paths a
//!   restore accepts (a crafted tree with `../` names is never stored), and that
//!   the host has proven it holds every chunk the tree references (uploaded
//!   it, in this push or an earlier one). Without that check a host could
//!   name another host's chunk ids in a crafted tree and then restore them;
//! * the garbage collector's mark phase, which needs every reference.

use bkp_common::names::check_path;
use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
use bkp_common::tree::Entry;
use bkp_common::ChunkId;

use crate::store::{Store, StoreError};
use crate::tree_read::{TreeEntries, TreeReadError};

/// Longest tree stream accepted: 1M chunks of about 1 MiB.
pub const MAX_TREE_CHUNKS: usize = 1 << 20;
/// Repeats of tree chunks a commit may list (a tree chunk listed twice
/// counts one). Each repeat is read, decompressed and walked again but
/// costs the client no upload, so without a bound a Commit frame naming
/// one chunk a million times buys a terabyte of decoding. An honest tree
/// repeats a chunk only where its stream repeats (the references of a
/// long run of identical data chunks): about 40 per TiB of zeros.
pub const MAX_TREE_REPEATS: usize = 1024;
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("snapshot refused: {0}")]
    Rejected(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the commit check needs from the push session.
pub trait CommitSession {
    /// The ids among `ids` that this session has not proven.
    fn unproven(&self, ids: &[ChunkId]) -> Vec<ChunkId>;
    /// `ids`, looked up because they were unproven, passed the check.
    fn checked(&mut self, ids: &[ChunkId]);
}

/// Walks a tree stream, handing every referenced chunk id (the tree's own
/// chunks first, then data chunks in batches) to `refs`.
pub fn walk_tree(
    store: &dyn Store,
    tree: &[ChunkId],
    refs: &mut dyn FnMut(&[ChunkId]) -> Result<(), CommitError>,
) -> Result<SnapshotStats, CommitError> {
    walk(store, tree, refs, false)
}

/// [`walk_tree`]; with `check_names`, also refuses every path the client
/// would refuse at restore (`names::check_path`). Only the commit check
/// asks for that: GC must still mark a snapshot stored before the rule.
fn walk(
    store: &dyn Store,
    tree: &[ChunkId],
    refs: &mut dyn FnMut(&[ChunkId]) -> Result<(), CommitError>,
    check_names: bool,
) -> Result<SnapshotStats, CommitError> {
    if tree.is_empty() || tree.len() > MAX_TREE_CHUNKS {
        return Err(CommitError::Rejected(format!("tree of {} chunks", tree.len())));
    }
    refs(tree)?;
    let mut stats = SnapshotStats::default();
    let mut pending: Vec<ChunkId> = Vec::with_capacity(BATCH);
    let mut entries = 0u64;
    for e in TreeEntries::new(store, tree) {
        let e = e.map_err(|e| match e {
            TreeReadError::Missing(_) | TreeReadError::Decode(_) => CommitError::Rejected(e.to_string()),
            TreeReadError::Bad(..) => CommitError::Store(StoreError::Corrupt(e.to_string())),
            TreeReadError::Store(s) => CommitError::Store(s),
        })?;
        entries += 1;
        if check_names {
            check_entry_paths(&e)?;
        }
        match e {
            Entry::Dir { .. } => stats.dirs += 1,
            Entry::File { size, .. } => {
                stats.files += 1;
                // A crafted tree may claim any size: overflow is a refusal, not a panic.
                stats.bytes = stats
                    .bytes
                    .checked_add(size)
                    .ok_or_else(|| CommitError::Rejected("the tree's file sizes add up past 2^64 bytes".into()))?;
            }
            Entry::Chunks(list) => {
                stats.data_chunks += list.len() as u64;
                pending.extend(list.iter().map(|r| r.id));
                if pending.len() >= BATCH {
                    refs(&pending)?;
                    pending.clear();
                }
            }
            Entry::FileEnd { .. } => {}
            Entry::Symlink { .. } | Entry::Hardlink { .. } | Entry::Special { .. } => stats.others += 1,
        }
    }
    refs(&pending)?;
    if entries == 0 {
        return Err(CommitError::Rejected("empty tree".into()));
    }
    Ok(stats)
}

fn check_entry_paths(e: &Entry) -> Result<(), CommitError> {
    let target = match e {
        Entry::Hardlink { target, .. } => Some(target.as_slice()),
        _ => None,
    };
    // A symlink's target is data, not a place the restore writes: it may
    // well be absolute.
    for p in e.path().into_iter().chain(target) {
        check_path(p).map_err(|err| {
            CommitError::Rejected(format!("{err}; a restore would refuse it (fix the tree, then push again)"))
        })?;
    }
    Ok(())
}

/// The commit check: every path is one a restore accepts, every referenced chunk must be one the host may
/// use. `session` says which ids this push already proved (told "stored"
/// by a has-chunk query, or uploaded; see `sessions`, which drops an id
/// from there when verify quarantines it); only the others are looked up,
/// and the session is told of them once they pass. The caller holds the session
/// fence throughout, so no sweep runs between the check and the write.
pub fn check_tree(
    store: &dyn Store,
    host: &str,
    kind: SnapshotKind,
    tree: &[ChunkId],
    session: &mut dyn CommitSession,
) -> Result<SnapshotStats, CommitError> {
    if tree.len() > MAX_TREE_CHUNKS {
        return Err(CommitError::Rejected(format!("tree of {} chunks", tree.len())));
    }
    let mut distinct = tree.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let repeats = tree.len() - distinct.len();
    if repeats > MAX_TREE_REPEATS {
        return Err(CommitError::Rejected(format!(
            "the tree repeats its chunks {repeats} times (at most {MAX_TREE_REPEATS} repeats); no bkp client \
             makes such a tree"
        )));
    }
    let mut refs = |ids: &[ChunkId]| {
        let unproven = session.unproven(ids);
        let have = store.host_has(host, &unproven)?;
        if let Some(i) = have.iter().position(|h| !h) {
            let id = unproven[i].short();
            return Err(CommitError::Rejected(format!(
                "chunk {id} is referenced but is not stored for host {host} (never uploaded, garbage-collected, or its data \
                 is missing; push again)"
            )));
        }
        session.checked(&unproven);
        Ok(())
    };
    let stats = walk(store, tree, &mut refs, true)?;
    if kind == SnapshotKind::Stream && (stats.files != 1 || stats.dirs + stats.others != 0) {
        return Err(CommitError::Rejected("a stream snapshot holds exactly one file".into()));
    }
    Ok(stats)
}

/// `max_pushes_per_day` (0: no limit): refuses a commit into a set that
/// already has that many snapshots from the last 24 hours. It bounds what
/// a stolen push token can add to one set (see `retention` on why junk
/// matters); a soft bound: two commits at once may both pass.
pub fn push_budget(store: &dyn Store, max: u32, host: &str, name: &str, now_ns: u64) -> Result<(), CommitError> {
    if max == 0 {
        return Ok(());
    }
    let since = now_ns.saturating_sub(86_400 * 1_000_000_000);
    let recent = store.list_snapshots(Some(host), Some(name))?.iter().filter(|s| s.time_ns > since).count();
    if recent >= max as usize {
        return Err(CommitError::Rejected(format!(
            "set {host}/{name} already has {recent} snapshots from the last 24 hours, the server's \
             max_pushes_per_day; push again later, or raise it in server.toml if this many are expected"
        )));
    }
    Ok(())
}

/// The chunks a new push of set `name` by `host` may take as proven
/// without asking the store about each: every reference of the set's
/// newest snapshot that is still stored. Empty when the set has none.
///
/// Why that is safe, given the caller holds the session fence (so no GC
/// sweep batch and no quarantine runs until it has touched the result):
/// the snapshot's commit checked each reference for this same host, so
/// the host has proven it holds them; and what is stored now stays stored
/// for the session once touched (a sweep spares touched chunks, a
/// quarantine removes the id from every session). Whether each is stored
/// is one sorted pass over `chunk_meta` rather than two random lookups
/// per id, plus a lookup of its data, so a chunk that was quarantined, or
/// lost with its meta left behind, is not reused.
pub fn parent_refs(store: &dyn Store, host: &str, name: &str) -> Result<Vec<ChunkId>, CommitError> {
    let Some(newest) = store.list_snapshots(Some(host), Some(name))?.pop() else {
        return Ok(Vec::new());
    };
    // Forgotten since it was listed: nothing to prove.
    let Some(parent) = store.snapshot(&newest.id)? else { return Ok(Vec::new()) };
    let mut ids = Vec::new();
    walk_tree(store, &parent.tree, &mut |refs| {
        ids.extend_from_slice(refs);
        Ok(())
    })?;
    ids.sort_unstable();
    ids.dedup();
    let stored = store.stored_sorted(&ids)?;
    Ok(ids.into_iter().zip(stored).filter(|(_, s)| *s).map(|(id, _)| id).collect())
}
