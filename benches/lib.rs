//! Benchmarks live in `benches/`: `stages` (criterion, per stage) and
//! `e2e` (push and restore over loopback QUIC, printing MB/s).
