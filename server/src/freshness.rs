//! Freshness: is each backup set's newest snapshot recent enough? A pure
//! function of the snapshot list, the config and the time, tested as a
//! table.
//!
//! A set's expected interval comes from `[freshness.sets."host/name"]`,
//! else `[freshness] interval`, else (unless `learn = false`) its own
//! history: the median gap between its last 11 snapshots, when it has at
//! least 3, never under an hour (a burst of manual pushes must not teach
//! the server to expect one a minute). A set is stale when its newest
//! snapshot is older than the interval plus the grace (default: a quarter
//! of the interval).

use std::collections::BTreeMap;
use std::time::Duration;

use bkp_common::snapshot::SnapshotSummary;
use serde::{Deserialize, Serialize};

const LEARN_GAPS: usize = 10;
const MIN_LEARNED: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreshnessConfig {
    /// Interval for every set without its own; unset: learn it.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub grace: Option<Duration>,
    /// Learn an interval from history where none is configured.
    pub learn: bool,
    /// Keyed "host/name".
    pub sets: BTreeMap<String, SetFreshness>,
}

impl Default for FreshnessConfig {
    fn default() -> Self {
        Self { interval: None, grace: None, learn: true, sets: BTreeMap::new() }
    }
}

#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SetFreshness {
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub grace: Option<Duration>,
    /// Never alert on this set (a one-off or retired backup).
    pub ignore: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SetStatus {
    pub host: String,
    pub name: String,
    pub snapshots: u64,
    pub last_ns: u64,
    pub last_bytes: u64,
    /// Files the newest snapshot's push could not read (0: complete).
    pub last_skipped: u64,
    /// `None`: no interval configured and none learned yet.
    pub expected: Option<Duration>,
    pub learned: bool,
    pub grace: Duration,
    pub stale: bool,
    pub age: Duration,
}

impl SetStatus {
    pub fn key(&self) -> String {
        format!("{}/{}", self.host, self.name)
    }

    /// "web01/pgdump: last backup 31h ago, expected daily".
    pub fn describe(&self) -> String {
        let expected = self.expected.map(every).unwrap_or_else(|| "no interval known".into());
        format!("{}: last backup {} ago, expected {expected}", self.key(), ago(self.age))
    }
}

fn every(d: Duration) -> String {
    match d.as_secs() {
        3600 => "hourly".into(),
        86400 => "daily".into(),
        604800 => "weekly".into(),
        _ => format!("every {}", ago(d)),
    }
}

/// A coarse age: "31h", "12m", "40s", "3d".
pub fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..259200 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn learned(times: &[u64]) -> Option<Duration> {
    if times.len() < 3 {
        return None;
    }
    let tail = &times[times.len().saturating_sub(LEARN_GAPS + 1)..];
    let mut gaps: Vec<u64> = tail.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    gaps.sort_unstable();
    Some(Duration::from_nanos(gaps[gaps.len() / 2]).max(MIN_LEARNED))
}

