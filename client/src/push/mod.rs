//! `bkp push`: a producer thread (walk, read, chunk, hash; see `walk`)
//! feeds the pipeline (dedup query, compression pool, uploads; see
//! `pipeline`), then the commit. Every stage is bounded, so memory stays
//! flat.
//!
//! A push that fails is reported to the server (`Request::PushFailed`) so
//! that it alerts now rather than when the set goes stale: on the same
//! connection, or on a new one when the failure was the connection's. A
//! lost connection says whether anything was committed.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bkp_common::snapshot::{Incomplete, SnapshotKind, SnapshotSummary};
use bkp_common::tree::Meta;

use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::progress::Progress;
use cache::Header;
pub use excludes::ExcludeSpec;
use excludes::Excludes;
use incremental::{CacheSpec, Incremental};
use pipeline::ChunkSink;
pub use walk::Skipped;
use walk::{Produced, Producer};

pub mod cache;
pub mod excludes;
pub mod file_meta;
pub mod incremental;
pub mod lister;
pub mod pipeline;
pub mod walk;

pub enum Source {
    Paths {
        paths: Vec<PathBuf>,
        /// What to leave out.
        excludes: ExcludeSpec,
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
    /// Plain, or sealed with a key group's key (`encryption` in client.toml).
    pub ids: crate::crypt::ChunkIds,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    pub snapshot: SnapshotSummary,
    pub bytes_read: u64,
    pub chunks: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub bytes_new: u64,
    /// Regular files read and chunked.
    pub files_read: u64,
    /// Regular files taken unchanged from the metadata cache.
    pub files_cached: u64,
    pub seconds: f64,
    /// Of which the commit request took (the server's tree check and
    /// durable write; `make bench-fleet` reports it under load).
    pub commit_seconds: f64,
    pub warnings: Vec<String>,
    /// Paths that could not be read and are not in the snapshot (its
    /// summary is marked incomplete; `bkp push` exits 3).
    pub skipped: Vec<Skipped>,
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// The metadata cache of a tree push, opened on the producer thread.
struct CacheArgs {
    spec: CacheSpec,
    header: Header,
    client: Arc<Client>,
    session: u64,
    start_ns: i64,
}

/// Runs the producer for `source` on the current (blocking) thread.
fn produce(
    source: Source,
    name: &str,
    sink: ChunkSink,
    progress: Arc<dyn Progress>,
    cache: Option<CacheArgs>,
) -> Result<Produced> {
    let stream_meta = Meta { mode: 0o600, mtime_ns: now_ns(), ..Meta::default() };
    match source {
        Source::Paths { paths, excludes } => {
            let cache = cache.map(|a| Incremental::open(&a.spec, a.header, a.client, a.session, a.start_ns));
            let excludes = Excludes::from_spec(&excludes)?;
            let mut p = Producer::new(sink, progress, excludes, cache);
            p.walk_roots(&paths)?;
            p.finish()
        }
        Source::Stdin => produce(Source::Reader(Box::new(std::io::stdin())), name, sink, progress, None),
        Source::Reader(r) => {
            let mut p = Producer::new(sink, progress, Excludes::new(&[])?, None);
            p.file_from_reader(name.as_bytes().to_vec(), stream_meta, r)?;
            p.finish()
        }
        Source::Command(argv) => {
            let (prog, args) =
                argv.split_first().ok_or_else(|| ClientError::Usage("no command given after --".into()))?;
            let shown = prog.to_string_lossy().to_string();
            let mut child = Command::new(prog)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| ClientError::source(format!("cannot run {shown}"), e))?;
            let stdout = child.stdout.take().expect("piped stdout");
            let mut p = Producer::new(sink, progress, Excludes::new(&[])?, None);
            let read = p.file_from_reader(name.as_bytes().to_vec(), stream_meta, stdout);
            if read.is_err() {
                let _ = child.kill();
            }
            let status = child.wait().map_err(|e| ClientError::source(format!("waiting for {shown}"), e))?;
            read?;
            // A failed dump must never look like a good backup.
            if !status.success() {
                return Err(ClientError::DumpFailed { command: shown, status });
            }
            p.finish()
        }
    }
}

/// A push without a metadata cache.
pub async fn push(client: Arc<Client>, opts: PushOptions, progress: Arc<dyn Progress>) -> Result<PushReport> {
    push_with(client, opts, None, progress).await
}

/// How long the failure report may take on the push's own connection.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection for the report is tried (the server may be
/// restarting); the command's exit waits for this at most.
const REPORT_RECONNECT: Duration = Duration::from_secs(10);

/// A push; a file tree uses the metadata cache described by `cache`.
pub async fn push_with(
    client: Arc<Client>,
    opts: PushOptions,
    cache: Option<CacheSpec>,
    progress: Arc<dyn Progress>,
) -> Result<PushReport> {
    let kind = match opts.source {
        Source::Paths { .. } => SnapshotKind::Tree,
        _ => SnapshotKind::Stream,
    };
    let name = opts.name.clone();
    let e = match push_inner(client.clone(), opts, kind, cache, progress).await {
        Ok(r) => return Ok(r),
        // Before the commit was sent, nothing landed.
        Err(ClientError::Link(source)) if client.is_closed() => ClientError::Lost { source, note: String::new() },
        Err(ClientError::Link(source)) => ClientError::NotCommitted(source),
        Err(e) => e,
    };
    // The commit may have landed: a failure report could raise a false alert.
    if matches!(e, ClientError::CommitUnknown(_)) {
        return Err(e);
    }
    match (report(&client, &name, kind, &e).await, e) {
        (Some(note), ClientError::Lost { source, .. }) => Err(ClientError::Lost { source, note: format!(" ({note})") }),
        (_, e) => Err(e),
    }
}

/// Tells the server about a failed push; `Some` says why it could not.
async fn report(client: &Client, name: &str, kind: SnapshotKind, e: &ClientError) -> Option<String> {
    let reason = e.to_string();
    match tokio::time::timeout(REPORT_TIMEOUT, client.push_failed(name, Some(kind), &reason)).await {
        Ok(Ok(())) => return None,
        Ok(Err(e)) if !e.retryable() => {
            return Some(match e {
                ClientError::Server(m, _) => format!("the server refused the failure report: {m}"),
                e => format!("the server was not told of the failure: {e}"),
            })
        }
        // The connection is gone or the server busy: a new connection
        // may get through (the server may be back already).
        _ => {}
    }
    let again = async {
        let c = client.reconnect(REPORT_RECONNECT).await?;
        let r = c.push_failed(name, Some(kind), &reason).await;
        c.close().await;
        r
    };
    match tokio::time::timeout(REPORT_RECONNECT + REPORT_TIMEOUT, again).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("the server was not told of the failure: {e}")),
        Err(_) => Some("the server was not told of the failure: no answer".into()),
    }
}

