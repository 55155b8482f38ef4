//! The job scheduler: runs every job whose cron schedule is due, and
//! records the runs that were due while the server was not running.
//!
//! Which jobs are due is [`due`], a pure function of the schedules and a
//! time window, tested as a table. Each wake-up covers the whole window
//! since the previous one, so schedules due at the same moment all run:
//! one after the other in one blocking task, in [`JobKind`] order (prune,
//! then gc, then verify). A wake-up that found nothing due only sleeps
//! again, so a clock that jumps or a late wake-up loses nothing either.
//!
//! At start, each scheduled kind's newest record (whatever its outcome) is
//! compared with its schedule ([`missed`]): occurrences between that
//! record and now did not run, and get a failed record ("verify was due
//! at ... and did not run"), which the monitor alerts on like any failed
//! job until a run of that kind succeeds. A kind without any record is
//! measured from when a server first found it scheduled (kept in the meta
//! record `scheduled_since`, `store::schema::ScheduledSince`), so a verify
//! that was never once run is reported too. Each scheduled `[[sync]]` job
//! is checked the same way by its name ([`sync_missed`]: its newest
//! record is the newest sync record whose report names it; it is noted in
//! `scheduled_since` as `sync/NAME`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{error, info, warn};

use crate::gc::GcHooks;
use crate::jobs::{self, JobKind, JobRecord, JobsConfig, JobsError};
use crate::state::ServerState;
use crate::store::ScheduledSince;

/// Job records read at start to find each kind's newest: first this
/// many, ten times more while a scheduled kind is not among them (an
/// hourly prune buries a monthly verify's record), up to MAX_HISTORY.
const HISTORY: usize = 500;
const MAX_HISTORY: usize = 500_000;
/// Occurrences counted per window at most (a `* * * * *` schedule and a
/// server down for years must not take long to count).
const MAX_COUNT: usize = 10_000;
/// Longest single sleep: the wall clock is read again at least this often,
/// so a clock set forward (or a resumed machine) is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Wall-clock time and sleeping, injectable for tests.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Returns at `t` or later (or earlier: the caller reads `now` again).
    fn sleep_until(&self, t: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = (t - Utc::now()).to_std().unwrap_or_default().min(MAX_SLEEP);
        Box::pin(tokio::time::sleep(wait))
    }
}

pub type Plans = Vec<(JobKind, cron::Schedule)>;

/// The configured schedules, in run order. (The config check refuses bad
/// expressions before `serve` starts; one that still fails is logged.)
pub fn plans(cfg: &JobsConfig) -> Plans {
    let mut out = Vec::new();
    for (kind, expr) in cfg.schedules() {
        if let Some(e) = expr {
            match jobs::parse_schedule(e) {
                Ok(s) => out.push((kind, s)),
                Err(e) => error!("{e}"),
            }
        }
    }
    out.sort_by_key(|(k, _)| *k);
    out
}

/// A kind with occurrences in a window: the first one and how many.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub kind: JobKind,
    pub first: DateTime<Utc>,
    pub count: usize,
}

/// The first occurrence of `s` in `(after, upto]` and how many there are.
fn occurrences(s: &cron::Schedule, after: DateTime<Utc>, upto: DateTime<Utc>) -> Option<(DateTime<Utc>, usize)> {
    let mut times = s.after(&after).take_while(|t| *t <= upto);
    let first = times.next()?;
    Some((first, 1 + times.take(MAX_COUNT - 1).count()))
}

/// The kinds with an occurrence in `(after, upto]`, in run order.
pub fn due(plans: &[(JobKind, cron::Schedule)], after: DateTime<Utc>, upto: DateTime<Utc>) -> Vec<Due> {
    let mut out = Vec::new();
    for (kind, s) in plans {
        let Some((first, count)) = occurrences(s, after, upto) else { continue };
        out.push(Due { kind: *kind, first, count });
    }
    out.sort_by_key(|d| d.kind);
    out
}

