//! Behind the producer, three stages joined by bounded channels:
//!
//! ```text
//! producer ─ chunks ─> query (HasChunks, ≤2 in flight) ─ missing ─> zstd pool (one thread per core)
//!                                                                    ─ blobs ─> upload (≤4 streams)
//! ```
//!
//! Every chunk holds a [`Lease`] on a shared byte [`Budget`] from the
//! moment the producer makes it until it is dropped (deduplicated, or
//! acknowledged by the server), so memory is bounded in bytes whatever the
//! chunk sizes; the channels only bound the number of items. No stage
//! waits for more input while it has work and a free slot, so the network,
//! the compressors and the producer overlap.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bkp_common::blob;
use bkp_common::protocol::MAX_IDS;
use bkp_common::ChunkId;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::task::JoinSet;

use crate::conn::Client;
use crate::crypt::ChunkIds;
use crate::error::{ClientError, LinkError, Result};
use crate::progress::Progress;

/// Raw bytes of chunks between the producer and the server's answer.
pub const BUDGET_BYTES: usize = 96 << 20;
/// Counted on top of a chunk's length, so a million tiny chunks still
/// weigh what their bookkeeping costs.
const ITEM_OVERHEAD: usize = 256;
/// Batches (not bytes: the budget bounds those) queued between stages.
const QUEUE: usize = 256;
/// Chunks travel between stages in batches of up to this many items or
/// bytes: per item, each hop cost a thread wake-up (78,000 small files
/// made ~500,000 futex calls in the client).
const BATCH_ITEMS: usize = 64;
const BATCH_BYTES: usize = 1 << 20;
/// Has-chunk queries in flight; each carries what queued meanwhile.
const QUERIES_IN_FLIGHT: usize = 2;
/// Concurrent upload streams.
const UPLOADERS: usize = 4;
/// Compressed bytes per upload stream.
const UPLOAD_GROUP_BYTES: usize = 8 << 20;
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

fn stopped() -> ClientError {
    ClientError::Link(LinkError::Ended("upload stopped"))
}

/// Bytes that may be held by chunks anywhere in the pipeline.
pub struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    cap: usize,
}

#[derive(Default)]
struct BudgetState {
    used: usize,
    /// Producers blocked in `acquire`: a lease dropped with none waiting
    /// wakes nobody (a notify is a syscall, and leases drop per chunk).
    waiting: usize,
}

/// A share of the [`Budget`], given back when dropped.
pub struct Lease {
    budget: Arc<Budget>,
    n: usize,
}

impl Budget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), freed: Condvar::new(), cap })
    }

    /// Blocks (a producer thread, never the runtime) until `n` bytes fit.
    fn acquire(self: &Arc<Self>, n: usize) -> Lease {
        // A request above the cap waits for an empty pipeline instead of forever.
        let n = n.min(self.cap);
        let mut st = self.state.lock().expect("budget lock");
        while st.used + n > self.cap {
            st.waiting += 1;
            st = self.freed.wait(st).expect("budget lock");
            st.waiting -= 1;
        }
        st.used += n;
        Lease { budget: self.clone(), n }
    }

    fn try_acquire(self: &Arc<Self>, n: usize) -> Option<Lease> {
        let n = n.min(self.cap);
        let mut st = self.state.lock().expect("budget lock");
        if st.used + n > self.cap {
            return None;
        }
        st.used += n;
        Some(Lease { budget: self.clone(), n })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.budget.state.lock().expect("budget lock");
        st.used -= self.n;
        if st.waiting > 0 {
            self.budget.freed.notify_all();
        }
    }
}

/// A chunk on its way to the server.
pub struct RawChunk {
    pub id: ChunkId,
    pub data: Vec<u8>,
    _lease: Lease,
}

/// A compressed chunk waiting for an upload stream.
struct Encoded {
    id: ChunkId,
    blob: Vec<u8>,
    _lease: Lease,
}

/// The producer's end: hashes a chunk and queues it, blocking while the
/// budget is spent. Chunks leave in batches; what is still held goes
/// before the producer blocks on the budget, and when the sink is dropped.
pub struct ChunkSink {
    tx: mpsc::Sender<Vec<RawChunk>>,
    ids: ChunkIds,
    budget: Arc<Budget>,
    held: Vec<RawChunk>,
    held_bytes: usize,
}

impl ChunkSink {
    fn new(tx: mpsc::Sender<Vec<RawChunk>>, ids: ChunkIds) -> Self {
        Self { tx, ids, budget: Budget::new(BUDGET_BYTES), held: Vec::new(), held_bytes: 0 }
    }

