//! The chunk store under load: the has-chunk query, batched chunk inserts
//! and chunk reads against a RocksDB store (the server's `RocksStore`, on a
//! temporary directory) that already holds millions of chunks.
//!
//! Setup inserts `BKP_BENCH_STORE_CHUNKS` (default 2,000,000) synthetic
//! chunks of 40 bytes, each with its possession record for host "bench",
//! in batches of 4096 (about a minute), plus 64 chunks of 1 MiB for the
//! large-read case. Blobs are stored uncompressed (codec 0) so that setup
//! time goes to the store, not to zstd.
//!
//! Batch sizes follow the server: `host_has` answers up to 8192 ids per
//! request (benched with 1024), uploads are stored 16 chunks per
//! `put_chunks`, and a fetch asks for up to 64 chunks.

use std::time::{Duration, Instant};

use bkp_common::{blob, ChunkId};
use bkp_server::store::rocks::RocksStore;
use bkp_server::store::{ChunkStore, VerifiedChunk};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};

const HOST: &str = "bench";
const CACHE_BYTES: usize = 128 << 20; // the server's default cache_mb
const BIG: usize = 1 << 20;

/// A stored-codec blob (see bkp_common::blob's format) of the raw bytes.
fn stored_blob(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(blob::HEADER_LEN + data.len());
    b.extend_from_slice(blob::MAGIC);
    b.push(blob::VERSION);
    b.push(0); // Codec::Stored
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// Synthetic chunk number `n`: distinct content, so a distinct id.
fn small_chunk(n: u64) -> VerifiedChunk {
    let mut data = [0u8; 40];
    data[..8].copy_from_slice(&n.to_le_bytes());
    data[8..16].copy_from_slice(b"bkpbench");
    VerifiedChunk::verify(ChunkId::of(&data), stored_blob(&data)).expect("valid blob")
}

fn big_chunk(n: u64) -> VerifiedChunk {
    let mut data = vec![0u8; BIG];
    StdRng::seed_from_u64(n).fill(&mut data[..]);
    VerifiedChunk::verify(ChunkId::of(&data), stored_blob(&data)).expect("valid blob")
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: RocksStore,
    ids: Vec<ChunkId>,
    big_ids: Vec<ChunkId>,
    next: u64,
}

fn fixture() -> Fixture {
    let n: u64 = std::env::var("BKP_BENCH_STORE_CHUNKS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    // TMPDIR decides where; it must hold a few GB (setup and 1 MiB inserts).
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RocksStore::open(dir.path(), CACHE_BYTES).expect("open store");
    let t = Instant::now();
    let mut ids = Vec::with_capacity(n as usize);
    let mut i = 0;
    while i < n {
        let batch: Vec<VerifiedChunk> = (i..(i + 4096).min(n)).map(small_chunk).collect();
        ids.extend(batch.iter().map(|c| *c.id()));
        store.put_chunks(HOST, &batch).expect("put");
        i += batch.len() as u64;
    }
    let big: Vec<VerifiedChunk> = (0..64).map(big_chunk).collect();
    let big_ids = big.iter().map(|c| *c.id()).collect();
    for b in big.chunks(16) {
        store.put_chunks(HOST, b).expect("put");
    }
    // A commit flushes what was written without the WAL: the big chunks
    // are read from blob files, as in a store that has been running.
    let flush = bkp_common::snapshot::Snapshot {
        host: HOST.into(),
        name: "flush".into(),
        time_ns: 1,
        kind: bkp_common::snapshot::SnapshotKind::Stream,
        stats: Default::default(),
        tree: vec![],
        client: "bench".into(),
    };
    store.commit_snapshot(&flush, None).expect("commit");
    eprintln!(
        "store fixture: {n} chunks + 64 x 1 MiB in {:.1} s, {} MB on disk",
        t.elapsed().as_secs_f64(),
        store.disk_bytes().unwrap_or(0) / 1_000_000
    );
    Fixture { _dir: dir, store, ids, big_ids, next: 1 << 40 }
}

fn store(c: &mut Criterion) {
    let mut f = fixture();
    let mut rng = StdRng::seed_from_u64(7);
    let mut g = c.benchmark_group("store");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));

    const Q: usize = 1024;
    g.throughput(Throughput::Elements(Q as u64));
    // Known chunks at random positions: the incremental-backup case.
    g.bench_function(BenchmarkId::new("has_chunk", "hit_1024"), |b| {
        b.iter_batched(
            || (0..Q).map(|_| f.ids[rng.gen_range(0..f.ids.len())]).collect::<Vec<_>>(),
            |q| assert!(f.store.host_has(HOST, &q).unwrap().iter().all(|&h| h)),
            BatchSize::SmallInput,
        )
    });
    // Known chunks kept in blob files (1 MiB each): since `host_has` also
    // looks up the data itself, what that lookup costs for large chunks.
    g.throughput(Throughput::Elements(64));
    g.bench_function(BenchmarkId::new("has_chunk", "hit_64x1MiB"), |b| {
        b.iter(|| assert!(f.store.host_has(HOST, &f.big_ids).unwrap().iter().all(|&h| h)))
    });
    g.throughput(Throughput::Elements(Q as u64));
    // The previous snapshot's references, proven in bulk at the start of
    // an incremental push (`commit::parent_refs`): 78,000 sorted ids, as
    // many as the linux-source tree has.
    let mut parent: Vec<ChunkId> = f.ids.iter().step_by((f.ids.len() / 78_000).max(1)).copied().collect();
    parent.sort_unstable();
    g.throughput(Throughput::Elements(parent.len() as u64));
    g.bench_function(BenchmarkId::new("stored_sorted", "78000"), |b| {
        b.iter(|| assert!(f.store.stored_sorted(&parent).unwrap().iter().all(|&s| s)))
    });
    g.throughput(Throughput::Elements(Q as u64));
    // Unknown chunks: the first-backup case (bloom filters should answer).
    g.bench_function(BenchmarkId::new("has_chunk", "miss_1024"), |b| {
        b.iter_batched(
            || (0..Q).map(|_| ChunkId::of(&rng.gen::<[u8; 16]>())).collect::<Vec<_>>(),
            |q| assert!(!f.store.host_has(HOST, &q).unwrap().iter().any(|&h| h)),
            BatchSize::SmallInput,
        )
    });

    // Inserts of new chunks, 16 per call as the server batches uploads.
    g.throughput(Throughput::Elements(16));
    g.bench_function(BenchmarkId::new("put_chunks", "16x40B"), |b| {
        b.iter_batched(
            || {
                f.next += 16;
                (f.next - 16..f.next).map(small_chunk).collect::<Vec<_>>()
            },
            |batch| f.store.put_chunks(HOST, &batch).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes(16 * BIG as u64));
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("put_chunks", "16x1MiB"), |b| {
        b.iter_batched(
            || {
                f.next += 16;
                (f.next - 16..f.next).map(big_chunk).collect::<Vec<_>>()
            },
            |batch| f.store.put_chunks(HOST, &batch).unwrap(),
            BatchSize::PerIteration,
        )
    });

    // Reads, 64 per round as one restore fetch.
    g.sample_size(20);
    g.throughput(Throughput::Elements(64));
    g.bench_function(BenchmarkId::new("chunk_blob", "64x40B_random"), |b| {
        b.iter_batched(
            || (0..64).map(|_| f.ids[rng.gen_range(0..f.ids.len())]).collect::<Vec<_>>(),
            |q| q.iter().map(|id| f.store.chunk_blob(id).unwrap().expect("stored").len()).sum::<usize>(),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes(64 * BIG as u64));
    g.bench_function(BenchmarkId::new("chunk_blob", "64x1MiB"), |b| {
        b.iter(|| f.big_ids.iter().map(|id| f.store.chunk_blob(id).unwrap().expect("stored").len()).sum::<usize>())
    });
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
