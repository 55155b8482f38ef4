//! Disk space where the store lives: what is free, and the reserve.
//!
//! RocksDB stops every write after a write or flush hits "no space left"
//! and resumes by itself only once at least a memtable's worth (64 MiB) is
//! free again. So the store refuses writes *before* the disk is full (see
//! `RocksStore::ensure_room`), and keeps a preallocated reserve file: it
//! is deleted when space runs out (a write failed, or GC starts on a nearly
//! full disk), so that GC's deletes and compactions have room to run, and
//! made again once there is room for it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The reserve's file, inside the database directory (RocksDB leaves
/// files it does not know alone).
pub const RESERVE_FILE: &str = "bkp-reserve";
/// At most this much is reserved...
const RESERVE_MAX: u64 = 64 << 20;
/// ...and at most this share of the file system (a 64 MiB test disk keeps
/// 2 MiB).
const RESERVE_SHARE: u64 = 32;

/// Free bytes for an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn total_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks() as u64 * st.fragment_size() as u64)
}

pub struct Reserve {
    path: PathBuf,
    size: u64,
    /// Held while the file is made or removed; holds when making it last
    /// failed, so a file system without fallocate is not asked on every
    /// write.
    lock: Mutex<Option<std::time::Instant>>,
}

/// How long after a failed attempt the reserve is not tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

impl Reserve {
    pub fn new(dir: &Path) -> Self {
        let size = total_bytes(dir).map_or(RESERVE_MAX, |t| (t / RESERVE_SHARE).min(RESERVE_MAX));
        Self { path: dir.join(RESERVE_FILE), size, lock: Mutex::new(None) }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn present(&self) -> bool {
        self.path.metadata().is_ok_and(|m| m.len() >= self.size)
    }

    /// Makes the reserve when it is missing and at least `spare` bytes
    /// would stay free beside it. Returns whether it is in place.
    pub fn ensure(&self, spare: u64) -> bool {
        let mut failed = self.lock.lock().expect("reserve lock");
        if self.present() {
            return true;
        }
        if failed.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return false;
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if free_bytes(dir).map_or(true, |f| f < self.size + spare) {
            return false;
        }
        let made = std::fs::File::create(&self.path).and_then(|f| {
            // Allocated blocks, not a sparse file: the space is really held.
            nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, self.size as i64)
                .map_err(std::io::Error::from)?;
            f.sync_all()
        });
        match made {
            Ok(()) => {
                *failed = None;
                tracing::info!(mib = self.size >> 20, "disk space reserve in place");
                true
            }
            Err(e) => {
                *failed = Some(std::time::Instant::now());
                let _ = std::fs::remove_file(&self.path);
                tracing::warn!("could not make the disk space reserve {}: {e}", self.path.display());
                false
            }
        }
    }

    /// Deletes the reserve; returns the bytes it gave back.
    pub fn release(&self) -> u64 {
        let _l = self.lock.lock().expect("reserve lock");
        let len = self.path.metadata().map_or(0, |m| m.len());
        if len > 0 && std::fs::remove_file(&self.path).is_ok() {
            tracing::warn!(mib = len >> 20, "disk nearly full: released the disk space reserve");
            return len;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_made_released_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reserve::new(dir.path());
        assert!(r.size() > 0 && r.size() <= RESERVE_MAX);
        assert!(!r.present());
        assert!(r.ensure(0));
        assert_eq!(std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap().len(), r.size());
        assert_eq!(r.release(), r.size());
        assert!(!r.present());
        assert_eq!(r.release(), 0);
        // Not made when it would leave less than `spare` free.
        assert!(!r.ensure(u64::MAX / 2));
        assert!(r.ensure(0) && r.present());
    }
}
