//! Faults with chunk data on S3, against a real SeaweedFS: the server
//! killed mid-upload and mid-GC, the bucket down mid-push, a pack deleted
//! by hand.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_tests::seaweed::{pack_objects, s3_config, storage_toml, Seaweed};
use bkp_tests::{bin, json, ok, random_bytes, ServerProcess, TestServer};
use object_store::ObjectStoreExt;

pub(crate) fn until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
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
        err.contains("object store (bucket \"down\") failed or did not answer") && err.contains("try again"),
        "a clear error: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60), "failed within bounds: {:?}", t.elapsed());
    weed.restart();
    let listed = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert_eq!(listed.as_array().unwrap().len(), 0, "no snapshot of the failed push: {listed}");
    let id = server.push_stdin(&token, "dump", &data)["snapshot"]["id"].as_str().unwrap().to_string();
    assert!(ok(server.bkp(&token).args(["restore", &id, "--stdout"])).stdout == data);
}

/// A pack object deleted by hand: `verify --full` (whose scrub reads the
/// bucket pack by pack) finds it, names the snapshot it damages (and not
/// the other host's), and the next push of the same data heals it.
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
    // The scrub read the packs whole from the bucket and found one gone.
    let scrub = r.scrub.as_ref().unwrap();
    assert_eq!(scrub.packs_missing, 1, "{scrub:?}");
    assert!(scrub.packs_checked >= 3 && scrub.cycle_completed, "{scrub:?}");
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

/// `kill -9` of bkp-server in the middle of a GC on the bucket, once its
/// repack has uploaded its first new pack (later ones still to come, the
/// location switch maybe not yet written). After a restart every
/// committed snapshot restores byte for byte; GC run again converges (a
/// run that deletes and rewrites nothing: whatever the killed run left,
/// orphan or retired pack, is gone), and the forgotten data has left the
/// bucket.
#[test]
fn kill_9_mid_gc_loses_nothing_and_the_next_gc_cleans_up() {
    let weed = Seaweed::start("gckill");
    let mut p = ServerProcess::init();
    std::fs::write(p.dir.path().join("server.toml"), format!("[storage]\n{}", storage_toml(&weed, p.dir.path(), "s")))
        .unwrap();
    p.serve(&[]);
    let token = p.token("db01", "push");
    let admin = p.token("ops", "admin");
    let push = |p: &ServerProcess, data: &[u8], name: &str| -> String {
        let mut child = p
            .bkp(&token)
            .args(["push", "--json", "--stdin", "--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(data);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json(&out)["snapshot"]["id"].as_str().unwrap().to_string()
    };
    // Each dump fills an 8 MiB pack, 3 MiB of it (the tail) shared with a
    // kept snapshot: forgetting the dumps leaves twelve packs under 40%
    // live, which GC repacks into five new ones.
    let mut kept = Vec::new();
    let mut dumps = Vec::new();
    for i in 0..12u64 {
        let tail = random_bytes(3 << 20, 7000 + i);
        let mut dump = random_bytes(5 << 20, 8000 + i);
        dump.extend_from_slice(&tail);
        dumps.push(push(&p, &dump, &format!("dump{i}")));
        kept.push((push(&p, &tail, &format!("keep{i}")), tail));
    }
    for id in &dumps {
        ok(p.bkp(&admin).args(["forget", id]));
    }
    let before: std::collections::HashSet<String> =
        pack_objects(&weed, "s").iter().map(|m| m.location.to_string()).collect();
    let bytes_before: u64 = pack_objects(&weed, "s").iter().map(|m| m.size).sum();

    let gc = Command::new(bin("bkp-server"))
        .args(["gc", "--json", "--data"])
        .arg(p.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // One client, polled fast: the kill must land while GC still works.
    let (store, rt) = (weed.store(), tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
    let packs = object_store::path::Path::from("s/packs");
    until("the repack's first new pack", Duration::from_secs(120), || {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let now: Vec<object_store::ObjectMeta> = rt.block_on(store.list(Some(&packs)).try_collect()).unwrap();
        now.iter().any(|m| !before.contains(&m.location.to_string()))
    });
    p.kill();
    let out = gc.wait_with_output().unwrap();
    assert!(!out.status.success(), "the gc was killed before it ended: {}", String::from_utf8_lossy(&out.stdout));

    p.serve(&[]);
    for (id, data) in &kept {
        assert!(ok(p.bkp(&token).args(["restore", id, "--stdout"])).stdout == *data, "{id} after the kill");
    }
    let mut runs = Vec::new();
    loop {
        let out = ok(Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(p.dir.path()));
        let r = json(&out);
        assert_eq!(r["ok"], true, "{r}");
        let f = &r["figures"];
        let busy = ["pack_objects_deleted", "packs_repacked", "pack_bytes_rewritten"]
            .iter()
            .any(|k| f[k].as_u64().unwrap_or(0) > 0);
        runs.push(f.clone());
        if !busy {
            break;
        }
        assert!(runs.len() < 4, "gc does not converge: {runs:?}");
    }
    println!("gc runs after the kill: {runs:?}");
    let left = pack_objects(&weed, "s");
    let bytes_after: u64 = left.iter().map(|m| m.size).sum();
    assert!(
        bytes_after + (40 << 20) < bytes_before,
        "the forgotten 60 MiB left the bucket: {bytes_before} -> {bytes_after} bytes"
    );
    for (id, data) in &kept {
        assert!(ok(p.bkp(&token).args(["restore", id, "--stdout"])).stdout == *data, "{id} after gc");
    }

    // The server dies again; a rebuild elsewhere finds its lease still
    // held. Without the flag it is told of --take-over-lease; with it, it
    // is refused too, since the dead server renewed its lease moments ago.
    p.kill();
    let new = tempfile::tempdir().unwrap();
    let rebuild = |extra: &[&str]| {
        Command::new(bin("bkp-server"))
            .args(["rebuild", "--data"])
            .arg(new.path())
            .arg("--config")
            .arg(p.dir.path().join("server.toml"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = rebuild(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use by another") && err.contains("--take-over-lease"), "{err}");
    let out = rebuild(&["--take-over-lease"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("looks alive") && err.contains("try again in"), "{err}");
}
