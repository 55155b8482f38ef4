//! Two passes over one buffer at once. A stream's producer (chunk id and
//! file hash) and a restore's writer (file hash and write) each make two
//! passes over every byte on one thread; for large buffers the second pass
//! goes to a scoped helper thread so both cores work on one stream.

/// Below this a thread costs more than the pass it would take over.
pub const MIN_PARALLEL: usize = 256 << 10;

/// Feeds `data` to `hasher` while `work` runs, on two threads when `data`
/// is large; returns what `work` returned.
pub fn hash_while<R>(data: &[u8], hasher: &mut blake3::Hasher, work: impl FnOnce() -> R) -> R {
    if data.len() < MIN_PARALLEL {
        hasher.update(data);
        return work();
    }
    let (out, hashed) = std::thread::scope(|s| {
        // No thread to be had: the hash is taken below instead.
        let helper = std::thread::Builder::new()
            .spawn_scoped(s, || {
                hasher.update(data);
            })
            .ok();
        let out = work();
        let hashed = match helper {
            Some(h) => {
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                true
            }
            None => false,
        };
        (out, hashed)
    });
    if !hashed {
        hasher.update(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_hash_and_result_either_way() {
        for len in [10, MIN_PARALLEL + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut h = blake3::Hasher::new();
            let n = hash_while(&data, &mut h, || data.iter().map(|&b| b as u64).sum::<u64>());
            assert_eq!(h.finalize(), blake3::hash(&data));
            assert_eq!(n, data.iter().map(|&b| b as u64).sum::<u64>());
        }
    }
}
