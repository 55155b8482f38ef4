//! Garbage collection: mark every chunk a snapshot references, then
//! sweep the rest, while pushes go on.
//!
//! GC runs beside pushes, commits, prune, forget, restores and verify;
//! the crate doc's table ("Which operations may overlap") says what makes
//! each pair safe. A second GC is refused while one runs (`jobs`).
//!
//! Any error while marking cancels the run before anything is deleted, and
//! so does a referenced chunk the store no longer records (quarantined by
//! verify, or lost): the run fails, naming them, until a push has uploaded
//! them again. A
//! crash in the middle of a sweep leaves a store where every snapshot is
//! still whole (only unreferenced chunks were being removed); the next GC
//! finishes the work.
//!
//! # Cost
//! * Mark: one walk of every snapshot's tree, the mark set in memory up
//!   to `[gc] mark_memory_mb`, then in the `gc_mark` scratch column
//!   family ([`mark`]): memory stays bounded by configuration, and the
//!   result is the same.
//! * Sweep: one pass over `host_chunks` and one over `chunk_meta`
//!   (metadata only, no chunk data read).
//! * Reclaim ([`crate::store::ChunkStore::reclaim_space_with`]): the
//!   metadata column families are compacted; chunk data is rewritten only
//!   where more than `[gc] rewrite_garbage_percent` of it is garbage (the
//!   local backend's blob files; an object store's packs are repacked by
//!   `gc_packs` under its own threshold). A GC after forgetting 1% of a
//!   store therefore rewrites its metadata, not its data; the bytes it
//!   wrote are in the report (`bytes_rewritten`) and the metrics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bkp_common::ChunkId;
use serde::Deserialize;

use tracing::{error, info, warn};

use crate::commit::{walk_tree, CommitError};
pub use crate::report::GcReport;
use crate::sessions::Sessions;
use crate::store::{ReclaimOptions, Store, StoreError};

pub mod mark;

const SWEEP_BATCH: usize = 4096;

/// `[gc]` in the server config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Memory for the mark set, MiB (about 37 bytes per referenced chunk
    /// and per (host, chunk) pair); beyond it the set goes to disk.
    pub mark_memory_mb: usize,
    /// Chunk data files are rewritten (their live chunks moved, so the
    /// garbage leaves the disk) once more than this share of their bytes
    /// is garbage. 0 rewrites at every GC (every freed byte back at once,
    /// at the cost of rewriting the whole store).
    pub rewrite_garbage_percent: u8,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self { mark_memory_mb: 256, rewrite_garbage_percent: 25 }
    }
}

/// Missing chunks named in [`GcError::Missing`].
const MISSING_NAMED: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("garbage collection cancelled while marking snapshot {0}: {1}; nothing was deleted")]
    Mark(String, String),
    #[error(
        "garbage collection refused: {count} chunk(s) that snapshots reference are missing from the store ({}); \
         nothing was deleted. Run `bkp-server verify --full` to see which snapshots are damaged, then push \
         again from the hosts that have the data (the push uploads the missing chunks), then run gc",
        .named.join(", ")
    )]
    Missing { count: usize, named: Vec<String> },
    #[error("garbage collection failed while sweeping: {0}")]
    Sweep(#[from] StoreError),
    #[error(
        "garbage collection deleted {chunks} chunks but could not reclaim their disk space ({freed} bytes freed): \
         {reason}"
    )]
    Reclaim { chunks: u64, freed: u64, reason: String },
}

/// Test hooks: points where a test can act in the middle of a run.
#[derive(Default)]
pub struct GcHooks {
    /// After the snapshot list is read, before any tree is walked.
    pub after_listing: Option<Box<dyn Fn() + Send + Sync>>,
    /// After marking, before the first sweep batch.
    pub before_sweep: Option<Box<dyn Fn() + Send + Sync>>,
    /// A pause after each sweep batch (to kill a server mid-sweep).
    pub batch_delay: Option<Duration>,
    /// Smaller sweep batches.
    pub batch_size: Option<usize>,
}

impl GcHooks {
    /// Hooks a test sets through the environment of a server process.
    pub fn from_env() -> Self {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        GcHooks {
            batch_delay: num("BKP_TEST_GC_BATCH_DELAY_MS").map(Duration::from_millis),
            batch_size: num("BKP_TEST_GC_BATCH").map(|n| n.max(1) as usize),
            ..Default::default()
        }
    }
}

/// Ends the GC epoch however the run ends.
struct Epoch<'a>(&'a Sessions);
impl Drop for Epoch<'_> {
    fn drop(&mut self) {
        self.0.gc_end();
    }
}

