//! A Bloom filter over chunk ids: where sessions' touched ids go once the
//! exact sets have used their memory (see the parent module). It answers
//! "maybe" for every id put in and, rarely, for others; never "no" for
//! an id put in, which is what the GC fence needs.

use bkp_common::ChunkId;

/// Bits set per id: about 1% false positives at 10 bits per id.
const PROBES: u64 = 7;

pub struct Bloom {
    words: Vec<u64>,
    /// Bits, a power of two, minus one.
    mask: u64,
}

impl Bloom {
    /// A filter of at most `bytes` (rounded down to a power of two, at
    /// least 64 bytes).
    pub fn new(bytes: usize) -> Self {
        let bits = (bytes.max(64) * 8).next_power_of_two();
        let bits = if bits / 8 > bytes.max(64) { bits / 2 } else { bits };
        Self { words: vec![0; bits / 64], mask: bits as u64 - 1 }
    }

    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The ids are blake3 hashes (a chunk's id is its content's hash, and
    /// only ids the store holds or just verified are put in), so their
    /// bytes are the hash functions.
    fn bits(id: &ChunkId) -> impl Iterator<Item = u64> + '_ {
        let b = id.as_bytes();
        let h1 = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let h2 = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) | 1;
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)))
    }

    pub fn insert(&mut self, id: &ChunkId) {
        for bit in Self::bits(id) {
            let bit = bit & self.mask;
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    pub fn may_contain(&self, id: &ChunkId) -> bool {
        Self::bits(id).all(|bit| {
            let bit = bit & self.mask;
            self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(1 << 16);
        assert_eq!(b.bytes(), 1 << 16);
        assert_eq!(Bloom::new(100_000).bytes(), 1 << 16, "rounded down");
        let ids: Vec<ChunkId> = (0u32..40_000).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        for id in &ids[..20_000] {
            b.insert(id);
        }
        assert!(ids[..20_000].iter().all(|id| b.may_contain(id)));
        // 2^19 bits for 20,000 ids: ~26 bits each, well under 1% false.
        let false_pos = ids[20_000..].iter().filter(|id| b.may_contain(id)).count();
        assert!(false_pos < 200, "{false_pos} of 20000");
    }
}
