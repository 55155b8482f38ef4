//! `bkp restore`: bring a snapshot back to a directory or to stdout, or
//! (`--verify-only`) fetch and check all of it without writing anything.
//! Three stages: a planner thread reads the tree and picks entries, the
//! fetcher ([`crate::fetch`]) keeps many chunks in flight and checks each
//! against its id, and a sink thread writes (or only hashes) each file,
//! checking its whole-content hash. Restore and verify differ only in the
//! sink.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use bkp_common::snapshot::SnapshotKind;
use bkp_common::tree::Entry;
use bkp_common::{ContentHash, SnapshotId};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::fetch::{fetch_stage, Item, Out};
use crate::progress::Progress;
use crate::write::TreeWriter;

pub use crate::fetch::TreeReader;

/// Items queued between the planner and the fetcher.
const ITEMS: usize = 4096;
/// Fetched segments (up to ~8 MiB each) queued for the sink.
const SEGMENTS: usize = 4;

pub struct RestoreOptions {
    /// `None` streams the single file of a stream snapshot to stdout.
    pub target: Option<PathBuf>,
    pub include: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    /// Files restored (or verified).
    pub files: u64,
    pub bytes: u64,
    /// One line per entry that was not restored (or failed verification).
    pub errors: Vec<String>,
}

/// Where the fetched data goes, on its own thread.
pub trait Sink: Send {
    fn handle(&mut self, o: Out) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<RestoreReport>;
}

fn included(path: &[u8], include: &[Vec<u8>]) -> bool {
    include.is_empty()
        || include.iter().any(|i| path == &i[..] || (path.starts_with(i) && path.get(i.len()) == Some(&b'/')))
}

