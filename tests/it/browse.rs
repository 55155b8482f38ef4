//! `bkp diff`, `bkp find`, `bkp cat` and restore's `--include` /
//! `--exclude` globs, on snapshots of a real tree pushed, changed in
//! known ways and pushed again; read back with a restore token.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bkp_common::protocol::Role;
use bkp_tests::{json, ok, random_bytes, TestServer};
use serde_json::Value;

/// The snapshot-relative name of `p` (absolute, without the leading `/`).
fn rel(p: &Path) -> String {
    p.to_str().unwrap().trim_start_matches('/').to_string()
}

fn push(server: &TestServer, token: &Path, root: &Path) -> String {
    let r = json(&ok(server.bkp(token).args(["push", "--json"]).arg(root)));
    r["snapshot"]["id"].as_str().unwrap().to_string()
}

/// Keeps a directory's mtime across a change inside it, so that the
/// diff's expected sets stay exact.
fn keeping_mtime(dir: &Path, change: impl FnOnce()) {
    let t = filetime::FileTime::from_last_modification_time(&fs::metadata(dir).unwrap());
    change();
    filetime::set_file_mtime(dir, t).unwrap();
}

/// The paths of a JSON list of entries, those below `under` only.
fn paths(v: &Value, under: &str) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .filter(|p| p.starts_with(under))
        .map(|p| p[under.len()..].to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn diff_find_and_cat_on_known_snapshots() {
    let server = TestServer::start();
    let push_token = server.token("web01", Role::Push);
    let token = server.token("web01", Role::Restore);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    fs::create_dir_all(root.join("sub/deep")).unwrap();
    fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    fs::write(root.join("b.txt"), b"bravo\n").unwrap();
    fs::write(root.join("meta.txt"), b"same content\n").unwrap();
    fs::write(root.join("sub/c.txt"), b"charlie\n").unwrap();
    let big = random_bytes(9 << 20, 7);
    fs::write(root.join("sub/deep/big.bin"), &big).unwrap();
    fs::hard_link(root.join("a.txt"), root.join("hl")).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
    let s1 = push(&server, &push_token, &root);

    // Changed in known ways: content (and size), a file removed and one
    // added, a mode only, a symlink's target.
    fs::write(root.join("b.txt"), b"bravo, longer now\n").unwrap();
    fs::set_permissions(root.join("meta.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    keeping_mtime(&root.join("sub"), || {
        fs::remove_file(root.join("sub/c.txt")).unwrap();
        fs::write(root.join("sub/new.txt"), b"new\n").unwrap();
    });
    keeping_mtime(&root, || {
        fs::remove_file(root.join("link")).unwrap();
        std::os::unix::fs::symlink("b.txt", root.join("link")).unwrap();
    });
    let s2 = push(&server, &push_token, &root);
    keeping_mtime(&root.join("sub"), || fs::write(root.join("sub/new2.txt"), b"newer\n").unwrap());
    let s3 = push(&server, &push_token, &root);

    let under = format!("{}/", rel(&root));
    let d = json(&ok(server.bkp(&token).args(["diff", "--json", &s1[..12], &s2[..12]])));
    assert_eq!(paths(&d["added"], &under), set(&["sub/new.txt"]), "{d}");
    assert_eq!(paths(&d["removed"], &under), set(&["sub/c.txt"]), "{d}");
    assert_eq!(paths(&d["changed"], &under), set(&["b.txt", "link", "meta.txt"]), "{d}");
    // Above the root only directories' metadata may change (/tmp's mtime).
    for c in d["changed"].as_array().unwrap() {
        let p = c["path"].as_str().unwrap();
        let r = p.strip_prefix(&under).unwrap_or(p);
        match r {
            "b.txt" => {
                assert_eq!(c["content"], true);
                assert!(c["fields"].as_array().unwrap().contains(&"size".into()), "{c}");
                assert_eq!((c["old"]["size"].as_u64(), c["new"]["size"].as_u64()), (Some(6), Some(18)));
                assert!(c["old"]["mtime_ns"].as_i64().is_some() && c["new"]["mtime"].as_str().is_some());
            }
            "meta.txt" => {
                assert_eq!(c["content"], false, "a mode change is metadata only: {c}");
                assert_eq!(c["fields"], serde_json::json!(["mode"]));
                assert_eq!((c["old"]["mode"].as_u64(), c["new"]["mode"].as_u64()), (Some(0o644), Some(0o600)));
            }
            "link" => {
                assert_eq!(c["content"], true);
                assert!(c["fields"].as_array().unwrap().contains(&"target".into()), "{c}");
            }
            _ => {
                assert_eq!((c["kind"].as_str(), &c["content"]), (Some("dir"), &Value::Bool(false)), "{c}");
                assert!(!p.starts_with(&under) && under.starts_with(p), "only an ancestor of the root: {p}");
            }
        }
    }
    assert!(d["tree_chunks"]["total"].as_u64().unwrap() >= 2, "{d}");
    // The text form: one line per path, a letter for each kind of change.
    let text = ok(server.bkp(&token).args(["diff", &s1[..12], &s2[..12]]));
    let text = String::from_utf8(text.stdout).unwrap();
    for line in [
        format!("+ {under}sub/new.txt"),
        format!("- {under}sub/c.txt"),
        format!("M {under}b.txt"),
        format!("U {under}meta.txt"),
    ] {
        assert!(text.lines().any(|l| l.starts_with(&line)), "{line:?} in:\n{text}");
    }
    // A snapshot against itself: nothing.
    let same = json(&ok(server.bkp(&token).args(["diff", "--json", &s3, &s3])));
    assert!(same["added"].as_array().unwrap().is_empty() && same["changed"].as_array().unwrap().is_empty());

    // find across the three snapshots.
    let f = json(&ok(server.bkp(&token).args(["find", "--json", "*.txt"])));
    assert_eq!(f["snapshots"], 3);
    let found: BTreeSet<(String, String)> = f["found"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["snapshot"].as_str().unwrap().to_string(), x["path"].as_str().unwrap().to_string()))
        .collect();
    let mut want = BTreeSet::new();
    for (s, names) in [
        (&s1, &["a.txt", "b.txt", "meta.txt", "sub/c.txt"][..]),
        (&s2, &["a.txt", "b.txt", "meta.txt", "sub/new.txt"][..]),
        (&s3, &["a.txt", "b.txt", "meta.txt", "sub/new.txt", "sub/new2.txt"][..]),
    ] {
        for n in names {
            want.insert((s.clone(), format!("{under}{n}")));
        }
    }
    assert_eq!(found, want);
    let b_sizes: Vec<u64> = f["found"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["path"].as_str().unwrap().ends_with("/b.txt"))
        .map(|x| x["size"].as_u64().unwrap())
        .collect();
    assert_eq!(b_sizes, vec![6, 18, 18], "oldest first, with each snapshot's size");
    let one = json(&ok(server.bkp(&token).args(["find", "--json", &format!("{under}sub/new2.*")])));
    assert_eq!(one["found"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["found"][0]["snapshot"].as_str(), Some(&s3[..]));
    let none = json(&ok(server.bkp(&token).args(["find", "--json", "*.txt", "--since", "2099-01-01T00:00:00Z"])));
    assert_eq!((none["snapshots"].as_u64(), none["found"].as_array().unwrap().len()), (Some(0), 0));
    let recent = json(&ok(server.bkp(&token).args(["find", "--json", "big.bin", "--since", "1h"])));
    assert_eq!(recent["found"].as_array().unwrap().len(), 3, "{recent}");
    // A restore token reads its own host only: the server says no.
    let other = server.bkp(&token).args(["find", "*.txt", "--host", "db01"]).output().unwrap();
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("only an admin token lists other hosts"), "{err}");

    // cat: byte for byte, a multi-chunk file too, an older version, a hardlink.
    let cat = |snap: &str, p: &str| server.bkp(&token).args(["cat", snap, &format!("{under}{p}")]).output().unwrap();
    let out = cat("latest", "sub/deep/big.bin");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == big, "big.bin: {} bytes back", out.stdout.len());
    assert_eq!(cat(&s1[..8], "b.txt").stdout, b"bravo\n");
    assert_eq!(cat("latest", "b.txt").stdout, b"bravo, longer now\n");
    assert_eq!(cat("latest", "hl").stdout, b"alpha\n");
    // A leading `/` is the same path.
    let slash = server.bkp(&token).args(["cat", "latest", &format!("/{under}a.txt")]).output().unwrap();
    assert_eq!(slash.stdout, b"alpha\n");
    for (p, says) in [("sub", "is a directory"), ("missing.txt", "no such file"), ("link", "is a symlink to b.txt")] {
        let out = cat("latest", p);
        assert!(!out.status.success() && out.stdout.is_empty(), "{p}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{p}: {err}");
    }
}

