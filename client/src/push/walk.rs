//! The push producer: walks file trees (or reads one stream), chunks and
//! hashes the data, and writes the tree stream. Runs on its own thread;
//! chunks go to the pipeline ([`super::pipeline`]) through a bounded
//! channel and a byte budget, so memory is bounded whatever the size of
//! the input. Unchanged files come from the metadata cache
//! ([`super::incremental`]) instead of being read.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bkp_common::chunker::{ChunkReadError, PushChunker, StreamChunker};
use bkp_common::tree::{ChunkRef, Entry, Meta, SpecialKind, TreeEncoder, MAX_CHUNKS_PER_RECORD};
use bkp_common::{ChunkId, ContentHash};

use super::cache::{CacheWriter, CachedFile};
use super::excludes::Excludes;
use super::file_meta;
use super::incremental::{file_key, Incremental};
use super::lister::Listed;
use super::pipeline::ChunkSink;
use crate::error::{ClientError, Result};
use crate::progress::Progress;

/// A path a tree push could not read and left out of the snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub path: String,
    pub error: String,
}

/// What a producer made: the tree stream's chunks and what to report.
pub struct Produced {
    pub tree: Vec<ChunkId>,
    pub warnings: Vec<String>,
    /// Left out because they could not be read (the push exits 3).
    pub skipped: Vec<Skipped>,
    pub files_read: u64,
    pub files_cached: u64,
    /// The new metadata cache, to put in place once the snapshot commits.
    pub cache: Option<CacheWriter>,
}

pub struct Producer {
    sink: ChunkSink,
    chunker: StreamChunker,
    tree: TreeEncoder,
    tree_chunker: PushChunker,
    tree_ids: Vec<ChunkId>,
    progress: Arc<dyn Progress>,
    /// (dev, inode) -> path of files with more than one link.
    links: HashMap<(u64, u64), Vec<u8>>,
    excludes: Arc<Excludes>,
    cache: Option<Incremental>,
    files_read: u64,
    files_cached: u64,
    pub warnings: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// Chunks cut ahead of the hashing thread (up to 4 MiB each).
const READ_AHEAD_CHUNKS: usize = 4;
/// Files from this size are read and cut on a thread of their own.
const THREADED_READ_MIN: u64 = 16 << 20;

/// One file's content on its way out: its chunk list, hash and size.
/// The first chunk is held back until the next one shows up: a file of
/// one chunk (most files of a source tree) then needs no second blake3
/// pass, since its content hash is that chunk's id.
struct Content<'a> {
    sink: &'a mut ChunkSink,
    progress: &'a dyn Progress,
    refs: Vec<ChunkRef>,
    hasher: blake3::Hasher,
    size: u64,
    first: Option<(ChunkId, Vec<u8>)>,
}

impl<'a> Content<'a> {
    fn new(sink: &'a mut ChunkSink, progress: &'a dyn Progress) -> Self {
        Self { sink, progress, refs: Vec::new(), hasher: blake3::Hasher::new(), size: 0, first: None }
    }

    fn take(&mut self, data: Vec<u8>) -> Result<()> {
        self.size += data.len() as u64;
        self.progress.read(data.len() as u64);
        if self.refs.is_empty() && self.first.is_none() {
            self.first = Some((self.sink.ids().of(&data), data));
            return Ok(());
        }
        if let Some((id, first)) = self.first.take() {
            self.hasher.update(&first);
            self.send(id, first)?;
        }
        // The chunk id and the file hash at once for a large chunk: a
        // dump's producer was otherwise bound by hashing on one core.
        let ids = self.sink.ids();
        let id = crate::parallel_hash::hash_while(&data, &mut self.hasher, || ids.of(&data));
        self.send(id, data)
    }

    fn send(&mut self, id: ChunkId, data: Vec<u8>) -> Result<()> {
        let len = data.len() as u32;
        self.sink.send_hashed(id, data)?;
        self.refs.push(ChunkRef { id, len });
        Ok(())
    }

    /// The chunk list, content hash and size.
    fn finish(mut self) -> Result<(Vec<ChunkRef>, ContentHash, u64)> {
        let hash = match self.first.take() {
            // A sealed chunk's id is keyed: the content hash (blake3 of
            // the plaintext, what restore checks) is taken apart.
            Some((id, only)) if self.sink.ids().sealed() => {
                let hash = blake3::hash(&only).into();
                self.send(id, only)?;
                hash
            }
            Some((id, only)) => {
                self.send(id, only)?;
                ContentHash::from_bytes(*id.as_bytes())
            }
            None => self.hasher.finalize().into(),
        };
        Ok((self.refs, hash, self.size))
    }
}

