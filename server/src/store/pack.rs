//! Pack objects: many chunk blobs in one object of the bucket, so a push
//! costs one PUT per `pack_size` of new data, not one per chunk.
//!
//! ```text
//! offset   size  field
//! 0        4     magic "BKPK"
//! 4        1     version (1)
//! 5        1     kind: 1 = data chunks, 2 = tree chunks
//! 6        2     zero
//! 8        ..    blobs, each:  "BLOB" | chunk id (32) | length u32 LE | blob
//! I        ..    index: count u32 LE, then per blob in pack order:
//!                chunk id (32) | offset of the blob u64 LE | length u32 LE
//! end-24   4     index length (count field included) u32 LE
//! end-20   16    first 16 bytes of blake3(index)
//! end-4    4     magic "KPKB"
//! ```
//! The pack's object name is the hex blake3 of all its bytes
//! ([`PackId`]): a second PUT of the same pack is the same object, so a
//! create-only PUT retried after a lost answer is safe.
//!
//! Every blob carries its own header, so a pack whose index is damaged is
//! still read in full by [`scan`]; the index lets a reader (and `rebuild`)
//! learn a pack's chunks from a ranged GET of its end alone ([`read_trailer`],
//! [`parse_index`]). Blob offsets point at the blob itself (past its
//! header), so a chunk is read with one ranged GET of exactly its bytes.
//! Lengths are checked against [`MAX_BLOB`] and the pack's size before
//! anything is allocated.

use bkp_common::blob::MAX_BLOB;
use bkp_common::ChunkId;

pub const MAGIC: &[u8; 4] = b"BKPK";
pub const TRAILER_MAGIC: &[u8; 4] = b"KPKB";
pub const BLOB_MAGIC: &[u8; 4] = b"BLOB";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
pub const BLOB_HEADER_LEN: usize = 4 + 32 + 4;
pub const INDEX_ENTRY_LEN: usize = 32 + 8 + 4;
pub const TRAILER_LEN: usize = 4 + 16 + 4;
/// Largest pack a reader accepts: the largest `pack_size` plus one blob
/// that started just below it, plus its index.
pub const MAX_PACK: u64 = (1 << 30) + 2 * (MAX_BLOB as u64) + (64 << 20);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Data = 1,
    Tree = 2,
}

/// blake3 of a pack's bytes: its object name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn parse(s: &str) -> Option<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(Self(b))
    }
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl std::fmt::Debug for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackId({})", self.short())
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One blob of a pack: where its bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: ChunkId,
    /// Of the blob's first byte (past its header), from the pack's start.
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("not a bkp pack (bad magic)")]
    Magic,
    #[error("pack version {0} is not 1: written by a newer bkp-server; upgrade this one")]
    Version(u8),
    #[error("pack kind {0} is unknown")]
    Kind(u8),
    #[error("pack is {0} bytes, outside what a pack can be")]
    Size(u64),
    #[error("pack index is damaged: {0} (the blobs can still be read by a scan)")]
    Index(String),
    #[error("pack blob at offset {0} is damaged: {1}")]
    Blob(u64, String),
}

/// A pack being filled.
pub struct PackWriter {
    kind: Kind,
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

/// A finished pack: its name, bytes and index.
pub struct SealedPack {
    pub id: PackId,
    pub kind: Kind,
    pub bytes: Vec<u8>,
    pub entries: Vec<Entry>,
}

impl PackWriter {
    pub fn new(kind: Kind) -> Self {
        let mut bytes = Vec::with_capacity(1 << 20);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&[VERSION, kind as u8, 0, 0]);
        Self { kind, bytes, entries: Vec::new() }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes so far (the index and trailer not counted).
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Appends a blob; returns where it is. A blob is at most [`MAX_BLOB`]
    /// (checked by `VerifiedChunk` before it gets here).
    pub fn add(&mut self, id: &ChunkId, blob: &[u8]) -> Entry {
        assert!(blob.len() <= MAX_BLOB, "a verified blob is at most MAX_BLOB");
        self.bytes.extend_from_slice(BLOB_MAGIC);
        self.bytes.extend_from_slice(id.as_bytes());
        self.bytes.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        let e = Entry { id: *id, offset: self.bytes.len() as u64, len: blob.len() as u32 };
        self.bytes.extend_from_slice(blob);
        self.entries.push(e);
        e
    }

