//! `bkp find GLOB`: which snapshots hold a matching path.
//!
//! Nightly snapshots of a tree share most of their tree chunks, and a
//! chunk parses the same way whenever it is entered in the same state:
//! the same unfinished record carried over from the chunk before (and the
//! same stream version). So each chunk's matches are kept under (chunk
//! id, carried bytes), and a later snapshot reads only the chunks whose
//! id or carried state is new: thirty snapshots of a tree cost about one
//! walk plus what changed. Exact: nothing is guessed about where records
//! begin.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bkp_common::snapshot::SnapshotSummary;
use bkp_common::tree::Entry;
use bkp_common::ChunkId;
use serde::Serialize;

use super::node::Kind;
use super::records::Records;
use super::{Shown, TreeReads};
use crate::conn::Client;
use crate::error::{ClientError, Corruption, Result};
use crate::restore::select::Patterns;

/// Tree chunks fetched at once.
const AHEAD: usize = 4;

#[derive(Debug, Serialize)]
pub struct Found {
    pub snapshot: String,
    pub host: String,
    pub name: String,
    pub time: String,
    #[serde(flatten)]
    pub entry: Shown,
}

#[derive(Debug, Default, Serialize)]
pub struct FindReport {
    pub found: Vec<Found>,
    /// Snapshots searched.
    pub snapshots: u64,
    pub tree_chunks: TreeReads,
}

/// What one chunk gave, entered in one state.
struct Parsed {
    matches: Vec<(Vec<u8>, Kind, u64, bkp_common::tree::Meta)>,
    /// The unfinished record it hands on, and the stream's version.
    tail: Vec<u8>,
    version: u8,
}

/// The state a chunk is entered in: `None` before the header.
fn key(id: &ChunkId, state: Option<(u8, &[u8])>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    match state {
        None => h.update(b"start"),
        Some((v, tail)) => h.update(&[v]).update(tail),
    };
    *h.finalize().as_bytes()
}

/// Searches `snapshots` (oldest first in the report) for paths matching
/// `pattern`.
pub async fn find(client: Arc<Client>, pattern: &str, mut snapshots: Vec<SnapshotSummary>) -> Result<FindReport> {
    let matcher = Patterns::new("find", &[pattern.to_string()])?;
    snapshots.sort_by_key(|s| (s.time_ns, s.id));
    let mut cache: HashMap<[u8; 32], Arc<Parsed>> = HashMap::new();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut r = FindReport { snapshots: snapshots.len() as u64, ..Default::default() };
    for s in snapshots {
        let snap = client.snapshot(s.id).await?;
        r.tree_chunks.total += snap.tree.len() as u64;
        let mut state: Option<(u8, Vec<u8>)> = None;
        let mut i = 0;
        while i < snap.tree.len() {
            let k = key(&snap.tree[i], state.as_ref().map(|(v, t)| (*v, &t[..])));
            if let Some(p) = cache.get(&k) {
                report(&mut r, &s, &p.matches);
                state = Some((p.version, p.tail.clone()));
                i += 1;
                continue;
            }
            // A miss: parse on from here, fetching ahead the chunks never
            // seen (a seen one will likely be entered as before: a hit).
            let mut end = i + 1;
            while end < snap.tree.len() && end - i < AHEAD && !seen.contains(&snap.tree[end]) {
                end += 1;
            }
            let fetched = super::fetch_all(&client, snap.tree[i..end].to_vec()).await?;
            r.tree_chunks.fetched += fetched.len() as u64;
            let data: HashMap<ChunkId, Arc<Vec<u8>>> = fetched.into_iter().collect();
            for id in &snap.tree[i..end] {
                let k = key(id, state.as_ref().map(|(v, t)| (*v, &t[..])));
                let p = match cache.get(&k) {
                    Some(p) => p.clone(),
                    None => {
                        let (st, bytes) = (state.clone(), data[id].clone());
                        let m = matcher.clone();
                        let p = tokio::task::spawn_blocking(move || parse(st, &bytes, &m))
                            .await
                            .map_err(|e| ClientError::Task { what: "find thread", source: e })??;
                        let p = Arc::new(p);
                        cache.insert(k, p.clone());
                        p
                    }
                };
                report(&mut r, &s, &p.matches);
                state = Some((p.version, p.tail.clone()));
                seen.insert(*id);
            }
            i = end;
        }
        if state.is_none_or(|(_, t)| !t.is_empty()) {
            return Err(Corruption::Tree(bkp_common::tree::TreeError::Truncated).into());
        }
    }
    Ok(r)
}

