//! Tests of the RocksDB store: possession, durability, snapshots.

use super::*;
use crate::store::schema;
use bkp_common::blob;
use bkp_common::snapshot::{SnapshotKind, SnapshotStats};
use bkp_common::SnapshotId;

fn chunk(data: &[u8]) -> VerifiedChunk {
    VerifiedChunk::verify(ChunkId::of(data), blob::encode(data, 3)).unwrap()
}

#[test]
fn host_index_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let a = chunk(b"aaaa");
    let ids = [*a.id(), ChunkId::of(b"zz")];
    assert_eq!(s.host_has("h1", &ids).unwrap(), [false, false]);
    let st = s.put_chunks("h1", &[a]).unwrap();
    assert_eq!(st.new_chunks, 1);
    assert_eq!(s.host_has("h1", &ids).unwrap(), [true, false]);
    assert_eq!(s.host_holds("h1", &ids).unwrap(), [true, false]);
    // Another host does not learn that h1 holds the chunk...
    assert_eq!(s.host_has("h2", &ids).unwrap(), [false, false]);
    assert_eq!(s.host_holds("h2", &ids).unwrap(), [false, false]);
    // ...and its upload is stored once.
    assert_eq!(s.put_chunks("h2", &[chunk(b"aaaa")]).unwrap().new_chunks, 0);
    assert_eq!(s.host_has("h2", &ids).unwrap(), [true, false]);
    assert_eq!(blob::decode(&s.chunk_blob(&ids[0]).unwrap().unwrap()).unwrap(), b"aaaa");
}

fn host_chunk_records(s: &RocksStore) -> usize {
    s.host_chunks(None, 1 << 20).unwrap().len()
}

#[test]
fn first_uploader_owns_later_ones_get_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let (a, b) = (chunk(b"a"), chunk(b"b"));
    let ids = [*a.id(), *b.id()];
    s.put_chunks("h1", &[a, b]).unwrap();
    // The uploader's possession is its meta's owner: no key of its own.
    assert_eq!(host_chunk_records(&s), 0);
    assert_eq!(s.chunk_meta(&ids[0]).unwrap().unwrap().owner, s.host_num("h1"));
    s.put_chunks("h1", &[chunk(b"a")]).unwrap();
    assert_eq!(host_chunk_records(&s), 0);
    s.put_chunks("h2", &[chunk(b"a")]).unwrap();
    assert_eq!(s.host_chunks(None, 10).unwrap(), [("h2".to_string(), ids[0])]);
    assert_eq!(s.host_has("h1", &ids).unwrap(), [true, true]);
    assert_eq!(s.host_has("h2", &ids).unwrap(), [true, false]);

    // Forgetting works on either kind of record, and only for that host.
    s.forget_possession(&[("h1".into(), ids[0]), ("h2".into(), ids[1])]).unwrap();
    assert_eq!(s.host_holds("h1", &ids).unwrap(), [false, true]);
    assert_eq!(s.host_holds("h2", &ids).unwrap(), [true, false]);
    assert_eq!(s.chunk_meta(&ids[0]).unwrap().unwrap().owner, None);
    s.forget_possession(&[("h2".into(), ids[0])]).unwrap();
    assert_eq!(s.host_holds("h2", &ids).unwrap(), [false, false]);
    assert!(s.chunk_meta(&ids[0]).unwrap().is_some(), "the chunk itself stays");

    // Host numbers survive a reopen.
    let n1 = s.host_num("h1");
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.host_num("h1"), n1);
    assert_ne!(s.host_num("h2"), n1);
    assert_eq!(s.host_holds("h1", &ids).unwrap(), [false, true]);
}

#[test]
fn quarantine_keeps_the_owners_possession() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let a = chunk(b"a");
    let id = *a.id();
    s.put_chunks("h1", &[a]).unwrap();
    s.quarantine_chunk(&id, "test", 1).unwrap();
    assert_eq!(s.host_has("h1", &[id]).unwrap(), [false], "not stored any more");
    assert_eq!(s.host_holds("h1", &[id]).unwrap(), [true]);
    // Another host uploads it again: h1's snapshots can read it again.
    s.put_chunks("h2", &[chunk(b"a")]).unwrap();
    assert_eq!(s.host_has("h1", &[id]).unwrap(), [true]);
    assert_eq!(s.chunk_meta(&id).unwrap().unwrap().owner, s.host_num("h2"));
}

