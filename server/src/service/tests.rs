//! The service layer in process: a real RocksDB store in a temporary
//! directory, real sessions, no sockets.

use std::time::Duration;

use bkp_common::protocol::{ErrorCode, Role, MAX_FETCH, MAX_IDS};
use bkp_common::snapshot::SnapshotKind;
use bkp_common::tree::{ChunkRef, Entry, Meta, TreeEncoder};
use bkp_common::{blob, ChunkId, ContentHash};

use super::{admin, push, read, Caller, ServiceError};
use crate::push_failures::{self, PushFailures};
use crate::sessions::{SessionError, Sessions};
use crate::store::rocks::RocksStore;
use crate::store::ChunkStore;

struct World {
    _dir: tempfile::TempDir,
    store: RocksStore,
    sessions: Sessions,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(&dir.path().join("db"), 8 << 20).unwrap();
    World { _dir: dir, store, sessions: Sessions::new(Duration::from_secs(3600)) }
}

fn caller(host: &str, role: Role) -> Caller {
    Caller { host: host.into(), role, token_id: format!("tok-{host}"), client: "test".into() }
}

/// A chunk as a client uploads it: its id and its compressed blob.
fn chunk(data: &[u8]) -> (ChunkId, Vec<u8>) {
    (ChunkId::of(data), blob::encode(data, 3))
}

/// A one-file tree, as one tree chunk, referencing `data`'s chunk.
fn tree_of(path: &str, data: &[u8]) -> (ChunkId, Vec<u8>) {
    let mut enc = TreeEncoder::new();
    enc.push(&Entry::File { path: path.as_bytes().to_vec(), meta: Meta::default(), size: data.len() as u64 });
    enc.push(&Entry::Chunks(vec![ChunkRef { id: ChunkId::of(data), len: data.len() as u32 }]));
    enc.push(&Entry::FileEnd { hash: ContentHash::from(blake3::hash(data)) });
    chunk(&enc.take())
}

impl World {
    /// Uploads `data` as file `path` of `host`'s set `name` and commits.
    fn push_file(&self, c: &Caller, name: &str, path: &str, data: &[u8]) -> Result<ChunkId, ServiceError> {
        let s = push::start(&self.sessions, c, name, SnapshotKind::Tree)?;
        let (tree, data) = (tree_of(path, data), chunk(data));
        push::put_batch(&self.store, &self.sessions, c, s, vec![data.clone(), tree.clone()])?;
        push::commit(&self.store, &self.sessions, c, s, vec![tree.0], None, 0)?.result?;
        Ok(data.0)
    }
}

#[test]
fn a_push_session_stores_its_chunks_and_commits() {
    let w = world();
    let a = caller("a", Role::Push);
    let data = b"the file's content".repeat(50);
    let (file, tree) = (chunk(&data), tree_of("etc/motd", &data));
    let ids = [file.0, tree.0];

    let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    assert_eq!(push::has_chunks(&w.store, &w.sessions, &a, s, &ids).unwrap(), [0, 1], "nothing stored yet");
    push::open_upload(&w.sessions, &a, s).unwrap();
    let stats = push::put_batch(&w.store, &w.sessions, &a, s, vec![file.clone(), tree.clone()]).unwrap();
    assert_eq!(stats.new_chunks, 2);
    assert!(push::has_chunks(&w.store, &w.sessions, &a, s, &ids).unwrap().is_empty(), "both proven by the upload");

    let out = push::commit(&w.store, &w.sessions, &a, s, vec![tree.0], None, 0).unwrap();
    assert_eq!(out.set, "etc");
    let summary = out.result.unwrap();
    assert_eq!((summary.host.as_str(), summary.stats.files, summary.stats.bytes), ("a", 1, data.len() as u64));
    let listed = read::list(&w.store, &a, None, None).unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [summary.id]);
    assert_eq!(read::snapshot(&w.store, &a, &summary.id).unwrap().tree, [tree.0]);
    // The session ended with its commit.
    let again = push::commit(&w.store, &w.sessions, &a, s, vec![tree.0], None, 0).unwrap();
    assert!(matches!(again.result, Err(ServiceError::Session(SessionError::Unknown))));
    assert_eq!(again.set, "", "no set for a session that is not there");

    // A second push of the same data by the same host uploads nothing;
    // another host holding none of it is told to upload everything.
    let s2 = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    assert!(push::has_chunks(&w.store, &w.sessions, &a, s2, &ids).unwrap().is_empty());
    let b = caller("b", Role::Push);
    let sb = push::start(&w.sessions, &b, "etc", SnapshotKind::Tree).unwrap();
    assert_eq!(push::has_chunks(&w.store, &w.sessions, &b, sb, &ids).unwrap(), [0, 1]);

    // The data reads back through a fetch.
    read::authorize_fetch(&w.store, &a, &ids).unwrap();
    let blobs = read::read_blobs(&w.store, &ids, 1 << 20).unwrap();
    assert_eq!(blob::decode_verified(blobs[0].as_ref().unwrap(), &file.0).unwrap(), data);
}

