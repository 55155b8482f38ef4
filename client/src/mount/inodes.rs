//! The mount's inode table: the fixed top (sets, snapshot times,
//! `latest` links) and each snapshot's tree, read in when first looked
//! into. Never shrinks while mounted: a tree costs about 200 bytes per
//! entry in memory once opened.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bkp_common::snapshot::SnapshotSummary;
use bkp_common::tree::{ChunkRef, Entry, Meta, SpecialKind};
use bkp_common::SnapshotId;

/// A file's chunks with the offset each starts at.
pub struct Layout {
    pub chunks: Vec<(u64, ChunkRef)>,
}

impl Layout {
    /// Index of the chunk holding byte `off`.
    pub fn at(&self, off: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|(start, _)| *start <= off);
        let i = i.checked_sub(1)?;
        let (start, r) = self.chunks[i];
        (off < start + r.len as u64).then_some(i)
    }
}

pub enum Body {
    /// Children by name.
    Dir(BTreeMap<Vec<u8>, u64>),
    /// A snapshot's root, its tree not read yet.
    Unread(SnapshotId),
    File(Arc<Layout>),
    Symlink(Vec<u8>),
    Special(SpecialKind, u64),
}

pub struct Inode {
    pub parent: u64,
    pub meta: Meta,
    pub size: u64,
    pub nlink: u32,
    pub body: Body,
}

pub struct Table {
    /// Inode `n` is `nodes[n - 1]`; 1 is the root.
    pub nodes: Vec<Inode>,
}

fn dir_meta(mtime_ns: i64) -> Meta {
    Meta { mode: 0o555, uid: own_uid(), gid: own_gid(), mtime_ns, ..Meta::default() }
}

// The top levels belong to whoever mounted.
fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(0)
}
fn own_gid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::gid(&m)).unwrap_or(0)
}

