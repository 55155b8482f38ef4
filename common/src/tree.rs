//! The tree (metadata) stream: every snapshot, a directory tree or a
//! single stream, is described by one linear stream of entries in walk
//! order. The stream is itself cut with FastCDC and stored as ordinary
//! chunks, so an unchanged tree dedups against the previous snapshot and
//! neither side ever needs the whole tree in memory (the approach of
//! Proxmox's pxar catalog and Borg's item stream rather than restic's one
//! blob per directory, which breaks on a directory with a million files).
//!
//! ```text
//! stream  = "BKPT" version:u8 (1 or 2) record*
//! record  = len:u32 LE (<= MAX_RECORD) postcard(Entry)
//! grammar = (Dir | Symlink | Hardlink | Special | File Chunks* FileEnd)*
//! ```
//! A file's chunk list is split over `Chunks` records of at most
//! [`MAX_CHUNKS_PER_RECORD`] so that a 10 TB file still has small records.
//!
//! Version 2 added ctime, file flags and extended attributes (POSIX ACLs
//! among them, as the kernel's `system.posix_acl_*` blobs) to [`Meta`].
//! Version 1 streams still decode: their records are read as the old
//! layout ([`v1`]) and come out with those fields empty.

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, ContentHash};

pub const MAGIC: &[u8; 4] = b"BKPT";
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 5;
pub const MAX_RECORD: usize = 1 << 20;
pub const MAX_CHUNKS_PER_RECORD: usize = 4096;
pub const MAX_PATH: usize = 16 * 1024;
/// Names and values of one entry's extended attributes, together. Linux
/// caps one value at 64 KiB and ext4 keeps them all in one block; the cap
/// keeps a record well under [`MAX_RECORD`] with a long path.
pub const MAX_XATTR_BYTES: usize = 256 * 1024;

/// `chattr` flags kept ([`Meta::flags`]): the `FS_IOC_GETFLAGS` bits that
/// `statx` also reports, so reading them costs no open.
pub const FLAG_IMMUTABLE: u32 = 0x10;
pub const FLAG_APPEND: u32 = 0x20;
pub const FLAG_NODUMP: u32 = 0x40;
pub const FLAGS_KEPT: u32 = FLAG_IMMUTABLE | FLAG_APPEND | FLAG_NODUMP;

/// One extended attribute, name with its namespace (`user.`, `trusted.`,
/// `security.`, `system.`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Metadata common to every entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits and set-id bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Status change time (version 2; 0 in version 1 streams). Kept for
    /// comparing snapshots; no restore can set it. The access time is not
    /// kept: reading a file for the backup moves it, and a tree that
    /// changed on every push would never dedup.
    pub ctime_ns: i64,
    /// `chattr` flags, [`FLAGS_KEPT`] bits only.
    pub flags: u32,
    /// Extended attributes sorted by name, at most [`MAX_XATTR_BYTES`].
    pub xattrs: Vec<Xattr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecialKind {
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// One record of the tree stream. Paths are relative, `/`-separated raw
/// bytes (Unix names need not be UTF-8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    Dir {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        meta: Meta,
    },
    File {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        meta: Meta,
        size: u64,
    },
    Chunks(Vec<ChunkRef>),
    FileEnd {
        hash: ContentHash,
    },
    Symlink {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        meta: Meta,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A further name for a file stored earlier in the same stream.
    Hardlink {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Special {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        meta: Meta,
        kind: SpecialKind,
        rdev: u64,
    },
}

impl Entry {
    pub fn path(&self) -> Option<&[u8]> {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Hardlink { path, .. }
            | Entry::Special { path, .. } => Some(path),
            Entry::Chunks(_) | Entry::FileEnd { .. } => None,
        }
    }

    pub fn meta(&self) -> Option<&Meta> {
        match self {
            Entry::Dir { meta, .. }
            | Entry::File { meta, .. }
            | Entry::Symlink { meta, .. }
            | Entry::Special { meta, .. } => Some(meta),
            Entry::Hardlink { .. } | Entry::Chunks(_) | Entry::FileEnd { .. } => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("tree stream has bad magic (not a bkp tree)")]
    Magic,
    #[error("tree stream version {0} is not supported by this build; upgrade bkp")]
    Version(u8),
    #[error("tree record of {0} bytes exceeds the {MAX_RECORD}-byte cap")]
    RecordTooLarge(usize),
    #[error("tree record does not decode: {0}")]
    Decode(String),
    #[error("tree stream ends inside a record or a file")]
    Truncated,
    #[error("tree stream is malformed: {0}")]
    Grammar(&'static str),
}

/// Serializes entries into the tree stream.
pub struct TreeEncoder {
    out: Vec<u8>,
}

impl Default for TreeEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeEncoder {
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        Self { out }
    }

    pub fn push(&mut self, entry: &Entry) {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        // Writing to a Vec cannot fail; entries are bounded by the walker.
        let out = std::mem::take(&mut self.out);
        self.out = postcard::to_extend(entry, out).expect("postcard to Vec");
        let len = self.out.len() - start - 4;
        assert!(len <= MAX_RECORD, "tree record too large");
        self.out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    }

    /// Takes the bytes encoded so far (to feed a chunker).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn pending(&self) -> usize {
        self.out.len()
    }
}

