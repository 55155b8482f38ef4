//! [`S3Chunks`]: chunk data in pack objects in an S3-compatible bucket
//! (`[storage] backend = "s3"`); every other record stays in the local
//! RocksDB, and so do the chunk locations.
//!
//! # Layout and order of writes
//! * Chunks (already re-hashed by the server, see `VerifiedChunk`) are
//!   appended to one open pack in memory ([`super::pack`]); the pack gets
//!   a number when opened (`packs_next` in `meta`, synced before use, so a
//!   number is never given twice, even after a crash).
//! * A chunk's location, `chunk_loc`: (pack number, offset, length), is a
//!   row of the put's own metadata batch (`stage_data`).
//! * A pack is sealed when it reaches `pack_size` and at every commit
//!   (`persist`), and PUT (create-only, name `packs/<blake3>`) in the
//!   background ([`upload`]: a few in flight, a bounded queue); only after
//!   the PUT succeeded is its row in `packs` (number -> name) written,
//!   synced. So a chunk counts as stored (`has_data`) only when its pack is
//!   in the bucket, or still in this process's memory. A crash loses the
//!   packs in memory: their chunks' locations name a number with no `packs`
//!   row, `has_data` says "missing" and the next push uploads them again.
//!   A crash between a PUT and its `packs` row leaves an orphan pack, which
//!   GC deletes.
//! * A commit: its tree chunks go into a tree pack and get a local copy
//!   ([`trees`]); every pack sealed before it is PUT (`persist` waits);
//!   its snapshot record object is PUT ([`records`]); then the metadata's
//!   synced batch. Acknowledged means in the bucket, record included, so
//!   `rebuild` ([`rebuild`]) brings back every acknowledged snapshot.
//! * Reads: memory, the tree copy, the local cache, then ranged GETs, many
//!   at once for a batch ([`fetch`]).
//! * GC of packs ([`gc`]): dead packs deleted, sparse ones rewritten, the
//!   rewritten ones deleted by the next run.
//! * One server per bucket prefix: the `lease` object (see
//!   `object::lease`), renewed in the background; a lost lease stops writes.
//!
//! * The scrub ([`scrub`]) reads packs whole, sequentially, from the
//!   bucket; a bad pack is copied aside to `quarantine/`.
//!
//! # Not built yet (issue 18)
//! Periodic metadata checkpoints in the bucket; pack liveness kept
//! incrementally (GC counts it in one pass over `chunk_loc`, metadata
//! only).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bkp_common::{ChunkId, SnapshotId};

use super::object::config::StorageConfig;
use super::object::lease::{Lease, TakeOver, DEFAULT_TTL};
use super::object::{ObjectError, Objects, RetryPolicy};
use super::pack::{Kind, PackWriter};
use super::rocks::{Batch, Db};
use super::{schema, space, ChunkStore, StoreError, VerifiedChunk};

mod fetch;
mod gc;
pub mod rebuild;
pub mod records;
mod rows;
mod scrub;
mod trees;
mod upload;
use rows::obj_err;
pub use rows::{pack_object, Location, PackRecord};
use upload::{OpenPack, Shared};

/// What one batch read asks the bucket for at most (a restore's fetch
/// takes this much at a time; see `fetch`).
pub const READ_BATCH_BYTES: usize = 8 << 20;

/// Where a holder id is kept (beside `db/`): the same data directory takes
/// its own lease back at once after a crash.
pub const HOLDER_FILE: &str = "s3-holder";

pub struct S3Chunks {
    db: Arc<Db>,
    objects: Objects,
    /// Object I/O runs here, whatever thread calls (the store's callers
    /// are blocking threads, and some run inside another runtime).
    rt: Option<tokio::runtime::Runtime>,
    pack_size: u64,
    /// GC repacks a pack whose live bytes are below this share.
    repack_live_percent: u8,
    unreachable_alert_secs: u64,
    /// Open and sealed packs, the pack table, the upload tasks' state.
    up: Arc<Shared>,
    cache: RangeCache,
    lease: Arc<Mutex<Option<Lease>>>,
    lease_lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

/// Runs a future on `rt` and waits for it from any thread (a runtime's
/// `block_on` refuses to run inside another runtime).
fn run_on<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("object store task ended without an answer")
}

impl S3Chunks {
    /// Opens the bucket side: takes the lease (refusing when another server
    /// holds it) and loads the pack table.
    pub fn open(db: Arc<Db>, cfg: &StorageConfig, data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_taking_over(db, cfg, data_dir, TakeOver::Never)
    }

    /// As [`Self::open`]; `take_over` may take the lease of a holder that
    /// stopped renewing it (`rebuild --take-over-lease`).
    pub fn open_taking_over(
        db: Arc<Db>,
        cfg: &StorageConfig,
        data_dir: &Path,
        take_over: TakeOver,
    ) -> Result<Self, StoreError> {
        let d = RetryPolicy::default();
        let retry = RetryPolicy {
            total: Duration::from_secs(cfg.retry_secs),
            attempt_timeout: d.attempt_timeout.min(Duration::from_secs(cfg.retry_secs)),
            ..d
        };
        let objects = Objects::s3(cfg, retry).map_err(|e| obj_err(cfg.bucket.as_deref().unwrap_or_default(), e))?;
        Self::open_inner(db, objects, cfg, data_dir, take_over)
    }

