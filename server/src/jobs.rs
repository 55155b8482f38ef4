//! Server jobs (prune, gc, verify): one run of a kind at a time, each run's
//! start, end, result and figures stored and listed by `bkp-server jobs`.
//! The cron schedules are run by `crate::schedule`.
//!
//! A run asked for while one of the same kind is going is *refused*: it
//! is recorded (so colliding schedules show in `jobs`) but it is not a
//! failure, since the run in progress does the work. A record the store
//! cannot take (a full disk) is kept in memory, listed as if stored, and
//! written at the next record or monitor check.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::audit::Audit;
use crate::gc::{self, GcHooks};
use crate::prune::{prune, prune_plan, RetentionConfig};
use crate::sessions::Sessions;
use crate::store::Store;
use crate::verify::{self, Scope, VerifyConfig};

/// Declared in the order the scheduler runs kinds due at the same time:
/// prune first (its removals are what gc frees), verify last (it checks
/// what is left).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Prune,
    Gc,
    Verify,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Prune => "prune",
            JobKind::Gc => "gc",
            JobKind::Verify => "verify",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub kind: JobKind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
    pub dry_run: bool,
    pub error: Option<String>,
    /// The job's own report (what was kept, removed, freed...).
    pub figures: serde_json::Value,
    /// Not run because a run of the same kind was in progress: not a
    /// failure (no alert), and not a run for the monitor's "latest run".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

/// `[jobs]` in the server config: 5-field cron schedules, in UTC.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    pub prune: Option<String>,
    pub gc: Option<String>,
    pub verify: Option<String>,
}

impl JobsConfig {
    pub fn schedules(&self) -> [(JobKind, &Option<String>); 3] {
        [(JobKind::Prune, &self.prune), (JobKind::Gc, &self.gc), (JobKind::Verify, &self.verify)]
    }
}

pub fn parse_schedule(expr: &str) -> Result<cron::Schedule, String> {
    // The cron crate wants seconds first; operators write five fields.
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!("schedule {expr:?} must have 5 fields (minute hour day month weekday)"));
    }
    // The cron crate numbers weekdays 1 = Sunday, crontab 0 = Sunday: names
    // mean the same in both, numbers would silently shift a day.
    if expr.split_whitespace().nth(4).is_some_and(|w| w.chars().any(|c| c.is_ascii_digit())) {
        return Err(format!("schedule {expr:?}: write weekdays as names (MON-FRI, SUN), not numbers"));
    }
    cron::Schedule::from_str(&format!("0 {expr}")).map_err(|e| format!("schedule {expr:?}: {e}"))
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
    unwritten: Mutex<Vec<JobRecord>>,
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
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
    /// Who started the run, for its audit line (`crate::audit::Line::by`).
    pub by: &'a str,
}

/// Runs a job now, on the calling (blocking) thread, and records it.
/// A verify run covers the scheduled slice; see [`run_verify`].
pub fn run(jobs: &Jobs<'_>, kind: JobKind, dry_run: bool, hooks: &GcHooks) -> JobRecord {
    if kind == JobKind::Verify {
        return run_verify(jobs, Scope::Scheduled);
    }
    run_with(jobs, kind, dry_run, |start_ns| match kind {
        JobKind::Prune => prune_plan(jobs.store, jobs.retention, start_ns)
            .and_then(|plan| prune(jobs.store, plan, dry_run))
            .map(|r| (serde_json::to_value(r).expect("report to json"), None))
            .map_err(|e| e.to_string()),
        JobKind::Gc => gc::run(jobs.store, jobs.sessions, hooks)
            .map(|r| (serde_json::to_value(r).expect("report to json"), None))
            .map_err(|e| e.to_string()),
        JobKind::Verify => unreachable!("handled above"),
    })
}

/// Runs a verification. Damage found makes the record failed, with the
/// report kept as its figures (so a failed record with figures means
/// "found damage", without figures "could not run").
pub fn run_verify(jobs: &Jobs<'_>, scope: Scope) -> JobRecord {
    run_with(jobs, JobKind::Verify, false, |start_ns| {
        verify::run(jobs.store, jobs.sessions, jobs.verify, scope, start_ns)
            .map(|r| (serde_json::to_value(&r).expect("report to json"), r.problem()))
            .map_err(|e| e.to_string())
    })
}

