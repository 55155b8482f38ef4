//! Restore drill: rebuild a snapshot's files from the store exactly as a
//! restore reads them (tree stream through `TreeDecoder`, every chunk
//! through `blob::decode_verified`), checking each file's whole-content
//! blake3 against the snapshot. Nothing is written; only a hasher sees the
//! data. A sealed chunk (client-side encryption) is checked as far as the
//! server can without the key: its key hash and ciphertext hash, and its
//! length against the tree; the content hash is then the key holder's. Also: which snapshots reference given chunks, with their paths.

use std::collections::{HashMap, HashSet};

use bkp_common::snapshot::SnapshotSummary;
use bkp_common::tree::{Entry, TreeError};
use bkp_common::{blob, ChunkId, ContentHash, SnapshotId};
use rand::Rng;

use super::damage::Damage;
use crate::store::{Store, StoreError};
use crate::tree_read::{TreeEntries, TreeReadError};

/// The path reported when the snapshot's own tree cannot be read.
pub const TREE_PATH: &str = "(snapshot tree)";
const MISSING: &str = "chunk is missing (quarantined or lost)";

#[derive(Debug, Default)]
pub struct DrillOutcome {
    pub files: u64,
    pub bytes: u64,
    /// Chunks that could not be read back, with why.
    pub bad_chunks: Vec<(ChunkId, String)>,
    /// Files whose content could not be rebuilt.
    pub bad_paths: Vec<String>,
}

impl DrillOutcome {
    pub fn clean(&self) -> bool {
        self.bad_chunks.is_empty() && self.bad_paths.is_empty()
    }
}