    /// As [`Self::open`], over any object store (tests).
    pub fn open_on(db: Arc<Db>, objects: Objects, cfg: &StorageConfig, data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_inner(db, objects, cfg, data_dir, TakeOver::Never)
    }

    fn open_inner(
        db: Arc<Db>,
        objects: Objects,
        cfg: &StorageConfig,
        data_dir: &Path,
        take_over: TakeOver,
    ) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bkp-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Open(data_dir.display().to_string(), format!("object store runtime: {e}")))?;
        let holder = holder_id(data_dir)?;
        let o = objects.clone();
        let lease =
            run_on(
                &rt,
                async move { Lease::acquire_with(&o, &holder, DEFAULT_TTL, SystemTime::now(), take_over).await },
            )
            .map_err(|e| StoreError::Open(data_dir.display().to_string(), e.to_string()))?;
        let cache_dir = cfg.cache_dir.clone().unwrap_or_else(|| data_dir.join("cache"));
        let up = Arc::new(Shared {
            db: db.clone(),
            objects: objects.clone(),
            handle: rt.handle().clone(),
            staging: Default::default(),
            changed: Default::default(),
            packs: Default::default(),
        });
        let mut me = Self {
            db,
            objects,
            rt: Some(rt),
            pack_size: cfg.pack_size,
            repack_live_percent: cfg.repack_live_percent,
            unreachable_alert_secs: cfg.unreachable_alert_secs,
            up,
            cache: RangeCache::open(cache_dir, cfg.cache_size)?,
            lease: Arc::new(Mutex::new(Some(lease))),
            lease_lost: Default::default(),
            stop: Default::default(),
            renewer: None,
        };
        me.load_packs()?;
        me.start_renewer();
        Ok(me)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime until drop")
    }

    fn load_packs(&self) -> Result<(), StoreError> {
        let db = self.db.raw();
        let mut packs = self.up.packs.write().expect("packs lock");
        for item in db.iterator_cf(self.db.cf(schema::CF_PACKS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StoreError::Db(e.into_string()))?;
            let num = schema::pack_num(&k).ok_or_else(|| StoreError::Corrupt("packs key".into()))?;
            let rec = PackRecord::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("packs row {num}")))?;
            packs.insert(num, rec);
        }
        Ok(())
    }

    /// Renews the lease a third of its time to live apart; a renewal that
    /// finds another holder stops this server's writes.
    fn start_renewer(&mut self) {
        let (lease, lost, stop) = (self.lease.clone(), self.lease_lost.clone(), self.stop.clone());
        let handle = self.rt().handle().clone();
        let every = self.lease.lock().expect("lease lock").as_ref().map_or(DEFAULT_TTL / 3, |l| l.renew_every());
        self.renewer = Some(std::thread::spawn(move || {
            let mut last = std::time::Instant::now();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() < every {
                    continue;
                }
                last = std::time::Instant::now();
                let Some(mut l) = lease.lock().expect("lease lock").take() else { return };
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let r = l.renew(SystemTime::now()).await;
                    let _ = tx.send((l, r));
                });
                let Ok((l, r)) = rx.recv() else { return };
                match r {
                    Ok(()) => *lease.lock().expect("lease lock") = Some(l),
                    Err(e @ super::object::lease::LeaseError::Lost { .. }) => {
                        tracing::error!("{e}");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("lease renewal failed (tried again shortly): {e}");
                        *lease.lock().expect("lease lock") = Some(l);
                        last = std::time::Instant::now() - every + Duration::from_secs(5);
                    }
                }
            }
        }));
    }

    fn check_lease(&self) -> Result<(), StoreError> {
        if self.lease_lost.load(Ordering::SeqCst) {
            return Err(StoreError::Db(
                "this server lost its lease on the bucket prefix to another server and no longer writes there; \
                 see the log, and restart it only if it should own the prefix"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A fresh pack number, synced before any row names it.
    fn next_pack_num(&self) -> Result<u64, StoreError> {
        let db = self.db.raw();
        let meta = self.db.cf(schema::CF_META);
        let cur = db
            .get_cf(meta, schema::META_PACKS_NEXT)
            .map_err(|e| StoreError::Db(e.into_string()))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(1, u64::from_le_bytes);
        let mut b = Batch::new(&self.db);
        b.put(schema::CF_META, schema::META_PACKS_NEXT, (cur + 1).to_le_bytes());
        self.db.write_synced(b)?;
        Ok(cur)
    }

    fn location(&self, id: &ChunkId) -> Result<Option<Location>, StoreError> {
        let v = self
            .db
            .raw()
            .get_cf(self.db.cf(schema::CF_CHUNK_LOC), id.as_bytes())
            .map_err(|e| StoreError::Db(e.into_string()))?;
        v.map(|v| Location::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("chunk_loc of {}", id.short()))))
            .transpose()
    }

    /// The blob from a pack still in memory, if it is there.
    fn staged_blob(&self, loc: &Location) -> Option<Vec<u8>> {
        let st = self.up.lock();
        let range = loc.offset as usize..loc.offset as usize + loc.len as usize;
        if let Some(op) = st.open.iter().flatten().find(|op| op.num == loc.pack) {
            return Some(
                op.w.blob(&super::pack::Entry { id: ChunkId::from_bytes([0; 32]), offset: loc.offset, len: loc.len })
                    .to_vec(),
            );
        }
        st.sealed.iter().find(|(n, _)| *n == loc.pack).and_then(|(_, p)| p.bytes.get(range).map(<[u8]>::to_vec))
    }

    /// The blob without the bucket: from a pack still in memory, the local
    /// copy of a tree chunk, or the local cache.
    fn local_blob(&self, id: &ChunkId, loc: &Location) -> Option<Vec<u8>> {
        self.staged_blob(loc).or_else(|| self.tree_copy(id)).or_else(|| self.cache.get(id, loc))
    }

    /// Packs in this process's memory: their chunks read from there.
    fn staged_nums(&self) -> Vec<u64> {
        let st = self.up.lock();
        st.open.iter().flatten().map(|o| o.num).chain(st.sealed.iter().map(|(n, _)| *n)).collect()
    }

    /// Packs in the bucket (for tests and reports).
    pub fn pack_count(&self) -> usize {
        self.up.packs.read().expect("packs lock").len()
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    fn bucket_err(&self, e: ObjectError) -> StoreError {
        obj_err(self.objects.bucket(), e)
    }
}

fn holder_id(data_dir: &Path) -> Result<String, StoreError> {
    let p = data_dir.join(HOLDER_FILE);
    if let Ok(s) = std::fs::read_to_string(&p) {
        let s = s.trim();
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(s.to_string());
        }
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&p)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| StoreError::Open(p.display().to_string(), e.to_string()))?;
    Ok(id)
}

