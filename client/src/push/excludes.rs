//! `--exclude` patterns, matched by the lister before anything is
//! stat-ed below an excluded directory.

use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::error::{ClientError, Result};

/// `--exclude` patterns: one without `/` matches a name anywhere; one
/// with `/` matches the absolute path.
pub struct Excludes {
    names: GlobSet,
    paths: GlobSet,
    /// `--skip-nodump`: leave out what carries the nodump flag (`chattr +d`).
    pub skip_nodump: bool,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Self> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let g = Glob::new(p).map_err(|e| ClientError::Usage(format!("bad --exclude {p:?}: {e}")))?;
            if p.contains('/') {
                paths.add(g)
            } else {
                names.add(g)
            };
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| ClientError::Usage(e.to_string()));
        Ok(Self { names: build(names)?, paths: build(paths)?, skip_nodump: false })
    }

    pub fn excluded(&self, abs: &Path) -> bool {
        abs.file_name().is_some_and(|n| self.names.is_match(n)) || self.paths.is_match(abs)
    }
}
