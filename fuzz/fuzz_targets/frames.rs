#![no_main]
//! Whatever a client sends must decode to a message or an error.
use bkp_common::protocol::{decode, split_frame, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((body, used))) = split_frame(rest) {
        let _ = decode::<Request>(body);
        let _ = decode::<Response>(body);
        rest = &rest[used..];
    }
});
