//! The records the jobs leave: a run's [`JobRecord`] and each kind's
//! report, typed. Below the store, which persists them
//! (`store::schema::encode_job`: versioned JSON) and hands them back
//! typed; `jobs`, `prune`, `gc` and `verify` fill them in and re-export
//! them. `cli` prints them by field, so renaming one fails to compile.

use bkp_common::{ChunkId, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::retention::{Policy, Verdict};
use crate::store::schema::Damage;

/// Declared in the order the scheduler runs kinds due at the same time:
/// prune first (its removals are what gc frees), verify last (it checks
/// what is left).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Prune,
    Gc,
    Verify,
    /// A `[[sync]]` job's pull; its report names the remote.
    Sync,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Prune => "prune",
            JobKind::Gc => "gc",
            JobKind::Verify => "verify",
            JobKind::Sync => "sync",
        }
    }
}

/// One run, as stored (framed by `store::schema::encode_job`) and as
/// `bkp-server jobs --json` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "StoredRecord")]
pub struct JobRecord {
    pub kind: JobKind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
    pub dry_run: bool,
    pub error: Option<String>,
    /// The job's own report (what was kept, removed, freed...); none when
    /// it could not run.
    pub figures: Option<Report>,
    /// Not run because a run of the same kind was in progress: not a
    /// failure (no alert), and not a run for the monitor's "latest run".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

/// A job's report. Serialized as the report alone, so `figures` in the
/// JSON is what it was before the reports were typed.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Report {
    Prune(PruneReport),
    Gc(GcReport),
    Verify(VerifyReport),
    Sync(SyncReport),
    /// Figures this build cannot read as its kind's report (a report
    /// shape of another version): kept, and shown, as they were.
    Other(serde_json::Value),
}

impl Report {
    /// Reads `figures` as `kind`'s report.
    fn read(kind: JobKind, figures: serde_json::Value) -> Self {
        let typed = match kind {
            JobKind::Prune => serde_json::from_value(figures.clone()).map(Report::Prune),
            JobKind::Gc => serde_json::from_value(figures.clone()).map(Report::Gc),
            JobKind::Verify => serde_json::from_value(figures.clone()).map(Report::Verify),
            JobKind::Sync => serde_json::from_value(figures.clone()).map(Report::Sync),
        };
        typed.unwrap_or(Report::Other(figures))
    }
}

impl JobRecord {
    pub fn sync_report(&self) -> Option<&SyncReport> {
        match &self.figures {
            Some(Report::Sync(v)) => Some(v),
            _ => None,
        }
    }

    pub fn gc_report(&self) -> Option<&GcReport> {
        match &self.figures {
            Some(Report::Gc(v)) => Some(v),
            _ => None,
        }
    }

    pub fn verify_report(&self) -> Option<&VerifyReport> {
        match &self.figures {
            Some(Report::Verify(v)) => Some(v),
            _ => None,
        }
    }
}

/// What a record's JSON holds, before its figures are typed by its kind.
#[derive(Deserialize)]
struct StoredRecord {
    kind: JobKind,
    start_ns: u64,
    end_ns: u64,
    ok: bool,
    dry_run: bool,
    error: Option<String>,
    figures: serde_json::Value,
    #[serde(default)]
    refused: bool,
}

impl From<StoredRecord> for JobRecord {
    fn from(r: StoredRecord) -> Self {
        let figures = (!r.figures.is_null()).then(|| Report::read(r.kind, r.figures));
        JobRecord {
            kind: r.kind,
            start_ns: r.start_ns,
            end_ns: r.end_ns,
            ok: r.ok,
            dry_run: r.dry_run,
            error: r.error,
            figures,
            refused: r.refused,
        }
    }
}

// ---- prune ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetPlan {
    pub host: String,
    pub name: String,
    pub policy: Policy,
    pub verdicts: Vec<Verdict>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub sets: u64,
    pub kept: u64,
    pub removed: u64,
    pub plan: Vec<SetPlan>,
}

