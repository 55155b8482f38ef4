//! Pushes that failed on the client (`Request::PushFailed`: the dump
//! command exited non-zero, a file could not be read, the connection was
//! lost), kept per set so the monitor alerts at once instead of a day
//! later when the set goes stale.
//!
//! The table lives in memory and each set's entry is written to the
//! store as its own record (`store::schema::PushFailure`) when it
//! changes: a report writes one small record, not the whole table. A
//! write the store refuses is retried at the next change or monitor
//! check (the changed sets are remembered), so a full disk loses nothing
//! while the server runs. A set is *failing* while its newest failure is
//! newer than its newest snapshot: the next good push clears the alert.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use bkp_common::names::check_set_name;
use bkp_common::snapshot::SnapshotKind;
use tracing::error;

pub use crate::store::schema::MAX_REASON;
use crate::store::MetaStore;
pub use crate::store::PushFailure as Failure;

/// Sets tracked; the one failed longest ago goes first.
const MAX_SETS: usize = 4096;
/// Sets tracked per host: a host's own reports evict its oldest entry.
const MAX_SETS_PER_HOST: usize = 64;

type Key = (String, String);

/// The table, loaded from the store on first use.
#[derive(Default)]
pub struct PushFailures {
    table: Mutex<Option<Table>>,
}

#[derive(Default)]
struct Table {
    sets: BTreeMap<Key, Failure>,
    /// Sets changed or evicted since the store last took them.
    unwritten: BTreeSet<Key>,
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}…", bkp_common::names::prefix_within(s, max))
}

/// The stored table; one that cannot be read only costs old counts (the
/// alerts come from what is reported from now on).
fn load(store: &dyn MetaStore) -> Table {
    let sets = store.push_failures().unwrap_or_else(|e| {
        error!("reading push failures: {e}; starting a new table");
        Vec::new()
    });
    Table { sets: sets.into_iter().map(|f| ((f.host.clone(), f.name.clone()), f)).collect(), ..Default::default() }
}

fn with_sets<T>(pf: &PushFailures, store: &dyn MetaStore, f: impl FnOnce(&mut Table) -> T) -> T {
    let mut guard = pf.table.lock().expect("push failures lock");
    let table = guard.get_or_insert_with(|| load(store));
    let out = f(table);
    if !table.unwritten.is_empty() {
        let (put, gone): (Vec<&Key>, Vec<&Key>) = table.unwritten.iter().partition(|k| table.sets.contains_key(*k));
        let put: Vec<Failure> = put.into_iter().map(|k| table.sets[k].clone()).collect();
        let gone: Vec<Key> = gone.into_iter().cloned().collect();
        match store.put_push_failures(&put, &gone) {
            Ok(()) => table.unwritten.clear(),
            Err(e) => error!("recording push failures: {e}; kept in memory until the store takes them"),
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
    with_sets(table, store, |t| {
        let key = (host.to_string(), name.to_string());
        let f = t.sets.entry(key.clone()).or_insert_with(|| Failure {
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
        t.unwritten.insert(key);
        let evicted = evict(&mut t.sets, host);
        t.unwritten.extend(evicted);
    });
    Ok(())
}

/// Keeps the table within its caps. One host's reports displace only its
/// own entries first, so a push token inventing set names cannot erase
/// other hosts' failures (their alerts would resolve). Returns the
/// evicted sets.
fn evict(sets: &mut BTreeMap<Key, Failure>, host: &str) -> Vec<Key> {
    let mut out = Vec::new();
    loop {
        let mine = sets.iter().filter(|((h, _), _)| h == host);
        if mine.clone().count() <= MAX_SETS_PER_HOST {
            break;
        }
        let oldest = mine.min_by_key(|(_, f)| f.last_ns).map(|(k, _)| k.clone()).expect("non-empty");
        sets.remove(&oldest);
        out.push(oldest);
    }
    while sets.len() > MAX_SETS {
        let oldest = sets.iter().min_by_key(|(_, f)| f.last_ns).map(|(k, _)| k.clone()).expect("non-empty");
        sets.remove(&oldest);
        out.push(oldest);
    }
    out
}

/// Every set's failures, by host/name (writing the table if it is owed).
pub fn all(table: &PushFailures, store: &dyn MetaStore) -> Vec<Failure> {
    with_sets(table, store, |t| t.sets.values().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_cannot_evict_another_hosts_failures() {
        let entry = |h: &str, n: String, t: u64| {
            let f = Failure { host: h.into(), name: n.clone(), kind: None, count: 1, last_ns: t, reason: "x".into() };
            ((h.to_string(), n), f)
        };
        let mut sets: BTreeMap<_, _> = [entry("db01", "pgdump".into(), 1)].into_iter().collect();
        let mut evicted = 0;
        for i in 0..1000u64 {
            let (k, f) = entry("evil", format!("junk{i}"), 10 + i);
            sets.insert(k, f);
            evicted += evict(&mut sets, "evil").len();
        }
        assert_eq!(evicted, 1000 - MAX_SETS_PER_HOST, "each eviction is returned, to be deleted from the store");
        assert!(sets.contains_key(&("db01".to_string(), "pgdump".to_string())));
        assert_eq!(sets.len(), 1 + MAX_SETS_PER_HOST);
        assert!(sets.contains_key(&("evil".to_string(), "junk999".to_string())), "the newest stays");
    }

    #[test]
    fn reasons_are_capped_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON);
        let t = truncate(&long, MAX_REASON);
        assert!(t.len() <= MAX_REASON + "…".len());
        assert_eq!(truncate("short", MAX_REASON), "short");
    }
}