/// Status of every set in `summaries` (any order), sorted by host/name.
pub fn evaluate(summaries: &[SnapshotSummary], cfg: &FreshnessConfig, now_ns: u64) -> Vec<SetStatus> {
    let mut sets: BTreeMap<(&str, &str), Vec<&SnapshotSummary>> = BTreeMap::new();
    for s in summaries {
        sets.entry((&s.host, &s.name)).or_default().push(s);
    }
    let mut out = Vec::with_capacity(sets.len());
    for ((host, name), mut list) in sets {
        list.sort_by_key(|s| s.time_ns);
        let last = list.last().expect("non-empty set");
        let own = cfg.sets.get(&format!("{host}/{name}"));
        let times: Vec<u64> = list.iter().map(|s| s.time_ns).collect();
        let configured = own.and_then(|o| o.interval).or(cfg.interval);
        let (expected, was_learned) = match configured {
            Some(i) => (Some(i), false),
            None if cfg.learn => (learned(&times), true),
            None => (None, false),
        };
        let grace = own.and_then(|o| o.grace).or(cfg.grace).unwrap_or_else(|| expected.unwrap_or_default() / 4);
        let age = Duration::from_nanos(now_ns.saturating_sub(last.time_ns));
        let ignored = own.is_some_and(|o| o.ignore);
        let stale = !ignored && expected.is_some_and(|e| age > e + grace);
        out.push(SetStatus {
            host: host.to_string(),
            name: name.to_string(),
            snapshots: list.len() as u64,
            last_ns: last.time_ns,
            last_bytes: last.stats.bytes,
            last_skipped: last.incomplete.as_ref().map_or(0, |i| i.skipped),
            expected: expected.filter(|_| !ignored),
            learned: was_learned && expected.is_some(),
            grace,
            stale,
            age,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
    use bkp_common::SnapshotId;

    const H: u64 = 3600 * 1_000_000_000;

    fn snaps(set: &str, hours: &[u64]) -> Vec<SnapshotSummary> {
        let (host, name) = set.split_once('/').unwrap();
        hours
            .iter()
            .map(|&h| SnapshotSummary {
                id: SnapshotId::of(format!("{set}{h}").as_bytes()),
                host: host.into(),
                name: name.into(),
                time_ns: h * H,
                kind: SnapshotKind::Stream,
                stats: SnapshotStats::default(),
                protected: false,
                incomplete: None,
            })
            .collect()
    }

    fn cfg(toml_text: &str) -> FreshnessConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn table() {
        let daily = [0, 24, 48, 72];
        // (config, set history in hours, now in hours, expected interval in hours, stale)
        type Case<'a> = (&'a str, &'a [u64], u64, Option<u64>, bool);
        let cases: &[Case] = &[
            // Learned daily, grace 6h: stale only after 30h.
            ("", &daily, 72 + 29, Some(24), false),
            ("", &daily, 72 + 31, Some(24), true),
            // Two snapshots teach nothing: never stale.
            ("", &[0, 24], 500, None, false),
            ("learn = false", &daily, 500, None, false),
            // A global interval applies to all; a set's own wins.
            ("interval = \"6h\"", &[0], 7, Some(6), false),
            ("interval = \"6h\"", &[0], 8, Some(6), true),
            ("interval = \"6h\"\n[sets.\"a/db\"]\ninterval = \"1d\"", &[0], 29, Some(24), false),
            ("[sets.\"a/db\"]\ninterval = \"1d\"\ngrace = \"1h\"", &[0], 26, Some(24), true),
            ("[sets.\"a/db\"]\nignore = true", &daily, 500, None, false),
            // A burst of manual pushes does not teach a one-minute interval.
            ("", &[0, 0, 0, 0], 1, Some(1), false),
            ("", &[0, 0, 0, 0], 2, Some(1), true),
            // The median resists one long outage.
            ("", &[0, 24, 48, 200, 224, 248], 248 + 29, Some(24), false),
        ];
        for (i, (c, hist, now, want, stale)) in cases.iter().enumerate() {
            let st = &evaluate(&snaps("a/db", hist), &cfg(c), now * H)[0];
            assert_eq!(st.expected.map(|d| d.as_secs() / 3600), *want, "case {i}");
            assert_eq!(st.stale, *stale, "case {i}");
        }
    }

    #[test]
    fn sets_are_separate_and_described() {
        let mut all = snaps("web01/pgdump", &[0, 24, 48, 72]);
        all.extend(snaps("web01/files", &[100]));
        let st = evaluate(&all, &FreshnessConfig::default(), (72 + 31) * H);
        assert_eq!(st.len(), 2);
        assert_eq!(st[1].describe(), "web01/pgdump: last backup 31h ago, expected daily");
        assert!(st[1].stale && !st[0].stale);
        assert_eq!(st[1].snapshots, 4);
    }
}
