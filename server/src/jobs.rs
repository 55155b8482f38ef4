//! Server jobs (prune, gc, verify): one run of a kind at a time, each run's
//! start, end, result and figures stored and listed by `bkp-server jobs`,
//! and a scheduler that runs them on the config's cron schedules.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::gc::{self, GcHooks};
use crate::prune::{prune, prune_plan};
use crate::server::ServerState;
use crate::verify::{self, Scope};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// Guards against two runs of the same kind.
#[derive(Default)]
pub struct Running {
    prune: Mutex<()>,
    gc: Mutex<()>,
    verify: Mutex<()>,
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Runs a job now, on the calling (blocking) thread, and records it.
/// A verify run covers the scheduled slice; see [`run_verify`].
pub fn run(state: &ServerState, kind: JobKind, dry_run: bool, hooks: &GcHooks) -> JobRecord {
    if kind == JobKind::Verify {
        return run_verify(state, Scope::Scheduled);
    }
    run_with(state, kind, dry_run, |start_ns| match kind {
        JobKind::Prune => prune_plan(state.store.as_ref(), &state.config.retention, start_ns)
            .and_then(|plan| prune(state.store.as_ref(), plan, dry_run))
            .map(|r| (serde_json::to_value(r).expect("report to json"), None))
            .map_err(|e| e.to_string()),
        JobKind::Gc => gc::run(state, hooks)
            .map(|r| (serde_json::to_value(r).expect("report to json"), None))
            .map_err(|e| e.to_string()),
        JobKind::Verify => unreachable!("handled above"),
    })
}

/// Runs a verification. Damage found makes the record failed, with the
/// report kept as its figures (so a failed record with figures means
/// "found damage", without figures "could not run").
pub fn run_verify(state: &ServerState, scope: Scope) -> JobRecord {
    run_with(state, JobKind::Verify, false, |start_ns| {
        verify::run(state, scope, start_ns)
            .map(|r| (serde_json::to_value(&r).expect("report to json"), r.problem()))
            .map_err(|e| e.to_string())
    })
}

/// What a job body returns: its figures and, when it ran but found a
/// problem, that problem; or why it could not run.
type Outcome = Result<(serde_json::Value, Option<String>), String>;

fn run_with(state: &ServerState, kind: JobKind, dry_run: bool, body: impl FnOnce(u64) -> Outcome) -> JobRecord {
    let lock = match kind {
        JobKind::Prune => &state.running.prune,
        JobKind::Gc => &state.running.gc,
        JobKind::Verify => &state.running.verify,
    };
    let start_ns = now_ns();
    let refuse = |msg: String| {
        let rec = JobRecord {
            kind,
            start_ns,
            end_ns: start_ns,
            ok: false,
            dry_run,
            error: Some(msg),
            figures: serde_json::Value::Null,
        };
        record(state, &rec);
        rec
    };
    if kind != JobKind::Prune && dry_run {
        return refuse(format!(
            "{} has no dry run; `bkp-server prune --dry-run` previews what a prune would remove",
            kind.as_str()
        ));
    }
    let Ok(_guard) = lock.try_lock() else {
        // Recorded, so a schedule that keeps colliding shows in `jobs`.
        return refuse(format!("a {} run is already in progress; try again when it ends", kind.as_str()));
    };
    info!(job = kind.as_str(), dry_run, "job started");
    let (figures, error) = match body(start_ns) {
        Ok((figures, problem)) => (figures, problem),
        Err(e) => (serde_json::Value::Null, Some(e)),
    };
    let rec = JobRecord { kind, start_ns, end_ns: now_ns(), ok: error.is_none(), dry_run, error, figures };
    record(state, &rec);
    match &rec.error {
        None => info!(job = kind.as_str(), "job finished"),
        Some(e) => error!(job = kind.as_str(), "job failed: {e}"),
    }
    rec
}

/// Stores a run's record; dry runs change nothing and are not kept.
fn record(state: &ServerState, rec: &JobRecord) {
    if rec.dry_run {
        return;
    }
    let body = serde_json::to_vec(rec).expect("record to json");
    if let Err(e) = state.store.put_job(rec.start_ns, rec.kind.as_str(), &body) {
        error!("recording job: {e}");
    }
}

/// The newest `limit` job records.
pub fn list(state: &ServerState, limit: usize) -> Result<Vec<JobRecord>, String> {
    let raw = state.store.jobs(limit).map_err(|e| e.to_string())?;
    raw.iter().map(|b| serde_json::from_slice(b).map_err(|e| format!("job record: {e}"))).collect()
}

/// Runs the configured schedules until the task is dropped.
pub async fn scheduler(state: Arc<ServerState>) {
    let mut plans = Vec::new();
    for (kind, expr) in state.config.jobs.schedules() {
        if let Some(e) = expr {
            match parse_schedule(e) {
                Ok(s) => plans.push((kind, s)),
                Err(e) => error!("{e}"),
            }
        }
    }
    if plans.is_empty() {
        return;
    }
    loop {
        let now = chrono::Utc::now();
        let Some((kind, when)) =
            plans.iter().filter_map(|(k, s)| s.after(&now).next().map(|t| (*k, t))).min_by_key(|(_, t)| *t)
        else {
            return;
        };
        let wait = (when - now).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        let st = state.clone();
        // A run that is still going when the next is due makes the new one
        // report "already in progress" rather than queue up.
        tokio::task::spawn_blocking(move || run(&st, kind, false, &GcHooks::from_env()));
        // Step past this instant so the same occurrence is not run twice.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
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
}
