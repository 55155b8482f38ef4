//! The RocksDB schema: column family names, key encodings and every
//! persisted value's codec (the small ones here, the rest in `values` and
//! `meta`).
//! Only this module knows how keys and values are laid out; tests check
//! that encoded keys sort like the values they encode, and pin each
//! value's bytes.
//!
//! | column family | key                                   | value                  |
//! |---------------|---------------------------------------|------------------------|
//! | `chunks`      | chunk id (32)                         | chunk blob (blob files)|
//! | `chunk_meta`  | chunk id (32)                         | [`ChunkMeta`]          |
//! | `host_chunks` | host NUL chunk id                     | empty                  |
//! | `hosts`       | host name                             | [`HostNum`] u32 LE     |
//! | `snapshots`   | snapshot id (32)                      | snapshot record        |
//! | `sets`        | host NUL name NUL time_ns:u64 BE id   | snapshot summary (`values`) |
//! | `meta`        | ASCII key; `push_failure/` host NUL name; `protected/` id | store metadata (`META_*`), the scheduler's and the push failures' records (`meta`), protected snapshots (empty) |
//! | `jobs`        | start_ns:u64 BE, kind                 | job record (`values`)  |
//! | `quarantine`  | chunk id (32)                         | [`QuarantineRecord`]   |
//! | `damaged`     | snapshot id (32)                      | [`Damage`]             |
//! | `chunk_loc`   | chunk id (32)                         | s3: pack number, offset, length (`s3::Location`) |
//! | `packs`       | pack number:u64 BE                    | s3: uploaded pack's name, kind, size (`s3::PackRecord`) |
//! | `sync_chunks` | chunk id (32)                         | [`Delivered`]: the sync jobs that brought its bytes |
//! | `gc_mark`     | `c` chunk id; `h` host:u32 BE chunk id | empty: a GC's mark set once it outgrew `[gc] mark_memory_mb` (scratch: cleared by each GC) |
//!
//! Which host holds a chunk (has proven it knows the bytes, by uploading
//! them) is recorded once per (host, chunk): for the host that uploaded it
//! first, as the `owner` in its [`ChunkMeta`]; for every further host, as
//! a `host_chunks` key. In a store with one host per chunk (most of them)
//! that saves a key of ~40 bytes per chunk: 2.6 MB of the benchmark's 284.
//!
//! Host and set names never contain NUL (see `bkp_common::names`), so the
//! NUL terminator makes tuple order and byte order agree.

mod meta;
mod values;

pub use meta::{
    decode_push_failure, decode_push_failures_v1, decode_scheduled_since, decode_sync_state, encode_push_failure,
    encode_scheduled_since, encode_sync_state, push_failure_key, sync_state_key, PushFailure, ScheduledSince, SetLag,
    SyncState, MAX_REASON, MAX_SYNC_STATE, META_PUSH_FAILURES_V1, META_SCHEDULED_SINCE, PUSH_FAILURE_PREFIX,
};
pub use values::{
    decode_alert_state, decode_job, decode_summary, encode_alert_state, encode_job, encode_summary, AlertState, Damage,
    Notified, ScrubCursor, MAX_LISTED,
};

use bkp_common::{ChunkId, SnapshotId};

pub const CF_CHUNKS: &str = "chunks";
pub const CF_CHUNK_META: &str = "chunk_meta";
pub const CF_HOST_CHUNKS: &str = "host_chunks";
pub const CF_HOSTS: &str = "hosts";
pub const CF_SNAPSHOTS: &str = "snapshots";
pub const CF_SETS: &str = "sets";
pub const CF_META: &str = "meta";
pub const CF_JOBS: &str = "jobs";
pub const CF_QUARANTINE: &str = "quarantine";
pub const CF_DAMAGED: &str = "damaged";
/// Chunk data on S3 (`store::s3`): where each chunk is, which packs are stored.
pub const CF_CHUNK_LOC: &str = "chunk_loc";
pub const CF_PACKS: &str = "packs";
/// On S3, the local copy of every committed tree chunk (chunk id -> blob).
pub const CF_TREE_CHUNKS: &str = "tree_chunks";
/// On S3, packs whose chunks a GC moved elsewhere (pack number -> empty):
/// deleted by the next GC.
pub const CF_PACKS_RETIRED: &str = "packs_retired";
/// Which `[[sync]]` jobs delivered each chunk's bytes here (chunk id ->
/// [`Delivered`]): the proof a copy needs before it records a chunk
/// stored here for another host without a transfer (`crate::sync::local`).
pub const CF_SYNC_CHUNKS: &str = "sync_chunks";
/// Scratch of a running GC: the part of its mark set that did not fit
/// its memory budget ([`mark_chunk_key`], [`mark_pair_key`]).
pub const CF_GC_MARK: &str = "gc_mark";
pub const ALL_CFS: [&str; 16] = [
    CF_CHUNKS,
    CF_CHUNK_META,
    CF_HOST_CHUNKS,
    CF_HOSTS,
    CF_SNAPSHOTS,
    CF_SETS,
    CF_META,
    CF_JOBS,
    CF_QUARANTINE,
    CF_DAMAGED,
    CF_CHUNK_LOC,
    CF_PACKS,
    CF_TREE_CHUNKS,
    CF_PACKS_RETIRED,
    CF_SYNC_CHUNKS,
    CF_GC_MARK,
];

pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
/// 2: [`ChunkMeta`] v2 with an owner, and `hosts`. A version 1 store is
/// valid version 2 data (its metas have no owner, its possession is all in
/// `host_chunks`) and is upgraded by writing the number; a version 1
/// server refuses the upgraded store instead of misreading its metas.
pub const SCHEMA_VERSION: u32 = 2;
pub const OLDEST_SCHEMA_VERSION: u32 = 1;
/// Where the verify job's scrub stopped (see `crate::verify`).
pub const META_SCRUB_CURSOR: &[u8] = b"scrub_cursor";
/// Which alert conditions were last notified (see `crate::alerts`).
pub const META_ALERT_STATE: &[u8] = b"alert_state";
/// Acknowledged snapshot commits, u64 LE, written in each commit's batch
/// (see `rocks::COMMIT_MARK_FILE`).
pub const META_COMMIT_COUNT: &[u8] = b"commit_count";
/// The next pack number (`store::s3`), u64 LE, synced before it is used.
pub const META_PACKS_NEXT: &[u8] = b"packs_next";
/// Which backend holds this store's chunk data: `local` or `s3`.
pub const META_STORAGE_BACKEND: &[u8] = b"storage_backend";
/// `protected/` snapshot id (32), empty value: a second record of each
/// protected snapshot besides its summary's flag, written in the same
/// batch, so a salvage that must rebuild a lost summary keeps the flag.
pub const PROTECTED_PREFIX: &[u8] = b"protected/";
/// Present (value `01`) once the `protected/` keys were written for every
/// summary that was protected before they existed.
pub const META_PROTECTED_INDEX: &[u8] = b"protected_index";

