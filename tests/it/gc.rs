//! Retention, prune and garbage collection against a real server, with
//! the races that lost data in other backup systems as deterministic
//! tests.

use std::process::{Command, Stdio};
use std::time::Duration;

use bkp_client::ClientError;
use bkp_common::blob;
use bkp_common::protocol::{ErrorCode, Role};
use bkp_common::snapshot::SnapshotKind;
use bkp_common::ChunkId;
use bkp_server::config::ServerConfig;
use bkp_server::gc::{self, GcHooks};
use bkp_tests::{bin, encode_tree, file_entries, json, ok, random_bytes, ServerProcess, TestServer};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn push_stdin(server: &TestServer, token: &std::path::Path, name: &str, data: &[u8]) -> String {
    server.push_stdin(token, name, data)["snapshot"]["id"].as_str().unwrap().to_string()
}

fn restore_stdout(server: &TestServer, token: &std::path::Path, id: &str) -> Vec<u8> {
    ok(server.bkp(token).args(["restore", id, "--stdout"])).stdout
}

/// A one-file stream tree over already uploaded data chunks.
fn stream_tree(data: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
    let parts: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    encode_tree(&file_entries(b"s", data, &parts))
}

#[test]
fn prune_then_gc_frees_disk_and_keeps_what_policy_keeps() {
    let mut cfg = ServerConfig { cache_mb: 16, ..Default::default() };
    cfg.retention.default.keep_last = 1;
    // Snapshots seconds old: count them (see `hardening` for min_age).
    cfg.retention.default.min_age = Duration::ZERO;
    let server = TestServer::start_with(cfg);
    let push = server.token("web01", Role::Push);
    let admin = server.token("ops", Role::Admin);
    let datas: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(12 << 20, 100 + i)).collect();
    let ids: Vec<String> = datas.iter().map(|d| push_stdin(&server, &push, "db", d)).collect();

    // A push token cannot delete; an admin token can protect and forget.
    let out = server.bkp(&push).args(["forget", &ids[0]]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("may not"));
    ok(server.bkp(&admin).args(["protect", &ids[0]]));
    let listing = String::from_utf8(ok(server.bkp(&push).arg("snapshots")).stdout).unwrap();
    assert_eq!(listing.matches("protected").count(), 1, "{listing}");

    let dry = json(&server.admin(&["prune", "--dry-run", "--json"]));
    assert_eq!(dry["figures"]["removed"], 1, "{dry}");
    assert_eq!(json(&ok(server.bkp(&push).args(["snapshots", "--json"]))).as_array().unwrap().len(), 3);

    let pruned = json(&server.admin(&["prune", "--json"]));
    assert_eq!((pruned["figures"]["kept"].as_u64(), pruned["figures"]["removed"].as_u64()), (Some(2), Some(1)));
    let text = String::from_utf8(server.admin(&["prune", "--dry-run"]).stdout).unwrap();
    assert!(text.contains("keep") && text.contains("protected") && text.contains("newest"), "{text}");

    let gc = json(&server.admin(&["gc", "--json"]));
    let f = &gc["figures"];
    assert!(f["chunks_deleted"].as_u64().unwrap() >= 10, "{gc}");
    let (before, after) = (f["disk_bytes_before"].as_u64().unwrap(), f["disk_bytes_after"].as_u64().unwrap());
    assert!(before - after >= 10 << 20, "disk went from {before} to {after}");

    assert!(restore_stdout(&server, &push, &ids[0]) == datas[0], "protected snapshot");
    assert!(restore_stdout(&server, &push, &ids[2]) == datas[2], "newest snapshot");
    assert!(!server.bkp(&push).args(["restore", &ids[1], "--stdout"]).output().unwrap().status.success());

    let jobs = json(&server.admin(&["jobs", "--json"]));
    let kinds: Vec<&str> = jobs.as_array().unwrap().iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["gc", "prune"], "dry runs are not recorded; newest first");

    // A second GC finds nothing left to free.
    let again = json(&server.admin(&["gc", "--json"]));
    assert_eq!(again["figures"]["chunks_deleted"], 0, "{again}");
}

