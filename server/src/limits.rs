//! What a peer may make the server hold, and the registry of live
//! connections that enforces it.
//!
//! Two pools that never share slots: connections still in their
//! handshake or hello (unauthenticated), and authenticated ones. The
//! unauthenticated pool is full when its total or one address's share is
//! reached; a newcomer then takes the slot of the oldest unauthenticated
//! connection (of that address first) instead of being refused, so a
//! flood of hello-less connections cannot keep a real host, which says
//! hello within milliseconds, from getting in. Authenticated connections
//! are limited in total and per token; those are refused with a clear
//! reason.
//!
//! The registry also knows every authenticated connection by token id, so
//! a revoked token's connections can be closed ([`Limits::close_revoked`],
//! driven by `server::watch_tokens`).
//!
//! Memory for request frames is admitted against three budgets (the
//! connection's, the token's, the server's; see `bkp_common::io::Budget`),
//! and decompression beyond [`INFLATE_RATIO`] times the uploaded bytes is
//! paced per token ([`TokenShared::inflate_delay`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bkp_common::io::{Admitted, Budget};
use serde::Deserialize;
use tokio::sync::Notify;

/// Application close codes the server uses (the client prints the reason).
pub const CLOSE_REFUSED: u32 = 1;
pub const CLOSE_REVOKED: u32 = 3;
pub const CLOSE_CROWDED: u32 = 4;

pub const REVOKED_REASON: &str =
    "the token of this connection was revoked by the server's operator; nothing more was committed; \
     ask the operator for a new token (bkp-server token create)";
pub const CROWDED_REASON: &str =
    "too many connections from this address are still in their handshake; try again (the server makes room for newcomers)";

/// Uploaded chunks may decompress to this many times their blob bytes
/// without being paced; real data (text, dumps, zero-filled files after
/// deduplication) stays well under it per upload batch.
pub const INFLATE_RATIO: u64 = 64;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Authenticated connections one token may have open.
    pub connections_per_token: usize,
    /// Connections in their handshake or hello, in total and per address.
    pub unauthenticated: usize,
    pub unauthenticated_per_address: usize,
    /// Live push sessions, in total and per host.
    pub sessions: usize,
    pub sessions_per_host: usize,
    /// Request frames held in memory, MiB: whole server, per token, per
    /// connection. A frame waits for room; it is never refused for this.
    pub frame_budget_mb: usize,
    pub token_frame_budget_mb: usize,
    pub connection_frame_budget_mb: usize,
    /// Decompression beyond INFLATE_RATIO x the uploaded bytes allowed per
    /// token, MiB per second (with one second of burst).
    pub inflate_mb_per_sec: usize,
    /// Full (64 MiB) receive windows granted at once, MiB: a push or admin
    /// connection that finds none left gets a 1 MiB window (slower on
    /// long paths, never refused).
    pub window_budget_mb: usize,
    /// Chunk ids live push sessions have proven or uploaded, MiB, for the
    /// whole server: half in exact sets, half in one shared filter once
    /// those are full (see `crate::sessions`).
    pub touched_mb: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections_per_token: 8,
            unauthenticated: 256,
            unauthenticated_per_address: 32,
            sessions: 1024,
            sessions_per_host: 16,
            frame_budget_mb: 512,
            token_frame_budget_mb: 64,
            connection_frame_budget_mb: 32,
            inflate_mb_per_sec: 64,
            window_budget_mb: 1024,
            touched_mb: crate::sessions::DEFAULT_TOUCHED_MB,
        }
    }
}

struct Pending {
    ip: IpAddr,
    evict: Arc<Notify>,
}

struct TokenEntry {
    host: String,
    conns: HashMap<u64, quinn::Connection>,
    shared: Arc<TokenShared>,
    /// Its connections were closed for a revocation (reported once).
    revoked: bool,
}

