//! Server jobs (prune, gc, verify, sync): one run of a kind at a time
//! (of a sync job: per remote), each run's
//! start, end, result and figures stored and listed by `bkp-server jobs`.
//! The cron schedules are run by `crate::schedule`.
//!
//! A run asked for while one of the same kind is going is *refused*: it
//! is recorded (so colliding schedules show in `jobs`) but it is not a
//! failure, since the run in progress does the work. A record the store
//! cannot take (a full disk) is kept in memory, listed as if stored, and
//! written at the next record or monitor check.
//!
//! Records are kept `[jobs] record_days` (90 by default): every record a
//! run writes also deletes those of runs started longer ago than that, so
//! the `jobs` column family stays bounded without a job of its own.

use std::str::FromStr;
use std::sync::Mutex;

use serde::Deserialize;
use tracing::{error, info};

use crate::audit::Audit;
pub use crate::clock::now_ns;
use crate::gc::{self, GcHooks};
use crate::prune::{prune, prune_plan, RetentionConfig};
pub use crate::report::{JobKind, JobRecord, Report, SyncReport};
use crate::sessions::Sessions;
use crate::store::{MetaStore, Store, StoreError};
use crate::verify::{self, Scope, VerifyConfig};

/// `[jobs]` in the server config: 5-field cron schedules, in UTC, and
/// how long run records are kept.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    pub prune: Option<String>,
    pub gc: Option<String>,
    pub verify: Option<String>,
    /// Days a run's record is kept (0: forever).
    pub record_days: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self { prune: None, gc: None, verify: None, record_days: DEFAULT_RECORD_DAYS }
    }
}

pub const DEFAULT_RECORD_DAYS: u32 = 90;

impl JobsConfig {
    pub fn schedules(&self) -> [(JobKind, &Option<String>); 3] {
        [(JobKind::Prune, &self.prune), (JobKind::Gc, &self.gc), (JobKind::Verify, &self.verify)]
    }
}

/// A `[jobs]` schedule the server refuses; fix it in the config file (a
/// retry cannot help).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("schedule {0:?} must have 5 fields (minute hour day month weekday)")]
    Fields(String),
    #[error("schedule {0:?}: write weekdays as names (MON-FRI, SUN), not numbers")]
    WeekdayNumber(String),
    #[error("schedule {0:?}: {1}")]
    Cron(String, String),
}

/// Job records could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not decode: written by a newer bkp-server, or
    /// damaged. The text names the record ("job record: ...").
    #[error("{0}; list fewer with `--limit`, or upgrade bkp-server if a newer one wrote it")]
    Record(String),
}

impl JobsError {
    /// A database error may pass (a full disk, a busy compaction); an
    /// undecodable record stays.
    pub fn retryable(&self) -> bool {
        matches!(self, JobsError::Store(StoreError::Db(_) | StoreError::Full(_) | StoreError::Bucket { .. }))
    }
}

pub fn parse_schedule(expr: &str) -> Result<cron::Schedule, ScheduleError> {
    // The cron crate wants seconds first; operators write five fields.
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(ScheduleError::Fields(expr.to_string()));
    }
    // The cron crate numbers weekdays 1 = Sunday, crontab 0 = Sunday: names
    // mean the same in both, numbers would silently shift a day.
    if expr.split_whitespace().nth(4).is_some_and(|w| w.chars().any(|c| c.is_ascii_digit())) {
        return Err(ScheduleError::WeekdayNumber(expr.to_string()));
    }
    cron::Schedule::from_str(&format!("0 {expr}")).map_err(|e| ScheduleError::Cron(expr.to_string(), e.to_string()))
}

/// Records kept in memory while the store refuses them, at most this many
/// (the oldest go first, with an error in the log).
const MAX_UNWRITTEN: usize = 1000;

/// Guards against two runs of the same kind, and holds the records not
/// yet written.
#[derive(Default)]
pub struct Running {
    prune: Mutex<()>,
    gc: Mutex<()>,
    verify: Mutex<()>,
    /// Names of the sync jobs running now.
    sync: Mutex<std::collections::HashSet<String>>,
    unwritten: Mutex<Vec<JobRecord>>,
}

