//! Pushes that failed on the client (`Request::PushFailed`: the dump
//! command exited non-zero, a file could not be read, the connection was
//! lost), kept per set so the monitor alerts at once instead of a day
//! later when the set goes stale.
//!
//! The table lives in memory and is written to the store's meta record
//! [`META_PUSH_FAILURES`] after every change; a write the store refuses is
//! retried at the next change or monitor check, so a full disk loses
//! nothing while the server runs. A set is *failing* while its newest
//! failure is newer than its newest snapshot: the next good push clears
//! the alert.
//!
//! ```text
//! record = JSON {"version": 1, "sets": [Failure...]}   (at most MAX_RECORD bytes)
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bkp_common::names::check_set_name;
use bkp_common::snapshot::SnapshotKind;
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::store::MetaStore;

pub const META_PUSH_FAILURES: &[u8] = b"push_failures";
const VERSION: u32 = 1;
/// Reason text kept per failure (what a client may send).
pub use bkp_common::protocol::MAX_REASON;
/// Sets tracked; the one failed longest ago goes first.
const MAX_SETS: usize = 4096;
/// Sets tracked per host: a host's own reports evict its oldest entry.
const MAX_SETS_PER_HOST: usize = 64;
/// A stored record larger than this is not parsed (it cannot be ours).
const MAX_RECORD: usize = MAX_SETS * (MAX_REASON + 512);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub host: String,
    pub name: String,
    pub kind: Option<SnapshotKind>,
    /// Failures reported since the set was first seen failing.
    pub count: u64,
    pub last_ns: u64,
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    sets: Vec<Failure>,
}

/// The table, loaded from the store on first use.
#[derive(Default)]
pub struct PushFailures {
    sets: Mutex<Option<BTreeMap<(String, String), Failure>>>,
    unwritten: AtomicBool,
}

pub fn encode(sets: &BTreeMap<(String, String), Failure>) -> Vec<u8> {
    let r = Record { version: VERSION, sets: sets.values().cloned().collect() };
    serde_json::to_vec(&r).expect("failures to json")
}

pub fn decode(b: &[u8]) -> Result<BTreeMap<(String, String), Failure>, String> {
    if b.len() > MAX_RECORD {
        return Err(format!("{} bytes, over the {MAX_RECORD}-byte cap", b.len()));
    }
    let r: Record = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    if r.version != VERSION {
        return Err(format!("version {} is not {VERSION}: written by a newer bkp-server", r.version));
    }
    Ok(r.sets.into_iter().map(|f| ((f.host.clone(), f.name.clone()), f)).collect())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}…", bkp_common::names::prefix_within(s, max))
}

/// The stored table; one that cannot be read only costs old counts (the
/// alerts come from what is reported from now on).
fn load(store: &dyn MetaStore) -> BTreeMap<(String, String), Failure> {
    let stored = match store.meta_get(META_PUSH_FAILURES) {
        Ok(b) => b,
        Err(e) => {
            error!("reading push failures: {e}; starting a new table");
            None
        }
    };
    stored
        .map(|b| {
            decode(&b).unwrap_or_else(|e| {
                warn!("push failure record unreadable ({e}); starting a new one");
                BTreeMap::new()
            })
        })
        .unwrap_or_default()
}

fn with_sets<T>(
    pf: &PushFailures,
    store: &dyn MetaStore,
    f: impl FnOnce(&mut BTreeMap<(String, String), Failure>) -> (T, bool),
) -> T {
    let mut guard = pf.sets.lock().expect("push failures lock");
    let sets = guard.get_or_insert_with(|| load(store));
    let (out, changed) = f(sets);
    if changed || pf.unwritten.load(Ordering::Relaxed) {
        match store.meta_put(META_PUSH_FAILURES, &encode(sets)) {
            Ok(()) => pf.unwritten.store(false, Ordering::Relaxed),
            Err(e) => {
                pf.unwritten.store(true, Ordering::Relaxed);
                error!("recording push failures: {e}; kept in memory until the store takes them");
            }
        }
    }
    out
}

