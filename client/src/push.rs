//! `bkp push`: producer thread -> dedup query -> compress -> parallel
//! uploads -> commit. Every stage is bounded, so memory stays flat.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bkp_common::blob;
use bkp_common::protocol::MAX_IDS;
use bkp_common::snapshot::{SnapshotKind, SnapshotSummary};
use bkp_common::tree::Meta;
use bkp_common::ChunkId;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::progress::Progress;
use crate::walk::{Excludes, Producer, RawChunk};

/// Chunks queued between the producer and the dedup query.
const QUEUE: usize = 16;
/// Chunks per has-chunk query.
const QUERY_BATCH: usize = 64;
/// Concurrent upload streams.
const UPLOADERS: usize = 4;
/// Bytes of raw data per upload stream.
const UPLOAD_GROUP_BYTES: usize = 8 << 20;

pub enum Source {
    Paths {
        paths: Vec<PathBuf>,
        excludes: Vec<String>,
    },
    Stdin,
    /// Any reader, as one stream (benchmarks, embedding).
    Reader(Box<dyn std::io::Read + Send>),
    Command(Vec<OsString>),
}

pub struct PushOptions {
    pub name: String,
    pub source: Source,
    pub zstd_level: i32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    pub snapshot: SnapshotSummary,
    pub bytes_read: u64,
    pub chunks: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub bytes_new: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Runs the producer for `source` on the current (blocking) thread.
fn produce(
    source: Source,
    name: &str,
    tx: mpsc::Sender<RawChunk>,
    progress: Arc<dyn Progress>,
) -> Result<(Vec<ChunkId>, Vec<String>)> {
    let stream_meta = Meta { mode: 0o600, uid: 0, gid: 0, mtime_ns: now_ns() };
    match source {
        Source::Paths { paths, excludes } => {
            let mut p = Producer::new(tx, progress, Excludes::new(&excludes)?);
            p.walk_roots(&paths)?;
            p.finish()
        }
        Source::Stdin => produce(Source::Reader(Box::new(std::io::stdin())), name, tx, progress),
        Source::Reader(r) => {
            let mut p = Producer::new(tx, progress, Excludes::new(&[])?);
            p.file_from_reader(name.as_bytes().to_vec(), stream_meta, r)?;
            p.finish()
        }
        Source::Command(argv) => {
            let (prog, args) =
                argv.split_first().ok_or_else(|| ClientError::Input("no command given after --".into()))?;
            let shown = prog.to_string_lossy().to_string();
            let mut child = Command::new(prog)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| ClientError::Input(format!("cannot run {shown}: {e}")))?;
            let stdout = child.stdout.take().expect("piped stdout");
            let mut p = Producer::new(tx, progress, Excludes::new(&[])?);
            let read = p.file_from_reader(name.as_bytes().to_vec(), stream_meta, stdout);
            if read.is_err() {
                let _ = child.kill();
            }
            let status = child.wait().map_err(|e| ClientError::Input(format!("waiting for {shown}: {e}")))?;
            read?;
            // A failed dump must never look like a good backup.
            if !status.success() {
                return Err(ClientError::Input(format!("{shown} failed ({status}); no snapshot was committed")));
            }
            p.finish()
        }
    }
}

struct Counters {
    chunks: u64,
    chunks_sent: u64,
    bytes_sent: u64,
    bytes_new: u64,
}

pub async fn push(client: Arc<Client>, opts: PushOptions, progress: Arc<dyn Progress>) -> Result<PushReport> {
    let start = Instant::now();
    let kind = match opts.source {
        Source::Paths { .. } => SnapshotKind::Tree,
        _ => SnapshotKind::Stream,
    };
    let session = client.start_push(&opts.name, kind).await?;
    let (tx, rx) = mpsc::channel::<RawChunk>(QUEUE);
    let name = opts.name.clone();
    let prog = progress.clone();
    let source = opts.source;
    let producer = tokio::task::spawn_blocking(move || produce(source, &name, tx, prog));
    let upload = upload(client.clone(), session, rx, opts.zstd_level, progress);
    // The uploader ends when the producer drops its sender; an upload error
    // drops the receiver, which stops the producer.
    let (produced, counters) = tokio::join!(producer, upload);
    let counters = counters?;
    let (tree, warnings) = produced.map_err(|e| ClientError::Input(format!("reader thread: {e}")))??;
    let snapshot = client.commit(session, tree).await?;
    Ok(PushReport {
        // Counted by the server from the tree: what was read and chunked.
        bytes_read: snapshot.stats.bytes,
        snapshot,
        chunks: counters.chunks,
        chunks_sent: counters.chunks_sent,
        bytes_sent: counters.bytes_sent,
        bytes_new: counters.bytes_new,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
    })
}

