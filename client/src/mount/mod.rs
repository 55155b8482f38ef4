//! `bkp mount DIR`: the host's snapshots as a read-only file system
//! (FUSE, through the `fuser` crate and Debian's `fusermount3`; no libfuse
//! needed at build time).
//!
//! `DIR/<set>/<time>/...` holds each snapshot's tree, `DIR/<set>/latest`
//! links to the newest. A snapshot's tree is read when first looked into;
//! file data is fetched on demand, chunk by chunk (each checked against its
//! id), with the last [`CACHE_CHUNKS`] chunks kept. The kernel calls in on
//! fuser's threads; they wait on the async client through a runtime handle
//! and never run on the runtime's own threads. The whole-file hash is not
//! checked (reads are random access): `bkp restore` and `bkp cat` do.

mod inodes;

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use bkp_common::snapshot::SnapshotSummary;
use bkp_common::tree::SpecialKind;
use bkp_common::ChunkId;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::restore::TreeReader;
use inodes::{Body, Inode, Table};

/// Decoded chunks kept for reads (at most 4 MiB each).
pub const CACHE_CHUNKS: usize = 8;
/// Kernel threads serving requests.
const THREADS: usize = 4;
/// Nothing in a mount ever changes.
const TTL: Duration = Duration::from_secs(3600);

pub struct SnapFs {
    client: Arc<Client>,
    handle: Handle,
    table: RwLock<Table>,
    /// One tree read at a time, so two lookups do not read it twice.
    loading: Mutex<()>,
    cache: Mutex<VecDeque<(ChunkId, Arc<Vec<u8>>)>>,
}