pub fn protected_key(id: &SnapshotId) -> Vec<u8> {
    let mut k = PROTECTED_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

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

/// A host's number in this store, the owner field of [`ChunkMeta`]:
/// assigned once (from 1, in `hosts`), never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostNum(u32);

impl HostNum {
    pub const FIRST: HostNum = HostNum(1);

    /// None for 0, which encodes "no owner".
    pub fn new(n: u32) -> Option<Self> {
        (n != 0).then_some(Self(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }

    pub fn encode(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        Self::new(u32::from_le_bytes(b.try_into().ok()?))
    }
}

/// Per-chunk facts kept beside the blob so existence checks, sizes and
/// the uploader's possession never touch blob files.
///
/// v2: `02 postcard((raw_len, stored_len, owner))`, three varints, owner 0
/// for none: 7 bytes for a typical small chunk. v1 (read only):
/// `01 raw_len:u32 LE stored_len:u32 LE`, no owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub raw_len: u32,
    pub stored_len: u32,
    /// The host that uploaded it first, while it still holds it (GC
    /// clears this once none of the host's snapshots references it).
    pub owner: Option<HostNum>,
}

impl ChunkMeta {
    const V1: u8 = 1;
    const V2: u8 = 2;
    /// Version byte and three varints of at most 5 bytes.
    pub const MAX_LEN: usize = 16;

    pub fn encode(&self) -> Vec<u8> {
        let owner = self.owner.map_or(0, HostNum::get);
        postcard::to_extend(&(self.raw_len, self.stored_len, owner), vec![Self::V2]).expect("postcard to Vec")
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        match b.split_first()? {
            (&Self::V1, rest) if rest.len() == 8 => Some(Self {
                raw_len: u32::from_le_bytes(rest[..4].try_into().ok()?),
                stored_len: u32::from_le_bytes(rest[4..].try_into().ok()?),
                owner: None,
            }),
            (&Self::V2, rest) if b.len() <= Self::MAX_LEN => {
                let ((raw_len, stored_len, owner), tail) = postcard::take_from_bytes::<(u32, u32, u32)>(rest).ok()?;
                tail.is_empty().then_some(Self { raw_len, stored_len, owner: HostNum::new(owner) })
            }
            _ => None,
        }
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

/// The `[[sync]]` jobs (by name) whose remote sent a chunk's bytes here,
/// each of which has so proven that it knows them. `01 (len:u8 name)*`,
/// names of 1 to 64 bytes, at most [`Delivered::MAX_REMOTES`] of them
/// (more are dropped oldest first: losing one costs a transfer, nothing
/// else).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivered(pub Vec<String>);

impl Delivered {
    const VERSION: u8 = 1;
    pub const MAX_REMOTES: usize = 32;
    pub const MAX_LEN: usize = 1 + Self::MAX_REMOTES * 65;

    pub fn contains(&self, remote: &str) -> bool {
        self.0.iter().any(|r| r == remote)
    }

    /// Adds `remote`; false when it was there already.
    pub fn add(&mut self, remote: &str) -> bool {
        if self.contains(remote) {
            return false;
        }
        if self.0.len() == Self::MAX_REMOTES {
            self.0.remove(0);
        }
        self.0.push(remote.to_string());
        true
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![Self::VERSION];
        for r in &self.0 {
            let r = &r.as_bytes()[..r.len().min(64)];
            b.push(r.len() as u8);
            b.extend_from_slice(r);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() > Self::MAX_LEN {
            return None;
        }
        let (&v, mut rest) = b.split_first()?;
        if v != Self::VERSION {
            return None;
        }
        let mut out = Vec::new();
        while let Some((&len, tail)) = rest.split_first() {
            let len = len as usize;
            if len == 0 || len > 64 || tail.len() < len || out.len() == Self::MAX_REMOTES {
                return None;
            }
            out.push(std::str::from_utf8(&tail[..len]).ok()?.to_string());
            rest = &tail[len..];
        }
        Some(Self(out))
    }
}

/// `gc_mark` key of a marked chunk: `c` chunk id.
pub fn mark_chunk_key(id: &ChunkId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = b'c';
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// The chunk id of a [`mark_chunk_key`].
pub fn split_mark_chunk_key(k: &[u8]) -> Option<ChunkId> {
    match k.split_first() {
        Some((b'c', id)) => ChunkId::from_slice(id),
        _ => None,
    }
}

/// `gc_mark` key of a chunk a host's snapshot references: `h` host
/// number (the GC run's own numbering, u32 BE) chunk id.
pub fn mark_pair_key(host: u32, id: &ChunkId) -> [u8; 37] {
    let mut k = [0u8; 37];
    k[0] = b'h';
    k[1..5].copy_from_slice(&host.to_be_bytes());
    k[5..].copy_from_slice(id.as_bytes());
    k
}

/// A `packs` key: the pack number, big-endian so that keys sort by number.
pub fn pack_key(num: u64) -> [u8; 8] {
    num.to_be_bytes()
}

pub fn pack_num(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
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
    fn delivered_golden_and_caps() {
        let mut d = Delivered::default();
        assert!(d.add("ab") && d.add("c") && !d.add("ab"));
        let e = d.encode();
        assert_eq!(e, [1, 2, b'a', b'b', 1, b'c']);
        assert_eq!(Delivered::decode(&e), Some(d.clone()));
        assert!(Delivered::decode(&[1]).is_some_and(|d| d.0.is_empty()));
        assert_eq!(Delivered::decode(&e[..e.len() - 1]), None, "a name shorter than its length");
        assert_eq!(Delivered::decode(&[2, 1, b'a']), None, "another version");
        assert_eq!(Delivered::decode(&[1, 0]), None, "an empty name");
        assert_eq!(Delivered::decode(&vec![1; Delivered::MAX_LEN + 1]), None, "over the cap");
        for i in 0..Delivered::MAX_REMOTES + 1 {
            d.add(&format!("r{i}"));
        }
        assert_eq!(d.0.len(), Delivered::MAX_REMOTES);
        assert!(!d.contains("ab") && d.contains("r32"));
        assert_eq!(Delivered::decode(&d.encode()), Some(d));
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
        let m = ChunkMeta { raw_len: 300, stored_len: 2, owner: HostNum::new(5) };
        assert_eq!(m.encode(), [2, 0xac, 0x02, 2, 5]);
        assert_eq!(ChunkMeta::decode(&m.encode()), Some(m));
        let none = ChunkMeta { owner: None, ..m };
        assert_eq!(none.encode(), [2, 0xac, 0x02, 2, 0]);
        assert_eq!(ChunkMeta::decode(&none.encode()), Some(none));
        // The largest values fit the cap.
        let max = ChunkMeta { raw_len: u32::MAX, stored_len: u32::MAX, owner: HostNum::new(u32::MAX) };
        assert!(max.encode().len() <= ChunkMeta::MAX_LEN);
        assert_eq!(ChunkMeta::decode(&max.encode()), Some(max));
        // Version 1, as written by schema 1 stores: read, without an owner.
        let v1 = ChunkMeta::decode(&[1, 1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
        assert_eq!(v1, ChunkMeta { raw_len: 1, stored_len: 2, owner: None });
        for bad in [&[1, 1, 0, 0, 0, 2, 0, 0][..], &[3, 1, 2, 0], &[2, 1, 2], &[2, 1, 2, 0, 9], &[]] {
            assert_eq!(ChunkMeta::decode(bad), None, "{bad:?}");
        }
        let mut long = vec![2];
        long.extend([0x80; 15]);
        long.push(0);
        assert_eq!(ChunkMeta::decode(&long), None);
    }

    #[test]
    fn host_num_golden() {
        assert_eq!(HostNum::new(0), None);
        assert_eq!(HostNum::FIRST.encode(), [1, 0, 0, 0]);
        assert_eq!(HostNum::decode(&[2, 1, 0, 0]).map(HostNum::get), Some(258));
        assert_eq!(HostNum::decode(&[0, 0, 0, 0]), None);
        assert_eq!(HostNum::decode(&[1, 0, 0]), None);
        assert_eq!(HostNum::new(u32::MAX).unwrap().next(), None);
    }

    #[test]
    fn mark_keys_sort_like_tuples_and_do_not_overlap() {
        let ids = [ChunkId::from_bytes([0; 32]), ChunkId::from_bytes([1; 32]), ChunkId::from_bytes([0xff; 32])];
        let mut pairs = vec![];
        for h in [0u32, 1, 255, 256, 1 << 24, u32::MAX] {
            for id in ids {
                pairs.push((h, id));
            }
        }
        let mut by_key = pairs.clone();
        by_key.sort_by_key(|(h, id)| mark_pair_key(*h, id));
        pairs.sort();
        assert_eq!(by_key, pairs);
        let mut by_key = ids.to_vec();
        by_key.sort_by_key(mark_chunk_key);
        assert_eq!(by_key, ids);
        // Every chunk key sorts before every pair key: a scan of the
        // chunk keys stops at the first `h`.
        assert!(mark_chunk_key(&ids[2])[..] < mark_pair_key(0, &ids[0])[..]);
        assert_eq!(mark_chunk_key(&ids[1])[..2], [b'c', 1]);
        assert_eq!(mark_pair_key(258, &ids[0])[..6], [b'h', 0, 0, 1, 2, 0]);
        assert_eq!(split_mark_chunk_key(&mark_chunk_key(&ids[2])), Some(ids[2]));
        assert_eq!(split_mark_chunk_key(&mark_pair_key(1, &ids[2])), None);
        assert_eq!(split_mark_chunk_key(b"c"), None);
    }

    #[test]
    fn pack_keys_sort_by_number() {
        let nums = [0u64, 1, 255, 256, 65_535, 1 << 32, u64::MAX - 1, u64::MAX];
        for w in nums.windows(2) {
            assert!(pack_key(w[0]) < pack_key(w[1]), "{} vs {}", w[0], w[1]);
        }
        for n in nums {
            assert_eq!(pack_num(&pack_key(n)), Some(n));
        }
        assert_eq!(pack_num(b"short"), None);
    }
}
