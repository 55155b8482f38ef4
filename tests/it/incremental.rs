//! Incremental tree pushes through the metadata cache, and restore
//! drills (`bkp restore --verify-only`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bkp_common::protocol::Role;
use bkp_common::ChunkId;
use bkp_tests::{json, ok, random_bytes, TestServer};

/// Files changed within two seconds of a push's start are not trusted
/// from the cache (nor recorded in it); tests wait this out.
fn settle() {
    std::thread::sleep(Duration::from_millis(2100));
}

fn push(server: &TestServer, token: &Path, root: &Path, extra: &[&str]) -> serde_json::Value {
    let r = json(&ok(server.bkp(token).args(["push", "--json"]).args(extra).arg(root)));
    assert!(r["warnings"].as_array().unwrap().is_empty(), "{r}");
    r
}

fn counts(r: &serde_json::Value) -> (u64, u64) {
    (r["files_read"].as_u64().unwrap(), r["files_cached"].as_u64().unwrap())
}

/// 12 small files (names that sort differently byte-wise and per path
/// component), an empty one and a 6 MiB one of several chunks.
fn make_files(root: &Path) -> usize {
    fs::create_dir_all(root.join("a")).unwrap();
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    let mut n = 0;
    for (i, name) in ["a/b", "a.b", "a-c", "sub/x", "sub/deeper/y", "z"].iter().enumerate() {
        fs::write(root.join(name), format!("content of {name}")).unwrap();
        fs::write(root.join(format!("{name}.bin")), random_bytes(50_000 + i, i as u64)).unwrap();
        n += 2;
    }
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("sub/big"), random_bytes(6 << 20, 99)).unwrap();
    n + 2
}

fn restore_to(server: &TestServer, token: &Path, root: &Path) -> (tempfile::TempDir, PathBuf) {
    let target = tempfile::tempdir().unwrap();
    ok(server.bkp(token).args(["restore", "latest", "--target"]).arg(target.path()));
    let restored = target.path().join(root.strip_prefix("/").unwrap());
    (target, restored)
}

fn assert_same_files(src: &Path, restored: &Path, names: &[&str]) {
    for n in names {
        assert!(fs::read(src.join(n)).unwrap() == fs::read(restored.join(n)).unwrap(), "content of {n}");
    }
}

#[test]
fn unchanged_files_are_not_read_again() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    let n = make_files(&root) as u64;
    settle();

    let first = push(&server, &token, &root, &[]);
    assert_eq!(counts(&first), (n, 0));
    let second = push(&server, &token, &root, &[]);
    assert_eq!(counts(&second), (0, n), "{second}");
    assert_eq!(second["snapshot"]["stats"], first["snapshot"]["stats"]);
    assert!(second["bytes_sent"].as_u64().unwrap() < 20_000, "{second}");

    // Rewritten with the same size and mtime (only ctime tells), touched,
    // added, removed: each read or dropped, the rest from the cache.
    let mtime = filetime::FileTime::from_last_modification_time(&fs::metadata(root.join("a/b")).unwrap());
    fs::write(root.join("a/b"), "CONTENT OF a/b").unwrap();
    filetime::set_file_mtime(root.join("a/b"), mtime).unwrap();
    filetime::set_file_mtime(root.join("z"), filetime::FileTime::from_unix_time(1_500_000_000, 0)).unwrap();
    fs::write(root.join("sub/new"), "new file").unwrap();
    fs::remove_file(root.join("a.b")).unwrap();
    settle();
    let third = push(&server, &token, &root, &[]);
    assert_eq!(counts(&third), (3, n - 3), "{third}");

    let (_t, restored) = restore_to(&server, &token, &root);
    assert_same_files(&root, &restored, &["a/b", "z", "sub/new", "sub/big", "sub/deeper/y.bin", "empty"]);
    assert!(!restored.join("a.b").exists());
}

#[test]
fn cache_never_skips_a_chunk_the_server_lost() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    let n = make_files(&root) as u64;
    settle();
    push(&server, &token, &root, &[]);

    // As if GC had freed it, or a verify had quarantined it.
    let victim = fs::read(root.join("sub/x")).unwrap();
    assert!(server.state().store().delete_chunks(&[ChunkId::of(&victim)]).unwrap() > 0, "bytes freed");
    let again = push(&server, &token, &root, &[]);
    assert_eq!(counts(&again), (1, n - 1), "{again}");
    assert!(again["chunks_sent"].as_u64().unwrap() >= 1);
    let (_t, restored) = restore_to(&server, &token, &root);
    assert_same_files(&root, &restored, &["sub/x", "sub/big"]);
}

#[test]
fn recent_files_and_no_cache_are_read() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    let n = make_files(&root) as u64;
    // Pushed at once: every file changed within the racy window, so none
    // is recorded.
    assert_eq!(counts(&push(&server, &token, &root, &[])), (n, 0));
    settle();
    assert_eq!(counts(&push(&server, &token, &root, &[])), (n, 0));
    assert_eq!(counts(&push(&server, &token, &root, &[])), (0, n));
    // A file changed just now is read even if its key matched.
    fs::write(root.join("z"), "changed").unwrap();
    assert_eq!(counts(&push(&server, &token, &root, &[])), (1, n - 1));
    assert_eq!(counts(&push(&server, &token, &root, &["--no-cache"])), (n, 0));
}

