//! Where restore's fetched data goes: the [`Sink`] a restore writes
//! through (a directory target is [`super::tree_writer::TreeWriter`]),
//! the stream to stdout, and `--verify-only`'s hashing sink.

use std::io::Write;
use std::sync::Arc;

use bkp_common::tree::Entry;
use bkp_common::ContentHash;

use super::fetch::Out;
use crate::error::{ClientError, Corruption, Result};
use crate::progress::Progress;

#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    /// Files restored (or verified).
    pub files: u64,
    pub bytes: u64,
    /// One line per entry that was not restored (or failed verification).
    pub errors: Vec<String>,
    /// One line per kind of metadata that could not be restored (extended
    /// attributes, ACLs, file flags), with how many entries it hit.
    pub warnings: Vec<String>,
}

/// Where the fetched data goes, on its own thread.
pub trait Sink: Send {
    fn handle(&mut self, o: Out) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<RestoreReport>;
}

/// A stream snapshot to stdout: chunks are written as they come (each
/// already checked); the whole-stream hash is compared at the end, so a
/// mismatch is a non-zero exit after the bytes were written.
pub struct Stdout {
    hasher: blake3::Hasher,
    report: RestoreReport,
    progress: Arc<dyn Progress>,
}

impl Stdout {
    pub fn new(progress: Arc<dyn Progress>) -> Self {
        Self { hasher: blake3::Hasher::new(), report: RestoreReport::default(), progress }
    }
}

impl Sink for Stdout {
    fn handle(&mut self, o: Out) -> Result<()> {
        match o {
            Out::Data { data: d, .. } => {
                crate::parallel_hash::hash_while(&d, &mut self.hasher, || std::io::stdout().lock().write_all(&d))
                    .map_err(|e| ClientError::Write { what: "writing to stdout".into(), source: e })?;
                self.report.bytes += d.len() as u64;
                self.progress.restored(d.len() as u64);
            }
            Out::Bad { id, reason } => return Err(Corruption::StreamChunk { id: id.short(), reason }.into()),
            Out::Entry(Entry::FileEnd { hash }) => {
                if ContentHash::from(self.hasher.finalize()) != hash {
                    return Err(Corruption::StreamHash.into());
                }
                self.report.files += 1;
            }
            Out::Entry(_) => {}
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<RestoreReport> {
        std::io::stdout().flush().map_err(|e| ClientError::Write { what: "writing to stdout".into(), source: e })?;
        Ok(self.report)
    }
}

/// `--verify-only`: hashes what a restore would write.
pub struct Verifier {
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
    /// `root` is put before the stored paths in its messages.
    pub fn new(root: &'static str, progress: Arc<dyn Progress>) -> Self {
        Self { file: None, root, report: RestoreReport::default(), progress }
    }

    fn shown(&self, path: &[u8]) -> String {
        format!("{}{}", self.root, String::from_utf8_lossy(path))
    }
}

impl Sink for Verifier {
    fn handle(&mut self, o: Out) -> Result<()> {
        let outside = || ClientError::from(Corruption::Layout("snapshot tree: data outside a file"));
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
            return Err(Corruption::Layout("snapshot tree ended inside a file").into());
        }
        Ok(self.report)
    }
}
