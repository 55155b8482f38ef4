//! The push producer: walks file trees (or reads one stream), chunks and
//! hashes the data, and writes the tree stream. Runs on its own thread;
//! chunks go to the uploader through a bounded channel, so memory is
//! bounded whatever the size of the input.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bkp_common::chunker::{chunk_reader, PushChunker};
use bkp_common::tree::{ChunkRef, Entry, Meta, SpecialKind, TreeEncoder, MAX_CHUNKS_PER_RECORD};
use bkp_common::ChunkId;
use globset::{Glob, GlobSet, GlobSetBuilder};
use tokio::sync::mpsc::Sender;

use crate::error::{ClientError, Result};
use crate::progress::Progress;

/// A chunk on its way to the uploader.
pub struct RawChunk {
    pub id: ChunkId,
    pub data: Vec<u8>,
}

pub struct Producer {
    tx: Sender<RawChunk>,
    tree: TreeEncoder,
    tree_chunker: PushChunker,
    tree_ids: Vec<ChunkId>,
    progress: Arc<dyn Progress>,
    /// (dev, inode) -> path of files with more than one link.
    links: HashMap<(u64, u64), Vec<u8>>,
    excludes: Excludes,
    pub warnings: Vec<String>,
}

/// `--exclude` patterns: one without `/` matches a name anywhere; one
/// with `/` matches the absolute path.
pub struct Excludes {
    names: GlobSet,
    paths: GlobSet,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Self> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let g = Glob::new(p).map_err(|e| ClientError::Input(format!("bad --exclude {p:?}: {e}")))?;
            if p.contains('/') {
                paths.add(g)
            } else {
                names.add(g)
            };
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| ClientError::Input(e.to_string()));
        Ok(Self { names: build(names)?, paths: build(paths)? })
    }

    fn excluded(&self, abs: &Path) -> bool {
        abs.file_name().is_some_and(|n| self.names.is_match(n)) || self.paths.is_match(abs)
    }
}

fn meta_of(m: &fs::Metadata) -> Meta {
    Meta {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
    }
}

/// The name a path gets inside a snapshot: absolute, without the leading `/`.
fn snapshot_path(abs: &Path) -> Vec<u8> {
    let b = abs.as_os_str().as_bytes();
    let trimmed = b.strip_prefix(b"/").unwrap_or(b);
    trimmed.to_vec()
}

impl Producer {
    pub fn new(tx: Sender<RawChunk>, progress: Arc<dyn Progress>, excludes: Excludes) -> Self {
        Self {
            tx,
            tree: TreeEncoder::new(),
            tree_chunker: PushChunker::new(),
            tree_ids: Vec::new(),
            progress,
            links: HashMap::new(),
            excludes,
            warnings: Vec::new(),
        }
    }

    fn send(&mut self, data: Vec<u8>) -> Result<ChunkId> {
        let id = ChunkId::of(&data);
        self.tx.blocking_send(RawChunk { id, data }).map_err(|_| ClientError::Io("upload stopped".into()))?;
        Ok(id)
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

    /// Flushes the tree stream; returns its chunk ids.
    pub fn finish(mut self) -> Result<(Vec<ChunkId>, Vec<String>)> {
        let bytes = self.tree.take();
        let mut chunks = self.tree_chunker.push(&bytes);
        chunks.extend(std::mem::take(&mut self.tree_chunker).finish());
        for c in chunks {
            let id = self.send(c)?;
            self.tree_ids.push(id);
        }
        Ok((self.tree_ids, self.warnings))
    }

    /// Chunks a stream of file content and emits File, Chunks, FileEnd.
    pub fn file_from_reader(&mut self, path: Vec<u8>, meta: Meta, reader: impl Read) -> Result<()> {
        let mut refs = Vec::new();
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        for chunk in chunk_reader(reader) {
            let data =
                chunk.map_err(|e| ClientError::Input(format!("reading {}: {e}", String::from_utf8_lossy(&path))))?;
            hasher.update(&data);
            let len = data.len() as u32;
            size += len as u64;
            self.progress.read(len as u64);
            let id = self.send(data)?;
            refs.push(ChunkRef { id, len });
        }
        // The size is what was read, not what stat said: files change.
        self.emit(Entry::File { path, meta, size })?;
        for part in refs.chunks(MAX_CHUNKS_PER_RECORD) {
            self.emit(Entry::Chunks(part.to_vec()))?;
        }
        self.emit(Entry::FileEnd { hash: hasher.finalize().into() })?;
        self.progress.file_done();
        Ok(())
    }

    /// Walks the given roots.
    pub fn walk_roots(&mut self, roots: &[PathBuf]) -> Result<()> {
        let mut abs: Vec<PathBuf> = roots
            .iter()
            .map(|r| std::path::absolute(r).map_err(|e| ClientError::Input(format!("{}: {e}", r.display()))))
            .collect::<Result<_>>()?;
        abs.sort();
        abs.dedup();
        let mut done: Vec<PathBuf> = Vec::new();
        for root in abs {
            if done.iter().any(|d| root.starts_with(d)) {
                continue; // inside a root already walked
            }
            fs::symlink_metadata(&root)
                .map_err(|e| ClientError::Input(format!("cannot back up {}: {e}", root.display())))?;
            // Ancestors as directories, so restore recreates their metadata.
            let ancestors: Vec<&Path> = root.ancestors().skip(1).filter(|a| a.parent().is_some()).collect();
            for a in ancestors.into_iter().rev() {
                if done.iter().any(|d| d.starts_with(a) || a.starts_with(d)) {
                    continue;
                }
                let m = fs::metadata(a).map_err(|e| ClientError::Input(format!("{}: {e}", a.display())))?;
                self.emit(Entry::Dir { path: snapshot_path(a), meta: meta_of(&m) })?;
            }
            self.walk(&root)?;
            done.push(root);
        }
        Ok(())
    }

    fn walk(&mut self, path: &Path) -> Result<()> {
        if self.excludes.excluded(path) {
            return Ok(());
        }
        let m = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                self.warnings.push(format!("{}: {e}", path.display()));
                return Ok(());
            }
        };
        let name = snapshot_path(path);
        let ft = m.file_type();
        if name.is_empty() {
            // The root directory itself: only its children are entries.
        } else if ft.is_dir() {
            self.emit(Entry::Dir { path: name, meta: meta_of(&m) })?;
        } else if ft.is_file() {
            if m.nlink() > 1 {
                if let Some(target) = self.links.get(&(m.dev(), m.ino())) {
                    let target = target.clone();
                    return self.emit(Entry::Hardlink { path: name, target });
                }
                self.links.insert((m.dev(), m.ino()), name.clone());
            }
            match File::open(path) {
                Ok(f) => return self.file_from_reader(name, meta_of(&m), f),
                Err(e) => {
                    self.warnings.push(format!("{}: {e}", path.display()));
                    return Ok(());
                }
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| ClientError::Input(format!("{}: {e}", path.display())))?;
            return self.emit(Entry::Symlink {
                path: name,
                meta: meta_of(&m),
                target: target.as_os_str().as_bytes().to_vec(),
            });
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
            return self.emit(Entry::Special { path: name, meta: meta_of(&m), kind, rdev: m.rdev() });
        }
        let mut children: Vec<OsString> = match fs::read_dir(path) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => {
                self.warnings.push(format!("{}: {e}", path.display()));
                return Ok(());
            }
        };
        // Sorted, so an unchanged tree gives the same stream and dedups.
        children.sort();
        for c in children {
            self.walk(&path.join(c))?;
        }
        Ok(())
    }
}
