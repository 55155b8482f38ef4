//! Restore's writing side for a directory target: each file goes to a
//! temp file beside its destination and is renamed into place only after
//! its whole-content hash checks out; nothing is written outside the
//! target (`safe_path`). Blocks of zeros stay holes, and extended
//! attributes, ACLs and file flags are restored ([`file_meta`]). The
//! order matters: content, owner (chown clears capabilities), extended
//! attributes (an ACL rewrites the group bits), mode, times; file flags
//! last of all, once no entry is still to be linked or written below an
//! immutable one.

// unsafe: geteuid, umask and mknod, which std does not wrap; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bkp_common::tree::{Entry, Meta, SpecialKind};
use bkp_common::{ChunkId, ContentHash};

use super::fetch::Out;
use super::file_meta::{self, Losses};
use super::safe_path;
use super::sink::{RestoreReport, Sink};
use crate::error::{ClientError, Corruption, Result};
use crate::progress::Progress;

/// A file's temp file, removed when dropped unless it was renamed into
/// place: whichever way a restore fails (a full disk, a refused chunk, an
/// error from the server), no `.bkp-restore.*` file is left behind.
struct TempPath(Option<PathBuf>);

impl TempPath {
    /// Renamed into place: nothing to remove any more.
    fn kept(mut self) {
        self.0 = None;
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.as_deref().expect("temp path still owned")
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

// A file being written is the common case; boxing it would cost an
// allocation per restored file.
#[allow(clippy::large_enum_variant)]
enum Target {
    None,
    Skip,
    File {
        file: File,
        tmp: TempPath,
        dest: PathBuf,
        meta: Meta,
        written: u64,
        /// Where the last write ended: short of `written` when the file
        /// ends in a hole, which only `set_len` can extend over.
        data_end: u64,
        hasher: Box<blake3::Hasher>,
        /// The first chunk (checked against its id by the fetcher), not yet
        /// hashed: if it stays the only one, the file's content hash is
        /// its id and the second blake3 pass is saved.
        first: Option<(ChunkId, Vec<u8>)>,
        /// Why the file cannot be restored (a chunk could not be had).
        bad: Option<String>,
    },
}

pub struct TreeWriter {
    root: PathBuf,
    dirs_checked: safe_path::Dirs,
    dirs: Vec<(PathBuf, Meta)>,
    sink: Target,
    as_root: bool,
    /// The process umask, which `open` applied to each new file's mode.
    umask: u32,
    /// Zero blocks of this size inside chunks are left as holes.
    block: usize,
    /// Entries with file flags, set at the end.
    flagged: Vec<(PathBuf, u32)>,
    losses: Losses,
    report: RestoreReport,
    progress: Arc<dyn Progress>,
}

fn io_err(p: &Path, e: std::io::Error) -> ClientError {
    ClientError::write(p, e)
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
        Ok(m) if m.is_dir() => Err(ClientError::InTheWay(p.display().to_string())),
        Ok(_) => fs::remove_file(p).map_err(|e| io_err(p, e)),
        Err(_) => Ok(()),
    }
}

impl TreeWriter {
    pub fn new(target: &Path, progress: Arc<dyn Progress>) -> Result<Self> {
        fs::create_dir_all(target).map_err(|e| io_err(target, e))?;
        let root = fs::canonicalize(target).map_err(|e| io_err(target, e))?;
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        // umask can only be read by setting it; the old value goes straight
        // back. SAFETY: umask has no preconditions.
        let umask = unsafe {
            let old = libc::umask(0o077);
            libc::umask(old);
            old
        } as u32;
        Ok(Self {
            block: file_meta::hole_block(&root),
            flagged: Vec::new(),
            losses: Losses::default(),
            dirs_checked: safe_path::Dirs::new(&root),
            root,
            dirs: Vec::new(),
            sink: Target::None,
            as_root,
            umask,
            report: RestoreReport::default(),
            progress,
        })
    }

    fn refuse(&mut self, e: impl std::fmt::Display) {
        self.report.errors.push(e.to_string());
    }