#[test]
fn gc_ends_the_possession_of_a_host_that_no_longer_references_a_chunk() {
    let server = TestServer::start();
    let (web, db) = (server.token("web01", Role::Push), server.token("db01", Role::Push));
    let data = random_bytes(3 << 20, 11);
    // web01 uploads first and owns the chunks; db01 uploads the same data.
    let first = push_stdin(&server, &web, "x", &data);
    push_stdin(&server, &db, "x", &data);
    let ids: Vec<ChunkId> = bkp_common::chunker::chunk_reader(&data[..]).map(|c| ChunkId::of(&c.unwrap())).collect();
    let store = server.state().store().clone();
    assert!(store.host_has("web01", &ids).unwrap().iter().all(|&h| h));
    assert!(store.host_has("db01", &ids).unwrap().iter().all(|&h| h));

    assert!(store.delete_snapshot(&first.parse().unwrap()).unwrap());
    let report = gc::run(server.state().store().as_ref(), server.state().sessions(), &GcHooks::default()).unwrap();
    assert_eq!(report.chunks_deleted, 1, "only web01's tree chunk: {report:?}");
    assert!(report.possession_records_deleted >= ids.len() as u64, "{report:?}");
    // The chunks stay for db01; web01 must upload them again to use them.
    assert!(store.host_has("web01", &ids).unwrap().iter().all(|&h| !h));
    assert!(store.host_has("db01", &ids).unwrap().iter().all(|&h| h));
    assert!(restore_stdout(&server, &db, "latest") == data);
    let again = gc::run(server.state().store().as_ref(), server.state().sessions(), &GcHooks::default()).unwrap();
    assert_eq!((again.chunks_deleted, again.possession_records_deleted), (0, 0), "{again:?}");
    // web01 pushes again: it owns nothing now, so it gets a record.
    push_stdin(&server, &web, "x", &data);
    assert!(store.host_has("web01", &ids).unwrap().iter().all(|&h| h));
    assert!(restore_stdout(&server, &web, "latest") == data);
}

#[test]
fn chunk_reported_stored_survives_prune_and_gc_before_commit() {
    let server = TestServer::start();
    let push = server.token("web01", Role::Push);
    let data = random_bytes(3 << 20, 7);
    let first = push_stdin(&server, &push, "db", &data);
    let chunks: Vec<Vec<u8>> = bkp_common::chunker::chunk_reader(&data[..]).map(|c| c.unwrap()).collect();
    let rt = rt();
    rt.block_on(async {
        let c = server.client(&push).await;
        let session = c.start_push("db", SnapshotKind::Stream).await.unwrap();
        let missing = c.missing(session, chunks.iter().map(|x| ChunkId::of(x)).collect()).await.unwrap();
        assert!(missing.is_empty(), "the server holds every chunk");
        // The only snapshot referencing them goes, and GC runs to the end.
        assert!(server.state().store().delete_snapshot(&first.parse().unwrap()).unwrap());
        let report = gc::run(server.state().store().as_ref(), server.state().sessions(), &GcHooks::default()).unwrap();
        assert_eq!(report.snapshots, 0);
        let tree = stream_tree(&data, &chunks);
        let tid = ChunkId::of(&tree);
        c.put(session, vec![(tid, blob::encode(&tree, 3))]).await.unwrap();
        c.commit(session, vec![tid], None).await.unwrap();
    });
    assert!(restore_stdout(&server, &push, "latest") == data);
    // Once committed, a later GC still keeps them (the snapshot now marks them).
    gc::run(server.state().store().as_ref(), server.state().sessions(), &GcHooks::default()).unwrap();
    assert!(restore_stdout(&server, &push, "latest") == data);
}

#[test]
fn snapshot_deleted_while_gc_marks() {
    let server = TestServer::start();
    let push = server.token("web01", Role::Push);
    let a = random_bytes(2 << 20, 1);
    let b = random_bytes(2 << 20, 2);
    let id_a = push_stdin(&server, &push, "a", &a);
    let id_b = push_stdin(&server, &push, "b", &b);
    let state = server.state();
    let st = state.clone();
    let victim = id_a.clone();
    let hooks = GcHooks {
        after_listing: Some(Box::new(move || {
            assert!(st.store().delete_snapshot(&victim.parse().unwrap()).unwrap());
        })),
        ..Default::default()
    };
    let r = gc::run(state.store().as_ref(), state.sessions(), &hooks)
        .expect("a snapshot vanishing during mark is not an error");
    assert_eq!(r.snapshots, 1);
    assert!(restore_stdout(&server, &push, &id_b) == b);
    // Its chunks went in this run or go in the next; none of b's.
    let r2 = gc::run(state.store().as_ref(), state.sessions(), &GcHooks::default()).unwrap();
    assert!(r.chunks_deleted + r2.chunks_deleted >= 2, "{r:?} {r2:?}");
    assert!(restore_stdout(&server, &push, &id_b) == b);
}

