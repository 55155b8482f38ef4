//! Content-defined chunking (FastCDC 2020).
//!
//! Sizes: min 256 KiB, average 1 MiB, max 4 MiB. Smaller averages find
//! more duplicates inside slightly changed database dumps but cost one
//! RocksDB key, one has-chunk lookup and 32 bytes of tree per chunk; at
//! 1 MiB the per-chunk costs stay below 1% of the data path while an edit
//! to a dump still only re-sends about 1-2 MiB around it. The figures that
//! led here are in docs/ARCHITECTURE.md.

use std::io::Read;
use std::sync::LazyLock;

use fastcdc::v2020::{StreamCDC, MASKS};

pub const MIN_CHUNK: u32 = 256 * 1024;
pub const AVG_CHUNK: u32 = 1024 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("reading input for chunking: {0}")]
pub struct ChunkReadError(#[from] pub std::io::Error);

/// Gear tables and the masks for a 1 MiB average at normalization level 1
/// (`FastCDC::new`'s choice): the fastcdc crate's public tables (seed 0),
/// or tables drawn from a key ([`Gear::keyed`]) for an encrypted push, whose
/// chunk sizes must not fingerprint known files.
pub struct Gear {
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    mask_s: u64,
    mask_l: u64,
}

static GEAR: LazyLock<Gear> = LazyLock::new(|| {
    let (gear, gear_ls) = fastcdc::v2020::get_gear_with_seed(0);
    Gear::with_tables(gear, gear_ls)
});

impl Gear {
    fn with_tables(gear: Box<[u64; 256]>, gear_ls: Box<[u64; 256]>) -> Self {
        let bits = AVG_CHUNK.trailing_zeros() as usize;
        Gear { gear, gear_ls, mask_s: MASKS[bits + 1], mask_l: MASKS[bits - 1] }
    }

    /// The fastcdc crate's tables, which every plain push uses.
    pub fn public() -> &'static Gear {
        &GEAR
    }

    /// Tables drawn from blake3's output stream keyed with `key`: 256
    /// random words (the crate's seed only XORs one word into its public
    /// table, which leaves the table recoverable from a few chunk sizes).
    /// The shifted table is the plain one shifted, as the crate's is.
    pub fn keyed(key: &[u8; 32]) -> Self {
        let mut bytes = [0u8; 256 * 8];
        blake3::Hasher::new_keyed(key).update(b"bkp gear table").finalize_xof().fill(&mut bytes);
        let mut gear = Box::new([0u64; 256]);
        for (g, b) in gear.iter_mut().zip(bytes.chunks_exact(8)) {
            *g = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        let gear_ls = Box::new(gear.map(|g| g << 1));
        Self::with_tables(gear, gear_ls)
    }

    /// Scans the byte pairs of `pairs` (which starts at `base` in the
    /// chunk) as the crate's `cut_gear` does: a cut before the pair's first
    /// byte when the shifted mask matches, after it when the plain one does.
    #[inline(always)]
    fn scan(&self, pairs: &[u8], base: usize, hash: &mut u64, mask: u64) -> Option<usize> {
        let (gear, gear_ls, mask_ls) = (&*self.gear, &*self.gear_ls, mask << 1);
        let mut h = *hash;
        for (k, p) in pairs.chunks_exact(2).enumerate() {
            h = (h << 2).wrapping_add(gear_ls[p[0] as usize]);
            if h & mask_ls == 0 {
                return Some(base + 2 * k);
            }
            h = h.wrapping_add(gear[p[1] as usize]);
            if h & mask == 0 {
                return Some(base + 2 * k + 1);
            }
        }
        *hash = h;
        None
    }
}

/// The length of the first chunk of `data` (all of `data` may follow it):
/// the cut point of fastcdc's `FastCDC::new(data, MIN_CHUNK, AVG_CHUNK,
/// MAX_CHUNK)`, found without its per-byte bounds checks (~12% faster on
/// dump text, which made the cutter the largest cost of a dump push on a
/// 2.3 GHz Xeon). The crate's own iterator is the reference in the tests.
pub fn cut_len(data: &[u8]) -> usize {
    cut_len_with(&GEAR, data)
}

/// [`cut_len`] with the given gear tables.
pub fn cut_len_with(g: &Gear, data: &[u8]) -> usize {
    let (min, avg) = (MIN_CHUNK as usize, AVG_CHUNK as usize);
    let remaining = data.len().min(MAX_CHUNK as usize);
    if remaining <= min {
        return remaining;
    }
    // Pairs start at even offsets; a lone last byte is never hashed.
    let normal = (remaining.min(avg) & !1).max(min);
    let end = (remaining & !1).max(normal);
    let mut hash = 0;
    g.scan(&data[min..normal], min, &mut hash, g.mask_s)
        .or_else(|| g.scan(&data[normal..end], normal, &mut hash, g.mask_l))
        .unwrap_or(remaining)
}

/// Splits a reader into content-defined chunks.
pub fn chunk_reader<R: Read>(reader: R) -> impl Iterator<Item = Result<Vec<u8>, ChunkReadError>> {
    StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|r| match r {
        Ok(c) => Ok(c.data),
        Err(fastcdc::v2020::Error::IoError(e)) => Err(ChunkReadError(e)),
        Err(e) => Err(ChunkReadError(std::io::Error::other(e.to_string()))),
    })
}

/// Chunks readers one after another through one reusable buffer, with the
/// same cut points as [`chunk_reader`]. `chunk_reader` allocates and zeroes
/// a 4 MiB buffer per reader and shifts it after every chunk, which costs
/// more than the data itself for a tree of small files.
pub struct StreamChunker {
    buf: Vec<u8>,
    gear: &'static Gear,
}