/// The stream's version from its header, `None` while fewer than
/// [`HEADER_LEN`] bytes are there.
pub fn header(buf: &[u8]) -> Result<Option<u8>, TreeError> {
    let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
    if &h[..4] != MAGIC {
        return Err(TreeError::Magic);
    }
    if h[4] != VERSION && h[4] != v1::VERSION {
        return Err(TreeError::Version(h[4]));
    }
    Ok(Some(h[4]))
}

/// The body of the record `buf` starts with (after its 4-byte length),
/// `None` while it is incomplete; the length is capped before anything
/// waits for or holds that many bytes.
pub fn frame(buf: &[u8]) -> Result<Option<&[u8]>, TreeError> {
    let Some(len) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(TreeError::RecordTooLarge(len));
    }
    Ok(buf.get(4..4 + len))
}

/// Decodes one record body of a stream of `version`, which must be
/// consumed whole.
pub fn decode_record(version: u8, body: &[u8]) -> Result<Entry, TreeError> {
    let bad = |e: postcard::Error| TreeError::Decode(e.to_string());
    let (entry, rest) = match version {
        v1::VERSION => postcard::take_from_bytes::<v1::Entry>(body).map(|(e, r)| (Entry::from(e), r)),
        _ => postcard::take_from_bytes::<Entry>(body),
    }
    .map_err(bad)?;
    if !rest.is_empty() {
        return Err(TreeError::Decode(format!("{} bytes after the record", rest.len())));
    }
    Ok(entry)
}

/// Parses a tree stream fed in arbitrary pieces and checks its grammar.
#[derive(Default)]
pub struct TreeDecoder {
    buf: Vec<u8>,
    pos: usize,
    header_seen: bool,
    version: u8,
    in_file: bool,
    file_size: u64,
    file_seen: u64,
}

impl TreeDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 1 << 20 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete entry, or `None` when more input is needed.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TreeError> {
        if !self.header_seen {
            let Some(version) = header(&self.buf[self.pos..])? else { return Ok(None) };
            self.version = version;
            self.pos += HEADER_LEN;
            self.header_seen = true;
        }
        let Some(record) = frame(&self.buf[self.pos..])? else { return Ok(None) };
        let (len, entry) = (record.len(), decode_record(self.version, record)?);
        self.pos += 4 + len;
        self.check(&entry)?;
        Ok(Some(entry))
    }

    fn check(&mut self, entry: &Entry) -> Result<(), TreeError> {
        if let Some(p) = entry.path() {
            if p.is_empty() || p.len() > MAX_PATH {
                return Err(TreeError::Grammar("entry path is empty or too long"));
            }
        }
        if let Some(m) = entry.meta() {
            if m.xattrs.iter().map(|x| x.name.len() + x.value.len()).sum::<usize>() > MAX_XATTR_BYTES {
                return Err(TreeError::Grammar("extended attributes over the cap"));
            }
        }
        match entry {
            Entry::Chunks(refs) => {
                if !self.in_file {
                    return Err(TreeError::Grammar("chunk list outside a file"));
                }
                if refs.len() > MAX_CHUNKS_PER_RECORD {
                    return Err(TreeError::Grammar("too many chunks in one record"));
                }
                for r in refs {
                    self.file_seen = self.file_seen.saturating_add(r.len as u64);
                }
            }
            Entry::FileEnd { .. } => {
                if !self.in_file {
                    return Err(TreeError::Grammar("file end outside a file"));
                }
                if self.file_seen != self.file_size {
                    return Err(TreeError::Grammar("file chunks do not add up to its size"));
                }
                self.in_file = false;
            }
            _ if self.in_file => return Err(TreeError::Grammar("entry inside a file")),
            Entry::File { size, .. } => {
                self.in_file = true;
                self.file_size = *size;
                self.file_seen = 0;
            }
            _ => {}
        }
        Ok(())
    }

    /// Call at the end of input: errors if the stream stopped mid-way.
    pub fn finish(&self) -> Result<(), TreeError> {
        if !self.header_seen || self.pos != self.buf.len() || self.in_file {
            return Err(TreeError::Truncated);
        }
        Ok(())
    }
}