impl Table {
    /// `ROOT/<set>/<time>/` for every snapshot, `ROOT/<set>/latest` a
    /// link to the newest. Times are RFC 3339 UTC to the second, with the
    /// nanoseconds when two snapshots of a set share a second.
    pub fn new(snapshots: &[SnapshotSummary]) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let mut t = Table { nodes: Vec::new() };
        t.add(Inode { parent: 1, meta: dir_meta(now), size: 0, nlink: 2, body: Body::Dir(BTreeMap::new()) });
        let mut sets: BTreeMap<&str, Vec<&SnapshotSummary>> = BTreeMap::new();
        for s in snapshots {
            sets.entry(&s.name).or_default().push(s);
        }
        for (name, mut list) in sets {
            list.sort_by_key(|s| s.time_ns);
            let newest = list.last().map_or(0, |s| s.time_ns as i64);
            let set =
                t.add(Inode { parent: 1, meta: dir_meta(newest), size: 0, nlink: 2, body: Body::Dir(BTreeMap::new()) });
            t.link(1, name.as_bytes().to_vec(), set);
            let mut latest = Vec::new();
            for s in &list {
                let sec = crate::browse::rfc3339(s.time_ns as i64);
                let taken =
                    |n: &str| list.iter().any(|o| o.id != s.id && crate::browse::rfc3339(o.time_ns as i64) == n);
                let mut label = if taken(&sec) {
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(s.time_ns);
                    humantime::format_rfc3339_nanos(at).to_string()
                } else {
                    sec
                };
                if t.child(set, label.as_bytes()).is_some() {
                    label = format!("{label}-{}", s.id.short());
                }
                let mut meta = dir_meta(s.time_ns as i64);
                meta.mode = 0o555;
                let root = t.add(Inode { parent: set, meta, size: 0, nlink: 2, body: Body::Unread(s.id) });
                t.link(set, label.clone().into_bytes(), root);
                latest = label.into_bytes();
            }
            let size = latest.len() as u64;
            let l = t.add(Inode {
                parent: set,
                meta: Meta { mode: 0o777, ..dir_meta(newest) },
                size,
                nlink: 1,
                body: Body::Symlink(latest),
            });
            t.link(set, b"latest".to_vec(), l);
        }
        t
    }

    fn add(&mut self, n: Inode) -> u64 {
        self.nodes.push(n);
        self.nodes.len() as u64
    }

    fn link(&mut self, dir: u64, name: Vec<u8>, ino: u64) {
        if let Body::Dir(children) = &mut self.nodes[dir as usize - 1].body {
            children.insert(name, ino);
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    pub fn child(&self, dir: u64, name: &[u8]) -> Option<u64> {
        match &self.get(dir)?.body {
            Body::Dir(c) => c.get(name).copied(),
            _ => None,
        }
    }

    /// Puts a snapshot's tree (its entries in walk order) under `root`.
    pub fn fill(&mut self, root: u64, entries: impl IntoIterator<Item = Entry>) {
        let mut by_path: HashMap<Vec<u8>, u64> = HashMap::new();
        // The file being read: its inode, chunks with offsets, its size so far.
        type Open = (u64, Vec<(u64, ChunkRef)>, u64);
        let mut file: Option<Open> = None;
        self.nodes[root as usize - 1].body = Body::Dir(BTreeMap::new());
        for e in entries {
            match e {
                Entry::Chunks(refs) => {
                    if let Some((_, chunks, off)) = &mut file {
                        for r in refs {
                            chunks.push((*off, r));
                            *off += r.len as u64;
                        }
                    }
                    continue;
                }
                Entry::FileEnd { .. } => {
                    if let Some((ino, chunks, _)) = file.take() {
                        self.nodes[ino as usize - 1].body = Body::File(Arc::new(Layout { chunks }));
                    }
                    continue;
                }
                _ => {}
            }
            let path = e.path().unwrap_or_default().to_vec();
            let (parent_path, name) = match path.iter().rposition(|c| *c == b'/') {
                Some(i) => (path[..i].to_vec(), path[i + 1..].to_vec()),
                None => (Vec::new(), path.clone()),
            };
            let parent = self.dir_for(root, &parent_path, &mut by_path);
            let ino = match e {
                Entry::Hardlink { target, .. } => match by_path.get(&target) {
                    Some(&t) => {
                        self.nodes[t as usize - 1].nlink += 1;
                        self.link(parent, name, t);
                        continue;
                    }
                    None => continue,
                },
                Entry::Dir { meta, .. } => {
                    // A directory seen first as a parent keeps its inode.
                    if let Some(&d) = by_path.get(&path) {
                        self.nodes[d as usize - 1].meta = meta;
                        continue;
                    }
                    self.add(Inode { parent, meta, size: 0, nlink: 2, body: Body::Dir(BTreeMap::new()) })
                }
                Entry::File { meta, size, .. } => {
                    let ino = self.add(Inode {
                        parent,
                        meta,
                        size,
                        nlink: 1,
                        body: Body::File(Arc::new(Layout { chunks: Vec::new() })),
                    });
                    file = Some((ino, Vec::new(), 0));
                    ino
                }
                Entry::Symlink { meta, target, .. } => {
                    let size = target.len() as u64;
                    self.add(Inode { parent, meta, size, nlink: 1, body: Body::Symlink(target) })
                }
                Entry::Special { meta, kind, rdev, .. } => {
                    self.add(Inode { parent, meta, size: 0, nlink: 1, body: Body::Special(kind, rdev) })
                }
                Entry::Chunks(_) | Entry::FileEnd { .. } => unreachable!("handled above"),
            };
            by_path.insert(path, ino);
            self.link(parent, name, ino);
        }
    }

    /// The directory inode for `path` below `root`, made (0555, owned by
    /// whoever mounted) when the tree has no entry for it.
    fn dir_for(&mut self, root: u64, path: &[u8], by_path: &mut HashMap<Vec<u8>, u64>) -> u64 {
        if path.is_empty() {
            return root;
        }
        if let Some(&d) = by_path.get(path) {
            return d;
        }
        let (pp, name) = match path.iter().rposition(|c| *c == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let parent = self.dir_for(root, pp, by_path);
        let d = self.add(Inode { parent, meta: dir_meta(0), size: 0, nlink: 2, body: Body::Dir(BTreeMap::new()) });
        self.link(parent, name.to_vec(), d);
        by_path.insert(path.to_vec(), d);
        d
    }
}
