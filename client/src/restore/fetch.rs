//! Restore's reading side: the tree stream ([`TreeReader`]) and the data
//! fetcher ([`fetch_stage`]), which turns the planner's items into the
//! writer's outputs in tree order.
//!
//! Consecutive chunks, across files, go into segments of up to 64 ids
//! (the server's cap per `GetChunks`) or 8 MiB; several segments are in
//! flight, each its own task. Chunks are decoded and checked against their
//! ids as they arrive, on blocking threads in batches of about 1 MiB (one
//! big chunk, or many small ones), at most one batch per core at a time.
//! A chunk the server refuses (missing, quarantined)
//! or that fails its check becomes [`Out::Bad`]: the file it belongs to
//! fails, the rest of the restore goes on. Only connection errors stop it.

use std::collections::VecDeque;
use std::sync::Arc;

use bkp_common::snapshot::Snapshot;
use bkp_common::tree::{ChunkRef, Entry, TreeDecoder};
use bkp_common::ChunkId;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::conn::Client;
use crate::error::{ClientError, Result};

/// Ids per `GetChunks`: the protocol's cap.
pub const FETCH_IDS: usize = bkp_common::protocol::MAX_FETCH;
/// Raw bytes per segment; a segment's data is held until all of it is in.
const SEGMENT_BYTES: usize = 8 << 20;
/// Items per segment, so runs of entries without data move on too.
const SEGMENT_ITEMS: usize = 4096;
const SEGMENTS_IN_FLIGHT: usize = 6;
/// Tree chunks fetched ahead of the decoder.
const TREE_AHEAD: usize = 4;

/// What the planner asks for, in tree order.
pub enum Item {
    Entry(Entry),
    Chunk(ChunkRef),
}

/// What the writer gets, in the same order.
pub enum Out {
    Entry(Entry),
    /// A chunk's data, checked against its id and length.
    Data {
        id: ChunkId,
        data: Vec<u8>,
    },
    /// A chunk that could not be had; its file cannot be restored.
    Bad {
        id: ChunkId,
        reason: String,
    },
}

/// Reads a snapshot's tree stream from a blocking thread, a few chunks
/// ahead.
pub struct TreeReader {
    client: Arc<Client>,
    handle: Handle,
    ids: VecDeque<ChunkId>,
    ahead: VecDeque<JoinHandle<Result<Vec<u8>>>>,
    dec: TreeDecoder,
}

impl TreeReader {
    pub fn new(client: Arc<Client>, handle: Handle, snapshot: &Snapshot) -> Self {
        let ids = snapshot.tree.iter().copied().collect();
        Self { client, handle, ids, ahead: VecDeque::new(), dec: TreeDecoder::new() }
    }

    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        let corrupt = |e: bkp_common::tree::TreeError| ClientError::Corrupt(e.into());
        loop {
            if let Some(e) = self.dec.next_entry().map_err(corrupt)? {
                return Ok(Some(e));
            }
            while self.ahead.len() < TREE_AHEAD {
                let Some(id) = self.ids.pop_front() else { break };
                let c = self.client.clone();
                self.ahead.push_back(self.handle.spawn(async move { c.chunk(id).await }));
            }
            let Some(next) = self.ahead.pop_front() else {
                self.dec.finish().map_err(corrupt)?;
                return Ok(None);
            };
            let data =
                self.handle.block_on(next).map_err(|e| ClientError::Task { what: "tree fetch task", source: e })??;
            self.dec.feed(&data);
        }
    }
}

impl Drop for TreeReader {
    fn drop(&mut self) {
        for h in &self.ahead {
            h.abort();
        }
    }
}

