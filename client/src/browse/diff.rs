//! `bkp diff SNAP1 SNAP2`: what was added, removed and changed.
//!
//! The two tree streams are lined up by their chunk ids first. Where the
//! lists agree, the bytes agree, so only the chunks that differ are read,
//! plus the one shared chunk on each side of every difference, where
//! parsing picks up again ([`super::records::resync`]) and where it must
//! be seen to land on the same record boundary on both sides. Both sides
//! skip exactly the same stretches, so what is left out is the same on
//! both and compares equal. When the snapshots differ in more than
//! [`SPARSE_MAX_CHUNKS`] chunks, or a check does not hold, both trees are
//! read whole instead.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use bkp_common::snapshot::Snapshot;
use bkp_common::{ChunkId, SnapshotId};
use serde::Serialize;
use tokio::runtime::Handle;

use super::node::{Grouper, Node};
use super::records::{resync, walk_cmp, Records};
use super::{fetch_all, Shown, TreeReads};
use crate::conn::Client;
use crate::error::{ClientError, Corruption, Result};
use crate::restore::TreeReader;

/// Differing tree chunks (with their context) read into memory at most;
/// beyond that the trees are streamed whole.
pub const SPARSE_MAX_CHUNKS: usize = 32;

#[derive(Debug, Serialize)]
pub struct Changed {
    pub path: String,
    pub kind: &'static str,
    /// Content (or type, or a link's target) changed; `false`: metadata only.
    pub content: bool,
    /// What else changed: `type`, `size`, `mode`, `owner`, `mtime`, `xattrs`, `flags`, `target`.
    pub fields: Vec<&'static str>,
    pub old: Shown,
    pub new: Shown,
}

#[derive(Debug, Default, Serialize)]
pub struct DiffReport {
    pub added: Vec<Shown>,
    pub removed: Vec<Shown>,
    pub changed: Vec<Changed>,
    pub tree_chunks: TreeReads,
}

pub async fn diff(client: Arc<Client>, a: SnapshotId, b: SnapshotId) -> Result<DiffReport> {
    let (sa, sb) = (client.snapshot(a).await?, client.snapshot(b).await?);
    let total = (sa.tree.len() + sb.tree.len()) as u64;
    let ops = align(&sa.tree, &sb.tree);
    let plan = Plan::new(&ops, sa.tree.len(), sb.tree.len());
    let wanted: HashSet<ChunkId> = plan.ids(&sa.tree, &sb.tree);
    tracing::debug!("diff: {} of {total} tree chunks differ or frame a difference: {ops:?}", wanted.len());
    let mut fetched = 0;
    if wanted.len() <= SPARSE_MAX_CHUNKS && wanted.len() as u64 * 2 <= total {
        let n = wanted.len() as u64;
        fetched = n;
        let chunks: HashMap<ChunkId, Arc<Vec<u8>>> =
            fetch_all(&client, wanted.into_iter().collect()).await?.into_iter().collect();
        let (ta, tb) = (sa.tree.clone(), sb.tree.clone());
        let sparse = tokio::task::spawn_blocking(move || sparse(&ta, &tb, &plan, &chunks))
            .await
            .map_err(|e| ClientError::Task { what: "diff thread", source: e })?;
        if let Some(mut r) = sparse {
            r.tree_chunks = TreeReads { total, fetched: n };
            return Ok(r);
        }
        tracing::debug!("diff: reading both trees whole");
    }
    let handle = Handle::current();
    let mut r = tokio::task::spawn_blocking(move || full(client, handle, &sa, &sb))
        .await
        .map_err(|e| ClientError::Task { what: "diff thread", source: e })??;
    r.tree_chunks = TreeReads { total, fetched: fetched + total };
    Ok(r)
}

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Equal { a: usize, b: usize, n: usize },
    Diff { a: Range<usize>, b: Range<usize> },
}

