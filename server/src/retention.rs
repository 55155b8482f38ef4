//! Retention: which snapshots of one backup set a policy keeps. A pure
//! function of (snapshots, policy, now), tested as a table; the prune job
//! only acts on its plan.
//!
//! Rules work as in restic and Proxmox Backup Server: a snapshot is kept
//! when any rule keeps it. `keep_last = n` keeps the n newest;
//! `keep_daily = n` keeps the newest snapshot of each of the n newest days
//! that have one (likewise hourly, weekly, monthly, yearly);
//! `keep_within = 90d` keeps everything at most that old. Calendar
//! buckets are taken in **UTC** on the server's receive time, so a host's
//! clock or time zone cannot move a snapshot between days; weeks are ISO
//! weeks (Monday first). Two safety rules hold whatever the policy: the
//! newest snapshot of a set is always kept, and protected snapshots are
//! never removed. A policy with no rule keeps everything.
//!
//! # A stolen push token
//! A push token may add snapshots to its host's sets, and the count rules
//! (`keep_last` and the calendar ones) are decided by the newest
//! snapshots: three junk pushes would push the real one out of
//! `keep_last = 3` and become the newest of its day, week and month. So
//! the count rules only count snapshots at least `min_age` old (default
//! 7 days), and every younger snapshot is kept; the newest snapshot older
//! than `min_age` is kept too. Junk younger than `min_age` therefore
//! changes nothing in what happens to the older snapshots: for
//! `min_age` after an attacker's first push, no snapshot that existed
//! before it is removed (the table and the sweep below check this). That
//! is the time to notice, revoke the token and forget the junk; once junk
//! is older than `min_age` it counts like any snapshot. The price is
//! disk: every snapshot of the last `min_age` stays.

use std::time::Duration;

use bkp_common::SnapshotId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    #[serde(with = "humantime_serde")]
    pub keep_within: Option<Duration>,
    /// Snapshots younger than this are kept and not counted by the count
    /// rules (see the module doc); `"0s"` turns that off.
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
}

/// The default `min_age`.
pub const MIN_AGE: Duration = Duration::from_secs(7 * 86_400);

impl Default for Policy {
    fn default() -> Self {
        Self {
            keep_last: 0,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
            keep_within: None,
            min_age: MIN_AGE,
        }
    }
}