impl ChunkStore for S3Chunks {
    fn has_data(&self, ids: &[&ChunkId], _sorted: bool) -> Result<Vec<bool>, StoreError> {
        let cf = self.db.cf(schema::CF_CHUNK_LOC);
        let found = self.db.raw().multi_get_cf(ids.iter().map(|id| (cf, id.as_bytes().to_vec())));
        let staged = self.staged_nums();
        let packs = self.up.packs.read().expect("packs lock");
        ids.iter()
            .zip(found)
            .map(|(id, v)| {
                let Some(v) = v.map_err(|e| StoreError::Db(e.into_string()))? else { return Ok(false) };
                let loc =
                    Location::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("chunk_loc of {}", id.short())))?;
                Ok(packs.contains_key(&loc.pack) || staged.contains(&loc.pack))
            })
            .collect()
    }

    fn stage_data(&self, chunks: &[&VerifiedChunk], batch: &mut Batch<'_>) -> Result<(), StoreError> {
        self.check_lease()?;
        // A pack that failed to upload is tried again first; while the
        // bucket refuses, no more data piles up in memory.
        let failed = self.up.lock().failed();
        if !failed.is_empty() {
            self.up.wait_stored(&failed)?;
        }
        let mut st = self.up.lock();
        for c in chunks {
            let kind = Kind::Data;
            let slot = upload::slot(kind);
            if st.open[slot].is_none() {
                st.open[slot] = Some(OpenPack { num: self.next_pack_num()?, w: PackWriter::new(kind) });
            }
            let op = st.open[slot].as_mut().expect("opened above");
            let e = op.w.add(&c.id, &c.blob);
            let loc = Location { pack: op.num, offset: e.offset, len: e.len };
            batch.put(schema::CF_CHUNK_LOC, c.id.as_bytes(), loc.encode());
            if op.w.len() >= self.pack_size {
                st.seal(kind);
                self.up.kick(&mut st);
            }
        }
        // The put that sealed a pack returns now; only a full queue waits.
        self.up.make_room(st)
    }

    fn stage_delete(&self, ids: &[ChunkId], batch: &mut Batch<'_>) -> Result<(), StoreError> {
        for id in ids {
            batch.delete(schema::CF_CHUNK_LOC, id.as_bytes());
            batch.delete(schema::CF_TREE_CHUNKS, id.as_bytes());
        }
        Ok(())
    }

    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(loc) = self.location(id)? else { return Ok(None) };
        if let Some(b) = self.local_blob(id, &loc) {
            return Ok(Some(b));
        }
        let Some(rec) = self.up.packs.read().expect("packs lock").get(&loc.pack).copied() else {
            // A pack lost in a crash before its upload: the chunk is missing.
            return Ok(None);
        };
        let o = self.objects.clone();
        let name = pack_object(&rec.id);
        let range = loc.offset..loc.offset + loc.len as u64;
        match run_on(self.rt(), async move { o.get_range(&name, range).await }) {
            Ok(b) => {
                self.cache.put(id, &loc, &b);
                Ok(Some(b.to_vec()))
            }
            Err(ObjectError::NotFound(name)) => {
                tracing::error!(chunk = %id.short(), pack = %name, "pack missing from the bucket: chunk treated as missing");
                Ok(None)
            }
            Err(e) => Err(self.bucket_err(e)),
        }
    }

    fn chunk_blobs(&self, ids: &[ChunkId], max_bytes: usize) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.batch_read(ids, max_bytes)
    }

    fn read_batch_bytes(&self) -> usize {
        READ_BATCH_BYTES
    }

    fn keep_trees(&self, trees: &[ChunkId]) -> Result<(), StoreError> {
        self.check_lease()?;
        self.keep_tree_chunks(trees)
    }

    fn record_snapshot(&self, id: &SnapshotId, record: &[u8]) -> Result<(), StoreError> {
        self.check_lease()?;
        self.put_record(id, record)
    }

    fn forget_snapshot(&self, id: &SnapshotId) {
        self.delete_record(id)
    }

    fn persist(&self) -> Result<(), StoreError> {
        self.check_lease()?;
        let nums: Vec<u64> = {
            let mut st = self.up.lock();
            st.seal(Kind::Data);
            st.seal(Kind::Tree);
            self.up.kick(&mut st);
            st.sealed.iter().map(|(n, _)| *n).collect()
        };
        self.up.wait_stored(&nums)
    }

    /// None at chunk level: what a crash leaves in the bucket is whole
    /// packs no `packs` row names, which the (not yet built) pack GC lists.
    fn orphan_candidates(&self, _after: Option<&ChunkId>, _limit: usize) -> Result<Vec<ChunkId>, StoreError> {
        Ok(Vec::new())
    }

    fn gc_packs(&self, fence: &super::Fence<'_>) -> Result<super::PackGcStats, StoreError> {
        self.check_lease()?;
        self.pack_gc(fence)
    }

    fn containers(&self) -> Result<Option<Vec<super::Container>>, StoreError> {
        Ok(Some(self.scrub_list()))
    }

    fn scrub_container(
        &self,
        c: &super::Container,
        check: &mut super::ContainerCheck<'_>,
    ) -> Result<super::ContainerScrub, StoreError> {
        self.scrub_pack(c, check)
    }

    /// Nothing more: `gc_packs` deleted the dead packs.
    fn reclaim_space(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend_stats(&self) -> Option<super::BackendStats> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.objects.stats();
        let packs = self.up.packs.read().expect("packs lock");
        Some(super::BackendStats {
            puts: s.puts.load(Relaxed),
            gets: s.gets.load(Relaxed),
            errors: s.errors.load(Relaxed),
            retries: s.retries.load(Relaxed),
            bytes_put: s.bytes_put.load(Relaxed),
            bytes_got: s.bytes_got.load(Relaxed),
            upload_queue_bytes: self.up.lock().queued_bytes(),
            packs: packs.len() as u64,
            pack_bytes: packs.values().map(|r| r.len).sum(),
            unreachable_secs: s.unreachable_for().map(|d| d.as_secs()),
            unreachable_alert_secs: self.unreachable_alert_secs,
        })
    }

    /// The local database directory (metadata and locations), reserve left out.
    fn disk_bytes(&self) -> Result<u64, StoreError> {
        let rd = std::fs::read_dir(self.db.dir()).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != space::RESERVE_FILE)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum())
    }
}

