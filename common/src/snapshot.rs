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
    fn rejects_bad_records() {
        let b = sample().encode();
        assert_eq!(Snapshot::decode(&b[..3]), Err(SnapshotError::Magic));
        let mut v = b.clone();
        v[4] = 2;
        assert_eq!(Snapshot::decode(&v), Err(SnapshotError::Version(2)));
        assert!(matches!(Snapshot::decode(&b[..b.len() - 3]), Err(SnapshotError::Decode(_))));
    }
}
