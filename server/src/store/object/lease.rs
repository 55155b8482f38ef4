//! One writer per bucket prefix: the `lease` object.
//!
//! A server takes the lease with a create-only PUT, renews it well before
//! it expires with a PUT conditional on the version it wrote last
//! (`If-Match`), and writes it expired when it stops. A second server finds
//! a live lease held by another holder and refuses to start; one that finds
//! an expired lease (its holder crashed) takes it over with `If-Match` on
//! the version it read, so of two servers racing for it one wins. The same
//! holder (the same data directory: its id is kept there) takes its own
//! lease back at once after a crash.
//!
//! After a crash on another machine (`bkp-server rebuild` on a new one),
//! the dead holder's lease runs out only after its time to live. An
//! operator may take it over sooner ([`TakeOver::IfSilent`], `rebuild
//! --take-over-lease`), but only once the holder has missed a renewal: its
//! last one lies more than [`TAKE_OVER_SILENCE`] back, longer than a live
//! holder ever waits between two. A holder that was only cut off from the
//! bucket finds the lease lost at its next renewal and stops writing.
//!
//! Expiry is wall-clock: clocks of the servers sharing a bucket must agree
//! to well within the lease's time to live (minutes).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ObjectError, Objects, Version};

pub const LEASE_OBJECT: &str = "lease";
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// A live holder renews every third of [`DEFAULT_TTL`] (100 s); one
/// silent this much longer has missed a renewal.
pub const TAKE_OVER_SILENCE: Duration = Duration::from_secs(DEFAULT_TTL.as_secs() / 3 + 30);
/// A lease record is a few hundred bytes; anything bigger is not one.
const MAX_LEASE_BYTES: usize = 64 << 10;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    pub v: u32,
    /// Stable id of the holding server (kept in its data directory).
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// Unix time, seconds, after which the lease may be taken over.
    pub expires: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "bucket prefix {prefix:?} is in use by another bkp-server (host {host}, pid {pid}; its lease runs \
         {secs} s more). Two servers writing one prefix would destroy each other's data: give this server \
         its own [storage] prefix, or stop the other one (a stopped server frees the lease at once, a \
         crashed one when it expires; `bkp-server rebuild --take-over-lease` takes it over once the crashed \
         server has missed a renewal)"
    )]
    Held { prefix: String, host: String, pid: u32, secs: u64 },
    #[error(
        "the lease on bucket prefix {prefix:?} was taken by another server ({host}): this server no longer \
         writes there; find out which server should own the prefix, and restart this one only if it is it"
    )]
    Lost { prefix: String, host: String },
    #[error(
        "bucket prefix {prefix:?} is held by host {host} (pid {pid}), which renewed its lease {ago} s ago: that \
         server looks alive. Stop it first; --take-over-lease takes a lease over only once its holder has been \
         silent for {need} s (try again in {wait} s)"
    )]
    Live { prefix: String, host: String, pid: u32, ago: u64, need: u64, wait: u64 },
    #[error("lease object is damaged ({0}); if no other server uses this prefix, delete the `lease` object")]
    Damaged(String),
    #[error(transparent)]
    Object(#[from] ObjectError),
}

/// Whether [`Lease::acquire_with`] may take a lease another holder has
/// not let expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeOver {
    Never,
    /// When its last renewal lies further back than this.
    IfSilent(Duration),
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    objects: Objects,
    prefix: String,
    record: LeaseRecord,
    version: Version,
    ttl: Duration,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn encode(r: &LeaseRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(r).expect("lease record to JSON"))
}

fn decode(b: &[u8]) -> Result<LeaseRecord, LeaseError> {
    if b.len() > MAX_LEASE_BYTES {
        return Err(LeaseError::Damaged(format!("{} bytes", b.len())));
    }
    let r: LeaseRecord = serde_json::from_slice(b).map_err(|e| LeaseError::Damaged(e.to_string()))?;
    if r.v != 1 {
        return Err(LeaseError::Damaged(format!("version {} (a newer bkp-server?)", r.v)));
    }
    Ok(r)
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "?".into())
}

impl Lease {
    /// Takes the lease for `holder`, or says who has it.
    pub async fn acquire(objects: &Objects, holder: &str, ttl: Duration, now: SystemTime) -> Result<Self, LeaseError> {
        Self::acquire_with(objects, holder, ttl, now, TakeOver::Never).await
    }

