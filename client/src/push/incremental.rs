//! Incremental pushes of file trees: a file whose stat key (size, mtime,
//! ctime, inode, device) equals the one recorded by the set's last
//! successful push is not read again; its chunk list and content hash
//! come from the metadata cache ([`super::cache`]).
//!
//! The cache is never trusted over the server: a checker thread streams
//! the old cache ahead of the walk and asks the server (batched
//! `HasChunks`, which also protects what it answers from GC for this push)
//! whether it still holds every chunk of each file. A file with any chunk
//! missing (garbage-collected, quarantined as corrupt) is read again.
//! Files changed in the two seconds before the push started are neither
//! trusted nor recorded: a write later in the same clock tick would leave
//! the stat key unchanged (the "racy git" problem).

use std::cmp::Ordering;
use std::collections::{HashSet, VecDeque};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use bkp_common::protocol::MAX_IDS;
use bkp_common::ChunkId;
use tokio::runtime::Handle;

use super::cache::{path_cmp, CacheReader, CacheWriter, CachedFile, FileKey, Header};
use crate::conn::Client;
use crate::error::Result;

/// Files whose mtime or ctime is this close to the push start are read.
pub const RACY_NS: i64 = 2_000_000_000;
/// Batches of checked files queued for the walk, and files per batch: a
/// hand-off per file woke a thread per file (~150,000 futex calls for the
/// linux-source tree).
const CHECKED_QUEUE: usize = 32;
const CHECKED_BATCH: usize = 512;
/// Files per has-chunk window (files without chunks need no query).
const WINDOW_FILES: usize = 16384;
const QUERIES_IN_FLIGHT: usize = 2;

/// Where the cache lives and whether to use the old one.
#[derive(Clone, Debug)]
pub struct CacheSpec {
    pub dir: PathBuf,
    /// `false` (`--no-cache`): read every file; a fresh cache is still written.
    pub read: bool,
}

