//! The persisted values other than chunk data and snapshot records (those
//! have their own formats in `bkp_common`): each has a version byte, a
//! size cap checked before decoding, and golden bytes below. A value an
//! older build wrote without a version byte (job records, the alert
//! state: JSON) is still read; the next write replaces it.
//!
//! | value            | where                  | encoding                                  |
//! |------------------|------------------------|-------------------------------------------|
//! | snapshot summary | `sets`                 | `02 postcard(SnapshotSummary)`; v1: `01 postcard(SummaryV1)`, without `incomplete` |
//! | job record       | `jobs`                 | `02 JSON(record)`; v1: bare JSON `{...}`  |
//! | damage record    | `damaged`              | `01 postcard(Damage)`                     |
//! | scrub cursor     | `meta` `scrub_cursor`  | `01 postcard(ScrubCursor)`                |
//! | alert state      | `meta` `alert_state`   | `02 postcard(AlertState)`; v1: bare JSON  |
//!
//! Job records stay JSON inside their frame: each kind's report gains
//! fields over time, and JSON read with serde defaults takes older and
//! newer reports alike, where postcard would need a version per report.

use std::collections::BTreeMap;

use bkp_common::snapshot::{SnapshotSummary, SummaryV1};
use bkp_common::ChunkId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::error::StoreError;

/// Version byte of a value, and whether `b` is a value an older build
/// wrote as bare JSON (an object: `{`).
fn is_bare_json(b: &[u8]) -> bool {
    b.first() == Some(&b'{')
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn capped<'a>(what: &str, b: &'a [u8], cap: usize) -> Result<&'a [u8], StoreError> {
    if b.len() > cap {
        return Err(corrupt(what, format_args!("{} bytes, over the cap of {cap}", b.len())));
    }
    Ok(b)
}

/// Framed postcard: `version postcard(value)`, nothing after it.
fn postcard_decode<T: DeserializeOwned>(what: &str, b: &[u8], version: u8, cap: usize) -> Result<T, StoreError> {
    match capped(what, b, cap)?.split_first() {
        Some((&v, rest)) if v == version => {
            let (value, tail) = postcard::take_from_bytes(rest).map_err(|e| corrupt(what, e))?;
            if !tail.is_empty() {
                return Err(corrupt(what, format_args!("{} bytes after the value", tail.len())));
            }
            Ok(value)
        }
        Some((v, _)) => {
            Err(corrupt(what, format_args!("version {v} is not {version}: written by a newer bkp-server?")))
        }
        None => Err(corrupt(what, "empty")),
    }
}

fn postcard_encode<T: Serialize>(value: &T, version: u8) -> Vec<u8> {
    postcard::to_extend(value, vec![version]).expect("postcard to Vec")
}

// ---- snapshot summary ----

/// Version 2 added `incomplete` (the paths a push could not read).
const SUMMARY_VERSION: u8 = 2;
const SUMMARY_V1: u8 = 1;
/// A summary holds two capped names, a few numbers and at most 100
/// skipped paths of 1 KiB.
pub const MAX_SUMMARY: usize = 256 << 10;

pub fn encode_summary(s: &SnapshotSummary) -> Vec<u8> {
    postcard_encode(s, SUMMARY_VERSION)
}

pub fn decode_summary(b: &[u8]) -> Result<SnapshotSummary, StoreError> {
    if b.first() == Some(&SUMMARY_V1) {
        let v1: SummaryV1 = postcard_decode("snapshot summary", b, SUMMARY_V1, MAX_SUMMARY)?;
        return Ok(v1.into());
    }
    postcard_decode("snapshot summary", b, SUMMARY_VERSION, MAX_SUMMARY)
}

// ---- job record ----

const JOB_VERSION: u8 = 2;
/// A prune's report lists every snapshot's verdict: generous.
pub const MAX_JOB: usize = 16 << 20;

/// A job record (see `crate::jobs::JobRecord`), framed.
pub fn encode_job<T: Serialize>(rec: &T) -> Vec<u8> {
    let mut b = vec![JOB_VERSION];
    serde_json::to_writer(&mut b, rec).expect("record to json");
    b
}

pub fn decode_job<T: DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    let b = capped("job record", b, MAX_JOB)?;
    let json = match b.split_first() {
        // Version 1: the bare JSON record.
        _ if is_bare_json(b) => b,
        Some((&JOB_VERSION, rest)) => rest,
        Some((v, _)) => return Err(corrupt("job record", format_args!("version {v}: written by a newer bkp-server?"))),
        None => return Err(corrupt("job record", "empty")),
    };
    serde_json::from_slice(json).map_err(|e| corrupt("job record", e))
}

// ---- damage record ----

