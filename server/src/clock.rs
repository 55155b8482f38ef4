//! Wall-clock time as the server records it: nanoseconds since the Unix
//! epoch, in every record, report and status.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in ns since the epoch (0 for a clock set before 1970).
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
