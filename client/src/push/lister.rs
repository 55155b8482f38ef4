//! The order of a tree walk, listed ahead of the producer on a thread of
//! its own: directories read, children sorted by name, every entry
//! `lstat`ed relative to its open directory, excluded paths skipped (see
//! `excludes`; with `--one-file-system` a directory on another file system
//! than its root is listed, its contents not). In an
//! incremental push most files come from the metadata cache, and reading
//! directories and stat-ing 78,000 entries was half of what the producer
//! did; listing ahead lets the two halves run on both cores.

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use bkp_common::tree::FLAG_NODUMP;

use super::excludes::Excludes;

/// Batches queued ahead, and entries per batch (one hand-off per entry
/// would wake a thread per entry).
const AHEAD: usize = 16;
const BATCH: usize = 256;

/// One step of the walk, in walk order.
pub enum Listed {
    /// An entry, its own metadata (a symlink is not followed) and its
    /// `chattr` flags.
    Entry(PathBuf, Metadata, u32),
    /// A path that could not be listed or stat-ed, and why; the walk
    /// goes on without it (a directory: without its contents).
    Unreadable(PathBuf, String),
}

/// Lists `root` (already stat-ed as `meta`) and everything below it on a
/// thread in `scope`. The listing stops early when the receiver is dropped.
pub fn spawn<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    root: PathBuf,
    meta: Metadata,
    excludes: &'scope Excludes,
) -> std::io::Result<Receiver<Vec<Listed>>> {
    let (tx, rx) = sync_channel(AHEAD);
    std::thread::Builder::new().name("bkp-list".into()).spawn_scoped(scope, move || {
        let mut out = Out { tx, batch: Vec::with_capacity(BATCH) };
        let walk = Walk { excludes, dev: meta.dev() };
        if walk.list(&root, meta, &mut out) {
            out.flush();
        }
    })?;
    Ok(rx)
}

struct Out {
    tx: SyncSender<Vec<Listed>>,
    batch: Vec<Listed>,
}

impl Out {
    /// False once nobody listens.
    fn push(&mut self, l: Listed) -> bool {
        self.batch.push(l);
        self.batch.len() < BATCH || self.flush()
    }

    fn flush(&mut self) -> bool {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        batch.is_empty() || self.tx.send(batch).is_ok()
    }
}

/// Children of a directory kept as read, each entry stat-ed relative to
/// the open directory. A `DirEntry` and its name cost ~130 bytes, so a
/// directory of 2,000,000 files held 260 MB; past this many children only
/// the names are kept, packed in one buffer (~20 bytes each), and each is
/// stat-ed by path (a path lookup more per entry, in huge directories only).
const KEEP_ENTRIES: usize = 65_536;

#[derive(Default)]
struct Children {
    entries: Vec<(OsString, fs::DirEntry)>,
    /// Past KEEP_ENTRIES: every name's bytes, and where each one is.
    names: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl Children {
    fn push(&mut self, e: fs::DirEntry) {
        if self.spans.is_empty() && self.entries.len() < KEEP_ENTRIES {
            self.entries.push((e.file_name(), e));
            return;
        }
        for (name, _) in std::mem::take(&mut self.entries) {
            self.push_name(name.as_bytes());
        }
        self.push_name(e.file_name().as_bytes());
    }

    fn push_name(&mut self, name: &[u8]) {
        self.spans.push((self.names.len(), name.len()));
        self.names.extend_from_slice(name);
    }

    /// By name bytes (what `OsString`'s order is on Unix), with the
    /// entry when it was kept.
    fn sorted(mut self) -> Box<dyn Iterator<Item = (OsString, Option<fs::DirEntry>)>> {
        if self.spans.is_empty() {
            self.entries.sort_by(|a, b| a.0.cmp(&b.0));
            return Box::new(self.entries.into_iter().map(|(n, e)| (n, Some(e))));
        }
        let names = self.names;
        self.spans.sort_unstable_by(|a, b| names[a.0..a.0 + a.1].cmp(&names[b.0..b.0 + b.1]));
        Box::new(self.spans.into_iter().map(move |(o, l)| (OsString::from_vec(names[o..o + l].to_vec()), None)))
    }
}

/// One root's walk: what to leave out, and the root's file system.
struct Walk<'a> {
    excludes: &'a Excludes,
    dev: u64,
}

