//! The secondary's side of copying one snapshot: a push session of the
//! snapshot's own host, so every chunk the copy relies on is in the
//! session's touched set under the GC fence, exactly as a push's are
//! (see `crate::sessions`), and a commit with the push's checks.
//!
//! Possession: a chunk is recorded for the snapshot's host because the
//! primary served it for that host's snapshot (the primary's commit had
//! checked that the host proved it), and only with its bytes, which are
//! re-hashed here: the primary's word alone grants nothing. The one
//! exception is dedup across hosts: a chunk this job's remote delivered
//! before (for any host; `sync_chunks`, see
//! `crate::store::rocks::provenance`) is recorded for this host without a
//! transfer, after its stored blob is read and re-hashed
//! ([`Copy::classify`]). That remote has proven it knows the bytes, so its
//! claim costs nothing it could not send anyway. A chunk held here only
//! because another host pushed it directly, or another job brought it, is
//! fetched: a compromised primary cannot name a chunk it never had and so
//! hand it to a host whose restore token it holds here. (The bytes that
//! arrive are not stored twice: only the possession is new.) No host gets
//! a chunk its snapshot does not reference.

use bkp_common::names::{check_host, check_set_name};
use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};

use crate::commit::{check_tree, parent_refs, push_budget, CommitError};
use crate::sessions::{SessionError, Sessions};
use crate::store::{PutStats, Store, StoreError, VerifiedChunk};

/// A synced snapshot dated this far ahead of the secondary's clock is
/// refused: a primary stamps commits with its own "now".
const MAX_CLOCK_AHEAD_NS: u64 = 10 * 60 * 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The remote's data is refused: a bad chunk, a record that does not
    /// match its id, a tree the commit check refuses. Nothing of it is
    /// stored.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CommitError> for LocalError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Rejected(m) => LocalError::Refused(m),
            CommitError::Store(s) => LocalError::Store(s),
        }
    }
}

/// What the secondary needs for one chunk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The host already holds it here (or the session proved it).
    Held,
    /// Stored for another host and delivered by this remote before:
    /// recorded for this one without a transfer.
    Adopted,
    /// Not stored, or stored without proof that this remote knows it:
    /// fetch it from the primary.
    Fetch,
}

/// One snapshot's copy in progress.
pub struct Copy<'a> {
    store: &'a dyn Store,
    sessions: &'a Sessions,
    session: u64,
    host: String,
    /// The job's name: whose deliveries count as proof (`sync_chunks`).
    remote: String,
}

impl<'a> Copy<'a> {
    /// Starts the session for `snap`'s host and set for the sync job
    /// `remote` (named "sync:NAME" in the session table).
    pub fn begin(
        store: &'a dyn Store,
        sessions: &'a Sessions,
        remote: &str,
        snap: &Snapshot,
    ) -> Result<Self, LocalError> {
        check_host(&snap.host).map_err(|e| LocalError::Refused(format!("the remote's snapshot: {e}")))?;
        check_set_name(&snap.name).map_err(|e| LocalError::Refused(format!("the remote's snapshot: {e}")))?;
        let session = sessions.start_for(&format!("sync:{remote}"), &snap.host, &snap.name, snap.kind)?;
        let copy = Self { store, sessions, session, host: snap.host.clone(), remote: remote.to_string() };
        // The set's newest local snapshot proves its references for this
        // host, as a push's parent does: no lookups for them.
        let guard = sessions.enter(session, &copy.host)?;
        if guard.claim_parent() {
            if let Ok(ids) = parent_refs(store, &snap.host, &snap.name) {
                guard.touch(ids);
            }
        }
        Ok(copy)
    }

    /// For each id (unique), what is needed. Held and adopted ids are
    /// touched, so a GC spares them until the commit. Adopted: stored here
    /// and delivered by this remote before (see the module doc).
    pub fn classify(&self, ids: &[ChunkId]) -> Result<Vec<Need>, LocalError> {
        let guard = self.sessions.enter(self.session, &self.host)?;
        let mut out = vec![Need::Held; ids.len()];
        let unknown = guard.untouched_at(ids);
        let asked: Vec<ChunkId> = unknown.iter().map(|&i| ids[i]).collect();
        let have = self.store.host_has(&self.host, &asked)?;
        guard.touch(asked.iter().zip(&have).filter(|(_, h)| **h).map(|(id, _)| *id));
        let rest: Vec<usize> = unknown.iter().zip(&have).filter(|(_, h)| !**h).map(|(&i, _)| i).collect();
        if rest.is_empty() {
            return Ok(out);
        }
        let mut sorted: Vec<ChunkId> = rest.iter().map(|&i| ids[i]).collect();
        sorted.sort_unstable();
        let stored = self.store.stored_sorted(&sorted)?;
        let delivered = self.store.delivered_by(&self.remote, &sorted)?;
        let mut adopt = Vec::new();
        for &i in &rest {
            let pos = sorted.binary_search(&ids[i]).expect("sorted from these ids");
            out[i] = Need::Fetch;
            if stored[pos] && delivered[pos] {
                // Re-hashed on the way: a damaged local copy is fetched
                // instead (and verify will quarantine it).
                if let Some(v) = self.store.chunk_blob(&ids[i])?.and_then(|b| VerifiedChunk::verify(ids[i], b).ok()) {
                    adopt.push(v);
                    out[i] = Need::Adopted;
                }
            }
        }
        if !adopt.is_empty() {
            self.store.put_chunks(&self.host, &adopt)?;
            guard.touch(adopt.iter().map(|c| *c.id()));
        }
        Ok(out)
    }

