//! What a tree push leaves out: `--exclude` patterns and `--exclude-file`
//! (globs, by `globset`), `--exclude-if-present NAME`, `--exclude-caches`
//! (a `CACHEDIR.TAG` with its signature), `--one-file-system` and
//! `--skip-nodump`. The lister applies them before anything is stat-ed
//! below an excluded directory.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::error::{ClientError, Result};

/// The start of every valid cache directory tag
/// (<https://bford.info/cachedir/>).
pub const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// Everything a tree push is told to leave out.
#[derive(Debug, Default, Clone)]
pub struct ExcludeSpec {
    /// Globs: one without `/` matches a name anywhere; one with `/` the
    /// absolute path.
    pub patterns: Vec<String>,
    /// Files of more patterns, one a line (`#` starts a comment line).
    pub files: Vec<PathBuf>,
    /// A directory holding an entry of one of these names is left out.
    pub if_present: Vec<String>,
    /// A directory holding a `CACHEDIR.TAG` with the signature is left out.
    pub caches: bool,
    /// Directories on another file system than their root are kept
    /// (empty, so there is a mount point on restore), their contents not.
    pub one_file_system: bool,
    /// Leave out what carries the nodump flag (`chattr +d`).
    pub skip_nodump: bool,
}

/// The matcher built from an [`ExcludeSpec`].
pub struct Excludes {
    names: GlobSet,
    paths: GlobSet,
    if_present: Vec<OsString>,
    caches: bool,
    pub one_file_system: bool,
    /// `--skip-nodump`: leave out what carries the nodump flag (`chattr +d`).
    pub skip_nodump: bool,
}

/// The patterns of an exclude file: blank lines and `#` comments dropped,
/// surrounding white space trimmed.
fn file_patterns(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Usage(format!("--exclude-file {}: {e}", path.display())))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Self> {
        Self::from_spec(&ExcludeSpec { patterns: patterns.to_vec(), ..Default::default() })
    }

    pub fn from_spec(spec: &ExcludeSpec) -> Result<Self> {
        let mut all = spec.patterns.clone();
        for f in &spec.files {
            all.extend(file_patterns(f)?);
        }
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in &all {
            let g = Glob::new(p).map_err(|e| ClientError::Usage(format!("bad --exclude {p:?}: {e}")))?;
            if p.contains('/') {
                paths.add(g)
            } else {
                names.add(g)
            };
        }
        for n in &spec.if_present {
            if n.is_empty() || n.contains('/') {
                return Err(ClientError::Usage(format!("--exclude-if-present {n:?}: give a file name, without /")));
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| ClientError::Usage(e.to_string()));
        Ok(Self {
            names: build(names)?,
            paths: build(paths)?,
            if_present: spec.if_present.iter().map(OsString::from).collect(),
            caches: spec.caches,
            one_file_system: spec.one_file_system,
            skip_nodump: spec.skip_nodump,
        })
    }

    pub fn excluded(&self, abs: &Path) -> bool {
        abs.file_name().is_some_and(|n| self.names.is_match(n)) || self.paths.is_match(abs)
    }

    /// Is directory `dir` left out for what it holds (a marker file, a
    /// cache directory tag)?
    pub fn excluded_dir(&self, dir: &Path) -> bool {
        if self.if_present.iter().any(|n| std::fs::symlink_metadata(dir.join(n)).is_ok()) {
            return true;
        }
        self.caches && is_cache_dir(dir)
    }
}

/// Does `dir` hold a `CACHEDIR.TAG` file that starts with the signature?
fn is_cache_dir(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(dir.join("CACHEDIR.TAG")) else { return false };
    let mut head = Vec::with_capacity(CACHEDIR_SIGNATURE.len());
    f.take(CACHEDIR_SIGNATURE.len() as u64).read_to_end(&mut head).is_ok() && head == CACHEDIR_SIGNATURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_cache_tags_and_exclude_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for sub in ["nb", "cache", "fake", "plain"] {
            std::fs::create_dir(p.join(sub)).unwrap();
        }
        std::fs::write(p.join("nb/.nobackup"), b"").unwrap();
        std::fs::write(p.join("cache/CACHEDIR.TAG"), [CACHEDIR_SIGNATURE, b"\n# a cache"].concat()).unwrap();
        std::fs::write(p.join("fake/CACHEDIR.TAG"), b"Signature: not the right one").unwrap();
        std::fs::write(p.join("list"), "# comment\n\n  *.tmp  \n/srv/x/**\n").unwrap();
        let spec = ExcludeSpec {
            files: vec![p.join("list")],
            if_present: vec![".nobackup".into()],
            caches: true,
            ..Default::default()
        };
        let ex = Excludes::from_spec(&spec).unwrap();
        assert!(ex.excluded_dir(&p.join("nb")) && ex.excluded_dir(&p.join("cache")));
        assert!(!ex.excluded_dir(&p.join("fake")) && !ex.excluded_dir(&p.join("plain")));
        assert!(ex.excluded(Path::new("/a/b.tmp")) && ex.excluded(Path::new("/srv/x/y/z")));
        assert!(!ex.excluded(Path::new("/srv/y")));
        let missing = ExcludeSpec { files: vec![p.join("nope")], ..Default::default() };
        assert!(Excludes::from_spec(&missing).err().unwrap().to_string().contains("--exclude-file"));
        let slash = ExcludeSpec { if_present: vec!["a/b".into()], ..Default::default() };
        assert!(Excludes::from_spec(&slash).is_err());
    }
}
