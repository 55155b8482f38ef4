//! Checks of the crate's shape, read from its own sources: no import
//! cycle among its modules, and `ServerState` only in the outer layers
//! (see the crate doc). A module's imports are the `crate::` paths in its
//! code (comments and its `mod tests` block left out), in a folder its
//! `super::` paths, and in a folder's `mod.rs` the paths through its own
//! children (`use schema::X`, `rocks::durability::Batch`); `store::rocks`
//! and `verify::drill` are modules of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules that may hold the whole server state.
const OUTER: &[&str] = &["state", "server", "connection", "control", "http", "schedule", "cli"];

fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().with_extension("");
            let rel = rel.to_str().unwrap().replace('/', "::");
            let name = rel.strip_suffix("::mod").unwrap_or(&rel).to_string();
            if name != "lib" && name != "main" && p.extension().is_some_and(|x| x == "rs") {
                out.insert(name, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The code of a file without comments and without its test module.
fn code(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &src[..i],
        None => src,
    };
    src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every `prefix` path in `code`, as its segments.
fn paths<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    code.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &code[i + prefix.len()..];
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            rest[..end].split("::").filter(|s| !s.is_empty()).collect()
        })
        .collect()
}

/// Every path in `code` that starts with a bare name (not after `::` or
/// inside a longer word), as its segments: how a `mod.rs` names its
/// children.
fn bare_paths(code: &str) -> Vec<Vec<&str>> {
    let b = code.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if word(b[i]) && (i == 0 || !(word(b[i - 1]) || b[i - 1] == b':')) {
            let rest = &code[i..];
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            if rest[..end].contains("::") {
                out.push(rest[..end].split("::").filter(|s| !s.is_empty()).collect());
            }
            i += end.max(1);
        } else {
            i += 1;
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let longest =
        |segs: &[&str]| (1..=segs.len()).rev().map(|k| segs[..k].join("::")).find(|m| files.contains_key(m.as_str()));
    let mut g = BTreeMap::new();
    for (name, src) in &files {
        let code = code(src);
        let mut deps: BTreeSet<String> = paths(&code, "crate::").iter().filter_map(|p| longest(p)).collect();
        if let Some((parent, _)) = name.rsplit_once("::") {
            for p in paths(&code, "super::") {
                let full: Vec<&str> = parent.split("::").chain(p).collect();
                deps.extend(longest(&full));
            }
        }
        let folder = format!("{name}::");
        if files.keys().any(|m| m.starts_with(&folder)) {
            for p in bare_paths(&code) {
                let full: Vec<&str> = name.split("::").chain(p).collect();
                deps.extend(longest(&full));
            }
        }
        deps.remove(name);
        g.insert(name.clone(), deps);
    }
    g
}

/// The strongly connected components of more than one module.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for d in g.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in g.keys() {
        let comp: Vec<String> =
            g.keys().filter(|o| reaches[m].contains(*o) && reaches[o].contains(m)).cloned().collect();
        if comp.len() > 1 && !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

#[test]
fn no_import_cycle_among_server_modules() {
    let g = graph();
    assert!(g.len() > 30 && g["service::push"].contains("commit"), "the sources were not read: {g:?}");
    assert!(g["store"].contains("store::schema"), "a mod.rs's paths through its children were not read: {g:?}");
    let c = cycles(&g);
    assert!(c.is_empty(), "import cycles: {c:?}");
}

#[test]
fn only_the_outer_layers_hold_the_server_state() {
    let holders: Vec<String> = sources()
        .into_iter()
        .filter(|(name, src)| {
            let top = name.split("::").next().unwrap_or_default();
            !OUTER.contains(&top) && name != "layering" && code(src).contains("ServerState")
        })
        .map(|(name, _)| name)
        .collect();
    assert!(holders.is_empty(), "below the outer layers, these take ServerState: {holders:?}");
}

#[test]
fn a_cycle_is_found() {
    let g: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(m, d)| (m.to_string(), [d.to_string()].into()))
        .collect();
    assert_eq!(cycles(&g), [["a", "b", "c"]]);
}
