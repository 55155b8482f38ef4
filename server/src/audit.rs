//! The audit log, `DATA/audit.log`: one JSON line (`"v":1`) per token
//! change or listing, admin action, job run and refused request.
//!
//! Two processes write it (`serve` and the `bkp-server token` CLI), so
//! the file is opened with O_APPEND and each line goes out in one write
//! call: lines from both never interleave. Rotation (audit.log ->
//! audit.log.1 .. .keep) happens under an flock on `audit.lock`, and the
//! size is checked again under the lock, so two processes never rotate
//! the same file twice.
//!
//! `serve` never waits for the disk: events go through a bounded channel
//! to one writer thread; when it is full the event is dropped, counted
//! and warned about. A failed write is logged as an error; the request
//! that caused it goes on.
//!
//! Refusals (a bad hello, a role or host that may not) are what anyone
//! on the network can cause at will, so they pass a token bucket
//! (`[audit] refusals_per_second`) before the queue: a flood cannot fill
//! the disk or push out the admin actions. What the bucket holds back is
//! counted, and the next refusal written says how many were skipped
//! (`"suppressed"`). Both kinds of loss are `bkp_audit_dropped_total`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

pub const FILE: &str = "audit.log";
const LOCK: &str = "audit.lock";
pub const VERSION: u32 = 1;
/// Longest kept value of a free-text field (detail, host, peer); longer
/// ones are cut at a character boundary and end in "...".
pub const MAX_FIELD: usize = 512;
/// Longest line `read` accepts: a line is far below it even with every
/// field at `MAX_FIELD`, so a longer one is damage, not an event.
const MAX_LINE: usize = 16 << 10;
/// Events waiting for the writer thread; past this they are dropped.
const QUEUE: usize = 4096;

/// `[audit]` in server.toml.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// audit.log is rotated once it reaches this size.
    pub max_bytes: u64,
    /// Rotated files kept (audit.log.1 .. audit.log.KEEP).
    pub keep: u32,
    /// Refusal lines written per second at most (bursts of as many); the
    /// rest are counted, not written.
    pub refusals_per_second: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { max_bytes: 16 << 20, keep: 4, refusals_per_second: 20 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    TokenCreate,
    TokenList,
    TokenRevoke,
    Forget,
    Protect,
    Unprotect,
    Prune,
    Gc,
    Verify,
    /// A request the token's role or host does not allow.
    Refused,
    /// A hello with a bad, unknown or revoked token.
    HelloRefused,
    /// A `[[sync]]` job's run.
    Sync,
    /// The config file read again (SIGHUP, `bkp-server reload`).
    Reload,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::TokenCreate => "token_create",
            Event::TokenList => "token_list",
            Event::TokenRevoke => "token_revoke",
            Event::Forget => "forget",
            Event::Protect => "protect",
            Event::Unprotect => "unprotect",
            Event::Prune => "prune",
            Event::Gc => "gc",
            Event::Verify => "verify",
            Event::Refused => "refused",
            Event::HelloRefused => "hello_refused",
            Event::Sync => "sync",
            Event::Reload => "reload",
        }
    }
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub v: u32,
    /// RFC 3339, UTC, seconds.
    pub time: String,
    pub event: Event,
    /// The token's public id (never the token).
    pub token: Option<String>,
    pub host: Option<String>,
    /// Remote address, for events that came over the network.
    pub peer: Option<String>,
    /// "ok", "failed", "refused".
    pub result: String,
    /// What was acted on or why it was refused.
    pub detail: Option<String>,
    /// Who started it, for job runs: "schedule", or the control socket's
    /// peer ("socket uid=0 pid=4242 user=root"), or a CLI run without a
    /// server ("cli uid=0 user=root"). Absent from other lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Refusals before this one that the rate limit kept out of the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

fn cut(s: String) -> String {
    if s.len() <= MAX_FIELD {
        return s;
    }
    format!("{}...", bkp_common::names::prefix_within(&s, MAX_FIELD - 3))
}

impl Line {
    pub fn new(event: Event, result: &str) -> Self {
        Self {
            v: VERSION,
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            event,
            token: None,
            host: None,
            peer: None,
            result: result.into(),
            detail: None,
            by: None,
            suppressed: None,
        }
    }

