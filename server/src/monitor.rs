//! The monitor: every `check_interval`, and at once when nudged (after a
//! commit, a reported push failure or a missed job), it reads the state of
//! the store (sets and their freshness, failed pushes, job results,
//! damaged snapshots, disk space), turns what is wrong into alert
//! conditions and notifies changes. The same [`Status`] feeds `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bkp_common::snapshot::SnapshotSummary;
use bkp_common::SnapshotId;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::alerts::{self, AlertsConfig, Condition, State};
use crate::freshness::{self, FreshnessConfig, SetStatus};
use crate::jobs::{self, JobKind, JobRecord, JobsConfig, Running};
use crate::push_failures::{self, Failure};
use crate::sessions::Sessions;
use crate::store::{Store, StoreError};
use crate::verify::damage::Damage;
use crate::verify::scrub;

/// Job records read to find each kind's latest run and latest success.
const JOB_HISTORY: usize = 500;
const STATS_BATCH: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// HTTP address of `/metrics` and `/healthz`; unset: none.
    pub listen: Option<SocketAddr>,
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// How often the chunk totals (a scan of every chunk's record) are
    /// recomputed.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self { listen: None, check_interval: Duration::from_secs(60), stats_interval: Duration::from_secs(300) }
    }
}

/// Counters since the server started.
#[derive(Default)]
pub struct Counters {
    pub pushes_ok: AtomicU64,
    pub pushes_failed: AtomicU64,
    pub read_bytes: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub new_bytes: AtomicU64,
    pub notified_firing: AtomicU64,
    pub notified_resolved: AtomicU64,
    pub delivery_failures: AtomicU64,
    /// Commits per (host, set): (ok, failed). A commit whose session had
    /// already expired is counted under the set name "".
    pub per_set: Mutex<std::collections::BTreeMap<(String, String), (u64, u64)>>,
}