    /// The blob bytes of an entry added to this writer (a read of a chunk
    /// whose pack is not uploaded yet).
    pub fn blob(&self, e: &Entry) -> &[u8] {
        &self.bytes[e.offset as usize..e.offset as usize + e.len as usize]
    }

    pub fn finish(self) -> SealedPack {
        let mut bytes = self.bytes;
        let index = encode_index(&self.entries);
        bytes.extend_from_slice(&index);
        bytes.extend_from_slice(&(index.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&blake3::hash(&index).as_bytes()[..16]);
        bytes.extend_from_slice(TRAILER_MAGIC);
        SealedPack { id: PackId::of(&bytes), kind: self.kind, bytes, entries: self.entries }
    }
}

fn encode_index(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * INDEX_ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The kind of a pack, from its first [`HEADER_LEN`] bytes.
pub fn read_header(head: &[u8]) -> Result<Kind, PackError> {
    if head.len() < HEADER_LEN || &head[..4] != MAGIC {
        return Err(PackError::Magic);
    }
    if head[4] != VERSION {
        return Err(PackError::Version(head[4]));
    }
    match head[5] {
        1 => Ok(Kind::Data),
        2 => Ok(Kind::Tree),
        k => Err(PackError::Kind(k)),
    }
}

/// From the last [`TRAILER_LEN`] bytes of a pack of `pack_len` bytes: the
/// range of its index and the index checksum.
pub fn read_trailer(trailer: &[u8], pack_len: u64) -> Result<(std::ops::Range<u64>, [u8; 16]), PackError> {
    if !(HEADER_LEN as u64 + TRAILER_LEN as u64 + 4..=MAX_PACK).contains(&pack_len) {
        return Err(PackError::Size(pack_len));
    }
    if trailer.len() != TRAILER_LEN || &trailer[20..] != TRAILER_MAGIC {
        return Err(PackError::Index("bad trailer magic".into()));
    }
    let index_len = u32_at(trailer, 0) as u64;
    let room = pack_len - HEADER_LEN as u64 - TRAILER_LEN as u64;
    if index_len < 4 || index_len > room || !(index_len - 4).is_multiple_of(INDEX_ENTRY_LEN as u64) {
        return Err(PackError::Index(format!("index length {index_len} in a pack of {pack_len} bytes")));
    }
    let end = pack_len - TRAILER_LEN as u64;
    Ok((end - index_len..end, trailer[4..20].try_into().expect("16 bytes")))
}

/// The entries of an index read from `range` (what [`read_trailer`] gave).
/// Every entry is checked to lie in the blob area, in order, not
/// overlapping: a damaged index is refused, never trusted.
pub fn parse_index(index: &[u8], range: std::ops::Range<u64>, sum: &[u8; 16]) -> Result<Vec<Entry>, PackError> {
    let bad = |m: String| PackError::Index(m);
    if index.len() as u64 != range.end - range.start || index.len() < 4 {
        return Err(bad("index length".into()));
    }
    if &blake3::hash(index).as_bytes()[..16] != sum {
        return Err(bad("checksum mismatch".into()));
    }
    let count = u32_at(index, 0) as usize;
    if 4 + count.checked_mul(INDEX_ENTRY_LEN).ok_or_else(|| bad("count".into()))? != index.len() {
        return Err(bad(format!("{count} entries do not fill {} bytes", index.len())));
    }
    let mut out = Vec::with_capacity(count);
    let mut next = HEADER_LEN as u64;
    for i in 0..count {
        let at = 4 + i * INDEX_ENTRY_LEN;
        let id = ChunkId::from_slice(&index[at..at + 32]).expect("32 bytes");
        let offset = u64::from_le_bytes(index[at + 32..at + 40].try_into().expect("8 bytes"));
        let len = u32_at(index, at + 40);
        if offset < next + BLOB_HEADER_LEN as u64
            || len as usize > MAX_BLOB
            || offset.checked_add(len as u64).is_none_or(|e| e > range.start)
        {
            return Err(bad(format!("entry {i} (offset {offset}, length {len}) is out of place")));
        }
        next = offset + len as u64;
        out.push(Entry { id, offset, len });
    }
    Ok(out)
}

/// The entries of a whole pack, from its index, checked against the blob
/// headers they point at.
pub fn parse(pack: &[u8]) -> Result<(Kind, Vec<Entry>), PackError> {
    let kind = read_header(pack)?;
    let len = pack.len() as u64;
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(PackError::Size(len));
    }
    let (range, sum) = read_trailer(&pack[pack.len() - TRAILER_LEN..], len)?;
    let entries = parse_index(&pack[range.start as usize..range.end as usize], range, &sum)?;
    for e in &entries {
        let h = e.offset as usize - BLOB_HEADER_LEN;
        if &pack[h..h + 4] != BLOB_MAGIC || &pack[h + 4..h + 36] != e.id.as_bytes() || u32_at(pack, h + 36) != e.len {
            return Err(PackError::Index(format!("entry for {} disagrees with its blob header", e.id.short())));
        }
    }
    Ok((kind, entries))
}

/// The blobs of a pack found by walking their headers, without the index
/// (a pack whose end is damaged). Stops at the first header that is not
/// one; returns what it found before, and the offset where it stopped if
/// that was not the index.
pub fn scan(pack: &[u8]) -> Result<(Kind, Vec<Entry>, Option<u64>), PackError> {
    let kind = read_header(pack)?;
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        if pack.len() - at < BLOB_HEADER_LEN || &pack[at..at + 4] != BLOB_MAGIC {
            // The index follows the last blob: its count says how many.
            let rest = &pack[at..];
            let is_index = rest.len() >= 4 + TRAILER_LEN && u32_at(rest, 0) as usize == out.len();
            return Ok((kind, out, (!is_index).then_some(at as u64)));
        }
        let len = u32_at(pack, at + 36) as usize;
        let start = at + BLOB_HEADER_LEN;
        if len > MAX_BLOB || len > pack.len() - start {
            return Ok((kind, out, Some(at as u64)));
        }
        let id = ChunkId::from_slice(&pack[at + 4..at + 36]).expect("32 bytes");
        out.push(Entry { id, offset: start as u64, len: len as u32 });
        at = start + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(data: &[u8]) -> (ChunkId, Vec<u8>) {
        (ChunkId::of(data), bkp_common::blob::encode(data, 3))
    }

    fn sample() -> SealedPack {
        let mut w = PackWriter::new(Kind::Data);
        for d in [&b"alpha"[..], b"beta", &[7u8; 5000]] {
            let (id, b) = blob(d);
            w.add(&id, &b);
        }
        w.finish()
    }

    #[test]
    fn round_trip_through_index_and_scan() {
        let p = sample();
        assert_eq!(p.id, PackId::of(&p.bytes));
        let (kind, entries) = parse(&p.bytes).unwrap();
        assert_eq!((kind, &entries), (Kind::Data, &p.entries));
        for (e, d) in entries.iter().zip([&b"alpha"[..], b"beta", &[7u8; 5000]]) {
            let b = &p.bytes[e.offset as usize..(e.offset + e.len as u64) as usize];
            assert_eq!(bkp_common::blob::decode_verified(b, &e.id).unwrap(), d);
        }
        let (kind, scanned, stop) = scan(&p.bytes).unwrap();
        assert_eq!((kind, scanned, stop), (Kind::Data, p.entries.clone(), None));
        // The trailer alone gives the index's range: the ranged GETs a
        // rebuild makes.
        let tail = &p.bytes[p.bytes.len() - TRAILER_LEN..];
        let (range, sum) = read_trailer(tail, p.bytes.len() as u64).unwrap();
        let idx = parse_index(&p.bytes[range.start as usize..range.end as usize], range, &sum).unwrap();
        assert_eq!(idx, p.entries);
        let empty = PackWriter::new(Kind::Tree).finish();
        assert_eq!(parse(&empty.bytes).unwrap(), (Kind::Tree, vec![]));
        assert_eq!(scan(&empty.bytes).unwrap(), (Kind::Tree, vec![], None));
    }

    /// The bytes of a small pack, fixed: a change to the format must show
    /// here (and bump VERSION).
    #[test]
    fn golden_bytes() {
        let id = ChunkId::from_bytes([0xAB; 32]);
        let mut w = PackWriter::new(Kind::Tree);
        w.add(&id, b"xyz");
        let p = w.finish();
        let mut want = Vec::new();
        want.extend_from_slice(b"BKPK\x01\x02\x00\x00");
        want.extend_from_slice(b"BLOB");
        want.extend_from_slice(&[0xAB; 32]);
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(b"xyz");
        let index_at = want.len();
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&[0xAB; 32]);
        want.extend_from_slice(&48u64.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        let sum = blake3::hash(&want[index_at..]);
        want.extend_from_slice(&48u32.to_le_bytes());
        want.extend_from_slice(&sum.as_bytes()[..16]);
        want.extend_from_slice(b"KPKB");
        assert_eq!(p.bytes, want);
        assert_eq!(p.entries, vec![Entry { id, offset: 48, len: 3 }]);
        assert_eq!(hex::encode(&sum.as_bytes()[..16]), hex::encode(&p.bytes[p.bytes.len() - 20..p.bytes.len() - 4]));
        assert_eq!(p.id.to_hex(), blake3::hash(&want).to_hex().as_str());
        assert_eq!(PackId::parse(&p.id.to_hex()), Some(p.id));
    }

    #[test]
    fn damaged_packs_are_refused_or_scanned() {
        let p = sample();
        let b = &p.bytes;
        let n = b.len();
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad).unwrap_err(), PackError::Magic);
        let mut bad = b.clone();
        bad[4] = 9;
        assert_eq!(parse(&bad).unwrap_err(), PackError::Version(9));
        let mut bad = b.clone();
        bad[5] = 7;
        assert_eq!(parse(&bad).unwrap_err(), PackError::Kind(7));
        // A flipped index byte: the checksum refuses it; the scan still
        // finds every blob.
        let mut bad = b.clone();
        bad[n - TRAILER_LEN - 10] ^= 1;
        assert!(matches!(parse(&bad), Err(PackError::Index(m)) if m.contains("checksum")));
        assert_eq!(scan(&bad).unwrap().1, p.entries);
        // An index length past the pack, or not a whole number of entries.
        for len in [u32::MAX, (n as u32) - 4, 5] {
            let mut bad = b.clone();
            bad[n - TRAILER_LEN..n - TRAILER_LEN + 4].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(parse(&bad), Err(PackError::Index(_))), "index length {len}");
        }
        // A truncated pack: no trailer, and the scan stops at the cut blob.
        let cut = &b[..p.entries[2].offset as usize + 10];
        assert!(parse(cut).is_err());
        let (_, found, stop) = scan(cut).unwrap();
        assert_eq!(found, p.entries[..2]);
        assert_eq!(stop, Some(p.entries[2].offset - BLOB_HEADER_LEN as u64));
        // A blob header's length that claims more than the pack holds.
        let mut bad = b.clone();
        let h = p.entries[1].offset as usize - 4;
        bad[h..h + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bad).is_err(), "the index and the blob header disagree");
        assert_eq!(scan(&bad).unwrap().1, p.entries[..1]);
        // Too short to be a pack, or claiming a size no pack has.
        assert!(parse(&b[..10]).is_err());
        assert!(parse(b"").is_err());
        assert_eq!(read_trailer(&b[n - TRAILER_LEN..], MAX_PACK + 1).unwrap_err(), PackError::Size(MAX_PACK + 1));
        // An index that lies about an offset (checksum recomputed, as a
        // buggy writer would): refused, not trusted.
        let mut w = PackWriter::new(Kind::Data);
        let (id, bl) = blob(b"one");
        w.add(&id, &bl);
        w.entries[0].offset = 2;
        assert!(matches!(parse(&w.finish().bytes), Err(PackError::Index(m)) if m.contains("out of place")));
    }
}
