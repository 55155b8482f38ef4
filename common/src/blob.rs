//! Chunk blob: how one chunk travels on the wire and sits in the store.
//!
//! ```text
//! offset size field
//! 0      4    magic "BKPC"
//! 4      1    version (1)
//! 5      1    codec: 0 = stored, 1 = zstd frame, 2 = bare zstd frame,
//!             3 = sealed (encrypted by the client; layout in [`crate::seal`])
//! 6      4    raw length, u32 little endian, at most MAX_CHUNK
//! 10     ..   payload
//! ```
//! The raw length is checked against [`MAX_CHUNK`] before anything is
//! allocated, so a crafted blob cannot make a reader allocate more than
//! one maximum chunk.
//!
//! This build writes codec 2: a zstd frame without the magic number and
//! the content size, which this header already says (see
//! [`crate::zstd_ctx`]). Codec 1, a standard frame, is what earlier builds
//! wrote; it is read as ever.

use crate::chunker::MAX_CHUNK;
use crate::ids::ChunkId;

pub const MAGIC: &[u8; 4] = b"BKPC";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 10;
/// Largest valid blob: a sealed stored (uncompressed) maximum chunk.
pub const MAX_BLOB: usize = HEADER_LEN + MAX_CHUNK as usize + crate::seal::OVERHEAD;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Stored = 0,
    Zstd = 1,
    ZstdBare = 2,
    /// Encrypted by the client ([`crate::seal`]); appended, so a build
    /// before it refuses such a blob as an unknown codec.
    Sealed = 3,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("chunk blob too short ({0} bytes)")]
    Short(usize),
    #[error("chunk blob has bad magic (not a bkp chunk)")]
    Magic,
    #[error("chunk blob version {0} is not supported by this build; upgrade bkp")]
    Version(u8),
    #[error("chunk blob codec {0} is unknown to this build; upgrade bkp")]
    Codec(u8),
    #[error("chunk blob claims {0} bytes, more than the {MAX_CHUNK}-byte maximum")]
    TooLarge(u64),
    #[error("chunk blob of {0} bytes is larger than the maximum {MAX_BLOB}")]
    BlobTooLarge(usize),
    #[error("chunk blob does not decompress: {0}")]
    Corrupt(String),
    #[error("chunk blob decompressed to {got} bytes, header says {want}")]
    Length { got: usize, want: usize },
    #[error("chunk content hashes to {got}, expected {want}")]
    Hash { got: ChunkId, want: ChunkId },
    #[error("chunk is sealed (encrypted); only a client with its key group's key can read it")]
    Sealed,
    #[error("sealed chunk {0}: its ciphertext does not match the hash recorded at upload (damaged or swapped)")]
    CiphertextHash(ChunkId),
    #[error("sealed chunk does not open: {0}")]
    Open(String),
}

/// Encodes a chunk, compressing it with zstd when that makes it smaller.
pub fn encode(data: &[u8], level: i32) -> Vec<u8> {
    Encoder::new(level).encode(data)
}

/// Encodes chunks with one zstd context: setting up a context costs more
/// than compressing a small chunk, so a thread that encodes many keeps one.
pub struct Encoder {
    zstd: crate::zstd_ctx::Compressor,
}

impl Encoder {
    pub fn new(level: i32) -> Self {
        Self { zstd: crate::zstd_ctx::Compressor::new(level).expect("zstd context (out of memory?)") }
    }

    pub fn encode(&mut self, data: &[u8]) -> Vec<u8> {
        assert!(data.len() <= MAX_CHUNK as usize, "chunk larger than MAX_CHUNK");
        // `compress_into` reserves zstd's worst case after the header; what
        // it leaves unused is given back below: blobs wait in upload queues,
        // where a 2.6 MB capacity behind a 25 KB dump blob would be memory
        // held for nothing.
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(Codec::ZstdBare as u8);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let compressed = !self.looks_incompressible(data) && self.zstd.compress_into(data, &mut out).is_ok();
        match compressed {
            // Incompressible data (already compressed files) is stored as
            // is, so restore does not pay for a useless decompression.
            true if out.len() - HEADER_LEN < data.len() => {}
            _ => {
                out[5] = Codec::Stored as u8;
                out.truncate(HEADER_LEN);
                out.extend_from_slice(data);
            }
        }
        if out.capacity() - out.len() > out.len() / 4 {
            out.shrink_to_fit();
        }
        out
    }
}

