//! Chunk data on S3 with the bucket unreachable, against a real
//! SeaweedFS: what the server holds locally (tree copies, the cache of
//! chunks read before) keeps working, the rest fails with an error that
//! names the bucket.

use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_tests::seaweed::{s3_config, Seaweed};
use bkp_tests::{json, ok, random_bytes, TestServer};

/// Two files in one snapshot; after a restart (empty cache) one is
/// restored, so its chunks are in the local cache. With SeaweedFS killed:
/// listing snapshots and the snapshot's files works (trees are local),
/// the cached file restores byte for byte, the other fails within the
/// retry bound with a message naming the bucket. Once SeaweedFS is back,
/// the other file restores too, with no server restart.
#[test]
fn with_the_bucket_down_cached_chunks_restore_and_the_rest_fail_clearly() {
    let mut weed = Seaweed::start("offline");
    let cfgdir = tempfile::tempdir().unwrap();
    let mut cfg = s3_config(&weed, cfgdir.path(), "s");
    cfg.storage.retry_secs = 3;
    let mut server = TestServer::start_with(cfg);
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    let a = random_bytes(3 << 20, 61);
    let b = random_bytes(3 << 20, 62);
    std::fs::write(root.join("a.bin"), &a).unwrap();
    std::fs::write(root.join("b.bin"), &b).unwrap();
    ok(server.bkp(&token).args(["push"]).arg(&root));
    server.restart();

    let restore = |server: &TestServer, file: &str| {
        let target = tempfile::tempdir().unwrap();
        let out = server
            .bkp(&token)
            .args(["restore", "latest", "--name", "files", "--include", file, "--target"])
            .arg(target.path())
            .output()
            .unwrap();
        let back = std::fs::read(target.path().join(root.strip_prefix("/").unwrap()).join(file)).ok();
        (out, back)
    };
    let (out, back) = restore(&server, "a.bin");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(back.as_deref() == Some(&a[..]), "a.bin restored from the bucket");

    weed.kill();
    let listed = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let ls = String::from_utf8(ok(server.bkp(&token).args(["ls", "latest", "--name", "files"])).stdout).unwrap();
    assert!(ls.contains("a.bin") && ls.contains("b.bin"), "the tree is listed from the local copy: {ls}");

    let (out, back) = restore(&server, "a.bin");
    assert!(out.status.success(), "cached chunks restore: {}", String::from_utf8_lossy(&out.stderr));
    assert!(back.as_deref() == Some(&a[..]), "a.bin restored from the cache, byte for byte");

    let t = Instant::now();
    let (out, _) = restore(&server, "b.bin");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "b.bin's chunks are only in the bucket");
    assert!(err.contains("object store") && err.contains("\"offline\""), "the error names the bucket: {err}");
    assert!(t.elapsed() < Duration::from_secs(60), "failed within the retry bound: {:?}", t.elapsed());

    weed.restart();
    let (out, back) = restore(&server, "b.bin");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(back.as_deref() == Some(&b[..]), "b.bin restored once the bucket is back");
}
