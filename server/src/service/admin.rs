//! Requests that change what is kept: forget and protect (admin tokens),
//! and a client's report that a push failed.

use bkp_common::protocol::Role;
use bkp_common::snapshot::SnapshotKind;
use bkp_common::SnapshotId;

use super::{Caller, ServiceError};
use crate::push_failures::{self, PushFailures};
use crate::store::MetaStore;

/// `Forget`: deletes one snapshot; its chunks go at the next GC.
pub fn forget(store: &dyn MetaStore, caller: &Caller, id: &SnapshotId) -> Result<(), ServiceError> {
    caller.require(&[Role::Admin], "forget")?;
    found(store.delete_snapshot(id)?, id)
}

/// `Protect`: prune never removes a protected snapshot; `protected:
/// false` lifts it.
pub fn protect(store: &dyn MetaStore, caller: &Caller, id: &SnapshotId, protected: bool) -> Result<(), ServiceError> {
    caller.require(&[Role::Admin], "protect")?;
    found(store.set_protected(id, protected)?, id)
}

fn found(existed: bool, id: &SnapshotId) -> Result<(), ServiceError> {
    if existed {
        Ok(())
    } else {
        Err(ServiceError::NotFound(format!("no snapshot {}", id.short())))
    }
}

/// `PushFailed`: records the failure of the caller's set `name` for the
/// monitor (the caller nudges it). A store that cannot take the record
/// is not the client's problem: the table keeps it in memory.
pub fn push_failed(
    failures: &PushFailures,
    store: &dyn MetaStore,
    caller: &Caller,
    name: &str,
    kind: Option<SnapshotKind>,
    reason: &str,
    now_ns: u64,
) -> Result<(), ServiceError> {
    caller.require(&[Role::Push, Role::Admin], "push_failed")?;
    push_failures::report(failures, store, &caller.host, name, kind, reason, now_ns)
        .map_err(|e| ServiceError::BadRequest(e.to_string()))
}
