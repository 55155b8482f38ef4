//! Scrub: re-read stored chunks, decompress and re-hash them, in rotating
//! slices of the id space.
//!
//! Chunk ids are blake3 hashes, so they spread evenly over the key space.
//! The space is cut into `slices` equal parts at fixed boundaries; a
//! scheduled run goes on from where the last one stopped up to the next
//! boundary, so `slices` runs cover every chunk, and whatever lies ahead of
//! the cursor is what was verified least recently. A run bounded in time
//! leaves the cursor where it stopped. A chunk stored since the cursor
//! passed its place was re-hashed on upload and is scrubbed next cycle.
//!
//! A backend that keeps chunks in containers (the s3 backend's packs) is
//! scrubbed container by container instead ([`crate::store::ChunkStore::containers`]):
//! each is read whole, sequentially, and its chunks are checked the same
//! way. Container names are blake3 hashes too, so the same slices apply,
//! and the cursor's `after` holds the last container's name.

use std::time::Instant;

use bkp_common::{blob, ChunkId};

pub use crate::report::ScrubReport;
/// Where the scrub stands, kept in `meta` (its codec is the schema's).
pub use crate::store::schema::ScrubCursor as Cursor;
use crate::store::{Container, Store, StoreError};

const BATCH: usize = 256;

/// A chunk's place in the key space: its first 8 bytes.
fn position(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The end (exclusive) of the slice that holds `pos`; `None` for the last.
fn slice_end(pos: u64, slices: u32) -> Option<u64> {
    let space = 1u128 << 64;
    let n = slices.max(1) as u128;
    let width = space.div_ceil(n);
    let end = (pos as u128 / width + 1) * width;
    (end < space).then_some(end as u64)
}

/// Why a stored chunk is bad, or `None` when it is sound (or was deleted
/// by a concurrent GC, which is not damage).
pub fn check_chunk(store: &dyn Store, id: &ChunkId) -> Result<Option<String>, StoreError> {
    let Some(b) = store.chunk_blob(id)? else {
        return Ok(store.chunk_meta(id)?.map(|_| "chunk data is missing from the store".to_string()));
    };
    check_blob(store, id, &b)
}

/// Why a chunk's stored blob `b` is bad, or `None` when it is sound.
fn check_blob(store: &dyn Store, id: &ChunkId, b: &[u8]) -> Result<Option<String>, StoreError> {
    // A sealed chunk gets the checks that need no key (its ciphertext
    // hash among them); a plain one is decoded and re-hashed.
    match blob::check(b, id) {
        Err(e) => Ok(Some(e.to_string())),
        Ok(c) => match store.chunk_meta(id)? {
            Some(m) if m.raw_len != c.raw_len => {
                Ok(Some(format!("chunk decodes to {} bytes, its record says {}", c.raw_len, m.raw_len)))
            }
            _ => Ok(None),
        },
    }
}

/// Scrubs one slice (or everything, when `full`), calling `bad` with each
/// chunk that fails. Stops at `deadline`, saving the cursor.
pub fn run(
    store: &dyn Store,
    slices: u32,
    full: bool,
    deadline: Option<Instant>,
    now_ns: u64,
    bad: &mut dyn FnMut(ChunkId, String) -> Result<(), StoreError>,
) -> Result<ScrubReport, StoreError> {
    if let Some(containers) = store.containers()? {
        return run_containers(store, &containers, slices, full, deadline, now_ns, bad);
    }
    let mut cur = store.scrub_cursor()?;
    let mut report = ScrubReport::default();
    let mut after = if full { None } else { cur.after };
    if after.is_none() {
        cur.cycle_start_ns = now_ns;
    }
    // The slice is the one holding the first chunk still to check (the
    // last run may have ended exactly at a boundary).
    let mut end: Option<Option<u64>> = if full { Some(None) } else { None };
    'outer: loop {
        let batch = store.chunk_metas(after.as_ref(), BATCH)?;
        if batch.is_empty() {
            report.cycle_completed = true;
            break;
        }
        for (id, meta) in batch {
            let end = *end.get_or_insert_with(|| slice_end(position(&id), slices));
            if end.is_some_and(|e| position(&id) >= e) {
                break 'outer;
            }
            if let Some(reason) = check_chunk(store, &id)? {
                bad(id, reason)?;
            }
            report.chunks_checked += 1;
            report.bytes_checked += meta.stored_len as u64;
            after = Some(id);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            report.stopped_early = true;
            break;
        }
    }
    cur.last_run_ns = now_ns;
    if report.cycle_completed {
        cur.after = None;
        cur.last_cycle_end_ns = now_ns;
        report.coverage = 1.0;
    } else {
        cur.after = after;
        report.coverage = cur.coverage();
    }
    store.set_scrub_cursor(&cur)?;
    Ok(report)
}