fn ns(s: i64, ns: i64) -> i64 {
    s.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// A root as the snapshot names it: absolute, without `.`, `..` or a
/// trailing `/`, which the server refuses in a tree (a restore could not
/// place them). `..` is resolved on the filesystem, as the kernel would;
/// a last component that is a symlink stays the symlink.
fn root_path(r: &Path) -> std::io::Result<PathBuf> {
    let abs: PathBuf = std::path::absolute(r)?.components().collect();
    if !abs.components().any(|c| c == std::path::Component::ParentDir) {
        return Ok(abs);
    }
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(root_path(parent)?.join(name)),
        _ => fs::canonicalize(&abs),
    }
}

/// The name a path gets inside a snapshot: absolute, without the leading `/`.
fn snapshot_path(abs: &Path) -> Vec<u8> {
    let b = abs.as_os_str().as_bytes();
    let trimmed = b.strip_prefix(b"/").unwrap_or(b);
    trimmed.to_vec()
}

impl Producer {
    pub fn new(sink: ChunkSink, progress: Arc<dyn Progress>, excludes: Excludes, cache: Option<Incremental>) -> Self {
        Self {
            // An encrypted push cuts with its key's gear table.
            chunker: StreamChunker::with_gear(sink.ids().gear()),
            sink,
            tree: TreeEncoder::new(),
            tree_chunker: PushChunker::new(),
            tree_ids: Vec::new(),
            progress,
            links: HashMap::new(),
            excludes: Arc::new(excludes),
            cache,
            files_read: 0,
            files_cached: 0,
            warnings: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Leaves `path` out of the snapshot: it could not be read.
    fn skip(&mut self, path: &Path, e: impl std::fmt::Display) {
        self.skipped.push(Skipped { path: path.display().to_string(), error: e.to_string() });
    }

    /// An entry's metadata: from `m`, plus the flags the lister read and
    /// the extended attributes, read here (a warning when some cannot be).
    fn meta_of(&mut self, path: &Path, m: &fs::Metadata, flags: u32) -> Meta {
        let (xattrs, warning) = file_meta::xattrs(path);
        self.warnings.extend(warning);
        Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            flags,
            xattrs,
        }
    }

    fn send(&mut self, data: Vec<u8>) -> Result<ChunkId> {
        self.sink.send(data)
    }

    fn emit(&mut self, e: Entry) -> Result<()> {
        self.tree.push(&e);
        if self.tree.pending() >= 1 << 20 {
            let bytes = self.tree.take();
            for c in self.tree_chunker.push(&bytes) {
                let id = self.send(c)?;
                self.tree_ids.push(id);
            }
        }
        Ok(())
    }

    /// Flushes the tree stream.
    pub fn finish(mut self) -> Result<Produced> {
        let bytes = self.tree.take();
        let mut chunks = self.tree_chunker.push(&bytes);
        chunks.extend(std::mem::take(&mut self.tree_chunker).finish());
        for c in chunks {
            let id = self.send(c)?;
            self.tree_ids.push(id);
        }
        let mut warnings = self.warnings;
        let cache = self.cache.map(|c| {
            let (writer, w) = c.finish();
            warnings.extend(w);
            writer
        });
        Ok(Produced {
            tree: self.tree_ids,
            warnings,
            skipped: self.skipped,
            files_read: self.files_read,
            files_cached: self.files_cached,
            cache: cache.flatten(),
        })
    }

    /// Chunks and sends a file's content; returns its chunk list, content
    /// hash and size (what was read, not what stat said: files change).
    /// With `threaded`, a second thread reads and cuts while this one
    /// hashes and queues: worth it for streams and large files only.
    fn read_content(
        &mut self,
        path: &[u8],
        reader: impl Read + Send,
        threaded: bool,
    ) -> Result<(Vec<ChunkRef>, ContentHash, u64)> {
        let read_err =
            |e: ChunkReadError| ClientError::source(format!("reading {}", String::from_utf8_lossy(path)), e.0);
        let mut content = Content::new(&mut self.sink, &*self.progress);
        let chunker = &mut self.chunker;
        if threaded {
            std::thread::scope(|s| {
                let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_CHUNKS);
                let cutter = move || {
                    for c in chunker.chunks(reader) {
                        let failed = c.is_err();
                        // A closed channel: the consumer failed and said why.
                        if tx.send(c).is_err() || failed {
                            return;
                        }
                    }
                };
                std::thread::Builder::new()
                    .spawn_scoped(s, cutter)
                    .map_err(|e| ClientError::Thread { what: "a reader thread", source: e })?;
                for c in rx {
                    content.take(c.map_err(read_err)?)?;
                }
                Ok::<_, ClientError>(())
            })?;
        } else {
            for c in chunker.chunks(reader) {
                content.take(c.map_err(read_err)?)?;
            }
        }
        let done = content.finish()?;
        self.files_read += 1;
        Ok(done)
    }