async fn upload(
    client: Arc<Client>,
    session: u64,
    mut rx: mpsc::Receiver<RawChunk>,
    level: i32,
    progress: Arc<dyn Progress>,
) -> Result<Counters> {
    let mut c = Counters { chunks: 0, chunks_sent: 0, bytes_sent: 0, bytes_new: 0 };
    // Ids handled in this push: repeated chunks (zeros, copies) are
    // queried and sent once. 32 bytes per distinct chunk.
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut uploads: JoinSet<Result<(u64, u64)>> = JoinSet::new();
    let mut group: Vec<RawChunk> = Vec::new();
    let mut group_bytes = 0usize;
    let mut batch: Vec<RawChunk> = Vec::with_capacity(QUERY_BATCH);
    loop {
        batch.clear();
        let Some(first) = rx.recv().await else { break };
        batch.push(first);
        while batch.len() < QUERY_BATCH.min(MAX_IDS) {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        c.chunks += batch.len() as u64;
        let mut fresh: Vec<RawChunk> = Vec::with_capacity(batch.len());
        for ch in batch.drain(..) {
            if seen.insert(ch.id) {
                fresh.push(ch);
            }
        }
        if fresh.is_empty() {
            continue;
        }
        let missing = client.missing(session, fresh.iter().map(|x| x.id).collect()).await?;
        let mut fresh: Vec<Option<RawChunk>> = fresh.into_iter().map(Some).collect();
        for i in missing {
            let ch = fresh[i as usize].take().expect("index checked by client");
            group_bytes += ch.data.len();
            group.push(ch);
            if group_bytes >= UPLOAD_GROUP_BYTES {
                send_group(&mut uploads, &mut c, &progress, &client, session, std::mem::take(&mut group), level)
                    .await?;
                group_bytes = 0;
            }
        }
        // Keep the pipe moving: a partial group goes out when the producer
        // has nothing queued.
        if !group.is_empty() && rx.is_empty() {
            send_group(&mut uploads, &mut c, &progress, &client, session, std::mem::take(&mut group), level).await?;
            group_bytes = 0;
        }
        while let Some(done) = uploads.try_join_next() {
            account(done, &mut c, &progress)?;
        }
    }
    if !group.is_empty() {
        send_group(&mut uploads, &mut c, &progress, &client, session, group, level).await?;
    }
    while let Some(done) = uploads.join_next().await {
        account(done, &mut c, &progress)?;
    }
    Ok(c)
}

fn account(
    done: std::result::Result<Result<(u64, u64)>, tokio::task::JoinError>,
    c: &mut Counters,
    progress: &Arc<dyn Progress>,
) -> Result<()> {
    let (sent, new) = done.map_err(|e| ClientError::Io(format!("upload task: {e}")))??;
    c.bytes_sent += sent;
    c.bytes_new += new;
    progress.uploaded(sent);
    Ok(())
}

async fn send_group(
    uploads: &mut JoinSet<Result<(u64, u64)>>,
    c: &mut Counters,
    progress: &Arc<dyn Progress>,
    client: &Arc<Client>,
    session: u64,
    group: Vec<RawChunk>,
    level: i32,
) -> Result<()> {
    // Bounded: wait for a slot before starting another upload.
    while uploads.len() >= UPLOADERS {
        if let Some(done) = uploads.join_next().await {
            account(done, c, progress)?;
        }
    }
    c.chunks_sent += group.len() as u64;
    let client = client.clone();
    uploads.spawn(async move {
        // Compression is CPU work: off the async runtime.
        let blobs = tokio::task::spawn_blocking(move || {
            group.into_iter().map(|ch| (ch.id, blob::encode(&ch.data, level))).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ClientError::Io(e.to_string()))?;
        let sent: u64 = blobs.iter().map(|(_, b)| b.len() as u64).sum();
        let new = tokio::time::timeout(Duration::from_secs(300), client.put(session, blobs))
            .await
            .map_err(|_| ClientError::Io("upload timed out".into()))??;
        Ok((sent, new))
    });
    Ok(())
}
