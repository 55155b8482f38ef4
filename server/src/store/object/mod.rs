//! Chunk data on an S3-compatible object store (issue 18), through the
//! `object_store` crate: the calls the S3 backend makes, each retried with
//! backoff for a bounded total time, with typed errors that say what to do.
//!
//! * [`Objects::put_new`] is create-only (`If-None-Match: *`). It is only
//!   used for content-named objects (a pack's name is its hash), so an
//!   "already exists" answer, which a retry after a lost reply gets, means
//!   the bytes are there: success, not an error.
//! * The one-writer [`lease`] is the only object ever overwritten, and only
//!   with `If-Match` on the version its holder wrote.
//! * object_store's own retries are off: this layer decides what is worth
//!   retrying (network errors, 5xx, timeouts) and what is not (denied,
//!   missing, a lost condition), and bounds the total time.

pub mod config;
#[cfg(test)]
pub(crate) mod faulty;
pub mod lease;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// reqwest's rustls (the S3 client's TLS) is built without a crypto
/// provider of its own, so that the server carries one stack (ring, as
/// quinn does) and not also aws-lc-rs: install ring as the process
/// default before the first client is built. Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error(
        "object store did not answer {op} {name} ({attempts} attempts over {:.1} s; last: {last}); \
         check that the bucket endpoint is reachable, then repeat: nothing was acknowledged",
        elapsed.as_secs_f64()
    )]
    Unavailable { op: &'static str, name: String, attempts: u32, elapsed: Duration, last: String },
    #[error("object {0} is missing from the bucket; run `bkp-server verify --full` to list what it affects")]
    NotFound(String),
    #[error("the object store refused {op} {name}: {msg}; check the credentials and the bucket's policy")]
    Denied { op: &'static str, name: String, msg: String },
    #[error("object {0} changed under a conditional write (another writer?)")]
    Precondition(String),
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("object store: {0}")]
    Other(String),
}

/// How a create-only put ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// This call wrote it.
    New,
    /// It was there already (an earlier attempt, or another upload of the
    /// same content).
    Existed,
}

/// Backoff: `first`, doubling to `max_delay`, with jitter, until `total`.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max_delay: Duration,
    pub total: Duration,
    /// One attempt's limit (a stalled connection is an error, retried).
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            total: Duration::from_secs(120),
            attempt_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of what this layer did (metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub puts: std::sync::atomic::AtomicU64,
    pub gets: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    pub retries: std::sync::atomic::AtomicU64,
    pub bytes_put: std::sync::atomic::AtomicU64,
    pub bytes_got: std::sync::atomic::AtomicU64,
    /// Unix seconds of the first failed attempt since the bucket last
    /// answered (0: it answers). An answer that is an error of ours (not
    /// found, precondition, denied) is an answer.
    pub failing_since: std::sync::atomic::AtomicU64,
}

