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
//! A session also starts out proving the references of its set's newest
//! snapshot (`claim_parent`, done by the first has-chunk query; see
//! `crate::commit::parent_refs`): that snapshot's commit checked them for
//! this host, and while it exists GC keeps them, so once touched they are
//! as safe to reuse as a "stored" answer. An incremental push of a large
//! tree then costs no store lookups for the chunks it reuses. The walk
//! runs under the fence's read side, like any push operation, so a sweep
//! batch waits for it (50-90 ms for the 78,000-file linux-source tree).
//!
//! A session that is silent for longer than its lease is expired: it is
//! dropped (its chunks lose their protection) and every later request on
//! it, its commit included, fails with a clear error. A frozen client
//! therefore cannot commit a snapshot with holes.
//!
//! Live sessions are limited in total and per host ([`Sessions::start_for`]):
//! at a host's limit its longest-silent session is dropped if it has been
//! silent for [`RECLAIM_AFTER`] (a client that died mid-push), otherwise
//! the start is refused. A revoked token's sessions end at once
//! ([`Sessions::end_token`]). Both drop sessions under the write fence,
//! like the lease reaper, so no push operation is half done on them.
//!
//! Snapshots committed while a GC runs were not seen by its mark phase;
//! their chunks are added to `gc_protect` until that GC ends.
//!
//! # Memory
//! The touched sets are bounded by `limits.touched_mb` for the whole
//! server: half for the exact sets (every session's, and `gc_protect`;
//! about 33 bytes per id, counted by their hash tables' capacity), half
//! for one Bloom filter shared by all sessions ([`bloom`]), allocated only
//! once the exact sets are full. An id that finds no room in the exact
//! sets goes into the filter. The sweep treats a filter hit as touched, so
//! the fence loses nothing: a filter never misses an id put in, and a
//! false hit only keeps a garbage chunk until the next GC. The proofs do
//! not trust the filter: `untouched` answers from the exact set alone, so
//! a has-chunk query or a commit looks an overflowed id up in the store
//! again (`host_has`), as it would for an id never touched. The filter is
//! dropped when the last session that used it ends (and no GC still
//! protects through it). So a push of any size costs the server at most
//! `limits.touched_mb` of touched ids; past the exact half it pays one
//! store lookup per overflowed id at commit instead of a memory hit.

mod bloom;

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
    #[error(
        "host {0} already has {1} push sessions in progress (limit limits.sessions_per_host); \
         let them finish, or retry in a minute if one of them stalled"
    )]
    HostBusy(String, usize),
    #[error("the server has {0} push sessions in progress (limit limits.sessions); try again later")]
    ServerBusy(usize),
    #[error("the token of this push was revoked; nothing was committed")]
    Revoked,
    /// Another host's session: the client is told what `Unknown` says
    /// (a guessed id learns nothing), the audit log gets the owner.
    #[error("unknown push session; start the push again")]
    OtherHost { owner: String },
}

/// A session silent this long may be dropped to make room for a new
/// session of the same host.
pub const RECLAIM_AFTER: Duration = Duration::from_secs(60);

struct Session {
    /// Id of the token that started it ("" when started without one).
    token: String,
    host: String,
    name: String,
    kind: SnapshotKind,
    last_seen: Instant,
    /// The exact part of what it touched (see the module doc).
    touched: HashSet<ChunkId>,
    /// Some of its touched ids went into the shared filter instead.
    overflowed: bool,
    /// Whether an operation has taken on proving the set's previous
    /// snapshot for this session (see [`PushGuard::claim_parent`]).
    parent_claimed: bool,
    /// Its token was revoked: it may not commit, even before
    /// [`Sessions::end_token`] (which waits for the fence) removes it.
    revoked: bool,
}

/// Bytes an exact touched id costs, per unit of a set's capacity: the id
/// and hashbrown's control byte, in a table of buckets 8/7 of its
/// capacity. Tables are counted by capacity, so this is what is allocated.
const ENTRY_BYTES: usize = (std::mem::size_of::<ChunkId>() + 1) * 8 / 7 + 1;

/// `limits.touched_mb` by default.
pub const DEFAULT_TOUCHED_MB: usize = 256;