impl Default for StreamChunker {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamChunker {
    pub fn new() -> Self {
        // Twice the largest chunk: the unread rest is moved to the front
        // only when less than one largest chunk of room is left.
        Self::with_gear(&GEAR)
    }

    /// A chunker cutting with `gear` (a keyed table, for an encrypted push).
    pub fn with_gear(gear: &'static Gear) -> Self {
        Self { buf: vec![0; 2 * MAX_CHUNK as usize], gear }
    }

    /// The chunks of `reader`, in order.
    pub fn chunks<R: Read>(&mut self, reader: R) -> StreamChunks<'_, R> {
        StreamChunks { buf: &mut self.buf, start: 0, end: 0, eof: false, reader, gear: self.gear }
    }
}

pub struct StreamChunks<'a, R> {
    buf: &'a mut Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    reader: R,
    gear: &'static Gear,
}

impl<R: Read> StreamChunks<'_, R> {
    /// Reads until a largest chunk is buffered or the input ends.
    fn fill(&mut self) -> std::io::Result<()> {
        let max = MAX_CHUNK as usize;
        if self.buf.len() - self.start < max {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        while !self.eof && self.end - self.start < max {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: Read> Iterator for StreamChunks<'_, R> {
    type Item = Result<Vec<u8>, ChunkReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            return Some(Err(ChunkReadError(e)));
        }
        let rest = &self.buf[self.start..self.end];
        if rest.is_empty() {
            return None;
        }
        let len = cut_len_with(self.gear, rest);
        let chunk = rest[..len].to_vec();
        self.start += len;
        Some(Ok(chunk))
    }
}

/// Cut points for an in-memory buffer: (offset, length) pairs.
pub fn cut_points(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = cut_len(&data[at..]);
        out.push((at, len));
        at += len;
    }
    out
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

    /// The crate's iterator is the definition of our cut points: stored
    /// chunks of earlier clients dedup only while they agree.
    #[test]
    fn cut_len_agrees_with_the_fastcdc_crate() {
        let crate_cut =
            |d: &[u8]| fastcdc::v2020::FastCDC::new(d, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).next().map_or(0, |c| c.length);
        let random = pseudo_random(24 << 20, 11);
        let text: Vec<u8> = (0..400_000u32)
            .flat_map(|i| format!("{i}\t{}\tname {}\n", i * 7919 % 100_003, i % 97).into_bytes())
            .collect();
        let (min, avg, max) = (MIN_CHUNK as usize, AVG_CHUNK as usize, MAX_CHUNK as usize);
        let lens = [0, 1, min - 1, min, min + 1, min + 2, avg - 1, avg, avg + 1, max - 1, max, max + 1, 5 << 20];
        let zeros = vec![0; 9 << 20];
        for (name, data) in [("random", &random[..]), ("text", &text[..]), ("zeros", &zeros[..])] {
            for &n in &lens {
                let d = &data[..n.min(data.len())];
                assert_eq!(cut_len(d), crate_cut(d), "{name}, {} bytes", d.len());
            }
            // Every cut of the whole input, from every offset the stream reaches.
            let mut at = 0;
            while at < data.len() {
                let (ours, theirs) = (cut_len(&data[at..]), crate_cut(&data[at..]));
                assert_eq!(ours, theirs, "{name} at {at}");
                at += ours;
            }
        }
        // Zeros never match a mask: the largest chunk.
        assert_eq!(cut_len(&zeros), max);
    }

    #[test]
    fn keyed_gear_cuts_elsewhere_within_the_size_bounds() {
        let data = pseudo_random(24 << 20, 5);
        let cuts = |g: &'static Gear| -> Vec<usize> {
            StreamChunker::with_gear(g).chunks(&data[..]).map(|c| c.unwrap().len()).collect()
        };
        let public = cuts(Gear::public());
        let a = cuts(Box::leak(Box::new(Gear::keyed(&[1; 32]))));
        let a_again = cuts(Box::leak(Box::new(Gear::keyed(&[1; 32]))));
        let b = cuts(Box::leak(Box::new(Gear::keyed(&[2; 32]))));
        assert_eq!(a, a_again, "a key's cuts are deterministic");
        assert!(a != public && a != b, "another table cuts elsewhere");
        for lens in [&a, &b] {
            assert_eq!(lens.iter().sum::<usize>(), data.len());
            let (last, rest) = lens.split_last().unwrap();
            assert!(rest.iter().all(|&l| (MIN_CHUNK as usize..=MAX_CHUNK as usize).contains(&l)));
            assert!(*last <= MAX_CHUNK as usize);
            // About the 1 MiB average, as the public table gives.
            assert!((8..=48).contains(&lens.len()), "{} chunks", lens.len());
        }
        // The public table is the crate's, unchanged.
        assert_eq!(public, chunk_reader(&data[..]).map(|c| c.unwrap().len()).collect::<Vec<_>>());
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

    /// Hands out at most `step` bytes per read, like a pipe.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn stream_chunker_matches_chunk_reader() {
        let mut sc = StreamChunker::new();
        let big = pseudo_random(21 * 1024 * 1024 + 12345, 9);
        let sizes = [0, 1, 4096, MIN_CHUNK as usize, MIN_CHUNK as usize + 1, 3 << 20, big.len()];
        for (i, &n) in sizes.iter().enumerate() {
            let data = &big[..n];
            let want: Vec<Vec<u8>> = chunk_reader(data).map(|c| c.unwrap()).collect();
            // One chunker for all inputs: nothing may leak from one to the next.
            for step in [usize::MAX, 65536, 777_777] {
                let got: Vec<Vec<u8>> = sc.chunks(Trickle(data, step)).map(|c| c.unwrap()).collect();
                assert!(got == want, "input {i} ({n} bytes), reads of {step}: {} vs {} chunks", got.len(), want.len());
            }
        }
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
