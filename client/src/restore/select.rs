//! `--include` / `--exclude` on restore (and the glob of `bkp find`):
//! globs matched against paths relative to the snapshot root, as `bkp ls`
//! prints them. A pattern without `/` matches a name at any depth
//! (`*.conf`, `cache`); one with `/` matches the path from the root
//! (`etc/nginx/**`, a leading `/` is ignored); `*` never crosses a `/`,
//! `**` does. A pattern that matches a directory takes in all below it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::{ClientError, Result};

#[derive(Clone)]
pub struct Patterns {
    /// As given, for messages.
    given: Vec<String>,
    names: GlobSet,
    /// Index in `given` of each pattern in `names`, then in `paths`.
    name_idx: Vec<usize>,
    paths: GlobSet,
    path_idx: Vec<usize>,
}

impl Patterns {
    /// `flag` names the option in messages (`--include`).
    pub fn new(flag: &str, given: &[String]) -> Result<Self> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        let (mut name_idx, mut path_idx) = (Vec::new(), Vec::new());
        for (i, p) in given.iter().enumerate() {
            let trimmed = p.trim_start_matches('/').trim_end_matches('/');
            if trimmed.is_empty() {
                return Err(ClientError::Usage(format!("{flag} {p:?}: an empty pattern; give a path or a glob")));
            }
            let g = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| ClientError::Usage(format!("{flag} {p:?} is not a valid glob: {e}")))?;
            if trimmed.contains('/') {
                paths.add(g);
                path_idx.push(i);
            } else {
                names.add(g);
                name_idx.push(i);
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| ClientError::Usage(format!("{flag}: {e}")));
        Ok(Self { given: given.to_vec(), names: build(names)?, name_idx, paths: build(paths)?, path_idx })
    }

    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }

    pub fn given(&self) -> &[String] {
        &self.given
    }

    /// Does the entry at `path` itself match a pattern?
    pub fn matches_entry(&self, path: &[u8]) -> bool {
        let name = path.rsplit(|c| *c == b'/').next().unwrap_or(path);
        self.names.is_match(as_path(name)) || self.paths.is_match(as_path(path))
    }

    /// Calls `hit` with the index of every pattern that matches `path` or
    /// one of the directories above it; says whether any did.
    pub fn within(&self, path: &[u8], mut hit: impl FnMut(usize)) -> bool {
        let mut any = false;
        let mut end = 0;
        loop {
            let next = path[end..].iter().position(|c| *c == b'/').map(|p| end + p);
            let prefix = &path[..next.unwrap_or(path.len())];
            let name = &prefix[end..];
            for i in self.names.matches(as_path(name)) {
                hit(self.name_idx[i]);
                any = true;
            }
            for i in self.paths.matches(as_path(prefix)) {
                hit(self.path_idx[i]);
                any = true;
            }
            match next {
                Some(p) => end = p + 1,
                None => return any,
            }
        }
    }
}

fn as_path(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// What a restore takes: included (or everything when there are no
/// includes) and not excluded.
#[derive(Clone)]
pub struct Selection {
    include: Patterns,
    exclude: Patterns,
}

impl Selection {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self> {
        Ok(Self { include: Patterns::new("--include", include)?, exclude: Patterns::new("--exclude", exclude)? })
    }

    pub fn all() -> Self {
        Self::new(&[], &[]).expect("no patterns")
    }

    pub fn is_all(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    pub fn keeps(&self, path: &[u8]) -> bool {
        (self.include.is_empty() || self.include.within(path, |_| {})) && !self.exclude.within(path, |_| {})
    }
}

/// Counts what each pattern matched over a whole tree, to name the ones
/// that matched nothing before anything is written.
pub struct Tally<'a> {
    sel: &'a Selection,
    inc: Vec<u64>,
    exc: Vec<u64>,
    /// Bytes of the files kept, for progress.
    pub bytes: u64,
}

impl<'a> Tally<'a> {
    pub fn new(sel: &'a Selection) -> Self {
        Self { sel, inc: vec![0; sel.include.given.len()], exc: vec![0; sel.exclude.given.len()], bytes: 0 }
    }

    pub fn entry(&mut self, path: &[u8], size: u64) {
        let inc = &mut self.inc;
        let included = self.sel.include.within(path, |i| inc[i] += 1) || self.sel.include.is_empty();
        let exc = &mut self.exc;
        let excluded = self.sel.exclude.within(path, |i| exc[i] += 1);
        if included && !excluded {
            self.bytes += size;
        }
    }

    /// An error naming every pattern that matched nothing.
    pub fn check(&self) -> Result<()> {
        let mut unmatched = Vec::new();
        for (flag, pats, counts) in
            [("--include", &self.sel.include, &self.inc), ("--exclude", &self.sel.exclude, &self.exc)]
        {
            for (p, n) in pats.given.iter().zip(counts.iter()) {
                if *n == 0 {
                    unmatched.push(format!("{flag} {p:?}"));
                }
            }
        }
        if unmatched.is_empty() {
            return Ok(());
        }
        Err(ClientError::Usage(format!(
            "{} matched nothing in the snapshot; nothing was restored (paths are relative to the snapshot root, \
             as `bkp ls` prints them; a pattern without `/` matches a name at any depth)",
            unmatched.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(inc: &[&str], exc: &[&str]) -> Selection {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Selection::new(&v(inc), &v(exc)).unwrap()
    }

    #[test]
    fn globs_select_paths_and_subtrees() {
        let s = sel(&["etc/*.conf", "/srv/www/"], &[]);
        assert!(s.keeps(b"etc/a.conf") && !s.keeps(b"etc/sub/a.conf") && !s.keeps(b"etc/hosts"));
        assert!(s.keeps(b"srv/www") && s.keeps(b"srv/www/index.html") && !s.keeps(b"srv/wwwx"));
        let s = sel(&["*.log"], &["old"]);
        assert!(s.keeps(b"var/log/a.log") && !s.keeps(b"var/old/a.log") && !s.keeps(b"var/log/a.txt"));
        let s = sel(&["etc/**/*.conf"], &[]);
        assert!(s.keeps(b"etc/a/b/c.conf") && s.keeps(b"etc/c.conf"));
        assert!(sel(&[], &[]).keeps(b"x"));
        // A directory that matches takes in all below it.
        let s = sel(&["cache*"], &[]);
        assert!(s.keeps(b"home/u/cache1/deep/file"));
    }

    #[test]
    fn unmatched_patterns_are_named() {
        let s = sel(&["etc/**", "nope/*"], &["*.tmp"]);
        let mut t = Tally::new(&s);
        t.entry(b"etc", 0);
        t.entry(b"etc/hosts", 10);
        let e = t.check().unwrap_err().to_string();
        assert!(e.contains("--include \"nope/*\"") && e.contains("--exclude \"*.tmp\""), "{e}");
        assert!(!e.contains("etc/**"), "{e}");
        assert_eq!(t.bytes, 10);
        assert!(Selection::new(&["a[".into()], &[]).is_err());
    }
}
