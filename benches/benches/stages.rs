//! Throughput of each CPU stage of the data path, on 64 MiB of
//! dump-like text and of random bytes.

use bkp_common::{blob, chunker, ChunkId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![("text", bkp_tests::dump_like(1_400_000, 1)), ("random", bkp_tests::random_bytes(64 << 20, 2))]
}

fn stages(c: &mut Criterion) {
    let mut g = c.benchmark_group("stages");
    g.sample_size(10);
    for (name, data) in inputs() {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::new("fastcdc", name), &data, |b, d| b.iter(|| chunker::cut_points(d).len()));
        g.bench_with_input(BenchmarkId::new("blake3", name), &data, |b, d| {
            b.iter(|| d.chunks(1 << 20).map(ChunkId::of).count())
        });
        g.bench_with_input(BenchmarkId::new("zstd3_encode", name), &data, |b, d| {
            b.iter(|| d.chunks(1 << 20).map(|c| blob::encode(c, 3).len()).sum::<usize>())
        });
        let blobs: Vec<Vec<u8>> = data.chunks(1 << 20).map(|c| blob::encode(c, 3)).collect();
        g.bench_with_input(BenchmarkId::new("decode", name), &blobs, |b, bl| {
            b.iter(|| bl.iter().map(|x| blob::decode(x).unwrap().len()).sum::<usize>())
        });
    }
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
