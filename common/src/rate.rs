//! A byte-rate limit for WAN links: the client's upload limit
//! (`bkp push --limit-upload`) and the server's sync pull (`rate_limit`
//! of a `[[sync]]` job).
//!
//! The limiter keeps a virtual clock: every `take(n)` moves it on by
//! `n / rate` (from now, if it is behind) and waits until it gets there,
//! so `n` bytes are paid for before they count as sent, and a transfer
//! of N bytes takes N / rate whatever its chunk sizes. Idle time is not
//! saved up for a burst. It paces what the application hands to QUIC
//! (or reads from it); QUIC's flow control then holds the link to it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes per second, shared by the tasks of one transfer.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// `None` for 0 (no limit).
    pub fn new(bytes_per_sec: u64) -> Option<Self> {
        (bytes_per_sec > 0).then(|| Self { bytes_per_sec, next: Mutex::new(None) })
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Books `n` bytes; returns how long after `now` they are paid for.
    fn book(&self, n: usize, now: Instant) -> Duration {
        let mut next = self.next.lock().expect("rate limit lock");
        let start = next.map_or(now, |t| t.max(now));
        let end = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        *next = Some(end);
        end - now
    }

    /// Waits until `n` more bytes fit the rate.
    pub async fn take(&self, n: usize) {
        let wait = self.book(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Parses a rate: bytes per second as a number with an optional unit,
/// `500k`, `10M`, `1.5MiB`, `2G`, optionally followed by `/s`. `k`, `M`,
/// `G` are powers of 1000, `Ki`, `Mi`, `Gi` of 1024; a trailing `B` is
/// allowed. `0` means no limit.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim() {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" | "m" => 1e6,
        "G" | "g" => 1e9,
        "Ki" | "ki" | "KI" => 1024.0,
        "Mi" | "MI" => (1u64 << 20) as f64,
        "Gi" | "GI" => (1u64 << 30) as f64,
        _ => return Err(rate_error(s)),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * mult < u64::MAX as f64 => Ok((v * mult).round() as u64),
        _ => Err(rate_error(s)),
    }
}

fn rate_error(s: &str) -> String {
    format!("{s:?} is not a rate: give bytes per second, e.g. 500k, 10M or 2MiB (0: no limit)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let cases = [
            ("0", 0),
            ("1000", 1000),
            ("500k", 500_000),
            ("10M", 10_000_000),
            ("10MB/s", 10_000_000),
            ("1.5MiB", 1_572_864),
            ("2Gi", 2 << 30),
            ("64KiB/s", 65_536),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
        for bad in ["", "fast", "10X", "-1", "1e9", "M"] {
            assert!(parse_rate(bad).unwrap_err().contains("not a rate"), "{bad}");
        }
    }

    #[test]
    fn booking_spaces_takes_by_their_size() {
        let r = RateLimit::new(1000).unwrap();
        let t0 = Instant::now();
        // At 1000 bytes/s each take waits for its own bytes and those
        // booked before it.
        assert_eq!(r.book(500, t0), Duration::from_millis(500));
        assert_eq!(r.book(500, t0), Duration::from_millis(1000));
        assert_eq!(r.book(1000, t0 + Duration::from_millis(1000)), Duration::from_millis(1000));
        // Idle time is not saved up for a burst later.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(r.book(1000, later), Duration::from_secs(1));
        assert!(RateLimit::new(0).is_none());
    }
}