pub fn file_key(m: &Metadata) -> FileKey {
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    FileKey {
        size: m.size(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        ino: m.ino(),
        dev: m.dev(),
    }
}

struct Checked {
    file: CachedFile,
    held: bool,
}

/// The producer's side: the old cache's files, checked, in walk order.
struct Previous {
    rx: Receiver<Vec<Checked>>,
    ahead: VecDeque<Checked>,
}

impl Previous {
    /// The cached file at `path`, if the server holds all of its chunks.
    fn take(&mut self, path: &[u8]) -> Option<CachedFile> {
        loop {
            if self.ahead.is_empty() {
                self.ahead = self.rx.recv().ok()?.into();
                continue;
            }
            let head = self.ahead.pop_front()?;
            match path_cmp(&head.file.path, path) {
                Ordering::Less => {}
                Ordering::Equal => return head.held.then_some(head.file),
                Ordering::Greater => {
                    self.ahead.push_front(head);
                    return None;
                }
            }
        }
    }
}

/// The cache state of one push, owned by the producer.
pub struct Incremental {
    previous: Option<Previous>,
    checker: Option<std::thread::JoinHandle<Vec<String>>>,
    next: Option<CacheWriter>,
    trust_before_ns: i64,
    warnings: Vec<String>,
}

impl Incremental {
    /// Opens the old cache (unless `spec.read` is false) and starts the
    /// new one. Any cache problem is a warning, never a failed push.
    pub fn open(spec: &CacheSpec, header: Header, client: Arc<Client>, session: u64, start_ns: i64) -> Self {
        let mut warnings = Vec::new();
        let (mut previous, mut checker) = (None, None);
        if spec.read {
            match CacheReader::open(&spec.dir, &header) {
                Ok(Some(reader)) => {
                    let (p, c) = start_checker(reader, client, session);
                    (previous, checker) = (Some(p), Some(c));
                }
                Ok(None) => {}
                Err(e) => warnings.push(e.to_string()),
            }
        }
        let next = CacheWriter::create(&spec.dir, &header)
            .map_err(|e| warnings.push(format!("{e}; the next push reads every file again")))
            .ok();
        Self { previous, checker, next, trust_before_ns: start_ns - RACY_NS, warnings }
    }

    fn trusted(&self, k: &FileKey) -> bool {
        k.mtime_ns < self.trust_before_ns && k.ctime_ns < self.trust_before_ns
    }

    /// The cached content of `path` if its stat key is unchanged.
    pub fn lookup(&mut self, path: &[u8], key: &FileKey) -> Option<CachedFile> {
        let f = self.previous.as_mut()?.take(path)?;
        (f.key == *key && self.trusted(key)).then_some(f)
    }

    /// Records a file for the next push.
    pub fn record(&mut self, f: &CachedFile) {
        if !self.trusted(&f.key) {
            return;
        }
        if let Some(w) = self.next.as_mut() {
            if let Err(e) = w.add(f) {
                self.warnings.push(format!("{e}; the next push reads every file again"));
                self.next = None;
            }
        }
    }

    /// Stops the checker; returns the new cache (to commit once the
    /// snapshot is) and the warnings.
    pub fn finish(mut self) -> (Option<CacheWriter>, Vec<String>) {
        drop(self.previous.take());
        if let Some(c) = self.checker.take() {
            match c.join() {
                Ok(w) => self.warnings.extend(w),
                Err(_) => self.warnings.push("metadata cache checker failed".into()),
            }
        }
        (self.next.take(), self.warnings)
    }
}

type Query = tokio::task::JoinHandle<Result<HashSet<ChunkId>>>;

/// Streams the old cache to the walk, each file marked with whether the
/// server holds all of its chunks. Stops (the walk then reads the rest)
/// at a damaged record or a failed query, with a warning.
fn start_checker(
    mut reader: CacheReader<std::io::BufReader<std::fs::File>>,
    client: Arc<Client>,
    session: u64,
) -> (Previous, std::thread::JoinHandle<Vec<String>>) {
    let (tx, rx) = sync_channel::<Vec<Checked>>(CHECKED_QUEUE);
    let handle = Handle::current();
    let thread = std::thread::spawn(move || {
        let mut warnings = Vec::new();
        let mut queries: VecDeque<(Vec<CachedFile>, Query)> = VecDeque::new();
        let mut window: Vec<CachedFile> = Vec::new();
        let mut ids: Vec<ChunkId> = Vec::new();
        let mut unique: HashSet<ChunkId> = HashSet::new();
        let mut ended = false;
        while !ended || !window.is_empty() || !queries.is_empty() {
            if !ended {
                match reader.next_file() {
                    Ok(Some(f)) => {
                        ids.extend(f.chunks.iter().map(|c| c.id).filter(|id| unique.insert(*id)));
                        window.push(f);
                    }
                    Ok(None) => ended = true,
                    Err(e) => {
                        warnings.push(e.to_string());
                        ended = true;
                    }
                }
            }
            if !window.is_empty() && (ended || ids.len() >= MAX_IDS || window.len() >= WINDOW_FILES) {
                let q = handle.spawn(missing_of(client.clone(), session, std::mem::take(&mut ids)));
                queries.push_back((std::mem::take(&mut window), q));
                unique.clear();
            }
            if queries.len() >= QUERIES_IN_FLIGHT || (ended && window.is_empty() && !queries.is_empty()) {
                let (files, q) = queries.pop_front().expect("a query is queued");
                let missing = match handle.block_on(q) {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        warnings.push(format!("metadata cache not used: checking its chunks: {e}"));
                        break;
                    }
                    Err(e) => {
                        warnings.push(format!("metadata cache not used: {e}"));
                        break;
                    }
                };
                if !send_checked(&tx, files, &missing) {
                    break; // the walk is over
                }
            }
        }
        warnings
    });
    (Previous { rx, ahead: VecDeque::new() }, thread)
}

fn send_checked(tx: &SyncSender<Vec<Checked>>, files: Vec<CachedFile>, missing: &HashSet<ChunkId>) -> bool {
    let mut files = files.into_iter().peekable();
    while files.peek().is_some() {
        let batch: Vec<Checked> = files
            .by_ref()
            .take(CHECKED_BATCH)
            .map(|file| {
                let held = file.chunks.iter().all(|c| !missing.contains(&c.id));
                Checked { file, held }
            })
            .collect();
        if tx.send(batch).is_err() {
            return false;
        }
    }
    true
}

/// The ids among `ids` that the server does not hold for this host.
async fn missing_of(client: Arc<Client>, session: u64, ids: Vec<ChunkId>) -> Result<HashSet<ChunkId>> {
    let mut missing = HashSet::new();
    for part in ids.chunks(MAX_IDS) {
        let m = client.missing(session, part.to_vec()).await?;
        missing.extend(m.into_iter().map(|i| part[i as usize]));
    }
    Ok(missing)
}