    /// As [`Lease::acquire`]; `take_over` says whether a live lease whose
    /// holder has gone silent may be taken (see the module doc).
    pub async fn acquire_with(
        objects: &Objects,
        holder: &str,
        ttl: Duration,
        now: SystemTime,
        take_over: TakeOver,
    ) -> Result<Self, LeaseError> {
        let prefix = objects.prefix.clone();
        let record = LeaseRecord {
            v: 1,
            holder: holder.to_string(),
            host: hostname(),
            pid: std::process::id(),
            expires: unix(now + ttl),
        };
        // At most a few rounds: each one lost means another server moved.
        for _ in 0..3 {
            match objects.put_if(LEASE_OBJECT, encode(&record), None).await {
                Ok(version) => return Ok(Self { objects: objects.clone(), prefix, record, version, ttl }),
                Err(ObjectError::AlreadyExists(_)) | Err(ObjectError::Precondition(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let (bytes, seen) = match objects.get_versioned(LEASE_OBJECT).await {
                Ok(x) => x,
                // Released and deleted between our PUT and GET: try again.
                Err(ObjectError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let theirs = decode(&bytes)?;
            if theirs.holder != holder && theirs.expires > unix(now) {
                // Its last renewal: the expiry it wrote, less the time to
                // live every server uses.
                let ago = unix(now).saturating_sub(theirs.expires.saturating_sub(DEFAULT_TTL.as_secs()));
                match take_over {
                    TakeOver::IfSilent(need) if ago > need.as_secs() => {
                        tracing::warn!(
                            host = %theirs.host,
                            pid = theirs.pid,
                            silent_secs = ago,
                            "taking over the lease of a holder that stopped renewing it"
                        );
                    }
                    TakeOver::IfSilent(need) => {
                        return Err(LeaseError::Live {
                            prefix,
                            host: theirs.host,
                            pid: theirs.pid,
                            ago,
                            need: need.as_secs(),
                            wait: need.as_secs() + 1 - ago,
                        })
                    }
                    TakeOver::Never => {
                        return Err(LeaseError::Held {
                            prefix,
                            host: theirs.host,
                            pid: theirs.pid,
                            secs: theirs.expires - unix(now),
                        })
                    }
                }
            }
            match objects.put_if(LEASE_OBJECT, encode(&record), Some(&seen)).await {
                Ok(version) => return Ok(Self { objects: objects.clone(), prefix, record, version, ttl }),
                Err(ObjectError::Precondition(_)) | Err(ObjectError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Object(ObjectError::Other(format!(
            "the lease on bucket prefix {prefix:?} changed three times while taking it: another server is starting; try again"
        ))))
    }

    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often to renew: a third of the time to live, so two renewals
    /// may fail before it runs out.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Pushes the expiry out; fails with [`LeaseError::Lost`] if another
    /// server has written the lease since.
    pub async fn renew(&mut self, now: SystemTime) -> Result<(), LeaseError> {
        let mut next = self.record.clone();
        next.expires = unix(now + self.ttl);
        match self.objects.put_if(LEASE_OBJECT, encode(&next), Some(&self.version)).await {
            Ok(v) => {
                self.version = v;
                self.record = next;
                Ok(())
            }
            Err(ObjectError::Precondition(_)) | Err(ObjectError::NotFound(_)) => {
                let host = match self.objects.get(LEASE_OBJECT).await.map(|b| decode(&b)) {
                    Ok(Ok(r)) => r.host,
                    _ => "unknown".into(),
                };
                Err(LeaseError::Lost { prefix: self.prefix.clone(), host })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the lease expired, so the next server starts at once.
    pub async fn release(self) -> Result<(), LeaseError> {
        let mut done = self.record.clone();
        done.expires = 0;
        match self.objects.put_if(LEASE_OBJECT, encode(&done), Some(&self.version)).await {
            Ok(_) | Err(ObjectError::Precondition(_)) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::object::RetryPolicy;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn one_holder_at_a_time() {
        rt().block_on(async {
            let o = Objects::new(Arc::new(object_store::memory::InMemory::new()), "site", RetryPolicy::default());
            let t0 = SystemTime::now();
            let ttl = Duration::from_secs(60);
            let mut a = Lease::acquire(&o, "server-a", ttl, t0).await.unwrap();
            let e = Lease::acquire(&o, "server-b", ttl, t0).await.unwrap_err();
            assert!(matches!(&e, LeaseError::Held { secs: 60, .. }), "{e}");
            assert!(e.to_string().contains("prefix \"site\"") && e.to_string().contains("own [storage] prefix"), "{e}");
            // The same holder (a restart after a crash) takes it back.
            let a2 = Lease::acquire(&o, "server-a", ttl, t0).await.unwrap();
            // ... which the old handle sees as lost at its next renewal.
            assert!(matches!(a.renew(t0).await, Err(LeaseError::Lost { .. })));
            let mut a = a2;
            a.renew(t0 + Duration::from_secs(30)).await.unwrap();
            let e = Lease::acquire(&o, "server-b", ttl, t0 + Duration::from_secs(80)).await.unwrap_err();
            assert!(matches!(e, LeaseError::Held { secs: 10, .. }), "renewal moved the expiry: {e}");
            // Expired (its holder died): taken over, and the old holder's
            // renewal fails rather than overwriting the new holder.
            let b = Lease::acquire(&o, "server-b", ttl, t0 + Duration::from_secs(91)).await.unwrap();
            assert!(matches!(a.renew(t0 + Duration::from_secs(92)).await, Err(LeaseError::Lost { .. })));
            // Released: the next server starts at once.
            b.release().await.unwrap();
            Lease::acquire(&o, "server-c", ttl, t0 + Duration::from_secs(93)).await.unwrap();
        });
    }

    /// The explicit take-over: refused while the holder renewed recently
    /// (saying how long to wait), allowed once it has missed a renewal;
    /// the old holder then finds its lease lost.
    #[test]
    fn a_silent_holder_can_be_taken_over_a_live_one_cannot() {
        rt().block_on(async {
            let o = Objects::new(Arc::new(object_store::memory::InMemory::new()), "site", RetryPolicy::default());
            let t0 = SystemTime::now();
            let mut a = Lease::acquire(&o, "dead", DEFAULT_TTL, t0).await.unwrap();
            let take = TakeOver::IfSilent(TAKE_OVER_SILENCE);
            let at = |s: u64| t0 + Duration::from_secs(s);
            let e = Lease::acquire_with(&o, "new", DEFAULT_TTL, at(10), take).await.unwrap_err();
            match &e {
                LeaseError::Live { ago: 10, wait, .. } => assert_eq!(*wait, TAKE_OVER_SILENCE.as_secs() - 9),
                e => panic!("{e}"),
            }
            assert!(e.to_string().contains("renewed its lease 10 s ago") && e.to_string().contains("Stop it"), "{e}");
            // Renewed at 100 s (as a live holder does): silent again from there.
            a.renew(at(100)).await.unwrap();
            let e = Lease::acquire_with(&o, "new", DEFAULT_TTL, at(200), take).await.unwrap_err();
            assert!(matches!(e, LeaseError::Live { ago: 100, .. }), "{e}");
            let e = Lease::acquire(&o, "new", DEFAULT_TTL, at(300)).await.unwrap_err();
            assert!(e.to_string().contains("--take-over-lease"), "the plain refusal names the way out: {e}");
            let b = Lease::acquire_with(&o, "new", DEFAULT_TTL, at(100 + TAKE_OVER_SILENCE.as_secs() + 1), take)
                .await
                .unwrap();
            assert_eq!(b.record().holder, "new");
            assert!(matches!(a.renew(at(400)).await, Err(LeaseError::Lost { .. })), "the silent holder lost it");
        });
    }

    #[test]
    fn a_damaged_lease_is_reported_not_overwritten() {
        rt().block_on(async {
            let o = Objects::new(Arc::new(object_store::memory::InMemory::new()), "", RetryPolicy::default());
            o.put_new(LEASE_OBJECT, Bytes::from_static(b"{not json")).await.unwrap();
            let e = Lease::acquire(&o, "a", DEFAULT_TTL, SystemTime::now()).await.unwrap_err();
            assert!(matches!(e, LeaseError::Damaged(_)), "{e}");
            assert_eq!(&o.get(LEASE_OBJECT).await.unwrap()[..], b"{not json");
        });
    }
}
