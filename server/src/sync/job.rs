//! One run of a sync job: list the primary, copy each snapshot this
//! server lacks (oldest first), record what was copied.
//!
//! Per snapshot: its record, then its tree chunks (fetched when missing),
//! then the data chunks its tree names, in batches: each id is held here
//! already, adopted from another host's copy, or fetched. Stored data is
//! made durable every [`PERSIST_EVERY`] bytes, so a crash mid-snapshot
//! costs at most that much fetched again; the commit is the push's.
//!
//! Skipped: snapshots here already, snapshots this job copied before
//! (even if this server's retention removed them since), and snapshots
//! older than the newest copy of their set here. That last rule is what
//! keeps a compromised primary from pushing out good copies: a primary
//! stamps each commit with its own clock, so a real new snapshot is the
//! newest of its set; a forged one dated in the past, which the count
//! rules of retention would weigh against the real ones, is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use bkp_client::ClientError;
use bkp_common::snapshot::SnapshotSummary;
use bkp_common::tree::Entry;
use bkp_common::{ChunkId, SnapshotId};
use tracing::{info, warn};

use super::config::SyncJob;
use super::error::SyncError;
use super::local::{Copy, LocalError, Need};
use super::pull::Remote;
use super::state::{SetLag, SyncState};
pub use crate::report::{SyncFailure, SyncReport};
use crate::sessions::Sessions;
use crate::store::Store;
use crate::tree_read::TreeEntries;

/// Stored chunk data is made durable after about this much.
pub const PERSIST_EVERY: u64 = 32 << 20;
/// Data chunk ids looked up at once while walking a tree.
const CLASSIFY_BATCH: usize = 4096;
/// Fetched chunks verified and written together.
const PUT_BATCH: usize = 64;
const PUT_BATCH_BYTES: usize = 1 << 20;

/// What a run needs from the server.
pub struct Ctx<'a> {
    pub store: &'a dyn Store,
    pub sessions: &'a Sessions,
    /// `max_pushes_per_day` (0: none), applied to copies too.
    pub max_pushes_per_day: u32,
    pub now_ns: u64,
}

/// Why one snapshot's copy stopped.
enum CopyError {
    /// This snapshot only: the remote refused a request, or its data was
    /// refused here. The run goes on with the next.
    Snapshot(String),
    /// The run cannot go on (the link, this server's store).
    Run(SyncError),
}

impl From<ClientError> for CopyError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server(m, _) => CopyError::Snapshot(format!("the remote refused: {m}")),
            e => CopyError::Run(SyncError::Link(e)),
        }
    }
}

impl From<LocalError> for CopyError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Refused(m) => CopyError::Snapshot(m),
            LocalError::Session(s) => CopyError::Snapshot(s.to_string()),
            LocalError::Store(s) => CopyError::Run(SyncError::Store(s)),
        }
    }
}

impl From<crate::tree_read::TreeReadError> for CopyError {
    fn from(e: crate::tree_read::TreeReadError) -> Self {
        use crate::tree_read::TreeReadError as T;
        match e {
            T::Store(s) => CopyError::Run(SyncError::Store(s)),
            e => CopyError::Snapshot(format!("the remote's tree: {e}")),
        }
    }
}

/// Runs `job` once against `remote`. The report says what was done even
/// when the run stopped half-way (the error); so does the state record.
pub fn run(ctx: &Ctx<'_>, job: &SyncJob, remote: &Remote) -> (SyncReport, Result<(), SyncError>) {
    let mut report = SyncReport { remote: job.name.clone(), server: job.server.clone(), ..Default::default() };
    let r = run_into(ctx, job, remote, &mut report);
    (report, r)
}

fn run_into(ctx: &Ctx<'_>, job: &SyncJob, remote: &Remote, report: &mut SyncReport) -> Result<(), SyncError> {
    let started = Instant::now();
    let mut state = match SyncState::load(ctx.store, &job.name)? {
        Ok(s) => s,
        Err((fresh, why)) => {
            warn!(remote = %job.name, "sync state unreadable ({why}); starting afresh");
            fresh
        }
    };
    state.server = job.server.clone();
    state.last_run_ns = ctx.now_ns;
    let result = pass(ctx, job, remote, &mut state, report);
    report.seconds = started.elapsed().as_secs_f64();
    state.bytes_total += report.bytes_transferred;
    state.chunks_total += report.chunks_transferred;
    state.snapshots_total += report.snapshots_copied;
    if result.is_ok() && report.failures.is_empty() {
        state.last_ok_ns = ctx.now_ns;
    }
    state.save(ctx.store, &job.name)?;
    result
}

