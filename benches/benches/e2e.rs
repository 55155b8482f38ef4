//! End to end over loopback QUIC: push and restore of a dump-like stream
//! and of random bytes through a real server and RocksDB. Prints MB/s.
//! `BKP_BENCH_MB` sets the size of each input (default 256). Each input
//! runs plain and sealed (client-side encryption, `-seal`), so the two
//! compare on one machine at one time.

use std::sync::Arc;
use std::time::Instant;

use bkp_client::progress::Silent;
use bkp_client::push::{push, PushOptions, Source};
use bkp_client::restore::{restore, RestoreOptions};
use bkp_common::protocol::Role;
use bkp_tests::TestServer;

fn main() {
    let mb: usize = std::env::var("BKP_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let server = TestServer::start();
    let token = server.token("bench", Role::Push);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ring = Arc::new(bkp_client::crypt::Keyring::new("bench".into(), &[[7; 32]]));
    // Restores open sealed chunks with the process's keyring.
    bkp_client::crypt::use_keyring(ring.clone());
    let inputs = [
        ("dump", bkp_tests::dump_like(mb * 1_000_000 / 46, 3), false),
        ("dump-seal", bkp_tests::dump_like(mb * 1_000_000 / 46, 13), true),
        ("random", bkp_tests::random_bytes(mb << 20, 4), false),
        ("random-seal", bkp_tests::random_bytes(mb << 20, 14), true),
    ];
    println!("{:<12} {:>8} {:>14} {:>14} {:>14}", "input", "MB", "push MB/s", "repush MB/s", "restore MB/s");
    for (name, data, sealed) in inputs {
        let ids = if sealed { bkp_client::crypt::ChunkIds::Sealed(ring.clone()) } else { Default::default() };
        let len = data.len();
        let data = Arc::new(data);
        let run_push = |d: Arc<Vec<u8>>| {
            rt.block_on(async {
                let c = server.client(&token).await;
                let t = Instant::now();
                let opts = PushOptions {
                    name: name.to_string(),
                    source: Source::Reader(Box::new(std::io::Cursor::new(d.as_ref().clone()))),
                    zstd_level: 3,
                    ids: ids.clone(),
                };
                let r = push(c, opts, Arc::new(Silent)).await.unwrap();
                (t.elapsed().as_secs_f64(), r.snapshot.id)
            })
        };
        let (first, id) = run_push(data.clone());
        let (second, _) = run_push(data.clone());
        let target = tempfile::tempdir().unwrap();
        let restore_s = rt.block_on(async {
            let c = server.client(&token).await;
            let t = Instant::now();
            let opts = RestoreOptions { target: Some(target.path().to_path_buf()), include: vec![], exclude: vec![] };
            restore(c, id, opts, Arc::new(Silent)).await.unwrap();
            t.elapsed().as_secs_f64()
        });
        assert!(std::fs::read(target.path().join(name)).unwrap() == *data, "restore differs");
        let m = len as f64 / 1e6;
        println!("{:<12} {:>8.0} {:>14.1} {:>14.1} {:>14.1}", name, m, m / first, m / second, m / restore_s);
    }
}