#[test]
fn a_chunk_that_does_not_hash_to_its_id_is_refused() {
    let w = world();
    let a = caller("a", Role::Push);
    let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    let good = chunk(b"good data");
    // The id of one content with the blob of another.
    let poisoned = (ChunkId::of(b"what the id says"), blob::encode(b"something else", 3));
    let e = push::put_batch(&w.store, &w.sessions, &a, s, vec![good.clone(), poisoned.clone()]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Rejected);
    assert!(e.to_string().starts_with(&format!("chunk {} refused", poisoned.0.short())), "{e}");
    assert!(!e.retryable());
    // The whole batch was refused before anything was written.
    assert_eq!(w.store.chunk_blob(&poisoned.0).unwrap(), None);
    assert_eq!(w.store.chunk_blob(&good.0).unwrap(), None);
    assert_eq!(push::has_chunks(&w.store, &w.sessions, &a, s, &[good.0, poisoned.0]).unwrap(), [0, 1]);
    // Garbage that is no blob at all is refused the same way.
    let e = push::put_batch(&w.store, &w.sessions, &a, s, vec![(good.0, b"not a blob".to_vec())]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Rejected, "{e}");
}

#[test]
fn a_commit_referencing_a_chunk_the_host_never_proved_is_refused() {
    let w = world();
    let (a, b) = (caller("a", Role::Push), caller("b", Role::Push));
    let secret = b"host b's secret".repeat(20);
    // Host b stores the chunk; host a knows (or guesses) its id.
    let sid = w.push_file(&b, "home", "secret.txt", &secret).unwrap();
    let s = push::start(&w.sessions, &a, "steal", SnapshotKind::Tree).unwrap();
    assert_eq!(push::has_chunks(&w.store, &w.sessions, &a, s, &[sid]).unwrap(), [0], "b's chunk is not a's");
    // A crafted tree naming it, uploaded without the chunk itself.
    let tree = tree_of("loot", &secret);
    push::put_batch(&w.store, &w.sessions, &a, s, vec![tree.clone()]).unwrap();
    let out = push::commit(&w.store, &w.sessions, &a, s, vec![tree.0], None, 0).unwrap();
    assert_eq!(out.set, "steal");
    let e = out.result.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Rejected);
    assert!(
        e.to_string().contains(&format!("chunk {} is referenced but is not stored for host a", sid.short())),
        "{e}"
    );
    assert!(read::list(&w.store, &a, None, None).unwrap().is_empty(), "nothing committed");
    // With the chunk uploaded by a itself, the same tree commits.
    push::put_batch(&w.store, &w.sessions, &a, s, vec![chunk(&secret)]).unwrap();
    push::commit(&w.store, &w.sessions, &a, s, vec![tree.0], None, 0).unwrap().result.unwrap();
}

#[test]
fn a_commit_listing_a_tree_chunk_too_often_is_refused_before_any_is_read() {
    let w = world();
    let a = caller("a", Role::Push);
    let (file, tree) = (chunk(b"data"), tree_of("f", b"data"));
    let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    push::put_batch(&w.store, &w.sessions, &a, s, vec![file, tree.clone()]).unwrap();
    // Each repeat would be read, decompressed and walked again, for free.
    let many = vec![tree.0; crate::commit::MAX_TREE_REPEATS + 2];
    let e = push::commit(&w.store, &w.sessions, &a, s, many, None, 0).unwrap().result.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Rejected);
    assert!(
        e.to_string().contains(&format!("repeats its chunks {} times", crate::commit::MAX_TREE_REPEATS + 1)),
        "{e}"
    );
    // A chunk the store never had, repeated past the cap: the refusal is
    // the count, so nothing was looked up.
    let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    let gone = ChunkId::of(b"never uploaded");
    let e = push::commit(&w.store, &w.sessions, &a, s, vec![gone; 5000], None, 0).unwrap().result.unwrap_err();
    assert!(e.to_string().contains("repeats its chunks 4999 times"), "{e}");
    // Within the cap the tree is read as usual (and here found missing).
    let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    let e = push::commit(&w.store, &w.sessions, &a, s, vec![gone; 3], None, 0).unwrap().result.unwrap_err();
    assert!(e.to_string().contains("is referenced but is not stored"), "{e}");
}

