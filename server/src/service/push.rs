//! A push: start a session, ask which chunks are missing, upload them in
//! batches, commit the snapshot. Every step after the start runs under
//! the session fence (`Sessions::enter`), so a GC sweep sees either the
//! step's touched chunks or the step sees the sweep's deletions (see
//! `crate::sessions`).

use bkp_common::names::check_set_name;
use bkp_common::protocol::{Role, MAX_IDS};
use bkp_common::snapshot::{Incomplete, Snapshot, SnapshotKind, SnapshotSummary};
use bkp_common::ChunkId;
use tracing::{debug, warn};

use super::{Caller, ServiceError};
use crate::clock::now_ns;
use crate::commit::{check_tree, parent_refs, push_budget};
use crate::sessions::{PushGuard, Sessions};
use crate::store::{MetaStore, PutStats, Store, VerifiedChunk};

const PUSHERS: &[Role] = &[Role::Push, Role::Admin];

/// `StartPush`: a new session for the caller's set `name`.
pub fn start(sessions: &Sessions, caller: &Caller, name: &str, kind: SnapshotKind) -> Result<u64, ServiceError> {
    caller.require(PUSHERS, "start_push")?;
    check_set_name(name).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    Ok(sessions.start_for(&caller.token_id, &caller.host, name, kind)?)
}

/// `HasChunks`: the positions in `ids` of the chunks the push must upload.
/// What it is told is stored, the session has touched, so a sweep spares
/// it until the commit.
pub fn has_chunks(
    store: &dyn Store,
    sessions: &Sessions,
    caller: &Caller,
    session: u64,
    ids: &[ChunkId],
) -> Result<Vec<u32>, ServiceError> {
    caller.require(PUSHERS, "has_chunks")?;
    if ids.len() > MAX_IDS {
        return Err(ServiceError::BadRequest(format!("more than {MAX_IDS} ids")));
    }
    let guard = sessions.enter(session, &caller.host)?;
    if guard.claim_parent() {
        prove_parent(store, &guard);
    }
    // Only what the session has not proven needs the store.
    let unknown = guard.untouched_at(ids);
    let asked: Vec<ChunkId> = unknown.iter().map(|&i| ids[i]).collect();
    let have = store.host_has(&caller.host, &asked)?;
    guard.touch(asked.iter().zip(&have).filter(|(_, h)| **h).map(|(id, _)| *id));
    Ok(unknown.iter().zip(&have).filter(|(_, h)| !**h).map(|(&i, _)| i as u32).collect())
}

/// Touches the references of the set's newest snapshot for this session
/// (see `commit::parent_refs` for why that is safe). Only a shortcut: on
/// any error the session goes on with store lookups.
fn prove_parent(store: &dyn Store, guard: &PushGuard<'_>) {
    let started = std::time::Instant::now();
    match parent_refs(store, &guard.info.host, &guard.info.name) {
        Ok(ids) => {
            debug!(host = %guard.info.host, name = %guard.info.name, chunks = ids.len(),
                   ms = started.elapsed().as_millis() as u64, "proved the previous snapshot's chunks");
            guard.touch(ids);
        }
        Err(e) => warn!(host = %guard.info.host, name = %guard.info.name,
                        "previous snapshot not used to prove chunks ({e}); looking them up instead"),
    }
}

/// The first `PutChunk` of an upload stream: refuses a caller that may
/// not push, or a dead session, before anything is decompressed.
pub fn open_upload(sessions: &Sessions, caller: &Caller, session: u64) -> Result<(), ServiceError> {
    caller.require(PUSHERS, "put_chunk")?;
    sessions.enter(session, &caller.host)?;
    Ok(())
}

/// Verifies and stores a batch of uploaded `(id, blob)` chunks: every blob
/// is decompressed and re-hashed first (one that does not hash to its id
/// refuses the batch), then the batch is written under the session fence
/// and touched. The store's figures stay on the server: telling the
/// uploader what was new would reveal what other hosts hold.
pub fn put_batch(
    store: &dyn MetaStore,
    sessions: &Sessions,
    caller: &Caller,
    session: u64,
    items: Vec<(ChunkId, Vec<u8>)>,
) -> Result<PutStats, ServiceError> {
    caller.require(PUSHERS, "put_chunk")?;
    let verified = items
        .into_iter()
        .map(|(id, b)| {
            VerifiedChunk::verify(id, b)
                .map_err(|e| ServiceError::Rejected(format!("chunk {} refused: {e}", id.short())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let guard = sessions.enter(session, &caller.host)?;
    let stats = store.put_chunks(&caller.host, &verified)?;
    guard.touch(verified.iter().map(|c| *c.id()));
    Ok(stats)
}

/// What a commit did, with the session's set (for per-set counters; ""
/// when the session was not found).
pub struct CommitOutcome {
    pub set: String,
    pub result: Result<SnapshotSummary, ServiceError>,
}

/// `Commit`: checks the tree (names a restore accepts, every reference
/// proven by this host; see `commit::check_tree`) and the set's daily
/// budget (`max_pushes_per_day`, 0: none), then writes the snapshot
/// durably and ends the session. `Err` only for a caller that may not
/// push at all: that is no failed push of any set.
/// `incomplete` (from `CommitIncomplete`): the files the client could not
/// read, kept on the snapshot's summary.
pub fn commit(
    store: &dyn Store,
    sessions: &Sessions,
    caller: &Caller,
    session: u64,
    tree: Vec<ChunkId>,
    incomplete: Option<Incomplete>,
    max_pushes_per_day: u32,
) -> Result<CommitOutcome, ServiceError> {
    caller.require(PUSHERS, "commit")?;
    let mut set = String::new();
    let result = commit_in(store, sessions, caller, session, tree, incomplete, max_pushes_per_day, &mut set);
    Ok(CommitOutcome { set, result })
}

#[allow(clippy::too_many_arguments)]
fn commit_in(
    store: &dyn Store,
    sessions: &Sessions,
    caller: &Caller,
    session: u64,
    tree: Vec<ChunkId>,
    incomplete: Option<Incomplete>,
    max: u32,
    set: &mut String,
) -> Result<SnapshotSummary, ServiceError> {
    let host = &caller.host;
    if let Some(i) = &incomplete {
        i.check().map_err(|e| ServiceError::BadRequest(format!("incomplete commit: {e}")))?;
    }
    let guard = sessions.enter(session, host)?;
    set.clone_from(&guard.info.name);
    let kind = guard.info.kind;
    let stats = check_tree(store, host, kind, &tree, &mut &guard)?;
    push_budget(store, max, host, &guard.info.name, now_ns())?;
    let snap = Snapshot {
        host: host.clone(),
        name: guard.info.name.clone(),
        time_ns: now_ns(),
        kind,
        stats,
        tree,
        client: caller.client.clone(),
    };
    guard.still_live()?;
    let summary = store.commit_snapshot_with(&snap, incomplete)?;
    guard.finish();
    Ok(summary)
}
