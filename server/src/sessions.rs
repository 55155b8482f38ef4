//! Live push sessions, their leases, and the fence between pushes and the
//! garbage collector's sweep.
//!
//! Every chunk a session is told is stored, uploads, or references at
//! commit goes into the session's `touched` set. A GC sweep deletes a
//! chunk only under the write side of `fence`, after checking that no
//! live session touched it; push operations run under the read side. So
//! for any chunk either the push saw it first (and the sweep spares it) or
//! the sweep deleted it first (and the push sees it missing and uploads
//! it again). No wall-clock grace window is involved.
//!
//! A session that is silent for longer than its lease is expired: it is
//! dropped (its chunks lose their protection) and every later request on
//! it, its commit included, fails with a clear error. A frozen client
//! therefore cannot commit a snapshot with holes.
//!
//! Snapshots committed while a GC runs were not seen by its mark phase;
//! their chunks are added to `gc_protect` until that GC ends.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bkp_common::snapshot::SnapshotKind;
use bkp_common::ChunkId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("unknown push session; start the push again")]
    Unknown,
    #[error("push session expired after {0}s without activity; nothing was committed, run the push again")]
    Expired(u64),
}

struct Session {
    host: String,
    name: String,
    kind: SnapshotKind,
    last_seen: Instant,
    touched: HashSet<ChunkId>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<u64, Session>,
    gc_protect: Option<HashSet<ChunkId>>,
}

pub struct Sessions {
    fence: RwLock<()>,
    inner: Mutex<Inner>,
    lease: Duration,
}

/// What a push operation learns about its session.
pub struct SessionInfo {
    pub host: String,
    pub name: String,
    pub kind: SnapshotKind,
}

/// Held while a push operation runs; the sweep waits for it.
pub struct PushGuard<'a> {
    _read: RwLockReadGuard<'a, ()>,
    sessions: &'a Sessions,
    id: u64,
    pub info: SessionInfo,
}

impl PushGuard<'_> {
    /// Records chunks this session relies on.
    pub fn touch(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut inner = self.sessions.inner.lock().expect("sessions lock");
        if let Some(s) = inner.map.get_mut(&self.id) {
            s.touched.extend(ids);
        }
    }

    /// The ids among `ids` this session has not touched.
    pub fn untouched(&self, ids: &[ChunkId]) -> Vec<ChunkId> {
        let inner = self.sessions.inner.lock().expect("sessions lock");
        match inner.map.get(&self.id) {
            Some(s) => ids.iter().filter(|id| !s.touched.contains(id)).copied().collect(),
            None => ids.to_vec(),
        }
    }

    /// Ends the session after its commit. A running GC keeps protecting
    /// what it touched, since its mark phase may not see the new snapshot.
    pub fn finish(self) {
        let mut inner = self.sessions.inner.lock().expect("sessions lock");
        if let Some(s) = inner.map.remove(&self.id) {
            if let Some(p) = inner.gc_protect.as_mut() {
                p.extend(s.touched);
            }
        }
    }
}

/// A session's touched set is what it proved: "stored" answers and
/// uploads (and ids a commit already checked).
impl crate::commit::CommitSession for &PushGuard<'_> {
    fn unproven(&self, ids: &[ChunkId]) -> Vec<ChunkId> {
        self.untouched(ids)
    }

    fn checked(&mut self, ids: &[ChunkId]) {
        self.touch(ids.iter().copied());
    }
}

impl Sessions {
    pub fn new(lease: Duration) -> Self {
        Self { fence: RwLock::new(()), inner: Mutex::new(Inner::default()), lease }
    }

    pub fn start(&self, host: &str, name: &str, kind: SnapshotKind) -> u64 {
        let mut inner = self.inner.lock().expect("sessions lock");
        let id = loop {
            let id = rand::random::<u64>();
            if !inner.map.contains_key(&id) {
                break id;
            }
        };
        let s = Session {
            host: host.to_string(),
            name: name.to_string(),
            kind,
            last_seen: Instant::now(),
            touched: HashSet::new(),
        };
        inner.map.insert(id, s);
        id
    }