/// Lines up two chunk lists: runs both share, and what lies between.
/// Greedy: after a difference, the nearest pair of equal ids (fewest
/// chunks skipped on both sides) starts the next shared run.
fn align(a: &[ChunkId], b: &[ChunkId]) -> Vec<Op> {
    let mut pos: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    for (q, id) in b.iter().enumerate() {
        pos.entry(*id).or_default().push(q);
    }
    let (mut i, mut j, mut ops) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let (si, sj) = (i, j);
            while i < a.len() && j < b.len() && a[i] == b[j] {
                (i, j) = (i + 1, j + 1);
            }
            ops.push(Op::Equal { a: si, b: sj, n: i - si });
            continue;
        }
        let mut best: Option<(usize, usize, usize)> = None;
        for (p, id) in a.iter().enumerate().skip(i) {
            if best.is_some_and(|(c, ..)| p - i >= c) {
                break;
            }
            let Some(list) = pos.get(id) else { continue };
            let k = list.partition_point(|&q| q < j);
            if let Some(&q) = list.get(k) {
                let c = (p - i) + (q - j);
                if best.is_none_or(|(bc, ..)| c < bc) {
                    best = Some((c, p, q));
                }
            }
        }
        let (ai, bj) = best.map_or((a.len(), b.len()), |(_, p, q)| (p, q));
        ops.push(Op::Diff { a: i..ai, b: j..bj });
        (i, j) = (ai, bj);
    }
    ops
}

/// Which chunks each side reads, and the shared chunks right after a
/// difference, where both sides must agree on the record boundary.
struct Plan {
    need_a: Vec<bool>,
    need_b: Vec<bool>,
    after: Vec<(usize, usize)>,
}

impl Plan {
    fn new(ops: &[Op], la: usize, lb: usize) -> Self {
        let (mut need_a, mut need_b) = (vec![false; la], vec![false; lb]);
        // The header, for the stream's version.
        for x in need_a.iter_mut().take(1).chain(need_b.iter_mut().take(1)) {
            *x = true;
        }
        let mut after = Vec::new();
        for (k, op) in ops.iter().enumerate() {
            let Op::Diff { a, b } = op else { continue };
            a.clone().for_each(|i| need_a[i] = true);
            b.clone().for_each(|j| need_b[j] = true);
            if let Some(Op::Equal { a, b, n }) = k.checked_sub(1).map(|p| &ops[p]) {
                need_a[a + n - 1] = true;
                need_b[b + n - 1] = true;
            }
            if let Some(Op::Equal { a, b, .. }) = ops.get(k + 1) {
                need_a[*a] = true;
                need_b[*b] = true;
                after.push((*a, *b));
            }
        }
        Plan { need_a, need_b, after }
    }

    fn ids(&self, a: &[ChunkId], b: &[ChunkId]) -> HashSet<ChunkId> {
        let pick = |ids: &[ChunkId], need: &[bool]| {
            ids.iter().zip(need).filter(|(_, n)| **n).map(|(id, _)| *id).collect::<Vec<_>>()
        };
        pick(a, &self.need_a).into_iter().chain(pick(b, &self.need_b)).collect()
    }
}

/// One side's nodes from the chunks it reads, and the offset of the first
/// record boundary in each of those chunks. `None`: a stretch could not be
/// picked up, so the sparse diff cannot be trusted.
type SideNodes = (Vec<Node>, HashMap<usize, usize>);

fn side(ids: &[ChunkId], need: &[bool], chunks: &HashMap<ChunkId, Arc<Vec<u8>>>) -> Option<SideNodes> {
    let (mut nodes, mut first) = (Vec::new(), HashMap::new());
    let mut version = None;
    let mut k = 0;
    while k < ids.len() {
        if !need[k] {
            k += 1;
            continue;
        }
        let start = k;
        while k < ids.len() && need[k] {
            k += 1;
        }
        let (mut rec, skip) = if start == 0 {
            (Records::new(), 0)
        } else {
            let v = version?;
            let Some(o) = resync(&chunks[&ids[start]], v) else {
                tracing::debug!("diff: no record boundary found in tree chunk {start}");
                return None;
            };
            (Records::resumed(v), o)
        };
        // Where each chunk of the run begins in the run's bytes.
        let mut starts = Vec::new();
        let mut at = 0u64;
        let mut grouper = Grouper::default();
        for (c, id) in ids.iter().enumerate().take(k).skip(start) {
            let data = &chunks[id][if c == start { skip } else { 0 }..];
            starts.push((c, at, if c == start { skip } else { 0 }));
            at += data.len() as u64;
            rec.feed(data);
            loop {
                let (pos, e) = match rec.next_record() {
                    Ok(Some(x)) => x,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("diff: tree chunks from {start} do not parse: {e}");
                        return None;
                    }
                };
                let &(ci, cstart, cskip) = starts.iter().rev().find(|(_, s, _)| *s <= pos).expect("a chunk");
                first.entry(ci).or_insert((pos - cstart) as usize + cskip);
                grouper.push(e, &mut |n| nodes.push(n));
            }
        }
        grouper.finish(&mut |n| nodes.push(n));
        version = version.or(rec.version());
        if k == ids.len() && !rec.tail().is_empty() {
            return None; // truncated: the whole read says so
        }
    }
    Some((nodes, first))
}