/// Two large snapshots that differ in one directory: diff reads a few of
/// their tree chunks, and the result is exact; find over both reads about
/// one tree.
#[test]
fn diff_and_find_of_nearly_equal_large_trees_read_little() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("many");
    // About 20 MiB of tree stream in 80,000 entries with long names (not
    // repetitive: a run of one byte never cuts, giving 4 MiB chunks).
    let name =
        |d: u32, f: u32| format!("{}-{f:05}", blake3::hash(&[d.to_le_bytes(), f.to_le_bytes()].concat()).to_hex());
    for d in 0..40 {
        let dir = root.join(format!("dir{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..2000 {
            fs::write(dir.join(format!("{}{}", name(d, f), name(f, d))), b"").unwrap();
        }
    }
    let long = format!("{}{}", name(21, 1000), name(1000, 21));
    let s1 = push(&server, &token, &root);
    let mid = root.join("dir021");
    keeping_mtime(&mid, || {
        fs::remove_file(mid.join(&long)).unwrap();
        fs::write(mid.join("added"), b"x").unwrap();
    });
    let s2 = push(&server, &token, &root);
    let under = format!("{}/", rel(&root));
    let d = json(&ok(server.bkp(&token).args(["diff", "--json", &s1, &s2])));
    assert_eq!(paths(&d["added"], &under), set(&["dir021/added"]), "{}", d["added"]);
    assert_eq!(paths(&d["removed"], &under), set(&[&format!("dir021/{long}")]));
    assert!(paths(&d["changed"], &under).is_empty(), "{}", d["changed"]);
    let (fetched, total) = (d["tree_chunks"]["fetched"].as_u64().unwrap(), d["tree_chunks"]["total"].as_u64().unwrap());
    eprintln!("diff read {fetched} of {total} tree chunks");
    assert!(total >= 20, "the trees are large: {total} chunks");
    // The differing chunks and one shared chunk each side of each
    // difference; the first chunk differs too (it holds /tmp, whose mtime
    // other processes move).
    assert!(fetched <= 10 && fetched * 2 < total, "diff read {fetched} of {total} tree chunks");

    let f = json(&ok(server.bkp(&token).args(["find", "--json", "added"])));
    assert_eq!(f["found"].as_array().unwrap().len(), 1);
    let (fetched, total) = (f["tree_chunks"]["fetched"].as_u64().unwrap(), f["tree_chunks"]["total"].as_u64().unwrap());
    eprintln!("find read {fetched} of {total} tree chunks");
    assert!(fetched <= total / 2 + 3, "find read {fetched} of {total} tree chunks");
}