/// One run with the default `[gc]` settings.
pub fn run(store: &dyn Store, sessions: &Sessions, hooks: &GcHooks) -> Result<GcReport, GcError> {
    run_with(store, sessions, &GcConfig::default(), hooks)
}

/// One run, on the calling (blocking) thread: sweep batches take the
/// write side of `sessions`' fence.
pub fn run_with(store: &dyn Store, sessions: &Sessions, cfg: &GcConfig, hooks: &GcHooks) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let mut report = GcReport { disk_bytes_before: store.disk_bytes()?, ..Default::default() };
    sessions.gc_begin();
    let epoch = Epoch(sessions);

    // Mark.
    let summaries = store.list_snapshots(None, None)?;
    if let Some(h) = &hooks.after_listing {
        h();
    }
    let mut hosts: HashMap<String, u32> = HashMap::new();
    let mut marked = mark::MarkSet::new(store, cfg.mark_memory_mb.saturating_mul(1 << 20))?;
    for s in &summaries {
        let mark_err = |e: String| GcError::Mark(s.id.short(), e);
        // Deleted since the listing: nothing of it needs keeping.
        let Some(snap) = store.snapshot(&s.id).map_err(|e| mark_err(e.to_string()))? else { continue };
        let next = hosts.len() as u32;
        let h = *hosts.entry(snap.host.clone()).or_insert(next);
        walk_tree(store, &snap.tree, &mut |ids| marked.insert(h, ids).map_err(CommitError::Store))
            .map_err(|e: CommitError| mark_err(e.to_string()))?;
        report.snapshots += 1;
    }
    marked.finish()?;
    report.mark_spilled = marked.spilled();
    report.referenced_chunks = check_referenced(store, &marked)?;
    // On a nearly full disk even deletes need room (the WAL, then the
    // compaction that frees the space): the reserve is there for this.
    // Released only now, so that a run refused above keeps it.
    report.reserve_released = store.release_reserve_if_short();
    if let Some(h) = &hooks.before_sweep {
        h();
    }
    let batch = hooks.batch_size.unwrap_or(SWEEP_BATCH);
    let pause = || {
        if let Some(d) = hooks.batch_delay {
            std::thread::sleep(d);
        }
    };

    // Sweep possession records first, then chunks, so that records rarely
    // outlive their chunk. They still can (a record spared by a session that
    // ended before the chunk sweep reached its chunk): `host_has` checks the
    // chunk too, and a read (`host_holds`, then the blob) finds it missing.
    let mut after = None;
    loop {
        let keys = store.host_chunks(after.as_ref(), batch)?;
        let Some(last) = keys.last().cloned() else { break };
        let candidates = unmarked_pairs(&marked, &hosts, keys)?;
        if !candidates.is_empty() {
            let n = sessions.sweep(|protected| {
                let doomed: Vec<_> = candidates.into_iter().filter(|(h, c)| !protected(c, Some(h))).collect();
                store.forget_possession(&doomed).map(|_| doomed.len())
            })?;
            report.possession_records_deleted += n as u64;
        }
        after = Some(last);
        pause();
    }
    // Chunks no snapshot references go; of those that stay, an owner none
    // of whose snapshots references the chunk loses its possession, as a
    // `host_chunks` record would above.
    let mut after: Option<ChunkId> = None;
    loop {
        let metas = store.chunk_metas(after.as_ref(), batch)?;
        let Some(last) = metas.last().map(|(id, _)| *id) else { break };
        let ids: Vec<ChunkId> = metas.iter().map(|(c, _)| *c).collect();
        let mut unreferenced = Vec::new();
        let mut owned = Vec::new();
        for ((c, m), is_marked) in metas.into_iter().zip(marked.has(&ids, true)?) {
            if !is_marked {
                unreferenced.push(c);
            } else if let Some(owner) = m.owner.and_then(|o| store.host_name(o)) {
                owned.push((owner, c));
            }
        }
        let disowned = unmarked_pairs(&marked, &hosts, owned)?;
        if !unreferenced.is_empty() || !disowned.is_empty() {
            let (n, freed, d) = sessions.sweep(|protected| {
                let doomed: Vec<_> = unreferenced.into_iter().filter(|c| !protected(c, None)).collect();
                let disowned: Vec<_> = disowned.into_iter().filter(|(h, c)| !protected(c, Some(h))).collect();
                store.forget_possession(&disowned)?;
                store.delete_chunks(&doomed).map(|freed| (doomed.len(), freed, disowned.len()))
            })?;
            report.chunks_deleted += n as u64;
            report.chunk_bytes_deleted += freed;
            report.possession_records_deleted += d as u64;
        }
        after = Some(last);
        pause();
    }
    // Chunk data no metadata records (a crash between a backend's data
    // write and its metadata batch): unreferenced by construction.
    let mut after: Option<ChunkId> = None;
    loop {
        let mut ids = store.orphan_candidates(after.as_ref(), batch)?;
        ids.sort_unstable();
        let Some(last) = ids.last().copied() else { break };
        let n = sessions.sweep(|protected| {
            let recorded = store.recorded_sorted(&ids)?;
            let doomed: Vec<ChunkId> =
                ids.iter().zip(recorded).filter(|(c, r)| !r && !protected(c, None)).map(|(c, _)| *c).collect();
            if !doomed.is_empty() {
                store.delete_chunks(&doomed)?;
            }
            Ok::<_, StoreError>(doomed.len())
        })?;
        report.chunks_deleted += n as u64;
        after = Some(last);
    }
    // Packs (an object store): dead ones deleted, sparse ones rewritten;
    // their location switches run under the fence.
    let fence = |f: &mut dyn FnMut() -> Result<(), StoreError>| sessions.sweep(|_| f());
    let packs = store.gc_packs(&fence)?;
    report.pack_objects_deleted = packs.objects_deleted;
    report.packs_repacked = packs.packs_repacked;
    report.pack_bytes_rewritten = packs.bytes_rewritten;
    drop(epoch);
    drop(marked);
    // Short of space (the reserve had to go): every freed byte back now.
    let garbage_ratio = if report.reserve_released > 0 { 0.0 } else { cfg.rewrite_garbage_percent as f64 / 100.0 };
    let reclaimed = store.reclaim_space_with(&ReclaimOptions { garbage_ratio });
    if let Ok(r) = &reclaimed {
        report.bytes_rewritten = r.bytes_rewritten;
        report.bytes_relocated = r.bytes_relocated;
        report.garbage_bytes_before = r.garbage_before;
        report.data_bytes_before = r.data_bytes_before;
    }
    store.gc_mark_clear()?;
    report.disk_bytes_after = store.disk_bytes()?;
    report.bytes_freed = report.disk_bytes_before.saturating_sub(report.disk_bytes_after);
    report.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = reclaimed {
        warn!(?report, "gc deleted chunks but did not reclaim their space: {e}");
        return Err(GcError::Reclaim {
            chunks: report.chunks_deleted,
            freed: report.bytes_freed,
            reason: e.to_string(),
        });
    }
    info!(?report, "gc finished");
    Ok(report)
}

