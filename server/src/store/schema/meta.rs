//! The `meta` records of the scheduler and of the push-failure table:
//! their keys and codecs, each with a version, a size cap checked before
//! decoding, and golden bytes below.
//!
//! | record            | key                               | encoding                                      |
//! |-------------------|-----------------------------------|-----------------------------------------------|
//! | scheduled since   | `scheduled_since`                 | JSON `{"version":1,"since":{"verify":ns,...}}` |
//! | a set's failures  | `push_failure/` host NUL name     | `01 postcard(PushFailure)`                    |
//! | a sync job       | `sync/` NAME                      | JSON `{"version":1,"server":...}` (`crate::sync::state`) |
//! | (v1) all failures | `push_failures`                   | JSON `{"version":1,"sets":[...]}`: read once at open and replaced by one key per set |
//!
//! A failure report rewrites only its own set's key: the whole table (up
//! to 4096 sets) used to be rewritten, synced, on every report.

use std::collections::BTreeMap;

use bkp_common::snapshot::SnapshotKind;
use serde::{Deserialize, Serialize};

use crate::store::error::StoreError;

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn capped<'a>(what: &str, b: &'a [u8], cap: usize) -> Result<&'a [u8], StoreError> {
    if b.len() > cap {
        return Err(corrupt(what, format_args!("{} bytes, over the {cap}-byte cap", b.len())));
    }
    Ok(b)
}

// ---- scheduled since ----

/// When the scheduler first found each job kind scheduled (see
/// `crate::schedule`).
pub const META_SCHEDULED_SINCE: &[u8] = b"scheduled_since";
const SINCE_VERSION: u32 = 1;
/// The record holds at most three kinds; anything larger is not ours.
pub const MAX_SINCE: usize = 4096;

/// Per job kind name: ns since the epoch when it was first seen scheduled.
pub type ScheduledSince = BTreeMap<String, u64>;

#[derive(Serialize, Deserialize)]
struct SinceRecord {
    version: u32,
    since: ScheduledSince,
}

pub fn encode_scheduled_since(s: &ScheduledSince) -> Vec<u8> {
    serde_json::to_vec(&SinceRecord { version: SINCE_VERSION, since: s.clone() }).expect("since to json")
}

pub fn decode_scheduled_since(b: &[u8]) -> Result<ScheduledSince, StoreError> {
    const WHAT: &str = "scheduled-since record";
    let r: SinceRecord = serde_json::from_slice(capped(WHAT, b, MAX_SINCE)?).map_err(|e| corrupt(WHAT, e))?;
    if r.version != SINCE_VERSION {
        return Err(corrupt(
            WHAT,
            format_args!("version {} is not {SINCE_VERSION}: written by a newer bkp-server?", r.version),
        ));
    }
    Ok(r.since)
}

// ---- push failures ----

/// The key prefix of the per-set failure records.
pub const PUSH_FAILURE_PREFIX: &[u8] = b"push_failure/";
/// The whole table in one record, as builds before the per-set keys wrote it.
pub const META_PUSH_FAILURES_V1: &[u8] = b"push_failures";
const FAILURE_VERSION: u8 = 1;
/// Reason text a failure keeps (what a client may send).
pub use bkp_common::protocol::MAX_REASON;
/// Sets the v1 table held at most.
const MAX_SETS_V1: usize = 4096;
/// A failure holds two capped names, a capped reason and a few numbers.
pub const MAX_FAILURE: usize = MAX_REASON + 1024;
const MAX_FAILURES_V1: usize = MAX_SETS_V1 * (MAX_REASON + 512);

/// A set's failed pushes, as the clients reported them (see
/// `crate::push_failures`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushFailure {
    pub host: String,
    pub name: String,
    pub kind: Option<SnapshotKind>,
    /// Failures reported since the set was first seen failing.
    pub count: u64,
    pub last_ns: u64,
    pub reason: String,
}

/// `push_failure/` host NUL name (host and set names never hold NUL).
pub fn push_failure_key(host: &str, name: &str) -> Vec<u8> {
    let mut k = PUSH_FAILURE_PREFIX.to_vec();
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn encode_push_failure(f: &PushFailure) -> Vec<u8> {
    postcard::to_extend(f, vec![FAILURE_VERSION]).expect("postcard to Vec")
}

pub fn decode_push_failure(b: &[u8]) -> Result<PushFailure, StoreError> {
    const WHAT: &str = "push failure record";
    match capped(WHAT, b, MAX_FAILURE)?.split_first() {
        Some((&FAILURE_VERSION, rest)) => {
            let (f, tail) = postcard::take_from_bytes(rest).map_err(|e| corrupt(WHAT, e))?;
            if !tail.is_empty() {
                return Err(corrupt(WHAT, format_args!("{} bytes after the value", tail.len())));
            }
            Ok(f)
        }
        Some((v, _)) => {
            Err(corrupt(WHAT, format_args!("version {v} is not {FAILURE_VERSION}: written by a newer bkp-server?")))
        }
        None => Err(corrupt(WHAT, "empty")),
    }
}

#[derive(Serialize, Deserialize)]
struct FailuresV1 {
    version: u32,
    sets: Vec<PushFailure>,
}

/// The v1 table (read once, when the store opens, to be replaced).
pub fn decode_push_failures_v1(b: &[u8]) -> Result<Vec<PushFailure>, StoreError> {
    const WHAT: &str = "push failure table (v1)";
    let r: FailuresV1 = serde_json::from_slice(capped(WHAT, b, MAX_FAILURES_V1)?).map_err(|e| corrupt(WHAT, e))?;
    if r.version != 1 {
        return Err(corrupt(WHAT, format_args!("version {} is not 1", r.version)));
    }
    Ok(r.sets)
}

// ---- sync jobs ----

/// One set's position behind the primary after the last listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLag {
    /// Time of the primary's newest snapshot of the set.
    pub remote_newest_ns: u64,
    /// Time of the newest snapshot of the set here (0: none).
    pub local_newest_ns: u64,
}