/// [`run`] over a backend's containers (sorted by id), each read whole.
fn run_containers(
    store: &dyn Store,
    containers: &[Container],
    slices: u32,
    full: bool,
    deadline: Option<Instant>,
    now_ns: u64,
    bad: &mut dyn FnMut(ChunkId, String) -> Result<(), StoreError>,
) -> Result<ScrubReport, StoreError> {
    let mut cur = store.scrub_cursor()?;
    let mut report = ScrubReport::default();
    let mut after = if full { None } else { cur.after.map(|a| *a.as_bytes()) };
    if after.is_none() {
        cur.cycle_start_ns = now_ns;
    }
    let mut check = |id: &ChunkId, blob: Option<&[u8]>| -> Result<Option<String>, StoreError> {
        let why = match blob {
            Some(b) => check_blob(store, id, b)?,
            // Not damage if GC deleted it meanwhile.
            None => store.chunk_meta(id)?.map(|_| "its pack is missing from the bucket".to_string()),
        };
        if let Some(w) = &why {
            bad(*id, w.clone())?;
        }
        Ok(why)
    };
    let first = containers.partition_point(|c| after.is_some_and(|a| c.id <= a));
    let mut end: Option<Option<u64>> = if full { Some(None) } else { None };
    report.cycle_completed = true;
    for c in &containers[first..] {
        let pos = u64::from_be_bytes(c.id[..8].try_into().expect("8 bytes"));
        let end = *end.get_or_insert_with(|| slice_end(pos, slices));
        if end.is_some_and(|e| pos >= e) {
            report.cycle_completed = false;
            break;
        }
        let r = store.scrub_container(c, &mut check)?;
        report.chunks_checked += r.chunks;
        report.bytes_checked += r.bytes;
        report.packs_checked += 1;
        report.packs_missing += r.missing as u64;
        after = Some(c.id);
        if deadline.is_some_and(|d| Instant::now() >= d) && c.id != containers[containers.len() - 1].id {
            report.stopped_early = true;
            report.cycle_completed = false;
            break;
        }
    }
    cur.last_run_ns = now_ns;
    if report.cycle_completed {
        cur.after = None;
        cur.last_cycle_end_ns = now_ns;
        report.coverage = 1.0;
    } else {
        cur.after = after.map(ChunkId::from_bytes);
        report.coverage = cur.coverage();
    }
    store.set_scrub_cursor(&cur)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_partition_the_key_space() {
        assert_eq!(slice_end(0, 1), None);
        let w = ((1u128 << 64).div_ceil(7)) as u64;
        assert_eq!(slice_end(0, 7), Some(w));
        assert_eq!(slice_end(w - 1, 7), Some(w));
        assert_eq!(slice_end(w, 7), Some(2 * w));
        assert_eq!(slice_end(6 * w, 7), None);
        assert_eq!(slice_end(u64::MAX, 7), None);
        // Seven runs from the start reach the end.
        let (mut pos, mut runs) = (0u64, 0);
        while let Some(e) = slice_end(pos, 7) {
            pos = e;
            runs += 1;
        }
        assert_eq!(runs + 1, 7);
    }

    #[test]
    fn cursor_golden() {
        let c = Cursor {
            after: Some(ChunkId::from_bytes([0xff; 32])),
            cycle_start_ns: 1,
            last_cycle_end_ns: 0,
            last_run_ns: 2,
        };
        let b = c.encode();
        assert_eq!(&b[..2], [1, 1]);
        assert_eq!(&b[34..], [1, 0, 2]);
        assert!(c.coverage() > 0.999);
    }
}