impl Monitor {
    /// After a commit: freshness and chunk totals changed.
    pub fn committed(&self) {
        self.stats_dirty.store(true, Ordering::Relaxed);
        self.nudge.notify_one();
    }
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn push_done(&self, host: &str, name: &str, ok: bool) {
        let mut m = self.per_set.lock().expect("per-set counters");
        let e = m.entry((host.to_string(), name.to_string())).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
}

#[derive(Default)]
pub struct Monitor {
    pub counters: Counters,
    stats: Mutex<Option<(Instant, StoreStats)>>,
    /// Set by commits: the totals are recomputed at the next check or
    /// scrape, at most once a second.
    stats_dirty: std::sync::atomic::AtomicBool,
    pub firing: AtomicU64,
    /// Wakes the monitor early (after a commit or a job).
    pub nudge: tokio::sync::Notify,
    /// Where `/metrics` listens, once bound.
    pub http_addr: Mutex<Option<SocketAddr>>,
    /// Failed pushes the clients reported.
    pub push_failures: crate::push_failures::PushFailures,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StoreStats {
    pub chunks: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Disk {
    pub free: u64,
    pub total: u64,
}

/// Everything the alerts and the metrics are made of.
#[derive(Debug)]
pub struct Status {
    pub sets: Vec<SetStatus>,
    /// Per kind: the latest run, and the latest successful one.
    pub jobs: BTreeMap<&'static str, (JobRecord, Option<JobRecord>)>,
    pub damaged: Vec<(SnapshotId, Damage)>,
    pub quarantined: u64,
    pub stats: StoreStats,
    /// Sum of every snapshot's size: what the store would hold without
    /// deduplication.
    pub logical_bytes: u64,
    pub disk: Option<Disk>,
    pub store_disk_bytes: u64,
    pub scrub: scrub::Cursor,
    pub sessions: u64,
    /// Sets with reported push failures, by host/name.
    pub push_failures: Vec<PushFailing>,
    /// Job kinds with a schedule (a kind scheduled but never run shows).
    pub scheduled: Vec<&'static str>,
    /// The object store's figures (backend s3).
    pub backend: Option<crate::store::BackendStats>,
    /// Each `[[sync]]` job's record of where its sets stand.
    pub sync: Vec<SyncStatus>,
}

/// A sync job's state as the monitor reads it.
#[derive(Clone, Debug)]
pub struct SyncStatus {
    pub name: String,
    pub max_lag: Duration,
    pub state: crate::sync::state::SyncState,
}

/// Every configured sync job's stored state (a fresh one when never run
/// or unreadable).
pub fn sync_status(store: &dyn Store, jobs: &[crate::sync::SyncJob]) -> Result<Vec<SyncStatus>, StoreError> {
    jobs.iter()
        .map(|j| {
            let state = crate::sync::state::SyncState::load(store, &j.name)?.unwrap_or_else(|(fresh, _)| fresh);
            Ok(SyncStatus { name: j.name.clone(), max_lag: j.max_lag, state })
        })
        .collect()
}

/// A set's reported push failures, and whether they are still news.
#[derive(Clone, Debug)]
pub struct PushFailing {
    pub failure: Failure,
    /// The newest failure is newer than the newest snapshot.
    pub failing: bool,
    pub last_backup_ns: Option<u64>,
}

pub fn disk(path: &Path) -> Option<Disk> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let unit = s.fragment_size() as u64;
    Some(Disk { free: s.blocks_available() as u64 * unit, total: s.blocks() as u64 * unit })
}

/// What the monitor reads: the store, the live sessions, the job records
/// (stored and unwritten), its own counters and caches, the data
/// directory's filesystem, and its part of the configuration.
pub struct Inputs<'a> {
    pub store: &'a dyn Store,
    pub sessions: &'a Sessions,
    pub running: &'a Running,
    pub monitor: &'a Monitor,
    pub data_dir: &'a Path,
    pub freshness: &'a FreshnessConfig,
    pub alerts: &'a AlertsConfig,
    /// Which kinds are scheduled (a kind scheduled but never run shows).
    pub jobs: &'a JobsConfig,
    /// How often the chunk totals are recomputed (`[monitor]`).
    pub stats_interval: Duration,
    /// `[[sync]]` jobs: their lag alerts and metrics.
    pub sync: &'a [crate::sync::SyncJob],
}

/// Chunk totals, recomputed at most every `stats_interval`.
pub fn store_stats(inp: &Inputs<'_>, fresh: bool) -> Result<StoreStats, StoreError> {
    let mut cached = inp.monitor.stats.lock().expect("stats lock");
    if let Some((at, s)) = *cached {
        let dirty = inp.monitor.stats_dirty.load(Ordering::Relaxed) && at.elapsed() >= Duration::from_secs(1);
        if !fresh && !dirty && at.elapsed() < inp.stats_interval {
            return Ok(s);
        }
    }
    inp.monitor.stats_dirty.store(false, Ordering::Relaxed);
    let mut s = StoreStats::default();
    let mut after = None;
    loop {
        let batch = inp.store.chunk_metas(after.as_ref(), STATS_BATCH)?;
        let Some(last) = batch.last() else { break };
        after = Some(last.0);
        for (_, m) in &batch {
            s.chunks += 1;
            s.raw_bytes += m.raw_len as u64;
            s.stored_bytes += m.stored_len as u64;
        }
    }
    *cached = Some((Instant::now(), s));
    Ok(s)
}

pub fn status(inp: &Inputs<'_>, now_ns: u64) -> Result<Status, StoreError> {
    let summaries = inp.store.list_snapshots(None, None)?;
    status_of(inp, &summaries, now_ns)
}

/// [`status`] from a listing the caller already holds (the status page
/// needs it too).
pub fn status_of(inp: &Inputs<'_>, summaries: &[SnapshotSummary], now_ns: u64) -> Result<Status, StoreError> {
    let store = inp.store;
    let sets = freshness::evaluate(summaries, inp.freshness, now_ns);
    let mut jobs_by_kind: BTreeMap<&'static str, (JobRecord, Option<JobRecord>)> = BTreeMap::new();
    // A refused run (one of its kind was in progress) is not a run.
    for rec in jobs::list(store, inp.running, JOB_HISTORY)
        .map_err(|e| match e {
            jobs::JobsError::Store(s) => s,
            jobs::JobsError::Record(m) => StoreError::Corrupt(format!("job record: {m}")),
        })?
        .into_iter()
        .filter(|r| !r.refused)
    {
        let ok = rec.ok.then(|| rec.clone());
        let e = jobs_by_kind.entry(rec.kind.as_str()).or_insert((rec, None));
        if e.1.is_none() {
            e.1 = ok;
        }
    }
    let mut damaged = Vec::new();
    damaged.extend(store.damaged()?);
    let mut quarantined = 0;
    for (id, _) in store.quarantined()? {
        if store.chunk_meta(&id)?.is_none() {
            quarantined += 1;
        }
    }
    Ok(Status {
        jobs: jobs_by_kind,
        damaged,
        quarantined,
        stats: store_stats(inp, false)?,
        logical_bytes: summaries.iter().map(|s| s.stats.bytes).sum(),
        disk: disk(inp.data_dir),
        store_disk_bytes: store.disk_bytes()?,
        scrub: store.scrub_cursor()?,
        sessions: inp.sessions.live() as u64,
        push_failures: push_failures::all(&inp.monitor.push_failures, store)
            .into_iter()
            .map(|f| {
                let last_backup_ns = sets.iter().find(|s| s.host == f.host && s.name == f.name).map(|s| s.last_ns);
                PushFailing { failing: last_backup_ns.is_none_or(|b| f.last_ns > b), last_backup_ns, failure: f }
            })
            .collect(),
        sets,
        scheduled: inp.jobs.schedules().iter().filter(|(_, e)| e.is_some()).map(|(k, _)| k.as_str()).collect(),
        sync: sync_status(store, inp.sync)?,
        backend: store.backend_stats(),
    })
}

fn time(ns: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// What is wrong now.
pub fn conditions(st: &Status, disk_free_min_percent: f64) -> Vec<Condition> {
    let mut out = Vec::new();
    for s in st.sets.iter().filter(|s| s.stale) {
        out.push(Condition {
            key: format!("stale:{}", s.key()),
            kind: "stale",
            summary: s.describe(),
            fingerprint: "stale".into(),
        });
    }
    for (kind, (last, _)) in &st.jobs {
        // A verify run that found damage is the "damaged" alert's business.
        let found_damage = *kind == JobKind::Verify.as_str() && last.figures.is_some();
        if !last.ok && !found_damage {
            let err = last.error.clone().unwrap_or_default();
            out.push(Condition {
                key: format!("job:{kind}"),
                kind: "job",
                summary: format!("{kind} job failed at {}: {err}", time(last.start_ns)),
                fingerprint: err,
            });
        }
    }
    for j in &st.sync {
        for (set, lag) in &j.state.sets {
            let behind = Duration::from_nanos(lag.lag_ns());
            if behind <= j.max_lag {
                continue;
            }
            let newest = match lag.local_newest_ns {
                0 => "there is no copy of it here yet".to_string(),
                ns => format!("the newest copy here is of {}", time(ns)),
            };
            out.push(Condition {
                key: format!("sync_lag:{}:{set}", j.name),
                kind: "stale",
                summary: format!(
                    "{set}: the copy from {} is {} behind the primary (its newest is of {}; {newest}), over max_lag {}",
                    j.name,
                    humantime::format_duration(Duration::from_secs(behind.as_secs())),
                    time(lag.remote_newest_ns),
                    humantime::format_duration(j.max_lag)
                ),
                fingerprint: "lag".into(),
            });
        }
    }
    for p in st.push_failures.iter().filter(|p| p.failing) {
        let f = &p.failure;
        let newest = match p.last_backup_ns {
            Some(ns) => format!("the newest backup is of {}", time(ns)),
            None => "there is no backup of this set yet".into(),
        };
        out.push(Condition {
            key: format!("push:{}/{}", f.host, f.name),
            kind: "push",
            summary: format!("{}/{}: push failed at {}: {}; {newest}", f.host, f.name, time(f.last_ns), f.reason),
            // One notification per outage, not per failed retry.
            fingerprint: "failed".into(),
        });
    }
    if !st.damaged.is_empty() {
        let mut ids: Vec<String> = st.damaged.iter().map(|(id, _)| id.to_hex()).collect();
        ids.sort();
        let listed: Vec<String> = st
            .damaged
            .iter()
            .take(5)
            .map(|(id, d)| {
                let paths: Vec<&str> = d.paths.iter().take(3).map(String::as_str).collect();
                format!("{}/{} {} of {} ({})", d.host, d.name, id.short(), time(d.time_ns), paths.join(", "))
            })
            .collect();
        let more = st.damaged.len().saturating_sub(5);
        let more = if more > 0 { format!("; and {more} more") } else { String::new() };
        out.push(Condition {
            key: "damaged".into(),
            kind: "verify",
            summary: format!(
                "{} snapshot(s) failed verification: {}{more}; push those sets again to heal the store",
                st.damaged.len(),
                listed.join("; ")
            ),
            fingerprint: ids.join(","),
        });
    }
    if let Some(b) = st.backend {
        if let Some(secs) = b.unreachable_secs.filter(|s| *s >= b.unreachable_alert_secs) {
            out.push(Condition {
                key: "bucket".into(),
                kind: "bucket",
                summary: format!(
                    "the object store has not answered for {secs} s: pushes fail, restores of uncached data fail; \
                     check the bucket's endpoint and network ([storage] in server.toml)"
                ),
                fingerprint: "unreachable".into(),
            });
        }
    }
    if let Some(d) = st.disk.filter(|d| d.total > 0) {
        let pct = d.free as f64 * 100.0 / d.total as f64;
        if pct < disk_free_min_percent {
            out.push(Condition {
                key: "disk".into(),
                kind: "disk",
                summary: format!(
                    "data directory filesystem has {:.1}% free ({} MiB), under the {disk_free_min_percent}% threshold",
                    pct,
                    d.free >> 20
                ),
                fingerprint: "low".into(),
            });
        }
    }
    out
}

fn load_state(store: &dyn Store) -> Result<State, StoreError> {
    store.alert_state()
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "bkp-server".into())
}

/// One check: evaluate, notify changes, remember what was notified.
pub fn check(inp: &Inputs<'_>) -> Result<(), StoreError> {
    jobs::flush_unwritten(inp.store, inp.running);
    let now_ns = crate::clock::now_ns();
    let st = status(inp, now_ns)?;
    let conds = conditions(&st, inp.alerts.disk_free_min_percent);
    inp.monitor.firing.store(conds.len() as u64, Ordering::Relaxed);
    let mut notified = load_state(inp.store)?;
    let server = hostname();
    let mut changed = false;
    for (ev, next) in alerts::diff(&notified, &conds, now_ns, &server) {
        let c = &inp.monitor.counters;
        match alerts::deliver(inp.alerts, &ev) {
            Ok(()) => {
                info!(key = %ev.key, status = ?ev.status, "alert: {}", ev.summary);
                Counters::add(if next.is_some() { &c.notified_firing } else { &c.notified_resolved }, 1);
                match next {
                    Some(n) => notified.insert(ev.key.clone(), n),
                    None => notified.remove(&ev.key),
                };
                changed = true;
            }
            // Left as it was: the next check tries again.
            Err(e) => {
                Counters::add(&c.delivery_failures, 1);
                error!(key = %ev.key, "alert not delivered: {e}");
            }
        }
    }
    if changed {
        inp.store.set_alert_state(&notified)?;
    }
    Ok(())
}
