//! The path rule and the terminal escape: whatever the bytes, an accepted
//! path has no component a restore could misplace, and an escaped name
//! has no control character left.
#![no_main]

use bkp_common::names::{check_path, escape_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if check_path(data).is_ok() {
        assert!(!data.is_empty() && data[0] != b'/' && !data.contains(&0));
        assert!(data.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b".."));
    }
    let shown = escape_bytes(data);
    assert!(!shown.chars().any(char::is_control), "{shown:?}");
});