#[test]
fn damaged_cache_is_ignored_with_a_warning() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    let n = make_files(&root) as u64;
    settle();
    let cache_dir = src.path().join("cache");
    let flag = ["--cache-dir", cache_dir.to_str().unwrap()];
    push(&server, &token, &root, &flag);
    let files: Vec<PathBuf> = fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one cache file, no temp files: {files:?}");
    let mut bytes = fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&files[0], &bytes).unwrap();

    let r = json(&ok(server.bkp(&token).args(["push", "--json"]).args(flag).arg(&root)));
    let warnings = r["warnings"].to_string();
    assert!(warnings.contains("damaged"), "{warnings}");
    // Files before the damage may still come from the cache; none after.
    let (read, cached) = counts(&r);
    assert!(read > 0 && read + cached == n, "{r}");
    // A fresh cache was written.
    assert_eq!(counts(&push(&server, &token, &root, &flag)), (0, n));

    fs::write(&files[0], b"BKPM").unwrap();
    let r = json(&ok(server.bkp(&token).args(["push", "--json"]).args(flag).arg(&root)));
    assert!(r["warnings"].to_string().contains("damaged"), "{r}");
    assert_eq!(counts(&r), (n, 0));
}

fn verify(server: &TestServer, token: &Path, args: &[&str]) -> std::process::Output {
    let cwd = tempfile::tempdir().unwrap();
    let out = server
        .bkp(token)
        .current_dir(cwd.path())
        .args(["restore", "latest", "--verify-only", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(fs::read_dir(cwd.path()).unwrap().count(), 0, "verify wrote a file");
    out
}

#[test]
fn verify_only_checks_everything_and_names_what_fails() {
    let mut server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    let n = make_files(&root) as u64;
    let r = push(&server, &token, &root, &[]);
    let dump = bkp_tests::dump_like(200_000, 1);
    server.push_stdin(&token, "dump", &dump);

    let out = verify(&server, &token, &["--name", "files"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["files"].as_u64().unwrap(), n);
    assert_eq!(v["bytes"], r["snapshot"]["stats"]["bytes"]);
    let v = json(&verify(&server, &token, &["--name", "dump"]));
    assert_eq!((v["files"].as_u64().unwrap(), v["bytes"].as_u64().unwrap()), (1, dump.len() as u64));
    for bad in [&["--target", "x"][..], &["--stdout"]] {
        assert!(!verify(&server, &token, bad).status.success(), "{bad:?} conflicts with --verify-only");
    }

    // One chunk gone from the store, one damaged on disk. (GC first: its
    // compaction flushes the blobs into blob files; after the delete it
    // would refuse to run.)
    server.admin(&["gc"]);
    let lost = fs::read(root.join("sub/x")).unwrap();
    assert!(server.state().store().delete_chunks(&[ChunkId::of(&lost)]).unwrap() > 0, "bytes freed");
    let big = fs::read(root.join("sub/big")).unwrap();
    server.corrupt_stored_bytes(&big[3 << 20..(3 << 20) + 64]);

    let out = verify(&server, &token, &["--name", "files"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["sub/x:", "sub/big:"] {
        assert!(err.contains(&format!("{}/{name}", root.display())), "{name} not named: {err}");
    }
    assert!(err.contains("2 entries failed verification"), "{err}");
    let v = json(&out);
    assert_eq!(v["files"].as_u64().unwrap(), n - 2);
    // The stream shares no chunk with the tree: still good.
    assert!(verify(&server, &token, &["--name", "dump"]).status.success());

    // A real restore puts the good files in place and refuses the others.
    let target = tempfile::tempdir().unwrap();
    let out = server.bkp(&token).args(["restore", "latest", "--name", "files", "--target"]).arg(target.path()).output();
    assert!(!out.unwrap().status.success());
    let restored = target.path().join(root.strip_prefix("/").unwrap());
    assert_same_files(&root, &restored, &["a/b", "sub/deeper/y.bin", "z.bin"]);
    assert!(!restored.join("sub/x").exists() && !restored.join("sub/big").exists());
}

/// A push's first has-chunk query proves, in bulk, the chunks of its set's
/// newest snapshot (no lookup per id); what is no longer stored, and what
/// another host or set holds, is still reported missing.
#[test]
fn previous_snapshot_proves_only_what_is_still_stored() {
    use bkp_common::snapshot::SnapshotKind;
    let server = TestServer::start();
    let token = server.token("db01", Role::Push);
    let data = random_bytes(3 << 20, 41);
    server.push_stdin(&token, "pgdump", &data);
    let ids: Vec<ChunkId> = bkp_common::chunker::chunk_reader(&data[..]).map(|c| ChunkId::of(&c.unwrap())).collect();
    assert!(ids.len() >= 2, "{} chunks", ids.len());
    let (lost, quarantined) = (ids[0], ids[1]);
    let state = server.state();
    assert!(state.store().delete_chunks(&[lost]).unwrap() > 0);
    state.sessions().quarantine(&quarantined, || state.store().quarantine_chunk(&quarantined, "test", 1).unwrap());
    let other = server.token("db02", Role::Push);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = server.client(&token).await;
        let s = c.start_push("pgdump", SnapshotKind::Stream).await.unwrap();
        assert_eq!(c.missing(s, ids.clone()).await.unwrap(), [0, 1], "lost and quarantined chunks are missing");
        // Another set of the same host proves nothing of this one's.
        let s = c.start_push("other", SnapshotKind::Stream).await.unwrap();
        let want: Vec<u32> = (0..ids.len() as u32).collect();
        assert_eq!(c.missing(s, vec![ChunkId::of(b"nothing")]).await.unwrap(), [0]);
        // The host still holds the rest (it uploaded them), set or not.
        assert_eq!(c.missing(s, ids.clone()).await.unwrap(), [0, 1]);
        // Another host with a set of the same name must upload everything.
        let c2 = server.client(&other).await;
        let s2 = c2.start_push("pgdump", SnapshotKind::Stream).await.unwrap();
        assert_eq!(c2.missing(s2, ids.clone()).await.unwrap(), want);
    });
}
