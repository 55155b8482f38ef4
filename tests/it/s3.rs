//! Chunk data on S3 (issue 18), against a real SeaweedFS on loopback.

use bkp_tests::seaweed::Seaweed;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};

/// The harness's SeaweedFS listens on loopback only (every one of its
/// ports), and answers signed S3 calls: PUT, GET, a ranged GET, and a
/// create-only PUT of an existing key refused.
#[test]
fn seaweed_binds_loopback_only_and_answers_s3() {
    let weed = Seaweed::start("harness");
    let addrs = weed.listening();
    assert!(addrs.len() >= 8, "weed listens on its S3, filer, master and volume ports: {addrs:?}");
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "weed listens beyond loopback: {addrs:?}");
    assert!(addrs.iter().any(|a| a.port() == weed.s3_port));
    let store = weed.store();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let p = Path::from("a/b");
        store.put(&p, b"0123456789".to_vec().into()).await.unwrap();
        assert_eq!(&store.get(&p).await.unwrap().bytes().await.unwrap()[..], b"0123456789");
        assert_eq!(&store.get_range(&p, 2..5).await.unwrap()[..], b"234");
        let again = store.put_opts(&p, b"other".to_vec().into(), PutOptions::from(PutMode::Create)).await;
        assert!(matches!(again, Err(object_store::Error::AlreadyExists { .. })), "{again:?}");
        assert_eq!(&store.get(&p).await.unwrap().bytes().await.unwrap()[..], b"0123456789");
    });
}

/// The object layer on SeaweedFS: create-only puts (a second put of the
/// same name is "existed", the first bytes stay), ranged GETs merged and
/// in flight together, listing under the prefix, batch deletes, and the
/// lease: a second holder is refused while the first renews it with
/// If-Match, and a stale holder's renewal is refused (SeaweedFS honours
/// If-None-Match and If-Match on PUT).
#[test]
fn object_layer_and_lease_on_seaweedfs() {
    use bkp_server::store::object::lease::{Lease, LeaseError};
    use bkp_server::store::object::{Created, Objects, RetryPolicy};
    use std::time::{Duration, SystemTime};

    let weed = Seaweed::start("objects");
    let o = Objects::new(weed.store(), "site-a", RetryPolicy::default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(o.put_new("packs/p1", data.clone().into()).await.unwrap(), Created::New);
        assert_eq!(o.put_new("packs/p1", b"other".to_vec().into()).await.unwrap(), Created::Existed);
        assert_eq!(o.get("packs/p1").await.unwrap().len(), data.len(), "the first write stays");
        let ranges = [150_000..150_010, 10..20, 20..30, 99_999..100_001];
        let got = o.get_ranges("packs/p1", &ranges, 0, 16).await.unwrap();
        for (r, g) in ranges.iter().zip(&got) {
            assert_eq!(&g[..], &data[r.start as usize..r.end as usize]);
        }
        o.put_new("packs/p2", b"x".to_vec().into()).await.unwrap();
        let other = Objects::new(weed.store(), "site-b", RetryPolicy::default());
        other.put_new("packs/p9", b"y".to_vec().into()).await.unwrap();
        let listed = o.list("packs").await.unwrap();
        assert_eq!(listed, vec![("packs/p1".into(), data.len() as u64), ("packs/p2".into(), 1)]);
        o.delete(&["packs/p2".into(), "packs/gone".into()]).await.unwrap();
        assert_eq!(o.list("packs").await.unwrap().len(), 1);
        assert_eq!(other.list("packs").await.unwrap().len(), 1, "another prefix is untouched");

        let t0 = SystemTime::now();
        let ttl = Duration::from_secs(120);
        let mut a = Lease::acquire(&o, "server-a", ttl, t0).await.unwrap();
        let e = Lease::acquire(&o, "server-b", ttl, t0).await.unwrap_err();
        assert!(matches!(e, LeaseError::Held { .. }), "{e}");
        a.renew(t0 + Duration::from_secs(10)).await.unwrap();
        // Another prefix of the same bucket is free.
        Lease::acquire(&other, "server-b", ttl, t0).await.unwrap();
        // Taken over after expiry: the old holder's If-Match renewal fails.
        let b = Lease::acquire(&o, "server-b", ttl, t0 + Duration::from_secs(200)).await.unwrap();
        assert!(matches!(a.renew(t0 + Duration::from_secs(201)).await, Err(LeaseError::Lost { .. })));
        b.release().await.unwrap();
        Lease::acquire(&o, "server-c", ttl, t0 + Duration::from_secs(202)).await.unwrap();
    });
}