fn set_key(host: &str, name: &str) -> String {
    format!("{host}/{name}")
}

fn pass(
    ctx: &Ctx<'_>,
    job: &SyncJob,
    remote: &Remote,
    state: &mut SyncState,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let filters = job.filters().map_err(SyncError::Config)?;
    let listed = remote.list()?;
    let wanted: Vec<&SnapshotSummary> = listed.iter().filter(|s| filters.matches(&s.host, &s.name)).collect();
    report.snapshots_listed = wanted.len() as u64;
    let local = ctx.store.list_snapshots(None, None)?;
    let here: HashSet<SnapshotId> = local.iter().map(|s| s.id).collect();
    let mut newest: HashMap<String, u64> = HashMap::new();
    for s in &local {
        let n = newest.entry(set_key(&s.host, &s.name)).or_default();
        *n = (*n).max(s.time_ns);
    }
    let mut outcome = Ok(());
    for s in &wanted {
        let key = set_key(&s.host, &s.name);
        if here.contains(&s.id) || state.synced.contains_key(&s.id.to_hex()) {
            report.snapshots_skipped += 1;
            state.synced.entry(s.id.to_hex()).or_insert(ctx.now_ns);
            continue;
        }
        if newest.get(&key).is_some_and(|&n| s.time_ns < n) {
            report.snapshots_older += 1;
            warn!(remote = %job.name, id = %s.id.short(), set = %key, "not copied: older than the set's newest copy here");
            continue;
        }
        match copy_one(ctx, job, remote, s, report) {
            Ok(()) => {
                report.snapshots_copied += 1;
                state.synced.insert(s.id.to_hex(), ctx.now_ns);
                newest.insert(key, s.time_ns);
                info!(remote = %job.name, id = %s.id.short(), host = %s.host, name = %s.name, "snapshot copied");
            }
            Err(CopyError::Snapshot(error)) => {
                warn!(remote = %job.name, id = %s.id.short(), host = %s.host, name = %s.name, "not copied: {error}");
                report.snapshots_failed += 1;
                report.failures.push(SyncFailure {
                    id: s.id.to_hex(),
                    host: s.host.clone(),
                    name: s.name.clone(),
                    error,
                });
            }
            Err(CopyError::Run(e)) => {
                outcome = Err(e);
                break;
            }
        }
        // Saved as it goes: a run cut short keeps what it copied.
        state.save(ctx.store, &job.name)?;
    }
    if outcome.is_ok() {
        let on_remote: HashSet<String> = listed.iter().map(|s| s.id.to_hex()).collect();
        if job.remove_vanished {
            remove_vanished(ctx, job, state, &on_remote, report)?;
        }
        // Forget ids neither side has: nothing can list them again.
        state
            .synced
            .retain(|id, _| on_remote.contains(id) || id.parse::<SnapshotId>().is_ok_and(|i| here.contains(&i)));
    }
    state.sets = lags(&wanted, ctx.store.list_snapshots(None, None)?);
    outcome
}

/// Each selected set's newest time on the remote and here.
fn lags(wanted: &[&SnapshotSummary], local: Vec<SnapshotSummary>) -> BTreeMap<String, SetLag> {
    let mut sets: BTreeMap<String, SetLag> = BTreeMap::new();
    for s in wanted {
        let e = sets.entry(set_key(&s.host, &s.name)).or_default();
        e.remote_newest_ns = e.remote_newest_ns.max(s.time_ns);
    }
    for s in local {
        if let Some(e) = sets.get_mut(&set_key(&s.host, &s.name)) {
            e.local_newest_ns = e.local_newest_ns.max(s.time_ns);
        }
    }
    sets
}

