#![no_main]
//! Chunk blobs and snapshot records from disk or network never panic and
//! never decode past the size cap.
use bkp_common::{blob, chunker::MAX_CHUNK, snapshot::Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = blob::decode(data) {
        assert!(d.len() <= MAX_CHUNK as usize);
    }
    let _ = Snapshot::decode(data);
});