fn cache_name(opts: &PushOptions) -> String {
    match &opts.ids {
        crate::crypt::ChunkIds::Plain => opts.name.clone(),
        crate::crypt::ChunkIds::Sealed(r) => format!("{} (sealed, key {})", opts.name, r.current().key_id()),
    }
}

async fn push_inner(
    client: Arc<Client>,
    opts: PushOptions,
    kind: SnapshotKind,
    cache: Option<CacheSpec>,
    progress: Arc<dyn Progress>,
) -> Result<PushReport> {
    let start = Instant::now();
    let start_ns = now_ns();
    // Bad excludes fail before a session is started.
    let scan = match &opts.source {
        Source::Paths { paths, excludes } => {
            let ex = Excludes::from_spec(excludes)?;
            progress.wants_totals().then(|| walk::Scan::start(paths.clone(), ex, progress.clone()))
        }
        _ => None,
    };
    let session = client.start_push(&opts.name, kind).await?;
    let cache = cache.filter(|_| kind == SnapshotKind::Tree).map(|spec| CacheArgs {
        spec,
        // A cache of its own per key: the chunk ids it keeps are the key's.
        header: Header { server: client.server.clone(), host: client.host.clone(), name: cache_name(&opts) },
        client: client.clone(),
        session,
        start_ns,
    });
    let (sink, pipeline) =
        pipeline::start(client.clone(), session, opts.zstd_level, opts.ids.clone(), progress.clone());
    let name = opts.name.clone();
    let source = opts.source;
    let producer = tokio::task::spawn_blocking(move || produce(source, &name, sink, progress, cache));
    // The pipeline ends when the producer drops its sink; a pipeline error
    // drops the channel, which stops the producer.
    let (produced, counters) = tokio::join!(producer, pipeline);
    drop(scan);
    let counters = counters?;
    let produced = produced.map_err(|e| ClientError::Task { what: "reader thread", source: e })??;
    let incomplete = Incomplete::of(produced.skipped.iter().map(|s| s.path.as_str()));
    let committing = Instant::now();
    let snapshot = client.commit(session, produced.tree, incomplete).await?;
    let commit_seconds = committing.elapsed().as_secs_f64();
    let mut warnings = produced.warnings;
    // Only now is the new cache true: every chunk it names is in a snapshot.
    if let Some(w) = produced.cache {
        match tokio::task::spawn_blocking(move || w.commit()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warnings.push(format!("{e}; the next push reads every file again")),
            Err(e) => warnings.push(format!("saving the metadata cache: {e}")),
        }
    }
    Ok(PushReport {
        // Counted by the server from the tree: what was read and chunked.
        bytes_read: snapshot.stats.bytes,
        snapshot,
        chunks: counters.chunks,
        chunks_sent: counters.chunks_sent,
        bytes_sent: counters.bytes_sent,
        bytes_new: counters.bytes_new,
        files_read: produced.files_read,
        files_cached: produced.files_cached,
        seconds: start.elapsed().as_secs_f64(),
        commit_seconds,
        warnings,
        skipped: produced.skipped,
    })
}