impl SnapFs {
    pub fn new(client: Arc<Client>, handle: Handle, snapshots: &[SnapshotSummary]) -> Self {
        SnapFs {
            client,
            handle,
            table: RwLock::new(Table::new(snapshots)),
            loading: Mutex::new(()),
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// Reads in the tree of a snapshot root not yet read.
    fn ensure(&self, ino: u64) -> std::result::Result<(), Errno> {
        let id = match self.table.read().expect("table lock").get(ino).map(|n| &n.body) {
            Some(Body::Unread(id)) => *id,
            Some(_) => return Ok(()),
            None => return Err(Errno::ENOENT),
        };
        let _one = self.loading.lock().expect("load lock");
        if !matches!(self.table.read().expect("table lock").get(ino).map(|n| &n.body), Some(Body::Unread(_))) {
            return Ok(()); // read meanwhile
        }
        let entries = self.read_tree(id).map_err(|e| {
            // The kernel only passes on EIO: say why where the user sees it.
            eprintln!("bkp: reading the tree of snapshot {}: {e}", id.short());
            Errno::EIO
        })?;
        self.table.write().expect("table lock").fill(ino, entries);
        Ok(())
    }

    fn read_tree(&self, id: bkp_common::SnapshotId) -> Result<Vec<bkp_common::tree::Entry>> {
        let snap = self.handle.block_on(self.client.snapshot(id))?;
        let mut r = TreeReader::new(self.client.clone(), self.handle.clone(), &snap);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    fn chunk(&self, id: ChunkId, len: u32) -> Result<Arc<Vec<u8>>> {
        if let Some((_, d)) = self.cache.lock().expect("cache lock").iter().find(|(c, _)| *c == id) {
            return Ok(d.clone());
        }
        let data = self.handle.block_on(self.client.chunk(id))?;
        if data.len() != len as usize {
            return Err(ClientError::Corrupt(crate::error::Corruption::Layout("chunk length differs from the tree's")));
        }
        let data = Arc::new(data);
        let mut c = self.cache.lock().expect("cache lock");
        if c.len() >= CACHE_CHUNKS {
            c.pop_front();
        }
        c.push_back((id, data.clone()));
        Ok(data)
    }

    fn attr(ino: u64, n: &Inode) -> FileAttr {
        let t = |ns: i64| if ns >= 0 { UNIX_EPOCH + Duration::from_nanos(ns as u64) } else { UNIX_EPOCH };
        let kind = match &n.body {
            Body::Dir(_) | Body::Unread(_) => FileType::Directory,
            Body::File(_) => FileType::RegularFile,
            Body::Symlink(_) => FileType::Symlink,
            Body::Special(SpecialKind::Fifo, _) => FileType::NamedPipe,
            Body::Special(SpecialKind::Socket, _) => FileType::Socket,
            Body::Special(SpecialKind::CharDevice, _) => FileType::CharDevice,
            Body::Special(SpecialKind::BlockDevice, _) => FileType::BlockDevice,
        };
        let rdev = if let Body::Special(_, r) = n.body { r as u32 } else { 0 };
        let ctime = if n.meta.ctime_ns != 0 { n.meta.ctime_ns } else { n.meta.mtime_ns };
        FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: t(n.meta.mtime_ns),
            mtime: t(n.meta.mtime_ns),
            ctime: t(ctime),
            crtime: t(n.meta.mtime_ns),
            kind,
            perm: (n.meta.mode & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.meta.uid,
            gid: n.meta.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// A snapshot root's own attributes are known before its tree is read.
    fn reply_attr(&self, ino: u64) -> std::result::Result<FileAttr, Errno> {
        let t = self.table.read().expect("table lock");
        t.get(ino).map(|n| Self::attr(ino, n)).ok_or(Errno::ENOENT)
    }

    fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if (size as usize) < data.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(data);
        }
    }
}

impl Filesystem for SnapFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Err(e) = self.ensure(parent.0) {
            return reply.error(e);
        }
        let child = self.table.read().expect("table lock").child(parent.0, name.as_bytes());
        match child.map(|c| self.reply_attr(c)) {
            Some(Ok(a)) => reply.entry(&TTL, &a, Generation(0)),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.reply_attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.table.read().expect("table lock").get(ino.0).map(|n| &n.body) {
            Some(Body::Symlink(t)) => reply.data(t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.table.read().expect("table lock").get(ino.0).map(|n| &n.body) {
            // Contents never change: the kernel may keep its cache.
            Some(Body::File(_)) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (layout, fsize) = match self.table.read().expect("table lock").get(ino.0) {
            Some(Inode { body: Body::File(l), size, .. }) => (l.clone(), *size),
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        let end = fsize.min(offset.saturating_add(size as u64));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let Some(i) = layout.at(at) else { break };
            let (start, r) = layout.chunks[i];
            let data = match self.chunk(r.id, r.len) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("bkp: reading chunk {}: {e}", r.id.short());
                    return reply.error(Errno::EIO);
                }
            };
            let from = (at - start) as usize;
            let to = ((end - start) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
            at = start + to as u64;
        }
        reply.data(&out);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if let Err(e) = self.ensure(ino.0) {
            return reply.error(e);
        }
        let t = self.table.read().expect("table lock");
        let Some(n) = t.get(ino.0) else { return reply.error(Errno::ENOENT) };
        let Body::Dir(children) = &n.body else { return reply.error(Errno::ENOTDIR) };
        let dots = [(ino.0, FileType::Directory, &b"."[..]), (n.parent, FileType::Directory, &b".."[..])];
        let kids = children.iter().map(|(name, &c)| {
            let kind = t.get(c).map_or(FileType::RegularFile, |x| Self::attr(c, x).kind);
            (c, kind, &name[..])
        });
        for (i, (c, kind, name)) in dots.into_iter().chain(kids).enumerate().skip(offset as usize) {
            if reply.add(INodeNo(c), (i + 1) as u64, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let t = self.table.read().expect("table lock");
        let Some(n) = t.get(ino.0) else { return reply.error(Errno::ENOENT) };
        match n.meta.xattrs.iter().find(|x| x.name == name.as_bytes()) {
            Some(x) => Self::xattr_reply(&x.value, size, reply),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let t = self.table.read().expect("table lock");
        let Some(n) = t.get(ino.0) else { return reply.error(Errno::ENOENT) };
        let mut names = Vec::new();
        for x in &n.meta.xattrs {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        Self::xattr_reply(&names, size, reply);
    }
}

/// Mounts `dir` and serves it until SIGINT or SIGTERM (then unmounts) or
/// until it is unmounted from outside (`fusermount3 -u DIR`).
pub async fn mount(client: Arc<Client>, dir: PathBuf, snapshots: Vec<SnapshotSummary>) -> Result<()> {
    if let Some(other) = snapshots.iter().find(|s| s.host != snapshots[0].host) {
        return Err(ClientError::Usage(format!(
            "the snapshots are of several hosts ({} and {}); mount one with --host",
            snapshots[0].host, other.host
        )));
    }
    let meta = std::fs::metadata(&dir).map_err(|e| ClientError::source(format!("mount point {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(ClientError::Usage(format!("mount point {} is not a directory", dir.display())));
    }
    let fs = SnapFs::new(client, Handle::current(), &snapshots);
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::FSName("bkp".into()),
        fuser::MountOption::Subtype("bkp".into()),
    ];
    cfg.n_threads = Some(THREADS);
    let d = dir.clone();
    let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &d, &cfg))
        .await
        .map_err(|e| ClientError::Task { what: "mount thread", source: e })?
        .map_err(|e| {
            ClientError::source(
                format!("mounting {} (needs /dev/fuse and fusermount3, Debian's fuse3 package)", dir.display()),
                e,
            )
        })?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ClientError::source("waiting for SIGTERM".to_string(), e))?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let stopped_outside = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break false,
            _ = term.recv() => break false,
            _ = tick.tick() => if session.guard.is_finished() { break true },
        }
    };
    let what = if stopped_outside { "serving the mount" } else { "unmounting" };
    tokio::task::spawn_blocking(move || if stopped_outside { session.join() } else { session.umount_and_join() })
        .await
        .map_err(|e| ClientError::Task { what: "mount thread", source: e })?
        .map_err(|e| ClientError::source(format!("{what} {}", dir.display()), e))?;
    Ok(())
}