/// What a job run needs: the store, the sessions (GC's fence, verify's
/// quarantine), the guards and unwritten records, the audit log, and the
/// jobs' own configuration.
pub struct Jobs<'a> {
    pub store: &'a dyn Store,
    pub sessions: &'a Sessions,
    pub running: &'a Running,
    pub audit: &'a Audit,
    pub retention: &'a RetentionConfig,
    pub verify: &'a VerifyConfig,
    /// `[[sync]]` jobs, and the push budget their copies obey.
    pub sync: &'a [crate::sync::SyncJob],
    pub max_pushes_per_day: u32,
    /// `[gc]`: the mark set's memory, when data files are rewritten.
    pub gc: &'a crate::gc::GcConfig,
    /// `[jobs] record_days`.
    pub record_days: u32,
    /// Who started the run, for its audit line (`crate::audit::Line::by`).
    pub by: &'a str,
}

/// Runs a job now, on the calling (blocking) thread, and records it.
/// A verify run covers the scheduled slice; see [`run_verify`].
pub fn run(jobs: &Jobs<'_>, kind: JobKind, dry_run: bool, hooks: &GcHooks) -> JobRecord {
    if kind == JobKind::Verify {
        return run_verify(jobs, Scope::Scheduled);
    }
    if kind == JobKind::Sync {
        return refuse(
            jobs,
            kind,
            dry_run,
            "a sync job runs by its name: `bkp-server sync --remote NAME`".into(),
            false,
        );
    }
    run_with(jobs, kind, dry_run, |start_ns| match kind {
        JobKind::Prune => prune_plan(jobs.store, jobs.retention, start_ns)
            .and_then(|plan| prune(jobs.store, plan, dry_run))
            .map(|r| (Report::Prune(r), None))
            .map_err(|e| e.to_string()),
        JobKind::Gc => gc::run_with(jobs.store, jobs.sessions, jobs.gc, hooks)
            .map(|r| (Report::Gc(r), None))
            .map_err(|e| e.to_string()),
        JobKind::Verify | JobKind::Sync => unreachable!("handled above"),
    })
}

/// Runs the `[[sync]]` job `remote` once and records it; network I/O on
/// `rt`. One run per remote at a time; a second is refused like a
/// second GC.
pub fn run_sync(jobs: &Jobs<'_>, remote: &str, rt: tokio::runtime::Handle) -> JobRecord {
    let start_ns = now_ns();
    if !jobs.running.sync.lock().expect("sync lock").insert(remote.to_string()) {
        info!(job = "sync", remote, "not started: a run of this job is in progress");
        let msg = format!("a sync run of {remote} is already in progress; try again when it ends");
        return refuse(jobs, JobKind::Sync, false, msg, true);
    }
    info!(job = "sync", remote, "job started");
    let ctx = crate::sync::Ctx {
        store: jobs.store,
        sessions: jobs.sessions,
        max_pushes_per_day: jobs.max_pushes_per_day,
        now_ns: start_ns,
    };
    let (report, outcome) = crate::sync::run_named(&ctx, jobs.sync, remote, rt);
    jobs.running.sync.lock().expect("sync lock").remove(remote);
    let error = match (&outcome, &report) {
        (Err(e), _) => Some(e.to_string()),
        (Ok(()), Some(r)) => r.problem(),
        (Ok(()), None) => None,
    };
    // A run that never connected still names its job: the scheduler
    // finds each job's newest run by it (`crate::schedule::sync_missed`).
    let report = report.unwrap_or_else(|| SyncReport { remote: remote.to_string(), ..Default::default() });
    finish(jobs, JobKind::Sync, start_ns, false, Some(Report::Sync(report)), error)
}

/// Records a run that did not start (`refused`: one of its kind is in
/// progress, which is no failure).
fn refuse(jobs: &Jobs<'_>, kind: JobKind, dry_run: bool, msg: String, refused: bool) -> JobRecord {
    let start_ns = now_ns();
    let rec =
        JobRecord { kind, start_ns, end_ns: start_ns, ok: false, dry_run, error: Some(msg), figures: None, refused };
    record(jobs.store, jobs.running, &rec);
    trim(jobs, rec.start_ns);
    audit(jobs.audit, jobs.by, &rec);
    rec
}

/// Deletes the records of runs started more than `record_days` before
/// `now_ns`. A failure only leaves them for the next run.
fn trim(jobs: &Jobs<'_>, now_ns: u64) {
    if let Some(before) = trim_before(now_ns, jobs.record_days) {
        match jobs.store.trim_jobs(before) {
            Ok(0) => {}
            Ok(n) => info!(records = n, days = jobs.record_days, "old job records removed"),
            Err(e) => error!("removing job records older than {} days: {e}", jobs.record_days),
        }
    }
}