#[derive(Default)]
struct Registry {
    /// By admission order: the first entry is the oldest.
    pending: BTreeMap<u64, Pending>,
    per_ip: HashMap<IpAddr, usize>,
    tokens: HashMap<String, TokenEntry>,
    authed: usize,
}

/// Why an authenticated connection was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmitError {
    #[error("the server has {0} connections open, its limit (max_connections); try again later")]
    ServerFull(usize),
    /// Revoked while this hello was checked.
    #[error("unknown or revoked token; ask the operator for a token (bkp-server token create)")]
    Revoked,
    #[error(
        "token {id} already has {open} connections open (limits.connections_per_token); wait for this host's \
         other bkp commands to finish"
    )]
    TokenFull { id: String, open: usize },
}

impl AdmitError {
    /// The limits pass once connections close; a revoked token stays so.
    pub fn retryable(&self) -> bool {
        !matches!(self, AdmitError::Revoked)
    }
}

pub struct Limits {
    pub cfg: LimitsConfig,
    max_connections: usize,
    reg: Mutex<Registry>,
    /// The whole server's frame budget.
    pub frames: Arc<Budget>,
    /// Receive windows of authenticated connections beyond the small one.
    pub windows: Arc<Budget>,
    next: AtomicU64,
    /// Unauthenticated connections closed to make room, since start.
    pub evicted: AtomicU64,
}

/// Per-token state shared by the token's connections.
pub struct TokenShared {
    pub frames: Arc<Budget>,
    inflate: Mutex<Bucket>,
}

/// A token bucket: `level` bytes may go now, refilled at `rate` per second
/// up to `rate` (one second of burst).
struct Bucket {
    level: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self { level: rate, rate, at: Instant::now() }
    }

    /// Takes `n` bytes; returns how long the taker must wait for them.
    fn take(&mut self, n: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.level = (self.level + dt * self.rate).min(self.rate) - n as f64;
        if self.level >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate)
        }
    }
}

impl TokenShared {
    /// How long an upload batch of `blob_bytes` that decompresses to
    /// `raw_bytes` must wait before it is decompressed: nothing unless it
    /// inflates beyond [`INFLATE_RATIO`], then the excess is paced.
    pub fn inflate_delay(&self, blob_bytes: u64, raw_bytes: u64) -> Duration {
        let excess = raw_bytes.saturating_sub(blob_bytes.saturating_mul(INFLATE_RATIO));
        if excess == 0 {
            return Duration::ZERO;
        }
        self.inflate.lock().expect("inflate lock").take(excess, Instant::now())
    }
}

/// An unauthenticated connection's slot; freed on drop.
pub struct PendingSlot {
    limits: Arc<Limits>,
    key: u64,
    pub evict: Arc<Notify>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut reg = self.limits.reg.lock().expect("limits lock");
        if let Some(p) = reg.pending.remove(&self.key) {
            Registry::unpend_ip(&mut reg.per_ip, p.ip);
        }
    }
}

/// An authenticated connection's slot; freed on drop.
pub struct AuthSlot {
    limits: Arc<Limits>,
    token: String,
    key: u64,
    pub shared: Arc<TokenShared>,
    /// The full receive window's share of [`Limits::windows`], if granted.
    window: Option<Admitted>,
}

/// The small receive window: restore tokens (which only send requests)
/// and connections beyond the window budget.
pub const SMALL_WINDOW: u32 = 1 << 20;

impl AuthSlot {
    /// The receive window this connection may have: the full one (the
    /// shared transport's) while the server's window budget lasts.
    pub fn take_window(&mut self, full: u32) -> u32 {
        let windows = &self.limits.windows;
        // `try_admit` grants a request larger than the budget as the whole
        // budget: a budget below one window grants none.
        if windows.capacity() < full as usize {
            return SMALL_WINDOW;
        }
        match Budget::try_admit(&[windows], full as usize) {
            Some(a) => {
                self.window = Some(a);
                full
            }
            None => SMALL_WINDOW,
        }
    }
}

