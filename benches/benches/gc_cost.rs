//! What a GC rewrites against the size of the store and the garbage in
//! it (`make bench-gc`): a measurement, not a timed test. A RocksDB store
//! of `BKP_GC_BENCH_MB` (default 1024) MiB of chunk data, 98% in 1 MiB
//! chunks (blob files) and 2% in 8 KiB ones (kept in the SST files), in
//! snapshots of 16 chunks each, flushed 8 snapshots at a time (one blob
//! file per 8); then snapshots are forgotten at random
//! (the garbage spread over every blob file, the hard case for a GC that
//! rewrites by file) and a GC runs after each step:
//!
//! 1. 1% forgotten, the default `[gc] rewrite_garbage_percent` (25);
//! 2. 9% more (10% garbage in all);
//! 3. 20% more (about 30%): past the threshold, blob files are rewritten;
//! 4. 1% more with `rewrite_garbage_percent = 0`: every GC's cost before
//!    this threshold existed (every blob file rewritten).
//!
//! Each row: store bytes before, garbage before (estimated by the store),
//! bytes the GC wrote (`bytes_rewritten`: compactions, relocations
//! included) and their share of the store, live bytes relocated, disk
//! bytes freed, seconds.

use std::time::Duration;

use bkp_common::snapshot::{Snapshot, SnapshotKind, SnapshotStats};
use bkp_common::{blob, ChunkId, SnapshotId};
use bkp_server::gc::{self, GcConfig, GcHooks, GcReport};
use bkp_server::sessions::Sessions;
use bkp_server::store::rocks::RocksStore;
use bkp_server::store::{ChunkStore, MetaStore, VerifiedChunk};
use bkp_tests::{encode_tree, file_entries};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};

const BIG: usize = 1 << 20;
const SMALL: usize = 8 << 10;
const PER_SNAPSHOT: usize = 16;

/// A stored-codec blob (no compression: setup time goes to the store).
fn stored_blob(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(blob::HEADER_LEN + data.len());
    b.extend_from_slice(blob::MAGIC);
    b.push(blob::VERSION);
    b.push(0);
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

fn chunk(data: &[u8]) -> VerifiedChunk {
    VerifiedChunk::verify(ChunkId::of(data), stored_blob(data)).expect("valid blob")
}

fn fill(store: &RocksStore, mib: usize) -> Vec<SnapshotId> {
    let mut rng = StdRng::seed_from_u64(7);
    let small_bytes = mib * BIG / 50;
    let big_count = (mib * BIG - small_bytes) / BIG;
    let mut sizes: Vec<usize> = vec![BIG; big_count];
    sizes.extend(std::iter::repeat_n(SMALL, small_bytes / SMALL));
    sizes.shuffle(&mut rng);
    let mut ids = Vec::new();
    // A blob file per 8 snapshots: their chunks are put and flushed
    // together, then committed (a commit flushes what is pending), so a
    // forgotten snapshot leaves garbage in a file that stays partly live.
    for (b, batch) in sizes.chunks(PER_SNAPSHOT * 8).enumerate() {
        let mut snaps = Vec::new();
        for group in batch.chunks(PER_SNAPSHOT) {
            let datas: Vec<Vec<u8>> = group
                .iter()
                .map(|&len| {
                    let mut d = vec![0u8; len];
                    rng.fill(&mut d[..]);
                    d
                })
                .collect();
            let parts: Vec<&[u8]> = datas.iter().map(|d| d.as_slice()).collect();
            let all = datas.concat();
            let tree = encode_tree(&file_entries(b"f", &all, &parts));
            let mut chunks: Vec<VerifiedChunk> = datas.iter().map(|d| chunk(d)).collect();
            chunks.push(chunk(&tree));
            store.put_chunks("bench", &chunks).expect("put");
            snaps.push((ChunkId::of(&tree), all.len() as u64, group.len() as u64));
        }
        store.persist_chunks().expect("persist");
        for (i, (tree, bytes, data_chunks)) in snaps.into_iter().enumerate() {
            let snap = Snapshot {
                host: "bench".into(),
                name: "n".into(),
                time_ns: 1_000_000 + (b * 8 + i) as u64,
                kind: SnapshotKind::Stream,
                stats: SnapshotStats { files: 1, bytes, data_chunks, ..Default::default() },
                tree: vec![tree],
                client: "bench".into(),
            };
            ids.push(store.commit_snapshot_with(&snap, None).expect("commit").id);
        }
    }
    ids.shuffle(&mut rng);
    ids
}

fn row(step: &str, r: &GcReport) {
    let share = 100.0 * r.bytes_rewritten as f64 / r.disk_bytes_before.max(1) as f64;
    let freed = r.disk_bytes_before.saturating_sub(r.disk_bytes_after);
    println!(
        "{step:<34} {:>10.1} {:>10.1} {:>12.1} {:>8.2}% {:>10.1} {:>10.1} {:>7.1}",
        r.disk_bytes_before as f64 / 1e6,
        r.garbage_bytes_before as f64 / 1e6,
        r.bytes_rewritten as f64 / 1e6,
        share,
        r.bytes_relocated as f64 / 1e6,
        freed as f64 / 1e6,
        r.seconds
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let mib: usize = std::env::var("BKP_GC_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir_in(std::env::var("BKP_GC_BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let store = RocksStore::open(dir.path(), 128 << 20).expect("open store");
    let started = std::time::Instant::now();
    let mut ids = fill(&store, mib);
    eprintln!(
        "store: {} snapshots, {:.0} MB on disk, filled in {:.0} s",
        ids.len(),
        store.disk_bytes().unwrap() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let sessions = Sessions::new(Duration::from_secs(3600));
    let total = ids.len();
    let mut forget = |share: f64| {
        let n = ((total as f64 * share).round() as usize).max(1);
        for id in ids.drain(..n.min(ids.len())) {
            store.delete_snapshot(&id).expect("forget");
        }
    };
    let run = |cfg: &GcConfig| gc::run_with(&store, &sessions, cfg, &GcHooks::default()).expect("gc");
    println!(
        "{:<34} {:>10} {:>10} {:>12} {:>9} {:>10} {:>10} {:>7}",
        "step", "store MB", "garbage MB", "rewritten MB", "of store", "moved MB", "freed MB", "s"
    );
    let default = GcConfig::default();
    forget(0.01);
    row("1% forgotten", &run(&default));
    forget(0.09);
    row("+9% (10%)", &run(&default));
    forget(0.20);
    row("+20% (30%)", &run(&default));
    forget(0.01);
    row("+1%, rewrite_garbage_percent = 0", &run(&GcConfig { rewrite_garbage_percent: 0, ..default }));
}
