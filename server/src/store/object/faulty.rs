//! A fault-injecting [`ObjectStore`] over `InMemory`, for the unit tests:
//! fail the Nth PUT (before the store keeps it), lose the answer of the
//! Nth PUT (after), slow GETs and PUTs, a store that is down or denies everything.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};

#[derive(Debug, Default)]
pub struct Faulty {
    inner: InMemory,
    puts: AtomicU64,
    gets: AtomicU64,
    fail_put: AtomicU64,
    lose_put: AtomicU64,
    down: AtomicBool,
    denied: AtomicBool,
    get_delay: Mutex<Duration>,
    put_delay: Mutex<Duration>,
}

fn generic(msg: &str) -> object_store::Error {
    object_store::Error::Generic { store: "faulty", source: msg.to_string().into() }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Faulty")
    }
}

impl Faulty {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// The `n`th PUT (counting from 1, all PUTs so far included) fails
    /// before anything is stored.
    pub fn fail_put(&self, n: u64) {
        self.fail_put.store(n, Ordering::SeqCst);
    }
    /// The `n`th PUT is stored, then answered with an error.
    pub fn lose_answer_of_put(&self, n: u64) {
        self.lose_put.store(n, Ordering::SeqCst);
    }
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    pub fn set_denied(&self, denied: bool) {
        self.denied.store(denied, Ordering::SeqCst);
    }
    pub fn set_get_delay(&self, d: Duration) {
        *self.get_delay.lock().unwrap() = d;
    }
    /// Every PUT takes this long before it is stored (a slow bucket).
    pub fn set_put_delay(&self, d: Duration) {
        *self.put_delay.lock().unwrap() = d;
    }
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }
    fn gate(&self, path: &Path) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(generic("connection refused"));
        }
        if self.denied.load(Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied { path: path.to_string(), source: "403".into() });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
        self.gate(location)?;
        if self.fail_put.load(Ordering::SeqCst) == n {
            return Err(generic("injected: PUT failed"));
        }
        let d = *self.put_delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        let r = self.inner.put_opts(location, payload, opts).await?;
        if self.lose_put.load(Ordering::SeqCst) == n {
            return Err(generic("injected: PUT stored, answer lost"));
        }
        Ok(r)
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.gate(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.gate(location)?;
        let d = *self.get_delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        if self.down.load(Ordering::SeqCst) {
            return futures::stream::once(async { Err(generic("connection refused")) }).boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if self.down.load(Ordering::SeqCst) {
            return futures::stream::once(async { Err(generic("connection refused")) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.gate(prefix.unwrap_or(&Path::from("")))?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.gate(from)?;
        self.inner.copy_opts(from, to, options).await
    }
}