#[test]
fn a_fetch_of_another_hosts_chunk_is_refused() {
    let w = world();
    let (a, b) = (caller("a", Role::Restore), caller("b", Role::Push));
    let id = w.push_file(&b, "home", "f", b"b's data").unwrap();
    let e = read::authorize_fetch(&w.store, &a, &[id]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);
    assert_eq!(e.to_string(), format!("no chunk {} for this host", id.short()));
    // Its owner and an admin may read it.
    read::authorize_fetch(&w.store, &caller("b", Role::Restore), &[id]).unwrap();
    read::authorize_fetch(&w.store, &caller("ops", Role::Admin), &[id]).unwrap();

    // b's snapshots are absent to a, and a may not list them.
    let snap = read::list(&w.store, &b, None, None).unwrap()[0].id;
    assert_eq!(read::snapshot(&w.store, &a, &snap).unwrap_err().code(), ErrorCode::NotFound);
    match read::list(&w.store, &a, Some("b".into()), None).unwrap_err() {
        ServiceError::Forbidden { audit, .. } => assert!(audit.starts_with("list_snapshots of host b"), "{audit}"),
        e => panic!("{e}"),
    }
    assert!(read::list(&w.store, &a, None, None).unwrap().is_empty(), "a's own listing");
    assert_eq!(read::list(&w.store, &caller("ops", Role::Admin), Some("b".into()), None).unwrap().len(), 1);
}

#[test]
fn a_fetch_stops_at_a_chunk_the_store_lost() {
    let w = world();
    let a = caller("a", Role::Push);
    let id = w.push_file(&a, "etc", "f", b"soon gone").unwrap();
    let other = chunk(b"never stored").0;
    let got = read::read_blobs(&w.store, &[id, other, id], 1 << 20).unwrap();
    assert_eq!(got.len(), 2, "stops at the missing one");
    assert!(got[0].is_some() && got[1].is_none());
    let e = ServiceError::missing_chunk(&other);
    assert_eq!((e.code(), e.to_string().ends_with("run verify")), (ErrorCode::NotFound, true));
    // A read budget cuts a batch after the chunk that reached it.
    assert_eq!(read::read_blobs(&w.store, &[id, id, id], 1).unwrap().len(), 1);
}

#[test]
fn roles_and_caps_are_checked_before_anything_runs() {
    let w = world();
    let r = caller("a", Role::Restore);
    for e in [
        push::start(&w.sessions, &r, "etc", SnapshotKind::Tree).unwrap_err(),
        admin::forget(&w.store, &caller("a", Role::Push), &bkp_common::SnapshotId::of(b"x")).unwrap_err(),
    ] {
        assert_eq!(e.code(), ErrorCode::Forbidden, "{e}");
        let ServiceError::Forbidden { audit, .. } = &e else { panic!("{e}") };
        assert!(
            audit.starts_with("start_push: a restore token") || audit.starts_with("forget: a push token"),
            "{audit}"
        );
    }
    assert_eq!(w.sessions.live(), 0, "no session started for a restore token");
    let e = push::start(&w.sessions, &caller("a", Role::Push), "../x", SnapshotKind::Tree).unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest, "{e}");

    let p = caller("a", Role::Push);
    let s = push::start(&w.sessions, &p, "etc", SnapshotKind::Tree).unwrap();
    let many = vec![ChunkId::of(b"x"); MAX_IDS + 1];
    assert_eq!(push::has_chunks(&w.store, &w.sessions, &p, s, &many).unwrap_err().code(), ErrorCode::BadRequest);
    let many = vec![ChunkId::of(b"x"); MAX_FETCH + 1];
    let e = read::authorize_fetch(&w.store, &caller("ops", Role::Admin), &many).unwrap_err();
    assert_eq!(e.to_string(), format!("more than {MAX_FETCH} chunks in one request"));
    // A session of another host is not the caller's.
    let e = push::has_chunks(&w.store, &w.sessions, &caller("b", Role::Push), s, &[]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Rejected, "{e}");
}

#[test]
fn commit_checks_names_kind_and_the_daily_budget() {
    let w = world();
    let a = caller("a", Role::Push);
    let commit = |path: &str, kind: SnapshotKind, max: u32| {
        let s = push::start(&w.sessions, &a, "etc", kind).unwrap();
        let (tree, data) = (tree_of(path, b"x"), chunk(b"x"));
        push::put_batch(&w.store, &w.sessions, &a, s, vec![tree.clone(), data]).unwrap();
        push::commit(&w.store, &w.sessions, &a, s, vec![tree.0], None, max).unwrap().result
    };
    let e = commit("../../etc/passwd", SnapshotKind::Tree, 0).unwrap_err();
    assert!(e.to_string().contains("a restore would refuse it"), "{e}");
    commit("ok", SnapshotKind::Stream, 0).unwrap();
    commit("ok", SnapshotKind::Tree, 2).unwrap();
    let e = commit("ok", SnapshotKind::Tree, 2).unwrap_err();
    assert!(e.to_string().contains("max_pushes_per_day"), "{e}");
    assert_eq!(read::list(&w.store, &a, None, None).unwrap().len(), 2);
    // An empty tree list is refused, not a panic.
    let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
    assert_eq!(
        push::commit(&w.store, &w.sessions, &a, s, vec![], None, 0).unwrap().result.unwrap_err().code(),
        ErrorCode::Rejected
    );
}