#[test]
fn hosts_racing_on_new_chunks_all_hold_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(RocksStore::open(dir.path(), 8 << 20).unwrap());
    let ids: Vec<ChunkId> = (0..2000u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
    let threads: Vec<_> = ["h1", "h2", "h3"]
        .into_iter()
        .map(|h| {
            let s = s.clone();
            std::thread::spawn(move || {
                for part in (0..2000u32).collect::<Vec<_>>().chunks(50) {
                    let batch: Vec<_> = part.iter().map(|i| chunk(&i.to_le_bytes())).collect();
                    s.put_chunks(h, &batch).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    for h in ["h1", "h2", "h3"] {
        assert!(s.host_has(h, &ids).unwrap().iter().all(|&b| b), "{h} lost possession");
    }
    assert_eq!(host_chunk_records(&s), 2 * ids.len());
}

#[test]
fn schema_1_store_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let a = chunk(b"a");
    let id = *a.id();
    {
        // What a schema 1 server wrote: a v1 meta, a host_chunks record.
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        s.raw_db().put_cf(s.cf(schema::CF_META), schema::META_SCHEMA_VERSION, 1u32.to_le_bytes()).unwrap();
        s.raw_db().put_cf(s.cf(schema::CF_CHUNKS), id.as_bytes(), &a.blob).unwrap();
        s.raw_db().put_cf(s.cf(schema::CF_CHUNK_META), id.as_bytes(), [1, 1, 0, 0, 0, 9, 0, 0, 0]).unwrap();
        s.raw_db().put_cf(s.cf(schema::CF_HOST_CHUNKS), schema::host_chunk_key("h1", &id), []).unwrap();
    }
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let version = s.raw_db().get_cf(s.cf(schema::CF_META), schema::META_SCHEMA_VERSION).unwrap();
    assert_eq!(version.as_deref(), Some(&2u32.to_le_bytes()[..]));
    assert_eq!(s.host_has("h1", &[id]).unwrap(), [true]);
    assert_eq!(s.host_has("h2", &[id]).unwrap(), [false]);
    assert_eq!(s.chunk_meta(&id).unwrap().unwrap(), ChunkMeta { raw_len: 1, stored_len: 9, owner: None });
    // h1 uploading it again adds nothing; h2 gets a record.
    s.put_chunks("h1", &[chunk(b"a")]).unwrap();
    s.put_chunks("h2", &[chunk(b"a")]).unwrap();
    assert_eq!(host_chunk_records(&s), 2);
    assert_eq!(s.host_has("h2", &[id]).unwrap(), [true]);
    // A newer schema than this build knows is refused.
    s.raw_db().put_cf(s.cf(schema::CF_META), schema::META_SCHEMA_VERSION, 3u32.to_le_bytes()).unwrap();
    drop(s);
    let Err(e) = RocksStore::open(dir.path(), 8 << 20) else { panic!("schema 3 opened") };
    assert!(e.to_string().contains("upgrade"), "{e}");
}

#[test]
fn a_chunk_whose_data_is_gone_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    // Small chunks stay inline in SSTs, large ones go to blob files.
    let big = |n: u8| {
        // Incompressible, so stored at its 40 KiB.
        let mut d = vec![0; 40 << 10];
        blake3::Hasher::new().update(&[n]).finalize_xof().fill(&mut d);
        VerifiedChunk::verify(ChunkId::of(&d), blob::encode(&d, 1)).unwrap()
    };
    let all = [chunk(b"small-1"), chunk(b"small-2"), big(1), big(2)];
    let ids: Vec<ChunkId> = all.iter().map(|c| *c.id()).collect();
    s.put_chunks("h", &all).unwrap();
    let check = |s: &RocksStore, want: [bool; 4]| {
        assert_eq!(s.host_has("h", &ids).unwrap(), want);
        let mut sorted: Vec<(ChunkId, bool)> = ids.iter().copied().zip(want).collect();
        sorted.sort();
        let (sids, swant): (Vec<ChunkId>, Vec<bool>) = sorted.into_iter().unzip();
        assert_eq!(s.stored_sorted(&sids).unwrap(), swant);
    };
    check(&s, [true; 4]);
    // In the memtable, then in SST and blob files, then with a cold cache.
    s.raw_db().delete_cf(s.cf(schema::CF_CHUNKS), ids[0].as_bytes()).unwrap();
    check(&s, [false, true, true, true]);
    s.raw_db().delete_cf(s.cf(schema::CF_CHUNKS), ids[2].as_bytes()).unwrap();
    s.raw_db().flush_cf(s.cf(schema::CF_CHUNKS)).unwrap();
    check(&s, [false, true, false, true]);
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    check(&s, [false, true, false, true]);
    assert!(s.chunk_meta(&ids[2]).unwrap().is_some(), "the meta stayed");
    // Uploading them again writes the data; the meta is kept.
    assert_eq!(s.put_chunks("h", &[chunk(b"small-1"), big(1)]).unwrap().new_chunks, 0);
    check(&s, [true; 4]);
    assert!(s.chunk_blob(&ids[2]).unwrap().is_some());
}

#[test]
fn stored_sorted_agrees_with_point_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let stored: Vec<VerifiedChunk> = (0..200u32).map(|i| chunk(&i.to_le_bytes())).collect();
    s.put_chunks("h", &stored[..150]).unwrap();
    // The rest go into a second SST, so the iterator merges levels too.
    s.db.persist_unlogged().unwrap();
    s.raw_db().flush_cf(s.cf(schema::CF_CHUNK_META)).unwrap();
    s.put_chunks("h", &stored[150..]).unwrap();
    // Every 7th stored chunk asked about, runs of neighbours, ids that
    // sort before, between and after all stored ones.
    let mut ask: Vec<ChunkId> = stored.iter().step_by(7).map(|c| *c.id()).collect();
    ask.extend(stored[40..60].iter().map(|c| *c.id()));
    ask.extend((0..50u32).map(|i| ChunkId::of(&(1000 + i).to_le_bytes())));
    ask.extend([ChunkId::from_bytes([0; 32]), ChunkId::from_bytes([0xff; 32])]);
    ask.sort_unstable();
    ask.dedup();
    let want: Vec<bool> = ask.iter().map(|id| s.chunk_meta(id).unwrap().is_some()).collect();
    assert!(want.iter().filter(|&&b| b).count() >= 40 && want.iter().any(|&b| !b));
    assert_eq!(s.stored_sorted(&ask).unwrap(), want);
    assert_eq!(s.stored_sorted(&[]).unwrap(), Vec::<bool>::new());
}

#[test]
fn snapshots_survive_reopen_and_list_by_set() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |host: &str, name: &str, t| Snapshot {
        host: host.into(),
        name: name.into(),
        time_ns: t,
        kind: SnapshotKind::Tree,
        stats: SnapshotStats::default(),
        tree: vec![],
        client: "test".into(),
    };
    let id = {
        let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
        s.commit_snapshot(&mk("ab", "db", 2), None).unwrap();
        s.commit_snapshot(&mk("a", "db", 1), None).unwrap();
        s.commit_snapshot(&mk("a", "files", 3), None).unwrap().id
    };
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.list_snapshots(Some("a"), None).unwrap().len(), 2);
    assert_eq!(s.list_snapshots(Some("a"), Some("db")).unwrap().len(), 1);
    assert_eq!(s.list_snapshots(None, Some("db")).unwrap().len(), 2);
    assert_eq!(s.list_snapshots(None, None).unwrap().iter().map(|x| x.time_ns).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(s.snapshot(&id).unwrap().unwrap().name, "files");
}

#[test]
fn records_from_before_version_bytes_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    // What a build before the version bytes left in `meta` and `jobs`.
    let alert_v1 = br#"{"disk":{"kind":"disk","summary":"low","fingerprint":"f","since_ns":5}}"#;
    s.meta_put(schema::META_ALERT_STATE, alert_v1).unwrap();
    let job_v1 = br#"{"kind":"gc","start_ns":5,"end_ns":6,"ok":false,"dry_run":false,"error":"e","figures":null}"#;
    s.raw_db().put_cf(s.cf(schema::CF_JOBS), schema::job_key(5, "gc"), job_v1).unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.alert_state().unwrap()["disk"].since_ns, 5);
    let jobs = s.jobs(10).unwrap();
    assert_eq!(jobs[0].error.as_deref(), Some("e"));
    // Written again, each has its version byte.
    let st = s.alert_state().unwrap();
    s.set_alert_state(&st).unwrap();
    assert_eq!(s.meta_get(schema::META_ALERT_STATE).unwrap().unwrap()[0], 2);
    assert_eq!(s.alert_state().unwrap(), st);
    // An unreadable state notifies afresh instead of failing the monitor.
    s.meta_put(schema::META_ALERT_STATE, &[9, 9]).unwrap();
    assert!(s.alert_state().unwrap().is_empty());
}