/// Paths and chunk ids kept per damage record; the count of the rest is kept.
pub const MAX_LISTED: usize = 1000;
/// Refuse records larger than any that [`Damage::encode`] writes.
const MAX_DAMAGE: usize = 4 << 20;
const DAMAGE_VERSION: u8 = 1;

/// The `damaged` record: which snapshot failed verification, which chunks
/// and paths, since when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    pub host: String,
    pub name: String,
    pub time_ns: u64,
    /// When verification first found this snapshot damaged.
    pub found_ns: u64,
    pub chunks: Vec<ChunkId>,
    /// Files (or "(snapshot tree)") whose content cannot be restored.
    pub paths: Vec<String>,
    /// Further affected paths not listed.
    pub more_paths: u64,
}

impl Damage {
    /// An empty record for snapshot `s`, found at `now_ns`.
    pub fn of(s: &SnapshotSummary, now_ns: u64) -> Self {
        Self { host: s.host.clone(), name: s.name.clone(), time_ns: s.time_ns, found_ns: now_ns, ..Default::default() }
    }

    pub fn add_path(&mut self, p: String) {
        if self.paths.last() == Some(&p) {
            return;
        }
        if self.paths.len() < MAX_LISTED {
            self.paths.push(p);
        } else {
            self.more_paths += 1;
        }
    }

    pub fn add_chunk(&mut self, id: ChunkId) {
        if self.chunks.len() < MAX_LISTED && !self.chunks.contains(&id) {
            self.chunks.push(id);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard_encode(self, DAMAGE_VERSION)
    }

    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        postcard_decode("damage record", b, DAMAGE_VERSION, MAX_DAMAGE)
    }
}

// ---- scrub cursor ----

const CURSOR_VERSION: u8 = 1;
const MAX_CURSOR: usize = 128;

/// Where the verify job's scrub stands (see `crate::verify::scrub`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubCursor {
    /// The last chunk checked in the current cycle; `None` at its start.
    pub after: Option<ChunkId>,
    pub cycle_start_ns: u64,
    /// When the last full pass over the store ended (0: never).
    pub last_cycle_end_ns: u64,
    pub last_run_ns: u64,
}

impl ScrubCursor {
    pub fn encode(&self) -> Vec<u8> {
        postcard_encode(self, CURSOR_VERSION)
    }

    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        postcard_decode("scrub cursor", b, CURSOR_VERSION, MAX_CURSOR)
    }

    /// Share of the key space (so, of the chunks: ids are hashes) checked
    /// this cycle.
    pub fn coverage(&self) -> f64 {
        self.after.map_or(0.0, |id| {
            u64::from_be_bytes(id.as_bytes()[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64
        })
    }
}

// ---- alert state ----

const ALERT_VERSION: u8 = 2;
/// One entry per firing condition; a few hundred at most.
const MAX_ALERT_STATE: usize = 1 << 20;

/// What was last notified for an alert key that is firing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notified {
    pub kind: String,
    pub summary: String,
    pub fingerprint: String,
    pub since_ns: u64,
}

/// Which alert conditions were last notified, by key (see `crate::alerts`).
pub type AlertState = BTreeMap<String, Notified>;

pub fn encode_alert_state(s: &AlertState) -> Vec<u8> {
    postcard_encode(s, ALERT_VERSION)
}

