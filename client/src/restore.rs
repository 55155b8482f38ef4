//! `bkp restore` and `bkp ls`: read a snapshot's tree stream and bring
//! files back. Three stages: a planner thread reads the tree, an async
//! fetcher keeps many chunks in flight (in order), a writer thread puts
//! each file in place only after its whole-content hash checks out.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bkp_common::snapshot::{Snapshot, SnapshotKind};
use bkp_common::tree::{Entry, Meta, SpecialKind, TreeDecoder};
use bkp_common::{ChunkId, ContentHash, SnapshotId};
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::progress::Progress;
use crate::safepath;

/// Chunks fetched concurrently during a restore.
const IN_FLIGHT: usize = 16;

/// Reads a snapshot's tree stream, one chunk at a time, from a blocking
/// thread.
pub struct TreeReader {
    client: Arc<Client>,
    handle: Handle,
    ids: Vec<ChunkId>,
    next: usize,
    dec: TreeDecoder,
}

impl TreeReader {
    pub fn new(client: Arc<Client>, handle: Handle, snapshot: &Snapshot) -> Self {
        Self { client, handle, ids: snapshot.tree.clone(), next: 0, dec: TreeDecoder::new() }
    }

    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        let corrupt = |e: bkp_common::tree::TreeError| ClientError::Corrupt(format!("snapshot tree: {e}"));
        loop {
            if let Some(e) = self.dec.next_entry().map_err(corrupt)? {
                return Ok(Some(e));
            }
            let Some(id) = self.ids.get(self.next).copied() else {
                self.dec.finish().map_err(corrupt)?;
                return Ok(None);
            };
            self.next += 1;
            let data = self.handle.block_on(self.client.chunk(id))?;
            self.dec.feed(&data);
        }
    }
}

pub struct RestoreOptions {
    /// `None` streams the single file of a stream snapshot to stdout.
    pub target: Option<PathBuf>,
    pub include: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub bytes: u64,
    pub errors: Vec<String>,
}

enum Item {
    Entry(Entry),
    Chunk(ChunkId),
}

enum Out {
    Entry(Entry),
    Data(Vec<u8>),
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
    if opts.target.is_none() && snap.kind != SnapshotKind::Stream {
        return Err(ClientError::Input(format!(
            "snapshot {} is a file tree; --stdout restores stream snapshots, use --target DIR",
            id.short()
        )));
    }
    let include: Vec<Vec<u8>> =
        opts.include.iter().map(|i| i.trim_start_matches('/').trim_end_matches('/').as_bytes().to_vec()).collect();
    let (item_tx, mut item_rx) = mpsc::channel::<Item>(256);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(IN_FLIGHT);