#[test]
fn typed_records_round_trip_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.scrub_cursor().unwrap(), schema::ScrubCursor::default());
    let c =
        schema::ScrubCursor { after: Some(ChunkId::of(b"x")), cycle_start_ns: 1, last_cycle_end_ns: 2, last_run_ns: 3 };
    s.set_scrub_cursor(&c).unwrap();
    let id = SnapshotId::from_bytes([3; 32]);
    let d = schema::Damage { host: "h".into(), name: "n".into(), found_ns: 4, ..Default::default() };
    s.put_damaged(&id, &d).unwrap();
    // A damage record that does not decode is left out, not an error.
    s.raw_db().put_cf(s.cf(schema::CF_DAMAGED), [4; 32], [7]).unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.scrub_cursor().unwrap(), c);
    assert_eq!(s.damaged().unwrap(), [(id, d)]);
    assert_eq!(s.schema_version().unwrap(), Some(schema::SCHEMA_VERSION));
}

fn failure(host: &str, name: &str, count: u64) -> schema::PushFailure {
    schema::PushFailure { host: host.into(), name: name.into(), kind: None, count, last_ns: count, reason: "r".into() }
}

#[test]
fn push_failures_are_one_record_per_set() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert!(s.push_failures().unwrap().is_empty());
    s.put_push_failures(&[failure("a", "db", 1), failure("b", "db", 1)], &[]).unwrap();
    // A report rewrites its set's record only; an evicted set's goes.
    s.put_push_failures(&[failure("a", "db", 2)], &[("b".into(), "db".into())]).unwrap();
    let meta = s.cf(schema::CF_META);
    let raw = s.raw_db().get_cf(meta, schema::push_failure_key("a", "db")).unwrap().unwrap();
    assert_eq!(schema::decode_push_failure(&raw).unwrap(), failure("a", "db", 2));
    assert!(s.raw_db().get_cf(meta, schema::push_failure_key("b", "db")).unwrap().is_none());
    // A record that does not decode costs its set only.
    s.raw_db().put_cf(meta, schema::push_failure_key("c", "x"), [9, 9]).unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.push_failures().unwrap(), [failure("a", "db", 2)]);
    // Keys that merely sort near the prefix are not read as failures.
    s.raw_db().put_cf(s.cf(schema::CF_META), b"push_failurf", b"x").unwrap();
    assert_eq!(s.push_failures().unwrap().len(), 1);
}