    /// Enters a push operation of session `id` owned by `host`, renewing
    /// its lease. Blocks while a sweep batch runs.
    pub fn enter(&self, id: u64, host: &str) -> Result<PushGuard<'_>, SessionError> {
        let read = self.fence.read().expect("fence");
        let mut inner = self.inner.lock().expect("sessions lock");
        let s = match inner.map.get_mut(&id) {
            Some(s) if s.host == host => s,
            _ => return Err(SessionError::Unknown),
        };
        if s.last_seen.elapsed() > self.lease {
            inner.map.remove(&id);
            return Err(SessionError::Expired(self.lease.as_secs()));
        }
        s.last_seen = Instant::now();
        let info = SessionInfo { host: s.host.clone(), name: s.name.clone(), kind: s.kind };
        drop(inner);
        Ok(PushGuard { _read: read, sessions: self, id, info })
    }

    pub fn live(&self) -> usize {
        self.inner.lock().expect("sessions lock").map.len()
    }

    /// Starts a GC: drops expired sessions and starts collecting the
    /// chunks of snapshots committed from now on.
    pub fn gc_begin(&self) {
        let _w = self.fence.write().expect("fence");
        let mut inner = self.inner.lock().expect("sessions lock");
        self.reap(&mut inner);
        inner.gc_protect = Some(HashSet::new());
    }

    /// Drops sessions past their lease. Called only under the write fence:
    /// a session dropped then can never commit, so its chunks need no
    /// protection from that moment on.
    fn reap(&self, inner: &mut Inner) {
        inner.map.retain(|_, s| s.last_seen.elapsed() <= self.lease);
    }

    /// Runs `f` (which takes `id` out of service) with pushes fenced out,
    /// then forgets `id` in every session: a commit that relied on an
    /// earlier "stored" for it looks it up again and finds it gone.
    pub fn quarantine<T>(&self, id: &ChunkId, f: impl FnOnce() -> T) -> T {
        let _w = self.fence.write().expect("fence");
        let out = f();
        let mut inner = self.inner.lock().expect("sessions lock");
        for s in inner.map.values_mut() {
            s.touched.remove(id);
        }
        out
    }

    pub fn gc_end(&self) {
        self.inner.lock().expect("sessions lock").gc_protect = None;
    }

    /// Runs one sweep step with pushes fenced out. `f` gets a predicate:
    /// is this chunk (optionally: for this host) protected?
    pub fn sweep<T>(&self, f: impl FnOnce(&dyn Fn(&ChunkId, Option<&str>) -> bool) -> T) -> T {
        let _w = self.fence.write().expect("fence");
        let mut inner = self.inner.lock().expect("sessions lock");
        self.reap(&mut inner);
        let inner = &*inner;
        let protected = |c: &ChunkId, host: Option<&str>| {
            inner.gc_protect.as_ref().is_some_and(|p| p.contains(c))
                || inner.map.values().any(|s| host.is_none_or(|h| h == s.host) && s.touched.contains(c))
        };
        f(&protected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_and_ownership() {
        let s = Sessions::new(Duration::from_millis(50));
        let id = s.start("h", "n", SnapshotKind::Tree);
        assert_eq!(s.enter(id, "other").err(), Some(SessionError::Unknown));
        s.enter(id, "h").unwrap().touch([ChunkId::of(b"x")]);
        assert!(s.sweep(|p| p(&ChunkId::of(b"x"), Some("h")) && !p(&ChunkId::of(b"x"), Some("g"))));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!s.sweep(|p| p(&ChunkId::of(b"x"), None)), "expired sessions protect nothing");
        assert!(matches!(s.enter(id, "h"), Err(SessionError::Unknown)));
    }

    #[test]
    fn quarantine_unproves_a_chunk_in_every_session() {
        let s = Sessions::new(Duration::from_secs(60));
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let id = s.start("h", "n", SnapshotKind::Tree);
        s.enter(id, "h").unwrap().touch([a, b]);
        assert!(s.enter(id, "h").unwrap().untouched(&[a, b]).is_empty());
        assert_eq!(s.quarantine(&a, || 7), 7);
        assert_eq!(s.enter(id, "h").unwrap().untouched(&[a, b]), [a]);
    }

    #[test]
    fn committed_during_gc_stays_protected_until_gc_ends() {
        let s = Sessions::new(Duration::from_secs(60));
        let id = s.start("h", "n", SnapshotKind::Tree);
        s.gc_begin();
        let g = s.enter(id, "h").unwrap();
        g.touch([ChunkId::of(b"c")]);
        g.finish();
        assert!(s.sweep(|p| p(&ChunkId::of(b"c"), None)));
        s.gc_end();
        assert!(!s.sweep(|p| p(&ChunkId::of(b"c"), None)));
    }
}