    /// How data chunks are named (plain, or keyed for an encrypted push).
    pub fn ids(&self) -> &ChunkIds {
        &self.ids
    }

    /// Queues a plain chunk (a tree chunk: the server must read it, so it
    /// is never sealed).
    pub fn send(&mut self, data: Vec<u8>) -> Result<ChunkId> {
        let id = ChunkId::of(&data);
        self.send_hashed(id, data)
    }

    /// Queues a chunk whose id the caller computed (`id` must be
    /// `ChunkId::of(&data)`, or `self.ids().of(&data)` for a data chunk:
    /// the server re-hashes and refuses it otherwise).
    pub fn send_hashed(&mut self, id: ChunkId, data: Vec<u8>) -> Result<ChunkId> {
        let n = data.len() + ITEM_OVERHEAD;
        let lease = match self.budget.try_acquire(n) {
            Some(l) => l,
            None => {
                // The held chunks may be what the budget waits for.
                self.flush()?;
                self.budget.acquire(n)
            }
        };
        self.held_bytes += data.len();
        self.held.push(RawChunk { id, data, _lease: lease });
        if self.held.len() >= BATCH_ITEMS || self.held_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(id)
    }

    fn flush(&mut self) -> Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        self.held_bytes = 0;
        self.tx.blocking_send(std::mem::take(&mut self.held)).map_err(|_| stopped())
    }
}

impl Drop for ChunkSink {
    fn drop(&mut self) {
        // Only a producer thread ever holds chunks, so this never blocks
        // the runtime; an error means the pipeline already failed.
        let _ = self.flush();
    }
}

