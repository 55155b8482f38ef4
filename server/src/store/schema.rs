//! The RocksDB key schema: column family names and key encodings. Only
//! this module knows how keys are laid out; tests check that encoded keys
//! sort like the values they encode.
//!
//! | column family | key                                   | value                  |
//! |---------------|---------------------------------------|------------------------|
//! | `chunks`      | chunk id (32)                         | chunk blob (blob files)|
//! | `chunk_meta`  | chunk id (32)                         | [`ChunkMeta`]          |
//! | `host_chunks` | host NUL chunk id                     | empty                  |
//! | `snapshots`   | snapshot id (32)                      | snapshot record        |
//! | `sets`        | host NUL name NUL time_ns:u64 BE id   | snapshot summary       |
//! | `meta`        | ASCII key                             | store metadata         |
//! | `jobs`        | start_ns:u64 BE, kind                 | job run record (JSON)  |
//! | `quarantine`  | chunk id (32)                         | [`QuarantineRecord`]   |
//! | `damaged`     | snapshot id (32)                      | damage record (verify) |
//!
//! Host and set names never contain NUL (see `bkp_common::names`), so the
//! NUL terminator makes tuple order and byte order agree.

use bkp_common::{ChunkId, SnapshotId};

pub const CF_CHUNKS: &str = "chunks";
pub const CF_CHUNK_META: &str = "chunk_meta";
pub const CF_HOST_CHUNKS: &str = "host_chunks";
pub const CF_SNAPSHOTS: &str = "snapshots";
pub const CF_SETS: &str = "sets";
pub const CF_META: &str = "meta";
pub const CF_JOBS: &str = "jobs";
pub const CF_QUARANTINE: &str = "quarantine";
pub const CF_DAMAGED: &str = "damaged";
pub const ALL_CFS: [&str; 9] =
    [CF_CHUNKS, CF_CHUNK_META, CF_HOST_CHUNKS, CF_SNAPSHOTS, CF_SETS, CF_META, CF_JOBS, CF_QUARANTINE, CF_DAMAGED];

pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub const SCHEMA_VERSION: u32 = 1;
/// Where the verify job's scrub stopped (see `crate::verify`).
pub const META_SCRUB_CURSOR: &[u8] = b"scrub_cursor";
/// Which alert conditions were last notified (see `crate::alerts`).
pub const META_ALERT_STATE: &[u8] = b"alert_state";

pub fn host_chunk_key(host: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(host.len() + 33);
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Splits a `host_chunks` key back into its host and chunk id.
pub fn split_host_chunk_key(k: &[u8]) -> Option<(String, ChunkId)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let host = std::str::from_utf8(&k[..nul]).ok()?.to_string();
    Some((host, ChunkId::from_slice(&k[nul + 1..])?))
}

pub fn job_key(start_ns: u64, kind: &str) -> Vec<u8> {
    let mut k = start_ns.to_be_bytes().to_vec();
    k.extend_from_slice(kind.as_bytes());
    k
}

pub fn host_prefix(host: &str) -> Vec<u8> {
    let mut k = host.as_bytes().to_vec();
    k.push(0);
    k
}