struct Inner {
    map: HashMap<u64, Session>,
    gc_protect: Option<HashSet<ChunkId>>,
    /// Touched ids that found no room in the exact sets.
    overflow: Option<bloom::Bloom>,
    /// Live sessions with ids in `overflow`.
    overflow_users: usize,
    /// `gc_protect` relies on `overflow` too (a session that used it
    /// finished while the GC runs).
    gc_overflow: bool,
    /// Bytes the exact sets (sessions' and `gc_protect`) have allocated.
    exact_bytes: usize,
    /// What they may allocate; and the filter's size.
    exact_budget: usize,
    overflow_bytes: usize,
}

impl Default for Inner {
    fn default() -> Self {
        let budget = DEFAULT_TOUCHED_MB << 20;
        Self {
            map: HashMap::new(),
            gc_protect: None,
            overflow: None,
            overflow_users: 0,
            gc_overflow: false,
            exact_bytes: 0,
            exact_budget: budget / 2,
            overflow_bytes: budget / 2,
        }
    }
}

/// Adds `ids` to `set` while the exact budget allows; the rest go to the
/// filter. Returns whether any did.
fn add_bounded(
    set: &mut HashSet<ChunkId>,
    ids: impl IntoIterator<Item = ChunkId>,
    exact_bytes: &mut usize,
    exact_budget: usize,
    overflow: &mut Option<bloom::Bloom>,
    overflow_bytes: usize,
) -> bool {
    let mut overflowed = false;
    for id in ids {
        if set.len() == set.capacity() && !set.contains(&id) {
            let cap = set.capacity();
            let grow = cap.max(16);
            if *exact_bytes + grow * 2 * ENTRY_BYTES <= exact_budget {
                set.reserve(grow);
                *exact_bytes += (set.capacity() - cap) * ENTRY_BYTES;
            } else {
                overflow.get_or_insert_with(|| bloom::Bloom::new(overflow_bytes)).insert(&id);
                overflowed = true;
                continue;
            }
        }
        set.insert(id);
    }
    overflowed
}

impl Inner {
    /// Gives back what a session that left `map` held.
    fn release(&mut self, s: &Session) {
        self.exact_bytes = self.exact_bytes.saturating_sub(s.touched.capacity() * ENTRY_BYTES);
        if s.overflowed {
            self.overflow_users -= 1;
        }
        self.drop_unused_overflow();
    }

    fn drop_unused_overflow(&mut self) {
        if self.overflow_users == 0 && !self.gc_overflow {
            self.overflow = None;
        }
    }

    fn remove(&mut self, id: u64) -> Option<Session> {
        let s = self.map.remove(&id)?;
        self.release(&s);
        Some(s)
    }

    fn retain(&mut self, mut keep: impl FnMut(&Session) -> bool) {
        let gone: Vec<u64> = self.map.iter().filter(|(_, s)| !keep(s)).map(|(id, _)| *id).collect();
        for id in gone {
            self.remove(id);
        }
    }

    fn touch(&mut self, id: u64, ids: impl IntoIterator<Item = ChunkId>) {
        let Inner { map, overflow, overflow_users, exact_bytes, exact_budget, overflow_bytes, .. } = self;
        let Some(s) = map.get_mut(&id) else { return };
        if add_bounded(&mut s.touched, ids, exact_bytes, *exact_budget, overflow, *overflow_bytes) && !s.overflowed {
            s.overflowed = true;
            *overflow_users += 1;
        }
    }

    /// Is `c` touched by a live session (of `host`, if given), or
    /// protected for the running GC? Filter hits count.
    fn protects(&self, c: &ChunkId, host: Option<&str>) -> bool {
        self.gc_protect.as_ref().is_some_and(|p| p.contains(c))
            || self.overflow.as_ref().is_some_and(|o| o.may_contain(c))
            || self.map.values().any(|s| host.is_none_or(|h| h == s.host) && s.touched.contains(c))
    }
}