fn sparse(a: &[ChunkId], b: &[ChunkId], plan: &Plan, chunks: &HashMap<ChunkId, Arc<Vec<u8>>>) -> Option<DiffReport> {
    let (na, fa) = side(a, &plan.need_a, chunks)?;
    let (nb, fb) = side(b, &plan.need_b, chunks)?;
    for (i, j) in &plan.after {
        match (fa.get(i), fb.get(j)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => {
                tracing::debug!("diff: first record boundaries in shared chunk {i}/{j} differ: {x:?}, {y:?}");
                return None;
            }
        }
    }
    let mut r = DiffReport::default();
    let (mut ia, mut ib) = (na.into_iter(), nb.into_iter());
    if let Err(e) = merge(|| Ok(ia.next()), || Ok(ib.next()), &mut r) {
        tracing::debug!("diff: {e}");
        return None;
    }
    Some(r)
}

/// A tree's nodes, streamed.
struct Stream {
    reader: TreeReader,
    grouper: Grouper,
    queue: VecDeque<Node>,
    done: bool,
}

impl Stream {
    fn next(&mut self) -> Result<Option<Node>> {
        loop {
            if let Some(n) = self.queue.pop_front() {
                return Ok(Some(n));
            }
            if self.done {
                return Ok(None);
            }
            let q = &mut self.queue;
            match self.reader.next_entry()? {
                Some(e) => self.grouper.push(e, &mut |n| q.push_back(n)),
                None => {
                    self.grouper.finish(&mut |n| q.push_back(n));
                    self.done = true;
                }
            }
        }
    }
}

fn full(client: Arc<Client>, handle: Handle, a: &Snapshot, b: &Snapshot) -> Result<DiffReport> {
    let open = |s: &Snapshot| Stream {
        reader: TreeReader::new(client.clone(), handle.clone(), s),
        grouper: Grouper::default(),
        queue: VecDeque::new(),
        done: false,
    };
    let (mut x, mut y) = (open(a), open(b));
    let mut r = DiffReport::default();
    merge(|| x.next(), || y.next(), &mut r)?;
    Ok(r)
}

fn shown(n: &Node) -> Shown {
    Shown::of(&n.path, n.kind, n.size, &n.meta)
}

/// Walks both node sequences in walk order.
fn merge(
    mut next_a: impl FnMut() -> Result<Option<Node>>,
    mut next_b: impl FnMut() -> Result<Option<Node>>,
    r: &mut DiffReport,
) -> Result<()> {
    let (mut x, mut y) = (next_a()?, next_b()?);
    let mut last: Option<Vec<u8>> = None;
    loop {
        let order = match (&x, &y) {
            (None, None) => return Ok(()),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => walk_cmp(&a.path, &b.path),
        };
        // Each side in walk order, or the merge would pair wrong paths.
        let here = if order == Ordering::Greater { y.as_ref() } else { x.as_ref() }.map(|n| n.path.clone());
        if let (Some(l), Some(h)) = (&last, &here) {
            if walk_cmp(l, h) == Ordering::Greater {
                return Err(Corruption::Layout("snapshot tree: paths out of walk order").into());
            }
        }
        last = here;
        match order {
            Ordering::Less => {
                r.removed.push(shown(x.as_ref().expect("some")));
                x = next_a()?;
            }
            Ordering::Greater => {
                r.added.push(shown(y.as_ref().expect("some")));
                y = next_b()?;
            }
            Ordering::Equal => {
                let (a, b) = (x.take().expect("some"), y.take().expect("some"));
                if let Some(c) = compare(&a, &b) {
                    r.changed.push(c);
                }
                (x, y) = (next_a()?, next_b()?);
            }
        }
    }
}