    pub fn by(mut self, by: impl Into<String>) -> Self {
        self.by = Some(cut(by.into()));
        self
    }

    /// Refusals go through the rate limit; everything else is kept.
    fn is_refusal(&self) -> bool {
        matches!(self.event, Event::Refused | Event::HelloRefused)
    }

    pub fn token(mut self, id: &str) -> Self {
        self.token = Some(cut(id.to_string()));
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(cut(host.to_string()));
        self
    }

    pub fn peer(mut self, peer: impl ToString) -> Self {
        self.peer = Some(cut(peer.to_string()));
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(cut(d.into()));
        self
    }

    /// The line as written, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).expect("audit line to json");
        b.push(b'\n');
        b
    }

    pub fn unix_secs(&self) -> Option<u64> {
        let t = humantime::parse_rfc3339_weak(&self.time).ok()?;
        t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

fn rotated(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{FILE}.{n}"))
}

/// Appends one line to `dir/audit.log`, rotating first when it is full.
/// Blocking: the CLI calls it directly, `serve` from its writer thread.
/// The size check, the rotation and the write happen under one flock of
/// `dir/audit.lock`: a writer that checked, then wrote after another one
/// rotated, would grow a rotated file past `max_bytes` (seen with two
/// CLIs at once).
pub fn append(dir: &Path, cfg: &AuditConfig, line: &Line) -> std::io::Result<()> {
    let path = dir.join(FILE);
    let bytes = line.encode();
    let lock = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(LOCK))?;
    // Released when `lock` drops.
    lock.lock()?;
    let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if size > 0 && size + bytes.len() as u64 > cfg.max_bytes {
        rotate(dir, cfg)?;
    }
    // One write call, O_APPEND: the line lands whole at the end.
    let n = open_append(&path)?.write(&bytes)?;
    drop(lock);
    if n != bytes.len() {
        return Err(std::io::Error::other(format!("short write to {}: {n} of {} bytes", path.display(), bytes.len())));
    }
    Ok(())
}

/// Shifts `audit.log.N` up and the live file to `.1`; the caller holds
/// the lock.
fn rotate(dir: &Path, cfg: &AuditConfig) -> std::io::Result<()> {
    let path = dir.join(FILE);
    if cfg.keep == 0 {
        return fs::remove_file(&path);
    }
    let _ = fs::remove_file(rotated(dir, cfg.keep));
    for n in (1..cfg.keep).rev() {
        match fs::rename(rotated(dir, n), rotated(dir, n + 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    fs::rename(&path, rotated(dir, 1))
}

/// An audit line that does not read: reported, and the others are shown.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("{at}: {len} bytes is too long for an audit line")]
    TooLong { at: String, len: usize },
    /// Written by a newer bkp-server: upgrade this one to read it.
    #[error("{at}: audit line version {v} (this server reads {VERSION})")]
    Version { at: String, v: u32 },
    #[error("{at}: {error}")]
    Json { at: String, error: serde_json::Error },
}

/// Every line of the log and its rotated files, oldest first. Lines that
/// do not parse are returned as errors, in place.
pub fn read(dir: &Path) -> std::io::Result<Vec<Result<Line, LineError>>> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut n = 1;
    while rotated(dir, n).exists() {
        files.push(rotated(dir, n));
        n += 1;
    }
    files.reverse();
    files.push(dir.join(FILE));
    let mut out = Vec::new();
    for f in files {
        let file = match File::open(&f) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for (i, l) in BufReader::new(file).split(b'\n').enumerate() {
            let l = l?;
            let at = || format!("{} line {}", f.display(), i + 1);
            if l.len() > MAX_LINE {
                out.push(Err(LineError::TooLong { at: at(), len: l.len() }));
                continue;
            }
            out.push(match serde_json::from_slice::<Line>(&l) {
                Ok(line) if line.v == VERSION => Ok(line),
                Ok(line) => Err(LineError::Version { at: at(), v: line.v }),
                Err(error) => Err(LineError::Json { at: at(), error }),
            });
        }
    }
    Ok(out)
}

/// A token bucket: `rate` lines a second, bursts of `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
    /// Held back since the last line let through.
    held: u64,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, tokens: rate, at: Instant::now(), held: 0 }
    }

    /// `Some(n)`: let through, `n` held back before it; `None`: hold back.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.held))
        } else {
            self.held += 1;
            None
        }
    }
}

