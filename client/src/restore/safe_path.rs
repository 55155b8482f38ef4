//! Where a restore may write. Every stored path is checked component by
//! component, and every parent directory is checked to be a real
//! directory (not a symlink) inside the target before anything is
//! created beneath it. Nothing is ever opened through a symlink.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("refusing unsafe path {0:?}: empty, absolute, `.`/`..` or NUL component")]
    Unsafe(String),
    #[error("refusing to write below {0}: it is a symlink or not a directory")]
    NotADir(String),
    #[error("{0}: {1}")]
    Io(String, String),
}

/// Splits a stored path into checked components. The rule is
/// `bkp_common::names::check_path`, which the server applies at commit
/// too; the restore checks again, as its server may be older or hostile.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    bkp_common::names::path_components(path).map_err(|_| PathError::Unsafe(String::from_utf8_lossy(path).into_owned()))
}

/// Resolves `path` under `root`, creating missing parent directories
/// (mode 0700 until their own entry sets the real mode) and refusing any
/// parent that is not a real directory.
pub fn prepare(root: &Path, path: &[u8]) -> Result<PathBuf, PathError> {
    Dirs::new(root).prepare(path)
}

/// [`prepare`] for a whole restore: remembers the parent directory it last
/// checked, so that the files of one directory (a tree comes in path
/// order) cost no lookups of their parents. A directory checked or made
/// during the restore stays one: every later entry that replaces a name
/// refuses a directory (`tree_writer::clear`, and rename onto a directory
/// fails), so no snapshot content can turn it into a symlink.
pub struct Dirs {
    root: PathBuf,
    known: Vec<Vec<u8>>,
}

impl Dirs {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), known: Vec::new() }
    }

    pub fn prepare(&mut self, path: &[u8]) -> Result<PathBuf, PathError> {
        let comps = components(path)?;
        let parents = &comps[..comps.len() - 1];
        let same = self.known.iter().zip(parents).take_while(|(k, c)| k.as_slice() == **c).count();
        let mut cur = self.root.clone();
        for (i, c) in parents.iter().enumerate() {
            cur.push(std::ffi::OsStr::from_bytes(c));
            if i < same {
                continue;
            }
            self.known.truncate(i);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => return Err(PathError::NotADir(cur.display().to_string())),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&cur)
                        .map_err(|e| PathError::Io(cur.display().to_string(), e.to_string()))?;
                }
                Err(e) => return Err(PathError::Io(cur.display().to_string(), e.to_string())),
            }
            self.known.push(c.to_vec());
        }
        cur.push(std::ffi::OsStr::from_bytes(comps[comps.len() - 1]));
        Ok(cur)
    }
}

/// Resolves an existing path under `root` without creating anything: the
/// source of a hardlink. Parents must be real directories, the file a
/// regular file.
pub fn existing_file(root: &Path, path: &[u8]) -> Result<PathBuf, PathError> {
    let comps = components(path)?;
    let mut cur = root.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        cur.push(std::ffi::OsStr::from_bytes(c));
        let m = fs::symlink_metadata(&cur).map_err(|e| PathError::Io(cur.display().to_string(), e.to_string()))?;
        let last = i == comps.len() - 1;
        if (last && !m.file_type().is_file()) || (!last && !m.file_type().is_dir()) {
            return Err(PathError::NotADir(cur.display().to_string()));
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unsafe_names() {
        for bad in [&b""[..], b"/etc/passwd", b"a/../../x", b"..", b"a//b", b"a/./b", b"a\0b", b"a/"] {
            assert!(components(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(components(b"a/b c/d").unwrap(), [&b"a"[..], b"b c", b"d"]);
    }

    #[test]
    fn never_creates_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).unwrap();
        assert!(matches!(prepare(root.path(), b"evil/passwd"), Err(PathError::NotADir(_))));
        assert!(matches!(prepare(root.path(), b"evil/sub/passwd"), Err(PathError::NotADir(_))));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let p = prepare(root.path(), b"ok/sub/file").unwrap();
        assert!(p.starts_with(root.path()) && root.path().join("ok/sub").is_dir());
        assert!(existing_file(root.path(), b"evil").is_err());
    }

    #[test]
    fn remembered_parents_are_checked_again_when_the_path_leaves_them() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut dirs = Dirs::new(root.path());
        dirs.prepare(b"a/b/f1").unwrap();
        dirs.prepare(b"a/b/f2").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).unwrap();
        // A sibling of a checked directory is checked, remembered or not.
        assert!(matches!(dirs.prepare(b"evil/x"), Err(PathError::NotADir(_))));
        assert!(matches!(dirs.prepare(b"a/b/f3").map(|p| p.starts_with(root.path())), Ok(true)));
        assert!(matches!(dirs.prepare(b"evil/y/z"), Err(PathError::NotADir(_))));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A top-level file after deep ones has no parent to check.
        assert_eq!(dirs.prepare(b"top").unwrap(), root.path().join("top"));
        assert!(root.path().join("a/b").is_dir());
    }
}