// ---- gc ----

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct GcReport {
    pub snapshots: u64,
    pub referenced_chunks: u64,
    pub chunks_deleted: u64,
    pub possession_records_deleted: u64,
    /// Disk bytes really freed: `disk_bytes_before - disk_bytes_after`
    /// (zero when the store grew meanwhile, e.g. by a push).
    pub bytes_freed: u64,
    /// Stored bytes of the deleted chunks (what they took in the store).
    pub chunk_bytes_deleted: u64,
    /// Disk space reserve given back to let this run delete and compact.
    pub reserve_released: u64,
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
    pub seconds: f64,
    /// Object store: pack objects deleted (dead, retired by the previous
    /// run, orphans of a crash).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pack_objects_deleted: u64,
    /// Object store: packs whose live chunks were copied into new ones.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packs_repacked: u64,
    /// Object store: blob bytes those copies rewrote.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pack_bytes_rewritten: u64,
    /// Local store: bytes the reclaim step wrote (compactions, relocated
    /// chunks included): what this GC cost the disk besides its deletes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_rewritten: u64,
    /// Local store: live chunk bytes moved out of blob files with garbage
    /// (part of `bytes_rewritten`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_relocated: u64,
    /// Local store: garbage in the chunk files before the reclaim
    /// (estimated from `chunk_meta`), and the blob files' bytes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub garbage_bytes_before: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_bytes_before: u64,
    /// Marked ids written to the `gc_mark` scratch because the mark set
    /// outgrew `[gc] mark_memory_mb` (0: it stayed in memory).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mark_spilled: u64,
}

/// Figures of one backend stay out of the other's records, and zeros out
/// of all (records read as they did before the figures existed).
fn is_zero(v: &u64) -> bool {
    *v == 0
}

// ---- verify ----

/// What one run covers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The next scrub slice, and a drill sample with the configured share.
    Scheduled,
    /// Every chunk and every snapshot.
    Full,
    /// Only a drill, of the newest of each set plus `share` of the rest.
    Sample { share: f64 },
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ScrubReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Share of the store checked in the current cycle after this run.
    pub coverage: f64,
    pub cycle_completed: bool,
    /// Stopped by the time bound; the next run goes on from here.
    pub stopped_early: bool,
    /// Object store: packs read whole, and those missing from the bucket.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packs_checked: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packs_missing: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BadChunk {
    pub id: ChunkId,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Affected {
    pub id: SnapshotId,
    #[serde(flatten)]
    pub damage: Damage,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub scope: Option<Scope>,
    pub scrub: Option<ScrubReport>,
    pub snapshots_drilled: u64,
    pub files_checked: u64,
    pub bytes_restored: u64,
    /// Chunks found bad in this run (now quarantined).
    pub bad_chunks: Vec<BadChunk>,
    /// Snapshots that reference them, on every host.
    pub affected: Vec<Affected>,
    /// Damaged snapshots whose drill passed this time.
    pub healed: Vec<SnapshotId>,
    /// Snapshots still marked damaged after this run.
    pub damaged_total: u64,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.bad_chunks.is_empty() && self.affected.is_empty()
    }

    /// One line for logs, job listings and alerts.
    pub fn problem(&self) -> Option<String> {
        if self.clean() {
            return None;
        }
        let names: Vec<String> = self
            .affected
            .iter()
            .take(5)
            .map(|a| format!("{}/{} {}", a.damage.host, a.damage.name, a.id.short()))
            .collect();
        let more =
            if self.affected.len() > 5 { format!(" and {} more", self.affected.len() - 5) } else { String::new() };
        Some(format!(
            "verification found {} bad chunk(s), quarantined; {} snapshot(s) damaged: {}{more}; push those sets again to heal",
            self.bad_chunks.len(),
            self.affected.len(),
            names.join(", ")
        ))
    }
}

/// A snapshot that could not be copied, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFailure {
    pub id: String,
    pub host: String,
    pub name: String,
    pub error: String,
}

/// A sync run's figures (`bkp-server jobs`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    pub remote: String,
    pub server: String,
    /// Remote snapshots the job's filters select.
    pub snapshots_listed: u64,
    pub snapshots_copied: u64,
    /// Here already, or copied by an earlier run.
    pub snapshots_skipped: u64,
    /// Older than the newest copy of their set here: refused (see the
    /// module doc).
    pub snapshots_older: u64,
    pub snapshots_failed: u64,
    /// Copies deleted because the remote no longer has them
    /// (`remove_vanished`).
    pub snapshots_removed: u64,
    /// Chunks fetched from the remote, and their bytes as sent.
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
    /// Chunks held here for another host: recorded, not transferred.
    pub chunks_adopted: u64,
    pub failures: Vec<SyncFailure>,
    pub seconds: f64,
}

impl SyncReport {
    /// A run that copied what it could but not everything.
    pub fn problem(&self) -> Option<String> {
        let first = self.failures.first()?;
        Some(format!(
            "{} snapshot(s) not copied; {} {}/{}: {}",
            self.snapshots_failed,
            first.id.get(..8).unwrap_or(""),
            first.host,
            first.name,
            first.error
        ))
    }
}