/// The version 1 layout, whose [`Meta`] had mode, owner and mtime only.
pub mod v1 {
    use serde::Deserialize;

    use super::{ChunkRef, ContentHash, SpecialKind};

    pub const VERSION: u8 = 1;

    #[derive(Deserialize)]
    pub struct Meta {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_ns: i64,
    }

    /// Variant for variant the version 1 [`super::Entry`].
    #[derive(Deserialize)]
    pub enum Entry {
        Dir {
            #[serde(with = "serde_bytes")]
            path: Vec<u8>,
            meta: Meta,
        },
        File {
            #[serde(with = "serde_bytes")]
            path: Vec<u8>,
            meta: Meta,
            size: u64,
        },
        Chunks(Vec<ChunkRef>),
        FileEnd {
            hash: ContentHash,
        },
        Symlink {
            #[serde(with = "serde_bytes")]
            path: Vec<u8>,
            meta: Meta,
            #[serde(with = "serde_bytes")]
            target: Vec<u8>,
        },
        Hardlink {
            #[serde(with = "serde_bytes")]
            path: Vec<u8>,
            #[serde(with = "serde_bytes")]
            target: Vec<u8>,
        },
        Special {
            #[serde(with = "serde_bytes")]
            path: Vec<u8>,
            meta: Meta,
            kind: SpecialKind,
            rdev: u64,
        },
    }

    impl From<Meta> for super::Meta {
        fn from(m: Meta) -> Self {
            super::Meta { mode: m.mode, uid: m.uid, gid: m.gid, mtime_ns: m.mtime_ns, ..Default::default() }
        }
    }