/// What a job body returns: its figures and, when it ran but found a
/// problem, that problem; or why it could not run.
type Outcome = Result<(serde_json::Value, Option<String>), String>;

fn run_with(jobs: &Jobs<'_>, kind: JobKind, dry_run: bool, body: impl FnOnce(u64) -> Outcome) -> JobRecord {
    let lock = match kind {
        JobKind::Prune => &jobs.running.prune,
        JobKind::Gc => &jobs.running.gc,
        JobKind::Verify => &jobs.running.verify,
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
            figures: serde_json::Value::Null,
            refused,
        };
        record(jobs.store, jobs.running, &rec);
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
        Ok((figures, problem)) => (figures, problem),
        Err(e) => (serde_json::Value::Null, Some(e)),
    };
    let rec =
        JobRecord { kind, start_ns, end_ns: now_ns(), ok: error.is_none(), dry_run, error, figures, refused: false };
    record(jobs.store, jobs.running, &rec);
    audit(jobs.audit, jobs.by, &rec);
    match &rec.error {
        None => info!(job = kind.as_str(), "job finished"),
        Some(e) => error!(job = kind.as_str(), "job failed: {e}"),
    }
    rec
}

/// One audit line per run, dry runs and refused runs included.
fn audit(log: &Audit, by: &str, rec: &JobRecord) {
    use crate::audit::{Event, Line};
    let event = match rec.kind {
        JobKind::Prune => Event::Prune,
        JobKind::Gc => Event::Gc,
        JobKind::Verify => Event::Verify,
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
pub(crate) fn record(store: &dyn Store, running: &Running, rec: &JobRecord) {
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

fn put(store: &dyn Store, rec: &JobRecord) -> Result<(), String> {
    let body = serde_json::to_vec(rec).expect("record to json");
    store.put_job(rec.start_ns, rec.kind.as_str(), &body).map_err(|e| e.to_string())
}

/// Writes queued records, oldest first, until one fails.
fn write_unwritten(q: &mut Vec<JobRecord>, mut put: impl FnMut(&JobRecord) -> Result<(), String>) {
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
pub fn flush_unwritten(store: &dyn Store, running: &Running) {
    let mut q = running.unwritten.lock().expect("unwritten lock");
    if !q.is_empty() {
        write_unwritten(&mut q, |r| put(store, r));
    }
}

/// The newest `limit` job records, those not yet written included.
pub fn list(store: &dyn Store, running: &Running, limit: usize) -> Result<Vec<JobRecord>, String> {
    // Held across the read, so a record being written is seen once.
    let unwritten = running.unwritten.lock().expect("unwritten lock");
    let raw = store.jobs(limit).map_err(|e| e.to_string())?;
    let mut out: Vec<JobRecord> = raw
        .iter()
        .map(|b| serde_json::from_slice(b).map_err(|e| format!("job record: {e}")))
        .collect::<Result<_, _>>()?;
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

    #[test]
    fn schedules() {
        let s = parse_schedule("0 4 * * *").unwrap();
        let from = chrono::DateTime::parse_from_rfc3339("2026-11-23T05:00:00Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(s.after(&from).next().unwrap().to_rfc3339(), "2026-11-24T04:00:00+00:00");
        assert!(parse_schedule("0 4 * *").is_err());
        assert!(parse_schedule("99 4 * * *").is_err());
        assert!(parse_schedule("0 4 * * 1").is_err());
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
            figures: serde_json::Value::Null,
            refused: false,
        }
    }

    #[test]
    fn unwritten_records_wait_for_the_store() {
        let mut q = vec![rec(1), rec(2)];
        let mut stored = Vec::new();
        // Disk full: nothing is lost, order is kept.
        write_unwritten(&mut q, |_| Err("No space left on device".into()));
        assert_eq!(q.len(), 2);
        let mut room = 1;
        write_unwritten(&mut q, |r| {
            if room == 0 {
                return Err("No space left on device".into());
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
}
