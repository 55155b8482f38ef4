//! Faults with chunk data on S3, against a real SeaweedFS: the server
//! killed mid-upload, the bucket down mid-push, a pack deleted by hand.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_tests::seaweed::Seaweed;
use bkp_tests::{bin, json, ok, random_bytes, ServerProcess, TestServer};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::s3::{s3_config, storage_toml};

fn pack_objects(weed: &Seaweed, prefix: &str) -> Vec<object_store::ObjectMeta> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { weed.store().list(Some(&Path::from(format!("{prefix}/packs")))).try_collect().await.unwrap() })
}

fn until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshot_ids(p: &ServerProcess, token: &std::path::Path) -> Vec<String> {
    let out = ok(p.bkp(token).args(["snapshots", "--json"]));
    json(&out).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

/// `kill -9` of bkp-server while a push's packs are being uploaded: after
/// a restart (same data directory, which takes its own lease back at
/// once) the committed snapshot is whole, the killed push left no
/// snapshot, the same push then succeeds, and GC afterwards keeps both.
#[test]
fn kill_9_mid_upload_loses_nothing_committed() {
    let weed = Seaweed::start("kill");
    let mut p = ServerProcess::init();
    std::fs::write(p.dir.path().join("server.toml"), format!("[storage]\n{}", storage_toml(&weed, p.dir.path(), "s")))
        .unwrap();
    p.serve(&[]);
    let token = p.token("db01", "push");
    let first = random_bytes(5 << 20, 1);
    let push = |p: &ServerProcess, data: &[u8], name: &str| {
        let mut child = p
            .bkp(&token)
            .args(["push", "--json", "--stdin", "--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(data);
        child.wait_with_output().unwrap()
    };
    let out = push(&p, &first, "first");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first_id = json(&out)["snapshot"]["id"].as_str().unwrap().to_string();
    let packs_before = pack_objects(&weed, "s").len();

    // A 64 MiB push, fed slowly; killed once two of its 8 MiB packs are in the bucket.
    let second = random_bytes(64 << 20, 2);
    let mut child = p
        .bkp(&token)
        .args(["push", "--stdin", "--name", "second"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = {
        let data = second.clone();
        std::thread::spawn(move || {
            for part in data.chunks(1 << 20) {
                if stdin.write_all(part).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    until("two packs of the second push", Duration::from_secs(60), || {
        pack_objects(&weed, "s").len() >= packs_before + 2
    });
    p.kill();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the push cannot succeed without its server");
    feeder.join().unwrap();

    p.serve(&[]);
    assert_eq!(snapshot_ids(&p, &token), std::slice::from_ref(&first_id), "no partial snapshot");
    assert!(ok(p.bkp(&token).args(["restore", &first_id, "--stdout"])).stdout == first);
    let out = push(&p, &second, "second");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second_id = json(&out)["snapshot"]["id"].as_str().unwrap().to_string();
    let gc = ok(Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(p.dir.path()));
    assert_eq!(json(&gc)["ok"], true, "{}", String::from_utf8_lossy(&gc.stdout));
    assert!(ok(p.bkp(&token).args(["restore", &first_id, "--stdout"])).stdout == first);
    assert!(ok(p.bkp(&token).args(["restore", &second_id, "--stdout"])).stdout == second);
}

/// SeaweedFS killed in the middle of a push: the push fails with the
/// object store's error within the configured retry time, no snapshot is
/// made; once SeaweedFS is back the same server (no restart) takes the
/// push, and restores it byte for byte.
#[test]
fn the_bucket_down_mid_push_fails_it_clearly_then_pushes_resume() {
    let mut weed = Seaweed::start("down");
    let cfgdir = tempfile::tempdir().unwrap();
    let mut cfg = s3_config(&weed, cfgdir.path(), "s");
    cfg.storage.retry_secs = 4;
    let server = TestServer::start_with(cfg);
    let token = server.token("db01", Role::Push);
    let data = random_bytes(40 << 20, 3);
    let mut child = server
        .bkp(&token)
        .args(["push", "--stdin", "--name", "dump"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data[..12 << 20]).unwrap();
    until("a first pack", Duration::from_secs(60), || !pack_objects(&weed, "s").is_empty());
    weed.kill();
    let t = Instant::now();
    let _ = stdin.write_all(&data[12 << 20..]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the push cannot be stored");
    assert!(
        err.contains("object store failed or did not answer") && err.contains("push again"),
        "a clear error: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60), "failed within bounds: {:?}", t.elapsed());
    weed.restart();
    let listed = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert_eq!(listed.as_array().unwrap().len(), 0, "no snapshot of the failed push: {listed}");
    let id = server.push_stdin(&token, "dump", &data)["snapshot"]["id"].as_str().unwrap().to_string();
    assert!(ok(server.bkp(&token).args(["restore", &id, "--stdout"])).stdout == data);
}

/// A pack object deleted by hand: `verify --full` finds it, names the
/// snapshot it damages (and not the other host's), and the next push of
/// the same data heals it.
#[test]
fn a_deleted_pack_is_found_by_verify_and_healed_by_the_next_push() {
    use bkp_server::verify::{self, Scope, VerifyConfig};

    let weed = Seaweed::start("verify");
    let cfgdir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_with(s3_config(&weed, cfgdir.path(), "s"));
    let a = server.token("db01", Role::Push);
    let b = server.token("web01", Role::Push);
    let da = random_bytes(3 << 20, 10);
    let db = random_bytes(3 << 20, 11);
    let ida = server.push_stdin(&a, "dump", &da)["snapshot"]["id"].as_str().unwrap().to_string();
    let before: Vec<String> = pack_objects(&weed, "s").iter().map(|m| m.location.to_string()).collect();
    let idb = server.push_stdin(&b, "dump", &db)["snapshot"]["id"].as_str().unwrap().to_string();
    // The packs of db01's push: the ones there before web01's.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let biggest = pack_objects(&weed, "s")
        .into_iter()
        .filter(|m| before.contains(&m.location.to_string()))
        .max_by_key(|m| m.size)
        .unwrap();
    rt.block_on(weed.store().delete(&biggest.location)).unwrap();
    // Nothing cached from before the deletion.
    server.restart();
    let state = server.state();
    let r = verify::run(state.store().as_ref(), state.sessions(), &VerifyConfig::default(), Scope::Full, 1).unwrap();
    let affected: Vec<String> = r.affected.iter().map(|a| a.id.to_hex()).collect();
    assert_eq!(affected, std::slice::from_ref(&ida), "{r:?}");
    assert!(!r.bad_chunks.is_empty());
    assert!(!affected.contains(&idb));
    let out = server.bkp(&a).args(["restore", &ida, "--stdout"]).output().unwrap();
    assert!(!out.status.success(), "a damaged snapshot does not restore");
    // The next push of the same data uploads the lost chunks again.
    server.push_stdin(&a, "dump", &da);
    let r = verify::run(state.store().as_ref(), state.sessions(), &VerifyConfig::default(), Scope::Full, 2).unwrap();
    assert!(r.healed.iter().any(|h| h.to_hex() == ida), "{r:?}");
    assert!(ok(server.bkp(&a).args(["restore", &ida, "--stdout"])).stdout == da);
    assert!(ok(server.bkp(&b).args(["restore", &idb, "--stdout"])).stdout == db);
}
