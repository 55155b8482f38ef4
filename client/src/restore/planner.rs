//! Restore's first stage: reads the snapshot's tree and picks the entries
//! to restore (`--include`, `--exclude`), with one item per data chunk of each kept
//! file for the fetcher.

use bkp_common::tree::Entry;
use tokio::sync::mpsc;

use super::fetch::{Item, TreeReader};
use super::select::Selection;
use crate::error::Result;

/// Emits the kept entries, and one item per data chunk of each kept file.
pub fn plan(mut reader: TreeReader, sel: &Selection, tx: mpsc::Sender<Item>) -> Result<()> {
    let mut in_file = false;
    while let Some(e) = reader.next_entry()? {
        let keep = match &e {
            Entry::File { path, .. } => {
                in_file = sel.keeps(path);
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
            other => sel.keeps(other.path().unwrap_or_default()),
        };
        if keep && tx.blocking_send(Item::Entry(e)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
