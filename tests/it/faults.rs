//! Faults that must never lose a backup quietly: chunk data gone from
//! under its meta, GC over missing chunks, a full disk (for the server
//! and for a restore), a damaged metadata file, a truncated WAL.

// unsafe: statvfs; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_common::tree::{Entry, TreeDecoder};
use bkp_common::{blob, ChunkId, SnapshotId};
use bkp_server::config::ServerConfig;
use bkp_tests::{bin, json, ok, random_bytes, ServerProcess, TestServer};

/// A tmpfs of `mib` MiB, unmounted when dropped. None (with the reason
/// printed) where mounting is not allowed.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self(dir)),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn free(&self) -> u64 {
        let st = nix_free(self.path());
        st.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// (free, total) bytes of the file system holding `p`.
fn nix_free(p: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs that outlives the call.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_bavail as u64 * st.f_frsize as u64, st.f_blocks as u64 * st.f_frsize as u64)
}

/// Fills the file system holding `dir` until `leave` bytes are free.
fn fill(dir: &Path, name: &str, leave: u64) -> PathBuf {
    let p = dir.join(name);
    let free = nix_free(dir).0;
    let f = fs::File::create(&p).unwrap();
    let len = free.saturating_sub(leave);
    // Written, not sparse: the blocks must really be taken.
    let block = vec![0x5au8; 1 << 20];
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        if w.write_all(&block[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = w.flush();
    p
}

/// A small tree: 13 small files and one of several chunks.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub")).unwrap();
    for i in 0..13u64 {
        fs::write(root.join(format!("sub/f{i}")), random_bytes(20_000 + i as usize, i)).unwrap();
    }
    fs::write(root.join("big"), random_bytes(3 << 20, 77)).unwrap();
}

fn push_tree(server: &TestServer, token: &Path, name: &str, root: &Path) -> serde_json::Value {
    json(&ok(server.bkp(token).args(["push", "--json", "--no-cache", "--name", name]).arg(root)))
}

/// Restores snapshot `id` into a new directory and compares it with `root`.
fn assert_restores(server: &TestServer, token: &Path, id: &str, root: &Path) {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("r");
    ok(server.bkp(token).args(["restore", id, "--target"]).arg(&target));
    // A tree is restored under its absolute path.
    let restored = target.join(root.strip_prefix("/").unwrap());
    for e in walk(root) {
        let rel = e.strip_prefix(root).unwrap();
        assert_eq!(fs::read(&e).unwrap(), fs::read(restored.join(rel)).unwrap(), "{}", rel.display());
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every data chunk the snapshot references, in tree order.
fn data_chunks(server: &TestServer, id: &str) -> Vec<ChunkId> {
    let store = server.state().store().clone();
    let snap = store.snapshot(&id.parse::<SnapshotId>().unwrap()).unwrap().unwrap();
    let mut dec = TreeDecoder::new();
    let mut out = Vec::new();
    for t in &snap.tree {
        dec.feed(&blob::decode(&store.chunk_blob(t).unwrap().unwrap()).unwrap());
        while let Some(e) = dec.next_entry().unwrap() {
            if let Entry::Chunks(refs) = e {
                out.extend(refs.iter().map(|r| r.id));
            }
        }
    }
    out
}

fn open_raw(db: &Path) -> rocksdb::DB {
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), db).unwrap();
    rocksdb::DB::open_cf(&rocksdb::Options::default(), db, &cfs).unwrap()
}

/// As a lost blob file leaves it: the chunk's data gone, its meta kept.
fn delete_chunk_data(server: &mut TestServer, id: &ChunkId) {
    server.stop();
    let db = open_raw(&server.data().join("db"));
    let chunks = db.cf_handle("chunks").unwrap();
    assert!(db.get_cf(chunks, id.as_bytes()).unwrap().is_some());
    db.delete_cf(chunks, id.as_bytes()).unwrap();
    assert!(db.get_cf(db.cf_handle("chunk_meta").unwrap(), id.as_bytes()).unwrap().is_some());
    drop(db);
    server.restart();
}

#[test]
fn a_chunk_whose_data_is_gone_is_uploaded_again() {
    let mut server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    make_tree(&root);
    let first = push_tree(&server, &token, "a", &root);
    let id = first["snapshot"]["id"].as_str().unwrap().to_string();
    let chunks = data_chunks(&server, &id);
    assert!(chunks.len() >= 14, "{first}");

    // Another set: no previous snapshot, so every answer is a lookup.
    let stored_len =
        |s: &TestServer, id: &ChunkId| s.state().store().chunk_meta(id).unwrap().unwrap().stored_len as u64;
    let lost = stored_len(&server, &chunks[3]);
    delete_chunk_data(&mut server, &chunks[3]);
    let other = push_tree(&server, &token, "b", &root);
    // The lost chunk, and the tree chunk when it changed (a file's atime
    // moves when the first push reads it).
    assert!(other["chunks_sent"].as_u64().unwrap() <= 2, "{other}");
    assert!(other["bytes_sent"].as_u64().unwrap() >= lost, "the lost chunk is uploaded again: {other}");
    assert_restores(&server, &token, other["snapshot"]["id"].as_str().unwrap(), &root);

    // The same set: the previous snapshot's chunks are proven in bulk,
    // which must not count the lost one either.
    let lost = stored_len(&server, &chunks[5]);
    delete_chunk_data(&mut server, &chunks[5]);
    let again = push_tree(&server, &token, "a", &root);
    assert!(again["chunks_sent"].as_u64().unwrap() <= 2, "{again}");
    assert!(again["bytes_sent"].as_u64().unwrap() >= lost, "the lost chunk is uploaded again: {again}");
    assert_restores(&server, &token, again["snapshot"]["id"].as_str().unwrap(), &root);
}

#[test]
fn gc_refuses_while_referenced_chunks_are_missing() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let data = random_bytes(3 << 20, 5);
    let id = server.push_stdin(&token, "s", &data)["snapshot"]["id"].as_str().unwrap().to_string();
    let lost = data_chunks(&server, &id)[0];
    // What verify does with a chunk it finds bad.
    server.state().store().quarantine_chunk(&lost, "test: lost", 1).unwrap();

    let out = Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(server.data()).output().unwrap();
    assert!(!out.status.success(), "gc must fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 chunk(s)") && err.contains(&lost.short()) && err.contains("verify"), "{err}");
    let rec = json(&out);
    assert_eq!(rec["ok"], false, "{rec}");
    let jobs = json(&server.admin(&["jobs", "--json"]));
    assert_eq!(jobs[0]["kind"], "gc");
    assert_eq!(jobs[0]["ok"], false, "recorded as failed: {jobs}");
    assert!(jobs[0]["error"].as_str().unwrap().contains("push again"), "{jobs}");
}