/// Cuts a run of items into batches of at most BATCH_ITEMS / BATCH_BYTES.
fn batches<T>(items: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let (mut out, mut cur, mut bytes) = (Vec::new(), Vec::new(), 0);
    for it in items {
        bytes += size(&it);
        cur.push(it);
        if cur.len() >= BATCH_ITEMS || bytes >= BATCH_BYTES {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Chunks the producer made, repeats included.
    pub chunks: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// Blob bytes the server acknowledged.
    pub bytes_new: u64,
}

/// Ids queried or being uploaded: a repeat of one of them is dropped
/// rather than queried (and perhaps uploaded) twice. Ids leave once the
/// server holds them, so the set stays as small as what is in flight.
type InFlight = Arc<Mutex<HashSet<ChunkId>>>;

/// Starts the stages; the future ends when the producer has dropped its
/// [`ChunkSink`] and every chunk is stored, or at the first error (which
/// drops the channels and so stops the producer too).
pub fn start(
    client: Arc<Client>,
    session: u64,
    level: i32,
    ids: ChunkIds,
    progress: Arc<dyn Progress>,
) -> (ChunkSink, impl std::future::Future<Output = Result<Counters>>) {
    let (chunk_tx, chunk_rx) = mpsc::channel::<Vec<RawChunk>>(QUEUE);
    let (missing_tx, missing_rx) = mpsc::channel::<Vec<RawChunk>>(QUEUE);
    let (blob_tx, blob_rx) = mpsc::channel::<Vec<Encoded>>(QUEUE);
    let sink = ChunkSink::new(chunk_tx, ids.clone());
    let in_flight: InFlight = Default::default();
    let pool = compress_pool(missing_rx, blob_tx, level, ids);
    let run = async move {
        let query = query_stage(client.clone(), session, chunk_rx, missing_tx, in_flight.clone());
        let upload = upload_stage(client, session, blob_rx, in_flight, progress);
        let (q, u) = tokio::join!(query, upload);
        // The upload's error is the cause when it stopped first; the
        // query stage then only saw a closed channel.
        let mut c = u?;
        c.chunks = q?;
        if pool.failed() {
            return Err(ClientError::Bug("a compression thread failed"));
        }
        Ok(c)
    };
    (sink, run)
}

/// Returns the number of chunks received.
async fn query_stage(
    client: Arc<Client>,
    session: u64,
    mut rx: mpsc::Receiver<Vec<RawChunk>>,
    tx: mpsc::Sender<Vec<RawChunk>>,
    in_flight: InFlight,
) -> Result<u64> {
    let mut chunks = 0u64;
    let mut batch: Vec<RawChunk> = Vec::new();
    let mut queries = FuturesUnordered::new();
    let mut open = true;
    let take = |got: Vec<RawChunk>, batch: &mut Vec<RawChunk>, chunks: &mut u64| {
        *chunks += got.len() as u64;
        let mut f = in_flight.lock().expect("in-flight lock");
        batch.extend(got.into_iter().filter(|ch| f.insert(ch.id)));
    };
    loop {
        while open && batch.len() < MAX_IDS {
            match rx.try_recv() {
                Ok(ch) => take(ch, &mut batch, &mut chunks),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !batch.is_empty() && queries.len() < QUERIES_IN_FLIGHT {
            let rest = batch.split_off(batch.len().min(MAX_IDS));
            let b = std::mem::replace(&mut batch, rest);
            let c = client.clone();
            queries.push(async move {
                let r = c.missing(session, b.iter().map(|x| x.id).collect()).await;
                (b, r)
            });
            continue;
        }
        if !open && batch.is_empty() && queries.is_empty() {
            return Ok(chunks);
        }
        tokio::select! {
            Some((b, r)) = queries.next(), if !queries.is_empty() => {
                let mut b: Vec<Option<RawChunk>> = b.into_iter().map(Some).collect();
                let missing: Vec<RawChunk> = r?.iter().filter_map(|&i| b.get_mut(i as usize)?.take()).collect();
                for part in batches(missing, |ch| ch.data.len()) {
                    tx.send(part).await.map_err(|_| stopped())?;
                }
                // The server holds the rest (and keeps them for this push).
                let mut f = in_flight.lock().expect("in-flight lock");
                for ch in b.into_iter().flatten() {
                    f.remove(&ch.id);
                }
            }
            got = rx.recv(), if open && batch.len() < MAX_IDS => match got {
                Some(ch) => take(ch, &mut batch, &mut chunks),
                None => open = false,
            },
        }
    }
}

struct Pool {
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Pool {
    fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Marks the pool failed if a worker unwinds: the chunk it held would
/// otherwise silently never be uploaded.
struct PanicFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// zstd is the costliest step of a first push (~145 MiB/s per core on
/// SQL text): one worker per core. The workers end when the query stage
/// closes their input or the upload stage goes away.
/// An encrypted push seals its data chunks here, after compressing them.
fn compress_pool(rx: mpsc::Receiver<Vec<RawChunk>>, tx: mpsc::Sender<Vec<Encoded>>, level: i32, ids: ChunkIds) -> Pool {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let rx = Arc::new(Mutex::new(rx));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for i in 0..workers {
        let (rx, tx, flag, ids) = (rx.clone(), tx.clone(), PanicFlag(failed.clone()), ids.clone());
        let spawned = std::thread::Builder::new().name(format!("bkp-zstd-{i}")).spawn(move || {
            let _flag = flag;
            let mut encoder = blob::Encoder::new(level);
            loop {
                // One worker waits on the channel, the others on the lock.
                let Some(chs) = rx.lock().ok().and_then(|mut r| r.blocking_recv()) else { return };
                let out: Vec<Encoded> = chs
                    .into_iter()
                    .map(|ch| Encoded { id: ch.id, blob: encode(&ids, &mut encoder, &ch), _lease: ch._lease })
                    .collect();
                if tx.blocking_send(out).is_err() {
                    return;
                }
            }
        });
        if spawned.is_err() {
            failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    Pool { failed }
}

/// A chunk's blob: sealed when it is a data chunk of an encrypted push.
/// Which kind it is shows in its id: only a sealed chunk's id is the hash
/// of its key hash (the tree's chunks keep plain ids, for the server).
fn encode(ids: &ChunkIds, encoder: &mut blob::Encoder, ch: &RawChunk) -> Vec<u8> {
    if let ChunkIds::Sealed(ring) = ids {
        let keys = ring.current();
        let k = keys.key_hash(&ch.data);
        if bkp_common::seal::id_of_key_hash(&k) == ch.id {
            return keys.seal_with(encoder, &k, &ch.data).1;
        }
    }
    encoder.encode(&ch.data)
}

type UploadDone = Result<(Vec<ChunkId>, u64, u64)>;

async fn upload_stage(
    client: Arc<Client>,
    session: u64,
    mut rx: mpsc::Receiver<Vec<Encoded>>,
    in_flight: InFlight,
    progress: Arc<dyn Progress>,
) -> Result<Counters> {
    let mut c = Counters::default();
    let mut uploads: JoinSet<UploadDone> = JoinSet::new();
    let mut group: Vec<Encoded> = Vec::new();
    let mut group_bytes = 0usize;
    let mut open = true;
    let account = |done: std::result::Result<UploadDone, tokio::task::JoinError>, c: &mut Counters| {
        let (ids, sent, new) = done.map_err(|e| ClientError::Task { what: "upload task", source: e })??;
        let mut f = in_flight.lock().expect("in-flight lock");
        for id in &ids {
            f.remove(id);
        }
        c.bytes_sent += sent;
        c.bytes_new += new;
        progress.uploaded(sent);
        Ok::<(), ClientError>(())
    };
    loop {
        while open && group_bytes < UPLOAD_GROUP_BYTES {
            match rx.try_recv() {
                Ok(es) => {
                    group_bytes += es.iter().map(|e| e.blob.len()).sum::<usize>();
                    group.extend(es);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // A full group goes out as soon as a stream is free; a partial one
        // only when nothing else is queued, so an idle network takes what
        // there is while a busy one lets groups grow.
        if !group.is_empty() && uploads.len() < UPLOADERS && (group_bytes >= UPLOAD_GROUP_BYTES || rx.is_empty()) {
            c.chunks_sent += group.len() as u64;
            uploads.spawn(put_group(client.clone(), session, std::mem::take(&mut group)));
            group_bytes = 0;
            continue;
        }
        if !open && group.is_empty() && uploads.is_empty() {
            return Ok(c);
        }
        tokio::select! {
            Some(done) = uploads.join_next(), if !uploads.is_empty() => account(done, &mut c)?,
            got = rx.recv(), if open && group_bytes < UPLOAD_GROUP_BYTES => match got {
                Some(es) => {
                    group_bytes += es.iter().map(|e| e.blob.len()).sum::<usize>();
                    group.extend(es);
                }
                None => open = false,
            },
        }
    }
}

/// One upload stream. The chunks' leases are held until the server
/// acknowledged them.
async fn put_group(client: Arc<Client>, session: u64, group: Vec<Encoded>) -> UploadDone {
    let ids: Vec<ChunkId> = group.iter().map(|e| e.id).collect();
    let sent: u64 = group.iter().map(|e| e.blob.len() as u64).sum();
    let (blobs, leases): (Vec<_>, Vec<_>) = group.into_iter().map(|e| ((e.id, e.blob), e._lease)).unzip();
    let new = tokio::time::timeout(UPLOAD_TIMEOUT, client.put(session, blobs))
        .await
        .map_err(|_| ClientError::Link(LinkError::TimedOut("upload")))??;
    drop(leases);
    Ok((ids, sent, new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_blocks_until_leases_return() {
        let b = Budget::new(100);
        let l1 = b.acquire(60);
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            let _l = b2.acquire(60);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "acquired past the cap");
        drop(l1);
        waiter.join().unwrap();
        // Larger than the cap: waits for an empty budget, not forever.
        drop(b.acquire(1000));
        let l = b.try_acquire(60).expect("fits in an empty budget");
        assert!(b.try_acquire(60).is_none(), "60 + 60 is over the cap of 100");
        drop(l);
        assert!(b.try_acquire(60).is_some());
        assert_eq!(b.state.lock().unwrap().used, 0);
    }

    #[test]
    fn sink_sends_in_batches_and_flushes_what_it_holds_when_dropped() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let mut sink = ChunkSink::new(tx, ChunkIds::Plain);
        for i in 0..BATCH_ITEMS + 3 {
            sink.send(vec![i as u8; 10]).unwrap();
        }
        assert_eq!(rx.try_recv().unwrap().len(), BATCH_ITEMS);
        assert!(rx.try_recv().is_err(), "three chunks are still held");
        drop(sink);
        let last = rx.try_recv().unwrap();
        assert_eq!(last.iter().map(|c| c.data[0]).collect::<Vec<_>>(), [64, 65, 66]);
    }

    #[test]
    fn batches_respect_item_and_byte_limits() {
        let sizes: Vec<usize> = batches(0..BATCH_ITEMS * 2 + 1, |_| 1).iter().map(Vec::len).collect();
        assert_eq!(sizes, [BATCH_ITEMS, BATCH_ITEMS, 1]);
        let big = batches([BATCH_BYTES / 2, BATCH_BYTES / 2, 1, BATCH_BYTES], |&n| n);
        assert_eq!(big, [vec![BATCH_BYTES / 2, BATCH_BYTES / 2], vec![1, BATCH_BYTES]]);
    }
}