fn remove_vanished(
    ctx: &Ctx<'_>,
    job: &SyncJob,
    state: &mut SyncState,
    on_remote: &HashSet<String>,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let gone: Vec<String> = state.synced.keys().filter(|id| !on_remote.contains(*id)).cloned().collect();
    for hex in gone {
        let Ok(id) = hex.parse::<SnapshotId>() else { continue };
        match ctx.store.delete_snapshot(&id) {
            Ok(true) => {
                report.snapshots_removed += 1;
                info!(remote = %job.name, id = %id.short(), "copy removed: the remote no longer has it");
            }
            Ok(false) => {}
            Err(crate::store::StoreError::Protected(_)) => continue,
            Err(e) => return Err(e.into()),
        }
        state.synced.remove(&hex);
    }
    Ok(())
}

/// Fetched chunks waiting to be stored, and what was stored since the
/// last persist.
struct Pending<'c, 'a> {
    copy: &'c Copy<'a>,
    items: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
    unpersisted: u64,
}

impl Pending<'_, '_> {
    fn add(&mut self, id: ChunkId, blob: Vec<u8>, report: &mut SyncReport) -> Result<(), CopyError> {
        report.chunks_transferred += 1;
        report.bytes_transferred += blob.len() as u64;
        self.bytes += blob.len();
        self.items.push((id, blob));
        if self.items.len() >= PUT_BATCH || self.bytes >= PUT_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CopyError> {
        if self.items.is_empty() {
            return Ok(());
        }
        self.copy.put(std::mem::take(&mut self.items))?;
        self.unpersisted += std::mem::take(&mut self.bytes) as u64;
        if self.unpersisted >= PERSIST_EVERY {
            self.copy.persist()?;
            info!(mib = self.unpersisted >> 20, "sync: fetched chunks made durable");
            self.unpersisted = 0;
        }
        Ok(())
    }
}

/// Fetches the ids marked [`Need::Fetch`] and stores them.
fn fetch_missing(
    remote: &Remote,
    pending: &mut Pending<'_, '_>,
    ids: &[ChunkId],
    needs: &[Need],
    report: &mut SyncReport,
) -> Result<(), CopyError> {
    let mut want = Vec::new();
    for (id, n) in ids.iter().zip(needs) {
        match n {
            Need::Fetch => want.push(*id),
            Need::Adopted => report.chunks_adopted += 1,
            Need::Held => {}
        }
    }
    remote.fetch(want, |id, blob| pending.add(id, blob, report))?;
    pending.flush()
}

fn copy_one(
    ctx: &Ctx<'_>,
    job: &SyncJob,
    remote: &Remote,
    s: &SnapshotSummary,
    report: &mut SyncReport,
) -> Result<(), CopyError> {
    let snap = remote.snapshot(s.id)?;
    if (snap.host.as_str(), snap.name.as_str()) != (s.host.as_str(), s.name.as_str()) {
        return Err(CopyError::Snapshot("the remote's record names another set than its listing".into()));
    }
    let copy = Copy::begin(ctx.store, ctx.sessions, &job.name, &snap)?;
    let mut pending = Pending { copy: &copy, items: Vec::new(), bytes: 0, unpersisted: 0 };
    let mut tree: Vec<ChunkId> = snap.tree.clone();
    tree.sort_unstable();
    tree.dedup();
    let needs = copy.classify(&tree)?;
    fetch_missing(remote, &mut pending, &tree, &needs, report)?;
    // The tree is here now: walk it for the data chunks.
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut batch: Vec<ChunkId> = Vec::new();
    for e in TreeEntries::new(ctx.store, &snap.tree) {
        if let Entry::Chunks(list) = e? {
            batch.extend(list.iter().map(|r| r.id).filter(|id| seen.insert(*id)));
        }
        if batch.len() >= CLASSIFY_BATCH {
            let needs = copy.classify(&batch)?;
            fetch_missing(remote, &mut pending, &batch, &needs, report)?;
            batch.clear();
        }
    }
    let needs = copy.classify(&batch)?;
    fetch_missing(remote, &mut pending, &batch, &needs, report)?;
    copy.commit(&snap, &s.id, s.incomplete.clone(), ctx.max_pushes_per_day, ctx.now_ns)?;
    Ok(())
}