pub async fn restore(
    client: Arc<Client>,
    id: SnapshotId,
    opts: RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport> {
    let snap = client.snapshot(id).await?;
    let sink: Box<dyn Sink> = match opts.target {
        Some(t) => {
            let p = progress.clone();
            tokio::task::spawn_blocking(move || TreeWriter::new(&t, p).map(|w| Box::new(w) as Box<dyn Sink>))
                .await
                .map_err(|e| ClientError::Restore(format!("restore thread: {e}")))??
        }
        None if snap.kind != SnapshotKind::Stream => {
            return Err(ClientError::Input(format!(
                "snapshot {} is a file tree; --stdout restores stream snapshots, use --target DIR",
                id.short()
            )))
        }
        None => Box::new(Stdout { hasher: blake3::Hasher::new(), report: RestoreReport::default(), progress }),
    };
    run(client, snap, opts.include, sink).await
}

/// Fetches and checks every chunk and every file's content hash of a
/// snapshot (or of the `include`d paths) without writing anything.
/// Failures are listed in the report, one per file, not returned as errors.
pub async fn verify(
    client: Arc<Client>,
    id: SnapshotId,
    include: Vec<String>,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport> {
    let snap = client.snapshot(id).await?;
    let shown_root = if snap.kind == SnapshotKind::Tree { "/" } else { "" };
    let sink = Verifier { file: None, root: shown_root, report: RestoreReport::default(), progress };
    run(client, snap, include, Box::new(sink)).await
}

async fn run(
    client: Arc<Client>,
    snap: bkp_common::snapshot::Snapshot,
    include: Vec<String>,
    mut sink: Box<dyn Sink>,
) -> Result<RestoreReport> {
    let include: Vec<Vec<u8>> =
        include.iter().map(|i| i.trim_start_matches('/').trim_end_matches('/').as_bytes().to_vec()).collect();
    let (item_tx, item_rx) = mpsc::channel::<Item>(ITEMS);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<Out>>(SEGMENTS);
    let reader = TreeReader::new(client.clone(), Handle::current(), &snap);
    let planner = tokio::task::spawn_blocking(move || plan(reader, &include, item_tx));
    let fetcher = fetch_stage(client, item_rx, out_tx);
    let writer = tokio::task::spawn_blocking(move || -> Result<RestoreReport> {
        while let Some(outs) = out_rx.blocking_recv() {
            for o in outs {
                sink.handle(o)?;
            }
        }
        sink.finish()
    });
    let (p, f, w) = tokio::join!(planner, fetcher, writer);
    let join = |e: tokio::task::JoinError| ClientError::Restore(format!("restore thread: {e}"));
    // The writer's error is the cause when it stopped first; the others
    // then only saw a closed channel.
    let report = w.map_err(join)??;
    f?;
    p.map_err(join)??;
    Ok(report)
}

/// Emits the kept entries, and one item per data chunk of each kept file.
fn plan(mut reader: TreeReader, include: &[Vec<u8>], tx: mpsc::Sender<Item>) -> Result<()> {
    let mut in_file = false;
    while let Some(e) = reader.next_entry()? {
        let keep = match &e {
            Entry::File { path, .. } => {
                in_file = included(path, include);
                in_file
            }
            Entry::Chunks(refs) => {
                if in_file {
                    for r in refs {
                        if tx.blocking_send(Item::Chunk(*r)).is_err() {
                            return Ok(());
                        }
                    }
                }
                false
            }
            Entry::FileEnd { .. } => in_file,
            other => included(other.path().unwrap_or_default(), include),
        };
        if keep && tx.blocking_send(Item::Entry(e)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// A stream snapshot to stdout: chunks are written as they come (each
/// already checked); the whole-stream hash is compared at the end, so a
/// mismatch is a non-zero exit after the bytes were written.
struct Stdout {
    hasher: blake3::Hasher,
    report: RestoreReport,
    progress: Arc<dyn Progress>,
}

impl Sink for Stdout {
    fn handle(&mut self, o: Out) -> Result<()> {
        match o {
            Out::Data { data: d, .. } => {
                crate::par::hash_while(&d, &mut self.hasher, || std::io::stdout().lock().write_all(&d))
                    .map_err(|e| ClientError::Restore(format!("writing to stdout: {e}")))?;
                self.report.bytes += d.len() as u64;
                self.progress.restored(d.len() as u64);
            }
            Out::Bad { id, reason } => {
                return Err(ClientError::Corrupt(format!("chunk {} of the stream: {reason}", id.short())))
            }
            Out::Entry(Entry::FileEnd { hash }) => {
                if ContentHash::from(self.hasher.finalize()) != hash {
                    return Err(ClientError::Corrupt("stream content hash mismatch".into()));
                }
                self.report.files += 1;
            }
            Out::Entry(_) => {}
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<RestoreReport> {
        std::io::stdout().flush().map_err(|e| ClientError::Restore(format!("writing to stdout: {e}")))?;
        Ok(self.report)
    }
}

/// `--verify-only`: hashes what a restore would write.
struct Verifier {
    file: Option<Checking>,
    root: &'static str,
    report: RestoreReport,
    progress: Arc<dyn Progress>,
}

struct Checking {
    path: Vec<u8>,
    hasher: blake3::Hasher,
    bytes: u64,
    bad: Option<String>,
}

impl Verifier {
    fn shown(&self, path: &[u8]) -> String {
        format!("{}{}", self.root, String::from_utf8_lossy(path))
    }
}

impl Sink for Verifier {
    fn handle(&mut self, o: Out) -> Result<()> {
        let outside = || ClientError::Corrupt("snapshot tree: data outside a file".into());
        match o {
            Out::Entry(Entry::File { path, .. }) => {
                self.file = Some(Checking { path, hasher: blake3::Hasher::new(), bytes: 0, bad: None });
            }
            Out::Data { data: d, .. } => {
                let f = self.file.as_mut().ok_or_else(outside)?;
                f.hasher.update(&d);
                f.bytes += d.len() as u64;
                self.progress.restored(d.len() as u64);
            }
            Out::Bad { id, reason } => {
                let f = self.file.as_mut().ok_or_else(outside)?;
                f.bad.get_or_insert(format!("chunk {}: {reason}", id.short()));
            }
            Out::Entry(Entry::FileEnd { hash }) => {
                let f = self.file.take().ok_or_else(outside)?;
                let failure = match f.bad {
                    Some(why) => Some(why),
                    None if ContentHash::from(f.hasher.finalize()) != hash => {
                        Some("content does not match the snapshot".to_string())
                    }
                    None => None,
                };
                match failure {
                    Some(why) => self.report.errors.push(format!("{}: {why}", self.shown(&f.path))),
                    None => {
                        self.report.files += 1;
                        self.report.bytes += f.bytes;
                    }
                }
            }
            Out::Entry(_) => {}
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<RestoreReport> {
        if self.file.is_some() {
            return Err(ClientError::Corrupt("snapshot tree ended inside a file".into()));
        }
        Ok(self.report)
    }
}