/// `serve`'s writer: a bounded queue in front of one thread.
pub struct Audit {
    tx: Mutex<Option<SyncSender<Line>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    refusals: Mutex<Bucket>,
    /// Lines lost because the queue was full.
    pub dropped_full: AtomicU64,
    /// Refusal lines the rate limit kept out.
    pub dropped_rate: AtomicU64,
}

impl Audit {
    pub fn start(dir: &Path, cfg: AuditConfig) -> Self {
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        let dir = dir.to_path_buf();
        let refusals = Mutex::new(Bucket::new(cfg.refusals_per_second));
        let thread = std::thread::Builder::new()
            .name("bkp-audit".into())
            .spawn(move || {
                for line in rx {
                    if let Err(e) = append(&dir, &cfg, &line) {
                        error!(
                            "audit log {}: {e}; event {} not recorded",
                            dir.join(FILE).display(),
                            line.event.as_str()
                        );
                    }
                }
            })
            .map_err(|e| error!("audit log writer not started: {e}"))
            .ok();
        Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
            refusals,
            dropped_full: AtomicU64::new(0),
            dropped_rate: AtomicU64::new(0),
        }
    }

    /// Lines lost since start: (queue full, rate limit).
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_full.load(Ordering::Relaxed), self.dropped_rate.load(Ordering::Relaxed))
    }

    /// Queues a line; never waits.
    pub fn record(&self, mut line: Line) {
        if line.is_refusal() {
            let mut b = self.refusals.lock().expect("audit bucket");
            match b.take(Instant::now()) {
                Some(0) => {}
                Some(n) => line.suppressed = Some(n),
                None => {
                    self.dropped_rate.fetch_add(1, Ordering::Relaxed);
                    if b.held == 1 {
                        warn!(
                            "audit log: refusals over {}/s; more are counted (bkp_audit_dropped_total), not written",
                            b.rate
                        );
                    }
                    return;
                }
            }
        }
        let tx = self.tx.lock().expect("audit sender");
        let Some(tx) = tx.as_ref() else { return };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(l)) => {
                let n = self.dropped_full.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(dropped = n, "audit log queue full; event {} not recorded", l.event.as_str());
            }
            Err(TrySendError::Disconnected(l)) => {
                error!("audit log writer is gone; event {} not recorded", l.event.as_str());
            }
        }
    }

    /// Writes what is queued and stops the writer (a CLI job run locally
    /// exits right after).
    pub fn close(&self) {
        drop(self.tx.lock().expect("audit sender").take());
        if let Some(t) = self.thread.lock().expect("audit thread").take() {
            let _ = t.join();
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.close();
    }
}

/// A `--since` that is neither a time nor a duration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--since {0:?}: give an RFC 3339 time (2026-12-01T00:00:00Z) or a duration (24h)")]
pub struct SinceError(pub String);

