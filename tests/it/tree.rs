// unsafe: mkfifo; each block has a SAFETY note.
#![allow(unsafe_code)]
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use bkp_common::protocol::Role;
use bkp_tests::{json, ok, random_bytes, TestServer};

/// A tree with every file type we back up.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/small.txt"), b"hello world\n").unwrap();
    fs::write(root.join("dir/empty"), b"").unwrap();
    fs::write(root.join("dir/sub/big.bin"), random_bytes(9 << 20, 1)).unwrap();
    fs::write(root.join("name with spaces ü"), b"unicode").unwrap();
    // A sparse file: 8 MiB hole, data, hole.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(16 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"in the middle", 8 << 20).unwrap();
    fs::hard_link(root.join("dir/small.txt"), root.join("dir/hardlink")).unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("dir/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let fifo = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    fs::set_permissions(root.join("dir/small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("dir/sub/big.bin"), t).unwrap();
    filetime::set_symlink_file_times(root.join("dir/link"), t, t).unwrap();
    filetime::set_file_mtime(root.join("dir/sub"), t).unwrap();
}

/// Compares two trees: types, modes, mtimes, contents, link targets.
fn assert_same(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    assert_eq!(ma.mode(), mb.mode(), "mode of {}", b.display());
    if !ma.file_type().is_symlink() {
        assert_eq!((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec()), "mtime of {}", b.display());
    }
    if ma.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
            v.sort();
            v
        };
        assert_eq!(names(a), names(b), "entries of {}", b.display());
        for n in names(a) {
            assert_same(&a.join(&n), &b.join(&n));
        }
    } else if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
    } else if ma.is_file() {
        assert!(fs::read(a).unwrap() == fs::read(b).unwrap(), "content of {}", b.display());
    }
}

#[test]
fn tree_round_trip_keeps_every_type_and_metadata() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    make_tree(&root);

    let out = ok(server.bkp(&token).args(["push", "--json"]).arg(&root));
    let r = json(&out);
    assert_eq!(r["snapshot"]["name"], "files");
    assert_eq!(r["snapshot"]["host"], "web01");
    assert!(out.stderr.is_empty(), "push is silent: {}", String::from_utf8_lossy(&out.stderr));

    let target = tempfile::tempdir().unwrap();
    ok(server.bkp(&token).args(["restore", "latest", "--target"]).arg(target.path()));
    let restored = target.path().join(root.strip_prefix("/").unwrap());
    assert_same(&root, &restored);

    // Hardlinks stay linked, sparse files keep their holes.
    let a = fs::metadata(restored.join("dir/small.txt")).unwrap();
    let b = fs::metadata(restored.join("dir/hardlink")).unwrap();
    assert_eq!(a.ino(), b.ino());
    let sparse = fs::metadata(restored.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 16 << 20);
    assert!(sparse.blocks() * 512 < 8 << 20, "sparse file allocated {} blocks", sparse.blocks());

    // ls shows the tree; --include restores a part of it.
    let ls = ok(server.bkp(&token).args(["ls", "latest"]));
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("dir/sub/big.bin") && ls.contains("fifo"), "{ls}");
    let part = tempfile::tempdir().unwrap();
    let inc = restored.strip_prefix(target.path()).unwrap().join("dir/sub");
    ok(server.bkp(&token).args(["restore", "latest", "--target"]).arg(part.path()).arg("--include").arg(&inc));
    assert!(part.path().join(&inc).join("big.bin").exists());
    assert!(!part.path().join(inc.parent().unwrap()).join("small.txt").exists());
}

#[test]
fn unchanged_tree_sends_under_one_percent() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    for i in 0..20 {
        fs::write(src.path().join(format!("f{i}")), random_bytes(1 << 20, i)).unwrap();
    }
    let first = json(&ok(server.bkp(&token).args(["push", "--json"]).arg(src.path())));
    let second = json(&ok(server.bkp(&token).args(["push", "--json"]).arg(src.path())));
    let read = second["bytes_read"].as_u64().unwrap();
    let sent = second["bytes_sent"].as_u64().unwrap();
    assert!(first["bytes_sent"].as_u64().unwrap() >= 20 << 20);
    assert_eq!(read, 20 << 20);
    assert!(sent * 100 < read, "second push sent {sent} of {read} bytes");
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert_eq!(list.as_array().unwrap().len(), 2);
}
