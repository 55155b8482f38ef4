//! The per-set metadata cache `BKPM`: for each regular file of the last
//! successful push of a set, its stat key and its content (chunk list and
//! whole-content hash), so an unchanged file is not read again.
//!
//! ```text
//! file   = "BKPM" version:u8(=1) record(Header) record(Record)*
//! record = len:u32 LE (<= MAX_RECORD)  postcard body  blake3(body)[..8]
//! ```
//!
//! Files come in walk order (see [`path_cmp`]), each a `File` record
//! followed by `Chunks` records of at most 4096 refs, so the cache is read
//! as a stream beside the walk and a huge tree never sits in memory. Every
//! record carries its own checksum: a flipped bit must not put a wrong
//! content hash into a snapshot. A reader stops at the first bad record;
//! the caller treats everything after it as not cached.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bkp_common::chunker::MAX_CHUNK;
use bkp_common::tree::{ChunkRef, MAX_CHUNKS_PER_RECORD, MAX_PATH};
use bkp_common::ContentHash;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"BKPM";
pub const VERSION: u8 = 1;
pub const MAX_RECORD: usize = 1 << 20;
const CHECK_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("metadata cache {0}: {1}")]
    Io(String, std::io::Error),
    #[error("metadata cache {0} is damaged ({1}); it is ignored and rewritten by the next successful push")]
    Corrupt(String, String),
    #[error("metadata cache {0} has version {1}, this bkp reads {VERSION}; it is ignored and rewritten")]
    Version(String, u8),
    #[error("metadata cache {0} belongs to another server or set; it is ignored and rewritten")]
    Foreign(String),
}

/// Whose cache this is. The file name is derived from it too; the header
/// makes a renamed or colliding file harmless.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub server: String,
    pub host: String,
    pub name: String,
}

/// What must be equal for a file to count as unchanged. ctime and inode
/// catch a file replaced or rewritten with its old mtime restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedFile {
    /// As in the tree stream: absolute, without the leading `/`.
    pub path: Vec<u8>,
    pub key: FileKey,
    pub hash: ContentHash,
    pub chunks: Vec<ChunkRef>,
}

#[derive(Serialize, Deserialize)]
enum Record {
    File {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        key: FileKey,
        hash: ContentHash,
        chunks: u64,
    },
    Chunks(Vec<ChunkRef>),
}

/// The walk's order: depth first, children sorted by name bytes. That is
/// component-wise byte order ("a/b" before "a.b", since "a" < "a.b"), not
/// plain byte order.
pub fn path_cmp(a: &[u8], b: &[u8]) -> Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// The cache file for a (server, host, set).
pub fn file_name(h: &Header) -> String {
    let key = blake3::hash(format!("{}\0{}\0{}", h.server, h.host, h.name).as_bytes());
    // Host and set names are [A-Za-z0-9._-]: safe in a file name.
    format!("{}.{}.{}.bkpm", h.host, h.name, &key.to_hex()[..16])
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len() + CHECK_LEN);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&blake3::hash(body).as_bytes()[..CHECK_LEN]);
    out
}

fn postcard_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard to Vec")
}

/// Writes a new cache beside the old one; [`CacheWriter::commit`] renames
/// it into place, dropping it uncommitted removes it.
pub struct CacheWriter {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    last: Option<Vec<u8>>,
}