fn report(r: &mut FindReport, s: &SnapshotSummary, matches: &[(Vec<u8>, Kind, u64, bkp_common::tree::Meta)]) {
    for (path, kind, size, meta) in matches {
        r.found.push(Found {
            snapshot: s.id.to_string(),
            host: s.host.clone(),
            name: s.name.clone(),
            time: super::rfc3339(s.time_ns as i64),
            entry: Shown::of(path, *kind, *size, meta),
        });
    }
}

fn parse(state: Option<(u8, Vec<u8>)>, chunk: &[u8], m: &Patterns) -> Result<Parsed> {
    let mut rec = match &state {
        None => Records::new(),
        Some((v, tail)) => {
            let mut r = Records::resumed(*v);
            r.feed(tail);
            r
        }
    };
    rec.feed(chunk);
    let mut matches = Vec::new();
    let corrupt = |e| ClientError::Corrupt(Corruption::Tree(e));
    while let Some((_, e)) = rec.next_record().map_err(corrupt)? {
        let Some(kind) = Kind::of(&e) else { continue };
        let path = e.path().unwrap_or_default();
        if !m.matches_entry(path) {
            continue;
        }
        let size = if let Entry::File { size, .. } = &e { *size } else { 0 };
        matches.push((path.to_vec(), kind, size, e.meta().cloned().unwrap_or_default()));
    }
    let version = rec.version().ok_or(corrupt(bkp_common::tree::TreeError::Truncated))?;
    Ok(Parsed { matches, tail: rec.tail().to_vec(), version })
}

/// Keeps the snapshots newer than `since`: an age (`7d`) or an RFC 3339 time.
pub fn since(list: Vec<SnapshotSummary>, since: Option<&str>) -> Result<Vec<SnapshotSummary>> {
    let Some(s) = since else { return Ok(list) };
    let from = match humantime::parse_duration(s) {
        Ok(age) => std::time::SystemTime::now().checked_sub(age).unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            ClientError::Usage(format!(
                "--since {s:?}: give an age (7d, 36h) or an RFC 3339 time (2026-01-31T00:00:00Z)"
            ))
        })?,
    };
    let from_ns = from.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    Ok(list.into_iter().filter(|x| x.time_ns >= from_ns).collect())
}

/// Prints what was found: JSON, or a table (names escaped).
pub fn print(r: &FindReport, json: bool, verbose: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, r)?;
        return writeln!(out);
    }
    if !r.found.is_empty() {
        writeln!(out, "{:<10} {:<21} {:<8} {:>12} {:<21} PATH", "SNAPSHOT", "TIME", "TYPE", "SIZE", "MTIME")?;
    }
    for f in &r.found {
        writeln!(
            out,
            "{:<10} {:<21} {:<8} {:>12} {:<21} {}",
            &f.snapshot[..8],
            f.time,
            f.entry.kind,
            f.entry.size,
            f.entry.mtime,
            bkp_common::names::escape(&f.entry.path)
        )?;
    }
    if verbose {
        eprintln!(
            "{} matches in {} snapshots; read {} of {} tree chunks",
            r.found.len(),
            r.snapshots,
            r.tree_chunks.fetched,
            r.tree_chunks.total
        );
    }
    Ok(())
}