impl Stats {
    /// How long the bucket has not answered, if it does not.
    pub fn unreachable_for(&self) -> Option<Duration> {
        let since = self.failing_since.load(std::sync::atomic::Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        Some(Duration::from_secs(now.saturating_sub(since)))
    }

    fn answered(&self) {
        self.failing_since.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn unanswered(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let _ = self.failing_since.compare_exchange(
            0,
            now.max(1),
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// One bucket prefix.
#[derive(Clone, Debug)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// The bucket's name, for messages (empty for a store in memory).
    bucket: String,
    prefix: String,
    retry: RetryPolicy,
    stats: Arc<Stats>,
}

fn is_retryable(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. } | object_store::Error::JoinError { .. })
}

impl Objects {
    /// Over `store`; every name is put under `prefix` (may be empty).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, retry: RetryPolicy) -> Self {
        let prefix = prefix.trim_matches('/').to_string();
        Self { store, bucket: String::new(), prefix, retry, stats: Default::default() }
    }

    /// The bucket's name (what errors name).
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn with_bucket(mut self, name: &str) -> Self {
        self.bucket = name.to_string();
        self
    }

    /// An S3 client from `[storage]`.
    pub fn s3(cfg: &config::StorageConfig, retry: RetryPolicy) -> Result<Self, ObjectError> {
        install_crypto();
        let creds = cfg.credentials().map_err(|e| ObjectError::Other(e.to_string()))?;
        let mut client = object_store::ClientOptions::new()
            .with_timeout(retry.attempt_timeout)
            .with_connect_timeout(Duration::from_secs(10));
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(cfg.bucket.clone().unwrap_or_default())
            .with_region(&cfg.region)
            .with_access_key_id(creds.key_id)
            .with_secret_access_key(creds.secret)
            .with_unsigned_payload(!cfg.sign_payload)
            // Ours decide; see the module doc.
            .with_retry(object_store::RetryConfig { max_retries: 0, ..Default::default() });
        if let Some(t) = creds.token {
            b = b.with_token(t);
        }
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            client = client.with_allow_http(e.starts_with("http://"));
        }
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|e| ObjectError::Other(format!("ca_file {}: {e}", ca.display())))?;
            for c in object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ObjectError::Other(format!("ca_file {}: {e}", ca.display())))?
            {
                client = client.with_root_certificate(c);
            }
        }
        let store = b.with_client_options(client).build().map_err(|e| ObjectError::Other(e.to_string()))?;
        Ok(Self::new(Arc::new(store), &cfg.prefix, retry).with_bucket(cfg.bucket.as_deref().unwrap_or_default()))
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn path(&self, name: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Runs `op` until it succeeds, fails for good, or the policy's total
    /// time is spent.
    async fn retried<T, F, Fut>(&self, op: &'static str, name: &str, mut f: F) -> Result<T, ObjectError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, object_store::Error>>,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let start = Instant::now();
        let mut delay = self.retry.first;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = match tokio::time::timeout(self.retry.attempt_timeout, f()).await {
                Ok(Ok(v)) => {
                    self.stats.answered();
                    return Ok(v);
                }
                Ok(Err(e)) if !is_retryable(&e) => {
                    self.stats.answered();
                    self.stats.errors.fetch_add(1, Relaxed);
                    return Err(self.classify(op, name, e));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer in {:?}", self.retry.attempt_timeout),
            };
            self.stats.errors.fetch_add(1, Relaxed);
            self.stats.unanswered();
            let elapsed = start.elapsed();
            if elapsed + delay > self.retry.total {
                return Err(ObjectError::Unavailable { op, name: name.to_string(), attempts, elapsed, last });
            }
            tracing::debug!(op, name, attempts, error = %last, "object store call failed; retrying");
            self.stats.retries.fetch_add(1, Relaxed);
            // Full jitter: writers that failed together do not retry together.
            let sleep = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            tokio::time::sleep(sleep).await;
            delay = (delay * 2).min(self.retry.max_delay);
        }
    }

    fn classify(&self, op: &'static str, name: &str, e: object_store::Error) -> ObjectError {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => ObjectError::NotFound(name.to_string()),
            E::AlreadyExists { .. } => ObjectError::AlreadyExists(name.to_string()),
            E::Precondition { .. } | E::NotModified { .. } => ObjectError::Precondition(name.to_string()),
            E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
                ObjectError::Denied { op, name: name.to_string(), msg: source.to_string() }
            }
            other => ObjectError::Other(format!("{op} {name}: {other}")),
        }
    }

    /// Writes `name` only if it does not exist (see the module doc: for
    /// content-named objects only).
    pub async fn put_new(&self, name: &str, bytes: Bytes) -> Result<Created, ObjectError> {
        let path = self.path(name);
        let len = bytes.len() as u64;
        let r = self
            .retried("PUT", name, || {
                self.stats.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.store.put_opts(&path, PutPayload::from_bytes(bytes.clone()), PutOptions::from(PutMode::Create))
            })
            .await;
        match r {
            Ok(_) => {
                self.stats.bytes_put.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                Ok(Created::New)
            }
            Err(ObjectError::AlreadyExists(_)) => Ok(Created::Existed),
            Err(e) => Err(e),
        }
    }

    /// A conditional write: create-only (`version` None) or replace the
    /// version given. Returns the new version (its ETag). Not retried on a
    /// lost condition, which the caller must look at.
    pub async fn put_if(&self, name: &str, bytes: Bytes, version: Option<&Version>) -> Result<Version, ObjectError> {
        let path = self.path(name);
        let mode = match version {
            None => PutMode::Create,
            Some(v) => {
                PutMode::Update(object_store::UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() })
            }
        };
        let r = self
            .retried("PUT", name, || {
                self.stats.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.store.put_opts(&path, PutPayload::from_bytes(bytes.clone()), PutOptions::from(mode.clone()))
            })
            .await?;
        Ok(Version { e_tag: r.e_tag, version: r.version })
    }

    /// The whole object and its version.
    pub async fn get_versioned(&self, name: &str) -> Result<(Bytes, Version), ObjectError> {
        let path = self.path(name);
        self.retried("GET", name, || async {
            self.stats.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = self.store.get(&path).await?;
            let v = Version { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
            let b = r.bytes().await?;
            self.stats.bytes_got.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok((b, v))
        })
        .await
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, ObjectError> {
        Ok(self.get_versioned(name).await?.0)
    }

    /// Bytes `range` of an object.
    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, ObjectError> {
        let path = self.path(name);
        self.retried("GET", name, || async {
            self.stats.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let b = self.store.get_range(&path, range.clone()).await?;
            self.stats.bytes_got.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(b)
        })
        .await
    }

    /// Several ranges of one object, fetched `in_flight` at a time, after
    /// merging ranges that lie within `merge_gap` of each other (one GET
    /// for neighbours). The answer is in the order of `ranges`.
    pub async fn get_ranges(
        &self,
        name: &str,
        ranges: &[Range<u64>],
        merge_gap: u64,
        in_flight: usize,
    ) -> Result<Vec<Bytes>, ObjectError> {
        let merged = merge_ranges(ranges, merge_gap);
        let fetched: Vec<Bytes> = futures::stream::iter(merged.iter().cloned())
            .map(|r| self.get_range(name, r))
            .buffered(in_flight.max(1))
            .try_collect()
            .await?;
        Ok(ranges
            .iter()
            .map(|r| {
                let i = merged.partition_point(|m| m.end < r.end);
                let m = &merged[i];
                fetched[i].slice((r.start - m.start) as usize..(r.end - m.start) as usize)
            })
            .collect())
    }

    /// Size of an object, or None if it does not exist.
    pub async fn size(&self, name: &str) -> Result<Option<u64>, ObjectError> {
        let path = self.path(name);
        match self.retried("HEAD", name, || self.store.head(&path)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(ObjectError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object under `dir` (relative to the prefix): (name relative
    /// to the prefix, size), sorted by name.
    pub async fn list(&self, dir: &str) -> Result<Vec<(String, u64)>, ObjectError> {
        let path = self.path(dir);
        let strip = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        let mut out = self
            .retried("LIST", dir, || {
                self.store
                    .list(Some(&path))
                    .map_ok(|m| (m.location.as_ref()[strip..].to_string(), m.size))
                    .try_collect::<Vec<_>>()
            })
            .await?;
        out.sort();
        Ok(out)
    }

    /// Deletes objects (batched by the store: DeleteObjects, 1000 a call,
    /// on S3). A name already gone counts as deleted.
    pub async fn delete(&self, names: &[String]) -> Result<(), ObjectError> {
        if names.is_empty() {
            return Ok(());
        }
        let paths: Vec<Path> = names.iter().map(|n| self.path(n)).collect();
        let label = format!("{} object(s), first {}", names.len(), names[0]);
        self.retried("DELETE", &label, || async {
            let s = futures::stream::iter(paths.clone().into_iter().map(Ok)).boxed();
            let mut out = self.store.delete_stream(s);
            while let Some(r) = out.next().await {
                match r {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await?;
        Ok(())
    }
}

/// An object's version as the store reports it (ETag, version id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// Sorted, merged ranges covering `ranges`, neighbours within `gap` joined.
pub fn merge_ranges(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::faulty::Faulty;
    use super::*;
    use object_store::memory::InMemory;

    fn quick() -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            total: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(5),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn merge_ranges_joins_neighbours_only() {
        assert_eq!(merge_ranges(&[10..20, 0..5, 21..30, 100..110], 1), vec![0..5, 10..30, 100..110]);
        assert_eq!(merge_ranges(&[0..5, 3..4], 0), vec![0..5]);
        assert_eq!(merge_ranges(&[0..5, 6..7], 0), vec![0..5, 6..7]);
        assert_eq!(merge_ranges(&[5..5, 9..9], 0), Vec::<Range<u64>>::new(), "empty ranges are dropped");
    }

    #[test]
    fn create_only_put_is_idempotent_and_never_overwrites() {
        rt().block_on(async {
            let o = Objects::new(Arc::new(InMemory::new()), "srv1", quick());
            assert_eq!(o.put_new("packs/a", Bytes::from_static(b"one")).await.unwrap(), Created::New);
            assert_eq!(o.put_new("packs/a", Bytes::from_static(b"two")).await.unwrap(), Created::Existed);
            assert_eq!(&o.get("packs/a").await.unwrap()[..], b"one", "create-only: the first write stays");
            assert_eq!(o.list("packs").await.unwrap(), vec![("packs/a".to_string(), 3)]);
            assert_eq!(o.size("packs/a").await.unwrap(), Some(3));
            assert_eq!(o.size("packs/b").await.unwrap(), None);
            assert!(matches!(o.get("packs/b").await, Err(ObjectError::NotFound(n)) if n == "packs/b"));
            o.delete(&["packs/a".into(), "packs/never".into()]).await.unwrap();
            assert!(o.list("packs").await.unwrap().is_empty());
        });
    }

    /// A PUT whose answer is lost after the store kept it: the retry finds
    /// the object there and reports it stored, once, with no error.
    #[test]
    fn a_lost_answer_is_retried_into_success() {
        rt().block_on(async {
            let f = Faulty::new();
            f.lose_answer_of_put(1);
            let o = Objects::new(f.clone(), "", quick());
            assert_eq!(o.put_new("p", Bytes::from_static(b"data")).await.unwrap(), Created::Existed);
            assert_eq!(&o.get("p").await.unwrap()[..], b"data");
            assert_eq!(f.puts(), 2);
            // A PUT that failed before the store kept it: retried, written.
            f.fail_put(3);
            assert_eq!(o.put_new("q", Bytes::from_static(b"more")).await.unwrap(), Created::New);
            assert_eq!(f.puts(), 4);
            assert_eq!(o.stats().retries.load(std::sync::atomic::Ordering::Relaxed), 2);
        });
    }

    /// A store that stays down: the call gives up after the policy's total
    /// time with an error that says what was tried, not at once and not never.
    #[test]
    fn a_store_that_stays_down_fails_within_the_bound() {
        rt().block_on(async {
            let f = Faulty::new();
            f.set_down(true);
            let policy = RetryPolicy { total: Duration::from_millis(300), ..quick() };
            let o = Objects::new(f.clone(), "", policy);
            let t = Instant::now();
            let e = o.put_new("p", Bytes::from_static(b"x")).await.unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
            match &e {
                ObjectError::Unavailable { attempts, .. } => assert!(*attempts > 2, "{e}"),
                e => panic!("{e}"),
            }
            assert!(e.to_string().contains("repeat"), "{e}");
            f.set_down(false);
            assert_eq!(o.put_new("p", Bytes::from_static(b"x")).await.unwrap(), Created::New, "works once it is back");
        });
    }

    /// Slow GETs do not serialise a restore: 16 ranges at 16 in flight
    /// take about one delay, not sixteen.
    #[test]
    fn ranged_gets_run_in_parallel_and_come_back_in_order() {
        rt().block_on(async {
            let f = Faulty::new();
            let o = Objects::new(f.clone(), "x", quick());
            let data: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
            o.put_new("pack", Bytes::from(data.clone())).await.unwrap();
            f.set_get_delay(Duration::from_millis(200));
            let ranges: Vec<Range<u64>> = (0..16).rev().map(|i| i * 4000..i * 4000 + 100).collect();
            let t = Instant::now();
            let got = o.get_ranges("pack", &ranges, 0, 16).await.unwrap();
            let took = t.elapsed();
            for (r, g) in ranges.iter().zip(&got) {
                assert_eq!(&g[..], &data[r.start as usize..r.end as usize]);
            }
            assert!(took < Duration::from_millis(1600), "16 slow GETs took {took:?}: not in parallel");
            // Adjacent ranges are one GET.
            let before = f.gets();
            let got = o.get_ranges("pack", &[0..10, 10..20, 20..30], 0, 16).await.unwrap();
            assert_eq!((f.gets() - before, got.concat()), (1, data[..30].to_vec()));
        });
    }

    #[test]
    fn denied_and_missing_are_not_retried() {
        rt().block_on(async {
            let f = Faulty::new();
            f.set_denied(true);
            let o = Objects::new(f.clone(), "", quick());
            let e = o.put_new("p", Bytes::from_static(b"x")).await.unwrap_err();
            assert!(matches!(e, ObjectError::Denied { .. }) && e.to_string().contains("credentials"), "{e}");
            assert_eq!(f.puts(), 1);
        });
    }
}