impl Drop for S3Chunks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        // Packs still in memory hold no acknowledged snapshot's data (a
        // commit uploads them first): uploads in flight get a few seconds
        // to end (and be recorded), the rest are dropped.
        self.up.wait_in_flight(Duration::from_secs(10));
        if let Some(l) = self.lease.lock().expect("lease lock").take() {
            if let Err(e) = run_on(self.rt(), async move { l.release().await }) {
                tracing::warn!("lease not released ({e}): another server may start after it expires");
            }
        }
        if let Some(rt) = self.rt.take() {
            // (Safe inside another runtime, unlike a blocking shutdown.)
            rt.shutdown_background();
        }
    }
}

/// A bounded local cache of chunk blobs read from the bucket: one file per
/// chunk and location, the oldest evicted past `cap` bytes. Keyed by the
/// location too: a chunk quarantined and uploaded again (to a new place)
/// is never served from what was read at its old one. A lost or damaged
/// file is only a miss (every reader checks a blob against its id).
struct RangeCache {
    dir: PathBuf,
    cap: u64,
    state: Mutex<(u64, std::collections::VecDeque<(PathBuf, u64)>)>,
}

impl RangeCache {
    fn open(dir: PathBuf, cap: u64) -> Result<Self, StoreError> {
        // Starts empty: what an earlier run cached is not counted, so drop it.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Open(dir.display().to_string(), e.to_string()))?;
        Ok(Self { dir, cap, state: Default::default() })
    }

    fn path(&self, id: &ChunkId, loc: &Location) -> PathBuf {
        self.dir.join(format!("{}-{}-{}", id.to_hex(), loc.pack, loc.offset))
    }

    fn get(&self, id: &ChunkId, loc: &Location) -> Option<Vec<u8>> {
        std::fs::read(self.path(id, loc)).ok()
    }

    fn put(&self, id: &ChunkId, loc: &Location, blob: &[u8]) {
        if blob.len() as u64 > self.cap / 4 {
            return;
        }
        let path = self.path(id, loc);
        if std::fs::write(&path, blob).is_err() {
            return;
        }
        let mut st = self.state.lock().expect("cache lock");
        st.0 += blob.len() as u64;
        st.1.push_back((path, blob.len() as u64));
        while st.0 > self.cap {
            let Some((old, len)) = st.1.pop_front() else { break };
            let _ = std::fs::remove_file(old);
            st.0 -= len;
        }
    }
}