pub fn set_prefix(host: &str, name: &str) -> Vec<u8> {
    let mut k = host_prefix(host);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

pub fn set_key(host: &str, name: &str, time_ns: u64, id: &SnapshotId) -> Vec<u8> {
    let mut k = set_prefix(host, name);
    k.extend_from_slice(&time_ns.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Per-chunk facts kept beside the blob so existence checks and sizes
/// never touch blob files. `version:u8 raw_len:u32 LE stored_len:u32 LE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub raw_len: u32,
    pub stored_len: u32,
}

impl ChunkMeta {
    const VERSION: u8 = 1;

    pub fn encode(&self) -> [u8; 9] {
        let mut b = [0u8; 9];
        b[0] = Self::VERSION;
        b[1..5].copy_from_slice(&self.raw_len.to_le_bytes());
        b[5..9].copy_from_slice(&self.stored_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 9 || b[0] != Self::VERSION {
            return None;
        }
        Some(Self {
            raw_len: u32::from_le_bytes(b[1..5].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[5..9].try_into().ok()?),
        })
    }
}

/// A chunk taken out of service by the verify job: kept, never deleted,
/// so an operator can inspect it. `version:u8 found_ns:u64 BE
/// reason_len:u16 BE reason blob_len:u32 BE blob` (blob empty when the
/// chunk's data was missing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub found_ns: u64,
    pub reason: String,
    pub blob: Vec<u8>,
}

impl QuarantineRecord {
    const VERSION: u8 = 1;
    const MAX_REASON: usize = 1024;

    pub fn encode(&self) -> Vec<u8> {
        let reason = &self.reason.as_bytes()[..self.reason.len().min(Self::MAX_REASON)];
        let mut b = Vec::with_capacity(19 + reason.len() + self.blob.len());
        b.push(Self::VERSION);
        b.extend_from_slice(&self.found_ns.to_be_bytes());
        b.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        b.extend_from_slice(reason);
        b.extend_from_slice(&(self.blob.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.blob);
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let (&v, rest) = b.split_first()?;
        if v != Self::VERSION || rest.len() < 14 {
            return None;
        }
        let found_ns = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let rlen = u16::from_be_bytes(rest[8..10].try_into().ok()?) as usize;
        let rest = &rest[10..];
        if rlen > Self::MAX_REASON || rest.len() < rlen + 4 {
            return None;
        }
        let reason = String::from_utf8_lossy(&rest[..rlen]).into_owned();
        let blen = u32::from_be_bytes(rest[rlen..rlen + 4].try_into().ok()?) as usize;
        let blob = &rest[rlen + 4..];
        if blob.len() != blen || blen > bkp_common::blob::MAX_BLOB {
            return None;
        }
        Some(Self { found_ns, reason, blob: blob.to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keys_sort_like_tuples() {
        let ids = [SnapshotId::from_bytes([1; 32]), SnapshotId::from_bytes([2; 32])];
        let mut tuples = vec![];
        for host in ["a", "ab", "b", "a.b"] {
            for name in ["db", "d", "files"] {
                for t in [0u64, 1, 255, 256, 1 << 40, u64::MAX] {
                    for id in ids {
                        tuples.push((host, name, t, id));
                    }
                }
            }
        }
        let mut by_key = tuples.clone();
        by_key.sort_by_key(|(h, n, t, id)| set_key(h, n, *t, id));
        tuples.sort();
        assert_eq!(by_key, tuples);
    }

    #[test]
    fn prefixes_do_not_overlap() {
        // "a" must not match keys of host "ab", nor set "d" those of "db".
        let k = set_key("ab", "db", 5, &SnapshotId::from_bytes([0; 32]));
        assert!(!k.starts_with(&host_prefix("a")));
        assert!(!k.starts_with(&set_prefix("ab", "d")));
        assert!(k.starts_with(&set_prefix("ab", "db")));
        let c = host_chunk_key("ab", &ChunkId::from_bytes([9; 32]));
        assert!(c.starts_with(&host_prefix("ab")) && !c.starts_with(&host_prefix("a")));
        assert_eq!(split_host_chunk_key(&c), Some(("ab".to_string(), ChunkId::from_bytes([9; 32]))));
        assert_eq!(split_host_chunk_key(b"nonul"), None);
        assert!(job_key(1, "gc") < job_key(256, "gc") && job_key(2, "gc") < job_key(2, "prune"));
    }

    #[test]
    fn quarantine_record_golden() {
        let r = QuarantineRecord { found_ns: 258, reason: "bad".into(), blob: vec![7, 8] };
        let e = r.encode();
        assert_eq!(e, [1, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3, b'b', b'a', b'd', 0, 0, 0, 2, 7, 8]);
        assert_eq!(QuarantineRecord::decode(&e), Some(r));
        assert_eq!(QuarantineRecord::decode(&e[..e.len() - 1]), None);
        assert_eq!(QuarantineRecord::decode(&[2]), None);
        // A length field claiming more than is there is refused, not trusted.
        let mut lie = e.clone();
        lie[14..18].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(QuarantineRecord::decode(&lie), None);
    }

    #[test]
    fn chunk_meta_golden() {
        let m = ChunkMeta { raw_len: 1, stored_len: 2 };
        assert_eq!(m.encode(), [1, 1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(ChunkMeta::decode(&m.encode()), Some(m));
        assert_eq!(ChunkMeta::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }
}