/// What differs between two nodes of the same path; ctime is left out
/// (it moves with every metadata change, and with a re-created file).
fn compare(a: &Node, b: &Node) -> Option<Changed> {
    let mut fields = Vec::new();
    let mut content = false;
    if a.kind != b.kind {
        fields.push("type");
        content = true;
    } else {
        if a.size != b.size {
            fields.push("size");
            content = true;
        }
        if matches!((a.hash, b.hash), (Some(x), Some(y)) if x != y) && a.size == b.size {
            content = true;
        }
        if a.target != b.target {
            fields.push("target");
            content = true;
        }
        if a.special != b.special {
            content = true;
        }
    }
    let (ma, mb) = (&a.meta, &b.meta);
    if ma.mode != mb.mode {
        fields.push("mode");
    }
    if (ma.uid, ma.gid) != (mb.uid, mb.gid) {
        fields.push("owner");
    }
    if ma.mtime_ns != mb.mtime_ns {
        fields.push("mtime");
    }
    if ma.xattrs != mb.xattrs {
        fields.push("xattrs");
    }
    if ma.flags != mb.flags {
        fields.push("flags");
    }
    if !content && fields.is_empty() {
        return None;
    }
    Some(Changed { path: shown(b).path, kind: b.kind.name(), content, fields, old: shown(a), new: shown(b) })
}

/// Prints the report: JSON, or one line per path (names escaped).
pub fn print(r: &DiffReport, json: bool, verbose: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, r)?;
        return writeln!(out);
    }
    let esc = |p: &str| bkp_common::names::escape(p);
    let one = |s: &Shown| format!("{}, {} bytes, mtime {}", s.kind, s.size, s.mtime);
    for s in &r.added {
        writeln!(out, "+ {}  ({})", esc(&s.path), one(s))?;
    }
    for s in &r.removed {
        writeln!(out, "- {}  ({})", esc(&s.path), one(s))?;
    }
    for c in &r.changed {
        let mut what = Vec::new();
        if c.old.kind != c.new.kind {
            what.push(format!("{} -> {}", c.old.kind, c.new.kind));
        }
        if c.old.size != c.new.size || c.content {
            what.push(format!("size {} -> {}", c.old.size, c.new.size));
        }
        if c.old.mtime_ns != c.new.mtime_ns {
            what.push(format!("mtime {} -> {}", c.old.mtime, c.new.mtime));
        }
        if c.old.mode != c.new.mode {
            what.push(format!("mode {:04o} -> {:04o}", c.old.mode, c.new.mode));
        }
        if c.fields.contains(&"owner") {
            what.push(format!("owner {}:{} -> {}:{}", c.old.uid, c.old.gid, c.new.uid, c.new.gid));
        }
        for f in ["xattrs", "flags", "target"] {
            if c.fields.contains(&f) {
                what.push(f.to_string());
            }
        }
        let only = if c.content { "" } else { "metadata only: " };
        writeln!(out, "{} {}  ({only}{})", letter(c), esc(&c.path), what.join(", "))?;
    }
    if verbose {
        eprintln!(
            "{} added, {} removed, {} changed; read {} of {} tree chunks",
            r.added.len(),
            r.removed.len(),
            r.changed.len(),
            r.tree_chunks.fetched,
            r.tree_chunks.total
        );
    }
    Ok(())
}

