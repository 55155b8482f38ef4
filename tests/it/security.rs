use bkp_client::ClientError;
use bkp_common::blob;
use bkp_common::protocol::{ErrorCode, Role};
use bkp_common::snapshot::SnapshotKind;
use bkp_common::tree::{Entry, Meta};
use bkp_common::ChunkId;
use bkp_tests::{encode_tree, file_entries, json, ok, random_bytes, TestServer};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn hosts_are_isolated_and_roles_enforced() {
    let server = TestServer::start();
    let a = server.token("hosta", Role::Push);
    let b = server.token("hostb", Role::Push);
    let b_restore = server.token("hostb", Role::Restore);
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("secret"), random_bytes(2 << 20, 77)).unwrap();
    let rb = json(&ok(server.bkp(&b).args(["push", "--json"]).arg(src.path())));
    let b_hex = rb["snapshot"]["id"].as_str().unwrap().to_string();
    assert_eq!(b_hex.len(), 64);

    // A sees nothing of B: not in its list, not by --host, not by id.
    let a_list = json(&ok(server.bkp(&a).args(["snapshots", "--json"])));
    assert!(a_list.as_array().unwrap().is_empty());
    assert!(!server.bkp(&a).args(["snapshots", "--host", "hostb"]).status().unwrap().success());
    let t = tempfile::tempdir().unwrap();
    let out = server.bkp(&a).args(["restore", &b_hex, "--target"]).arg(t.path()).output().unwrap();
    assert!(!out.status.success());

    // Probing: A pushing the same data must upload all of it.
    let ra = json(&ok(server.bkp(&a).args(["push", "--json"]).arg(src.path())));
    assert!(ra["bytes_sent"].as_u64().unwrap() >= 2 << 20, "{ra}");

    // A cannot read B's chunk by its hash, nor commit a tree naming it.
    let secret = std::fs::read(src.path().join("secret")).unwrap();
    let rt = rt();
    rt.block_on(async {
        let c = server.client(&server.token("hostc", Role::Push)).await;
        match c.chunk(ChunkId::of(&secret)).await {
            Err(ClientError::Server(_, ErrorCode::NotFound)) => {}
            other => panic!("read another host's chunk: {:?}", other.map(|d| d.len())),
        }
        let session = c.start_push("steal", SnapshotKind::Stream).await.unwrap();
        let tree = encode_tree(&file_entries(b"steal", &secret, &[&secret]));
        let tid = ChunkId::of(&tree);
        c.put(session, vec![(tid, blob::encode(&tree, 3))]).await.unwrap();
        // Twice: a refused commit must not leave the chunk counted as
        // proven for the session (the commit check skips proven chunks).
        for attempt in 0..2 {
            match c.commit(session, vec![tid], None).await {
                Err(ClientError::Server(m, ErrorCode::Rejected)) => assert!(m.contains("never uploaded"), "{m}"),
                other => panic!("commit naming a foreign chunk (attempt {attempt}): {other:?}"),
            }
        }
        // Asking about it does not prove it either.
        assert_eq!(c.missing(session, vec![ChunkId::of(&secret)]).await.unwrap(), [0]);
        match c.commit(session, vec![tid], None).await {
            Err(ClientError::Server(m, ErrorCode::Rejected)) => assert!(m.contains("never uploaded"), "{m}"),
            other => panic!("commit after a has-chunk query: {other:?}"),
        }
        // A tampered upload: content that does not hash to its id.
        match c.put(session, vec![(ChunkId::of(b"real"), blob::encode(b"fake", 3))]).await {
            Err(ClientError::Server(m, ErrorCode::Rejected)) => assert!(m.contains("hashes to"), "{m}"),
            other => panic!("tampered chunk accepted: {other:?}"),
        }
        // Garbage that is not a blob at all.
        assert!(c.put(session, vec![(ChunkId::of(b"x"), vec![0xff; 100])]).await.is_err());
    });

    // A restore token reads its host but cannot push.
    ok(server.bkp(&b_restore).args(["restore", &b_hex, "--target"]).arg(t.path()));
    let out = server.bkp(&b_restore).args(["push", "--name", "x", "--", "true"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("may not"));
}

