//! Content-defined chunking (FastCDC 2020).
//!
//! Sizes: min 256 KiB, average 1 MiB, max 4 MiB. Smaller averages find
//! more duplicates inside slightly changed database dumps but cost one
//! RocksDB key, one has-chunk lookup and 32 bytes of tree per chunk; at
//! 1 MiB the per-chunk costs stay below 1% of the data path while an edit
//! to a dump still only re-sends about 1-2 MiB around it. The figures that
//! led here are in docs/ARCHITECTURE.md.

use std::io::Read;

use fastcdc::v2020::{FastCDC, StreamCDC};

pub const MIN_CHUNK: u32 = 256 * 1024;
pub const AVG_CHUNK: u32 = 1024 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("reading input for chunking: {0}")]
pub struct ChunkReadError(#[from] pub std::io::Error);

/// Splits a reader into content-defined chunks.
pub fn chunk_reader<R: Read>(reader: R) -> impl Iterator<Item = Result<Vec<u8>, ChunkReadError>> {
    StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|r| match r {
        Ok(c) => Ok(c.data),
        Err(fastcdc::v2020::Error::IoError(e)) => Err(ChunkReadError(e)),
        Err(e) => Err(ChunkReadError(std::io::Error::other(e.to_string()))),
    })
}

/// Cut points for an in-memory buffer: (offset, length) pairs.
pub fn cut_points(data: &[u8]) -> Vec<(usize, usize)> {
    FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|c| (c.offset, c.length)).collect()
}

/// Chunks a byte stream that arrives in pieces (the tree's metadata
/// stream), giving the same cut points as chunking the whole stream at
/// once: a chunk is only emitted once bytes after it have been seen.
#[derive(Default)]
pub struct PushChunker {
    buf: Vec<u8>,
}

impl PushChunker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes and returns the chunks that are now final.
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(data);
        if self.buf.len() < 2 * MAX_CHUNK as usize {
            return Vec::new();
        }
        let cuts = cut_points(&self.buf);
        // The last cut may end only because the buffer ends; keep it.
        let keep_from = cuts.last().map(|c| c.0).unwrap_or(0);
        let out = cuts[..cuts.len().saturating_sub(1)].iter().map(|&(o, l)| self.buf[o..o + l].to_vec()).collect();
        self.buf.drain(..keep_from);
        out
    }

    /// Returns the remaining chunks.
    pub fn finish(self) -> Vec<Vec<u8>> {
        cut_points(&self.buf).into_iter().map(|(o, l)| self.buf[o..o + l].to_vec()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn push_chunker_matches_whole_stream() {
        let data = pseudo_random(20 * 1024 * 1024, 7);
        let whole: Vec<Vec<u8>> = cut_points(&data).into_iter().map(|(o, l)| data[o..o + l].to_vec()).collect();
        let mut pc = PushChunker::new();
        let mut pieces = Vec::new();
        for part in data.chunks(777_777) {
            pieces.extend(pc.push(part));
        }
        pieces.extend(pc.finish());
        assert_eq!(whole.len(), pieces.len());
        assert!(whole == pieces);
    }

    #[test]
    fn reader_chunks_within_bounds_and_resync() {
        let data = pseudo_random(16 * 1024 * 1024, 3);
        let a: Vec<_> = chunk_reader(&data[..]).map(|c| c.unwrap()).collect();
        assert_eq!(a.concat(), data);
        for c in &a[..a.len() - 1] {
            assert!(c.len() >= MIN_CHUNK as usize && c.len() <= MAX_CHUNK as usize);
        }
        // An insertion near the start changes only the chunks around it.
        let mut changed = data.clone();
        changed.splice(1000..1000, b"inserted".iter().copied());
        let b: Vec<_> = chunk_reader(&changed[..]).map(|c| c.unwrap()).collect();
        let ids_a: std::collections::HashSet<_> = a.iter().map(|c| blake3::hash(c)).collect();
        let new = b.iter().filter(|c| !ids_a.contains(&blake3::hash(c))).count();
        assert!(new <= 2, "{new} chunks changed");
    }
}
