//! Benchmarks live in `benches/`: `stages` (criterion, per stage),
//! `store` (criterion, the RocksDB chunk store holding millions of chunks)
//! and `e2e` (push and restore over loopback QUIC, printing MB/s), and
//! `gc_cost` (bytes a GC rewrites against store size and garbage). The
//! comparison with restic and borg on real data is `make bench`
//! (scripts/bench/, docs/BENCH.md).