/// Where trimming stops: records that started before this go.
fn trim_before(now_ns: u64, record_days: u32) -> Option<u64> {
    let age = (record_days as u64).checked_mul(86_400 * 1_000_000_000)?;
    (record_days > 0).then(|| now_ns.saturating_sub(age))
}

fn finish(
    jobs: &Jobs<'_>,
    kind: JobKind,
    start_ns: u64,
    dry_run: bool,
    figures: Option<Report>,
    error: Option<String>,
) -> JobRecord {
    let rec =
        JobRecord { kind, start_ns, end_ns: now_ns(), ok: error.is_none(), dry_run, error, figures, refused: false };
    record(jobs.store, jobs.running, &rec);
    trim(jobs, rec.start_ns);
    audit(jobs.audit, jobs.by, &rec);
    match &rec.error {
        None => info!(job = kind.as_str(), "job finished"),
        Some(e) => error!(job = kind.as_str(), "job failed: {e}"),
    }
    rec
}

/// Runs a verification. Damage found makes the record failed, with the
/// report kept as its figures (so a failed record with figures means
/// "found damage", without figures "could not run").
pub fn run_verify(jobs: &Jobs<'_>, scope: Scope) -> JobRecord {
    run_with(jobs, JobKind::Verify, false, |start_ns| {
        verify::run(jobs.store, jobs.sessions, jobs.verify, scope, start_ns)
            .map(|r| {
                let problem = r.problem();
                (Report::Verify(r), problem)
            })
            .map_err(|e| e.to_string())
    })
}

/// What a job body returns: its figures and, when it ran but found a
/// problem, that problem; or why it could not run.
type Outcome = Result<(Report, Option<String>), String>;

fn run_with(jobs: &Jobs<'_>, kind: JobKind, dry_run: bool, body: impl FnOnce(u64) -> Outcome) -> JobRecord {
    let lock = match kind {
        JobKind::Prune => &jobs.running.prune,
        JobKind::Gc => &jobs.running.gc,
        JobKind::Verify => &jobs.running.verify,
        JobKind::Sync => unreachable!("sync runs through run_sync"),
    };
    let start_ns = now_ns();
    let refuse = |msg: String, refused: bool| {
        let rec = JobRecord {
            kind,
            start_ns,
            end_ns: start_ns,
            ok: false,
            dry_run,
            error: Some(msg),
            figures: None,
            refused,
        };
        record(jobs.store, jobs.running, &rec);
        trim(jobs, rec.start_ns);
        audit(jobs.audit, jobs.by, &rec);
        rec
    };
    if kind != JobKind::Prune && dry_run {
        return refuse(
            format!(
                "{} has no dry run; `bkp-server prune --dry-run` previews what a prune would remove",
                kind.as_str()
            ),
            false,
        );
    }
    let Ok(_guard) = lock.try_lock() else {
        // Recorded, so a schedule that keeps colliding shows in `jobs`.
        info!(job = kind.as_str(), "not started: a run of this kind is in progress");
        return refuse(format!("a {} run is already in progress; try again when it ends", kind.as_str()), true);
    };
    info!(job = kind.as_str(), dry_run, "job started");
    let (figures, error) = match body(start_ns) {
        Ok((figures, problem)) => (Some(figures), problem),
        Err(e) => (None, Some(e)),
    };
    finish(jobs, kind, start_ns, dry_run, figures, error)
}

/// One audit line per run, dry runs and refused runs included.
fn audit(log: &Audit, by: &str, rec: &JobRecord) {
    use crate::audit::{Event, Line};
    let event = match rec.kind {
        JobKind::Prune => Event::Prune,
        JobKind::Gc => Event::Gc,
        JobKind::Verify => Event::Verify,
        JobKind::Sync => Event::Sync,
    };
    let result = match (rec.ok, rec.refused) {
        (_, true) => "refused",
        (true, _) => "ok",
        _ => "failed",
    };
    let mut line = Line::new(event, result).by(by);
    let dry = if rec.dry_run { "dry run" } else { "" };
    line = match &rec.error {
        Some(e) if dry.is_empty() => line.detail(e.clone()),
        Some(e) => line.detail(format!("{dry}: {e}")),
        None if !dry.is_empty() => line.detail(dry),
        None => line,
    };
    log.record(line);
}

