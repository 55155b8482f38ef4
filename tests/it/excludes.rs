//! What a tree push leaves out, each option proven by what `bkp ls` does
//! and does not show: `--exclude-file`, `--exclude-if-present`,
//! `--exclude-caches` (a tag with the wrong signature keeps its
//! directory), and `--one-file-system` on a tree with a tmpfs mounted in
//! it (root; unmounted whatever happens).

use std::fs;
use std::path::Path;

use bkp_common::protocol::Role;
use bkp_tests::{ok, TestServer};

use crate::exitcodes::{is_root, Mount};

const SIGNATURE: &str = "Signature: 8a477f597d28d172789f06886806bc55";

fn listing(server: &TestServer, token: &Path, id: &str) -> Vec<String> {
    let out = ok(server.bkp(token).args(["ls", id]));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| l.rsplit(' ').next().unwrap().to_string()).collect()
}

fn push(server: &TestServer, token: &Path, args: &[&str], root: &Path) -> String {
    let out = ok(server.bkp(token).args(["push", "--json", "--name", "ex"]).args(args).arg(root));
    bkp_tests::json(&out)["snapshot"]["id"].as_str().unwrap().to_string()
}

#[test]
fn each_exclude_option_leaves_out_what_it_says_and_nothing_else() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(src.path()).unwrap();
    let r = |p: &str| root.join(p);
    for d in ["keep", "marked", "cache", "fakecache", "skipme", "mnt"] {
        fs::create_dir(r(d)).unwrap();
    }
    for f in ["keep/a.txt", "keep/b.tmp", "marked/data", "cache/blob", "fakecache/blob", "skipme/f"] {
        fs::write(r(f), f.as_bytes()).unwrap();
    }
    fs::write(r("marked/.nobackup"), b"").unwrap();
    fs::write(r("cache/CACHEDIR.TAG"), format!("{SIGNATURE}\n# made by a test\n")).unwrap();
    fs::write(r("fakecache/CACHEDIR.TAG"), "Signature: something else\n").unwrap();
    let list = tempfile::NamedTempFile::new().unwrap();
    fs::write(list.path(), format!("# patterns\n\n*.tmp\n{}\n", r("skipme").display())).unwrap();
    let tmpfs = if is_root() { Mount::new(&["-t", "tmpfs", "-o", "size=4m", "bkp-test"], &r("mnt")) } else { None };
    if tmpfs.is_some() {
        fs::write(r("mnt/on-tmpfs"), b"another file system").unwrap();
    } else {
        eprintln!("no tmpfs mount here (not root?): --one-file-system is not checked");
    }
    let rel = |p: &str| r(p).strip_prefix("/").unwrap().display().to_string();
    let has = |l: &[String], p: &str| l.contains(&rel(p));

    // Without options, everything is there, the tmpfs's file too.
    let all = listing(&server, &token, &push(&server, &token, &[], &root));
    for p in ["keep/a.txt", "keep/b.tmp", "marked/data", "cache/blob", "fakecache/blob", "skipme/f"] {
        assert!(has(&all, p), "{p} missing without excludes: {all:?}");
    }
    assert_eq!(has(&all, "mnt/on-tmpfs"), tmpfs.is_some(), "{all:?}");

    let ex = list.path().to_str().unwrap();
    let args = ["--exclude-file", ex, "--exclude-if-present", ".nobackup", "--exclude-caches", "--one-file-system"];
    let some = listing(&server, &token, &push(&server, &token, &args, &root));
    for p in ["keep", "keep/a.txt", "fakecache/blob", "fakecache/CACHEDIR.TAG", "mnt"] {
        assert!(has(&some, p), "{p} should be kept: {some:?}");
    }
    for p in ["keep/b.tmp", "skipme", "skipme/f", "marked", "marked/data", "cache", "cache/blob", "mnt/on-tmpfs"] {
        assert!(!has(&some, p), "{p} should be left out: {some:?}");
    }
    // Each option alone does its own part only.
    let only = |a: &[&str]| listing(&server, &token, &push(&server, &token, a, &root));
    let l = only(&["--exclude-if-present", ".nobackup"]);
    assert!(!has(&l, "marked/data") && has(&l, "cache/blob") && has(&l, "keep/b.tmp"), "{l:?}");
    let l = only(&["--exclude-caches"]);
    assert!(!has(&l, "cache/blob") && has(&l, "marked/data") && has(&l, "fakecache/blob"), "{l:?}");
    if tmpfs.is_some() {
        let l = only(&["-x"]);
        assert!(has(&l, "mnt") && !has(&l, "mnt/on-tmpfs") && has(&l, "cache/blob"), "{l:?}");
    }
    // A missing exclude file is a clear error, not an empty list.
    let out = server.bkp(&token).args(["push", "--exclude-file", "/nonexistent/list"]).arg(&root).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exclude-file /nonexistent/list"), "{out:?}");
}