    fn data(&mut self, id: ChunkId, d: Vec<u8>) -> Result<()> {
        match &mut self.sink {
            Target::File { bad: Some(_), .. } | Target::Skip => Ok(()),
            Target::File { file, written, data_end, hasher, tmp, first, .. } => {
                let block = self.block;
                let at = *written;
                let is_first = at == 0 && first.is_none();
                if let Some((_, f)) = first.take() {
                    hasher.update(&f);
                }
                // Zero blocks become holes: sparse files stay sparse.
                let write = || file_meta::write_sparse(file, &d, at, block);
                let wrote_to = match is_first {
                    true => write(),
                    false => crate::parallel_hash::hash_while(&d, hasher, write),
                }
                .map_err(|e| io_err(tmp, e))?;
                *written += d.len() as u64;
                if let Some(end) = wrote_to {
                    *data_end = end;
                }
                self.progress.restored(d.len() as u64);
                if is_first {
                    *first = Some((id, d));
                }
                Ok(())
            }
            Target::None => Err(Corruption::Layout("data outside a file").into()),
        }
    }

    fn bad(&mut self, why: String) -> Result<()> {
        match &mut self.sink {
            Target::File { bad, .. } => {
                bad.get_or_insert(why);
                Ok(())
            }
            Target::Skip => Ok(()),
            Target::None => Err(Corruption::Layout("data outside a file").into()),
        }
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        let path = match &e {
            Entry::FileEnd { hash } => return self.file_end(*hash),
            Entry::Chunks(_) => return Ok(()),
            other => other.path().unwrap_or_default().to_vec(),
        };
        let dest = match self.dirs_checked.prepare(&path) {
            Ok(d) => d,
            Err(err) => {
                if matches!(e, Entry::File { .. }) {
                    self.sink = Target::Skip;
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
                self.flag_later(&dest, &meta);
                self.dirs.push((dest, meta));
            }
            Entry::File { meta, .. } => {
                let tmp = dest.with_file_name(format!(".bkp-restore.{:016x}", rand::random::<u64>()));
                // Created with its final permission bits, so most files need
                // no fchmod (setuid and the like still come with fchmod, after
                // fchown, which clears them); a file just created is writable
                // through this descriptor whatever its mode.
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(file_meta::safe_mode(&meta) & 0o777)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&tmp)
                    .map_err(|e| io_err(&tmp, e))?;
                self.sink = Target::File {
                    file,
                    tmp: TempPath(Some(tmp)),
                    dest,
                    meta,
                    written: 0,
                    data_end: 0,
                    hasher: Box::default(),
                    first: None,
                    bad: None,
                };
            }
            Entry::Symlink { meta, target, .. } => {
                clear(&dest)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                    .map_err(|e| io_err(&dest, e))?;
                if self.as_root {
                    set_owner(&dest, &meta).map_err(|e| io_err(&dest, e))?;
                }
                file_meta::set_xattrs(&dest, &meta.xattrs, &mut self.losses);
                filetime::set_symlink_file_times(&dest, mtime(&meta), mtime(&meta)).map_err(|e| io_err(&dest, e))?;
            }
            Entry::Hardlink { target, .. } => match safe_path::existing_file(&self.root, &target) {
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
                if unsafe {
                    libc::mknod(
                        c.as_ptr(),
                        fmt | (file_meta::safe_mode(&meta) & 0o7777) as libc::mode_t,
                        rdev as libc::dev_t,
                    )
                } != 0
                {
                    return Err(io_err(&dest, std::io::Error::last_os_error()));
                }
                self.apply_meta(&dest, &meta)?;
            }
            Entry::Chunks(_) | Entry::FileEnd { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Remembers an entry's file flags, to be set once the restore is done.
    fn flag_later(&mut self, p: &Path, m: &Meta) {
        if m.flags != 0 {
            self.flagged.push((p.to_path_buf(), m.flags));
        }
    }

    /// The mode to set after the extended attributes: narrowed when the
    /// access ACL could not be set.
    fn final_mode(m: &Meta, acl_lost: bool) -> u32 {
        if acl_lost {
            file_meta::safe_mode(m)
        } else {
            m.mode
        }
    }

    fn apply_meta(&mut self, p: &Path, m: &Meta) -> Result<()> {
        if self.as_root {
            set_owner(p, m).map_err(|e| io_err(p, e))?;
        }
        let acl_lost = file_meta::set_xattrs(p, &m.xattrs, &mut self.losses);
        fs::set_permissions(p, fs::Permissions::from_mode(Self::final_mode(m, acl_lost))).map_err(|e| io_err(p, e))?;
        // utimensat on the path: opening a FIFO to set its time would block.
        filetime::set_symlink_file_times(p, mtime(m), mtime(m)).map_err(|e| io_err(p, e))
    }

    fn file_end(&mut self, want: ContentHash) -> Result<()> {
        let Target::File { file, tmp, dest, meta, written, data_end, hasher, first, bad } =
            std::mem::replace(&mut self.sink, Target::None)
        else {
            return Ok(()); // a skipped file
        };
        if let Some(why) = bad {
            drop(tmp);
            self.refuse(format!("{}: {why}; not restored", dest.display()));
            return Ok(());
        }
        if data_end != written {
            file.set_len(written).map_err(|e| io_err(&tmp, e))?;
        }
        let got = match first {
            Some((id, _)) => ContentHash::from_bytes(*id.as_bytes()),
            None => ContentHash::from(hasher.finalize()),
        };
        if got != want {
            drop(tmp);
            self.refuse(format!("{}: content does not match the snapshot; not restored", dest.display()));
            return Ok(());
        }
        if self.as_root {
            std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(|e| io_err(&tmp, e))?;
        }
        let acl_lost = file_meta::set_xattrs(&tmp, &meta.xattrs, &mut self.losses);
        let mode = Self::final_mode(&meta, acl_lost);
        // An ACL that was set rewrote the group bits: set the mode again.
        if !meta.xattrs.is_empty() || mode & 0o7777 != (mode & 0o777 & !self.umask) {
            file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| io_err(&tmp, e))?;
        }
        filetime::set_file_handle_times(&file, None, Some(mtime(&meta))).map_err(|e| io_err(&tmp, e))?;
        drop(file);
        // rename replaces a file or symlink at `dest` without following
        // it, and fails on a directory: no lookup of `dest` first.
        if let Err(e) = fs::rename(&tmp, &dest) {
            drop(tmp);
            return Err(match e.raw_os_error() {
                Some(libc::EISDIR) => ClientError::InTheWay(dest.display().to_string()),
                _ => io_err(&dest, e),
            });
        }
        tmp.kept();
        self.flag_later(&dest, &meta);
        self.report.files += 1;
        self.report.bytes += written;
        Ok(())
    }

    fn close(&mut self) -> Result<RestoreReport> {
        if let Target::File { .. } = &self.sink {
            // Dropping the target removes its temp file.
            self.sink = Target::None;
            return Err(Corruption::Layout("snapshot ended inside a file").into());
        }
        // Deepest first, so setting a parent's mtime comes last.
        self.dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, m) in std::mem::take(&mut self.dirs) {
            if fs::symlink_metadata(&p).is_ok_and(|x| x.is_dir()) {
                self.apply_meta(&p, &m)?;
            }
        }
        // Last: nothing can be linked to, written into or set on an
        // immutable entry after this. Deepest first, like the directories.
        let mut flagged = std::mem::take(&mut self.flagged);
        flagged.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, flags) in flagged {
            file_meta::set_flags(&p, flags, &mut self.losses);
        }
        self.report.warnings = self.losses.warnings();
        Ok(std::mem::take(&mut self.report))
    }
}

impl Sink for TreeWriter {
    fn handle(&mut self, o: Out) -> Result<()> {
        match o {
            Out::Data { id, data } => self.data(id, data),
            Out::Bad { id, reason } => self.bad(format!("chunk {}: {reason}", id.short())),
            Out::Entry(e) => self.entry(e),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<RestoreReport> {
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore(entries: Vec<Out>) -> (tempfile::TempDir, RestoreReport) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Box::new(TreeWriter::new(dir.path(), Arc::new(crate::progress::Silent)).unwrap());
        for o in entries {
            w.handle(o).unwrap();
        }
        let report = w.finish().unwrap();
        (dir, report)
    }

    fn file(path: &[u8], chunks: &[&[u8]], hash: ContentHash) -> Vec<Out> {
        let size = chunks.iter().map(|c| c.len() as u64).sum();
        let mut out =
            vec![Out::Entry(Entry::File { path: path.to_vec(), meta: Meta { mode: 0o644, ..Meta::default() }, size })];
        out.extend(chunks.iter().map(|c| Out::Data { id: ChunkId::of(c), data: c.to_vec() }));
        out.push(Out::Entry(Entry::FileEnd { hash }));
        out
    }

    #[test]
    fn modes_and_trailing_holes_are_restored() {
        use std::os::unix::fs::MetadataExt;
        let data = b"some data".to_vec();
        let zeros = vec![0u8; 8192];
        let modes = [("exec", 0o755), ("private", 0o600), ("setuid", 0o4755), ("readonly", 0o444), ("shared", 0o666)];
        let mut all = Vec::new();
        for (name, mode) in modes {
            let mut f = file(name.as_bytes(), &[&data], blake3::hash(&data).into());
            if let Out::Entry(Entry::File { meta, .. }) = &mut f[0] {
                meta.mode = mode;
            }
            all.extend(f);
        }
        let whole = [&data[..], &zeros[..]].concat();
        all.extend(file(b"holey", &[&data, &zeros], blake3::hash(&whole).into()));
        let (dir, report) = restore(all);
        assert_eq!(report.files, 6, "{:?}", report.errors);
        for (name, mode) in modes {
            let m = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(m.mode() & 0o7777, mode, "{name}");
        }
        let holey = dir.path().join("holey");
        assert_eq!(std::fs::read(&holey).unwrap(), whole, "a trailing hole still counts for the length");
        assert_eq!(std::fs::metadata(&holey).unwrap().mode() & 0o7777, 0o644);
    }

    /// An access ACL the target refuses (here: a blob the kernel cannot
    /// parse) must not leave the mask as group permissions: the group
    /// gets its own ACL entry; and two such files make one warning.
    #[test]
    fn a_refused_acl_narrows_the_group_bits_and_warns_once() {
        use std::os::unix::fs::MetadataExt;
        let mut blob = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x10, 6), (0x20, 4)] {
            blob.extend_from_slice(&tag.to_le_bytes());
            blob.extend_from_slice(&perm.to_le_bytes());
            blob.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        blob.extend_from_slice(b"bad"); // not a whole entry: EINVAL
        let mut all = Vec::new();
        for name in ["a", "b"] {
            let mut f = file(name.as_bytes(), &[b"x"], blake3::hash(b"x").into());
            if let Out::Entry(Entry::File { meta, .. }) = &mut f[0] {
                meta.mode = 0o664;
                meta.xattrs =
                    vec![bkp_common::tree::Xattr { name: b"system.posix_acl_access".to_vec(), value: blob.clone() }];
            }
            all.extend(f);
        }
        let (dir, report) = restore(all);
        assert_eq!(report.files, 2, "{:?}", report.errors);
        for name in ["a", "b"] {
            let m = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o644, "{name}: group bits were the mask (rw); the group had r");
        }
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(
            report.warnings[0].contains("POSIX ACLs") && report.warnings[0].contains("on 2 entries"),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn a_failed_restore_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Box::new(TreeWriter::new(dir.path(), Arc::new(crate::progress::Silent)).unwrap());
        let mut f = file(b"f", &[b"abc"], blake3::hash(b"abc").into());
        f.truncate(2);
        for o in f {
            w.handle(o).unwrap();
        }
        let temps = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(temps(), 1, "the temp file is there while the file is written");
        // An error elsewhere in the restore drops the writer mid-file.
        drop(w);
        assert_eq!(temps(), 0, "the temp file is removed");
    }

    #[test]
    fn content_hash_is_checked_for_one_chunk_and_many_chunk_files() {
        let (a, b) = (&b"first chunk"[..], &b"second"[..]);
        let mut all = file(b"one", &[a], blake3::hash(a).into());
        all.extend(file(b"two", &[a, b], blake3::hash(b"first chunksecond").into()));
        all.extend(file(b"bad1", &[a], blake3::hash(b"other").into()));
        all.extend(file(b"bad2", &[a, b], ContentHash::from_bytes(*ChunkId::of(a).as_bytes())));
        let (dir, report) = restore(all);
        assert_eq!(std::fs::read(dir.path().join("one")).unwrap(), a);
        assert_eq!(std::fs::read(dir.path().join("two")).unwrap(), b"first chunksecond");
        assert!(!dir.path().join("bad1").exists() && !dir.path().join("bad2").exists());
        assert_eq!(report.files, 2);
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    }
}