    fn emit_file(&mut self, path: Vec<u8>, meta: Meta, size: u64, refs: &[ChunkRef], hash: ContentHash) -> Result<()> {
        self.emit(Entry::File { path, meta, size })?;
        for part in refs.chunks(MAX_CHUNKS_PER_RECORD) {
            self.emit(Entry::Chunks(part.to_vec()))?;
        }
        self.emit(Entry::FileEnd { hash })?;
        self.progress.file_done();
        Ok(())
    }

    /// Chunks a stream of file content and emits File, Chunks, FileEnd.
    pub fn file_from_reader(&mut self, path: Vec<u8>, meta: Meta, reader: impl Read + Send) -> Result<()> {
        let (refs, hash, size) = self.read_content(&path, reader, true)?;
        self.emit_file(path, meta, size, &refs, hash)
    }

    /// A regular file of a tree: from the metadata cache when its stat key
    /// is unchanged, else read. False when it could not be read (it is
    /// left out, never stored half).
    fn regular_file(&mut self, abs: &Path, name: Vec<u8>, m: &fs::Metadata, flags: u32) -> Result<bool> {
        let key = file_key(m);
        let meta = self.meta_of(abs, m, flags);
        if let Some(c) = self.cache.as_mut().and_then(|c| c.lookup(&name, &key)) {
            self.emit_file(name, meta, key.size, &c.chunks, c.hash)?;
            self.files_cached += 1;
            self.progress.cached(key.size);
            if let Some(cache) = self.cache.as_mut() {
                cache.record(&c);
            }
            return Ok(true);
        }
        let f = match File::open(abs) {
            Ok(f) => f,
            Err(e) => {
                self.skip(abs, e);
                return Ok(false);
            }
        };
        let (chunks, hash, size) = match self.read_content(&name, &f, key.size >= THREADED_READ_MIN) {
            Ok(read) => read,
            // Its chunks sent so far are referenced by nothing: the
            // server's GC frees them.
            Err(ClientError::Source { source, .. }) => {
                self.skip(abs, source);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let read = CachedFile { path: name, key, hash, chunks };
        // Cached only if nothing changed while it was read.
        if let Some(cache) = self.cache.as_mut() {
            if f.metadata().is_ok_and(|after| file_key(&after) == key) && size == key.size {
                cache.record(&read);
            }
        }
        self.emit_file(read.path, meta, size, &read.chunks, hash)?;
        Ok(true)
    }

    /// Walks the given roots.
    pub fn walk_roots(&mut self, roots: &[PathBuf]) -> Result<()> {
        let mut abs: Vec<PathBuf> = roots
            .iter()
            .map(|r| root_path(r).map_err(|e| ClientError::source(r.display().to_string(), e)))
            .collect::<Result<_>>()?;
        abs.sort();
        abs.dedup();
        let mut done: Vec<PathBuf> = Vec::new();
        for root in abs {
            if done.iter().any(|d| root.starts_with(d)) {
                continue; // inside a root already walked
            }
            fs::symlink_metadata(&root)
                .map_err(|e| ClientError::source(format!("cannot back up {}", root.display()), e))?;
            // Ancestors as directories, so restore recreates their metadata.
            let ancestors: Vec<&Path> = root.ancestors().skip(1).filter(|a| a.parent().is_some()).collect();
            for a in ancestors.into_iter().rev() {
                if done.iter().any(|d| d.starts_with(a) || a.starts_with(d)) {
                    continue;
                }
                let m = fs::metadata(a).map_err(|e| ClientError::source(a.display().to_string(), e))?;
                let meta = self.meta_of(a, &m, file_meta::flags(a));
                self.emit(Entry::Dir { path: snapshot_path(a), meta })?;
            }
            self.walk(&root)?;
            done.push(root);
        }
        Ok(())
    }

    /// Backs up `root` and everything below it, in walk order (listed
    /// ahead on a second thread, see `lister`).
    fn walk(&mut self, root: &Path) -> Result<()> {
        let excludes = self.excludes.clone();
        if excludes.excluded(root) {
            return Ok(());
        }
        let m = match fs::symlink_metadata(root) {
            Ok(m) => m,
            Err(e) => {
                self.skip(root, e);
                return Ok(());
            }
        };
        std::thread::scope(|s| {
            let rx = super::lister::spawn(s, root.to_path_buf(), m, &excludes)
                .map_err(|e| ClientError::Thread { what: "the directory lister", source: e })?;
            for l in rx.into_iter().flatten() {
                match l {
                    Listed::Entry(path, m, flags) => self.entry(&path, &m, flags)?,
                    Listed::Unreadable(path, e) => self.skip(&path, e),
                }
            }
            Ok(())
        })
    }

    /// One listed entry; a directory's children are listed after it.
    fn entry(&mut self, path: &Path, m: &fs::Metadata, flags: u32) -> Result<()> {
        let name = snapshot_path(path);
        let ft = m.file_type();
        if name.is_empty() {
            // The root directory itself: only its children are entries.
        } else if ft.is_dir() {
            let meta = self.meta_of(path, m, flags);
            self.emit(Entry::Dir { path: name, meta })?;
        } else if ft.is_file() {
            let linked = m.nlink() > 1;
            if linked {
                if let Some(target) = self.links.get(&(m.dev(), m.ino())) {
                    let target = target.clone();
                    return self.emit(Entry::Hardlink { path: name, target });
                }
                self.links.insert((m.dev(), m.ino()), name.clone());
            }
            // A link to a file left out would point at nothing: the next
            // name of that inode is read as a file of its own instead.
            if !self.regular_file(path, name, m, flags)? && linked {
                self.links.remove(&(m.dev(), m.ino()));
            }
            return Ok(());
        } else if ft.is_symlink() {
            let target = match fs::read_link(path) {
                Ok(t) => t,
                Err(e) => {
                    self.skip(path, e);
                    return Ok(());
                }
            };
            let meta = self.meta_of(path, m, flags);
            return self.emit(Entry::Symlink { path: name, meta, target: target.as_os_str().as_bytes().to_vec() });
        } else {
            let kind = if ft.is_fifo() {
                SpecialKind::Fifo
            } else if ft.is_socket() {
                SpecialKind::Socket
            } else if ft.is_char_device() {
                SpecialKind::CharDevice
            } else {
                SpecialKind::BlockDevice
            };
            let meta = self.meta_of(path, m, flags);
            return self.emit(Entry::Special { path: name, meta, kind, rdev: m.rdev() });
        }
        Ok(())
    }
}

/// The pre-scan of a tree push for its progress totals: the same walk,
/// listing only, on a thread of its own running ahead of the push. It
/// stops when dropped.
pub struct Scan {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Scan {
    pub fn start(roots: Vec<PathBuf>, excludes: Excludes, progress: Arc<dyn Progress>) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let run = move || {
            let (mut files, mut bytes, mut last) = (0u64, 0u64, std::time::Instant::now());
            let mut roots: Vec<PathBuf> = roots.iter().filter_map(|r| root_path(r).ok()).collect();
            roots.sort();
            roots.dedup();
            let mut done: Vec<PathBuf> = Vec::new();
            for root in roots {
                if done.iter().any(|d| root.starts_with(d)) || excludes.excluded(&root) {
                    continue;
                }
                let Ok(m) = fs::symlink_metadata(&root) else { continue };
                let finished = std::thread::scope(|s| {
                    let Ok(rx) = super::lister::spawn(s, root.clone(), m, &excludes) else { return false };
                    for l in rx.into_iter().flatten() {
                        if flag.load(Relaxed) {
                            return false; // drops the receiver: the lister stops
                        }
                        if let Listed::Entry(_, m, _) = l {
                            if m.file_type().is_file() {
                                files += 1;
                                bytes += m.len();
                            }
                        }
                        if last.elapsed() >= std::time::Duration::from_millis(100) {
                            progress.totals(files, bytes, false);
                            last = std::time::Instant::now();
                        }
                    }
                    true
                });
                if !finished {
                    return;
                }
                done.push(root);
            }
            progress.totals(files, bytes, true);
        };
        // Without a thread there is no ETA, and the push goes on.
        let _ = std::thread::Builder::new().name("bkp-scan".into()).spawn(run);
        Self { stop }
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_named_without_dots_or_trailing_slashes() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        let base = fs::canonicalize(d.path()).unwrap();
        for r in [base.join("a/"), base.join("a/./"), base.join("a/b/.."), base.join("./a")] {
            assert_eq!(root_path(&r).unwrap(), base.join("a"), "{}", r.display());
        }
        std::os::unix::fs::symlink("a", base.join("l")).unwrap();
        assert_eq!(root_path(&base.join("a/../l")).unwrap(), base.join("l"), "the link itself");
        let name = snapshot_path(&root_path(&base.join("a/b/")).unwrap());
        assert!(bkp_common::names::check_path(&name).is_ok(), "{}", String::from_utf8_lossy(&name));
    }
}