impl CacheWriter {
    pub fn create(dir: &Path, header: &Header) -> Result<Self, CacheError> {
        let err = |e| CacheError::Io(dir.display().to_string(), e);
        std::fs::create_dir_all(dir).map_err(err)?;
        let dest = dir.join(file_name(header));
        let tmp = dir.join(format!(".{}.tmp.{:016x}", file_name(header), rand::random::<u64>()));
        let mut opts = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let f = opts.write(true).create_new(true).open(&tmp).map_err(err)?;
        let mut w = Self { out: Some(BufWriter::with_capacity(1 << 20, f)), tmp, dest, last: None };
        let mut start = MAGIC.to_vec();
        start.push(VERSION);
        start.extend(frame(&postcard_bytes(header)));
        w.write(&start)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<(), CacheError> {
        let out = self.out.as_mut().expect("writer open until commit");
        out.write_all(b).map_err(|e| CacheError::Io(self.tmp.display().to_string(), e))
    }

    /// Adds a file. Files must come in walk order; one out of order is
    /// left out (a reader would stop there).
    pub fn add(&mut self, f: &CachedFile) -> Result<(), CacheError> {
        if self.last.as_deref().is_some_and(|l| path_cmp(l, &f.path) != Ordering::Less) {
            return Ok(());
        }
        let head = Record::File { path: f.path.clone(), key: f.key, hash: f.hash, chunks: f.chunks.len() as u64 };
        let mut buf = frame(&postcard_bytes(&head));
        for part in f.chunks.chunks(MAX_CHUNKS_PER_RECORD) {
            buf.extend(frame(&postcard_bytes(&Record::Chunks(part.to_vec()))));
        }
        self.write(&buf)?;
        self.last = Some(f.path.clone());
        Ok(())
    }

    /// Puts the new cache in place of the old one.
    pub fn commit(mut self) -> Result<(), CacheError> {
        let err = |p: &Path, e| CacheError::Io(p.display().to_string(), e);
        let out = self.out.take().expect("commit once");
        let f = out.into_inner().map_err(|e| err(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| err(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| err(&self.dest, e))
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads a cache written by [`CacheWriter`], one file at a time.
pub struct CacheReader<R> {
    input: R,
    shown: String,
    last: Option<Vec<u8>>,
}

impl CacheReader<BufReader<File>> {
    /// Opens the cache for `header` in `dir`; `Ok(None)` when there is none.
    pub fn open(dir: &Path, header: &Header) -> Result<Option<Self>, CacheError> {
        let path = dir.join(file_name(header));
        match File::open(&path) {
            Ok(f) => Self::new(BufReader::with_capacity(1 << 20, f), path.display().to_string(), header).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io(path.display().to_string(), e)),
        }
    }
}

impl<R: Read> CacheReader<R> {
    pub fn new(mut input: R, shown: String, want: &Header) -> Result<Self, CacheError> {
        let mut start = [0u8; 5];
        input.read_exact(&mut start).map_err(|e| CacheError::Corrupt(shown.clone(), e.to_string()))?;
        if &start[..4] != MAGIC {
            return Err(CacheError::Corrupt(shown, "bad magic".into()));
        }
        if start[4] != VERSION {
            return Err(CacheError::Version(shown, start[4]));
        }
        let mut r = Self { input, shown, last: None };
        let body = r.record()?.ok_or_else(|| r.corrupt("no header"))?;
        let got: Header = postcard::from_bytes(&body).map_err(|e| r.corrupt(e))?;
        if got != *want {
            return Err(CacheError::Foreign(r.shown));
        }
        Ok(r)
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError::Corrupt(self.shown.clone(), e.to_string())
    }

    /// One record's checked body; `None` at a clean end of file.
    fn record(&mut self) -> Result<Option<Vec<u8>>, CacheError> {
        let mut len = [0u8; 4];
        match self.input.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(CacheError::Io(self.shown.clone(), e)),
        }
        self.input.read_exact(&mut len[1..]).map_err(|e| self.corrupt(e))?;
        let len = u32::from_le_bytes(len) as usize;
        // Checked before the buffer is allocated.
        if len > MAX_RECORD {
            return Err(self.corrupt(format!("record of {len} bytes")));
        }
        let mut body = vec![0u8; len + CHECK_LEN];
        self.input.read_exact(&mut body).map_err(|e| self.corrupt(e))?;
        let check = body.split_off(len);
        if check != blake3::hash(&body).as_bytes()[..CHECK_LEN] {
            return Err(self.corrupt("checksum mismatch"));
        }
        Ok(Some(body))
    }

    fn decode(&mut self) -> Result<Option<Record>, CacheError> {
        match self.record()? {
            None => Ok(None),
            Some(b) => postcard::from_bytes(&b).map(Some).map_err(|e| self.corrupt(e)),
        }
    }

    /// The next file; `None` at the end.
    pub fn next_file(&mut self) -> Result<Option<CachedFile>, CacheError> {
        let (path, key, hash, n) = match self.decode()? {
            None => return Ok(None),
            Some(Record::File { path, key, hash, chunks }) => (path, key, hash, chunks),
            Some(Record::Chunks(_)) => return Err(self.corrupt("chunk list outside a file")),
        };
        if path.is_empty() || path.len() > MAX_PATH {
            return Err(self.corrupt("bad path length"));
        }
        if self.last.as_deref().is_some_and(|l| path_cmp(l, &path) != Ordering::Less) {
            return Err(self.corrupt("files out of order"));
        }
        // Capacity from the claim is capped; the list grows only with
        // records actually read.
        let mut chunks = Vec::with_capacity((n as usize).min(MAX_CHUNKS_PER_RECORD));
        while (chunks.len() as u64) < n {
            match self.decode()? {
                Some(Record::Chunks(part)) if !part.is_empty() && part.len() <= MAX_CHUNKS_PER_RECORD => {
                    chunks.extend(part)
                }
                _ => return Err(self.corrupt("chunk list cut short")),
            }
        }
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        if chunks.len() as u64 != n || total != key.size || chunks.iter().any(|c| c.len == 0 || c.len > MAX_CHUNK) {
            return Err(self.corrupt("chunk list does not match the file size"));
        }
        self.last = Some(path.clone());
        Ok(Some(CachedFile { path, key, hash, chunks }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::ChunkId;

    fn header() -> Header {
        Header { server: "s:1".into(), host: "h".into(), name: "files".into() }
    }

    fn file(path: &str, data: &[&[u8]]) -> CachedFile {
        let chunks: Vec<ChunkRef> = data.iter().map(|d| ChunkRef { id: ChunkId::of(d), len: d.len() as u32 }).collect();
        let size = data.iter().map(|d| d.len() as u64).sum();
        CachedFile {
            path: path.as_bytes().to_vec(),
            key: FileKey { size, mtime_ns: 5, ctime_ns: 6, ino: 7, dev: 8 },
            hash: ContentHash::from(blake3::hash(&data.concat())),
            chunks,
        }
    }

    fn write(dir: &Path, files: &[CachedFile]) -> Vec<u8> {
        let mut w = CacheWriter::create(dir, &header()).unwrap();
        for f in files {
            w.add(f).unwrap();
        }
        w.commit().unwrap();
        std::fs::read(dir.join(file_name(&header()))).unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<CachedFile>, CacheError> {
        let mut r = CacheReader::new(bytes, "t".into(), &header())?;
        let mut out = Vec::new();
        while let Some(f) = r.next_file()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn round_trip_in_walk_order() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<Vec<u8>> = (0..5000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let big_refs: Vec<&[u8]> = big.iter().map(|v| &v[..]).collect();
        let files = vec![file("a/b", &[b"one"]), file("a.b", &[]), file("z", &big_refs)];
        let bytes = write(dir.path(), &files);
        assert_eq!(read_all(&bytes).unwrap(), files);
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn walk_order_is_component_wise() {
        assert_eq!(path_cmp(b"a/b", b"a.b"), Ordering::Less);
        assert_eq!(path_cmp(b"a", b"a/b"), Ordering::Less);
        assert_eq!(path_cmp(b"a/z", b"ab"), Ordering::Less);
        assert_eq!(path_cmp(b"b", b"a/z"), Ordering::Greater);
    }

    #[test]
    fn golden_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = CachedFile {
            path: b"x".to_vec(),
            key: FileKey { size: 2, mtime_ns: 1, ctime_ns: -1, ino: 3, dev: 4 },
            hash: ContentHash::from_bytes([0xaa; 32]),
            chunks: vec![ChunkRef { id: ChunkId::from_bytes([0xbb; 32]), len: 2 }],
        };
        let bytes = write(dir.path(), &[f]);
        let mut want = b"BKPM\x01".to_vec();
        // Header record: "s:1", "h", "files".
        let h = [3, b's', b':', b'1', 1, b'h', 5, b'f', b'i', b'l', b'e', b's'];
        want.extend_from_slice(&(h.len() as u32).to_le_bytes());
        want.extend_from_slice(&h);
        want.extend_from_slice(&blake3::hash(&h).as_bytes()[..8]);
        // File: variant 0, path "x", size 2, mtime 1 and ctime -1 zigzag, ino 3, dev 4, hash, 1 chunk.
        let mut file = vec![0, 1, b'x', 2, 2, 1, 3, 4];
        file.extend_from_slice(&[0xaa; 32]);
        file.push(1);
        want.extend_from_slice(&(file.len() as u32).to_le_bytes());
        want.extend_from_slice(&file);
        want.extend_from_slice(&blake3::hash(&file).as_bytes()[..8]);
        // Chunks: variant 1, one ref: id then len 2.
        let mut refs = vec![1, 1];
        refs.extend_from_slice(&[0xbb; 32]);
        refs.push(2);
        want.extend_from_slice(&(refs.len() as u32).to_le_bytes());
        want.extend_from_slice(&refs);
        want.extend_from_slice(&blake3::hash(&refs).as_bytes()[..8]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![file("a", &[b"one"]), file("b", &[b"two"])];
        let good = write(dir.path(), &files);
        // Every single flipped bit past the magic is an error or a loss of
        // entries, never a different entry.
        for i in 5..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            if let Ok(got) = read_all(&bad) {
                panic!("flip at {i} read back {} files", got.len());
            }
        }
        let mut r = CacheReader::new(&good[..good.len() - 3], "t".into(), &header()).unwrap();
        assert_eq!(r.next_file().unwrap().unwrap(), files[0]);
        assert!(matches!(r.next_file(), Err(CacheError::Corrupt(..))));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(matches!(read_all(&v2), Err(CacheError::Version(_, 2))));
        let other = Header { name: "other".into(), ..header() };
        assert!(matches!(CacheReader::new(&good[..], "t".into(), &other), Err(CacheError::Foreign(_))));
        // A record length over the cap fails before allocating.
        let mut huge = good[..5].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&huge), Err(CacheError::Corrupt(..))));
    }

    #[test]
    fn inconsistent_entries_are_refused() {
        let mut f = file("a", &[b"one"]);
        f.key.size = 4;
        let dir = tempfile::tempdir().unwrap();
        let bytes = write(dir.path(), &[f]);
        assert!(matches!(read_all(&bytes), Err(CacheError::Corrupt(..))));
        // Out of order files are left out by the writer.
        let bytes = write(dir.path(), &[file("b", &[b"x"]), file("a", &[b"y"])]);
        assert_eq!(read_all(&bytes).unwrap().len(), 1);
    }
}