/// The store `[storage]` asks for: chunk data local (the default) or in
/// the bucket, metadata in the RocksDB under `db_dir` either way. A data
/// directory remembers its backend (`meta` `storage_backend`) and refuses
/// the other one: a command run without the config that names the bucket
/// would otherwise find every chunk missing (and a verify would report
/// every snapshot damaged).
pub fn open_store(
    db_dir: &Path,
    cache_bytes: usize,
    storage: &StorageConfig,
    data_dir: &Path,
) -> Result<super::rocks::RocksStore, StoreError> {
    use super::object::config::Backend;
    // Only s3 is marked: `bkp-server init` opens every new directory with
    // the defaults (local), which must not claim it. The database opens
    // once; the marker is read from it before the bucket is reached (and
    // its lease taken).
    let want: &[u8] = if storage.backend == Backend::S3 { b"s3" } else { b"local" };
    super::rocks::RocksStore::open_with(db_dir, cache_bytes, |db| {
        let had = db.storage_backend()?;
        match &had {
            Some(had) if had != want && had.as_slice() != b"local" => {
                return Err(StoreError::Open(
                    data_dir.display().to_string(),
                    format!(
                        "this data directory keeps its chunk data in backend {:?}, but [storage] says {:?}: give \
                         the command the server's config (`--config FILE`, or DATA/server.toml) with its [storage] \
                         section",
                        String::from_utf8_lossy(had),
                        String::from_utf8_lossy(want)
                    ),
                ))
            }
            None if storage.backend == Backend::S3 && db.has_chunk_meta()? => {
                return Err(StoreError::Open(
                    data_dir.display().to_string(),
                    "this data directory holds chunk data on local disk (backend \"local\"); an s3 backend starts \
                     with a new data directory (moving a store to a bucket is not built yet)"
                        .into(),
                ))
            }
            _ => {}
        }
        Ok(match storage.backend {
            Backend::Local => Arc::new(super::rocks::LocalChunks::new(db)) as Arc<dyn ChunkStore>,
            Backend::S3 => {
                let data = S3Chunks::open(db.clone(), storage, data_dir)?;
                if had.is_none() {
                    db.mark_storage_backend(want)?;
                }
                Arc::new(data)
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::object::faulty::Faulty;
    use crate::store::rocks::RocksStore;
    use bkp_common::blob;

    pub(super) fn chunk(seed: u64, len: usize) -> VerifiedChunk {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        VerifiedChunk::verify(ChunkId::of(&data), blob::encode(&data, 3)).unwrap()
    }

    pub(super) fn quick() -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            total: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(5),
        }
    }

    fn cfg() -> StorageConfig {
        StorageConfig { pack_size: 1 << 20, cache_size: 64 << 20, ..Default::default() }
    }

    pub(super) fn open(data: &Path, store: &Arc<Faulty>) -> Result<RocksStore, StoreError> {
        let objects = Objects::new(store.clone(), "srv", quick());
        RocksStore::open_with(&data.join("db"), 8 << 20, |db| {
            Ok(Arc::new(S3Chunks::open_on(db, objects, &cfg(), data)?) as Arc<dyn ChunkStore>)
        })
    }

    pub(super) fn packs_in_bucket(f: &Arc<Faulty>) -> usize {
        let o = Objects::new(f.clone(), "srv", quick());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(o.list("packs")).unwrap().len()
    }

    /// Chunks go into one pack, which is PUT when full (not per chunk) and
    /// at persist; reads come back byte for byte from memory before the
    /// upload and from the bucket (ranged GETs) after a restart.
    #[test]
    fn packs_fill_upload_and_read_back_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let chunks: Vec<VerifiedChunk> = (0..5).map(|i| chunk(i, 300 << 10)).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| *c.id()).collect();
        {
            let s = open(dir.path(), &f).unwrap();
            let lease_puts = f.puts();
            s.put_chunks("h", &chunks[..2]).unwrap();
            assert_eq!(f.puts(), lease_puts, "600 KiB: still in the open pack");
            assert_eq!(s.host_has("h", &ids[..2]).unwrap(), [true, true], "readable from memory");
            assert_eq!(s.chunk_blob(&ids[0]).unwrap().as_deref(), Some(&chunks[0].blob[..]));
            s.put_chunks("h", &chunks[2..]).unwrap();
            assert!(f.puts() <= lease_puts + 1, "at most one PUT (in the background) when the pack passed 1 MiB");
            ChunkStore::persist(&s).unwrap();
            assert_eq!(f.puts(), lease_puts + 2, "the rest at persist");
            ChunkStore::persist(&s).unwrap();
            assert_eq!(f.puts(), lease_puts + 2, "nothing open, nothing put");
        }
        assert_eq!(packs_in_bucket(&f), 2);
        let s = open(dir.path(), &f).unwrap();
        assert_eq!(s.host_has("h", &ids).unwrap(), [true; 5]);
        let gets = f.gets();
        for c in &chunks {
            assert_eq!(s.chunk_blob(c.id()).unwrap().as_deref(), Some(&c.blob[..]));
        }
        assert_eq!(f.gets() - gets, 5, "one ranged GET per chunk");
        s.chunk_blob(&ids[0]).unwrap();
        assert_eq!(f.gets() - gets, 5, "the second read is served by the local cache");
    }

    /// The put that fills a pack returns while the pack's PUT is still on
    /// its way (a slow bucket), its chunks readable from memory; a commit
    /// (persist) returns only once that pack is in the bucket.
    #[test]
    fn a_full_pack_uploads_in_the_background_and_persist_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let s = open(dir.path(), &f).unwrap();
        let chunks: Vec<VerifiedChunk> = (0..4).map(|i| chunk(40 + i, 300 << 10)).collect();
        f.set_put_delay(Duration::from_millis(400));
        let t = std::time::Instant::now();
        s.put_chunks("h", &chunks).unwrap();
        assert!(t.elapsed() < Duration::from_millis(300), "the put waited for its pack's upload: {:?}", t.elapsed());
        assert_eq!(packs_in_bucket(&f), 0, "the PUT is still on its way");
        assert_eq!(s.chunk_blob(chunks[0].id()).unwrap().as_deref(), Some(&chunks[0].blob[..]));
        assert_eq!(s.host_has("h", &[*chunks[3].id()]).unwrap(), [true]);
        ChunkStore::persist(&s).unwrap();
        assert_eq!(packs_in_bucket(&f), 1, "persist returned with the full pack in the bucket");
        assert_eq!(s.backend_stats().unwrap().upload_queue_bytes, 0);
    }

    /// More sealed packs than the queue holds: the put that seals one more
    /// waits until an upload ends, so memory stays bounded, and every pack
    /// ends up in the bucket.
    #[test]
    fn a_full_upload_queue_holds_puts_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let s = open(dir.path(), &f).unwrap();
        f.set_put_delay(Duration::from_millis(150));
        let n = (upload::MAX_SEALED + 4) as u64;
        for i in 0..n {
            // Each put fills (and seals) one 1 MiB pack.
            s.put_chunks("h", &[chunk(100 + i, 1 << 20)]).unwrap();
            let queued = s.backend_stats().unwrap().upload_queue_bytes;
            assert!(queued <= upload::MAX_SEALED as u64 * ((1 << 20) + 4096), "queue grew past its bound: {queued}");
        }
        ChunkStore::persist(&s).unwrap();
        assert_eq!(packs_in_bucket(&f), n as usize);
    }

    /// A batch read after a restart: every blob byte for byte, in order,
    /// neighbours of a pack merged into few GETs; the batch stops at its
    /// byte budget and at the first chunk whose pack is gone.
    #[test]
    fn batch_reads_merge_neighbours_and_stop_at_a_missing_pack() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let chunks: Vec<VerifiedChunk> = (0..24).map(|i| chunk(200 + i, 100 << 10)).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| *c.id()).collect();
        {
            let s = open(dir.path(), &f).unwrap();
            s.put_chunks("h", &chunks).unwrap();
            ChunkStore::persist(&s).unwrap();
        }
        let s = open(dir.path(), &f).unwrap();
        let gets = f.gets();
        let got = s.chunk_blobs(&ids, 64 << 20).unwrap();
        assert_eq!(got.len(), ids.len());
        for (c, b) in chunks.iter().zip(&got) {
            assert_eq!(b.as_deref(), Some(&c.blob[..]));
        }
        // 2.4 MiB in 1 MiB packs: three packs, one merged GET each.
        assert_eq!(f.gets() - gets, 3, "one GET per pack");
        assert_eq!(s.chunk_blobs(&ids, 250 << 10).unwrap().len(), 3, "the batch stops once its budget is read");
        // A pack deleted from the bucket: its first chunk ends the answer.
        drop(s);
        let o = Objects::new(f.clone(), "srv", quick());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let packs = rt.block_on(o.list("packs")).unwrap();
        let mut victim = None;
        for (name, _) in &packs {
            let bytes = rt.block_on(o.get(name)).unwrap();
            let (_, entries) = crate::store::pack::parse(&bytes).unwrap();
            if entries.iter().any(|e| e.id == ids[12]) {
                victim = Some(name.clone());
            }
        }
        rt.block_on(o.delete(&[victim.unwrap()])).unwrap();
        let s = open(dir.path(), &f).unwrap();
        let got = s.chunk_blobs(&ids[10..], 64 << 20).unwrap();
        assert!(got.last().unwrap().is_none(), "the missing chunk is the last item");
        assert!(got[..got.len() - 1].iter().all(Option::is_some));
        assert!(got.len() <= 3, "{} items: chunk 12 or an earlier one of its pack ends it", got.len());
    }

    fn snapshot_of(tree: &[ChunkId]) -> bkp_common::snapshot::Snapshot {
        bkp_common::snapshot::Snapshot {
            host: "h".into(),
            name: "files".into(),
            time_ns: 1,
            kind: bkp_common::snapshot::SnapshotKind::Tree,
            stats: Default::default(),
            tree: tree.to_vec(),
            client: "test".into(),
        }
    }

    /// A commit puts its tree chunks in a tree pack of their own (kind 2)
    /// and keeps a local copy: after a restart, with the bucket down, the
    /// trees still read (commit checks, GC marking and drills need no
    /// bucket), while data chunks report the bucket's error. A second
    /// commit of the same tree writes no second tree pack.
    #[test]
    fn commits_keep_trees_in_tree_packs_and_locally() {
        use crate::store::pack::{self, Kind};
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let data: Vec<VerifiedChunk> = (0..3).map(|i| chunk(300 + i, 50 << 10)).collect();
        let trees: Vec<VerifiedChunk> = (0..2).map(|i| chunk(400 + i, 20 << 10)).collect();
        let tree_ids: Vec<ChunkId> = trees.iter().map(|c| *c.id()).collect();
        {
            let s = open(dir.path(), &f).unwrap();
            s.put_chunks("h", &data).unwrap();
            s.put_chunks("h", &trees).unwrap();
            s.commit_snapshot(&snapshot_of(&tree_ids), None).unwrap();
            assert_eq!(packs_in_bucket(&f), 2, "one data pack, one tree pack");
            let mut t = snapshot_of(&tree_ids);
            t.time_ns = 2;
            s.commit_snapshot(&t, None).unwrap();
            assert_eq!(packs_in_bucket(&f), 2, "the trees have their copy: no second tree pack");
        }
        let o = Objects::new(f.clone(), "srv", quick());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut kinds = Vec::new();
        for (name, _) in rt.block_on(o.list("packs")).unwrap() {
            let (kind, entries) = pack::parse(&rt.block_on(o.get(&name)).unwrap()).unwrap();
            if kind == Kind::Tree {
                let mut ids: Vec<ChunkId> = entries.iter().map(|e| e.id).collect();
                ids.sort();
                let mut want = tree_ids.clone();
                want.sort();
                assert_eq!(ids, want, "the tree pack holds exactly the trees");
            }
            kinds.push(kind);
        }
        kinds.sort_by_key(|k| *k as u8);
        assert_eq!(kinds, [Kind::Data, Kind::Tree]);
        let s = open(dir.path(), &f).unwrap();
        f.set_down(true);
        for t in &trees {
            assert_eq!(s.chunk_blob(t.id()).unwrap().as_deref(), Some(&t.blob[..]), "tree read with the bucket down");
        }
        assert!(s.chunk_blob(data[0].id()).is_err(), "a data chunk needs the bucket");
        f.set_down(false);
        assert_eq!(s.chunk_blob(data[0].id()).unwrap().as_deref(), Some(&data[0].blob[..]));
    }

    /// Pack GC: of ten one-pack groups, one whose chunks all went is
    /// deleted, one 40% live is rewritten (only its live blobs copied)
    /// and retired, one 80% live is left alone; an orphan object (a crash
    /// after a PUT) goes. Every live chunk reads back, also after a
    /// restart, and the next run deletes the retired pack.
    #[test]
    fn pack_gc_follows_the_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let fence = |step: &mut dyn FnMut() -> Result<(), StoreError>| step();
        let groups: Vec<Vec<VerifiedChunk>> =
            (0..10).map(|g| (0..5).map(|i| chunk(1000 + g * 10 + i, 210 << 10)).collect()).collect();
        let s = open(dir.path(), &f).unwrap();
        for g in &groups {
            s.put_chunks("h", g).unwrap();
            ChunkStore::persist(&s).unwrap();
        }
        assert_eq!(packs_in_bucket(&f), 10);
        let ids = |g: usize, r: std::ops::Range<usize>| groups[g][r].iter().map(|c| *c.id()).collect::<Vec<_>>();
        s.delete_chunks(&ids(3, 0..5)).unwrap();
        s.delete_chunks(&ids(5, 0..3)).unwrap();
        s.delete_chunks(&ids(7, 0..1)).unwrap();
        let o = Objects::new(f.clone(), "srv", quick());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(o.put_new(&format!("packs/{}", "ab".repeat(32)), b"left by a crash".to_vec().into())).unwrap();

        let st = s.gc_packs(&fence).unwrap();
        let blob_len = groups[5][3].blob().len() as u64;
        assert_eq!(st.objects_deleted, 2, "the dead pack and the orphan: {st:?}");
        assert_eq!(st.packs_repacked, 1, "{st:?}");
        assert_eq!(st.bytes_rewritten, 2 * blob_len, "only the two live blobs were copied: {st:?}");
        assert_eq!(packs_in_bucket(&f), 10, "9 old (one retired, still readable) and the new one");
        let live: Vec<&VerifiedChunk> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, cs)| {
                cs.iter().enumerate().filter(move |(i, _)| !matches!((g, *i), (3, _) | (5, 0..=2) | (7, 0)))
            })
            .map(|(_, c)| c)
            .collect();
        assert_eq!(live.len(), 50 - 9);
        let check = |s: &RocksStore| {
            for c in &live {
                assert_eq!(s.chunk_blob(c.id()).unwrap().as_deref(), Some(c.blob()), "chunk {}", c.id().short());
            }
        };
        check(&s);
        drop(s);
        let s = open(dir.path(), &f).unwrap();
        check(&s);
        let st = s.gc_packs(&fence).unwrap();
        assert_eq!((st.objects_deleted, st.packs_repacked, st.bytes_rewritten), (1, 0, 0), "the retired pack: {st:?}");
        assert_eq!(packs_in_bucket(&f), 9);
        drop(s);
        let s = open(dir.path(), &f).unwrap();
        check(&s);
    }

    /// A server that stops (or dies) before a commit persisted its open
    /// pack: those chunks are missing afterwards, never "stored", and the
    /// next push stores them again.
    #[test]
    fn chunks_of_a_pack_never_uploaded_are_missing_and_uploaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let c = chunk(7, 1000);
        {
            let s = open(dir.path(), &f).unwrap();
            s.put_chunks("h", std::slice::from_ref(&c)).unwrap();
            assert_eq!(s.host_has("h", &[*c.id()]).unwrap(), [true]);
        }
        assert_eq!(packs_in_bucket(&f), 0);
        let s = open(dir.path(), &f).unwrap();
        assert_eq!(s.host_has("h", &[*c.id()]).unwrap(), [false], "its pack never reached the bucket");
        assert_eq!(s.chunk_blob(c.id()).unwrap(), None);
        s.put_chunks("h", std::slice::from_ref(&c)).unwrap();
        ChunkStore::persist(&s).unwrap();
        assert_eq!(s.host_has("h", &[*c.id()]).unwrap(), [true]);
        assert_eq!(s.chunk_blob(c.id()).unwrap().as_deref(), Some(&c.blob[..]));
    }

    /// The bucket down at commit: persist fails with a clear error and
    /// keeps the pack; once the bucket is back, the next persist uploads it.
    /// A PUT whose answer was lost counts as stored on the retry.
    #[test]
    fn a_failed_upload_is_kept_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faulty::new();
        let s = open(dir.path(), &f).unwrap();
        let c = chunk(9, 5000);
        s.put_chunks("h", std::slice::from_ref(&c)).unwrap();
        f.set_down(true);
        let e = ChunkStore::persist(&s).unwrap_err();
        assert!(e.to_string().contains("did not answer") && e.to_string().contains("repeat"), "{e}");
        f.set_down(false);
        f.lose_answer_of_put(f.puts() + 1);
        ChunkStore::persist(&s).unwrap();
        assert_eq!(packs_in_bucket(&f), 1);
        drop(s);
        let s = open(dir.path(), &f).unwrap();
        assert_eq!(s.chunk_blob(c.id()).unwrap().as_deref(), Some(&c.blob[..]));
    }

    /// A second server (another data directory) on the same bucket prefix
    /// refuses to open while the first holds the lease; after the first
    /// stops, it opens.
    #[test]
    fn a_second_server_on_one_prefix_refuses() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let f = Faulty::new();
        let first = open(a.path(), &f).unwrap();
        let Err(e) = open(b.path(), &f) else { panic!("second server opened") };
        assert!(e.to_string().contains("in use by another bkp-server"), "{e}");
        drop(first);
        open(b.path(), &f).unwrap();
    }

    #[test]
    fn location_and_pack_rows_golden() {
        let l = Location { pack: 2, offset: 48, len: 3 };
        let mut want = vec![1];
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&48u64.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(l.encode().to_vec(), want);
        assert_eq!(Location::decode(&want), Some(l));
        assert_eq!(Location::decode(&want[..20]), None);
        let r = PackRecord { id: crate::store::pack::PackId([7; 32]), kind: Kind::Data, len: 1 << 20 };
        let enc = r.encode();
        assert_eq!(&enc[..2], &[1, 1]);
        assert_eq!(PackRecord::decode(&enc), Some(r));
        let mut bad = enc.clone();
        bad[1] = 9;
        assert_eq!(PackRecord::decode(&bad), None);
    }

    /// A data directory opened with the other backend refuses, saying
    /// which config it needs (a verify without the bucket's config would
    /// find every chunk missing).
    #[test]
    fn a_data_directory_keeps_its_backend() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let s3 = StorageConfig {
            backend: crate::store::object::config::Backend::S3,
            bucket: Some("b".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        {
            let s = open_store(&db, 8 << 20, &StorageConfig::default(), dir.path()).unwrap();
            let data = b"local chunk";
            let c = VerifiedChunk::verify(ChunkId::of(data), blob::encode(data, 3)).unwrap();
            crate::store::MetaStore::put_chunks(&s, "h", &[c]).unwrap();
        }
        let Err(e) = open_store(&db, 8 << 20, &s3, dir.path()) else { panic!("opened") };
        assert!(e.to_string().contains("backend \"local\""), "{e}");
        // Marked s3 (as an s3 open does): a local open refuses.
        {
            let s = crate::store::rocks::RocksStore::open_with(&db, 8 << 20, |db| {
                db.mark_storage_backend(b"s3")?;
                Ok(Arc::new(crate::store::rocks::LocalChunks::new(db)) as Arc<dyn ChunkStore>)
            });
            s.unwrap();
        }
        let Err(e) = open_store(&db, 8 << 20, &StorageConfig::default(), dir.path()) else { panic!("opened") };
        assert!(e.to_string().contains("--config"), "{e}");
    }
}