fn path_str(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// A data chunk as the drill can read it.
enum Read {
    Plain(Vec<u8>),
    /// Sealed by a client: its key hash and ciphertext hash passed (what
    /// the server can check without the key); the length is the client's.
    Sealed(u32),
}

impl Read {
    fn len(&self) -> usize {
        match self {
            Read::Plain(d) => d.len(),
            Read::Sealed(n) => *n as usize,
        }
    }
}

/// Reads a chunk as restore does; `Err(reason)` when it cannot be used.
fn read_chunk(store: &dyn Store, id: &ChunkId) -> Result<Result<Read, String>, StoreError> {
    Ok(match store.chunk_blob(id)? {
        None => Err(MISSING.to_string()),
        Some(b) if blob::header(&b).is_ok_and(|h| h.codec == blob::Codec::Sealed) => {
            blob::check(&b, id).map(|c| Read::Sealed(c.raw_len)).map_err(|e| e.to_string())
        }
        Some(b) => blob::decode_verified(&b, id).map(Read::Plain).map_err(|e| e.to_string()),
    })
}

struct OpenFile {
    path: String,
    hasher: blake3::Hasher,
    bytes: u64,
    size: u64,
    bad: bool,
    /// Some chunk was sealed: the content hash is the key holder's to
    /// check (`bkp restore --verify-only`).
    sealed: bool,
}

/// Rebuilds every file of a snapshot's tree. `Ok(None)` when the snapshot
/// was deleted meanwhile.
pub fn drill(store: &dyn Store, id: &SnapshotId) -> Result<Option<DrillOutcome>, StoreError> {
    let Some(snap) = store.snapshot(id)? else { return Ok(None) };
    let mut out = DrillOutcome::default();
    let mut open: Option<OpenFile> = None;
    for e in TreeEntries::new(store, &snap.tree) {
        let e = match e {
            Ok(e) => e,
            Err(TreeReadError::Store(s)) => return Err(s),
            Err(e) => {
                if let Some((id, why)) = unreadable(&e) {
                    out.bad_chunks.push((id, why));
                    out.bad_paths.push(TREE_PATH.into());
                } else {
                    out.bad_paths.push(format!("{TREE_PATH}: {e}"));
                }
                return Ok(Some(out));
            }
        };
        {
            match e {
                Entry::File { path, size, .. } => {
                    open = Some(OpenFile {
                        path: path_str(&path),
                        hasher: blake3::Hasher::new(),
                        bytes: 0,
                        size,
                        bad: false,
                        sealed: false,
                    })
                }
                Entry::Chunks(refs) => {
                    let Some(f) = open.as_mut() else { continue };
                    for r in refs {
                        match read_chunk(store, &r.id)? {
                            Ok(d) if d.len() == r.len as usize => {
                                match &d {
                                    Read::Plain(d) => {
                                        f.hasher.update(d);
                                    }
                                    Read::Sealed(_) => f.sealed = true,
                                }
                                f.bytes += d.len() as u64;
                            }
                            Ok(d) => {
                                out.bad_chunks.push((r.id, format!("{} bytes, the tree says {}", d.len(), r.len)));
                                f.bad = true;
                            }
                            Err(why) => {
                                out.bad_chunks.push((r.id, why));
                                f.bad = true;
                            }
                        }
                    }
                }
                Entry::FileEnd { hash } => {
                    if let Some(f) = open.take() {
                        out.files += 1;
                        out.bytes += f.bytes;
                        let hashed = f.sealed || ContentHash::from(f.hasher.finalize()) == hash;
                        let whole = !f.bad && f.bytes == f.size && hashed;
                        if !whole {
                            out.bad_paths.push(f.path);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Some(out))
}

/// The tree chunk a read error is about, with the reason `read_chunk`
/// gives for a data chunk; `None` when the chunks read but the stream
/// does not decode.
fn unreadable(e: &TreeReadError) -> Option<(ChunkId, String)> {
    match e {
        TreeReadError::Missing(id) => Some((*id, MISSING.to_string())),
        TreeReadError::Bad(id, why) => Some((*id, why.to_string())),
        TreeReadError::Decode(_) | TreeReadError::Store(_) => None,
    }
}

/// Which snapshots to drill: the newest of each set always, every
/// snapshot in `must` (damaged ones, to see whether they healed), and each
/// older one with probability `share`.
pub fn sample(
    summaries: &[SnapshotSummary],
    share: f64,
    must: &HashSet<SnapshotId>,
    rng: &mut impl Rng,
) -> Vec<SnapshotSummary> {
    let mut newest: HashMap<(&str, &str), &SnapshotSummary> = HashMap::new();
    for s in summaries {
        let e = newest.entry((&s.host, &s.name)).or_insert(s);
        if s.time_ns > e.time_ns {
            *e = s;
        }
    }
    let newest: HashSet<SnapshotId> = newest.values().map(|s| s.id).collect();
    // A NaN from a config file would make `gen_bool` panic.
    let share = if share.is_finite() { share.clamp(0.0, 1.0) } else { 0.0 };
    summaries
        .iter()
        .filter(|s| newest.contains(&s.id) || must.contains(&s.id) || rng.gen_bool(share))
        .cloned()
        .collect()
}

/// Every snapshot referencing one of `bad`, with the affected paths. Reads
/// only tree chunks, not file data.
pub fn find_affected(
    store: &dyn Store,
    bad: &HashSet<ChunkId>,
    now_ns: u64,
) -> Result<Vec<(SnapshotSummary, Damage)>, StoreError> {
    let mut out = Vec::new();
    if bad.is_empty() {
        return Ok(out);
    }
    for s in store.list_snapshots(None, None)? {
        let Some(snap) = store.snapshot(&s.id)? else { continue };
        let mut d = Damage::of(&s, now_ns);
        let mut path = String::new();
        for e in TreeEntries::new(store, &snap.tree) {
            match e {
                Ok(Entry::File { path: p, .. }) => path = path_str(&p),
                Ok(Entry::Chunks(refs)) => {
                    for r in refs.iter().filter(|r| bad.contains(&r.id)) {
                        d.add_chunk(r.id);
                        d.add_path(path.clone());
                    }
                }
                Ok(_) => {}
                Err(TreeReadError::Store(s)) => return Err(s),
                // Only the end of the stream is short: every reference
                // was seen (the drill reports the tree itself).
                Err(TreeReadError::Decode(TreeError::Truncated)) => {}
                Err(e) => {
                    if let Some((id, _)) = unreadable(&e) {
                        d.add_chunk(id);
                    }
                    d.add_path(TREE_PATH.into());
                }
            }
        }
        if !d.paths.is_empty() {
            out.push((s, d));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
    use rand::SeedableRng;

    fn summ(host: &str, name: &str, t: u64) -> SnapshotSummary {
        SnapshotSummary {
            id: SnapshotId::of(format!("{host}{name}{t}").as_bytes()),
            host: host.into(),
            name: name.into(),
            time_ns: t,
            kind: SnapshotKind::Stream,
            stats: SnapshotStats::default(),
            protected: false,
            incomplete: None,
        }
    }

    #[test]
    fn sample_keeps_newest_and_damaged() {
        let all: Vec<_> = (1..=50).map(|t| summ("a", "db", t)).chain((1..=5).map(|t| summ("b", "db", t))).collect();
        let must: HashSet<_> = [all[3].id].into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let none = sample(&all, 0.0, &must, &mut rng);
        let times: Vec<_> = none.iter().map(|s| (s.host.as_str(), s.time_ns)).collect();
        assert_eq!(times, [("a", 4), ("a", 50), ("b", 5)]);
        assert_eq!(sample(&all, 1.0, &HashSet::new(), &mut rng).len(), all.len());
        assert_eq!(sample(&all, f64::NAN, &HashSet::new(), &mut rng).len(), 2);
        let some = sample(&all, 0.5, &HashSet::new(), &mut rng).len();
        assert!(some > 5 && some < all.len(), "{some}");
    }
}