/// Turns items into outputs, in order, until the planner is done. Sends
/// whole segments, so the channel bounds memory in segments.
pub async fn fetch_stage(client: Arc<Client>, mut rx: mpsc::Receiver<Item>, tx: mpsc::Sender<Vec<Out>>) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let decoders = Arc::new(Semaphore::new(cores));
    let mut segments = FuturesOrdered::new();
    let mut seg = Segment::default();
    let mut open = true;
    loop {
        while open && !seg.full() {
            match rx.try_recv() {
                Ok(it) => seg.add(it),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // A partial segment goes out only when nothing else is queued.
        if !seg.items.is_empty() && segments.len() < SEGMENTS_IN_FLIGHT && (seg.full() || rx.is_empty()) {
            let items = std::mem::take(&mut seg).items;
            segments.push_back(tokio::spawn(fetch_segment(client.clone(), items, decoders.clone())));
            continue;
        }
        if !open && seg.items.is_empty() && segments.is_empty() {
            return Ok(());
        }
        tokio::select! {
            Some(done) = segments.next(), if !segments.is_empty() => {
                let outs = done.map_err(|e| ClientError::Task { what: "fetch task", source: e })??;
                if tx.send(outs).await.is_err() {
                    return Ok(()); // the writer stopped; its error says why
                }
            }
            got = rx.recv(), if open && !seg.full() => match got {
                Some(it) => seg.add(it),
                None => open = false,
            },
        }
    }
}

#[derive(Default)]
struct Segment {
    items: Vec<Item>,
    ids: usize,
    bytes: usize,
}

impl Segment {
    fn add(&mut self, it: Item) {
        if let Item::Chunk(r) = &it {
            self.ids += 1;
            self.bytes += r.len as usize;
        }
        self.items.push(it);
    }

    fn full(&self) -> bool {
        self.ids >= FETCH_IDS || self.bytes >= SEGMENT_BYTES || self.items.len() >= SEGMENT_ITEMS
    }
}

/// Blobs decoded together on one blocking thread: a handoff per small
/// chunk would cost more than decoding it.
const DECODE_BATCH_BYTES: usize = 1 << 20;

enum Pending {
    /// The outputs of consecutive chunks, in order.
    Decoding(JoinHandle<Result<Vec<Out>>>),
    Ready(Out),
}

/// Received blobs waiting to be decoded.
#[derive(Default)]
struct Batch {
    blobs: Vec<(ChunkRef, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    /// Starts decoding the batch once a core is free.
    async fn dispatch(&mut self, pending: &mut Vec<Pending>, decoders: &Arc<Semaphore>) {
        if self.blobs.is_empty() {
            return;
        }
        let blobs = std::mem::take(&mut self.blobs);
        self.bytes = 0;
        let slot = decoders.clone().acquire_owned().await.expect("semaphore never closed");
        pending.push(Pending::Decoding(tokio::task::spawn_blocking(move || {
            let _slot = slot;
            blobs.into_iter().map(|(r, b)| decode(r, &b)).collect::<Result<Vec<Out>>>()
        })));
    }
}

async fn fetch_segment(client: Arc<Client>, items: Vec<Item>, decoders: Arc<Semaphore>) -> Result<Vec<Out>> {
    let refs: Vec<ChunkRef> =
        items.iter().filter_map(|i| if let Item::Chunk(r) = i { Some(*r) } else { None }).collect();
    let mut pending: Vec<Pending> = Vec::new();
    let mut batch = Batch::default();
    let mut received = 0;
    if !refs.is_empty() {
        let mut f = client.fetch(refs.iter().map(|r| r.id).collect()).await?;
        loop {
            match f.next_blob().await {
                Ok(Some((_, blob))) => {
                    batch.bytes += blob.len();
                    batch.blobs.push((refs[received], blob));
                    received += 1;
                    if batch.bytes >= DECODE_BATCH_BYTES {
                        batch.dispatch(&mut pending, &decoders).await;
                    }
                }
                Ok(None) => break,
                // The server stopped at a chunk it cannot give; which one
                // (and whether others follow) is found one by one.
                Err(ClientError::Server(..)) => break,
                Err(e) => return Err(e),
            }
        }
        for r in refs[received..].iter().copied() {
            match client.fetch(vec![r.id]).await?.next_blob().await {
                Ok(Some((_, blob))) => {
                    batch.bytes += blob.len();
                    batch.blobs.push((r, blob));
                }
                Ok(None) => unreachable!("one id asked, one answer"),
                Err(ClientError::Server(m, _)) => {
                    batch.dispatch(&mut pending, &decoders).await;
                    pending.push(Pending::Ready(Out::Bad { id: r.id, reason: m }));
                }
                Err(e) => return Err(e),
            }
        }
        batch.dispatch(&mut pending, &decoders).await;
    }
    let mut data = Vec::with_capacity(refs.len());
    for p in pending {
        match p {
            Pending::Ready(o) => data.push(o),
            Pending::Decoding(h) => {
                data.extend(h.await.map_err(|e| ClientError::Task { what: "decode task", source: e })??)
            }
        }
    }
    let mut data = data.into_iter();
    Ok(items
        .into_iter()
        .map(|it| match it {
            Item::Entry(e) => Out::Entry(e),
            Item::Chunk(_) => data.next().expect("one result per chunk"),
        })
        .collect())
}

/// Decompresses (or opens) one blob and checks it against its id and
/// length. A sealed chunk without the key to open it stops the restore:
/// every other sealed chunk would fail alike.
fn decode(r: ChunkRef, blob: &[u8]) -> Result<Out> {
    Ok(match crate::crypt::decode_verified(blob, &r.id) {
        Ok(d) if d.len() == r.len as usize => Out::Data { id: r.id, data: d },
        Ok(d) => Out::Bad { id: r.id, reason: format!("{} bytes where the tree says {}", d.len(), r.len) },
        Err(crate::crypt::OpenError::Blob(e)) => Out::Bad { id: r.id, reason: e.to_string() },
        Err(e) => return Err(ClientError::Key(e.to_string())),
    })
}