/// A client's report of a failed push of `host`'s set `name`. `Err` is
/// for the client (a bad name); a store that cannot be written is not the
/// client's problem (the failure is kept in memory). The caller nudges the
/// monitor, so that the alert goes out at once.
pub fn report(
    table: &PushFailures,
    store: &dyn MetaStore,
    host: &str,
    name: &str,
    kind: Option<SnapshotKind>,
    reason: &str,
    now_ns: u64,
) -> Result<(), bkp_common::names::NameError> {
    check_set_name(name)?;
    let reason = truncate(reason.trim(), MAX_REASON);
    error!(host, name, "push failed on the client: {reason}");
    with_sets(table, store, |sets| {
        let f = sets.entry((host.to_string(), name.to_string())).or_insert_with(|| Failure {
            host: host.to_string(),
            name: name.to_string(),
            kind,
            count: 0,
            last_ns: 0,
            reason: String::new(),
        });
        f.count += 1;
        f.last_ns = f.last_ns.max(now_ns);
        f.reason = reason;
        f.kind = kind.or(f.kind);
        evict(sets, host);
        ((), true)
    });
    Ok(())
}

/// Keeps the table within its caps. One host's reports displace only its
/// own entries first, so a push token inventing set names cannot erase
/// other hosts' failures (their alerts would resolve).
fn evict(sets: &mut BTreeMap<(String, String), Failure>, host: &str) {
    loop {
        let mine = sets.iter().filter(|((h, _), _)| h == host);
        if mine.clone().count() <= MAX_SETS_PER_HOST {
            break;
        }
        let oldest = mine.min_by_key(|(_, f)| f.last_ns).map(|(k, _)| k.clone()).expect("non-empty");
        sets.remove(&oldest);
    }
    while sets.len() > MAX_SETS {
        let oldest = sets.iter().min_by_key(|(_, f)| f.last_ns).map(|(k, _)| k.clone()).expect("non-empty");
        sets.remove(&oldest);
    }
}

/// Every set's failures, by host/name (writing the table if it is owed).
pub fn all(table: &PushFailures, store: &dyn MetaStore) -> Vec<Failure> {
    with_sets(table, store, |sets| (sets.values().cloned().collect(), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> BTreeMap<(String, String), Failure> {
        let f = Failure {
            host: "db01".into(),
            name: "pgdump".into(),
            kind: Some(SnapshotKind::Stream),
            count: 3,
            last_ns: 7,
            reason: "pg_dump failed".into(),
        };
        [(("db01".into(), "pgdump".into()), f)].into_iter().collect()
    }

    #[test]
    fn one_host_cannot_evict_another_hosts_failures() {
        let entry = |h: &str, n: String, t: u64| {
            let f = Failure { host: h.into(), name: n.clone(), kind: None, count: 1, last_ns: t, reason: "x".into() };
            ((h.to_string(), n), f)
        };
        let mut sets: BTreeMap<_, _> = [entry("db01", "pgdump".into(), 1)].into_iter().collect();
        for i in 0..1000u64 {
            let (k, f) = entry("evil", format!("junk{i}"), 10 + i);
            sets.insert(k, f);
            evict(&mut sets, "evil");
        }
        assert!(sets.contains_key(&("db01".to_string(), "pgdump".to_string())));
        assert_eq!(sets.len(), 1 + MAX_SETS_PER_HOST);
        assert!(sets.contains_key(&("evil".to_string(), "junk999".to_string())), "the newest stays");
    }

    #[test]
    fn round_trip_and_golden_bytes() {
        let b = encode(&one());
        assert_eq!(
            String::from_utf8(b.clone()).unwrap(),
            r#"{"version":1,"sets":[{"host":"db01","name":"pgdump","kind":"Stream","count":3,"last_ns":7,"reason":"pg_dump failed"}]}"#
        );
        assert_eq!(decode(&b).unwrap(), one());
    }

    #[test]
    fn refuses_other_versions_garbage_and_oversize() {
        assert!(decode(br#"{"version":2,"sets":[]}"#).unwrap_err().contains("newer"));
        assert!(decode(b"\xff").is_err());
        assert!(decode(&vec![b' '; MAX_RECORD + 1]).unwrap_err().contains("cap"));
    }

    #[test]
    fn reasons_are_capped_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON);
        let t = truncate(&long, MAX_REASON);
        assert!(t.len() <= MAX_REASON + "…".len());
        assert_eq!(truncate("short", MAX_REASON), "short");
    }
}