/// Scheduled kinds with occurrences between their newest record (in
/// `last_run`) and `now`: runs that did not happen.
pub fn missed(
    plans: &[(JobKind, cron::Schedule)],
    last_run: &BTreeMap<JobKind, DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Vec<Due> {
    plans
        .iter()
        .filter_map(|(k, s)| {
            let last = last_run.get(k)?;
            due(&[(*k, s.clone())], *last, now).pop()
        })
        .collect()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The failed record that stands for a missed run.
pub fn missed_record(d: &Due, now_ns: u64) -> JobRecord {
    let kind = d.kind.as_str();
    let more = if d.count > 1 { format!(" ({} scheduled runs missed)", d.count) } else { String::new() };
    JobRecord {
        kind: d.kind,
        start_ns: now_ns,
        end_ns: now_ns,
        ok: false,
        dry_run: false,
        error: Some(format!(
            "{kind} was due at {} and did not run{more}: the server was not running then, or stopped during \
             the run; it runs at its next scheduled time, or now with `bkp-server {kind}`",
            rfc3339(d.first)
        )),
        figures: None,
        refused: false,
    }
}

fn from_ns(ns: u64) -> DateTime<Utc> {
    DateTime::from_timestamp((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as u32).unwrap_or_default()
}

/// Notes when each kind of `plans` was first seen scheduled (`now` for a
/// kind not noted yet) and returns it. Kinds no longer scheduled are
/// dropped, so scheduling one again later measures from then. A record
/// that cannot be read or written only loses those times (logged).
fn note_scheduled(state: &ServerState, plans: &[(JobKind, cron::Schedule)], now: DateTime<Utc>) -> ScheduledSince {
    let keys: Vec<String> = plans.iter().map(|(k, _)| k.as_str().to_string()).collect();
    note_scheduled_keys(state, &keys, |k| !k.starts_with(SYNC_SINCE_PREFIX), now)
}

/// `scheduled_since` key of a `[[sync]]` job.
const SYNC_SINCE_PREFIX: &str = "sync/";

/// [`note_scheduled`] for the keys of one family (`owns`): the kinds of
/// `[jobs]`, or the `sync/NAME` of the `[[sync]]` jobs, each scheduler
/// keeping the other's entries as they are.
fn note_scheduled_keys(
    state: &ServerState,
    keys: &[String],
    owns: impl Fn(&str) -> bool,
    now: DateTime<Utc>,
) -> ScheduledSince {
    // The two schedulers start together: one read-modify-write at a time.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let old = state.store().scheduled_since().unwrap_or_else(|e| {
        warn!("{e}; starting a new record of when jobs were first scheduled");
        None
    });
    let old = old.unwrap_or_default();
    let now_ns = now.timestamp_nanos_opt().unwrap_or_default().max(0) as u64;
    let mut since: ScheduledSince = old.iter().filter(|(k, _)| !owns(k)).map(|(k, v)| (k.clone(), *v)).collect();
    since.extend(keys.iter().map(|k| (k.clone(), *old.get(k).unwrap_or(&now_ns))));
    if since != old {
        if let Err(e) = state.store().set_scheduled_since(&since) {
            error!("recording when jobs were first scheduled: {e}");
        }
    }
    since
}

/// Each scheduled kind's newest record, or for one without records, when
/// it was first seen scheduled (noted now if never).
fn watermarks(
    state: &ServerState,
    plans: &[(JobKind, cron::Schedule)],
    now: DateTime<Utc>,
) -> Result<BTreeMap<JobKind, DateTime<Utc>>, JobsError> {
    let mut last = BTreeMap::new();
    let mut limit = HISTORY;
    loop {
        let records = jobs::list(state.store().as_ref(), state.running(), limit)?;
        for r in &records {
            // Newest first: the first of each kind is its newest.
            last.entry(r.kind).or_insert_with(|| from_ns(r.start_ns));
        }
        let all_found = plans.iter().all(|(k, _)| last.contains_key(k));
        if all_found || records.len() < limit || limit >= MAX_HISTORY {
            break;
        }
        limit *= 10;
    }
    let since = note_scheduled(state, plans, now);
    for (k, _) in plans {
        if let Some(first) = since.get(k.as_str()) {
            last.entry(*k).or_insert_with(|| from_ns(*first));
        }
    }
    Ok(last)
}

fn record_missed(state: &ServerState, plans: &[(JobKind, cron::Schedule)], now: DateTime<Utc>) {
    let last = match watermarks(state, plans, now) {
        Ok(l) => l,
        Err(e) => return error!("reading job records to find missed runs: {e}"),
    };
    let found = missed(plans, &last, now);
    for d in &found {
        let rec = missed_record(d, crate::clock::now_ns());
        error!(job = d.kind.as_str(), "{}", rec.error.as_deref().unwrap_or_default());
        jobs::record(state.store().as_ref(), state.running(), &rec);
    }
    if !found.is_empty() {
        state.monitor().nudge.notify_one();
    }
}

/// Runs the configured schedules until the task is dropped. A reload
/// that changes `[jobs]` replaces the schedules: the new ones count from
/// the reload (nothing they would have run before it is run or reported
/// missed), and a kind scheduled anew is measured from then.
pub async fn run(state: Arc<ServerState>, clock: Arc<dyn Clock>) {
    let mut reloads = state.reloads();
    let mut cfg = state.config().jobs.clone();
    let mut plans = plans(&cfg);
    let start = clock.now();
    if !plans.is_empty() {
        let (st, p) = (state.clone(), plans.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || record_missed(&st, &p, start)).await {
            error!("looking for missed job runs: {e}");
        }
    }
    let mut last = start;
    loop {
        let next = plans.iter().filter_map(|(_, s)| s.after(&last).next()).min();
        let sleep = async {
            match next {
                Some(t) => clock.sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                let now_cfg = state.config().jobs.clone();
                if now_cfg != cfg {
                    cfg = now_cfg;
                    plans = self::plans(&cfg);
                    last = clock.now();
                    let (st, p) = (state.clone(), plans.clone());
                    let _ = tokio::task::spawn_blocking(move || note_scheduled(&st, &p, last)).await;
                    info!(schedules = plans.len(), "job schedules replaced by the reloaded config");
                }
                continue;
            }
        }
        let Some(next) = next else { continue };
        let now = clock.now();
        if now < next {
            continue;
        }
        let batch = due(&plans, last, now);
        last = now;
        let st = state.clone();
        // Not awaited: a long verify must not hold back the next prune.
        // A kind that comes due again while its run is still going is
        // refused (recorded, not a failure) rather than queued.
        tokio::task::spawn_blocking(move || {
            let cfg = st.config();
            for d in batch {
                if d.count > 1 {
                    warn!(job = d.kind.as_str(), "{} runs were due since the last wake-up; running once", d.count);
                }
                jobs::run(&st.jobs(&cfg), d.kind, false, &GcHooks::from_env());
            }
        });
    }
}

/// The `[[sync]]` jobs with a schedule, by name.
pub fn sync_plans(jobs: &[crate::sync::SyncJob]) -> Vec<(String, cron::Schedule)> {
    jobs.iter()
        .filter_map(|j| match jobs::parse_schedule(j.schedule.as_ref()?) {
            Ok(s) => Some((j.name.clone(), s)),
            Err(e) => {
                error!("[[sync]] {}: {e}", j.name);
                None
            }
        })
        .collect()
}

/// Scheduled sync jobs (by name) with occurrences between their newest
/// record (in `last_run`) and `now`: each with the first one and how many.
pub fn sync_missed(
    plans: &[(String, cron::Schedule)],
    last_run: &BTreeMap<String, DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Vec<(String, DateTime<Utc>, usize)> {
    plans
        .iter()
        .filter_map(|(name, s)| {
            let (first, count) = occurrences(s, *last_run.get(name)?, now)?;
            Some((name.clone(), first, count))
        })
        .collect()
}

/// The failed record that stands for a missed run of the sync job `name`:
/// a sync record whose report names the job (and moved nothing).
pub fn missed_sync_record(name: &str, first: DateTime<Utc>, count: usize, now_ns: u64) -> JobRecord {
    let more = if count > 1 { format!(" ({count} scheduled runs missed)") } else { String::new() };
    JobRecord {
        kind: JobKind::Sync,
        start_ns: now_ns,
        end_ns: now_ns,
        ok: false,
        dry_run: false,
        error: Some(format!(
            "sync {name} was due at {} and did not run{more}: the server was not running then, or stopped during \
             the run; it runs at its next scheduled time, or now with `bkp-server sync --remote {name}`",
            rfc3339(first)
        )),
        figures: Some(crate::report::Report::Sync(crate::report::SyncReport {
            remote: name.to_string(),
            ..Default::default()
        })),
        refused: false,
    }
}

/// Each scheduled sync job's newest record (a refused one counts: it
/// met a run in progress), or when it was first seen scheduled.
fn sync_watermarks(
    state: &ServerState,
    plans: &[(String, cron::Schedule)],
    now: DateTime<Utc>,
) -> Result<BTreeMap<String, DateTime<Utc>>, JobsError> {
    let mut last = BTreeMap::new();
    let mut limit = HISTORY;
    loop {
        let records = jobs::list(state.store().as_ref(), state.running(), limit)?;
        for r in records.iter().filter(|r| r.kind == JobKind::Sync) {
            if let Some(crate::report::Report::Sync(f)) = &r.figures {
                last.entry(f.remote.clone()).or_insert_with(|| from_ns(r.start_ns));
            }
        }
        let all_found = plans.iter().all(|(n, _)| last.contains_key(n));
        if all_found || records.len() < limit || limit >= MAX_HISTORY {
            break;
        }
        limit *= 10;
    }
    let keys: Vec<String> = plans.iter().map(|(n, _)| format!("{SYNC_SINCE_PREFIX}{n}")).collect();
    let since = note_scheduled_keys(state, &keys, |k| k.starts_with(SYNC_SINCE_PREFIX), now);
    for (n, _) in plans {
        if let Some(first) = since.get(&format!("{SYNC_SINCE_PREFIX}{n}")) {
            last.entry(n.clone()).or_insert_with(|| from_ns(*first));
        }
    }
    Ok(last)
}

fn record_missed_sync(state: &ServerState, plans: &[(String, cron::Schedule)], now: DateTime<Utc>) {
    let last = match sync_watermarks(state, plans, now) {
        Ok(l) => l,
        Err(e) => return error!("reading job records to find missed sync runs: {e}"),
    };
    let found = sync_missed(plans, &last, now);
    for (name, first, count) in &found {
        let rec = missed_sync_record(name, *first, *count, crate::clock::now_ns());
        error!(job = "sync", remote = %name, "{}", rec.error.as_deref().unwrap_or_default());
        jobs::record(state.store().as_ref(), state.running(), &rec);
    }
    if !found.is_empty() {
        state.monitor().nudge.notify_one();
    }
}

/// The sync jobs with an occurrence in `(after, upto]`.
pub fn sync_due(plans: &[(String, cron::Schedule)], after: DateTime<Utc>, upto: DateTime<Utc>) -> Vec<String> {
    plans.iter().filter(|(_, s)| s.after(&after).next().is_some_and(|t| t <= upto)).map(|(n, _)| n.clone()).collect()
}

/// Runs the `[[sync]]` schedules until the task is dropped. Each due job
/// runs on its own blocking task, so a long pull from one remote does
/// not hold back another; one still running when it comes due again is
/// refused (recorded, no failure). Runs missed while the server was down
/// get a failed record each at start, as `[jobs]`' do (the next run still
/// copies all that they would have).
pub async fn run_sync(state: Arc<ServerState>, clock: Arc<dyn Clock>) {
    let plans = sync_plans(&state.config().sync);
    if plans.is_empty() {
        return;
    }
    let mut last = clock.now();
    let (st, p) = (state.clone(), plans.clone());
    if let Err(e) = tokio::task::spawn_blocking(move || record_missed_sync(&st, &p, last)).await {
        error!("looking for missed sync runs: {e}");
    }
    loop {
        let Some(next) = plans.iter().filter_map(|(_, s)| s.after(&last).next()).min() else { return };
        clock.sleep_until(next).await;
        let now = clock.now();
        if now < next {
            continue;
        }
        let due = sync_due(&plans, last, now);
        last = now;
        for name in due {
            let st = state.clone();
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let cfg = st.config();
                jobs::run_sync(&st.jobs(&cfg), &name, rt);
                st.monitor().nudge.notify_one();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_jobs_come_due_by_their_own_schedules() {
        let p = vec![
            ("a".to_string(), jobs::parse_schedule("0 * * * *").unwrap()),
            ("b".to_string(), jobs::parse_schedule("30 2 * * *").unwrap()),
        ];
        assert_eq!(sync_due(&p, t("2026-12-01T01:59:00Z"), t("2026-12-01T02:00:00Z")), ["a"]);
        assert_eq!(sync_due(&p, t("2026-12-01T02:00:00Z"), t("2026-12-01T02:30:00Z")), ["b"]);
        assert_eq!(sync_due(&p, t("2026-12-01T01:00:00Z"), t("2026-12-01T03:00:00Z")), ["a", "b"]);
        assert!(sync_due(&p, t("2026-12-01T02:31:00Z"), t("2026-12-01T02:59:59Z")).is_empty());
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn plan(cfg: &[(JobKind, &str)]) -> Plans {
        let c = JobsConfig {
            prune: cfg.iter().find(|(k, _)| *k == JobKind::Prune).map(|(_, e)| e.to_string()),
            gc: cfg.iter().find(|(k, _)| *k == JobKind::Gc).map(|(_, e)| e.to_string()),
            verify: cfg.iter().find(|(k, _)| *k == JobKind::Verify).map(|(_, e)| e.to_string()),
            ..Default::default()
        };
        plans(&c)
    }

    use JobKind::{Gc, Prune, Verify};

    #[test]
    fn due_table() {
        // (schedules, window after, window up to, (kind, first, count) due)
        #[allow(clippy::type_complexity)]
        let cases: &[(&[(JobKind, &str)], &str, &str, &[(JobKind, &str, usize)])] = &[
            // Two jobs at the same minute: both, prune first.
            (
                &[(Verify, "0 2 * * *"), (Prune, "0 2 * * *")],
                "2026-12-01T01:59:00Z",
                "2026-12-01T02:00:00Z",
                &[(Prune, "2026-12-01T02:00:00Z", 1), (Verify, "2026-12-01T02:00:00Z", 1)],
            ),
            // All three at once: prune, gc, verify.
            (
                &[(Gc, "0 2 * * *"), (Verify, "0 2 * * *"), (Prune, "0 2 * * *")],
                "2026-12-01T01:00:00Z",
                "2026-12-01T02:00:05Z",
                &[
                    (Prune, "2026-12-01T02:00:00Z", 1),
                    (Gc, "2026-12-01T02:00:00Z", 1),
                    (Verify, "2026-12-01T02:00:00Z", 1),
                ],
            ),
            // Same minute is not enough to be due: the window ends before.
            (&[(Prune, "0 2 * * *")], "2026-12-01T01:00:00Z", "2026-12-01T01:59:59Z", &[]),
            // The window's start is excluded (that wake-up ran it), its end included.
            (
                &[(Prune, "0 2 * * *")],
                "2026-12-01T02:00:00Z",
                "2026-12-02T02:00:00Z",
                &[(Prune, "2026-12-02T02:00:00Z", 1)],
            ),
            // A late wake-up sees everything it slept through, once per kind.
            (
                &[(Prune, "0 * * * *"), (Gc, "30 5 * * Sun")],
                "2026-12-05T23:30:00Z",
                "2026-12-06T06:10:00Z",
                &[(Prune, "2026-12-06T00:00:00Z", 7), (Gc, "2026-12-06T05:30:00Z", 1)],
            ),
            // Different minutes in one window still both run, in kind order.
            (
                &[(Verify, "0 2 * * *"), (Prune, "5 2 * * *")],
                "2026-12-01T01:00:00Z",
                "2026-12-01T03:00:00Z",
                &[(Prune, "2026-12-01T02:05:00Z", 1), (Verify, "2026-12-01T02:00:00Z", 1)],
            ),
        ];
        for (i, (cfg, after, upto, want)) in cases.iter().enumerate() {
            let got = due(&plan(cfg), t(after), t(upto));
            let want: Vec<Due> = want.iter().map(|(k, f, n)| Due { kind: *k, first: t(f), count: *n }).collect();
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn missed_table() {
        let p = plan(&[(Prune, "0 4 * * *"), (Verify, "0 2 * * *")]);
        let now = t("2026-12-03T10:00:00Z");
        // (newest record per kind, missed)
        #[allow(clippy::type_complexity)]
        let cases: &[(&[(JobKind, &str)], &[(JobKind, &str, usize)])] = &[
            // Ran on time: nothing missed.
            (&[(Prune, "2026-12-03T04:00:01Z"), (Verify, "2026-12-03T02:00:01Z")], &[]),
            // Down over two nights: verify missed twice, prune once.
            (
                &[(Prune, "2026-12-02T04:00:01Z"), (Verify, "2026-12-01T02:00:01Z")],
                &[(Prune, "2026-12-03T04:00:00Z", 1), (Verify, "2026-12-02T02:00:00Z", 2)],
            ),
            // No record of a kind yet: not judged.
            (&[(Prune, "2026-12-01T04:00:01Z")], &[(Prune, "2026-12-02T04:00:00Z", 2)]),
            (&[], &[]),
        ];
        for (i, (last, want)) in cases.iter().enumerate() {
            let last: BTreeMap<JobKind, DateTime<Utc>> = last.iter().map(|(k, s)| (*k, t(s))).collect();
            let want: Vec<Due> = want.iter().map(|(k, f, n)| Due { kind: *k, first: t(f), count: *n }).collect();
            assert_eq!(missed(&p, &last, now), want, "case {i}");
        }
        let d = Due { kind: Verify, first: t("2026-12-02T02:00:00Z"), count: 2 };
        let r = missed_record(&d, 7);
        assert!(!r.ok && !r.refused);
        let e = r.error.unwrap();
        assert!(
            e.starts_with("verify was due at 2026-12-02T02:00:00Z and did not run (2 scheduled runs missed)"),
            "{e}"
        );
    }

    /// A clock the test moves by hand.
    struct ManualClock(tokio::sync::watch::Sender<DateTime<Utc>>);

    impl Clock for ManualClock {
        fn now(&self) -> DateTime<Utc> {
            *self.0.borrow()
        }

        fn sleep_until(&self, t: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            let mut rx = self.0.subscribe();
            Box::pin(async move {
                let _ = rx.wait_for(|now| *now >= t).await;
            })
        }
    }

    fn server(jobs: JobsConfig) -> (tempfile::TempDir, Arc<ServerState>) {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::init(dir.path()).unwrap();
        let cfg = crate::config::ServerConfig { cache_mb: 8, jobs, ..Default::default() };
        let state = ServerState::open(dir.path(), cfg).unwrap();
        (dir, state)
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_due_at_the_same_minute_all_run() {
        let jobs = JobsConfig {
            prune: Some("0 2 * * *".into()),
            gc: None,
            verify: Some("0 2 * * *".into()),
            ..Default::default()
        };
        let (_dir, state) = server(jobs);
        let clock = Arc::new(ManualClock(tokio::sync::watch::channel(t("2026-12-01T01:59:59Z")).0));
        let task = tokio::spawn(run(state.clone(), clock.clone()));
        // Moved only once the scheduler sleeps, so its start is 01:59:59.
        wait_for("the scheduler to sleep", || clock.0.receiver_count() > 0).await;
        clock.0.send_replace(t("2026-12-01T02:00:00Z"));
        wait_for("a prune and a verify record", || {
            let l = jobs::list(state.store().as_ref(), state.running(), 10).unwrap();
            l.iter().any(|r| r.kind == Prune) && l.iter().any(|r| r.kind == Verify)
        })
        .await;
        let l = jobs::list(state.store().as_ref(), state.running(), 10).unwrap();
        let prune = l.iter().find(|r| r.kind == Prune).unwrap();
        let verify = l.iter().find(|r| r.kind == Verify).unwrap();
        assert!(prune.ok && verify.ok, "{l:?}");
        assert!(prune.end_ns <= verify.start_ns, "prune runs before verify: {l:?}");
        assert_eq!(l.len(), 2, "each ran once: {l:?}");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_never_ran_is_measured_from_when_it_was_scheduled() {
        let jobs = JobsConfig { prune: None, gc: None, verify: Some("0 2 * * *".into()), ..Default::default() };
        let (_dir, state) = server(jobs);
        // First start: nothing to measure from yet; the time is noted.
        let clock = Arc::new(ManualClock(tokio::sync::watch::channel(t("2026-12-01T10:00:00Z")).0));
        let task = tokio::spawn(run(state.clone(), clock.clone()));
        wait_for("the scheduler to sleep", || clock.0.receiver_count() > 0).await;
        task.abort();
        assert!(jobs::list(state.store().as_ref(), state.running(), 10).unwrap().is_empty());
        // Down for two days, then started again: two nights missed.
        let clock = Arc::new(ManualClock(tokio::sync::watch::channel(t("2026-12-03T10:00:00Z")).0));
        let task = tokio::spawn(run(state.clone(), clock));
        wait_for("the missed-run record", || {
            !jobs::list(state.store().as_ref(), state.running(), 10).unwrap().is_empty()
        })
        .await;
        let e = jobs::list(state.store().as_ref(), state.running(), 10).unwrap()[0].error.clone().unwrap_or_default();
        assert!(
            e.starts_with("verify was due at 2026-12-02T02:00:00Z and did not run (2 scheduled runs missed)"),
            "{e}"
        );
        task.abort();
    }

    #[test]
    fn a_kind_buried_under_another_kinds_records_is_still_found() {
        let jobs = JobsConfig {
            prune: Some("0 * * * *".into()),
            gc: None,
            verify: Some("0 2 1 * *".into()),
            ..Default::default()
        };
        let (_dir, state) = server(jobs.clone());
        let at = |s: &str| t(s).timestamp_nanos_opt().unwrap() as u64;
        let ok = |kind, start_ns| {
            let r = missed_record(&Due { kind, first: t("2026-11-01T02:00:00Z"), count: 1 }, start_ns);
            JobRecord { ok: true, error: None, end_ns: start_ns, ..r }
        };
        jobs::record(state.store().as_ref(), state.running(), &ok(Verify, at("2026-11-01T02:00:00Z")));
        // A month of hourly prunes: far more than the first read takes in.
        for h in 0..(HISTORY as u64 + 200) {
            jobs::record(
                state.store().as_ref(),
                state.running(),
                &ok(Prune, at("2026-11-01T03:00:00Z") + h * 3_600_000_000_000),
            );
        }
        let marks = watermarks(&state, &plans(&jobs), t("2026-11-30T00:00:00Z")).unwrap();
        assert_eq!(marks.get(&Verify), Some(&t("2026-11-01T02:00:00Z")), "{marks:?}");
    }

    fn sync_job(name: &str, schedule: &str) -> crate::sync::SyncJob {
        toml::from_str(&format!(
            "name = \"{name}\"\nserver = \"127.0.0.1:1\"\nfingerprint = \"{}\"\ntoken_file = \"/nonexistent\"\n\
             schedule = \"{schedule}\"",
            "ab".repeat(32)
        ))
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missed_sync_runs_are_recorded_by_job_name() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::init(dir.path()).unwrap();
        let cfg = crate::config::ServerConfig {
            cache_mb: 8,
            jobs: JobsConfig { prune: None, gc: None, verify: Some("0 3 * * *".into()), ..Default::default() },
            sync: vec![sync_job("offsite", "0 2 * * *"), sync_job("hourly", "0 * * * *")],
            ..Default::default()
        };
        let state = ServerState::open(dir.path(), cfg).unwrap();
        let list = || jobs::list(state.store().as_ref(), state.running(), 10).unwrap();
        // First start: both schedulers note their jobs, neither drops the other's.
        let clock = Arc::new(ManualClock(tokio::sync::watch::channel(t("2026-12-01T10:00:30Z")).0));
        let a = tokio::spawn(run(state.clone(), clock.clone()));
        let b = tokio::spawn(run_sync(state.clone(), clock.clone()));
        wait_for("both schedulers to sleep", || clock.0.receiver_count() > 1).await;
        a.abort();
        b.abort();
        let since = state.store().scheduled_since().unwrap().unwrap();
        assert_eq!(since.keys().collect::<Vec<_>>(), ["sync/hourly", "sync/offsite", "verify"], "{since:?}");
        assert!(list().is_empty());
        // "hourly" ran (its record names it) at 09:00 on the 3rd.
        let at = |s: &str| t(s).timestamp_nanos_opt().unwrap() as u64;
        let ran = missed_sync_record("hourly", t("2026-12-03T09:00:00Z"), 1, at("2026-12-03T09:00:00Z"));
        jobs::record(state.store().as_ref(), state.running(), &JobRecord { ok: true, error: None, ..ran });
        // Down until 10:00:30 on the 3rd.
        let clock = Arc::new(ManualClock(tokio::sync::watch::channel(t("2026-12-03T10:00:30Z")).0));
        let b = tokio::spawn(run_sync(state.clone(), clock.clone()));
        wait_for("the missed-run records", || list().len() == 3).await;
        b.abort();
        let l = list();
        let err = |name: &str| {
            let r = l
                .iter()
                .find(|r| matches!(&r.figures, Some(crate::report::Report::Sync(f)) if f.remote == name) && !r.ok)
                .unwrap_or_else(|| panic!("no missed record of {name}: {l:?}"));
            assert_eq!(r.kind, JobKind::Sync);
            r.error.clone().unwrap()
        };
        let e = err("offsite");
        assert!(
            e.starts_with("sync offsite was due at 2026-12-02T02:00:00Z and did not run (2 scheduled runs missed)"),
            "{e}"
        );
        assert!(e.contains("`bkp-server sync --remote offsite`"), "{e}");
        let e = err("hourly");
        assert!(e.starts_with("sync hourly was due at 2026-12-03T10:00:00Z and did not run:"), "{e}");
        // The sync scheduler's note kept verify's.
        let since = state.store().scheduled_since().unwrap().unwrap();
        assert!(since.contains_key("verify"), "{since:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_missed_while_down_is_recorded_at_start() {
        let jobs = JobsConfig { prune: None, gc: None, verify: Some("0 2 * * *".into()), ..Default::default() };
        let (_dir, state) = server(jobs);
        // The last verify ran two days before the server comes back.
        let before = t("2026-11-29T02:00:01Z");
        let old = JobRecord {
            start_ns: before.timestamp_nanos_opt().unwrap() as u64,
            ..missed_record(&Due { kind: Verify, first: before, count: 1 }, 0)
        };
        let old = JobRecord { ok: true, error: None, end_ns: old.start_ns, ..old };
        jobs::record(state.store().as_ref(), state.running(), &old);
        let clock = Arc::new(ManualClock(tokio::sync::watch::channel(t("2026-12-01T10:00:00Z")).0));
        let task = tokio::spawn(run(state.clone(), clock));
        wait_for("the missed-run record", || {
            jobs::list(state.store().as_ref(), state.running(), 10).unwrap().len() == 2
        })
        .await;
        let l = jobs::list(state.store().as_ref(), state.running(), 10).unwrap();
        let e = l[0].error.clone().unwrap_or_default();
        assert!(!l[0].ok, "{l:?}");
        assert!(
            e.starts_with("verify was due at 2026-11-30T02:00:00Z and did not run (2 scheduled runs missed)"),
            "{e}"
        );
        task.abort();
    }
}