impl Drop for AuthSlot {
    fn drop(&mut self) {
        let mut guard = self.limits.reg.lock().expect("limits lock");
        let reg = &mut *guard;
        if let Some(e) = reg.tokens.get_mut(&self.token) {
            if e.conns.remove(&self.key).is_some() {
                reg.authed -= 1;
            }
            if e.conns.is_empty() {
                reg.tokens.remove(&self.token);
            }
        }
    }
}

impl Registry {
    fn unpend_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    /// Frees the oldest pending slot (of `ip` when given).
    fn evict_oldest(&mut self, ip: Option<IpAddr>) {
        let key = self.pending.iter().find(|(_, p)| ip.is_none_or(|i| p.ip == i)).map(|(k, _)| *k);
        if let Some(p) = key.and_then(|k| self.pending.remove(&k)) {
            Self::unpend_ip(&mut self.per_ip, p.ip);
            p.evict.notify_one();
        }
    }
}

const MIB: usize = 1 << 20;

impl Limits {
    pub fn new(cfg: LimitsConfig, max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            frames: Budget::new(cfg.frame_budget_mb.max(1) * MIB),
            windows: Budget::new(cfg.window_budget_mb * MIB),
            cfg,
            max_connections,
            reg: Mutex::default(),
            next: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    /// A slot for a new unauthenticated connection from `ip`, made by
    /// evicting the oldest one when the pool is full.
    pub fn pending(self: &Arc<Self>, ip: IpAddr) -> PendingSlot {
        let ip = address_group(ip);
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        let mut reg = self.reg.lock().expect("limits lock");
        if reg.per_ip.get(&ip).copied().unwrap_or(0) >= self.cfg.unauthenticated_per_address.max(1) {
            reg.evict_oldest(Some(ip));
            self.evicted.fetch_add(1, Ordering::Relaxed);
        } else if reg.pending.len() >= self.cfg.unauthenticated.max(1) {
            reg.evict_oldest(None);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        reg.pending.insert(key, Pending { ip, evict: evict.clone() });
        *reg.per_ip.entry(ip).or_default() += 1;
        PendingSlot { limits: self.clone(), key, evict }
    }

    /// Registers an authenticated connection of token `id`, or says why not.
    pub fn admit(self: &Arc<Self>, id: &str, host: &str, conn: &quinn::Connection) -> Result<AuthSlot, AdmitError> {
        let mut reg = self.reg.lock().expect("limits lock");
        if reg.authed >= self.max_connections {
            return Err(AdmitError::ServerFull(reg.authed));
        }
        let per_token = self.cfg.connections_per_token.max(1);
        let (token_mb, rate) = (self.cfg.token_frame_budget_mb.max(1), (self.cfg.inflate_mb_per_sec * MIB) as f64);
        let entry = reg.tokens.entry(id.to_string()).or_insert_with(|| TokenEntry {
            host: host.to_string(),
            conns: HashMap::new(),
            shared: Arc::new(TokenShared {
                frames: Budget::new(token_mb * MIB),
                inflate: Mutex::new(Bucket::new(rate)),
            }),
            revoked: false,
        });
        if entry.revoked {
            return Err(AdmitError::Revoked);
        }
        if entry.conns.len() >= per_token {
            return Err(AdmitError::TokenFull { id: id.to_string(), open: entry.conns.len() });
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        entry.conns.insert(key, conn.clone());
        let shared = entry.shared.clone();
        reg.authed += 1;
        Ok(AuthSlot { limits: self.clone(), token: id.to_string(), key, shared, window: None })
    }

    /// A new connection's own frame budget.
    pub fn connection_budget(&self) -> Arc<Budget> {
        Budget::new(self.cfg.connection_frame_budget_mb.max(1) * MIB)
    }

    /// Closes every connection whose token id is not in `valid`; returns
    /// (token id, host, connections closed) for each such token.
    pub fn close_revoked(&self, valid: &HashSet<String>) -> Vec<(String, String, usize)> {
        let mut reg = self.reg.lock().expect("limits lock");
        let mut out = Vec::new();
        for (id, e) in reg.tokens.iter_mut().filter(|(id, e)| !e.revoked && !valid.contains(*id)) {
            for c in e.conns.values() {
                c.close(CLOSE_REVOKED.into(), REVOKED_REASON.as_bytes());
            }
            e.revoked = true;
            out.push((id.clone(), e.host.clone(), e.conns.len()));
        }
        out
    }

    /// Open authenticated connections of token `id`.
    pub fn connections_of(&self, id: &str) -> usize {
        self.reg.lock().expect("limits lock").tokens.get(id).map_or(0, |e| e.conns.len())
    }

    /// Connections in their handshake or hello right now.
    pub fn unauthenticated(&self) -> usize {
        self.reg.lock().expect("limits lock").pending.len()
    }

    /// The frame budget of token `id` while it has connections open.
    pub fn token_frames(&self, id: &str) -> Option<Arc<Budget>> {
        self.reg.lock().expect("limits lock").tokens.get(id).map(|e| e.shared.frames.clone())
    }
}

/// The "address" per-address limits count: an IPv6 peer is its /64, the
/// block one host or customer usually gets, or one attacker could take a
/// fresh address for every connection.
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_are_counted_by_their_64() {
        let g = |s: &str| address_group(s.parse().unwrap());
        assert_eq!(g("2001:db8:1:2:aaaa::1"), g("2001:db8:1:2:ffff::9"));
        assert_ne!(g("2001:db8:1:2::1"), g("2001:db8:1:3::1"));
        assert_eq!(g("::ffff:10.0.0.1"), g("10.0.0.1"));
        assert_ne!(g("10.0.0.1"), g("10.0.0.2"));
    }

    #[test]
    fn bucket_paces_only_the_excess() {
        let mut b = Bucket::new(100.0);
        let t = b.at;
        assert_eq!(b.take(100, t), Duration::ZERO, "one second of burst");
        assert_eq!(b.take(50, t), Duration::from_millis(500));
        // Refilled by the wait it imposed: the next take waits only for itself.
        assert_eq!(b.take(50, t + Duration::from_millis(500)), Duration::from_millis(500));
        let s = TokenShared { frames: Budget::new(1), inflate: Mutex::new(Bucket::new(1000.0)) };
        assert_eq!(s.inflate_delay(100, 100 * INFLATE_RATIO), Duration::ZERO, "up to the ratio is free");
        assert!(s.inflate_delay(1, u32::MAX as u64) > Duration::from_secs(1000));
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_of_the_same_address_first() {
        let cfg = LimitsConfig { unauthenticated: 3, unauthenticated_per_address: 2, ..Default::default() };
        let l = Limits::new(cfg, 10);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = l.pending(a);
        let b1 = l.pending(b);
        let a2 = l.pending(a);
        let a3 = l.pending(a);
        assert_eq!(l.unauthenticated(), 3);
        // a1 was told to go; b1 and a2 were not.
        let notified = |s: &PendingSlot| ready_now(s.evict.notified());
        assert!(notified(&a1) && !notified(&b1) && !notified(&a2));
        let c1 = l.pending("10.0.0.3".parse().unwrap());
        assert!(notified(&b1), "a full pool makes room from its oldest");
        drop((a1, b1));
        assert_eq!(l.unauthenticated(), 3, "dropping evicted slots frees nothing twice");
        drop((a2, a3, c1));
        assert_eq!(l.unauthenticated(), 0);
    }

    /// Whether a `Notified` future is ready at its first poll.
    fn ready_now(f: tokio::sync::futures::Notified<'_>) -> bool {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        std::future::Future::poll(f.as_mut(), &mut std::task::Context::from_waker(waker)).is_ready()
    }
}
