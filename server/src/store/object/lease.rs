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
//! Expiry is wall-clock: clocks of the servers sharing a bucket must agree
//! to well within the lease's time to live (minutes).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ObjectError, Objects, Version};

pub const LEASE_OBJECT: &str = "lease";
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
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
         crashed one when it expires)"
    )]
    Held { prefix: String, host: String, pid: u32, secs: u64 },
    #[error(
        "the lease on bucket prefix {prefix:?} was taken by another server ({host}): this server no longer \
         writes there; find out which server should own the prefix, and restart this one only if it is it"
    )]
    Lost { prefix: String, host: String },
    #[error("lease object is damaged ({0}); if no other server uses this prefix, delete the `lease` object")]
    Damaged(String),
    #[error(transparent)]
    Object(#[from] ObjectError),
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
                return Err(LeaseError::Held {
                    prefix,
                    host: theirs.host,
                    pid: theirs.pid,
                    secs: theirs.expires - unix(now),
                });
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
