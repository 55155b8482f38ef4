//! The upload queue: packs sealed (full, or at a commit) are PUT in the
//! background, [`IN_FLIGHT`] at a time, so the put that fills a pack does
//! not wait for its upload and other pushes go on filling the next one.
//!
//! Memory is bounded: at most [`MAX_SEALED`] sealed packs wait in memory
//! (queued, in flight, or failed); a put that would seal one more waits
//! until an upload ends. With the default 32 MiB packs that is 4 × 32 MiB
//! sealed plus the open data and tree packs: about 200 MiB at most, and
//! only while the bucket is slower than the pushes.
//!
//! A commit waits ([`Shared::wait_stored`]) for every pack sealed before it
//! (whoever sealed it): acknowledged still means in the bucket. A failed
//! upload stays in memory as `Failed`; the next put or commit tries it
//! once more and reports the error if that fails too, so while the bucket
//! is down pushes fail with the object store's error and no more data
//! piles up, and once it is back they go on, without a restart.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use bytes::Bytes;

use super::rows::{obj_err, pack_object, PackRecord};
use crate::store::object::{ObjectError, Objects};
use crate::store::pack::{Kind, PackId, PackWriter, SealedPack};
use crate::store::rocks::{Batch, Db};
use crate::store::{schema, StoreError};

/// PUTs in flight at once.
pub const IN_FLIGHT: usize = 3;
/// Sealed packs held in memory at most (see the module doc).
pub const MAX_SEALED: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Up {
    Queued,
    InFlight,
    /// The last attempt's error (after the object layer's own retries).
    Failed(String),
}

/// A sealed pack waiting for (or in) its PUT. `Bytes`: the PUT and the
/// readers share the buffer.
pub(super) struct Sealed {
    pub id: PackId,
    pub kind: Kind,
    pub bytes: Bytes,
    pub up: Up,
}

pub(super) struct OpenPack {
    pub num: u64,
    pub w: PackWriter,
}

/// Packs in memory: the ones being filled (one per kind) and the sealed
/// ones whose PUT has not succeeded yet.
#[derive(Default)]
pub(super) struct Staging {
    pub open: [Option<OpenPack>; 2],
    pub sealed: Vec<(u64, Sealed)>,
}

pub(super) fn slot(kind: Kind) -> usize {
    kind as usize - 1
}

impl Staging {
    /// Seals the open pack of `kind` (if it has anything) into the queue.
    pub fn seal(&mut self, kind: Kind) {
        if let Some(op) = self.open[slot(kind)].take() {
            if !op.w.is_empty() {
                let SealedPack { id, kind, bytes, .. } = op.w.finish();
                self.sealed.push((op.num, Sealed { id, kind, bytes: Bytes::from(bytes), up: Up::Queued }));
            }
        }
    }

    pub fn failed(&self) -> Vec<u64> {
        self.sealed.iter().filter(|(_, s)| matches!(s.up, Up::Failed(_))).map(|(n, _)| *n).collect()
    }

    /// Bytes of sealed packs not in the bucket yet (a metric).
    pub fn queued_bytes(&self) -> u64 {
        self.sealed.iter().map(|(_, s)| s.bytes.len() as u64).sum()
    }
}

/// What the store and its upload tasks share.
pub(super) struct Shared {
    pub db: Arc<Db>,
    pub objects: Objects,
    pub handle: tokio::runtime::Handle,
    pub staging: Mutex<Staging>,
    /// Signalled whenever an upload ends (stored or failed).
    pub changed: Condvar,
    /// Uploaded packs, number -> record (the `packs` column family, in
    /// memory: 32 per GiB of chunk data).
    pub packs: RwLock<HashMap<u64, PackRecord>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Staging> {
        self.staging.lock().expect("staging lock")
    }

