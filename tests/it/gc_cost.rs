//! What a GC costs and what it may hold: the mark set spilled to disk
//! gives the same result as in memory, chunk data is rewritten only where
//! garbage is, and freed space still comes back. Real RocksDB stores,
//! driven through the GC the jobs run.

use std::time::Duration;

use bkp_common::blob;
use bkp_common::snapshot::{Snapshot, SnapshotKind, SnapshotStats};
use bkp_common::{ChunkId, SnapshotId};
use bkp_server::gc::{self, GcConfig, GcHooks, GcReport};
use bkp_server::sessions::Sessions;
use bkp_server::store::rocks::RocksStore;
use bkp_server::store::{ChunkStore, MetaStore, VerifiedChunk};
use bkp_tests::{encode_tree, file_entries, random_bytes};

fn chunk(data: &[u8]) -> VerifiedChunk {
    VerifiedChunk::verify(ChunkId::of(data), blob::encode(data, 1)).unwrap()
}

/// Commits a one-file snapshot of `host` over `datas` (put by `host`
/// first; flushed with `persist`, else left for a later flush).
fn commit(store: &RocksStore, host: &str, time_ns: u64, datas: &[&[u8]], persist: bool) -> SnapshotId {
    let all: Vec<u8> = datas.concat();
    let tree = encode_tree(&file_entries(b"f", &all, datas));
    let mut chunks: Vec<VerifiedChunk> = datas.iter().map(|d| chunk(d)).collect();
    chunks.push(chunk(&tree));
    store.put_chunks(host, &chunks).unwrap();
    if persist {
        store.persist_chunks().unwrap();
    }
    let snap = Snapshot {
        host: host.into(),
        name: "n".into(),
        time_ns,
        kind: SnapshotKind::Stream,
        stats: SnapshotStats {
            files: 1,
            bytes: all.len() as u64,
            data_chunks: datas.len() as u64,
            ..Default::default()
        },
        tree: vec![ChunkId::of(&tree)],
        client: "test".into(),
    };
    MetaStore::commit_snapshot(store, &snap).unwrap().id
}

/// Three hosts, five snapshots each over overlapping windows of 300
/// small chunks (so chunks are shared, owned by one host and recorded
/// for others), then a few snapshots forgotten.
fn overlapping_store(dir: &std::path::Path) -> RocksStore {
    let store = RocksStore::open(dir, 8 << 20).unwrap();
    let datas: Vec<Vec<u8>> = (0..300).map(|i| random_bytes(512 + i * 7, i as u64)).collect();
    let mut ids = Vec::new();
    for (h, host) in ["a", "b", "c"].iter().enumerate() {
        for s in 0..5 {
            let start = (h * 37 + s * 50) % 250;
            let window: Vec<&[u8]> = datas[start..start + 50].iter().map(|d| d.as_slice()).collect();
            ids.push(commit(&store, host, 1_000 + (h * 10 + s) as u64, &window, true));
        }
    }
    for i in [0, 6, 7, 8, 14] {
        assert!(store.delete_snapshot(&ids[i]).unwrap());
    }
    store
}

fn state(store: &RocksStore) -> (Vec<String>, Vec<(String, ChunkId)>) {
    let metas = store.chunk_metas(None, 1 << 20).unwrap();
    let metas = metas.iter().map(|(id, m)| format!("{id:?} {m:?}")).collect();
    (metas, store.host_chunks(None, 1 << 20).unwrap())
}

fn gc_with(store: &RocksStore, cfg: &GcConfig) -> GcReport {
    let sessions = Sessions::new(Duration::from_secs(3600));
    gc::run_with(store, &sessions, cfg, &GcHooks { batch_size: Some(64), ..Default::default() }).unwrap()
}