#[test]
fn a_v1_push_failure_table_becomes_one_record_per_set_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let v1 = br#"{"version":1,"sets":[{"host":"db01","name":"pgdump","kind":"Stream","count":3,"last_ns":7,"reason":"pg_dump failed"}]}"#;
    s.meta_put(schema::META_PUSH_FAILURES_V1, v1).unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    let got = s.push_failures().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].host.as_str(), got[0].count, got[0].kind), ("db01", 3, Some(SnapshotKind::Stream)));
    assert!(s.meta_get(schema::META_PUSH_FAILURES_V1).unwrap().is_none(), "the old record is gone");
    // An old record that does not decode is dropped, as before.
    s.meta_put(schema::META_PUSH_FAILURES_V1, b"{garbage").unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.push_failures().unwrap().len(), 1);
    assert!(s.meta_get(schema::META_PUSH_FAILURES_V1).unwrap().is_none());
}

#[test]
fn scheduled_since_round_trips_and_a_bad_record_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), 8 << 20).unwrap();
    assert_eq!(s.scheduled_since().unwrap(), None);
    let since: schema::ScheduledSince = [("verify".to_string(), 7)].into_iter().collect();
    s.set_scheduled_since(&since).unwrap();
    assert_eq!(s.scheduled_since().unwrap(), Some(since));
    s.meta_put(schema::META_SCHEDULED_SINCE, b"\xff").unwrap();
    assert!(matches!(s.scheduled_since(), Err(StoreError::Corrupt(_))));
}