impl Walk<'_> {
    fn list(&self, path: &Path, meta: Metadata, out: &mut Out) -> bool {
        let excludes = self.excludes;
        let is_dir = meta.file_type().is_dir();
        let flags = super::file_meta::flags(path);
        // `dump`'s rule: a nodump directory is skipped with all below it.
        if flags & FLAG_NODUMP != 0 && excludes.skip_nodump {
            return true;
        }
        if is_dir && excludes.excluded_dir(path) {
            return true;
        }
        let other_fs = excludes.one_file_system && meta.dev() != self.dev;
        if !out.push(Listed::Entry(path.to_path_buf(), meta, flags)) {
            return false;
        }
        if !is_dir || other_fs {
            return true;
        }
        let mut children = Children::default();
        let unreadable = |e: std::io::Error| Listed::Unreadable(path.to_path_buf(), e.to_string());
        match fs::read_dir(path) {
            Ok(rd) => {
                for e in rd {
                    match e {
                        Ok(e) => children.push(e),
                        // What was read is still listed.
                        Err(e) => {
                            if !out.push(unreadable(e)) {
                                return false;
                            }
                            break;
                        }
                    }
                }
            }
            Err(e) => return out.push(unreadable(e)),
        }
        // Sorted, so an unchanged tree gives the same stream and dedups.
        for (name, entry) in children.sorted() {
            let child = path.join(name);
            if excludes.excluded(&child) {
                continue;
            }
            let m = match entry {
                Some(entry) => entry.metadata(),
                None => fs::symlink_metadata(&child),
            };
            let going_on = match m {
                Ok(m) => self.list(&child, m, out),
                Err(e) => out.push(Listed::Unreadable(child, e.to_string())),
            };
            if !going_on {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(root: &Path, excludes: &[String]) -> (Vec<PathBuf>, Vec<String>) {
        let ex = Excludes::new(excludes).unwrap();
        let meta = fs::symlink_metadata(root).unwrap();
        std::thread::scope(|s| {
            let rx = spawn(s, root.to_path_buf(), meta, &ex).unwrap();
            let (mut paths, mut warnings) = (Vec::new(), Vec::new());
            for l in rx.into_iter().flatten() {
                match l {
                    Listed::Entry(p, _, _) => paths.push(p.strip_prefix(root).unwrap().to_path_buf()),
                    Listed::Unreadable(p, w) => warnings.push(format!("{}: {w}", p.display())),
                }
            }
            (paths, warnings)
        })
    }

    #[test]
    fn pre_order_sorted_with_excludes_and_many_batches() {
        let d = tempfile::tempdir().unwrap();
        for i in (0..600).rev() {
            fs::write(d.path().join(format!("f{i:04}")), b"x").unwrap();
        }
        fs::create_dir_all(d.path().join("b/c")).unwrap();
        fs::write(d.path().join("b/c/z"), b"").unwrap();
        fs::write(d.path().join("b/skip.tmp"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("a")).unwrap();
        let (paths, warnings) = listed(d.path(), &["*.tmp".to_string()]);
        assert!(warnings.is_empty());
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(names[..5], ["", "a", "b", "b/c", "b/c/z"]);
        assert_eq!(names.len(), 5 + 600);
        assert_eq!(names[5], "f0000");
        assert_eq!(names.last().unwrap(), "f0599");
    }

    #[test]
    fn a_directory_past_the_kept_entries_lists_the_same_order() {
        let d = tempfile::tempdir().unwrap();
        let n = KEEP_ENTRIES + 10;
        for i in (0..n).rev() {
            fs::write(d.path().join(format!("f{i:06}")), b"").unwrap();
        }
        fs::create_dir(d.path().join("f000005x")).unwrap();
        fs::write(d.path().join("f000005x/inner"), b"").unwrap();
        let (paths, warnings) = listed(d.path(), &["f000007".to_string()]);
        assert!(warnings.is_empty(), "{warnings:?}");
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(names.len(), 1 + n - 1 + 2, "root, all files but the excluded one, the directory and its file");
        assert_eq!(
            names[1..9],
            ["f000000", "f000001", "f000002", "f000003", "f000004", "f000005", "f000005x", "f000005x/inner"]
        );
        assert_eq!(names[9], "f000006", "f000007 is excluded");
        assert_eq!(names[10], "f000008");
        assert_eq!(names.last().unwrap(), &format!("f{:06}", n - 1));
    }

    #[test]
    fn a_dropped_receiver_stops_the_listing() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..2000 {
            fs::write(d.path().join(format!("f{i}")), b"").unwrap();
        }
        let ex = Excludes::new(&[]).unwrap();
        let meta = fs::symlink_metadata(d.path()).unwrap();
        std::thread::scope(|s| {
            let rx = spawn(s, d.path().to_path_buf(), meta, &ex).unwrap();
            assert_eq!(rx.recv().unwrap().len(), BATCH);
            drop(rx);
        }); // joins: the lister must notice and end
    }
}