#[test]
fn a_mark_set_spilled_to_disk_deletes_exactly_what_the_in_memory_one_does() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (memory, disk) = (overlapping_store(d1.path()), overlapping_store(d2.path()));
    assert_eq!(state(&memory), state(&disk), "two identical stores");

    let in_memory = gc_with(&memory, &GcConfig::default());
    // A zero budget: every id marked goes to the scratch column family.
    let spilled = gc_with(&disk, &GcConfig { mark_memory_mb: 0, ..Default::default() });
    assert_eq!(in_memory.mark_spilled, 0, "{in_memory:?}");
    assert!(spilled.mark_spilled > spilled.referenced_chunks, "chunks and pairs spilled: {spilled:?}");
    assert!(in_memory.chunks_deleted > 0 && in_memory.possession_records_deleted > 0, "{in_memory:?}");
    let figures = |r: &GcReport| {
        (r.snapshots, r.referenced_chunks, r.chunks_deleted, r.possession_records_deleted, r.chunk_bytes_deleted)
    };
    assert_eq!(figures(&in_memory), figures(&spilled));
    let after = state(&memory);
    assert_eq!(after, state(&disk), "the same chunks, owners and possession records are left");

    // And what is left is what the surviving snapshots need: each one's
    // every chunk is still stored for its host.
    for s in disk.list_snapshots(None, None).unwrap() {
        let snap = disk.snapshot(&s.id).unwrap().unwrap();
        let mut refs = snap.tree.clone();
        bkp_server::commit::walk_tree(&disk, &snap.tree, &mut |ids| {
            refs.extend_from_slice(ids);
            Ok(())
        })
        .unwrap();
        assert!(disk.host_has(&snap.host, &refs).unwrap().iter().all(|&h| h), "snapshot {} lost a chunk", s.id);
    }
    // A second run (spilled again) finds nothing more: the scratch of
    // the first was cleared, not mistaken for marks.
    let again = gc_with(&disk, &GcConfig { mark_memory_mb: 0, ..Default::default() });
    assert_eq!((again.chunks_deleted, again.possession_records_deleted), (0, 0), "{again:?}");
    assert_eq!(state(&disk), after);
}

/// 160 snapshots of one 256 KiB chunk each (so every chunk sits in a
/// blob file), in 8 groups of 20 put and flushed together: 8 blob files of
/// 20 chunks, oldest first. (A commit flushes what is pending, so the
/// group is put before its commits.)
fn blob_store(dir: &std::path::Path) -> (RocksStore, Vec<SnapshotId>, Vec<Vec<u8>>) {
    let store = RocksStore::open(dir, 8 << 20).unwrap();
    let datas: Vec<Vec<u8>> = (0..160).map(|i| random_bytes(256 << 10, 1_000 + i)).collect();
    let mut ids = Vec::new();
    for (g, group) in datas.chunks(20).enumerate() {
        let chunks: Vec<VerifiedChunk> = group.iter().map(|d| chunk(d)).collect();
        store.put_chunks("h", &chunks).unwrap();
        store.persist_chunks().unwrap();
        for (i, d) in group.iter().enumerate() {
            ids.push(commit(&store, "h", 10_000 + (g * 20 + i) as u64, &[d], false));
        }
    }
    (store, ids, datas)
}

#[test]
fn gc_rewrites_chunk_data_only_where_garbage_is_and_still_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ids, datas) = blob_store(dir.path());
    let data_bytes = store.disk_bytes().unwrap();
    assert!(data_bytes > 40 << 20, "{data_bytes}");

    // 1 of 160 snapshots (0.6%) forgotten: its chunk is deleted, nothing
    // is relocated, and the rewrite is metadata only.
    assert!(store.delete_snapshot(&ids[80]).unwrap());
    let small = gc_with(&store, &GcConfig::default());
    eprintln!("0.6% forgotten: {small:?}");
    assert_eq!(small.chunks_deleted, 2, "its data and tree chunk: {small:?}");
    assert_eq!(small.bytes_relocated, 0, "{small:?}");
    assert!(small.bytes_rewritten < data_bytes / 20, "rewrote {} of {data_bytes}: {small:?}", small.bytes_rewritten);
    assert!(small.garbage_bytes_before >= 250 << 10, "its 256 KiB are counted as garbage: {small:?}");

    // Every other snapshot of the first 120 (37.5%) forgotten: no blob
    // file is all garbage, and there is more than the threshold: blob
    // files are rewritten, oldest first, and the space comes back.
    for id in ids.iter().take(120).step_by(2) {
        store.delete_snapshot(id).unwrap();
    }
    let large = gc_with(&store, &GcConfig::default());
    eprintln!("37.5% forgotten: {large:?}");
    assert!(large.chunks_deleted >= 2 * 59, "{large:?}");
    assert!(large.bytes_relocated > 0, "{large:?}");
    let live = 100 * (256 << 10) as u64;
    assert!(large.bytes_relocated < live, "only files with garbage move: {large:?}");
    let freed = large.disk_bytes_before.saturating_sub(large.disk_bytes_after);
    assert!(freed >= (59 * (256 << 10)) / 2, "freed {freed} of about {} forgotten: {large:?}", 59 * (256 << 10));
    // What is left reads back whole.
    for (i, d) in datas.iter().enumerate() {
        if i == 80 || (i < 120 && i % 2 == 0) {
            continue;
        }
        let got = store.chunk_blob(&ChunkId::of(d)).unwrap().expect("a kept chunk");
        assert_eq!(&blob::decode(&got).unwrap(), d, "chunk of snapshot {i}");
    }
}