impl Encoder {
    /// Already compressed or encrypted data costs zstd a third of the time
    /// text does, for nothing. Three samples (start, middle, end) are tried
    /// first: only when none of them shrinks is the chunk stored without
    /// trying the whole, so data compressible anywhere sampled still is.
    fn looks_incompressible(&mut self, data: &[u8]) -> bool {
        if data.len() < 8 * PROBE {
            return false;
        }
        [0, data.len() / 2 - PROBE / 2, data.len() - PROBE].into_iter().all(|at| {
            let sample = &data[at..at + PROBE];
            self.zstd.compress(sample).map_or(true, |c| c.len() > sample.len() * 98 / 100)
        })
    }
}

/// Bytes per compressibility sample.
const PROBE: usize = 16 << 10;

thread_local! {
    /// One zstd decompression context per thread and frame kind, for the
    /// same reason.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static BARE_DECOMPRESSOR: std::cell::RefCell<Option<crate::zstd_ctx::Decompressor>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(payload: &[u8], capacity: usize) -> Result<Vec<u8>, String> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        d.as_mut().expect("set above").decompress(payload, capacity).map_err(|e| e.to_string())
    })
}

fn decompress_bare(payload: &[u8], capacity: usize) -> Result<Vec<u8>, String> {
    BARE_DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(crate::zstd_ctx::Decompressor::new()?);
        }
        d.as_mut().expect("set above").decompress(payload, capacity)
    })
}

/// Header fields of a blob, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub raw_len: u32,
}

pub fn header(blob: &[u8]) -> Result<Header, BlobError> {
    if blob.len() < HEADER_LEN {
        return Err(BlobError::Short(blob.len()));
    }
    if blob.len() > MAX_BLOB {
        return Err(BlobError::BlobTooLarge(blob.len()));
    }
    if &blob[..4] != MAGIC {
        return Err(BlobError::Magic);
    }
    if blob[4] != VERSION {
        return Err(BlobError::Version(blob[4]));
    }
    let codec = match blob[5] {
        0 => Codec::Stored,
        1 => Codec::Zstd,
        2 => Codec::ZstdBare,
        3 => Codec::Sealed,
        c => return Err(BlobError::Codec(c)),
    };
    let raw_len = u32::from_le_bytes(blob[6..10].try_into().expect("4 bytes"));
    if raw_len > MAX_CHUNK {
        return Err(BlobError::TooLarge(raw_len as u64));
    }
    Ok(Header { codec, raw_len })
}

/// Decodes a blob into the chunk's plaintext.
pub fn decode(blob: &[u8]) -> Result<Vec<u8>, BlobError> {
    let h = header(blob)?;
    let payload = &blob[HEADER_LEN..];
    let data = match h.codec {
        Codec::Stored => payload.to_vec(),
        // The capacity is the header's length, already capped above, so
        // a zstd bomb stops at MAX_CHUNK.
        Codec::Zstd => decompress(payload, h.raw_len as usize).map_err(BlobError::Corrupt)?,
        Codec::ZstdBare => decompress_bare(payload, h.raw_len as usize).map_err(BlobError::Corrupt)?,
        Codec::Sealed => return Err(BlobError::Sealed),
    };
    if data.len() != h.raw_len as usize {
        return Err(BlobError::Length { got: data.len(), want: h.raw_len as usize });
    }
    Ok(data)
}

/// Decodes a blob and checks that it is the chunk `want`.
pub fn decode_verified(blob: &[u8], want: &ChunkId) -> Result<Vec<u8>, BlobError> {
    let data = decode(blob)?;
    let got = ChunkId::of(&data);
    if got != *want {
        return Err(BlobError::Hash { got, want: *want });
    }
    Ok(data)
}

/// What [`check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The chunk's length (claimed by the client, for a sealed chunk).
    pub raw_len: u32,
    pub sealed: bool,
}