impl Policy {
    /// A policy without rules: prune keeps everything.
    pub fn is_empty(&self) -> bool {
        *self == Policy { min_age: self.min_age, ..Policy::default() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Newest,
    Protected,
    NoPolicy,
    /// Younger than the policy's `min_age`.
    #[serde(rename = "min_age")]
    MinAge,
    Last,
    Within,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub id: SnapshotId,
    pub time_ns: u64,
    pub protected: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub id: SnapshotId,
    pub time_ns: u64,
    /// Why it is kept; empty means it is removed.
    pub keep: Vec<Reason>,
}

impl Verdict {
    pub fn kept(&self) -> bool {
        !self.keep.is_empty()
    }
}

fn utc(ns: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ns as i128).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

type Bucket = fn(OffsetDateTime) -> i64;

fn hour(t: OffsetDateTime) -> i64 {
    t.unix_timestamp().div_euclid(3600)
}
fn day(t: OffsetDateTime) -> i64 {
    t.unix_timestamp().div_euclid(86_400)
}
fn week(t: OffsetDateTime) -> i64 {
    let (y, w, _) = t.to_iso_week_date();
    y as i64 * 100 + w as i64
}
fn month(t: OffsetDateTime) -> i64 {
    t.year() as i64 * 100 + t.month() as i64
}
fn year(t: OffsetDateTime) -> i64 {
    t.year() as i64
}

/// The plan for one set, newest first.
pub fn plan(snapshots: &[Candidate], policy: &Policy, now_ns: u64) -> Vec<Verdict> {
    let mut sorted: Vec<Candidate> = snapshots.to_vec();
    // Newest first; the id breaks ties so the plan is deterministic.
    sorted.sort_by(|a, b| b.time_ns.cmp(&a.time_ns).then(b.id.cmp(&a.id)));
    let mut out: Vec<Verdict> =
        sorted.iter().map(|c| Verdict { id: c.id, time_ns: c.time_ns, keep: Vec::new() }).collect();
    let min_age = policy.min_age.as_nanos().min(u64::MAX as u128) as u64;
    // Newest first, so the young ones (the attacker's, perhaps) lead.
    let young = sorted.iter().take_while(|c| c.time_ns > now_ns.saturating_sub(min_age)).count();
    if let Some(v) = out.first_mut() {
        v.keep.push(Reason::Newest);
    }
    if let Some(v) = out.get_mut(young).filter(|_| young > 0) {
        v.keep.push(Reason::Newest);
    }
    for (v, c) in out.iter_mut().zip(&sorted) {
        if c.protected {
            v.keep.push(Reason::Protected);
        }
    }
    if policy.is_empty() {
        for v in &mut out {
            v.keep.push(Reason::NoPolicy);
        }
        return out;
    }
    for v in out.iter_mut().take(young) {
        v.keep.push(Reason::MinAge);
    }
    if let Some(within) = policy.keep_within {
        let limit = within.as_nanos().min(u64::MAX as u128) as u64;
        for v in &mut out {
            if now_ns.saturating_sub(v.time_ns) <= limit {
                v.keep.push(Reason::Within);
            }
        }
    }
    // The count rules see only the settled snapshots.
    let settled = &mut out[young..];
    for v in settled.iter_mut().take(policy.keep_last as usize) {
        v.keep.push(Reason::Last);
    }
    let rules: [(u32, Bucket, Reason); 5] = [
        (policy.keep_hourly, hour, Reason::Hourly),
        (policy.keep_daily, day, Reason::Daily),
        (policy.keep_weekly, week, Reason::Weekly),
        (policy.keep_monthly, month, Reason::Monthly),
        (policy.keep_yearly, year, Reason::Yearly),
    ];
    for (count, bucket, reason) in rules {
        let mut left = count;
        let mut last = None;
        for v in settled.iter_mut() {
            if left == 0 {
                break;
            }
            let b = bucket(utc(v.time_ns));
            if last != Some(b) {
                v.keep.push(reason);
                last = Some(b);
                left -= 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Reason::*;

    const H: u64 = 3600 * 1_000_000_000;
    const D: u64 = 24 * H;
    /// 2026-11-23T00:00:00Z, a Monday.
    const MON: u64 = 1_795_392_000 * 1_000_000_000;

    fn snaps(times: &[u64]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Candidate { id: SnapshotId::from_bytes([i as u8; 32]), time_ns: t, protected: false })
            .collect()
    }

    fn kept(plan: &[Verdict]) -> Vec<(u64, Vec<Reason>)> {
        plan.iter().map(|v| (v.time_ns, v.keep.clone())).collect()
    }

    #[test]
    fn monday_constant_is_a_monday() {
        let t = utc(MON);
        assert_eq!((t.year(), t.month() as u8, t.day(), t.weekday()), (2026, 11, 23, time::Weekday::Monday));
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            times: Vec<u64>,
            policy: Policy,
            now: u64,
            want: Vec<(u64, Vec<Reason>)>,
        }
        // The classic rules alone (min_age off), unless a case sets it.
        let p = |f: fn(&mut Policy)| {
            let mut x = Policy { min_age: Duration::ZERO, ..Policy::default() };
            f(&mut x);
            x
        };
        fn readme(x: &mut Policy) {
            x.keep_last = 3;
            x.keep_daily = 14;
            x.keep_weekly = 8;
            x.keep_monthly = 12;
            x.min_age = MIN_AGE;
        }
        let cases = vec![
            Case { name: "empty set", times: vec![], policy: p(|x| x.keep_last = 3), now: MON, want: vec![] },
            Case {
                name: "no policy keeps all",
                times: vec![MON, MON - D],
                policy: Policy::default(),
                now: MON,
                want: vec![(MON, vec![Newest, NoPolicy]), (MON - D, vec![NoPolicy])],
            },
            Case {
                name: "keep_last",
                times: vec![MON - 2 * D, MON, MON - D],
                policy: p(|x| x.keep_last = 2),
                now: MON,
                want: vec![(MON, vec![Newest, Last]), (MON - D, vec![Last]), (MON - 2 * D, vec![])],
            },
            Case {
                name: "several in one day: daily keeps the newest of the day",
                times: vec![MON + 2 * H, MON + 14 * H, MON + 23 * H, MON - H],
                policy: p(|x| x.keep_daily = 2),
                now: MON + D,
                want: vec![
                    (MON + 23 * H, vec![Newest, Daily]),
                    (MON + 14 * H, vec![]),
                    (MON + 2 * H, vec![]),
                    (MON - H, vec![Daily]),
                ],
            },
            Case {
                name: "daily counts days that have snapshots, not calendar days",
                times: vec![MON, MON - 10 * D, MON - 20 * D],
                policy: p(|x| x.keep_daily = 2),
                now: MON,
                want: vec![(MON, vec![Newest, Daily]), (MON - 10 * D, vec![Daily]), (MON - 20 * D, vec![])],
            },
            Case {
                name: "keep_within boundary is inclusive",
                times: vec![MON, MON - 30 * D, MON - 30 * D - 1],
                policy: p(|x| x.keep_within = Some(Duration::from_secs(30 * 86_400))),
                now: MON,
                want: vec![(MON, vec![Newest, Within]), (MON - 30 * D, vec![Within]), (MON - 30 * D - 1, vec![])],
            },
            Case {
                name: "ISO weeks: Sunday and Monday are different weeks",
                times: vec![MON + H, MON - H, MON - 2 * D],
                policy: p(|x| x.keep_weekly = 5),
                now: MON + D,
                want: vec![(MON + H, vec![Newest, Weekly]), (MON - H, vec![Weekly]), (MON - 2 * D, vec![])],
            },
            Case {
                name: "monthly and yearly",
                times: vec![MON, MON - 23 * D, MON - 30 * D, MON - 400 * D],
                policy: p(|x| {
                    x.keep_monthly = 2;
                    x.keep_yearly = 2
                }),
                now: MON,
                want: vec![
                    (MON, vec![Newest, Monthly, Yearly]),
                    (MON - 23 * D, vec![Monthly]),
                    (MON - 30 * D, vec![]),
                    (MON - 400 * D, vec![Yearly]),
                ],
            },
            Case {
                name: "hourly",
                times: vec![MON + 30 * 60 * 1_000_000_000, MON + 1, MON - 1],
                policy: p(|x| x.keep_hourly = 10),
                now: MON + H,
                want: vec![
                    (MON + 30 * 60 * 1_000_000_000, vec![Newest, Hourly]),
                    (MON + 1, vec![]),
                    (MON - 1, vec![Hourly]),
                ],
            },
            Case {
                name: "README policy, min_age off: three junk pushes remove the real snapshot (the attack)",
                times: vec![MON + 12 * H, MON + 13 * H, MON + 13 * H + 1, MON + 13 * H + 2],
                policy: p(|x| {
                    readme(x);
                    x.min_age = Duration::ZERO
                }),
                now: MON + 14 * H,
                want: vec![
                    (MON + 13 * H + 2, vec![Newest, Last, Daily, Weekly, Monthly]),
                    (MON + 13 * H + 1, vec![Last]),
                    (MON + 13 * H, vec![Last]),
                    (MON + 12 * H, vec![]),
                ],
            },
            Case {
                name: "README policy: the real snapshot outlives three junk pushes",
                times: vec![MON + 12 * H, MON + 13 * H, MON + 13 * H + 1, MON + 13 * H + 2],
                policy: p(readme),
                now: MON + 14 * H,
                want: vec![
                    (MON + 13 * H + 2, vec![Newest, MinAge]),
                    (MON + 13 * H + 1, vec![MinAge]),
                    (MON + 13 * H, vec![MinAge]),
                    (MON + 12 * H, vec![MinAge]),
                ],
            },
            Case {
                name: "junk younger than min_age does not displace older snapshots from the count rules",
                times: vec![MON - 30 * D, MON - 20 * D, MON - 10 * D, MON - H, MON - 2, MON - 1, MON],
                policy: p(|x| {
                    x.keep_last = 2;
                    x.min_age = MIN_AGE
                }),
                now: MON,
                want: vec![
                    (MON, vec![Newest, MinAge]),
                    (MON - 1, vec![MinAge]),
                    (MON - 2, vec![MinAge]),
                    (MON - H, vec![MinAge]),
                    (MON - 10 * D, vec![Newest, Last]),
                    (MON - 20 * D, vec![Last]),
                    (MON - 30 * D, vec![]),
                ],
            },
            Case {
                name: "the newest settled snapshot stays when only keep_within would keep anything",
                times: vec![MON - 100 * D, MON - 95 * D, MON - D],
                policy: p(|x| {
                    x.keep_within = Some(Duration::from_secs(30 * 86_400));
                    x.min_age = MIN_AGE
                }),
                now: MON,
                want: vec![
                    (MON - D, vec![Newest, MinAge, Within]),
                    (MON - 95 * D, vec![Newest]),
                    (MON - 100 * D, vec![]),
                ],
            },
            Case {
                name: "min_age boundary: exactly min_age old is settled",
                times: vec![MON - 7 * D, MON - 7 * D + 1, MON - 8 * D],
                policy: p(|x| {
                    x.keep_last = 1;
                    x.min_age = MIN_AGE
                }),
                now: MON,
                want: vec![
                    (MON - 7 * D + 1, vec![Newest, MinAge]),
                    (MON - 7 * D, vec![Newest, Last]),
                    (MON - 8 * D, vec![]),
                ],
            },
        ];
        for c in cases {
            assert_eq!(kept(&plan(&snaps(&c.times), &c.policy, c.now)), c.want, "case {}", c.name);
        }
    }

    #[test]
    fn protected_stays_and_newest_is_always_kept() {
        // A deterministic sweep standing in for a property test: many sets,
        // many policies; the two safety rules hold for every one.
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let n = (next() % 40) as usize;
            let mut s: Vec<Candidate> = (0..n)
                .map(|i| Candidate {
                    id: SnapshotId::from_bytes([i as u8; 32]),
                    time_ns: MON - (next() % (800 * D)),
                    protected: next() % 7 == 0,
                })
                .collect();
            s.sort_by_key(|c| c.time_ns);
            let policy = Policy {
                keep_last: (next() % 3) as u32,
                keep_daily: (next() % 5) as u32,
                keep_weekly: (next() % 3) as u32,
                keep_monthly: (next() % 3) as u32,
                keep_within: (next() % 2 == 0).then(|| Duration::from_secs(next() % (90 * 86_400))),
                ..Default::default()
            };
            let plan = plan(&s, &policy, MON);
            assert_eq!(plan.len(), n);
            if let Some(newest) = s.last() {
                assert!(plan.iter().any(|v| v.id == newest.id && v.kept()));
            }
            for c in s.iter().filter(|c| c.protected) {
                assert!(plan.iter().any(|v| v.id == c.id && v.kept()));
            }
        }
    }

    /// Random sets and policies: junk pushed after the last real snapshot
    /// and younger than `min_age` at prune time never costs a real
    /// snapshot its place. (Once the junk is older than `min_age` it counts
    /// like any snapshot: `junk_counts_once_settled`.)
    #[test]
    fn young_junk_never_removes_what_was_kept_before() {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let n = (next() % 30) as usize;
            let now = MON + next() % (30 * D);
            let min_age = Duration::from_secs(next() % (10 * 86_400) + 1);
            let min_ns = min_age.as_nanos() as u64;
            let real: Vec<Candidate> = (0..n)
                .map(|i| Candidate {
                    id: SnapshotId::from_bytes([i as u8; 32]),
                    time_ns: (now - min_ns - next() % (400 * D) + next() % (2 * min_ns)).min(now),
                    protected: next() % 9 == 0,
                })
                .collect();
            let start = real.iter().map(|c| c.time_ns).max().unwrap_or(now - min_ns / 2).max(now - min_ns + 1);
            let junk: Vec<Candidate> = (0..(next() % 40))
                .map(|i| Candidate {
                    id: SnapshotId::from_bytes([200u8.wrapping_add(i as u8); 32]),
                    time_ns: start + next() % (now - start + 1),
                    protected: false,
                })
                .collect();
            let policy = Policy {
                keep_last: (next() % 4) as u32,
                keep_hourly: (next() % 3) as u32 * 12,
                keep_daily: (next() % 4) as u32 * 7,
                keep_weekly: (next() % 3) as u32,
                keep_monthly: (next() % 3) as u32 * 6,
                keep_yearly: (next() % 2) as u32,
                keep_within: (next() % 3 == 0).then(|| Duration::from_secs(next() % (60 * 86_400))),
                min_age,
            };
            let before = plan(&real, &policy, now);
            let all: Vec<Candidate> = real.iter().chain(&junk).copied().collect();
            let after = plan(&all, &policy, now);
            for v in before.iter().filter(|v| v.kept()) {
                assert!(
                    after.iter().any(|a| a.id == v.id && a.kept()),
                    "round {round}: {:?} kept as {:?} without junk, removed with {} junk pushes; {policy:?}",
                    v.id,
                    v.keep,
                    junk.len()
                );
            }
        }
    }

    /// The bound of the defence, stated: a week later the same junk
    /// counts, and pushes a real snapshot out of `keep_last`.
    #[test]
    fn junk_counts_once_settled() {
        let real = Candidate { id: SnapshotId::from_bytes([1; 32]), time_ns: MON, protected: false };
        let junk: Vec<Candidate> = (0..3)
            .map(|i| Candidate {
                id: SnapshotId::from_bytes([10 + i; 32]),
                time_ns: MON + H + i as u64,
                protected: false,
            })
            .collect();
        let policy = Policy { keep_last: 3, ..Policy::default() };
        let all: Vec<Candidate> = std::iter::once(real).chain(junk).collect();
        let kept = |now| plan(&all, &policy, now).iter().find(|v| v.id == real.id).unwrap().kept();
        assert!(kept(MON + 2 * H));
        assert!(kept(MON + H + 7 * D - 1), "junk just younger than min_age");
        assert!(!kept(MON + 2 * H + 7 * D), "settled junk counts");
    }

    #[test]
    fn min_age_parses_and_defaults() {
        let p: Policy = toml::from_str("keep_last = 3").unwrap();
        assert_eq!(p.min_age, MIN_AGE);
        let p: Policy = toml::from_str("keep_last = 3\nmin_age = \"0s\"").unwrap();
        assert_eq!(p.min_age, Duration::ZERO);
        assert!(Policy::default().is_empty() && Policy { min_age: Duration::ZERO, ..Default::default() }.is_empty());
        assert!(!p.is_empty());
    }
}