#[test]
fn frozen_client_past_its_lease_cannot_commit_holes() {
    let server = TestServer::start_with(ServerConfig { cache_mb: 16, session_lease_secs: 1, ..Default::default() });
    let push = server.token("web01", Role::Push);
    let data = random_bytes(1 << 20, 9);
    let rt = rt();
    rt.block_on(async {
        let c = server.client(&push).await;
        let session = c.start_push("db", SnapshotKind::Stream).await.unwrap();
        c.put(session, vec![(ChunkId::of(&data), blob::encode(&data, 3))]).await.unwrap();
        // Frozen past the lease while GC runs: the chunk is unreferenced
        // and unprotected, so GC frees it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = gc::run(server.state().store().as_ref(), server.state().sessions(), &GcHooks::default()).unwrap();
        assert_eq!(r.chunks_deleted, 1, "{r:?}");
        let tree = stream_tree(&data, std::slice::from_ref(&data));
        let tid = ChunkId::of(&tree);
        match c.put(session, vec![(tid, blob::encode(&tree, 3))]).await {
            Err(ClientError::Server(m, ErrorCode::Rejected)) => assert!(m.contains("push session"), "{m}"),
            other => panic!("expired session accepted an upload: {other:?}"),
        }
        match c.commit(session, vec![tid], None).await {
            Err(ClientError::Server(_, ErrorCode::Rejected)) => {}
            other => panic!("expired session committed: {other:?}"),
        }
    });
    assert!(json(&ok(server.bkp(&push).args(["snapshots", "--json"]))).as_array().unwrap().is_empty());
}

