//! Reading back: snapshot listings, one snapshot, chunk fetches. A
//! caller that is neither admin nor sync sees only its own host: another
//! host's snapshot is reported absent, and a chunk is read only when the
//! caller's host has proven it holds it (uploaded it), so a hash alone
//! never reads data. A sync token (a second site's pull) reads every
//! host's snapshots and chunks, and may do nothing else.

use bkp_common::protocol::{Role, MAX_FETCH};
use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};

use super::{Caller, ServiceError};
use crate::store::{ChunkStore, MetaStore, StoreError};

/// Roles that read every host: admin, and sync (a second site's pull).
fn reads_all(role: Role) -> bool {
    matches!(role, Role::Admin | Role::Sync)
}

/// `ListSnapshots`: an admin or sync token lists any host (all without
/// `host`), every other caller its own.
pub fn list(
    store: &dyn MetaStore,
    caller: &Caller,
    host: Option<String>,
    name: Option<&str>,
) -> Result<Vec<SnapshotSummary>, ServiceError> {
    let filter = match (caller.role, host) {
        (r, w) if reads_all(r) => w,
        (_, Some(w)) if w != caller.host => {
            return Err(ServiceError::Forbidden {
                message: "only an admin token lists other hosts".into(),
                audit: format!("list_snapshots of host {w}: only an admin token lists other hosts"),
            })
        }
        _ => Some(caller.host.clone()),
    };
    Ok(store.list_snapshots(filter.as_deref(), name)?)
}

/// `GetSnapshot`. Another host's snapshot is reported as absent, not
/// forbidden, so ids cannot be probed.
pub fn snapshot(store: &dyn MetaStore, caller: &Caller, id: &SnapshotId) -> Result<Snapshot, ServiceError> {
    match store.snapshot(id)? {
        Some(s) if reads_all(caller.role) || s.host == caller.host => Ok(s),
        _ => Err(ServiceError::NotFound(format!("no snapshot {}", id.short()))),
    }
}

/// `GetChunks`, before any blob is read: at most [`MAX_FETCH`] ids, each
/// one the caller's host has proven it holds (an admin or sync token reads
/// any).
/// Possession only: a chunk no longer stored is found missing by the
/// read ([`read_blobs`]), one lookup per chunk fewer.
pub fn authorize_fetch(store: &dyn MetaStore, caller: &Caller, ids: &[ChunkId]) -> Result<(), ServiceError> {
    caller.require(&[Role::Push, Role::Restore, Role::Admin, Role::Sync], "get_chunks")?;
    if ids.len() > MAX_FETCH {
        return Err(ServiceError::BadRequest(format!("more than {MAX_FETCH} chunks in one request")));
    }
    if !reads_all(caller.role) {
        let held = store.host_holds(&caller.host, ids)?;
        if let Some(i) = held.iter().position(|h| !h) {
            return Err(ServiceError::NotFound(format!("no chunk {} for this host", ids[i].short())));
        }
    }
    Ok(())
}

/// The stored blobs of the first of `ids`, in order, until `max_bytes`
/// are read or a chunk is missing (`None`, the last item): the caller
/// answers what it got, then [`ServiceError::missing_chunk`]. The backend
/// reads them together ([`ChunkStore::chunk_blobs`]).
pub fn read_blobs(
    store: &dyn ChunkStore,
    ids: &[ChunkId],
    max_bytes: usize,
) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    store.chunk_blobs(ids, max_bytes)
}
