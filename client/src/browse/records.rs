//! Reading the tree stream from any chunk, not only from its start: the
//! tree is one linear stream cut by content ([`bkp_common::tree`]), so a
//! record may begin in one chunk and end in the next, and the unchanged
//! chunks two snapshots share can be skipped only if parsing can pick up
//! again after them. [`resync`] finds the first record boundary in a
//! chunk; [`Records`] parses records and says where each one started.

use std::cmp::Ordering;

use bkp_common::names::check_path;
use bkp_common::tree::{self, Entry, TreeError, HEADER_LEN, MAX_RECORD};

/// Records needed in a row from a candidate boundary before [`resync`]
/// trusts it (a chunk of the tree holds thousands).
const RESYNC_RECORDS: usize = 4;

/// The order a push writes paths in: component by component, each
/// compared as bytes (a directory's subtree comes before a sibling whose
/// name extends the directory's: `a/b` before `a.txt`).
pub fn walk_cmp(a: &[u8], b: &[u8]) -> Ordering {
    a.split(|c| *c == b'/').cmp(b.split(|c| *c == b'/'))
}

use tree::decode_record;

/// Parses records fed in pieces; positions count from the first byte fed.
pub struct Records {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes dropped from the front of `buf`, for positions.
    base: u64,
    /// `None` until the header has been read.
    version: Option<u8>,
}

impl Records {
    /// At the start of a stream: the header comes first.
    pub fn new() -> Self {
        Self { buf: Vec::new(), pos: 0, base: 0, version: None }
    }

    /// Inside a stream of `version`, at a record boundary.
    pub fn resumed(version: u8) -> Self {
        Self { buf: Vec::new(), pos: 0, base: 0, version: Some(version) }
    }

    pub fn version(&self) -> Option<u8> {
        self.version
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes fed but not yet parsed (the start of an unfinished record).
    pub fn tail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The next complete record and the position where it began.
    pub fn next_record(&mut self) -> Result<Option<(u64, Entry)>, TreeError> {
        let version = match self.version {
            Some(v) => v,
            None => {
                let Some(v) = tree::header(&self.buf[self.pos..])? else { return Ok(None) };
                self.version = Some(v);
                self.pos += HEADER_LEN;
                v
            }
        };
        let Some(body) = tree::frame(&self.buf[self.pos..])? else { return Ok(None) };
        let entry = decode_record(version, body)?;
        let at = self.base + self.pos as u64;
        self.pos += 4 + body.len();
        Ok(Some((at, entry)))
    }
}

impl Default for Records {
    fn default() -> Self {
        Self::new()
    }
}

/// The first record boundary in `chunk`, a piece from the middle of a
/// stream of `version`: the smallest offset from which records parse,
/// each a valid entry, paths in walk order and files well formed, up to
/// the end of the chunk (the last one may be cut off). `None` when no
/// offset passes, e.g. a chunk inside one huge record.
pub fn resync(chunk: &[u8], version: u8) -> Option<usize> {
    let last = chunk.len().min(MAX_RECORD + 4);
    (0..last).find(|&o| chain_ok(&chunk[o..], version))
}

fn chain_ok(mut d: &[u8], version: u8) -> bool {
    let mut n = 0;
    let mut prev: Option<Vec<u8>> = None;
    // Until the first path entry, the chunk may continue a file.
    let (mut started, mut in_file) = (false, false);
    loop {
        if d.len() < 4 {
            return n >= RESYNC_RECORDS || (n > 0 && d.is_empty());
        }
        let len = match tree::frame(d) {
            Ok(Some(body)) if !body.is_empty() => body.len(),
            Ok(Some(_)) | Err(_) => return false,
            Ok(None) => return n >= RESYNC_RECORDS,
        };
        let Ok(e) = decode_record(version, &d[4..4 + len]) else { return false };
        match &e {
            Entry::Chunks(_) | Entry::FileEnd { .. } if started && !in_file => return false,
            Entry::FileEnd { .. } => in_file = false,
            Entry::Chunks(_) => {}
            other => {
                if in_file {
                    return false;
                }
                let p = other.path().unwrap_or_default();
                if check_path(p).is_err() || prev.as_deref().is_some_and(|q| walk_cmp(q, p) != Ordering::Less) {
                    return false;
                }
                prev = Some(p.to_vec());
                in_file = matches!(other, Entry::File { .. });
                started = true;
            }
        }
        n += 1;
        d = &d[4 + len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::tree::{ChunkRef, Meta, TreeEncoder};
    use bkp_common::ChunkId;

    fn stream(n: usize) -> Vec<u8> {
        let mut enc = TreeEncoder::new();
        enc.push(&Entry::Dir { path: b"d".to_vec(), meta: Meta::default() });
        for i in 0..n {
            let data = format!("content {i}");
            let meta = Meta { mode: 0o644, uid: 1000, gid: 1000, mtime_ns: i as i64, ..Meta::default() };
            enc.push(&Entry::File { path: format!("d/f{i:06}").into_bytes(), meta, size: data.len() as u64 });
            enc.push(&Entry::Chunks(vec![ChunkRef { id: ChunkId::of(data.as_bytes()), len: data.len() as u32 }]));
            enc.push(&Entry::FileEnd { hash: blake3::hash(data.as_bytes()).into() });
        }
        enc.take()
    }

    #[test]
    fn walk_order() {
        assert_eq!(walk_cmp(b"a/b", b"a.txt"), Ordering::Less);
        assert_eq!(walk_cmp(b"a", b"a/b"), Ordering::Less);
        assert_eq!(walk_cmp(b"a/b", b"a/b"), Ordering::Equal);
        assert_eq!(walk_cmp(b"b", b"a/z"), Ordering::Greater);
    }

    /// From every offset of the stream, resync finds the next true record
    /// boundary, and parsing from there gives the same records.
    #[test]
    fn resync_finds_the_true_boundary() {
        let s = stream(300);
        let mut all = Records::new();
        all.feed(&s);
        let mut starts = Vec::new();
        while let Some((at, _)) = all.next_record().unwrap() {
            starts.push(at as usize);
        }
        assert!(all.tail().is_empty());
        // Far enough from the end that four records follow.
        for cut in (HEADER_LEN..s.len() - 2000).step_by(7) {
            let o = resync(&s[cut..], tree::VERSION).expect("a boundary");
            let want = *starts.iter().find(|&&b| b >= cut).unwrap();
            assert_eq!(cut + o, want, "cut at {cut}");
        }
    }

    #[test]
    fn records_report_positions_across_pieces() {
        let s = stream(20);
        let mut r = Records::new();
        let mut got = Vec::new();
        for piece in s.chunks(13) {
            r.feed(piece);
            while let Some((at, e)) = r.next_record().unwrap() {
                got.push((at, e));
            }
        }
        assert!(r.tail().is_empty());
        assert_eq!(got[0].0, HEADER_LEN as u64);
        assert_eq!(got.len(), 1 + 20 * 3);
        let mut d = bkp_common::tree::TreeDecoder::new();
        d.feed(&s);
        for (_, e) in got {
            assert_eq!(Some(e), d.next_entry().unwrap());
        }
    }
}