/// `--since`: an RFC 3339 time or a duration back from now ("24h").
pub fn parse_since(s: &str) -> Result<u64, SinceError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    }
    let d: Duration = humantime::parse_duration(s).map_err(|_| SinceError(s.to_string()))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(now.saturating_sub(d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Line {
        Line {
            v: 1,
            time: "2026-12-04T02:30:00Z".into(),
            event: Event::Forget,
            token: Some("0123456789ab".into()),
            host: Some("web01".into()),
            peer: Some("127.0.0.1:5000".into()),
            result: "ok".into(),
            detail: Some("snapshot 1a2b3c4d".into()),
            by: None,
            suppressed: None,
        }
    }

    #[test]
    fn round_trip_and_golden_line() {
        let l = sample();
        let golden = r#"{"v":1,"time":"2026-12-04T02:30:00Z","event":"forget","token":"0123456789ab","host":"web01","peer":"127.0.0.1:5000","result":"ok","detail":"snapshot 1a2b3c4d"}"#;
        assert_eq!(String::from_utf8(l.encode()).unwrap(), format!("{golden}\n"));
        assert_eq!(serde_json::from_str::<Line>(golden).unwrap(), l);
        assert_eq!(l.unix_secs(), Some(1_796_351_400));
        for e in [Event::TokenCreate, Event::HelloRefused, Event::Refused, Event::Verify, Event::Reload] {
            let j = serde_json::to_string(&e).unwrap();
            assert_eq!(j, format!("\"{}\"", e.as_str()));
        }
        // The two optional fields appear only when set, at the end.
        let l = Line { event: Event::Gc, by: Some("schedule".into()), suppressed: Some(7), ..sample() };
        let golden = r#"{"v":1,"time":"2026-12-04T02:30:00Z","event":"gc","token":"0123456789ab","host":"web01","peer":"127.0.0.1:5000","result":"ok","detail":"snapshot 1a2b3c4d","by":"schedule","suppressed":7}"#;
        assert_eq!(String::from_utf8(l.encode()).unwrap(), format!("{golden}\n"));
        assert_eq!(serde_json::from_str::<Line>(golden).unwrap(), l);
    }

    #[test]
    fn bucket_lets_a_burst_through_then_the_rate_and_counts_the_rest() {
        let mut b = Bucket::new(10);
        let t0 = b.at;
        let passed = (0..50).filter(|_| b.take(t0).is_some()).count();
        assert_eq!((passed, b.held), (10, 40));
        // A tenth of a second later: one more, told about the 40.
        assert_eq!(b.take(t0 + Duration::from_millis(100)), Some(40));
        assert_eq!(b.take(t0 + Duration::from_millis(100)), None);
        // Idle for long: a full burst again, never more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(later), Some(1));
        assert_eq!((1..20).filter(|_| b.take(later).is_some()).count(), 9);
    }

    #[test]
    fn a_refusal_flood_is_limited_and_other_events_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::start(dir.path(), AuditConfig { refusals_per_second: 5, ..Default::default() });
        for _ in 0..1000 {
            a.record(Line::new(Event::HelloRefused, "refused"));
        }
        for _ in 0..100 {
            a.record(Line::new(Event::Forget, "ok"));
        }
        a.close();
        let lines: Vec<Line> = read(dir.path()).unwrap().into_iter().map(Result::unwrap).collect();
        let refused = lines.iter().filter(|l| l.event == Event::HelloRefused).count();
        // A slow machine may refill a token or two during the loop.
        assert!((5..=8).contains(&refused), "{refused}");
        assert_eq!(lines.iter().filter(|l| l.event == Event::Forget).count(), 100);
        assert_eq!(a.dropped(), (0, 1000 - refused as u64));
    }

    #[test]
    fn long_fields_are_cut() {
        let l = Line::new(Event::Refused, "refused").detail("é".repeat(2000)).host(&"h".repeat(5000));
        assert!(l.detail.as_ref().unwrap().len() <= MAX_FIELD && l.detail.as_ref().unwrap().ends_with("..."));
        assert_eq!(l.host.as_ref().unwrap().len(), MAX_FIELD);
        assert!(l.encode().len() < MAX_LINE);
    }

    #[test]
    fn rotates_and_keeps_n_files_and_reads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { max_bytes: 1000, keep: 2, ..Default::default() };
        for i in 0..100 {
            append(dir.path(), &cfg, &Line::new(Event::Gc, "ok").detail(format!("run {i}"))).unwrap();
        }
        assert!(dir.path().join("audit.log.2").exists() && !dir.path().join("audit.log.3").exists());
        assert!(fs::metadata(dir.path().join(FILE)).unwrap().len() <= 1000);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        let lines: Vec<Line> = read(dir.path()).unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(lines.last().unwrap().detail.as_deref(), Some("run 99"));
        let n: Vec<u32> = lines.iter().map(|l| l.detail.as_ref().unwrap()[4..].parse().unwrap()).collect::<Vec<_>>();
        assert!(n.windows(2).all(|w| w[0] + 1 == w[1]), "{n:?}");
    }

    #[test]
    fn writer_thread_writes_everything_before_close() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::start(dir.path(), AuditConfig::default());
        for _ in 0..50 {
            a.record(Line::new(Event::Prune, "ok"));
        }
        a.close();
        assert_eq!(read(dir.path()).unwrap().len(), 50);
        assert_eq!(a.dropped(), (0, 0));
    }

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(parse_since("2026-12-04T02:30:00Z").unwrap(), 1_796_351_400);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(parse_since("24h").unwrap().abs_diff(now - 86_400) < 5);
        assert!(parse_since("yesterday").is_err());
    }
}
