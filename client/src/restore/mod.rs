//! `bkp restore`: bring a snapshot back to a directory or to stdout, or
//! (`--verify-only`) fetch and check all of it without writing anything.
//! Three stages: a planner thread ([`planner`]) reads the tree and picks entries, the
//! fetcher ([`fetch`]) keeps many chunks in flight and checks each
//! against its id, and a sink thread writes (or only hashes) each file,
//! checking its whole-content hash. Restore and verify differ only in the
//! sink.

use std::path::PathBuf;
use std::sync::Arc;

use bkp_common::snapshot::{Snapshot, SnapshotKind};
use bkp_common::tree::Entry;
use bkp_common::SnapshotId;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::progress::Progress;
use fetch::{fetch_stage, Item, Out};
use select::{Selection, Tally};
use sink::{Stdout, Verifier};
use tree_writer::TreeWriter;

pub use fetch::TreeReader;
pub use sink::{RestoreReport, Sink};

pub mod fetch;
pub mod file_meta;
pub mod planner;
pub mod progress_bar;
pub mod safe_path;
pub mod select;
pub mod sink;
pub mod snapshot_spec;
pub mod tree_writer;

/// Items queued between the planner and the fetcher.
const ITEMS: usize = 4096;
/// Fetched segments (up to ~8 MiB each) queued for the sink.
const SEGMENTS: usize = 4;

pub struct RestoreOptions {
    /// `None` streams the single file of a stream snapshot to stdout.
    pub target: Option<PathBuf>,
    /// `--include` / `--exclude` globs ([`select`]).
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

pub async fn restore(
    client: Arc<Client>,
    id: SnapshotId,
    opts: RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport> {
    let sel = Selection::new(&opts.include, &opts.exclude)?;
    let snap = client.snapshot(id).await?;
    // Before the target is touched: a pattern that matches nothing is an error.
    let total = tally(&client, &snap, &sel).await?;
    open_first_chunk(&client, &snap).await?;
    let sink: Box<dyn Sink> = match opts.target {
        Some(t) => {
            let p = progress.clone();
            tokio::task::spawn_blocking(move || TreeWriter::new(&t, p).map(|w| Box::new(w) as Box<dyn Sink>))
                .await
                .map_err(|e| ClientError::Task { what: "restore thread", source: e })??
        }
        None if snap.kind != SnapshotKind::Stream => {
            return Err(ClientError::Usage(format!(
                "snapshot {} is a file tree; --stdout restores stream snapshots, use --target DIR",
                id.short()
            )))
        }
        None => Box::new(Stdout::new(progress.clone())),
    };
    progress.restore_total(total);
    run(client, snap, sel, sink).await
}

/// Fetches and checks every chunk and every file's content hash of a
/// snapshot (or of the `include`d paths) without writing anything.
/// Failures are listed in the report, one per file, not returned as errors.
pub async fn verify(
    client: Arc<Client>,
    id: SnapshotId,
    include: Vec<String>,
    exclude: Vec<String>,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport> {
    let sel = Selection::new(&include, &exclude)?;
    let snap = client.snapshot(id).await?;
    let total = tally(&client, &snap, &sel).await?;
    let shown_root = if snap.kind == SnapshotKind::Tree { "/" } else { "" };
    progress.restore_total(total);
    let sink = Verifier::new(shown_root, progress);
    run(client, snap, sel, Box::new(sink)).await
}

/// A sealed snapshot restored without its key (or with another group's)
/// fails here, before the target is touched: its first data chunk is
/// fetched and opened. A chunk that is only damaged fails its own file
/// later, as ever.
async fn open_first_chunk(client: &Arc<Client>, snap: &Snapshot) -> Result<()> {
    let reader = TreeReader::new(client.clone(), Handle::current(), snap);
    let first = tokio::task::spawn_blocking(move || -> Result<Option<bkp_common::ChunkId>> {
        let mut reader = reader;
        while let Some(e) = reader.next_entry()? {
            if let Some(r) = match &e {
                Entry::Chunks(refs) => refs.first(),
                _ => None,
            } {
                return Ok(Some(r.id));
            }
        }
        Ok(None)
    })
    .await
    .map_err(|e| ClientError::Task { what: "restore thread", source: e })??;
    match first {
        Some(id) => match client.chunk(id).await {
            Err(e @ ClientError::Key(_)) => Err(e),
            _ => Ok(()),
        },
        None => Ok(()),
    }
}

/// The bytes a restore with `sel` writes. With patterns, a pass over the
/// tree (only the tree, no data) that fails naming each pattern that
/// matched nothing.
async fn tally(client: &Arc<Client>, snap: &Snapshot, sel: &Selection) -> Result<u64> {
    if sel.is_all() {
        return Ok(snap.stats.bytes);
    }
    let reader = TreeReader::new(client.clone(), Handle::current(), snap);
    let sel = sel.clone();
    tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let mut t = Tally::new(&sel);
        while let Some(e) = reader.next_entry()? {
            match &e {
                Entry::File { path, size, .. } => t.entry(path, *size),
                other => {
                    if let Some(p) = other.path() {
                        t.entry(p, 0)
                    }
                }
            }
        }
        t.check()?;
        Ok(t.bytes)
    })
    .await
    .map_err(|e| ClientError::Task { what: "restore thread", source: e })?
}

async fn run(client: Arc<Client>, snap: Snapshot, sel: Selection, mut sink: Box<dyn Sink>) -> Result<RestoreReport> {
    let (item_tx, item_rx) = mpsc::channel::<Item>(ITEMS);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<Out>>(SEGMENTS);
    let reader = TreeReader::new(client.clone(), Handle::current(), &snap);
    let planner = tokio::task::spawn_blocking(move || planner::plan(reader, &sel, item_tx));
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
    let join = |e: tokio::task::JoinError| ClientError::Task { what: "restore thread", source: e };
    // The writer's error is the cause when it stopped first; the others
    // then only saw a closed channel.
    let report = w.map_err(join)??;
    f?;
    p.map_err(join)??;
    Ok(report)
}
