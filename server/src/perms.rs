//! File modes of the data directory. Chunk data sits unencrypted in
//! RocksDB's files, so another local user who can read `db/*.blob` reads
//! every backup. The binary sets its umask to 0077 before it creates
//! anything (RocksDB, which names its own modes, included), `init` makes
//! the directory 0700, and `serve` warns about what it finds wider: a
//! directory made by an older version, or copied with `cp -r`.

// unsafe: umask(2), which std does not wrap; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Files and directories the process creates from now on get no group or
/// other bits.
pub fn private_umask() {
    // SAFETY: umask has no preconditions; it only swaps the process mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and its parents) if needed and sets it to 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The data directory itself, its entries and those of `db/` that group
/// or other users may read, write or enter, with their modes. Symlinks
/// are followed no further (their own mode means nothing).
pub fn too_open(data: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut check = |p: &Path| {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            let mode = m.permissions().mode() & 0o7777;
            if !m.file_type().is_symlink() && mode & 0o077 != 0 {
                out.push((p.to_path_buf(), mode));
            }
        }
    };
    check(data);
    for dir in [data.to_path_buf(), data.join("db")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            check(&p);
        }
    }
    out
}

/// The warning `serve` prints for [`too_open`], or none.
pub fn warning(data: &Path) -> Option<String> {
    let wide = too_open(data);
    let (first, mode) = wide.first()?;
    Some(format!(
        "{} entries of the data directory {} are open to other users (e.g. {} has mode {mode:04o}); \
         any local user may read backed-up data: run `chmod -R go= {}`",
        wide.len(),
        data.display(),
        first.display(),
        data.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_others_may_read() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        private_dir(&data).unwrap();
        std::fs::create_dir(data.join("db")).unwrap();
        for (p, mode) in [("server.key", 0o600), ("db/000001.blob", 0o600)] {
            std::fs::write(data.join(p), b"x").unwrap();
            std::fs::set_permissions(data.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::set_permissions(data.join("db"), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(too_open(&data), []);
        assert_eq!(warning(&data), None);
        std::fs::set_permissions(data.join("db/000001.blob"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(too_open(&data), [(data.clone(), 0o755), (data.join("db/000001.blob"), 0o644)]);
        let w = warning(&data).unwrap();
        assert!(w.starts_with("2 entries") && w.contains("chmod -R go="), "{w}");
        private_dir(&data).unwrap();
        assert_eq!(too_open(&data).len(), 1);
    }
}