#[test]
fn server_killed_mid_sweep_loses_nothing() {
    // A real server process, slowed down in its sweep so it can be killed there.
    let mut server = ServerProcess::init();
    let (push, admin) = (server.token("web01", "push"), server.token("ops", "admin"));
    let dir = server.dir.path().to_path_buf();
    let src_a = tempfile::tempdir().unwrap();
    let src_b = tempfile::tempdir().unwrap();
    for i in 0..12 {
        std::fs::write(src_a.path().join(format!("a{i}")), random_bytes(300_000, i)).unwrap();
        std::fs::write(src_b.path().join(format!("b{i}")), random_bytes(300_000, 50 + i)).unwrap();
    }
    server.serve(&[("BKP_TEST_GC_BATCH", "1"), ("BKP_TEST_GC_BATCH_DELAY_MS", "100")]);
    let a = json(&ok(server.bkp(&push).args(["push", "--json", "--name", "a"]).arg(src_a.path())));
    let b = json(&ok(server.bkp(&push).args(["push", "--json", "--name", "b"]).arg(src_b.path())));
    ok(server.bkp(&admin).args(["forget", a["snapshot"]["id"].as_str().unwrap()]));
    let gc = Command::new(bin("bkp-server"))
        .args(["gc", "--data"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut gc = gc.unwrap();
    // 26 possession records then 26 chunks at 100 ms each: 3.5 s is in
    // the middle of deleting chunks.
    std::thread::sleep(Duration::from_millis(3500));
    server.kill(); // SIGKILL, mid-sweep
    let _ = gc.wait();

    server.serve(&[]);
    let target = tempfile::tempdir().unwrap();
    ok(server.bkp(&push).args(["restore", b["snapshot"]["id"].as_str().unwrap(), "--target"]).arg(target.path()));
    let restored = target.path().join(src_b.path().strip_prefix("/").unwrap());
    for i in 0..12 {
        assert!(std::fs::read(restored.join(format!("b{i}"))).unwrap() == random_bytes(300_000, 50 + i));
    }
    let r = json(&ok(Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(&dir)));
    let again = json(&ok(Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(&dir)));
    assert_eq!(again["figures"]["chunks_deleted"], 0, "after {r}");
    // Everything a's snapshot alone held is gone; b's is whole.
    assert_eq!(again["figures"]["snapshots"], 1);
    ok(server
        .bkp(&push)
        .args(["restore", "latest", "--name", "b", "--target"])
        .arg(tempfile::tempdir().unwrap().path()));
    server.kill();
}

#[test]
fn pushes_and_deletions_while_gc_runs_back_to_back() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let server = TestServer::start();
    let admin = server.token("ops", Role::Admin);
    let base = random_bytes(4 << 20, 1000);
    let stop = AtomicBool::new(false);
    let gc_runs = AtomicU64::new(0);
    let kept: Vec<(std::path::PathBuf, String, Vec<u8>)> = std::thread::scope(|s| {
        let state = server.state();
        let (stop, gc_runs) = (&stop, &gc_runs);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                gc::run(state.store().as_ref(), state.sessions(), &GcHooks::default()).expect("gc");
                gc_runs.fetch_add(1, Ordering::Relaxed);
            }
        });
        let pushers: Vec<_> = (0..3u64)
            .map(|h| {
                let (server, admin, base) = (&server, &admin, &base);
                s.spawn(move || {
                    let token = server.token(&format!("host{h}"), Role::Push);
                    let mut kept = Vec::new();
                    for round in 0..4u64 {
                        // Shared by every host and round, plus a part of its own.
                        let mut data = base.clone();
                        data.extend(random_bytes(1 << 20, h * 100 + round));
                        let id = push_stdin(server, &token, "db", &data);
                        kept.push((token.clone(), id, data));
                        if round % 2 == 1 {
                            let (_, old, _) = kept.remove(kept.len() - 2);
                            ok(server.bkp(admin).args(["forget", &old]));
                        }
                    }
                    kept
                })
            })
            .collect();
        let kept = pushers.into_iter().flat_map(|p| p.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        kept
    });
    assert!(gc_runs.load(Ordering::Relaxed) >= 2, "GC ran during the pushes");
    assert_eq!(kept.len(), 6);
    for (token, id, data) in &kept {
        assert!(restore_stdout(&server, token, id) == *data, "snapshot {id}");
    }
    let state = server.state();
    let last = gc::run(state.store().as_ref(), state.sessions(), &GcHooks::default()).unwrap();
    assert_eq!(last.snapshots, 6);
    let check = gc::run(state.store().as_ref(), state.sessions(), &GcHooks::default()).unwrap();
    assert_eq!(
        check.chunks_deleted + check.possession_records_deleted,
        0,
        "unreferenced data after the last GC: {last:?}"
    );
    for (token, id, data) in &kept {
        assert!(restore_stdout(&server, token, id) == *data, "snapshot {id} after the last GC");
    }
}

#[test]
fn one_run_of_a_kind_at_a_time() {
    let server = TestServer::start();
    let state = server.state();
    let inner = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (st, seen) = (state.clone(), inner.clone());
    let hooks = GcHooks {
        before_sweep: Some(Box::new(move || {
            let gc = bkp_server::jobs::run(
                &st.jobs(&st.config()),
                bkp_server::jobs::JobKind::Gc,
                false,
                &GcHooks::default(),
            );
            let prune = bkp_server::jobs::run(
                &st.jobs(&st.config()),
                bkp_server::jobs::JobKind::Prune,
                true,
                &GcHooks::default(),
            );
            *seen.lock().unwrap() = Some((gc, prune));
        })),
        ..Default::default()
    };
    let outer = bkp_server::jobs::run(&state.jobs(&state.config()), bkp_server::jobs::JobKind::Gc, false, &hooks);
    assert!(outer.ok, "{:?}", outer.error);
    let (gc, prune) = inner.lock().unwrap().take().expect("hook ran");
    assert!(!gc.ok && gc.error.unwrap().contains("already in progress"));
    assert!(prune.ok, "a prune may run beside a GC: {:?}", prune.error);
}

#[test]
fn serve_runs_scheduled_jobs() {
    let mut cfg = ServerConfig { cache_mb: 16, ..Default::default() };
    cfg.jobs.gc = Some("* * * * *".into());
    let server = TestServer::start_with(cfg);
    // Every minute, on the minute: within 65 s a run is recorded.
    for _ in 0..130 {
        let jobs = json(&server.admin(&["jobs", "--json"]));
        if let Some(j) = jobs.as_array().unwrap().first() {
            assert_eq!(j["kind"], "gc");
            assert_eq!(j["ok"], true, "{j}");
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no scheduled gc ran within 65 s");
}