pub fn decode_alert_state(b: &[u8]) -> Result<AlertState, StoreError> {
    if is_bare_json(capped("alert state", b, MAX_ALERT_STATE)?) {
        // Version 1: bare JSON.
        return serde_json::from_slice(b).map_err(|e| corrupt("alert state", e));
    }
    postcard_decode("alert state", b, ALERT_VERSION, MAX_ALERT_STATE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
    use bkp_common::SnapshotId;

    #[test]
    fn summary_golden() {
        let s = SnapshotSummary {
            id: SnapshotId::from_bytes([7; 32]),
            host: "h".into(),
            name: "n".into(),
            time_ns: 300,
            kind: SnapshotKind::Stream,
            stats: SnapshotStats { files: 1, dirs: 2, others: 0, bytes: 5, data_chunks: 1 },
            protected: true,
            incomplete: None,
        };
        // Version 1, as older servers wrote it, still reads.
        let mut v1 = vec![1];
        v1.extend([7u8; 32]);
        v1.extend([1, b'h', 1, b'n', 0xac, 0x02, 1, 1, 2, 0, 5, 1, 1]);
        assert_eq!(decode_summary(&v1).unwrap(), s);
        let e = encode_summary(&s);
        assert_eq!(e, [&[2][..], &v1[1..], &[0]].concat());
        assert_eq!(decode_summary(&e).unwrap(), s);
        let inc = SnapshotSummary {
            incomplete: Some(bkp_common::snapshot::Incomplete { skipped: 2, paths: vec!["/x".into()] }),
            ..s.clone()
        };
        let e2 = encode_summary(&inc);
        assert_eq!(e2, [&[2][..], &v1[1..], &[1, 2, 1, 2, b'/', b'x']].concat());
        assert_eq!(decode_summary(&e2).unwrap(), inc);
        assert!(decode_summary(&e[..e.len() - 1]).is_err());
        assert!(decode_summary(&v1[..v1.len() - 1]).is_err());
        let mut extra = e.clone();
        extra.push(0);
        assert!(decode_summary(&extra).is_err(), "trailing bytes");
        assert!(decode_summary(&[3]).unwrap_err().to_string().contains("version 3"));
        assert!(decode_summary(&vec![1; MAX_SUMMARY + 1]).unwrap_err().to_string().contains("cap"));
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        kind: String,
        n: u64,
    }

    #[test]
    fn job_golden_and_version_1() {
        let r = Rec { kind: "gc".into(), n: 3 };
        let e = encode_job(&r);
        assert_eq!(e, b"\x02{\"kind\":\"gc\",\"n\":3}");
        assert_eq!(decode_job::<Rec>(&e).unwrap(), r);
        // What builds before the version byte wrote.
        assert_eq!(decode_job::<Rec>(br#"{"kind":"gc","n":3}"#).unwrap(), r);
        assert!(decode_job::<Rec>(b"\x03{}").unwrap_err().to_string().contains("version 3"));
        assert!(decode_job::<Rec>(&[]).is_err());
        let mut big = vec![2u8];
        big.resize(MAX_JOB + 1, b' ');
        assert!(decode_job::<Rec>(&big).unwrap_err().to_string().contains("cap"));
    }

    #[test]
    fn damage_golden_and_round_trip() {
        let mut d = Damage { host: "h".into(), name: "n".into(), time_ns: 1, found_ns: 2, ..Default::default() };
        d.add_path("a".into());
        d.add_path("a".into());
        d.add_chunk(ChunkId::from_bytes([0; 32]));
        let e = d.encode();
        let mut want = vec![1, 1, b'h', 1, b'n', 1, 2, 1];
        want.extend([0u8; 32]);
        want.extend([1, 1, b'a', 0]);
        assert_eq!(e, want);
        assert_eq!(Damage::decode(&e).unwrap(), d);
        assert!(Damage::decode(&[2]).is_err());
        assert!(Damage::decode(&e[..e.len() - 2]).is_err());
        assert!(Damage::decode(&vec![1; MAX_DAMAGE + 1]).unwrap_err().to_string().contains("cap"));
    }

    #[test]
    fn damage_lists_are_capped() {
        let mut d = Damage::default();
        for i in 0..MAX_LISTED + 5 {
            d.add_path(i.to_string());
        }
        assert_eq!((d.paths.len(), d.more_paths), (MAX_LISTED, 5));
    }

    #[test]
    fn scrub_cursor_golden() {
        let c = ScrubCursor {
            after: Some(ChunkId::from_bytes([9; 32])),
            cycle_start_ns: 1,
            last_cycle_end_ns: 0,
            last_run_ns: 128,
        };
        let e = c.encode();
        let mut want = vec![1, 1];
        want.extend([9u8; 32]);
        want.extend([1, 0, 0x80, 0x01]);
        assert_eq!(e, want);
        assert_eq!(ScrubCursor::decode(&e).unwrap(), c);
        // The bytes the cursor's first build wrote for an empty cursor.
        assert_eq!(ScrubCursor::decode(&[1, 0, 0, 0, 0]).unwrap(), ScrubCursor::default());
        assert!(ScrubCursor::decode(&[2, 0, 0, 0, 0]).is_err());
        assert!(ScrubCursor::decode(&[1; MAX_CURSOR + 1]).is_err());
    }

    #[test]
    fn alert_state_golden_and_version_1() {
        let mut s = AlertState::new();
        s.insert(
            "disk".into(),
            Notified { kind: "disk".into(), summary: "low".into(), fingerprint: "f".into(), since_ns: 5 },
        );
        let e = encode_alert_state(&s);
        assert_eq!(e, b"\x02\x01\x04disk\x04disk\x03low\x01f\x05");
        assert_eq!(decode_alert_state(&e).unwrap(), s);
        // What builds before the version byte wrote: serde_json of the map.
        let v1 = br#"{"disk":{"kind":"disk","summary":"low","fingerprint":"f","since_ns":5}}"#;
        assert_eq!(decode_alert_state(v1).unwrap(), s);
        assert_eq!(decode_alert_state(b"{}").unwrap(), AlertState::new());
        assert!(decode_alert_state(&[3, 0]).is_err());
        assert!(decode_alert_state(&e[..e.len() - 1]).is_err());
        assert!(decode_alert_state(&vec![b'{'; MAX_ALERT_STATE + 1]).unwrap_err().to_string().contains("cap"));
    }
}
