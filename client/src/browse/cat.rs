//! `bkp cat SNAP PATH`: one file's content to stdout, streamed through
//! restore's fetcher (every chunk checked against its id, the whole
//! content against the file's hash at the end: a mismatch fails the
//! command after the bytes were written, as `restore --stdout` does).

use std::cmp::Ordering;
use std::sync::Arc;

use bkp_common::names::escape_bytes;
use bkp_common::tree::Entry;
use bkp_common::SnapshotId;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::records::walk_cmp;
use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::progress::Silent;
use crate::restore::fetch::{fetch_stage, Item, Out};
use crate::restore::sink::{Sink, Stdout};
use crate::restore::TreeReader;

/// Writes the file at `path` of snapshot `id` to stdout; returns its size.
pub async fn cat(client: Arc<Client>, id: SnapshotId, path: &str) -> Result<u64> {
    let snap = Arc::new(client.snapshot(id).await?);
    let want = path.trim_matches('/').as_bytes().to_vec();
    if want.is_empty() {
        return Err(ClientError::Usage("the snapshot root is a directory; give the path of a file".into()));
    }
    let (item_tx, item_rx) = mpsc::channel::<Item>(1024);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<Out>>(4);
    let (c, h, s) = (client.clone(), Handle::current(), snap.clone());
    let finder = tokio::task::spawn_blocking(move || find_file(c, h, &s, want, id, item_tx));
    let fetcher = fetch_stage(client, item_rx, out_tx);
    let writer = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut sink: Box<dyn Sink> = Box::new(Stdout::new(Arc::new(Silent)));
        while let Some(outs) = out_rx.blocking_recv() {
            for o in outs {
                sink.handle(o)?;
            }
        }
        Ok(sink.finish()?.bytes)
    });
    let (f, g, w) = tokio::join!(finder, fetcher, writer);
    let join = |e: tokio::task::JoinError| ClientError::Task { what: "cat thread", source: e };
    // Not found, or not a file: the finder says why, and nothing was written.
    f.map_err(join)??;
    let bytes = w.map_err(join)??;
    g?;
    Ok(bytes)
}

fn find_file(
    client: Arc<Client>,
    handle: Handle,
    snap: &bkp_common::snapshot::Snapshot,
    mut want: Vec<u8>,
    id: SnapshotId,
    tx: mpsc::Sender<Item>,
) -> Result<()> {
    let asked = want.clone();
    // A hardlink names a file earlier in the stream: look again for it.
    for _ in 0..2 {
        let mut r = TreeReader::new(client.clone(), handle.clone(), snap);
        let mut sending = false;
        while let Some(e) = r.next_entry()? {
            if sending {
                let done = match e {
                    Entry::Chunks(refs) => refs.into_iter().any(|c| tx.blocking_send(Item::Chunk(c)).is_err()),
                    end @ Entry::FileEnd { .. } => {
                        let _ = tx.blocking_send(Item::Entry(end));
                        true
                    }
                    _ => return Err(crate::error::Corruption::Layout("snapshot tree: an entry inside a file").into()),
                };
                if done {
                    return Ok(()); // sent, or the writer failed and says why
                }
                continue;
            }
            let Some(p) = e.path() else { continue };
            match walk_cmp(p, &want) {
                Ordering::Less => continue,
                Ordering::Greater => break, // walk order: it is not there
                Ordering::Equal => {}
            }
            let shown = escape_bytes(&asked);
            let what = match &e {
                Entry::File { .. } => {
                    sending = true;
                    // Chunk lists go to the fetcher only; the entry itself
                    // tells the sink a file starts.
                    if tx.blocking_send(Item::Entry(e.clone())).is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Entry::Hardlink { target, .. } => {
                    want = target.clone();
                    break;
                }
                Entry::Dir { .. } => "a directory; `bkp ls SNAPSHOT PATH` lists it".to_string(),
                Entry::Symlink { target, .. } => format!("a symlink to {}; cat its target", escape_bytes(target)),
                _ => "not a regular file (a device, fifo or socket)".to_string(),
            };
            return Err(ClientError::Usage(format!("{shown} in snapshot {} is {what}", id.short())));
        }
        if sending {
            return Err(crate::error::Corruption::Layout("snapshot tree ended inside a file").into());
        }
        if want == asked {
            break;
        }
    }
    Err(ClientError::Usage(format!(
        "{}: no such file in snapshot {} (paths are relative to the snapshot root, as `bkp ls` prints them)",
        escape_bytes(&asked),
        id.short()
    )))
}