    let mut reader = TreeReader::new(client.clone(), Handle::current(), &snap);
    let planner = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut in_file = false;
        while let Some(e) = reader.next_entry()? {
            let keep = match &e {
                Entry::File { path, .. } => {
                    in_file = included(path, &include);
                    in_file
                }
                Entry::Chunks(refs) => {
                    if in_file {
                        for r in refs {
                            if item_tx.blocking_send(Item::Chunk(r.id)).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    false
                }
                Entry::FileEnd { .. } => in_file,
                other => included(other.path().unwrap_or_default(), &include),
            };
            if keep && item_tx.blocking_send(Item::Entry(e)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    });

    let fetch_client = client.clone();
    let fetcher = async move {
        let items = futures::stream::poll_fn(move |cx| item_rx.poll_recv(cx));
        let mut outs = items
            .map(|it| {
                let c = fetch_client.clone();
                async move {
                    match it {
                        Item::Entry(e) => Ok(Out::Entry(e)),
                        Item::Chunk(id) => c.chunk(id).await.map(Out::Data),
                    }
                }
            })
            .buffered(IN_FLIGHT);
        while let Some(o) = outs.next().await {
            if out_tx.send(o?).await.is_err() {
                break;
            }
        }
        Ok::<(), ClientError>(())
    };

    let target = opts.target.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<RestoreReport> {
        match target {
            Some(t) => {
                let mut w = TreeWriter::new(&t, progress)?;
                while let Some(o) = out_rx.blocking_recv() {
                    w.handle(o)?;
                }
                w.finish()
            }
            None => {
                let mut out = std::io::stdout().lock();
                let mut hasher = blake3::Hasher::new();
                let mut report = RestoreReport::default();
                while let Some(o) = out_rx.blocking_recv() {
                    match o {
                        Out::Data(d) => {
                            hasher.update(&d);
                            out.write_all(&d).map_err(|e| ClientError::Restore(format!("writing to stdout: {e}")))?;
                            report.bytes += d.len() as u64;
                            progress.restored(d.len() as u64);
                        }
                        Out::Entry(Entry::FileEnd { hash }) => {
                            if ContentHash::from(hasher.finalize()) != hash {
                                return Err(ClientError::Corrupt("stream content hash mismatch".into()));
                            }
                            report.files += 1;
                        }
                        Out::Entry(_) => {}
                    }
                }
                out.flush().map_err(|e| ClientError::Restore(format!("writing to stdout: {e}")))?;
                Ok(report)
            }
        }
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

enum Sink {
    None,
    Skip,
    File { file: File, tmp: PathBuf, dest: PathBuf, meta: Meta, written: u64, hasher: blake3::Hasher },
}

struct TreeWriter {
    root: PathBuf,
    dirs: Vec<(PathBuf, Meta)>,
    sink: Sink,
    as_root: bool,
    report: RestoreReport,
    progress: Arc<dyn Progress>,
}

fn io_err(p: &Path, e: std::io::Error) -> ClientError {
    ClientError::Restore(format!("{}: {e}", p.display()))
}

fn set_owner(p: &Path, m: &Meta) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, Some(m.uid), Some(m.gid))
}

fn mtime(m: &Meta) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        m.mtime_ns.div_euclid(1_000_000_000),
        m.mtime_ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// Removes what stands at `p` unless it is a directory, so a restore can
/// replace a file or symlink without following it.
fn clear(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(ClientError::Restore(format!("{}: a directory is in the way", p.display()))),
        Ok(_) => fs::remove_file(p).map_err(|e| io_err(p, e)),
        Err(_) => Ok(()),
    }
}

impl TreeWriter {
    fn new(target: &Path, progress: Arc<dyn Progress>) -> Result<Self> {
        fs::create_dir_all(target).map_err(|e| io_err(target, e))?;
        let root = fs::canonicalize(target).map_err(|e| io_err(target, e))?;
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        Ok(Self { root, dirs: Vec::new(), sink: Sink::None, as_root, report: RestoreReport::default(), progress })
    }

    fn refuse(&mut self, e: impl std::fmt::Display) {
        self.report.errors.push(e.to_string());
    }

    fn handle(&mut self, o: Out) -> Result<()> {
        match o {
            Out::Data(d) => self.data(d),
            Out::Entry(e) => self.entry(e),
        }
    }