/// Every regular file below `dir`, relative to it.
fn files_below(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(base: &Path, d: &Path, out: &mut BTreeSet<String>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().to_str().unwrap().to_string());
            }
        }
    }
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

#[test]
fn restore_include_and_exclude_globs() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    for (p, data) in [
        ("etc/a.conf", "a"),
        ("etc/b.conf", "b"),
        ("etc/hosts", "h"),
        ("etc/sub/c.conf", "c"),
        ("var/log/x.log", "x"),
        ("var/cache/blob", "blob"),
        ("var/cache/deeper/more", "more"),
    ] {
        fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
        fs::write(root.join(p), data).unwrap();
    }
    push(&server, &token, &root);
    let r = rel(&root);
    let restore = |args: &[String]| {
        let t = tempfile::tempdir().unwrap();
        let out = server.bkp(&token).args(["restore", "latest", "--target"]).arg(t.path()).args(args).output().unwrap();
        (t, out)
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for (args, want) in [
        (s(&["--include", &format!("{r}/etc/*.conf")]), set(&["etc/a.conf", "etc/b.conf"])),
        (s(&["--include", &format!("/{r}/etc/**/*.conf")]), set(&["etc/a.conf", "etc/b.conf", "etc/sub/c.conf"])),
        (s(&["--include", "*.conf", "--exclude", "sub"]), set(&["etc/a.conf", "etc/b.conf"])),
        // A directory that matches brings all below it.
        (s(&["--include", "cache"]), set(&["var/cache/blob", "var/cache/deeper/more"])),
        (s(&["--exclude", "cache", "--exclude", "*.conf"]), set(&["etc/hosts", "var/log/x.log"])),
    ] {
        let (t, out) = restore(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(files_below(&t.path().join(&r)), want, "{args:?}");
    }
    // A pattern that matches nothing: an error naming it, nothing written.
    let (t, out) = restore(&s(&["--include", "*.conf", "--include", "nomatch*", "--exclude", "*.tmp"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--include \"nomatch*\"") && err.contains("--exclude \"*.tmp\""), "{err}");
    assert!(err.contains("matched nothing") && !err.contains("\"*.conf\""), "{err}");
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0, "nothing was written");
    let v = server.bkp(&token).args(["restore", "latest", "--verify-only", "--include", "nope"]).output().unwrap();
    assert!(!v.status.success() && String::from_utf8_lossy(&v.stderr).contains("--include \"nope\""));
    let bad = server.bkp(&token).args(["restore", "latest", "--verify-only", "--include", "a["]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid glob"));
}
