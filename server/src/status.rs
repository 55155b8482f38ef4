//! Status at a glance: one typed report of the sets and their freshness,
//! the jobs, verification, damage, space and firing alerts. Built by
//! [`build`], a pure function of the monitor's [`Status`], the snapshot
//! list and the time, so `bkp-server status`, its `--json` and the HTML
//! page at `/` (`status_html`) show the same thing.

use bkp_common::snapshot::SnapshotSummary;
use serde::{Deserialize, Serialize};

use crate::monitor::{self, Inputs, Status};
use crate::store::StoreError;

/// How far back the per-set history goes.
pub const HISTORY_DAYS: u64 = 90;
const DAY_NS: u64 = 86_400 * 1_000_000_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub generated_ns: u64,
    pub sets: Vec<SetView>,
    pub jobs: Vec<JobView>,
    pub verify: VerifyView,
    pub damaged: Vec<DamagedView>,
    /// Chunks taken out of service that no push has brought back.
    pub quarantined_chunks: u64,
    pub space: SpaceView,
    pub alerts: Vec<AlertView>,
    /// The `[[sync]]` jobs pulling into this server.
    #[serde(default)]
    pub sync: Vec<SyncView>,
}

/// A `[[sync]]` job: where it pulls from and how many copies it made here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncView {
    pub name: String,
    /// The primary's address, as the job last saw it.
    pub server: String,
    /// Snapshots here that this job copied.
    pub copies: u64,
    /// 0: never.
    pub last_run_ns: u64,
    pub last_ok_ns: u64,
    /// Selected sets whose newest copy lags the primary's by more than
    /// the job's `max_lag`.
    pub lagging_sets: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freshness {
    Fresh,
    Stale,
    /// No interval configured and none learned yet (or ignored).
    Unknown,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetView {
    pub host: String,
    pub name: String,
    pub snapshots: u64,
    pub newest_id: String,
    pub newest_ns: u64,
    pub age_secs: u64,
    pub expected_secs: Option<u64>,
    pub freshness: Freshness,
    /// Logical bytes of the newest snapshot.
    pub size_bytes: u64,
    /// Snapshots of this set that failed verification.
    pub damaged: u64,
    /// Files the newest snapshot's push could not read (0: complete), and
    /// the first of them.
    #[serde(default)]
    pub skipped: u64,
    #[serde(default)]
    pub skipped_paths: Vec<String>,
    /// When the newest snapshot is a synced copy: the `[[sync]]` job that
    /// copied it and its primary, "NAME (host:port)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
    /// Snapshots of the last [`HISTORY_DAYS`] days, oldest first.
    pub history: Vec<Point>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub id: String,
    pub time_ns: u64,
    pub bytes: u64,
    pub damaged: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub kind: String,
    pub scheduled: bool,
    /// `None`: never run.
    pub last: Option<JobRun>,
    pub last_ok_ns: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRun {
    pub start_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyView {
    /// Share of the chunks scrubbed in the current cycle (0 to 1).
    pub scrub_coverage: f64,
    pub scrub_cycle_start_ns: u64,
    /// When the last full pass ended; 0: never.
    pub scrub_last_cycle_end_ns: u64,
    pub scrub_last_run_ns: u64,
    /// The last verify run's restore drill.
    pub drill_last_ns: Option<u64>,
    pub drill_snapshots: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedView {
    pub id: String,
    pub host: String,
    pub name: String,
    pub time_ns: u64,
    pub found_ns: u64,
    pub paths: Vec<String>,
    pub more_paths: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceView {
    pub chunks: u64,
    /// Sum of every snapshot's size (without deduplication).
    pub logical_bytes: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub store_disk_bytes: u64,
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertView {
    pub key: String,
    pub kind: String,
    pub summary: String,
}

/// Paths listed per damaged snapshot; the record keeps up to 1000.
const PATHS_SHOWN: usize = 5;

/// The report, from what the monitor read and the snapshot list.
pub fn build(st: &Status, summaries: &[SnapshotSummary], disk_free_min_percent: f64, now_ns: u64) -> ServerStatus {
    let damaged_ids: std::collections::HashSet<String> = st.damaged.iter().map(|(id, _)| id.to_hex()).collect();
    // Which job copied a snapshot: its `synced` list has the id.
    let origin = |id: &bkp_common::SnapshotId| {
        let hex = id.to_hex();
        st.sync.iter().find(|j| j.state.synced.contains_key(&hex)).map(|j| format!("{} ({})", j.name, j.state.server))
    };
    let since = now_ns.saturating_sub(HISTORY_DAYS * DAY_NS);
    let sets = st
        .sets
        .iter()
        .map(|s| {
            let mine: Vec<&SnapshotSummary> =
                summaries.iter().filter(|x| x.host == s.host && x.name == s.name).collect();
            let newest = mine.iter().max_by_key(|x| x.time_ns);
            let mut history: Vec<Point> = mine
                .iter()
                .filter(|x| x.time_ns >= since)
                .map(|x| {
                    let id = x.id.to_hex();
                    Point { damaged: damaged_ids.contains(&id), id, time_ns: x.time_ns, bytes: x.stats.bytes }
                })
                .collect();
            history.sort_by_key(|p| p.time_ns);
            SetView {
                host: s.host.clone(),
                name: s.name.clone(),
                snapshots: s.snapshots,
                newest_id: newest.map(|x| x.id.to_hex()).unwrap_or_default(),
                newest_ns: s.last_ns,
                age_secs: s.age.as_secs(),
                expected_secs: s.expected.map(|d| d.as_secs()),
                freshness: match (s.stale, s.expected) {
                    (true, _) => Freshness::Stale,
                    (false, Some(_)) => Freshness::Fresh,
                    (false, None) => Freshness::Unknown,
                },
                size_bytes: s.last_bytes,
                skipped: newest.and_then(|x| x.incomplete.as_ref()).map_or(0, |i| i.skipped),
                skipped_paths: newest
                    .and_then(|x| x.incomplete.as_ref())
                    .map(|i| i.paths.iter().take(PATHS_SHOWN).cloned().collect())
                    .unwrap_or_default(),
                damaged: st.damaged.iter().filter(|(_, d)| d.host == s.host && d.name == s.name).count() as u64,
                copy_of: newest.and_then(|x| origin(&x.id)),
                history,
            }
        })
        .collect();
    let mut kinds: Vec<&str> = st.jobs.keys().copied().chain(st.scheduled.iter().copied()).collect();
    kinds.sort();
    kinds.dedup();
    let jobs = kinds
        .into_iter()
        .map(|k| {
            let rec = st.jobs.get(k);
            JobView {
                kind: k.to_string(),
                scheduled: st.scheduled.contains(&k),
                last: rec.map(|(r, _)| JobRun {
                    start_ns: r.start_ns,
                    end_ns: r.end_ns,
                    ok: r.ok,
                    error: r.error.clone(),
                }),
                last_ok_ns: rec.and_then(|(_, ok)| ok.as_ref()).map(|r| r.end_ns),
            }
        })
        .collect();
    let verify_job = st.jobs.get(crate::jobs::JobKind::Verify.as_str()).map(|(r, _)| r);
    let mut damaged: Vec<DamagedView> = st
        .damaged
        .iter()
        .map(|(id, d)| DamagedView {
            id: id.to_hex(),
            host: d.host.clone(),
            name: d.name.clone(),
            time_ns: d.time_ns,
            found_ns: d.found_ns,
            paths: d.paths.iter().take(PATHS_SHOWN).cloned().collect(),
            more_paths: d.more_paths + d.paths.len().saturating_sub(PATHS_SHOWN) as u64,
        })
        .collect();
    damaged.sort_by(|a, b| (&a.host, &a.name, a.time_ns).cmp(&(&b.host, &b.name, b.time_ns)));
    let sync = st
        .sync
        .iter()
        .map(|j| SyncView {
            name: j.name.clone(),
            server: j.state.server.clone(),
            copies: summaries.iter().filter(|x| j.state.synced.contains_key(&x.id.to_hex())).count() as u64,
            last_run_ns: j.state.last_run_ns,
            last_ok_ns: j.state.last_ok_ns,
            lagging_sets: j.state.sets.values().filter(|l| l.lag_ns() > j.max_lag.as_nanos() as u64).count() as u64,
        })
        .collect();
    ServerStatus {
        sync,
        generated_ns: now_ns,
        sets,
        jobs,
        verify: VerifyView {
            scrub_coverage: st.scrub.coverage(),
            scrub_cycle_start_ns: st.scrub.cycle_start_ns,
            scrub_last_cycle_end_ns: st.scrub.last_cycle_end_ns,
            scrub_last_run_ns: st.scrub.last_run_ns,
            drill_last_ns: verify_job.map(|r| r.end_ns),
            drill_snapshots: verify_job.and_then(|r| r.verify_report()).map(|v| v.snapshots_drilled),
        },
        damaged,
        quarantined_chunks: st.quarantined,
        space: SpaceView {
            chunks: st.stats.chunks,
            logical_bytes: st.logical_bytes,
            raw_bytes: st.stats.raw_bytes,
            stored_bytes: st.stats.stored_bytes,
            store_disk_bytes: st.store_disk_bytes,
            disk_free_bytes: st.disk.map(|d| d.free),
            disk_total_bytes: st.disk.map(|d| d.total),
        },
        alerts: monitor::conditions(st, disk_free_min_percent)
            .into_iter()
            .map(|c| AlertView { key: c.key, kind: c.kind.to_string(), summary: c.summary })
            .collect(),
    }
}

/// Reads the store (blocking: call off the async runtime).
pub fn collect(inp: &Inputs<'_>) -> Result<ServerStatus, StoreError> {
    crate::jobs::flush_unwritten(inp.store, inp.running);
    let now = crate::clock::now_ns();
    let summaries = inp.store.list_snapshots(None, None)?;
    let st = monitor::status_of(inp, &summaries, now)?;
    Ok(build(&st, &summaries, inp.alerts.disk_free_min_percent, now))
}

/// "3d 4h", "12m", "40s".
pub fn ago(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// 1536 -> "1.5 KiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
    use bkp_common::SnapshotId;

    use super::*;
    use crate::freshness::{FreshnessConfig, SetFreshness};
    use crate::monitor::StoreStats;
    use crate::verify::damage::Damage;
    use crate::verify::scrub;

    const S: u64 = 1_000_000_000;

    fn snap(seed: u8, host: &str, name: &str, time_ns: u64, bytes: u64) -> SnapshotSummary {
        SnapshotSummary {
            id: SnapshotId::from_bytes([seed; 32]),
            host: host.into(),
            name: name.into(),
            time_ns,
            kind: SnapshotKind::Stream,
            stats: SnapshotStats { files: 1, dirs: 0, others: 0, bytes, data_chunks: 1 },
            protected: false,
            incomplete: None,
        }
    }

    fn status(
        summaries: &[SnapshotSummary],
        cfg: &FreshnessConfig,
        damaged: Vec<(SnapshotId, Damage)>,
        now: u64,
    ) -> Status {
        Status {
            sets: crate::freshness::evaluate(summaries, cfg, now),
            jobs: BTreeMap::new(),
            damaged,
            quarantined: 1,
            stats: StoreStats { chunks: 3, raw_bytes: 300, stored_bytes: 100 },
            logical_bytes: summaries.iter().map(|s| s.stats.bytes).sum(),
            disk: None,
            store_disk_bytes: 4096,
            scrub: scrub::Cursor::default(),
            sessions: 0,
            push_failures: Vec::new(),
            scheduled: vec!["verify"],
            sync: Vec::new(),
            backend: None,
        }
    }

    fn freshness(sets: &[(&str, u64)]) -> FreshnessConfig {
        let mut cfg = FreshnessConfig::default();
        for (k, secs) in sets {
            let f =
                SetFreshness { interval: Some(Duration::from_secs(*secs)), grace: Some(Duration::ZERO), ignore: false };
            cfg.sets.insert(k.to_string(), f);
        }
        cfg
    }

    #[test]
    fn a_stale_set_shows_as_stale_and_alerts() {
        let now = 100 * 86_400 * S;
        let list = [
            snap(1, "web01", "old", now - 7200 * S, 10),
            snap(2, "web01", "new", now - 60 * S, 20),
            snap(3, "web01", "new", now - 120 * S, 15),
            snap(4, "web01", "free", now - 60 * S, 5),
        ];
        let cfg = freshness(&[("web01/old", 3600), ("web01/new", 3600)]);
        let r = build(&status(&list, &cfg, Vec::new(), now), &list, 10.0, now);
        let get = |n: &str| r.sets.iter().find(|s| s.name == n).unwrap();
        assert_eq!(get("old").freshness, Freshness::Stale);
        assert_eq!(get("old").age_secs, 7200);
        assert_eq!(get("new").freshness, Freshness::Fresh);
        assert_eq!(get("new").newest_id, SnapshotId::from_bytes([2; 32]).to_hex());
        assert_eq!(get("new").size_bytes, 20);
        assert_eq!(get("new").history.iter().map(|p| p.bytes).collect::<Vec<_>>(), vec![15, 20], "oldest first");
        assert_eq!(get("free").freshness, Freshness::Unknown, "one snapshot teaches no interval");
        assert_eq!(r.alerts.len(), 1, "{:?}", r.alerts);
        assert_eq!(r.alerts[0].key, "stale:web01/old");
        // A scheduled kind that never ran is listed as such.
        assert_eq!(r.jobs.len(), 1);
        assert!(r.jobs[0].scheduled && r.jobs[0].last.is_none());
        assert_eq!(r.space.logical_bytes, 50);
        assert_eq!(r.quarantined_chunks, 1);
    }

    #[test]
    fn a_damaged_snapshot_shows_as_damaged_in_its_set_and_history() {
        let now = 300 * 86_400 * S;
        let list = [
            snap(1, "db01", "pg", now - 200 * 86_400 * S, 1),
            snap(2, "db01", "pg", now - 3 * 86_400 * S, 100),
            snap(3, "db01", "pg", now - 86_400 * S, 110),
        ];
        let mut d = Damage::of(&list[1], now);
        for i in 0..8 {
            d.add_path(format!("/var/lib/f{i}"));
        }
        let damaged = vec![(list[1].id, d)];
        let r = build(&status(&list, &FreshnessConfig::default(), damaged, now), &list, 10.0, now);
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(r.damaged[0].id, list[1].id.to_hex());
        assert_eq!((r.damaged[0].paths.len(), r.damaged[0].more_paths), (5, 3));
        let set = &r.sets[0];
        assert_eq!(set.damaged, 1);
        let marked: Vec<bool> = set.history.iter().map(|p| p.damaged).collect();
        assert_eq!(marked, vec![true, false], "the 200-day-old one is out of the chart");
        assert!(r.alerts.iter().any(|a| a.key == "damaged"), "{:?}", r.alerts);
        // The JSON is what `status --json` and the control socket carry.
        let back: ServerStatus = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    /// The bucket alert fires once the object store has not answered for
    /// `unreachable_alert_secs`, not before, and not while it answers.
    #[test]
    fn an_unreachable_bucket_alerts_after_its_threshold() {
        let now = 10 * 86_400 * S;
        let with = |secs: Option<u64>| {
            let mut st = status(&[], &FreshnessConfig::default(), Vec::new(), now);
            st.backend = Some(crate::store::BackendStats {
                unreachable_secs: secs,
                unreachable_alert_secs: 300,
                ..Default::default()
            });
            build(&st, &[], 10.0, now).alerts
        };
        assert!(with(None).iter().all(|a| a.key != "bucket"));
        assert!(with(Some(299)).iter().all(|a| a.key != "bucket"));
        let fired = with(Some(300));
        let a = fired.iter().find(|a| a.key == "bucket").expect("bucket alert");
        assert!(a.summary.contains("300 s") && a.summary.contains("[storage]"), "{}", a.summary);
    }

    #[test]
    fn history_keeps_the_last_90_days() {
        let now = 400 * 86_400 * S;
        let list = [snap(1, "h", "s", now - 91 * 86_400 * S, 1), snap(2, "h", "s", now - 89 * 86_400 * S, 2)];
        let r = build(&status(&list, &FreshnessConfig::default(), Vec::new(), now), &list, 10.0, now);
        assert_eq!(r.sets[0].snapshots, 2);
        assert_eq!(r.sets[0].history.len(), 1);
        assert_eq!(r.sets[0].history[0].bytes, 2);
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(ago(40), "40s");
        assert_eq!(ago(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12), "12 B");
    }
}
