//! The verify job: proves that stored backups can be restored.
//!
//! * Scrub ([`scrub`]): re-read, decompress and re-hash stored chunks, a
//!   slice of the store per scheduled run, resuming where the last stopped.
//! * Restore drill ([`drill`]): rebuild the newest snapshot of every set,
//!   every snapshot still marked damaged, and a random share of the others,
//!   checking each file's whole-content hash.
//!
//! A chunk that fails either check is quarantined (moved aside, never
//! deleted), and every snapshot on every host that references it gets a
//! damage record naming the affected paths. Quarantined chunks are absent
//! to pushes, so the next push of the same data uploads them again; the
//! next drill of a damaged snapshot that passes clears its record.

pub mod damage;
pub mod drill;
pub mod scrub;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bkp_common::{ChunkId, SnapshotId};
use serde::Deserialize;
use tracing::{info, warn};

pub use crate::report::{Affected, BadChunk, Scope, VerifyReport};
use crate::sessions::Sessions;
use crate::store::{Store, StoreError};
use damage::Damage;

/// `[verify]` in the server config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Scheduled runs per full pass over the store (7 with a daily
    /// schedule: every chunk re-read each week).
    pub slices: u32,
    /// Share of older snapshots drilled per run, besides the newest of
    /// each set.
    pub drill_share: f64,
    /// Bound on a run's scrub; the next run goes on where it stopped.
    #[serde(with = "humantime_serde")]
    pub max_duration: Option<Duration>,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self { slices: 7, drill_share: 0.05, max_duration: None }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("verification could not run: {0}")]
pub struct VerifyError(#[from] StoreError);

/// Runs a verification now, on the calling (blocking) thread. A bad
/// chunk is quarantined under the write side of `sessions`' fence.
pub fn run(
    store: &dyn Store,
    sessions: &Sessions,
    cfg: &VerifyConfig,
    scope: Scope,
    now_ns: u64,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut report = VerifyReport { scope: Some(scope), ..Default::default() };
    let mut bad: Vec<BadChunk> = Vec::new();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    // Quarantine at once: a crash later in the run loses no finding.
    let mut found = |id: ChunkId, reason: String, store: &dyn Store| -> Result<(), StoreError> {
        if !seen.insert(id) {
            return Ok(());
        }
        warn!(chunk = %id.short(), %reason, "bad chunk quarantined");
        if store.chunk_meta(&id)?.is_some() || store.chunk_blob(&id)?.is_some() {
            sessions.quarantine(&id, || store.quarantine_chunk(&id, &reason, now_ns))?;
        }
        bad.push(BadChunk { id, reason });
        Ok(())
    };

    if !matches!(scope, Scope::Sample { .. }) {
        let deadline = cfg.max_duration.map(|d| started + d);
        let full = scope == Scope::Full;
        report.scrub =
            Some(scrub::run(store, cfg.slices, full, deadline, now_ns, &mut |id, why| found(id, why, store))?);
    }

    let summaries = store.list_snapshots(None, None)?;
    let damaged: HashSet<SnapshotId> = store.damaged()?.into_iter().map(|(id, _)| id).collect();
    let share = match scope {
        Scope::Scheduled => cfg.drill_share,
        Scope::Full => 1.0,
        Scope::Sample { share } => share,
    };
    let mut drill_failed: HashMap<SnapshotId, Vec<String>> = HashMap::new();
    for s in drill::sample(&summaries, share, &damaged, &mut rand::thread_rng()) {
        let Some(out) = drill::drill(store, &s.id)? else { continue };
        // Forgotten (and its chunks collected) while it was being read.
        if !out.clean() && store.snapshot(&s.id)?.is_none() {
            continue;
        }
        report.snapshots_drilled += 1;
        report.files_checked += out.files;
        report.bytes_restored += out.bytes;
        for (id, why) in out.bad_chunks.iter().cloned() {
            found(id, why, store)?;
        }
        if out.clean() {
            if damaged.contains(&s.id) {
                store.delete_damaged(&s.id)?;
                info!(snapshot = %s.id.short(), "damaged snapshot verified whole again");
                report.healed.push(s.id);
            }
        } else {
            drill_failed.insert(s.id, out.bad_paths);
        }
    }

    let bad_ids: HashSet<ChunkId> = bad.iter().map(|b| b.id).collect();
    for (s, d) in drill::find_affected(store, &bad_ids, now_ns)? {
        drill_failed.remove(&s.id);
        record_damage(store, &s.id, d.clone())?;
        report.affected.push(Affected { id: s.id, damage: d });
    }
    // A drill can fail without a bad chunk (a tree that no longer decodes).
    for (id, paths) in drill_failed {
        if let Some(s) = summaries.iter().find(|s| s.id == id) {
            let mut d = Damage::of(s, now_ns);
            paths.into_iter().for_each(|p| d.add_path(p));
            record_damage(store, &id, d.clone())?;
            report.affected.push(Affected { id, damage: d });
        }
    }
    report.bad_chunks = bad;
    report.damaged_total = store.damaged()?.len() as u64;
    report.seconds = started.elapsed().as_secs_f64();
    info!(chunks = report.bad_chunks.len(), snapshots = report.affected.len(), "verify finished");
    Ok(report)
}

/// Stores a damage record, keeping the first finding's time; skipped when
/// the snapshot was forgotten meanwhile.
fn record_damage(store: &dyn Store, id: &SnapshotId, mut d: Damage) -> Result<(), StoreError> {
    if store.snapshot(id)?.is_none() {
        return Ok(());
    }
    if let Some((_, old)) = store.damaged()?.into_iter().find(|(k, _)| k == id) {
        d.found_ns = old.found_ns.min(d.found_ns);
    }
    store.put_damaged(id, &d)
}