pub struct Sessions {
    fence: RwLock<()>,
    inner: Mutex<Inner>,
    lease: Duration,
    /// Live sessions allowed: in total, per host.
    max: (usize, usize),
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
        inner.touch(self.id, ids);
    }

    /// The ids among `ids` this session has not touched (or touched only
    /// through the shared filter, which proves nothing).
    pub fn untouched(&self, ids: &[ChunkId]) -> Vec<ChunkId> {
        self.untouched_at(ids).into_iter().map(|i| ids[i]).collect()
    }

    /// The positions in `ids` of the ids this session has not touched.
    pub fn untouched_at(&self, ids: &[ChunkId]) -> Vec<usize> {
        let inner = self.sessions.inner.lock().expect("sessions lock");
        match inner.map.get(&self.id) {
            Some(s) => (0..ids.len()).filter(|&i| !s.touched.contains(&ids[i])).collect(),
            None => (0..ids.len()).collect(),
        }
    }

    /// True exactly once per session: the caller then proves the
    /// references of the set's newest snapshot in bulk (`touch`), so that
    /// an incremental push's has-chunk queries and commit need no store
    /// lookup for them. Only the first caller does it; concurrent ones go
    /// on with lookups, which give the same answers.
    pub fn claim_parent(&self) -> bool {
        let mut inner = self.sessions.inner.lock().expect("sessions lock");
        match inner.map.get_mut(&self.id) {
            Some(s) if !s.parent_claimed => {
                s.parent_claimed = true;
                true
            }
            _ => false,
        }
    }

    /// Fails unless the session is still live and its token not revoked:
    /// checked right before a commit is written, since revocation marks
    /// sessions without waiting for the fence that this guard holds.
    pub fn still_live(&self) -> Result<(), SessionError> {
        let inner = self.sessions.inner.lock().expect("sessions lock");
        match inner.map.get(&self.id) {
            Some(s) if s.revoked => Err(SessionError::Revoked),
            Some(_) => Ok(()),
            None => Err(SessionError::Unknown),
        }
    }

    /// Ends the session after its commit. A running GC keeps protecting
    /// what it touched, since its mark phase may not see the new snapshot.
    pub fn finish(self) {
        let mut inner = self.sessions.inner.lock().expect("sessions lock");
        let inner = &mut *inner;
        let Some(s) = inner.map.remove(&self.id) else { return };
        if inner.gc_protect.is_some() && s.overflowed {
            inner.gc_overflow = true;
        }
        inner.release(&s);
        let Inner { gc_protect, overflow, exact_bytes, exact_budget, overflow_bytes, gc_overflow, .. } = inner;
        if let Some(p) = gc_protect.as_mut() {
            if add_bounded(p, s.touched, exact_bytes, *exact_budget, overflow, *overflow_bytes) {
                *gc_overflow = true;
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
        Self { fence: RwLock::new(()), inner: Mutex::new(Inner::default()), lease, max: (usize::MAX, usize::MAX) }
    }

    /// Bounds the touched ids of all sessions to about `bytes`
    /// (`limits.touched_mb`; see the module doc).
    pub fn with_touched_budget(self, bytes: usize) -> Self {
        {
            let mut inner = self.inner.lock().expect("sessions lock");
            inner.exact_budget = bytes / 2;
            inner.overflow_bytes = (bytes / 2).max(64);
        }
        self
    }

    /// Bytes the touched ids hold now: the exact sets and the filter.
    pub fn touched_bytes(&self) -> usize {
        let inner = self.inner.lock().expect("sessions lock");
        inner.exact_bytes + inner.overflow.as_ref().map_or(0, |o| o.bytes())
    }

    /// Limits live sessions to `total` and `per_host`.
    pub fn with_limits(mut self, total: usize, per_host: usize) -> Self {
        self.max = (total.max(1), per_host.max(1));
        self
    }

    /// Starts a session, not subject to the limits (tests, tools).
    pub fn start(&self, host: &str, name: &str, kind: SnapshotKind) -> u64 {
        let mut inner = self.inner.lock().expect("sessions lock");
        Self::insert(&mut inner, "", host, name, kind)
    }

    /// Starts a session for token `token` of `host` within the limits.
    /// Takes the write fence when it must drop sessions: call it off the
    /// async runtime.
    pub fn start_for(&self, token: &str, host: &str, name: &str, kind: SnapshotKind) -> Result<u64, SessionError> {
        let mut inner = self.inner.lock().expect("sessions lock");
        let of_host = inner.map.values().filter(|s| s.host == host).count();
        if of_host < self.max.1 && inner.map.len() < self.max.0 {
            return Ok(Self::insert(&mut inner, token, host, name, kind));
        }
        // Refused without the fence when nothing could be dropped: a
        // waiting writer stalls every push's `enter`, so a flood of starts
        // from a host at its limit must not queue on it.
        let expired = inner.map.values().any(|s| s.last_seen.elapsed() > self.lease);
        let stalled = inner.map.values().any(|s| s.host == host && s.last_seen.elapsed() >= RECLAIM_AFTER);
        if !expired && (of_host < self.max.1 || !stalled) {
            return Err(if of_host >= self.max.1 {
                SessionError::HostBusy(host.to_string(), of_host)
            } else {
                SessionError::ServerBusy(inner.map.len())
            });
        }
        drop(inner);
        let _w = self.fence.write().expect("fence");
        let mut inner = self.inner.lock().expect("sessions lock");
        self.reap(&mut inner);
        let of_host = inner.map.values().filter(|s| s.host == host).count();
        if of_host >= self.max.1 {
            let stale = inner
                .map
                .iter()
                .filter(|(_, s)| s.host == host && s.last_seen.elapsed() >= RECLAIM_AFTER)
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(id, _)| *id);
            match stale {
                Some(id) => {
                    inner.remove(id);
                }
                None => return Err(SessionError::HostBusy(host.to_string(), of_host)),
            }
        } else if inner.map.len() >= self.max.0 {
            return Err(SessionError::ServerBusy(inner.map.len()));
        }
        Ok(Self::insert(&mut inner, token, host, name, kind))
    }

    /// Ends every session started with token `token`, without a commit.
    /// Takes the write fence: call it off the async runtime.
    pub fn end_token(&self, token: &str) -> usize {
        {
            let mut inner = self.inner.lock().expect("sessions lock");
            inner.map.values_mut().filter(|s| s.token == token).for_each(|s| s.revoked = true);
        }
        let _w = self.fence.write().expect("fence");
        let mut inner = self.inner.lock().expect("sessions lock");
        let before = inner.map.len();
        inner.retain(|s| s.token != token);
        before - inner.map.len()
    }

    fn insert(inner: &mut Inner, token: &str, host: &str, name: &str, kind: SnapshotKind) -> u64 {
        let id = loop {
            let id = rand::random::<u64>();
            if !inner.map.contains_key(&id) {
                break id;
            }
        };
        let s = Session {
            token: token.to_string(),
            host: host.to_string(),
            name: name.to_string(),
            kind,
            last_seen: Instant::now(),
            touched: HashSet::new(),
            overflowed: false,
            parent_claimed: false,
            revoked: false,
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
            Some(s) => return Err(SessionError::OtherHost { owner: s.host.clone() }),
            None => return Err(SessionError::Unknown),
        };
        if s.last_seen.elapsed() > self.lease {
            inner.remove(id);
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
        inner.retain(|s| s.last_seen.elapsed() <= self.lease);
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
        let mut inner = self.inner.lock().expect("sessions lock");
        if let Some(p) = inner.gc_protect.take() {
            inner.exact_bytes = inner.exact_bytes.saturating_sub(p.capacity() * ENTRY_BYTES);
        }
        inner.gc_overflow = false;
        inner.drop_unused_overflow();
    }

    /// Runs one sweep step with pushes fenced out. `f` gets a predicate:
    /// is this chunk (optionally: for this host) protected?
    pub fn sweep<T>(&self, f: impl FnOnce(&dyn Fn(&ChunkId, Option<&str>) -> bool) -> T) -> T {
        let _w = self.fence.write().expect("fence");
        let mut inner = self.inner.lock().expect("sessions lock");
        self.reap(&mut inner);
        let inner = &*inner;
        f(&|c: &ChunkId, host: Option<&str>| inner.protects(c, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_then_reclaim_only_stalled_sessions() {
        let s = Sessions::new(Duration::from_secs(3600)).with_limits(3, 2);
        let a = s.start_for("t1", "h", "n", SnapshotKind::Tree).unwrap();
        s.start_for("t1", "h", "n", SnapshotKind::Tree).unwrap();
        let e = s.start_for("t1", "h", "n", SnapshotKind::Tree).unwrap_err();
        assert_eq!(e, SessionError::HostBusy("h".into(), 2));
        assert!(e.to_string().contains("sessions_per_host"), "{e}");
        s.start_for("t2", "g", "n", SnapshotKind::Tree).unwrap();
        assert_eq!(s.start_for("t3", "f", "n", SnapshotKind::Tree), Err(SessionError::ServerBusy(3)));
        // A session silent past RECLAIM_AFTER gives its place to its host.
        s.inner.lock().unwrap().map.get_mut(&a).unwrap().last_seen -= RECLAIM_AFTER;
        let c = s.start_for("t1", "h", "n", SnapshotKind::Tree).unwrap();
        assert!(s.enter(a, "h").is_err() && s.enter(c, "h").is_ok());
        assert_eq!(s.end_token("t1"), 2);
        assert_eq!(s.live(), 1);
    }

    #[test]
    fn a_full_host_is_refused_without_waiting_for_the_fence() {
        let s = Sessions::new(Duration::from_secs(3600)).with_limits(8, 1);
        let a = s.start_for("t", "h", "n", SnapshotKind::Tree).unwrap();
        // A push operation in progress holds the fence's read side; a start
        // that took the write side would block here forever.
        let _guard = s.enter(a, "h").unwrap();
        assert_eq!(s.start_for("t", "h", "n", SnapshotKind::Tree), Err(SessionError::HostBusy("h".into(), 1)));
    }

    #[test]
    fn a_revoked_session_may_not_commit_even_while_its_guard_is_held() {
        let s = Sessions::new(Duration::from_secs(3600));
        let id = s.start_for("t", "h", "n", SnapshotKind::Tree).unwrap();
        let guard = s.enter(id, "h").unwrap();
        assert_eq!(guard.still_live(), Ok(()));
        std::thread::scope(|sc| {
            // end_token marks at once, then waits for the guard to go.
            let ender = sc.spawn(|| s.end_token("t"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while guard.still_live() != Err(SessionError::Revoked) {
                assert!(Instant::now() < deadline, "revocation never reached the session");
                std::thread::yield_now();
            }
            drop(guard);
            assert_eq!(ender.join().unwrap(), 1);
        });
        assert_eq!(s.live(), 0);
    }

    #[test]
    fn lease_expiry_and_ownership() {
        let s = Sessions::new(Duration::from_millis(50));
        let id = s.start("h", "n", SnapshotKind::Tree);
        let e = s.enter(id, "other").err().unwrap();
        assert_eq!(e, SessionError::OtherHost { owner: "h".into() });
        assert_eq!(e.to_string(), SessionError::Unknown.to_string(), "the client cannot tell the two apart");
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
        assert_eq!(s.enter(id, "h").unwrap().untouched_at(&[b, a, b]), [1]);
    }

    #[test]
    fn parent_is_claimed_once_per_session() {
        let s = Sessions::new(Duration::from_secs(60));
        let (one, two) = (s.start("h", "n", SnapshotKind::Tree), s.start("h", "n", SnapshotKind::Tree));
        assert!(s.enter(one, "h").unwrap().claim_parent());
        assert!(!s.enter(one, "h").unwrap().claim_parent());
        assert!(s.enter(two, "h").unwrap().claim_parent(), "each session proves its own parent");
    }

    #[test]
    fn touched_ids_past_the_budget_still_fence_gc_but_prove_nothing() {
        let s = Sessions::new(Duration::from_secs(60)).with_touched_budget(64 << 10);
        let ids: Vec<ChunkId> = (0u32..20_000).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let a = s.start("h", "n", SnapshotKind::Tree);
        let b = s.start("g", "n", SnapshotKind::Tree);
        s.enter(a, "h").unwrap().touch(ids[..10_000].iter().copied());
        // Bounded: 32 KiB of exact sets at most, and a 32 KiB filter.
        assert!(s.touched_bytes() <= 64 << 10, "{}", s.touched_bytes());
        let exact = 10_000 - s.enter(a, "h").unwrap().untouched(&ids[..10_000]).len();
        assert!(exact > 100 && exact < 10_000, "some exact, the rest overflowed: {exact}");
        // The sweep spares every touched id, of any host (the filter is shared).
        assert!(s.sweep(|p| ids[..10_000].iter().all(|c| p(c, None) && p(c, Some("h")))));
        // Few others look touched; the sweep would keep those a GC longer.
        let spared = s.sweep(|p| ids[10_000..].iter().filter(|c| p(c, None)).count());
        assert!(spared < 10_000 / 4, "{spared}");
        // The other session proves nothing it did not touch itself.
        assert_eq!(s.enter(b, "g").unwrap().untouched(&ids[..10_000]).len(), 10_000);
        // Through a GC: what the finished session touched stays protected
        // until the GC ends, then the filter goes with it.
        s.gc_begin();
        s.enter(a, "h").unwrap().finish();
        assert!(s.sweep(|p| ids[..10_000].iter().all(|c| p(c, None))));
        s.gc_end();
        assert!(s.sweep(|p| ids[..10_000].iter().all(|c| !p(c, None))));
        assert_eq!(s.touched_bytes(), 0, "only b is left, and it touched nothing");
        s.enter(b, "g").unwrap().touch(ids[..10].iter().copied());
        assert!(s.enter(b, "g").unwrap().untouched(&ids[..10]).is_empty());
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