    impl From<Entry> for super::Entry {
        fn from(e: Entry) -> Self {
            use super::Entry as E;
            match e {
                Entry::Dir { path, meta } => E::Dir { path, meta: meta.into() },
                Entry::File { path, meta, size } => E::File { path, meta: meta.into(), size },
                Entry::Chunks(c) => E::Chunks(c),
                Entry::FileEnd { hash } => E::FileEnd { hash },
                Entry::Symlink { path, meta, target } => E::Symlink { path, meta: meta.into(), target },
                Entry::Hardlink { path, target } => E::Hardlink { path, target },
                Entry::Special { path, meta, kind, rdev } => E::Special { path, meta: meta.into(), kind, rdev },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        let meta = Meta {
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime_ns: 1_700_000_000_000_000_000,
            ctime_ns: 1_700_000_000_000_000_001,
            flags: FLAG_NODUMP,
            xattrs: vec![
                Xattr { name: b"system.posix_acl_access".to_vec(), value: vec![2, 0, 0, 0, 1, 0, 6, 0] },
                Xattr { name: b"user.k".to_vec(), value: b"v".to_vec() },
            ],
        };
        vec![
            Entry::Dir { path: b"etc".to_vec(), meta: Meta { mode: 0o755, ..meta.clone() } },
            Entry::File { path: b"etc/hosts".to_vec(), meta: meta.clone(), size: 5 },
            Entry::Chunks(vec![ChunkRef { id: ChunkId::of(b"hello"), len: 5 }]),
            Entry::FileEnd { hash: blake3::hash(b"hello").into() },
            Entry::Symlink { path: b"etc/l".to_vec(), meta: meta.clone(), target: b"hosts".to_vec() },
            Entry::Hardlink { path: b"etc/h".to_vec(), target: b"etc/hosts".to_vec() },
            Entry::Special { path: b"etc/p".to_vec(), meta, kind: SpecialKind::Fifo, rdev: 0 },
        ]
    }

    fn encode(entries: &[Entry]) -> Vec<u8> {
        let mut e = TreeEncoder::new();
        for x in entries {
            e.push(x);
        }
        e.take()
    }

    fn decode(bytes: &[u8], piece: usize) -> Result<Vec<Entry>, TreeError> {
        let mut d = TreeDecoder::new();
        let mut out = Vec::new();
        for p in bytes.chunks(piece) {
            d.feed(p);
            while let Some(e) = d.next_entry()? {
                out.push(e);
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn round_trip_in_any_pieces() {
        let s = sample();
        let bytes = encode(&s);
        for piece in [1, 3, 7, 64, bytes.len()] {
            assert_eq!(decode(&bytes, piece).unwrap(), s);
        }
    }

    #[test]
    fn golden_bytes() {
        let meta = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
            ctime_ns: 2,
            flags: FLAG_IMMUTABLE,
            xattrs: vec![Xattr { name: b"user.k".to_vec(), value: b"v".to_vec() }],
        };
        let bytes = encode(&[Entry::Dir { path: b"a".to_vec(), meta }]);
        #[rustfmt::skip]
        assert_eq!(bytes, [
            b'B', b'K', b'P', b'T', 2, 20, 0, 0, 0,
            0, 1, b'a', 0xed, 0x03, 0, 0, 2, // Dir, path, mode, uid, gid, mtime (zigzag)
            4, 0x10, // ctime (zigzag), flags
            1, 6, b'u', b's', b'e', b'r', b'.', b'k', 1, b'v', // one xattr
        ]);
    }

    /// A version 1 stream (the golden bytes of version 1) still decodes,
    /// with the fields it did not have empty.
    #[test]
    fn version_1_streams_still_decode() {
        let v1 = [b'B', b'K', b'P', b'T', 1, 8, 0, 0, 0, 0, 1, b'a', 0xed, 0x03, 0, 0, 2];
        let want = Entry::Dir { path: b"a".to_vec(), meta: Meta { mode: 0o755, mtime_ns: 1, ..Meta::default() } };
        for piece in [1, 5, v1.len()] {
            assert_eq!(decode(&v1, piece).unwrap(), vec![want.clone()]);
        }
        // Every kind of version 1 record, as version 1 wrote them.
        let mut old = b"BKPT\x01".to_vec();
        let m = (0o644u32, 1000u32, 1000u32, 5i64);
        let records: Vec<Vec<u8>> = vec![
            postcard::to_allocvec(&(0u8, serde_bytes::Bytes::new(b"d"), m)).unwrap(),
            postcard::to_allocvec(&(1u8, serde_bytes::Bytes::new(b"d/f"), m, 5u64)).unwrap(),
            postcard::to_allocvec(&(2u8, vec![ChunkRef { id: ChunkId::of(b"hello"), len: 5 }])).unwrap(),
            postcard::to_allocvec(&(3u8, ContentHash::from(blake3::hash(b"hello")))).unwrap(),
            postcard::to_allocvec(&(4u8, serde_bytes::Bytes::new(b"d/l"), m, serde_bytes::Bytes::new(b"f"))).unwrap(),
            postcard::to_allocvec(&(5u8, serde_bytes::Bytes::new(b"d/h"), serde_bytes::Bytes::new(b"d/f"))).unwrap(),
            postcard::to_allocvec(&(6u8, serde_bytes::Bytes::new(b"d/p"), m, SpecialKind::Fifo, 0u64)).unwrap(),
        ];
        for r in &records {
            old.extend_from_slice(&(r.len() as u32).to_le_bytes());
            old.extend_from_slice(r);
        }
        let got = decode(&old, 7).unwrap();
        let meta = Meta { mode: 0o644, uid: 1000, gid: 1000, mtime_ns: 5, ..Meta::default() };
        assert_eq!(got.len(), 7);
        assert_eq!(got[1], Entry::File { path: b"d/f".to_vec(), meta: meta.clone(), size: 5 });
        assert_eq!(got[6], Entry::Special { path: b"d/p".to_vec(), meta, kind: SpecialKind::Fifo, rdev: 0 });
    }

    #[test]
    fn rejects_bad_streams() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes[..bytes.len() - 1], 9), Err(TreeError::Truncated));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, 9), Err(TreeError::Magic));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad, 9), Err(TreeError::Version(9)));
        let mut bad = bytes.clone();
        bad[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad, 9), Err(TreeError::RecordTooLarge(_))));
        // Chunks outside a file, and a size that does not add up.
        let e = encode(&[Entry::Chunks(vec![])]);
        assert!(matches!(decode(&e, 9), Err(TreeError::Grammar(_))));
        let e = encode(&[
            Entry::File { path: b"f".to_vec(), meta: Meta::default(), size: 9 },
            Entry::FileEnd { hash: blake3::hash(b"").into() },
        ]);
        assert!(matches!(decode(&e, 9), Err(TreeError::Grammar(_))));
        let e = encode(&[Entry::File { path: b"f".to_vec(), meta: Meta::default(), size: 0 }]);
        assert_eq!(decode(&e, 9), Err(TreeError::Truncated));
    }
}