/// The kind of a changed entry, for a listing's letter.
pub fn letter(c: &Changed) -> char {
    if c.fields.contains(&"type") {
        'T'
    } else if c.content {
        'M'
    } else {
        'U'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(s: &str) -> Vec<ChunkId> {
        s.bytes().map(|c| ChunkId::from_bytes([c; 32])).collect()
    }

    use bkp_common::tree::{ChunkRef, Entry, Meta, TreeEncoder};

    /// A tree stream of `n` files in 10 directories; `edit` may change
    /// or drop file `i`'s entry (and add others after it).
    fn stream(n: usize, edit: impl Fn(usize, &mut Vec<Entry>)) -> Vec<u8> {
        let mut enc = TreeEncoder::new();
        for d in 0..10 {
            enc.push(&Entry::Dir { path: format!("d{d}").into_bytes(), meta: Meta { mode: 0o755, ..Meta::default() } });
            for i in d * n / 10..(d + 1) * n / 10 {
                let data = format!("file {i}");
                let meta =
                    Meta { mode: 0o644, uid: 1000, gid: 1000, mtime_ns: i as i64 * 1_000_000, ..Meta::default() };
                let mut es = vec![
                    Entry::File {
                        path: format!("d{d}/file-number-{i:06}").into_bytes(),
                        meta,
                        size: data.len() as u64,
                    },
                    Entry::Chunks(vec![ChunkRef { id: ChunkId::of(data.as_bytes()), len: data.len() as u32 }]),
                    Entry::FileEnd { hash: blake3::hash(data.as_bytes()).into() },
                ];
                edit(i, &mut es);
                es.iter().for_each(|e| enc.push(e));
            }
        }
        enc.take()
    }

    fn cut(s: &[u8], chunks: &mut HashMap<ChunkId, Arc<Vec<u8>>>) -> Vec<ChunkId> {
        bkp_common::chunker::cut_points(s)
            .into_iter()
            .map(|(o, l)| {
                let id = ChunkId::of(&s[o..o + l]);
                chunks.insert(id, Arc::new(s[o..o + l].to_vec()));
                id
            })
            .collect()
    }

    fn nodes(s: &[u8]) -> Vec<Node> {
        let mut r = Records::new();
        r.feed(s);
        let (mut g, mut out) = (Grouper::default(), Vec::new());
        while let Some((_, e)) = r.next_record().unwrap() {
            g.push(e, &mut |n| out.push(n));
        }
        g.finish(&mut |n| out.push(n));
        out
    }

    /// The sparse diff, reading only a few chunks, says exactly what the
    /// diff of the whole streams says, for edits anywhere.
    #[test]
    fn sparse_diff_equals_the_full_diff() {
        let n = 120_000;
        let base = stream(n, |_, _| {});
        type Edit = Box<dyn Fn(usize, &mut Vec<Entry>)>;
        let edits: Vec<Edit> = vec![
            Box::new(|i, es| {
                if i == 30_000 {
                    es.clear()
                }
            }),
            Box::new(|i, es| {
                if i == 12_345 {
                    let path = [es[0].path().unwrap(), b"x"].concat();
                    let extra = Entry::Symlink { path, meta: Meta::default(), target: b"t".to_vec() };
                    es.push(extra);
                }
            }),
            Box::new(|i, es| {
                if let (true, Entry::File { meta, .. }) = (i % 40_000 == 7, &mut es[0]) {
                    meta.mode = 0o600;
                }
            }),
            Box::new(|i, es| {
                if i == 119_990 {
                    if let Entry::File { size, .. } = &mut es[0] {
                        *size = 3;
                    }
                    es[1] = Entry::Chunks(vec![ChunkRef { id: ChunkId::of(b"abc"), len: 3 }]);
                    es[2] = Entry::FileEnd { hash: blake3::hash(b"abc").into() };
                }
            }),
        ];
        for (k, edit) in edits.iter().enumerate() {
            let changed = stream(n, edit);
            let mut chunks = HashMap::new();
            let (a, b) = (cut(&base, &mut chunks), cut(&changed, &mut chunks));
            assert!(a.len() >= 8, "{} chunks", a.len());
            let plan = Plan::new(&align(&a, &b), a.len(), b.len());
            let read = plan.ids(&a, &b).len();
            // One edit reads a few chunks; three spread out may read most.
            assert!(k == 2 || read * 2 < a.len() + b.len(), "edit {k}: {read} chunks read of {}", a.len() + b.len());
            let got = sparse(&a, &b, &plan, &chunks).unwrap_or_else(|| panic!("edit {k}: the sparse diff gave up"));
            let mut want = DiffReport::default();
            let (mut x, mut y) = (nodes(&base).into_iter(), nodes(&changed).into_iter());
            merge(|| Ok(x.next()), || Ok(y.next()), &mut want).unwrap();
            let j = |r: &DiffReport| serde_json::to_value((&r.added, &r.removed, &r.changed)).unwrap();
            assert_eq!(j(&got), j(&want), "edit {k}");
            assert!(!want.added.is_empty() || !want.removed.is_empty() || !want.changed.is_empty(), "edit {k}");
        }
    }

    #[test]
    fn aligns_shared_runs() {
        let ops = align(&ids("abcdef"), &ids("abXdef"));
        assert_eq!(
            ops,
            vec![Op::Equal { a: 0, b: 0, n: 2 }, Op::Diff { a: 2..3, b: 2..3 }, Op::Equal { a: 3, b: 3, n: 3 }]
        );
        let ops = align(&ids("abcdef"), &ids("abcYdef"));
        assert_eq!(ops[1], Op::Diff { a: 3..3, b: 3..4 });
        let ops = align(&ids("abc"), &ids("xyz"));
        assert_eq!(ops, vec![Op::Diff { a: 0..3, b: 0..3 }]);
        let plan = Plan::new(&align(&ids("abcdefgh"), &ids("abcdeXgh")), 8, 8);
        let read: Vec<usize> = (0..8).filter(|&i| plan.need_a[i]).collect();
        assert_eq!(read, vec![0, 4, 5, 6], "the header, the difference and one chunk each side");
        assert_eq!(plan.after, vec![(6, 6)]);
    }
}