#[test]
fn a_full_disk_refuses_writes_then_resumes_without_a_restart() {
    let Some(fs_) = Tmpfs::mount(64) else { return };
    let server = TestServer::start_in(fs_.path(), ServerConfig { cache_mb: 16, ..Default::default() });
    let token = server.token("web01", Role::Push);
    let small = random_bytes(1 << 20, 1);
    let small_id = server.push_stdin(&token, "small", &small)["snapshot"]["id"].as_str().unwrap().to_string();

    let filler = fill(fs_.path(), "filler", 24 << 20);
    let big = random_bytes(30 << 20, 2);
    let mut child = server
        .bkp(&token)
        .args(["push", "--json", "--stdin", "--name", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(&big);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the push cannot fit");
    assert!(err.contains("server storage is full (") && err.contains("MiB free)"), "{err}");
    assert!(!err.contains("/db/"), "no server paths in client errors: {err}");

    // Reads go on while the disk is full.
    assert_eq!(ok(server.bkp(&token).args(["restore", &small_id, "--stdout"])).stdout, small);

    // Space comes back (the operator deletes something): writes resume,
    // with no restart.
    fs::remove_file(filler).unwrap();
    let id = server.push_stdin(&token, "big", &big)["snapshot"]["id"].as_str().unwrap().to_string();
    assert_eq!(ok(server.bkp(&token).args(["restore", &id, "--stdout"])).stdout, big);
    assert!(fs_.free() > 0);
}

/// Bytes of the database directory, the reserve left out.
fn db_bytes(data: &Path) -> u64 {
    fs::read_dir(data.join("db"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "bkp-reserve")
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[test]
fn gc_on_a_nearly_full_disk_reports_only_what_it_freed() {
    let Some(fs_) = Tmpfs::mount(64) else { return };
    let server = TestServer::start_in(fs_.path(), ServerConfig { cache_mb: 16, ..Default::default() });
    let (push, admin) = (server.token("web01", Role::Push), server.token("ops", Role::Admin));
    let gone =
        server.push_stdin(&push, "old", &random_bytes(12 << 20, 3))["snapshot"]["id"].as_str().unwrap().to_string();
    let kept = random_bytes(2 << 20, 4);
    let kept_id = server.push_stdin(&push, "new", &kept)["snapshot"]["id"].as_str().unwrap().to_string();
    ok(server.bkp(&admin).args(["forget", &gone]));

    let (_, total) = nix_free(fs_.path());
    let _filler = fill(fs_.path(), "filler", total / 100);
    let before = db_bytes(server.data());
    let out = Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(server.data()).output().unwrap();
    let after = db_bytes(server.data());
    let rec = json(&out);
    eprintln!("gc on a 99% full disk: {rec}");
    let f = &rec["figures"];
    if out.status.success() {
        let freed = f["bytes_freed"].as_u64().unwrap();
        assert_eq!(freed, f["disk_bytes_before"].as_u64().unwrap() - f["disk_bytes_after"].as_u64().unwrap());
        assert!(freed <= before.saturating_sub(after) + (1 << 20), "reported {freed}, disk went {before} -> {after}");
        assert!(freed >= 8 << 20, "the forgotten 12 MiB should mostly be freed: {rec}");
    } else {
        // A clean failure says why, and claims nothing.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("space"), "{err}");
        eprintln!("gc failed cleanly: {err}");
    }
    assert_eq!(ok(server.bkp(&push).args(["restore", &kept_id, "--stdout"])).stdout, kept);
}

#[test]
fn a_restore_onto_a_full_disk_leaves_no_temp_file() {
    let Some(fs_) = Tmpfs::mount(8) else { return };
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("small"), b"fits").unwrap();
    fs::write(src.path().join("zbig"), random_bytes(20 << 20, 9)).unwrap();
    let r = push_tree(&server, &token, "t", src.path());
    let target = fs_.path().join("r");
    let out = server
        .bkp(&token)
        .args(["restore", r["snapshot"]["id"].as_str().unwrap(), "--target"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!out.status.success(), "20 MiB cannot fit in 8");
    let left: Vec<PathBuf> =
        walk(&target).into_iter().filter(|p| p.to_string_lossy().contains(".bkp-restore.")).collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

/// Files of one column family, from RocksDB's own list (opening the
/// database read-write also flushes what its WAL held into SST files).
fn cf_files(db: &Path, cf: &str) -> Vec<String> {
    let raw = open_raw(db);
    let mut v: Vec<String> =
        raw.live_files().unwrap().into_iter().filter(|f| f.column_family_name == cf).map(|f| f.name).collect();
    v.sort();
    v
}

#[test]
fn a_damaged_metadata_file_is_named_and_salvage_keeps_the_rest() {
    let mut server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let a = random_bytes(1 << 20, 11);
    let a_id = server.push_stdin(&token, "a", &a)["snapshot"]["id"].as_str().unwrap().to_string();
    server.stop();
    let db = server.data().join("db");
    let first = cf_files(&db, "snapshots");
    assert_eq!(first.len(), 1, "{first:?}");
    server.restart();
    let b = random_bytes(1 << 20, 12);
    let b_id = server.push_stdin(&token, "b", &b)["snapshot"]["id"].as_str().unwrap().to_string();
    server.stop();
    assert_eq!(cf_files(&db, "snapshots").len(), 2);

    // A flipped byte near the end of snapshot a's file: in its metaindex,
    // which every open reads.
    let bad = db.join(first[0].trim_start_matches('/'));
    let mut bytes = fs::read(&bad).unwrap();
    let at = bytes.len() - 60;
    bytes[at] ^= 0xff;
    fs::write(&bad, bytes).unwrap();

    let err =
        bkp_server::ServerState::open(server.data(), ServerConfig::default()).err().expect("must not open").to_string();
    let file = bad.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&file) && err.contains("salvage") && !err.contains("another bkp-server"), "{err}");

    let check =
        Command::new(bin("bkp-server")).args(["check", "--json", "--data"]).arg(server.data()).output().unwrap();
    assert!(!check.status.success());
    let rep = json(&check);
    let cf = |name: &str| rep["cfs"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    assert!(cf("snapshots")["error"].as_str().is_some_and(|e| e.contains(&file)), "{rep}");
    assert_eq!(cf("snapshots")["readable"], 1, "{rep}");
    assert_eq!(cf("chunks")["error"], serde_json::Value::Null, "{rep}");

    ok(Command::new(bin("bkp-server")).args(["salvage", "--data"]).arg(server.data()));
    let kept: Vec<_> = fs::read_dir(server.data())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("db.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged database is kept aside");
    ok(Command::new(bin("bkp-server")).args(["check", "--data"]).arg(server.data()));

    server.restart();
    assert_eq!(ok(server.bkp(&token).args(["restore", &b_id, "--stdout"])).stdout, b);
    let out = server.bkp(&token).args(["restore", &a_id, "--stdout"]).output().unwrap();
    assert!(!out.status.success(), "snapshot a was in the damaged file");
    // Its data survived: pushing it again sends nothing new.
    let again = server.push_stdin(&token, "a", &a);
    assert!(again["chunks_sent"].as_u64().unwrap() <= 1, "at most the tree chunk: {again}");
}

/// A child process killed when dropped, so a failed assertion leaves no
/// server behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_truncated_wal_is_reported_in_the_server_log() {
    let mut p = ServerProcess::init();
    let token = p.token("web01", "push");
    let log = p.dir.path().join("serve.log");
    let serve = |log: &Path| {
        let child = Child(
            Command::new(bin("bkp-server"))
                .args(["serve", "--listen", &p.listen_arg(), "--data"])
                .arg(p.dir.path())
                .stdout(Stdio::null())
                .stderr(fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !fs::read_to_string(log).unwrap_or_default().contains("listening on") {
            assert!(Instant::now() < deadline, "server did not start: {}", fs::read_to_string(log).unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let push = |name: &str, data: &[u8]| {
        use std::io::Write;
        let mut c = p
            .bkp(&token)
            .args(["push", "--json", "--stdin", "--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(data).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let child = serve(&log);
    // Small pushes: every write goes through the WAL, none is flushed.
    push("a", &random_bytes(50_000, 1));
    push("b", &random_bytes(50_000, 2));
    drop(child); // SIGKILL: nothing flushed at close

    // The end of the newest WAL is lost: snapshot b's commit.
    let db = p.dir.path().join("db");
    let wal = fs::read_dir(&db)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .expect("a WAL");
    let len = fs::metadata(&wal).unwrap().len();
    fs::OpenOptions::new().write(true).open(&wal).unwrap().set_len(len - 20).unwrap();

    let log2 = p.dir.path().join("serve2.log");
    let child = serve(&log2);
    let text = fs::read_to_string(&log2).unwrap();
    let line = BufReader::new(text.as_bytes()).lines().map_while(Result::ok).find(|l| l.contains("acknowledged"));
    assert!(line.as_deref().is_some_and(|l| l.contains("ERROR") && l.contains("write-ahead log")), "{text}");
    let list = ok(p.bkp(&token).args(["snapshots", "--json"]));
    assert_eq!(json(&list).as_array().unwrap().len(), 1, "snapshot b is gone, and the log said so");
    drop(child);
    p.kill();
}
