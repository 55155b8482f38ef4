#![no_main]
//! A crafted tree stream must yield entries or an error, fed in any pieces.
use bkp_common::tree::TreeDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    let mut d = TreeDecoder::new();
    for piece in data.chunks(split) {
        d.feed(piece);
        loop {
            match d.next_entry() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = d.finish();
});
