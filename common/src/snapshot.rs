//! Snapshot records, as the server stores them and sends them.
//!
//! ```text
//! record = "BKPS" version:u8 postcard(Snapshot)   (at most MAX_SNAPSHOT bytes)
//! ```
//! The id is the blake3 of the record bytes, so a record cannot be
//! swapped for another under the same id.

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, SnapshotId};

pub const MAGIC: &[u8; 4] = b"BKPS";
pub const VERSION: u8 = 1;
/// Tree streams of about 16 million chunks; far beyond any real tree.
pub const MAX_SNAPSHOT: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// A directory tree (`bkp push PATH...`).
    Tree,
    /// A single stream (`--stdin` or `-- CMD`): one file entry.
    Stream,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Logical bytes of all files.
    pub bytes: u64,
    pub data_chunks: u64,
}

/// What a listing shows. Counted by the server from the tree it checked
/// at commit, never taken from the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub id: SnapshotId,
    pub host: String,
    pub name: String,
    /// Server receive time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub kind: SnapshotKind,
    pub stats: SnapshotStats,
    /// Protected snapshots are never removed by prune.
    pub protected: bool,
    /// Files the client could not read, left out of the snapshot; `None`:
    /// complete. Not sent in the answers of protocol version 1 (those
    /// carry [`SummaryV1`]); see [`Request::ListSnapshotsFull`].
    ///
    /// [`Request::ListSnapshotsFull`]: crate::protocol::Request::ListSnapshotsFull
    pub incomplete: Option<Incomplete>,
}

/// Paths listed on an incomplete snapshot; the count of the rest is kept.
pub const MAX_INCOMPLETE_PATHS: usize = 100;
/// Bytes of one listed path (longer ones are cut at a character boundary).
pub const MAX_INCOMPLETE_PATH: usize = 1024;

/// What a push left out because it could not be read (`bkp push` exits 3).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incomplete {
    /// Paths skipped, at least `paths.len()`.
    pub skipped: u64,
    /// The first [`MAX_INCOMPLETE_PATHS`] of them, as the client named them.
    pub paths: Vec<String>,
}

impl Incomplete {
    /// From every skipped path: counted, and the first ones kept, capped.
    pub fn of<'a>(paths: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut out = Incomplete::default();
        for p in paths {
            out.skipped += 1;
            if out.paths.len() < MAX_INCOMPLETE_PATHS {
                out.paths.push(crate::names::prefix_within(p, MAX_INCOMPLETE_PATH).to_string());
            }
        }
        (out.skipped > 0).then_some(out)
    }

    /// Whether a peer's record keeps the caps (the server checks this
    /// before storing it).
    pub fn check(&self) -> Result<(), String> {
        if self.skipped == 0 || self.paths.len() as u64 > self.skipped {
            return Err(format!("{} paths listed of {} skipped", self.paths.len(), self.skipped));
        }
        if self.paths.len() > MAX_INCOMPLETE_PATHS {
            return Err(format!("more than {MAX_INCOMPLETE_PATHS} skipped paths listed"));
        }
        if self.paths.iter().any(|p| p.len() > MAX_INCOMPLETE_PATH) {
            return Err(format!("a skipped path over {MAX_INCOMPLETE_PATH} bytes"));
        }
        Ok(())
    }
}

/// [`SnapshotSummary`] as protocol version 1 answers carry it
/// (`Committed`, `Snapshots`) and as summary values of version 1 were
/// stored: without `incomplete`, so older clients keep decoding them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryV1 {
    pub id: SnapshotId,
    pub host: String,
    pub name: String,
    pub time_ns: u64,
    pub kind: SnapshotKind,
    pub stats: SnapshotStats,
    pub protected: bool,
}

impl From<SnapshotSummary> for SummaryV1 {
    fn from(s: SnapshotSummary) -> Self {
        let SnapshotSummary { id, host, name, time_ns, kind, stats, protected, incomplete: _ } = s;
        SummaryV1 { id, host, name, time_ns, kind, stats, protected }
    }
}

impl From<SummaryV1> for SnapshotSummary {
    fn from(s: SummaryV1) -> Self {
        let SummaryV1 { id, host, name, time_ns, kind, stats, protected } = s;
        SnapshotSummary { id, host, name, time_ns, kind, stats, protected, incomplete: None }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub host: String,
    pub name: String,
    pub time_ns: u64,
    pub kind: SnapshotKind,
    pub stats: SnapshotStats,
    /// The tree stream's chunks, in order.
    pub tree: Vec<ChunkId>,
    /// Client software that made it, for support.
    pub client: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot record has bad magic")]
    Magic,
    #[error("snapshot record version {0} is not supported by this build; upgrade bkp")]
    Version(u8),
    #[error("snapshot record of {0} bytes exceeds the cap")]
    TooLarge(usize),
    #[error("snapshot record does not decode: {0}")]
    Decode(String),
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        postcard::to_extend(self, out).expect("postcard to Vec")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() > MAX_SNAPSHOT {
            return Err(SnapshotError::TooLarge(bytes.len()));
        }
        if bytes.len() < 5 || &bytes[..4] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        if bytes[4] != VERSION {
            return Err(SnapshotError::Version(bytes[4]));
        }
        postcard::from_bytes(&bytes[5..]).map_err(|e| SnapshotError::Decode(e.to_string()))
    }

    pub fn summary(&self, id: SnapshotId) -> SnapshotSummary {
        SnapshotSummary {
            id,
            host: self.host.clone(),
            name: self.name.clone(),
            time_ns: self.time_ns,
            kind: self.kind,
            stats: self.stats.clone(),
            protected: false,
            incomplete: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            host: "web01".into(),
            name: "pgdump".into(),
            time_ns: 1,
            kind: SnapshotKind::Stream,
            stats: SnapshotStats { files: 1, ..Default::default() },
            tree: vec![ChunkId::from_bytes([7; 32])],
            client: "t".into(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn golden_bytes() {
        let b = sample().encode();
        let mut want = b"BKPS\x01\x05web01\x06pgdump\x01\x01\x01\x00\x00\x00\x00\x01".to_vec();
        want.extend_from_slice(&[7; 32]);
        want.extend_from_slice(b"\x01t");
        assert_eq!(b, want);
    }

    #[test]
    fn incomplete_is_capped_and_checked() {
        let long = "é".repeat(MAX_INCOMPLETE_PATH);
        let paths: Vec<String> = (0..150).map(|i| if i == 0 { long.clone() } else { format!("/p{i}") }).collect();
        let inc = Incomplete::of(paths.iter().map(String::as_str)).unwrap();
        assert_eq!((inc.skipped, inc.paths.len()), (150, MAX_INCOMPLETE_PATHS));
        assert!(inc.paths[0].len() <= MAX_INCOMPLETE_PATH && inc.paths[1] == "/p1");
        inc.check().unwrap();
        assert!(Incomplete::of([]).is_none());
        assert!(Incomplete { skipped: 1, paths: vec!["a".into(), "b".into()] }.check().is_err());
        assert!(Incomplete { skipped: 0, paths: vec![] }.check().is_err());
        assert!(Incomplete { skipped: 1, paths: vec![long] }.check().is_err());
    }

    #[test]
    fn rejects_bad_records() {
        let b = sample().encode();
        assert_eq!(Snapshot::decode(&b[..3]), Err(SnapshotError::Magic));
        let mut v = b.clone();
        v[4] = 2;
        assert_eq!(Snapshot::decode(&v), Err(SnapshotError::Version(2)));
        assert!(matches!(Snapshot::decode(&b[..b.len() - 3]), Err(SnapshotError::Decode(_))));
    }
}