/// The server's check of a blob stored (or to be stored) under `id`,
/// whatever its kind: a plain blob is decoded and re-hashed, a sealed one
/// gets the checks that need no key ([`crate::seal::check`]).
pub fn check(blob: &[u8], id: &ChunkId) -> Result<Checked, BlobError> {
    let h = header(blob)?;
    if h.codec == Codec::Sealed {
        let raw_len = crate::seal::check(blob, id, h.raw_len)?;
        return Ok(Checked { raw_len, sealed: true });
    }
    let data = decode_verified(blob, id)?;
    Ok(Checked { raw_len: data.len() as u32, sealed: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressible_and_not() {
        let text = b"abcabcabc".repeat(1000);
        let b = encode(&text, 3);
        assert_eq!(header(&b).unwrap().codec, Codec::ZstdBare);
        assert!(b.len() < text.len());
        assert_eq!(decode(&b).unwrap(), text);

        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let b = encode(&noise, 3);
        assert_eq!(decode_verified(&b, &ChunkId::of(&noise)).unwrap(), noise);
    }

    #[test]
    fn incompressible_chunks_are_stored_compressible_parts_are_not_missed() {
        let mut noise = vec![0u8; 1 << 20];
        let mut x = 7u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        let mut enc = Encoder::new(3);
        assert_eq!(header(&enc.encode(&noise)).unwrap().codec, Codec::Stored);
        // Text in the middle only: the middle sample finds it.
        let mut mixed = noise.clone();
        let text = b"INSERT INTO t VALUES (1, 'user@example.com');\n".repeat(8000);
        let mid = mixed.len() / 2 - text.len() / 2;
        mixed[mid..mid + text.len()].copy_from_slice(&text);
        let b = enc.encode(&mixed);
        assert_eq!(header(&b).unwrap().codec, Codec::ZstdBare);
        assert!(b.len() < mixed.len() - text.len() / 2);
        assert_eq!(decode_verified(&b, &ChunkId::of(&mixed)).unwrap(), mixed);
    }

    #[test]
    fn golden_bytes() {
        let b = encode(b"hi", 3);
        // "hi" does not shrink under zstd, so it is stored.
        assert_eq!(b, [b'B', b'K', b'P', b'C', 1, 0, 2, 0, 0, 0, b'h', b'i']);
        // A compressed one: header, then zstd's frame header descriptor (no
        // magic before it, no content size in it), window size byte, blocks.
        let b = encode(&[b'a'; 100], 3);
        assert_eq!(b[..12], [b'B', b'K', b'P', b'C', 1, 2, 100, 0, 0, 0, 0x00, 0x00]);
        assert_eq!(decode(&b).unwrap(), [b'a'; 100]);
    }

    #[test]
    fn reads_standard_frames_of_earlier_builds() {
        let text = b"abcabcabc".repeat(1000);
        let mut b = b"BKPC\x01\x01".to_vec();
        b.extend_from_slice(&(text.len() as u32).to_le_bytes());
        b.extend_from_slice(&zstd::bulk::compress(&text, 3).unwrap());
        assert_eq!(decode_verified(&b, &ChunkId::of(&text)).unwrap(), text);
        // The two kinds are not interchangeable: the codec byte decides.
        b[5] = Codec::ZstdBare as u8;
        assert!(matches!(decode(&b), Err(BlobError::Corrupt(_))));
        let mut bare = encode(&text, 3);
        bare[5] = Codec::Zstd as u8;
        assert!(matches!(decode(&bare), Err(BlobError::Corrupt(_))));
    }

    #[test]
    fn hash_mismatch_names_both_ids_in_hex() {
        let want = ChunkId::of(b"two");
        let e = decode_verified(&encode(b"one", 3), &want).unwrap_err().to_string();
        let got = ChunkId::of(b"one").to_hex();
        assert!(e.contains(&got) && e.contains(&want.to_hex()) && !e.contains("ChunkId("), "{e}");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(b"BKP"), Err(BlobError::Short(3)));
        assert_eq!(decode(b"XXXX\x01\x00\x00\x00\x00\x00"), Err(BlobError::Magic));
        assert_eq!(decode(b"BKPC\x02\x00\x00\x00\x00\x00"), Err(BlobError::Version(2)));
        assert_eq!(decode(b"BKPC\x01\x07\x00\x00\x00\x00"), Err(BlobError::Codec(7)));
        assert!(matches!(decode(b"BKPC\x01\x01\xff\xff\xff\xff"), Err(BlobError::TooLarge(_))));
        // A stored blob whose header lies about its length.
        assert!(matches!(decode(b"BKPC\x01\x00\x05\x00\x00\x00ab"), Err(BlobError::Length { .. })));
        // A zstd bomb: 4 MiB + 1 of zeros claimed as 10 bytes.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_CHUNK as usize + 1], 3).unwrap();
        let mut b = b"BKPC\x01\x01\x0a\x00\x00\x00".to_vec();
        b.extend_from_slice(&bomb);
        assert!(decode(&b).is_err());
        let bomb = crate::zstd_ctx::Compressor::new(3).unwrap().compress(&vec![0u8; 1 << 20]).unwrap();
        let mut b = b"BKPC\x01\x02\x0a\x00\x00\x00".to_vec();
        b.extend_from_slice(&bomb);
        assert!(matches!(decode(&b), Err(BlobError::Corrupt(_))));
        let good = encode(b"data", 1);
        assert!(matches!(decode_verified(&good, &ChunkId::of(b"other")), Err(BlobError::Hash { .. })));
    }
}