/// The pairs among `pairs` (host name, chunk) that no snapshot of that
/// host references.
fn unmarked_pairs(
    marked: &mark::MarkSet<'_>,
    hosts: &HashMap<String, u32>,
    pairs: Vec<(String, ChunkId)>,
) -> Result<Vec<(String, ChunkId)>, StoreError> {
    let known: Vec<(u32, ChunkId)> = pairs.iter().filter_map(|(h, c)| hosts.get(h).map(|i| (*i, *c))).collect();
    let mut found = marked.has_pairs(&known)?.into_iter();
    Ok(pairs
        .into_iter()
        .filter(|(h, _)| {
            // A host with no snapshot references nothing.
            !hosts.contains_key(h) || !found.next().expect("one answer per known pair")
        })
        .collect())
}

/// Refuses a run while chunks that snapshots reference are not recorded
/// as stored: GC must not go on as if the store were whole (one sorted
/// pass over `chunk_meta`, no chunk data read). Returns how many chunks
/// are referenced.
fn check_referenced(store: &dyn Store, marked: &mark::MarkSet<'_>) -> Result<u64, GcError> {
    let mut missing: Vec<ChunkId> = Vec::new();
    let mut count = 0u64;
    let n = marked.sorted_batches::<GcError>(SWEEP_BATCH * 16, |ids| {
        let recorded = store.recorded_sorted(ids)?;
        for (id, r) in ids.iter().zip(recorded) {
            if !r {
                count += 1;
                if missing.len() < MISSING_NAMED {
                    missing.push(*id);
                }
            }
        }
        Ok(())
    })?;
    if count == 0 {
        return Ok(n);
    }
    let mut named: Vec<String> = missing.iter().map(|id| id.short()).collect();
    if count > MISSING_NAMED as u64 {
        named.push(format!("and {} more", count - MISSING_NAMED as u64));
    }
    error!(count, "gc refused: referenced chunks are missing: {}", named.join(", "));
    Err(GcError::Missing { count: count as usize, named })
}