/// Stores a run's record; dry runs change nothing and are not kept.
pub(crate) fn record(store: &dyn MetaStore, running: &Running, rec: &JobRecord) {
    if rec.dry_run {
        return;
    }
    let mut q = running.unwritten.lock().expect("unwritten lock");
    q.push(rec.clone());
    if q.len() > MAX_UNWRITTEN {
        let lost = q.remove(0);
        error!(job = lost.kind.as_str(), start_ns = lost.start_ns, "job record dropped: the store refuses records");
    }
    write_unwritten(&mut q, |r| put(store, r));
}

fn put(store: &dyn MetaStore, rec: &JobRecord) -> Result<(), StoreError> {
    store.put_job(rec)
}

/// Writes queued records, oldest first, until one fails.
fn write_unwritten(q: &mut Vec<JobRecord>, mut put: impl FnMut(&JobRecord) -> Result<(), StoreError>) {
    while let Some(rec) = q.first() {
        match put(rec) {
            Ok(()) => {
                q.remove(0);
            }
            Err(e) => {
                error!("recording job: {e}; {} record(s) kept in memory until the store takes them", q.len());
                return;
            }
        }
    }
}

/// Retries the records the store refused (the monitor calls this).
pub fn flush_unwritten(store: &dyn MetaStore, running: &Running) {
    let mut q = running.unwritten.lock().expect("unwritten lock");
    if !q.is_empty() {
        write_unwritten(&mut q, |r| put(store, r));
    }
}

