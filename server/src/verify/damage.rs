//! The `damaged` record: which snapshot failed verification, which chunks
//! and paths, since when. `version:u8 postcard(Damage)`.

use bkp_common::ChunkId;
use serde::{Deserialize, Serialize};

/// Paths and chunk ids kept per record; the count of the rest is kept.
pub const MAX_LISTED: usize = 1000;
/// Refuse records larger than any that [`Damage::encode`] writes.
const MAX_RECORD: usize = 4 << 20;
const VERSION: u8 = 1;

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
    pub fn of(s: &bkp_common::snapshot::SnapshotSummary, now_ns: u64) -> Self {
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
        postcard::to_extend(self, vec![VERSION]).expect("postcard to Vec")
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() > MAX_RECORD {
            return Err(format!("damage record of {} bytes", b.len()));
        }
        match b.split_first() {
            Some((&VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| format!("damage record: {e}")),
            _ => Err("damage record version".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_and_round_trip() {
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
    }

    #[test]
    fn lists_are_capped() {
        let mut d = Damage::default();
        for i in 0..MAX_LISTED + 5 {
            d.add_path(i.to_string());
        }
        assert_eq!((d.paths.len(), d.more_paths), (MAX_LISTED, 5));
    }
}