#[test]
fn a_zero_threshold_reclaims_everything_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ids, _) = blob_store(dir.path());
    for id in ids.iter().take(8) {
        store.delete_snapshot(id).unwrap();
    }
    // 5% garbage, under the default threshold, but 0 means "now".
    let r = gc_with(&store, &GcConfig { rewrite_garbage_percent: 0, ..Default::default() });
    let freed = r.disk_bytes_before.saturating_sub(r.disk_bytes_after);
    assert!(freed >= 6 * (256 << 10), "freed {freed}: {r:?}");
    assert!(r.bytes_relocated > 0, "{r:?}");
}

#[test]
fn job_records_older_than_record_days_are_removed_by_the_next_run() {
    use bkp_server::jobs::{now_ns, JobKind, JobRecord};
    const DAY: u64 = 86_400 * 1_000_000_000;
    let mut cfg = bkp_server::config::ServerConfig { cache_mb: 16, ..Default::default() };
    cfg.jobs.record_days = 30;
    let server = bkp_tests::TestServer::start_with(cfg);
    let state = server.state();
    let store = state.store().clone();
    let old = |days: u64| JobRecord {
        kind: JobKind::Prune,
        start_ns: now_ns() - days * DAY,
        end_ns: now_ns() - days * DAY,
        ok: true,
        dry_run: false,
        error: None,
        figures: None,
        refused: false,
    };
    for days in [400, 31, 29, 1] {
        store.put_job(&old(days)).unwrap();
    }
    assert_eq!(store.jobs(100).unwrap().len(), 4);
    let rec = bkp_server::jobs::run(&state.jobs(&state.config()), JobKind::Gc, false, &GcHooks::default());
    assert!(rec.ok, "{rec:?}");
    let ages: Vec<u64> = store.jobs(100).unwrap().iter().map(|r| (now_ns() - r.start_ns) / DAY).collect();
    assert_eq!(ages, [0, 1, 29], "the gc run's own record and the two younger than 30 days: {ages:?}");
}

#[test]
fn a_push_whose_touched_ids_overflow_the_budget_survives_a_gc_before_its_commit() {
    use bkp_common::protocol::Role;
    let mut cfg = bkp_server::config::ServerConfig { cache_mb: 16, ..Default::default() };
    // No room for exact sets at all: every touched id goes to the filter.
    cfg.limits.touched_mb = 0;
    let server = bkp_tests::TestServer::start_with(cfg);
    let push = server.token("web01", Role::Push);
    let data = random_bytes(3 << 20, 5);
    let chunks: Vec<Vec<u8>> = bkp_common::chunker::chunk_reader(&data[..]).map(|c| c.unwrap()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let c = server.client(&push).await;
        let session = c.start_push("db", SnapshotKind::Stream).await.unwrap();
        let blobs: Vec<(ChunkId, Vec<u8>)> = chunks.iter().map(|x| (ChunkId::of(x), blob::encode(x, 3))).collect();
        c.put(session, blobs).await.unwrap();
        // Nothing references the uploads yet; GC runs to the end.
        let r = gc::run(server.state().store().as_ref(), server.state().sessions(), &GcHooks::default()).unwrap();
        assert_eq!(r.chunks_deleted, 0, "the filter fenced every upload: {r:?}");
        // The commit proves them from the store (the filter proves nothing).
        let parts: Vec<&[u8]> = chunks.iter().map(|x| x.as_slice()).collect();
        let tree = encode_tree(&file_entries(b"s", &data, &parts));
        let tid = ChunkId::of(&tree);
        c.put(session, vec![(tid, blob::encode(&tree, 3))]).await.unwrap();
        c.commit(session, vec![tid], None).await.unwrap();
    });
    assert!(server.state().sessions().touched_bytes() <= 64, "the session ended, its filter went");
    let out = bkp_tests::ok(server.bkp(&push).args(["restore", "latest", "--stdout"]));
    assert!(out.stdout == data);
}