    fn data(&mut self, d: Vec<u8>) -> Result<()> {
        match &mut self.sink {
            Sink::File { file, written, hasher, tmp, .. } => {
                hasher.update(&d);
                // All-zero chunks become holes: sparse files stay sparse.
                if d.iter().all(|&b| b == 0) {
                    file.seek(SeekFrom::Current(d.len() as i64)).map_err(|e| io_err(tmp, e))?;
                } else {
                    file.write_all(&d).map_err(|e| io_err(tmp, e))?;
                }
                *written += d.len() as u64;
                self.progress.restored(d.len() as u64);
                Ok(())
            }
            Sink::Skip => Ok(()),
            Sink::None => Err(ClientError::Corrupt("data outside a file".into())),
        }
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        let path = match &e {
            Entry::FileEnd { hash } => return self.file_end(*hash),
            Entry::Chunks(_) => return Ok(()),
            other => other.path().unwrap_or_default().to_vec(),
        };
        let dest = match safepath::prepare(&self.root, &path) {
            Ok(d) => d,
            Err(err) => {
                if matches!(e, Entry::File { .. }) {
                    self.sink = Sink::Skip;
                }
                self.refuse(err);
                return Ok(());
            }
        };
        match e {
            Entry::Dir { meta, .. } => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        clear(&dest)?;
                        fs::create_dir(&dest).map_err(|e| io_err(&dest, e))?;
                    }
                    Err(_) => fs::create_dir(&dest).map_err(|e| io_err(&dest, e))?,
                }
                self.dirs.push((dest, meta));
            }
            Entry::File { meta, .. } => {
                let tmp = dest.with_file_name(format!(".bkp-restore.{:016x}", rand::random::<u64>()));
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&tmp)
                    .map_err(|e| io_err(&tmp, e))?;
                self.sink = Sink::File { file, tmp, dest, meta, written: 0, hasher: blake3::Hasher::new() };
            }
            Entry::Symlink { meta, target, .. } => {
                clear(&dest)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                    .map_err(|e| io_err(&dest, e))?;
                if self.as_root {
                    set_owner(&dest, &meta).map_err(|e| io_err(&dest, e))?;
                }
                filetime::set_symlink_file_times(&dest, mtime(&meta), mtime(&meta)).map_err(|e| io_err(&dest, e))?;
            }
            Entry::Hardlink { target, .. } => match safepath::existing_file(&self.root, &target) {
                Ok(src) => {
                    clear(&dest)?;
                    fs::hard_link(&src, &dest).map_err(|e| io_err(&dest, e))?;
                }
                Err(err) => self.refuse(err),
            },
            Entry::Special { meta, kind, rdev, .. } => {
                let fmt = match kind {
                    SpecialKind::Fifo => libc::S_IFIFO,
                    SpecialKind::CharDevice if self.as_root => libc::S_IFCHR,
                    SpecialKind::BlockDevice if self.as_root => libc::S_IFBLK,
                    // Sockets belong to running programs; devices need root.
                    _ => return Ok(()),
                };
                clear(&dest)?;
                let c = std::ffi::CString::new(dest.as_os_str().as_bytes()).expect("checked: no NUL");
                // SAFETY: c is a valid NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), fmt | (meta.mode & 0o7777) as libc::mode_t, rdev as libc::dev_t) }
                    != 0
                {
                    return Err(io_err(&dest, std::io::Error::last_os_error()));
                }
                self.apply_meta(&dest, &meta)?;
            }
            Entry::Chunks(_) | Entry::FileEnd { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    fn apply_meta(&self, p: &Path, m: &Meta) -> Result<()> {
        if self.as_root {
            set_owner(p, m).map_err(|e| io_err(p, e))?;
        }
        fs::set_permissions(p, fs::Permissions::from_mode(m.mode)).map_err(|e| io_err(p, e))?;
        // utimensat on the path: opening a FIFO to set its time would block.
        filetime::set_symlink_file_times(p, mtime(m), mtime(m)).map_err(|e| io_err(p, e))
    }

    fn file_end(&mut self, want: ContentHash) -> Result<()> {
        let Sink::File { file, tmp, dest, meta, written, hasher } = std::mem::replace(&mut self.sink, Sink::None)
        else {
            return Ok(()); // a skipped file
        };
        file.set_len(written).map_err(|e| io_err(&tmp, e))?;
        if ContentHash::from(hasher.finalize()) != want {
            let _ = fs::remove_file(&tmp);
            self.refuse(format!("{}: content does not match the snapshot; not restored", dest.display()));
            return Ok(());
        }
        if self.as_root {
            std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(|e| io_err(&tmp, e))?;
        }
        file.set_permissions(fs::Permissions::from_mode(meta.mode)).map_err(|e| io_err(&tmp, e))?;
        filetime::set_file_handle_times(&file, None, Some(mtime(&meta))).map_err(|e| io_err(&tmp, e))?;
        drop(file);
        clear(&dest)?;
        // rename replaces a name, it never follows a symlink at `dest`.
        fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
        self.report.files += 1;
        self.report.bytes += written;
        Ok(())
    }

    fn finish(mut self) -> Result<RestoreReport> {
        if let Sink::File { tmp, .. } = &self.sink {
            let _ = fs::remove_file(tmp);
            return Err(ClientError::Corrupt("snapshot ended inside a file".into()));
        }
        // Deepest first, so setting a parent's mtime comes last.
        self.dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, m) in std::mem::take(&mut self.dirs) {
            if fs::symlink_metadata(&p).is_ok_and(|x| x.is_dir()) {
                self.apply_meta(&p, &m)?;
            }
        }
        Ok(self.report)
    }
}