#[test]
fn forget_and_protect() {
    let w = world();
    let (a, ops) = (caller("a", Role::Push), caller("ops", Role::Admin));
    w.push_file(&a, "etc", "f", b"data").unwrap();
    let id = read::list(&w.store, &a, None, None).unwrap()[0].id;
    admin::protect(&w.store, &ops, &id, true).unwrap();
    let e = admin::forget(&w.store, &ops, &id).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Rejected);
    assert!(e.client_message().contains("--remove"), "the client is told how: {}", e.client_message());
    admin::protect(&w.store, &ops, &id, false).unwrap();
    admin::forget(&w.store, &ops, &id).unwrap();
    assert_eq!(admin::forget(&w.store, &ops, &id).unwrap_err().code(), ErrorCode::NotFound);
    assert_eq!(admin::protect(&w.store, &ops, &id, true).unwrap_err().code(), ErrorCode::NotFound);
}

#[test]
fn push_failures_are_recorded_for_the_callers_host() {
    let w = world();
    let table = PushFailures::default();
    let a = caller("a", Role::Push);
    admin::push_failed(&table, &w.store, &a, "pgdump", None, "pg_dump exited 1", 5).unwrap();
    let e = admin::push_failed(&table, &w.store, &a, "bad/name", None, "x", 6).unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest, "{e}");
    let e = admin::push_failed(&table, &w.store, &caller("a", Role::Restore), "pgdump", None, "x", 6).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Forbidden);
    let all = push_failures::all(&table, &w.store);
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].host.as_str(), all[0].count, all[0].reason.as_str()), ("a", 1, "pg_dump exited 1"));
    // Written through to the store: a fresh table reads it back.
    assert_eq!(push_failures::all(&PushFailures::default(), &w.store), all);
}

#[test]
fn errors_say_whether_a_retry_can_help() {
    let busy = ServiceError::Session(SessionError::HostBusy("a".into(), 4));
    assert_eq!((busy.code(), busy.retryable()), (ErrorCode::Busy, true));
    let full = ServiceError::Store(crate::store::StoreError::Full(3));
    assert!(full.retryable() && full.client_message().contains("full"));
    let db = ServiceError::Store(crate::store::StoreError::Db("/srv/db/000123.sst: EIO".into()));
    assert_eq!(db.client_message(), "server storage error (see the server log)", "paths stay on the server");
    let bucket = ServiceError::Store(crate::store::StoreError::Bucket {
        bucket: "backups".into(),
        detail: "PUT packs/ab: connection refused".into(),
    });
    assert!(bucket.retryable() && bucket.client_message().contains("object store (bucket \"backups\")"));
    assert!(!bucket.client_message().contains("packs/"), "object names stay on the server");
    assert!(!ServiceError::Rejected("x".into()).retryable());
    assert!(!ServiceError::Session(SessionError::Expired(60)).retryable());
}

#[test]
fn an_incomplete_commit_is_marked_and_checked() {
    use bkp_common::snapshot::Incomplete;
    let w = world();
    let a = caller("a", Role::Push);
    let commit = |inc: Incomplete| {
        let s = push::start(&w.sessions, &a, "etc", SnapshotKind::Tree).unwrap();
        let (tree, data) = (tree_of("etc/ok", b"readable"), chunk(b"readable"));
        push::put_batch(&w.store, &w.sessions, &a, s, vec![data, tree.clone()]).unwrap();
        push::commit(&w.store, &w.sessions, &a, s, vec![tree.0], Some(inc), 0).unwrap().result
    };
    let inc = Incomplete { skipped: 2, paths: vec!["/etc/shadow".into(), "/etc/gone".into()] };
    let summary = commit(inc.clone()).unwrap();
    assert_eq!(summary.incomplete.as_ref(), Some(&inc));
    let listed = read::list(&w.store, &a, None, None).unwrap();
    assert_eq!(listed[0].incomplete.as_ref(), Some(&inc), "stored on the summary");
    // Over the caps, or inconsistent: refused, nothing stored.
    let many = Incomplete { skipped: 500, paths: vec!["p".into(); 101] };
    assert_eq!(commit(many).unwrap_err().code(), ErrorCode::BadRequest);
    let none = Incomplete { skipped: 0, paths: vec![] };
    assert_eq!(commit(none).unwrap_err().code(), ErrorCode::BadRequest);
    assert_eq!(read::list(&w.store, &a, None, None).unwrap().len(), 1);
}
