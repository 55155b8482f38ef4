//! Tree entries as whole nodes: a file's `File`, `Chunks` and `FileEnd`
//! records become one [`Node`] with its content hash.

use bkp_common::tree::{Entry, Meta, SpecialKind};
use bkp_common::ContentHash;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Hardlink,
    Special,
}

impl Kind {
    pub fn of(e: &Entry) -> Option<Kind> {
        Some(match e {
            Entry::Dir { .. } => Kind::Dir,
            Entry::File { .. } => Kind::File,
            Entry::Symlink { .. } => Kind::Symlink,
            Entry::Hardlink { .. } => Kind::Hardlink,
            Entry::Special { .. } => Kind::Special,
            Entry::Chunks(_) | Entry::FileEnd { .. } => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::Special => "special",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Hardlinks have none of their own.
    pub meta: Meta,
    pub size: u64,
    /// `None` when the file's end was not read (a skipped stretch).
    pub hash: Option<ContentHash>,
    /// A symlink's or hardlink's target.
    pub target: Vec<u8>,
    pub special: Option<(SpecialKind, u64)>,
}

impl Node {
    fn from_entry(e: Entry) -> Option<Node> {
        let kind = Kind::of(&e)?;
        let mut n = Node {
            path: Vec::new(),
            kind,
            meta: Meta::default(),
            size: 0,
            hash: None,
            target: Vec::new(),
            special: None,
        };
        match e {
            Entry::Dir { path, meta } => (n.path, n.meta) = (path, meta),
            Entry::File { path, meta, size } => (n.path, n.meta, n.size) = (path, meta, size),
            Entry::Symlink { path, meta, target } => (n.path, n.meta, n.target) = (path, meta, target),
            Entry::Hardlink { path, target } => (n.path, n.target) = (path, target),
            Entry::Special { path, meta, kind, rdev } => (n.path, n.meta, n.special) = (path, meta, Some((kind, rdev))),
            Entry::Chunks(_) | Entry::FileEnd { .. } => return None,
        }
        Some(n)
    }
}

/// Groups entries into nodes. Chunk lists and file ends without their
/// `File` (a stretch picked up in the middle of a file) are dropped.
#[derive(Default)]
pub struct Grouper {
    file: Option<Node>,
}

impl Grouper {
    /// Feeds one entry; calls `out` with each node it completes.
    pub fn push(&mut self, e: Entry, out: &mut impl FnMut(Node)) {
        match e {
            Entry::Chunks(_) => {}
            Entry::FileEnd { hash } => {
                if let Some(mut f) = self.file.take() {
                    f.hash = Some(hash);
                    out(f);
                }
            }
            other => {
                // Only a stream the decoder let through unchecked leaves a
                // file open here; it still comes out, without its hash.
                if let Some(f) = self.file.take() {
                    out(f);
                }
                let n = Node::from_entry(other).expect("a path entry");
                if n.kind == Kind::File {
                    self.file = Some(n);
                } else {
                    out(n);
                }
            }
        }
    }

    /// The file still open, if the stretch ended inside one.
    pub fn finish(&mut self, out: &mut impl FnMut(Node)) {
        if let Some(f) = self.file.take() {
            out(f);
        }
    }
}