    /// Starts the PUTs of queued packs, up to [`IN_FLIGHT`] at once.
    pub fn kick(self: &Arc<Self>, st: &mut Staging) {
        let mut running = st.sealed.iter().filter(|(_, s)| s.up == Up::InFlight).count();
        for (num, s) in st.sealed.iter_mut() {
            if running >= IN_FLIGHT {
                break;
            }
            if s.up != Up::Queued {
                continue;
            }
            s.up = Up::InFlight;
            running += 1;
            let (me, num, id, kind, bytes) = (self.clone(), *num, s.id, s.kind, s.bytes.clone());
            self.handle.spawn(async move {
                let len = bytes.len() as u64;
                let r = me.objects.put_new(&pack_object(&id), bytes).await;
                let m = me.clone();
                let rec = PackRecord { id, kind, len };
                if let Err(e) = tokio::task::spawn_blocking(move || m.finished(num, rec, r)).await {
                    tracing::error!("pack upload bookkeeping failed: {e}");
                }
            });
        }
    }

    /// Records an ended PUT: stored (its `packs` row synced, then out of
    /// memory) or failed (kept for a retry).
    fn finished(self: &Arc<Self>, num: u64, rec: PackRecord, r: Result<crate::store::object::Created, ObjectError>) {
        let r = r.map_err(|e| obj_err(self.objects.bucket(), e)).and_then(|_| {
            let mut b = Batch::new(&self.db);
            b.put(schema::CF_PACKS, schema::pack_key(num), rec.encode());
            self.db.write_synced(b)
        });
        let mut st = self.lock();
        match r {
            Ok(()) => {
                // In `packs` before it leaves `sealed`: a reader always finds it.
                self.packs.write().expect("packs lock").insert(num, rec);
                st.sealed.retain(|(n, _)| *n != num);
            }
            Err(e) => {
                tracing::warn!(pack = %rec.id.short(), "pack upload failed (tried again at the next put or commit): {e}");
                if let Some((_, s)) = st.sealed.iter_mut().find(|(n, _)| *n == num) {
                    s.up = Up::Failed(match e {
                        StoreError::Bucket { detail, .. } => detail,
                        other => other.to_string(),
                    });
                }
            }
        }
        self.kick(&mut st);
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until every pack of `nums` is in the bucket (those no longer
    /// in memory are). A failed one is tried once more; a second failure
    /// is the answer.
    pub fn wait_stored(self: &Arc<Self>, nums: &[u64]) -> Result<(), StoreError> {
        let mut retried = Vec::new();
        let mut st = self.lock();
        loop {
            let mut pending = false;
            for (n, s) in st.sealed.iter_mut().filter(|(n, _)| nums.contains(n)) {
                pending = true;
                if let Up::Failed(e) = &s.up {
                    if retried.contains(n) {
                        return Err(StoreError::Bucket {
                            bucket: self.objects.bucket().to_string(),
                            detail: e.clone(),
                        });
                    }
                    retried.push(*n);
                    s.up = Up::Queued;
                }
            }
            if !pending {
                return Ok(());
            }
            self.kick(&mut st);
            st = self.changed.wait(st).expect("staging lock");
        }
    }

    /// Waits (at most `limit`) until no PUT is in flight.
    pub fn wait_in_flight(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.lock();
        while st.sealed.iter().any(|(_, s)| s.up == Up::InFlight) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            st = self.changed.wait_timeout(st, left).expect("staging lock").0;
        }
    }

    /// Holds a put back while [`MAX_SEALED`] packs wait in memory; a failed
    /// upload among them is retried (and its error returned) first.
    pub fn make_room<'a>(self: &'a Arc<Self>, mut st: MutexGuard<'a, Staging>) -> Result<(), StoreError> {
        while st.sealed.len() > MAX_SEALED {
            let failed = st.failed();
            if !failed.is_empty() {
                drop(st);
                self.wait_stored(&failed)?;
                st = self.lock();
                continue;
            }
            st = self.changed.wait(st).expect("staging lock");
        }
        Ok(())
    }
}