#[test]
fn wrong_certificate_and_revoked_token_are_refused() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let out = server.bkp(&token).env("BKP_FINGERPRINT", "00".repeat(32)).args(["snapshots"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match the pinned fingerprint"), "{err}");
    assert!(!err.contains(&"00".repeat(32)), "the pinned fingerprint was printed: {err}");

    // Another server's certificate with the right address is refused too,
    // and what the client pinned is not shown to whoever answered.
    let other = TestServer::start();
    let out = server.bkp(&token).env("BKP_FINGERPRINT", &other.fingerprint).args(["snapshots"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(&other.fingerprint), "the pinned fingerprint was printed: {err}");
    assert!(err.contains(&server.fingerprint), "the presented one helps after a re-init: {err}");

    ok(server.bkp(&token).args(["snapshots"]));
    let id = bkp_server::tokens::Tokens::new(server.data()).list().unwrap()[0].id.clone();
    ok(std::process::Command::new(bkp_tests::bin("bkp-server"))
        .args(["token", "revoke", "--data"])
        .arg(server.data())
        .arg(&id));
    let out = server.bkp(&token).args(["snapshots"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
}

#[test]
fn crafted_snapshot_restores_nothing_outside_the_target() {
    let server = TestServer::start();
    let token = server.token("evil", Role::Push);
    let outside = tempfile::tempdir().unwrap();
    let rt = rt();
    let good = b"good content".to_vec();
    let bad = b"owned".to_vec();
    rt.block_on(async {
        let c = server.client(&token).await;
        let session = c.start_push("files", SnapshotKind::Tree).await.unwrap();
        c.put(session, vec![(ChunkId::of(&good), blob::encode(&good, 3)), (ChunkId::of(&bad), blob::encode(&bad, 3))])
            .await
            .unwrap();
        let dir_meta = Meta { mode: 0o755, ..Meta::default() };
        let out_abs = outside.path().to_str().unwrap().as_bytes().to_vec();
        // Only names the server accepts (`server_refuses_unsafe_names`
        // has the others): the escape goes through a symlink in the tree.
        let mut entries = vec![Entry::Dir { path: b"ok".to_vec(), meta: dir_meta.clone() }];
        entries.extend(file_entries(b"ok/good", &good, &[&good]));
        entries.push(Entry::Symlink { path: b"evil".to_vec(), meta: dir_meta.clone(), target: out_abs.clone() });
        entries.extend(file_entries(b"evil/passwd", &bad, &[&bad]));
        entries.push(Entry::Hardlink { path: b"ok/hl".to_vec(), target: b"evil/passwd".to_vec() });
        entries.extend(file_entries(b"ok/after", &good, &[&good]));
        let tree = encode_tree(&entries);
        let tid = ChunkId::of(&tree);
        c.put(session, vec![(tid, blob::encode(&tree, 3))]).await.unwrap();
        c.commit(session, vec![tid], None).await.unwrap();
    });
    let parent = tempfile::tempdir().unwrap();
    let target = parent.path().join("target");
    let out = server.bkp(&token).args(["restore", "latest", "--target"]).arg(&target).output().unwrap();
    assert!(!out.status.success(), "unsafe entries must make restore fail");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "wrote outside the target");
    let siblings: Vec<_> = std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, ["target"], "wrote beside the target");
    assert_eq!(std::fs::read(target.join("ok/good")).unwrap(), good);
    assert_eq!(std::fs::read(target.join("ok/after")).unwrap(), good);
    assert!(!target.join("ok/hl").exists());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing"), "{err}");
}

/// A tree the client would refuse at restore is refused at commit, so a
/// crafted snapshot is never stored (and never handed to another
/// client, or to an older one).
#[test]
fn server_refuses_unsafe_names() {
    let server = TestServer::start();
    let token = server.token("evil", Role::Push);
    let data = b"owned".to_vec();
    let meta = Meta { mode: 0o755, ..Meta::default() };
    let file = |p: &[u8]| file_entries(p, &data, &[&data]);
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        ("parent", file(b"../escape")),
        ("parent inside", file(b"ok/../../escape")),
        ("absolute", file(b"/etc/cron.d/evil")),
        ("NUL", file(b"a\0b")),
        // (An empty path is refused by the tree grammar already.)
        ("empty component", file(b"a//b")),
        ("trailing slash", vec![Entry::Dir { path: b"a/".to_vec(), meta: meta.clone() }]),
        ("dot", vec![Entry::Dir { path: b".".to_vec(), meta: meta.clone() }]),
        ("dot-dot dir", vec![Entry::Dir { path: b"..".to_vec(), meta: meta.clone() }]),
        ("symlink at ..", vec![Entry::Symlink { path: b"x/..".to_vec(), meta: meta.clone(), target: b"/".to_vec() }]),
        (
            "hardlink target",
            [file(b"f"), vec![Entry::Hardlink { path: b"g".to_vec(), target: b"../../etc/shadow".to_vec() }]].concat(),
        ),
    ];
    rt().block_on(async {
        let c = server.client(&token).await;
        for (what, entries) in &cases {
            let session = c.start_push("files", SnapshotKind::Tree).await.unwrap();
            let tree = encode_tree(entries);
            let tid = ChunkId::of(&tree);
            c.put(session, vec![(tid, blob::encode(&tree, 3)), (ChunkId::of(&data), blob::encode(&data, 3))])
                .await
                .unwrap();
            match c.commit(session, vec![tid], None).await {
                Err(ClientError::Server(m, ErrorCode::Rejected)) => assert!(m.contains("unsafe path"), "{what}: {m}"),
                other => panic!("{what}: commit of a crafted tree: {other:?}"),
            }
        }
        // The same upload with safe names commits: the refusal was the names.
        let session = c.start_push("files", SnapshotKind::Tree).await.unwrap();
        let mut entries = file(b"ok/...");
        entries.push(Entry::Symlink {
            path: b"link".to_vec(),
            meta: meta.clone(),
            target: b"../../etc/passwd".to_vec(),
        });
        entries.push(Entry::Hardlink { path: b"hl".to_vec(), target: b"ok/...".to_vec() });
        let tree = encode_tree(&entries);
        let tid = ChunkId::of(&tree);
        c.put(session, vec![(tid, blob::encode(&tree, 3)), (ChunkId::of(&data), blob::encode(&data, 3))])
            .await
            .unwrap();
        c.commit(session, vec![tid], None).await.expect("safe names commit");
    });
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert_eq!(list.as_array().unwrap().len(), 1, "only the safe tree is stored: {list}");
}