    /// Verifies and stores fetched `(id, blob)` chunks for the host, and
    /// records that this remote delivered them. A blob that does not hash
    /// to its id refuses the whole batch before anything of it is written.
    pub fn put(&self, items: Vec<(ChunkId, Vec<u8>)>) -> Result<PutStats, LocalError> {
        let verified = items
            .into_iter()
            .map(|(id, b)| {
                VerifiedChunk::verify(id, b).map_err(|e| {
                    LocalError::Refused(format!(
                        "chunk {} from the remote failed its hash check ({e}); not stored. Run `bkp-server verify` \
                         on the remote: its copy is damaged",
                        id.short()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let guard = self.sessions.enter(self.session, &self.host)?;
        let stats = self.store.put_chunks(&self.host, &verified)?;
        let ids: Vec<ChunkId> = verified.iter().map(|c| *c.id()).collect();
        self.store.record_delivered(&self.remote, &ids)?;
        guard.touch(ids);
        Ok(stats)
    }

    /// Makes what was stored so far durable, so that a sync interrupted
    /// by a crash does not fetch it again.
    pub fn persist(&self) -> Result<(), LocalError> {
        Ok(self.store.persist_chunks()?)
    }

    /// Commits `snap` as it is, so its id is the primary's `id`: the
    /// record must hash to `id`, its tree pass the commit check (names, every
    /// reference held by the host here) with the counts the record claims,
    /// its time be no later than a few minutes from now, and the set's
    /// daily budget (`max_pushes_per_day`, counted at the snapshot's own
    /// time) hold.
    pub fn commit(
        self,
        snap: &Snapshot,
        id: &SnapshotId,
        incomplete: Option<bkp_common::snapshot::Incomplete>,
        max_per_day: u32,
        now_ns: u64,
    ) -> Result<SnapshotSummary, LocalError> {
        if SnapshotId::of(&snap.encode()) != *id {
            return Err(LocalError::Refused(format!(
                "the remote's snapshot {} does not hash to its id; is the remote the same bkp version?",
                id.short()
            )));
        }
        if snap.time_ns > now_ns.saturating_add(MAX_CLOCK_AHEAD_NS) {
            return Err(LocalError::Refused(format!(
                "snapshot {} is dated more than 10 minutes ahead of this server's clock; check both clocks",
                id.short()
            )));
        }
        let guard = self.sessions.enter(self.session, &self.host)?;
        let stats = check_tree(self.store, &self.host, snap.kind, &snap.tree, &mut &guard)?;
        if stats != snap.stats {
            return Err(LocalError::Refused(format!(
                "snapshot {}: its tree does not hold the files and sizes its record claims",
                id.short()
            )));
        }
        push_budget(self.store, max_per_day, &self.host, &snap.name, snap.time_ns)?;
        guard.still_live()?;
        let summary = self.store.commit_snapshot_with(snap, incomplete)?;
        guard.finish();
        Ok(summary)
    }
}

/// A copy given up (a refused chunk, a lost link) ends its session at
/// once: it would otherwise hold one of the host's session places until
/// its lease ran out. After a commit the session is gone already.
impl Drop for Copy<'_> {
    fn drop(&mut self) {
        if let Ok(guard) = self.sessions.enter(self.session, &self.host) {
            guard.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bkp_common::blob;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
    use bkp_common::tree::{ChunkRef, Entry, Meta, TreeEncoder};
    use bkp_common::ContentHash;

    use super::*;
    use crate::store::rocks::RocksStore;

    fn chunk(data: &[u8]) -> (ChunkId, Vec<u8>) {
        (ChunkId::of(data), blob::encode(data, 3))
    }

    /// A one-stream snapshot of `data` for `host`, with its tree chunk.
    fn snapshot(host: &str, data: &[u8], time_ns: u64) -> (Snapshot, (ChunkId, Vec<u8>)) {
        let mut enc = TreeEncoder::new();
        enc.push(&Entry::File { path: b"stdin".to_vec(), meta: Meta::default(), size: data.len() as u64 });
        enc.push(&Entry::Chunks(vec![ChunkRef { id: ChunkId::of(data), len: data.len() as u32 }]));
        enc.push(&Entry::FileEnd { hash: ContentHash::from(blake3::hash(data)) });
        let tree = chunk(&enc.take());
        let snap = Snapshot {
            host: host.into(),
            name: "db".into(),
            time_ns,
            kind: SnapshotKind::Stream,
            stats: SnapshotStats { files: 1, bytes: data.len() as u64, data_chunks: 1, ..Default::default() },
            tree: vec![tree.0],
            client: "bkp test".into(),
        };
        (snap, tree)
    }

    #[test]
    fn a_copy_adopts_only_what_its_remote_delivered_and_refuses_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(&dir.path().join("db"), 8 << 20).unwrap();
        let sessions = Sessions::new(Duration::from_secs(3600));
        let data = b"rows of a dump".to_vec();
        let (id, b) = chunk(&data);
        // hostc pushed it here directly: no remote has shown it knows it.
        store.put_chunks("hostc", &[VerifiedChunk::verify(id, b.clone()).unwrap()]).unwrap();
        let now = 1_000_000_000_000;
        let (snap, tree) = snapshot("hosta", &data, now);
        let sid = SnapshotId::of(&snap.encode());

        let copy = Copy::begin(&store, &sessions, "t", &snap).unwrap();
        assert_eq!(copy.classify(&[tree.0, id]).unwrap(), [Need::Fetch, Need::Fetch], "the primary's word is no proof");
        // A blob that is not what its id says is refused, and not stored.
        let e = copy.put(vec![(tree.0, blob::encode(b"something else", 3))]).unwrap_err();
        assert!(e.to_string().contains("failed its hash check"), "{e}");
        assert!(store.chunk_meta(&tree.0).unwrap().is_none());
        // The bytes came: possession, but the data is stored once.
        let put = copy.put(vec![tree.clone(), (id, b.clone())]).unwrap();
        assert_eq!(put.new_chunks, 1, "{put:?}");
        assert_eq!(store.delivered_by("t", &[tree.0, id]).unwrap(), [true, true]);
        assert_eq!(store.delivered_by("u", &[tree.0, id]).unwrap(), [false, false]);
        // A record that does not hash to the id it came with is refused.
        let mut other = snap.clone();
        other.client = "edited".into();
        let e = copy.commit(&other, &sid, None, 0, now).unwrap_err();
        assert!(e.to_string().contains("does not hash to its id"), "{e}");
        assert_eq!(sessions.live(), 0, "a copy given up ends its session");

        let copy = Copy::begin(&store, &sessions, "t", &snap).unwrap();
        assert_eq!(copy.classify(&[tree.0, id]).unwrap(), [Need::Held, Need::Held]);
        let e = Copy::begin(&store, &sessions, "t", &snap)
            .unwrap()
            .commit(&snap, &sid, None, 0, now - MAX_CLOCK_AHEAD_NS - 1)
            .unwrap_err();
        assert!(e.to_string().contains("ahead of this server's clock"), "{e}");
        let s = copy.commit(&snap, &sid, None, 0, now).unwrap();
        assert_eq!((s.id, s.host.as_str()), (sid, "hosta"));
        // hosta may read both chunks now; a host that holds neither may not.
        assert_eq!(store.host_holds("hosta", &[tree.0, id]).unwrap(), [true, true]);
        assert_eq!(store.host_holds("hostb", &[tree.0, id]).unwrap(), [false, false]);
        assert_eq!(sessions.live(), 0);

        // hostb's snapshot of the same data: what "t" delivered is adopted
        // without a transfer; another job must bring the bytes itself.
        let (snap_b, _) = snapshot("hostb", &data, now);
        let copy = Copy::begin(&store, &sessions, "t", &snap_b).unwrap();
        assert_eq!(copy.classify(&[tree.0, id]).unwrap(), [Need::Adopted, Need::Adopted]);
        assert_eq!(store.host_holds("hostb", &[tree.0, id]).unwrap(), [true, true]);
        drop(copy);
        let (snap_d, _) = snapshot("hostd", &data, now);
        let copy = Copy::begin(&store, &sessions, "u", &snap_d).unwrap();
        assert_eq!(copy.classify(&[tree.0, id]).unwrap(), [Need::Fetch, Need::Fetch]);
        drop(copy);
        // A GC's delete of a chunk takes its delivery record along.
        store.delete_chunks(&[id]).unwrap();
        assert_eq!(store.delivered_by("t", &[tree.0, id]).unwrap(), [true, false]);
    }

    #[test]
    fn a_tree_that_claims_other_counts_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(&dir.path().join("db"), 8 << 20).unwrap();
        let sessions = Sessions::new(Duration::from_secs(3600));
        let data = b"x".repeat(100);
        let (mut snap, tree) = snapshot("hosta", &data, 5);
        snap.stats.bytes += 1;
        let sid = SnapshotId::of(&snap.encode());
        let copy = Copy::begin(&store, &sessions, "t", &snap).unwrap();
        copy.put(vec![tree, chunk(&data)]).unwrap();
        let e = copy.commit(&snap, &sid, None, 0, 5).unwrap_err();
        assert!(e.to_string().contains("does not hold the files and sizes"), "{e}");
        assert!(store.list_snapshots(None, None).unwrap().is_empty());
    }
}
