//! Verify job: injected corruption is found, quarantined, reported with
//! exactly the affected snapshots on every host, and healed by a push.

use std::process::Command;

use bkp_common::protocol::Role;
use bkp_common::tree::{Entry, TreeDecoder};
use bkp_common::{blob, ChunkId, SnapshotId};
use bkp_tests::{bin, ok, random_bytes, TestServer};

/// The first data chunk of a snapshot's (only) file.
pub(crate) fn first_data_chunk(server: &TestServer, id: &str) -> ChunkId {
    let store = server.state().store().clone();
    let snap = store.snapshot(&id.parse::<SnapshotId>().unwrap()).unwrap().unwrap();
    let mut dec = TreeDecoder::new();
    for t in &snap.tree {
        dec.feed(&blob::decode(&store.chunk_blob(t).unwrap().unwrap()).unwrap());
        while let Some(e) = dec.next_entry().unwrap() {
            if let Entry::Chunks(refs) = e {
                return refs[0].id;
            }
        }
    }
    panic!("no data chunk");
}

/// Bit rot: overwrites a stored chunk's blob, with the server stopped,
/// through RocksDB itself.
fn corrupt(server: &mut TestServer, id: &ChunkId) {
    server.stop();
    let path = server.data().join("db");
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, &cfs).unwrap();
    let rot = blob::encode(b"this is not the chunk that was stored", 3);
    db.put_cf(db.cf_handle("chunks").unwrap(), id.as_bytes(), rot).unwrap();
    drop(db);
    server.restart();
}

fn verify(server: &TestServer, args: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(bin("bkp-server"))
        .arg("verify")
        .args(args)
        .arg("--json")
        .arg("--data")
        .arg(server.data())
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), v)
}

#[test]
fn corruption_is_quarantined_reported_and_healed() {
    let mut server = TestServer::start();
    let (h1, h2) = (server.token("web01", Role::Push), server.token("web02", Role::Push));
    let data = random_bytes(3 << 20, 1);
    let a = server.push_stdin(&h1, "db", &data)["snapshot"]["id"].as_str().unwrap().to_string();
    let b = server.push_stdin(&h2, "db", &data)["snapshot"]["id"].as_str().unwrap().to_string();
    let c = server.push_stdin(&h1, "other", &random_bytes(1 << 20, 2))["snapshot"]["id"].as_str().unwrap().to_string();

    // A clean store verifies clean, drilling every snapshot.
    let (clean, rep) = verify(&server, &["--full"]);
    assert!(clean, "{rep}");
    assert_eq!(rep["figures"]["snapshots_drilled"], 3);
    assert!(rep["figures"]["scrub"]["chunks_checked"].as_u64().unwrap() >= 4, "{rep}");

    let bad = first_data_chunk(&server, &a);
    corrupt(&mut server, &bad);

    // A scheduled run with one slice scrubs everything and finds it.
    let (clean, rep) = verify(&server, &[]);
    assert!(!clean, "corruption must fail the run: {rep}");
    let f = &rep["figures"];
    assert_eq!(f["bad_chunks"].as_array().unwrap().len(), 1, "{f}");
    assert_eq!(f["bad_chunks"][0]["id"], bad.to_hex());
    let mut affected: Vec<(String, String, String)> = f["affected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (x["id"].as_str().unwrap().into(), x["host"].as_str().unwrap().into(), x["name"].as_str().unwrap().into())
        })
        .collect();
    affected.sort();
    let mut want = vec![(a.clone(), "web01".into(), "db".into()), (b.clone(), "web02".into(), "db".into())];
    want.sort();
    assert_eq!(affected, want, "exactly the snapshots holding the chunk, on both hosts; not {c}");
    assert_eq!(f["affected"][0]["paths"].as_array().unwrap().len(), 1);
    // Quarantined, not deleted: the bytes are kept aside.
    let q = server.state().store().quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].0, bad);
    assert!(server.state().store().chunk_blob(&bad).unwrap().is_none());

    // The damaged snapshot cannot be restored (and says so)...
    let out = server.bkp(&h1).args(["restore", &a[..12], "--stdout"]).output().unwrap();
    assert!(!out.status.success());
    // ...and is not a dedup base: the next push uploads the chunk again.
    let again = server.push_stdin(&h1, "db", &data);
    assert!(again["chunks_sent"].as_u64().unwrap() >= 1, "{again}");

    // Healed: both hosts' damaged snapshots drill clean and are cleared.
    let (clean, rep) = verify(&server, &["--sample", "0"]);
    assert!(clean, "{rep}");
    assert_eq!(rep["figures"]["healed"].as_array().unwrap().len(), 2, "{rep}");
    assert_eq!(rep["figures"]["damaged_total"], 0);
    let out = ok(server.bkp(&h1).args(["restore", &a[..12], "--stdout"]));
    assert!(out.stdout == data);
    let out = ok(server.bkp(&h2).args(["restore", &b[..12], "--stdout"]));
    assert!(out.stdout == data);
}

#[test]
fn scrub_covers_the_store_in_the_configured_number_of_runs() {
    let mut cfg = bkp_server::config::ServerConfig { cache_mb: 16, ..Default::default() };
    cfg.verify.slices = 4;
    cfg.verify.drill_share = 0.0;
    let server = TestServer::start_with(cfg);
    let h = server.token("web01", Role::Push);
    // About 40 chunks of 256 KiB-4 MiB.
    server.push_stdin(&h, "db", &random_bytes(40 << 20, 3));
    let total = server.state().store().chunk_metas(None, 1 << 20).unwrap().len() as u64;
    let mut checked = 0;
    let mut completed_at = None;
    for run in 1..=4 {
        let state = server.state();
        let rec = bkp_server::jobs::run_verify(&state.jobs(&state.config()), bkp_server::verify::Scope::Scheduled);
        assert!(rec.ok, "{rec:?}");
        let scrub = rec.verify_report().and_then(|v| v.scrub.clone()).expect("a scrub report");
        checked += scrub.chunks_checked;
        if scrub.cycle_completed {
            completed_at = Some(run);
            break;
        }
        // A slice is about a quarter, never the whole store.
        assert!(scrub.chunks_checked < total);
    }
    assert_eq!(completed_at, Some(4), "four slices make a cycle");
    assert_eq!(checked, total, "every chunk scrubbed exactly once per cycle");
}