impl SetLag {
    pub fn lag_ns(&self) -> u64 {
        self.remote_newest_ns.saturating_sub(self.local_newest_ns)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub version: u32,
    /// The remote's address at the last run.
    pub server: String,
    /// Remote snapshot ids copied here (hex) and when.
    pub synced: BTreeMap<String, u64>,
    /// Per "host/name" of the sets the job copies.
    pub sets: BTreeMap<String, SetLag>,
    pub last_run_ns: u64,
    pub last_ok_ns: u64,
    pub bytes_total: u64,
    pub chunks_total: u64,
    pub snapshots_total: u64,
}

/// The `[[sync]]` job `name`'s record.
pub fn sync_state_key(name: &str) -> Vec<u8> {
    format!("sync/{name}").into_bytes()
}
const SYNC_VERSION: u32 = 1;
/// About 400,000 copied snapshots.
pub const MAX_SYNC_STATE: usize = 64 << 20;

pub fn encode_sync_state(s: &SyncState) -> Vec<u8> {
    serde_json::to_vec(&SyncState { version: SYNC_VERSION, ..s.clone() }).expect("sync state to json")
}

pub fn decode_sync_state(b: &[u8]) -> Result<SyncState, StoreError> {
    let what = "sync job record";
    let s: SyncState = serde_json::from_slice(capped(what, b, MAX_SYNC_STATE)?).map_err(|e| corrupt(what, e))?;
    if s.version != SYNC_VERSION {
        return Err(corrupt(what, format_args!("version {} is not {SYNC_VERSION}", s.version)));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> PushFailure {
        PushFailure {
            host: "db01".into(),
            name: "pgdump".into(),
            kind: Some(SnapshotKind::Stream),
            count: 3,
            last_ns: 7,
            reason: "pg_dump failed".into(),
        }
    }

    #[test]
    fn scheduled_since_golden_round_trip_and_caps() {
        let s: ScheduledSince = [("verify".to_string(), 7)].into_iter().collect();
        let e = encode_scheduled_since(&s);
        assert_eq!(String::from_utf8(e.clone()).unwrap(), r#"{"version":1,"since":{"verify":7}}"#);
        assert_eq!(decode_scheduled_since(&e).unwrap(), s);
        assert!(decode_scheduled_since(br#"{"version":2,"since":{}}"#).unwrap_err().to_string().contains("version 2"));
        assert!(decode_scheduled_since(b"\xff").is_err());
        assert!(decode_scheduled_since(&vec![b' '; MAX_SINCE + 1]).unwrap_err().to_string().contains("cap"));
    }

    #[test]
    fn push_failure_golden_round_trip_and_caps() {
        let e = encode_push_failure(&failure());
        let mut want = vec![1, 4];
        want.extend(b"db01");
        want.push(6);
        want.extend(b"pgdump");
        // Some(Stream) (variant 1), count 3, last_ns 7, the reason.
        want.extend([1, 1, 3, 7, 14]);
        want.extend(b"pg_dump failed");
        assert_eq!(e, want);
        assert_eq!(decode_push_failure(&e).unwrap(), failure());
        assert!(decode_push_failure(&e[..e.len() - 1]).is_err());
        let mut extra = e.clone();
        extra.push(0);
        assert!(decode_push_failure(&extra).unwrap_err().to_string().contains("after the value"));
        assert!(decode_push_failure(&[2]).unwrap_err().to_string().contains("version 2"));
        assert!(decode_push_failure(&[]).is_err());
        assert!(decode_push_failure(&vec![1; MAX_FAILURE + 1]).unwrap_err().to_string().contains("cap"));
        assert_eq!(push_failure_key("h", "n"), b"push_failure/h\0n");
        // No per-set key is the v1 record's key or sorts among its prefix.
        assert!(!META_PUSH_FAILURES_V1.starts_with(PUSH_FAILURE_PREFIX));
    }

    #[test]
    fn push_failures_v1_still_decodes() {
        let v1 = br#"{"version":1,"sets":[{"host":"db01","name":"pgdump","kind":"Stream","count":3,"last_ns":7,"reason":"pg_dump failed"}]}"#;
        assert_eq!(decode_push_failures_v1(v1).unwrap(), vec![failure()]);
        assert!(decode_push_failures_v1(br#"{"version":2,"sets":[]}"#).is_err());
        assert!(decode_push_failures_v1(&vec![b' '; MAX_FAILURES_V1 + 1]).unwrap_err().to_string().contains("cap"));
    }
}