/// The newest `limit` job records, those not yet written included.
pub fn list(store: &dyn MetaStore, running: &Running, limit: usize) -> Result<Vec<JobRecord>, JobsError> {
    // Held across the read, so a record being written is seen once.
    let unwritten = running.unwritten.lock().expect("unwritten lock");
    let mut out = store.jobs(limit).map_err(|e| match e {
        StoreError::Corrupt(what) => JobsError::Record(what),
        e => JobsError::Store(e),
    })?;
    out.extend(unwritten.iter().cloned());
    drop(unwritten);
    out.sort_by(|a, b| b.start_ns.cmp(&a.start_ns).then(b.kind.cmp(&a.kind)));
    out.dedup_by(|a, b| a.start_ns == b.start_ns && a.kind == b.kind);
    out.truncate(limit);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::PruneReport;
    use crate::store::schema;

    #[test]
    fn schedules() {
        let s = parse_schedule("0 4 * * *").unwrap();
        let from = chrono::DateTime::parse_from_rfc3339("2026-11-23T05:00:00Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(s.after(&from).next().unwrap().to_rfc3339(), "2026-11-24T04:00:00+00:00");
        assert_eq!(parse_schedule("0 4 * *").unwrap_err(), ScheduleError::Fields("0 4 * *".into()));
        assert!(matches!(parse_schedule("99 4 * * *"), Err(ScheduleError::Cron(..))));
        let e = parse_schedule("0 4 * * 1").unwrap_err();
        assert_eq!(e.to_string(), "schedule \"0 4 * * 1\": write weekdays as names (MON-FRI, SUN), not numbers");
        let mon = parse_schedule("0 4 * * MON").unwrap();
        assert_eq!(mon.after(&from).next().unwrap().to_rfc3339(), "2026-11-30T04:00:00+00:00");
    }

    fn rec(start_ns: u64) -> JobRecord {
        JobRecord {
            kind: JobKind::Gc,
            start_ns,
            end_ns: start_ns,
            ok: true,
            dry_run: false,
            error: None,
            figures: None,
            refused: false,
        }
    }

    #[test]
    fn trimming_keeps_the_configured_days() {
        const DAY: u64 = 86_400 * 1_000_000_000;
        assert_eq!(trim_before(100 * DAY, 90), Some(10 * DAY));
        assert_eq!(trim_before(100 * DAY, 0), None, "0 keeps records forever");
        assert_eq!(trim_before(DAY, 90), Some(0), "a clock near the epoch trims nothing");
        assert_eq!(trim_before(u64::MAX, 1000), Some(u64::MAX - 1000 * DAY));
        assert_eq!(trim_before(u64::MAX, u32::MAX), None, "an age past u64 keeps everything");
        assert_eq!(JobsConfig::default().record_days, DEFAULT_RECORD_DAYS);
    }

    #[test]
    fn unwritten_records_wait_for_the_store() {
        let mut q = vec![rec(1), rec(2)];
        let mut stored = Vec::new();
        // Disk full: nothing is lost, order is kept.
        write_unwritten(&mut q, |_| Err(StoreError::Full(0)));
        assert_eq!(q.len(), 2);
        let mut room = 1;
        write_unwritten(&mut q, |r| {
            if room == 0 {
                return Err(StoreError::Full(0));
            }
            room -= 1;
            stored.push(r.start_ns);
            Ok(())
        });
        assert_eq!((stored.clone(), q.len()), (vec![1], 1));
        write_unwritten(&mut q, |r| {
            stored.push(r.start_ns);
            Ok(())
        });
        assert_eq!((stored, q.len()), (vec![1, 2], 0));
    }

    #[test]
    fn refused_flag_is_optional_in_stored_records() {
        // Records written before the flag existed still read.
        let old = r#"{"kind":"gc","start_ns":5,"end_ns":6,"ok":true,"dry_run":false,"error":null,"figures":null}"#;
        let r: JobRecord = serde_json::from_str(old).unwrap();
        assert!(!r.refused);
        assert!(!serde_json::to_string(&r).unwrap().contains("refused"));
        let r = JobRecord { refused: true, ..r };
        assert!(serde_json::to_string(&r).unwrap().contains("\"refused\":true"));
    }

    #[test]
    fn records_read_by_kind_and_keep_their_json() {
        // A gc record as builds before the version byte stored it.
        let v1 = br#"{"kind":"gc","start_ns":5,"end_ns":6,"ok":true,"dry_run":false,"error":null,"figures":{"snapshots":1,"referenced_chunks":2,"chunks_deleted":3,"possession_records_deleted":0,"bytes_freed":10,"chunk_bytes_deleted":9,"reserve_released":0,"disk_bytes_before":100,"disk_bytes_after":90,"seconds":0.5}}"#;
        let r: JobRecord = schema::decode_job(v1).unwrap();
        let Some(Report::Gc(g)) = &r.figures else { panic!("{r:?}") };
        assert_eq!((g.chunks_deleted, g.disk_bytes_after), (3, 90));
        // Stored again, it is framed, and its JSON is what it was.
        let e = schema::encode_job(&r);
        assert_eq!(e[0], 2);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&e[1..]).unwrap(),
            serde_json::from_slice::<serde_json::Value>(v1).unwrap()
        );
        // Figures of a shape this build does not know stay as they were.
        let odd = br#"{"kind":"verify","start_ns":1,"end_ns":1,"ok":false,"dry_run":false,"error":"x","figures":{"novel":1},"refused":true}"#;
        let r: JobRecord = schema::decode_job(odd).unwrap();
        assert!(matches!(&r.figures, Some(Report::Other(_))) && r.refused);
        assert_eq!(serde_json::to_value(&r).unwrap()["figures"], serde_json::json!({"novel": 1}));
        // No figures: null, as before.
        let none = rec(3);
        assert!(serde_json::to_value(&none).unwrap()["figures"].is_null());
        assert!(schema::decode_job::<JobRecord>(&schema::encode_job(&none)).unwrap().figures.is_none());
    }

    #[test]
    fn a_prune_report_reads_back_typed() {
        use crate::retention::{Policy, Reason, Verdict};
        let plan = crate::prune::SetPlan {
            host: "h".into(),
            name: "n".into(),
            policy: Policy::default(),
            verdicts: vec![Verdict {
                id: bkp_common::SnapshotId::from_bytes([1; 32]),
                time_ns: 7,
                keep: vec![Reason::MinAge],
            }],
        };
        let mut r = rec(9);
        r.kind = JobKind::Prune;
        r.figures = Some(Report::Prune(PruneReport { sets: 1, kept: 1, removed: 0, plan: vec![plan] }));
        let back: JobRecord = schema::decode_job(&schema::encode_job(&r)).unwrap();
        let Some(Report::Prune(p)) = &back.figures else { panic!("{back:?}") };
        assert_eq!(p.plan[0].verdicts[0].keep, [Reason::MinAge]);
        assert_eq!(p.plan[0].policy, Policy::default());
    }
}
