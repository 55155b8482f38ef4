//! Client-side encryption (issue 22) against a real server: what reaches
//! the server's disk, round trips, wrong and missing keys, dedup inside a
//! key group only, and damage found without the key and caught by the
//! client.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bkp_common::protocol::Role;
use bkp_common::{seal, ChunkId, SnapshotId};
use bkp_tests::{bin, dump_like, ok, random_bytes, TestServer};

/// One client host's configuration: its own HOME (so its metadata cache
/// is not under the server's data directory) and client.toml.
struct Host {
    home: tempfile::TempDir,
    config: PathBuf,
    token: PathBuf,
}

impl Host {
    /// A host of key group `group` whose key file is `key` (made by
    /// `bkp key init` when it does not exist yet); `None`: no encryption.
    fn new(server: &TestServer, name: &str, group: Option<(&str, &Path)>) -> Self {
        let home = tempfile::tempdir().unwrap();
        let config = home.path().join("client.toml");
        let text = match group {
            Some((g, key)) => {
                if !key.exists() {
                    let out = ok(Command::new(bin("bkp"))
                        .env("HOME", home.path())
                        .args(["key", "init", "--group", g, "--file"])
                        .arg(key));
                    let said = String::from_utf8_lossy(&out.stdout).to_string();
                    assert_eq!(said.lines().count(), 1, "{said}");
                    assert!(
                        said.contains("losing this key loses the data") && said.contains(&key.display().to_string())
                    );
                }
                format!("encryption = \"{g}\"\nkey_file = \"{}\"\n", key.display())
            }
            None => String::new(),
        };
        std::fs::write(&config, text).unwrap();
        Self { home, config, token: server.token(name, Role::Push) }
    }

    fn bkp(&self, server: &TestServer) -> Command {
        let mut c = server.bkp(&self.token);
        c.env("HOME", self.home.path()).arg("--config").arg(&self.config);
        c
    }

    fn push_stdin(&self, server: &TestServer, name: &str, data: &[u8]) -> serde_json::Value {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .bkp(server)
            .args(["push", "--json", "--stdin", "--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        bkp_tests::json(&out)
    }

    fn restore_stdout(&self, server: &TestServer, id: &str) -> Output {
        self.bkp(server).args(["restore", id, "--stdout"]).output().unwrap()
    }
}

fn snapshot_id(report: &serde_json::Value) -> String {
    report["snapshot"]["id"].as_str().unwrap().to_string()
}

/// Every file under `dir` in which `needle` occurs.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                out.push(p);
            }
        }
    }
    out
}

/// Stored bytes of chunk data, summed over `chunk_meta`.
fn stored_bytes(server: &TestServer) -> u64 {
    server.state().store().chunk_metas(None, 1 << 20).unwrap().iter().map(|(_, m)| m.stored_len as u64).sum()
}

/// The data chunks of a stream snapshot's file, in order.
fn data_chunks(server: &TestServer, id: &str) -> Vec<ChunkId> {
    let store = server.state().store().clone();
    let snap = store.snapshot(&id.parse::<SnapshotId>().unwrap()).unwrap().unwrap();
    let mut dec = bkp_common::tree::TreeDecoder::new();
    let mut out = Vec::new();
    for t in &snap.tree {
        dec.feed(&bkp_common::blob::decode(&store.chunk_blob(t).unwrap().unwrap()).unwrap());
        while let Some(e) = dec.next_entry().unwrap() {
            if let bkp_common::tree::Entry::Chunks(refs) = e {
                out.extend(refs.iter().map(|r| r.id));
            }
        }
    }
    out
}

/// Writes `blob` under `id` in the stopped server's RocksDB, as a disk
/// (or a hostile operator) would, then restarts it.
fn overwrite(server: &mut TestServer, id: &ChunkId, blob: &[u8]) {
    server.stop();
    let path = server.data().join("db");
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, &cfs).unwrap();
    db.put_cf(db.cf_handle("chunks").unwrap(), id.as_bytes(), blob).unwrap();
    drop(db);
    server.restart();
}

fn verify(server: &TestServer) -> (bool, serde_json::Value) {
    let out = Command::new(bin("bkp-server"))
        .args(["verify", "--full", "--json", "--data"])
        .arg(server.data())
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), v)
}

#[test]
fn sealed_content_never_reaches_the_servers_disk_and_round_trips() {
    let mut server = TestServer::start();
    let keys = tempfile::tempdir().unwrap();
    let sealed = Host::new(&server, "db01", Some(("dbs", &keys.path().join("dbs.key"))));
    let plain = Host::new(&server, "web01", None);
    let secret = b"MARKER-4f1c9e-customer-password-hash";
    let control = b"CONTROL-77ab21-plain-push-marker";
    let mut dump = dump_like(200_000, 1);
    dump.extend_from_slice(secret);
    dump.extend(dump_like(50_000, 2));
    let mut other = random_bytes(1 << 20, 3);
    other.extend_from_slice(control);

    let a = sealed.push_stdin(&server, "pgdump", &dump);
    plain.push_stdin(&server, "files", &other);
    // The chunks are sealed: their ids are not blake3 of the content.
    let ids = data_chunks(&server, &snapshot_id(&a));
    assert!(!ids.is_empty());
    for id in &ids {
        let b = server.state().store().chunk_blob(id).unwrap().unwrap();
        assert_eq!(bkp_common::blob::header(&b).unwrap().codec, bkp_common::blob::Codec::Sealed);
    }
    // Compressed before sealing: the dump takes far less than its size.
    assert!(stored_bytes(&server) < dump.len() as u64 / 2);

    // Round trip, content hash checked by restore.
    let out = sealed.restore_stdout(&server, &snapshot_id(&a)[..12]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == dump);
    let out = ok(sealed.bkp(&server).args(["restore", "--verify-only", &snapshot_id(&a)[..12]]));
    assert!(out.status.success());

    // Every file of the data directory (RocksDB's tables, blob files, log,
    // WAL), flushed or not: the plain push's marker is there (the search
    // works), the sealed one's never.
    server.stop();
    assert!(!files_holding(server.data(), control).is_empty(), "the plain marker must be found");
    assert_eq!(files_holding(server.data(), secret), Vec::<PathBuf>::new());
    server.restart();
    // A GC flushes and compacts: still nowhere.
    server.admin(&["gc"]);
    server.stop();
    assert_eq!(files_holding(server.data(), secret), Vec::<PathBuf>::new());
}

#[test]
fn no_key_or_another_groups_key_fails_clearly_and_writes_nothing() {
    let server = TestServer::start();
    let keys = tempfile::tempdir().unwrap();
    let a = Host::new(&server, "db01", Some(("dbs", &keys.path().join("dbs.key"))));
    let data = random_bytes(2 << 20, 4);
    let id = snapshot_id(&a.push_stdin(&server, "pgdump", &data));

    // The same host without its key: no key configured.
    std::fs::write(&a.config, "").unwrap();
    let out = a.restore_stdout(&server, &id[..12]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sealed") && err.contains("key_file"), "{err}");
    assert!(out.stdout.is_empty(), "nothing written");

    // Another group's key.
    let other = keys.path().join("other.key");
    ok(Command::new(bin("bkp"))
        .env("HOME", a.home.path())
        .args(["key", "init", "--group", "other", "--file"])
        .arg(&other));
    std::fs::write(&a.config, format!("key_file = \"{}\"\n", other.display())).unwrap();
    let target = a.home.path().join("restored");
    let out = a.bkp(&server).args(["restore", &id[..12], "--target"]).arg(&target).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not open with this key file"), "{err}");
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none(), "nothing restored");

    // A key file that names another group than `encryption`: refused before pushing.
    std::fs::write(&a.config, format!("encryption = \"dbs\"\nkey_file = \"{}\"\n", other.display())).unwrap();
    let out = a.bkp(&server).args(["push", "--stdin", "--name", "x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not \"dbs\""));
}

#[test]
fn dedup_stays_inside_a_key_group() {
    let server = TestServer::start();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("dbs.key");
    let a = Host::new(&server, "db01", Some(("dbs", &key)));
    let b = Host::new(&server, "db02", Some(("dbs", &key)));
    let c = Host::new(&server, "db03", Some(("analytics", &keys.path().join("analytics.key"))));
    let plain = Host::new(&server, "web01", None);
    let data = random_bytes(6 << 20, 5);

    let before = stored_bytes(&server);
    a.push_stdin(&server, "pgdump", &data);
    let after_a = stored_bytes(&server);
    assert!(after_a - before >= data.len() as u64);
    // Same group, another host: it proves possession by uploading (as
    // today), and the store keeps one copy.
    let rb = b.push_stdin(&server, "pgdump", &data);
    assert!(rb["chunks_sent"].as_u64().unwrap() >= 2, "{rb}");
    let after_b = stored_bytes(&server);
    assert!(after_b - after_a < 64 << 10, "stored again: {}", after_b - after_a);
    // Its second push sends nothing new.
    let again = b.push_stdin(&server, "pgdump", &data);
    assert!(again["bytes_sent"].as_u64().unwrap() < 64 << 10, "{again}");
    // Another group, and a plain host: ids differ, everything is stored again.
    c.push_stdin(&server, "pgdump", &data);
    let after_c = stored_bytes(&server);
    assert!(after_c - after_b >= data.len() as u64);
    plain.push_stdin(&server, "pgdump", &data);
    assert!(stored_bytes(&server) - after_c >= data.len() as u64);
    // Each restores its own.
    for (h, name) in [(&a, "db01"), (&b, "db02"), (&c, "db03")] {
        let out = h.bkp(&server).args(["restore", "latest", "--name", "pgdump", "--stdout"]).output().unwrap();
        assert!(out.status.success() && out.stdout == data, "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_flipped_byte_is_found_without_the_key_and_the_next_push_heals_it() {
    let mut server = TestServer::start();
    let keys = tempfile::tempdir().unwrap();
    let a = Host::new(&server, "db01", Some(("dbs", &keys.path().join("dbs.key"))));
    let data = random_bytes(3 << 20, 6);
    let id = snapshot_id(&a.push_stdin(&server, "pgdump", &data));
    let (clean, rep) = verify(&server);
    assert!(clean, "a sealed store verifies clean without the key: {rep}");

    let bad = data_chunks(&server, &id)[0];
    let mut blob = server.state().store().chunk_blob(&bad).unwrap().unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0x01;
    overwrite(&mut server, &bad, &blob);

    let (clean, rep) = verify(&server);
    assert!(!clean, "{rep}");
    let f = &rep["figures"];
    assert_eq!(f["bad_chunks"].as_array().unwrap().len(), 1, "{f}");
    assert_eq!(f["bad_chunks"][0]["id"], bad.to_hex());
    assert!(f["bad_chunks"][0].to_string().contains("ciphertext"), "{f}");
    assert_eq!(f["affected"].as_array().unwrap().len(), 1, "{f}");
    assert_eq!(f["affected"][0]["id"], id.as_str());
    assert_eq!(server.state().store().quarantined().unwrap()[0].0, bad);

    // The next push uploads it again; the damaged snapshot heals.
    let again = a.push_stdin(&server, "pgdump", &data);
    assert!(again["chunks_sent"].as_u64().unwrap() >= 1, "{again}");
    let (clean, rep) = verify(&server);
    assert!(clean, "{rep}");
    assert_eq!(rep["figures"]["healed"].as_array().unwrap().len(), 1, "{rep}");
    let out = a.restore_stdout(&server, &id[..12]);
    assert!(out.status.success() && out.stdout == data);
}

#[test]
fn a_server_returning_another_chunk_under_the_id_is_caught_by_the_client() {
    let mut server = TestServer::start();
    let keys = tempfile::tempdir().unwrap();
    let a = Host::new(&server, "db01", Some(("dbs", &keys.path().join("dbs.key"))));
    let data = random_bytes(1 << 20, 7);
    let first = snapshot_id(&a.push_stdin(&server, "one", &data));
    let second = snapshot_id(&a.push_stdin(&server, "two", &random_bytes(1 << 20, 8)));
    let (want, other) = (data_chunks(&server, &first)[0], data_chunks(&server, &second)[0]);
    let store = server.state().store().clone();
    let (blob_a, blob_b) = (store.chunk_blob(&want).unwrap().unwrap(), store.chunk_blob(&other).unwrap().unwrap());
    drop(store);

    // Another snapshot's chunk under the id: its key hash names another id.
    overwrite(&mut server, &want, &blob_b);
    let out = a.restore_stdout(&server, &first[..12]);
    assert!(!out.status.success());
    assert!(out.stdout != data);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want.to_hex()), "{err}");

    // Forged to pass every check a server can make (the key hash and
    // ciphertext hash rewritten for the id): the AEAD, bound to the id, fails.
    let mut forged = blob_b.clone();
    forged[seal::KEY_HASH_AT..seal::CT_HASH_AT].copy_from_slice(&blob_a[seal::KEY_HASH_AT..seal::CT_HASH_AT]);
    seal::finish(&want, &mut forged);
    assert!(bkp_common::blob::check(&forged, &want).is_ok());
    overwrite(&mut server, &want, &forged);
    let out = a.restore_stdout(&server, &first[..12]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want.to_hex()) && err.contains("another chunk"), "{err}");

    // The real blob back: it restores.
    overwrite(&mut server, &want, &blob_a);
    let out = a.restore_stdout(&server, &first[..12]);
    assert!(out.status.success() && out.stdout == data);
}

#[test]
fn key_commands_round_trip_through_passphrase_and_paper() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k/dbs.key");
    let a = Host::new(&server, "db01", Some(("dbs", &key)));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let data = random_bytes(1 << 20, 9);
    let id = snapshot_id(&a.push_stdin(&server, "pgdump", &data));
    let key_cmd = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = a.bkp(&server);
        c.arg("key").args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };

    // check opens the newest snapshot with the key.
    let out = key_cmd(&["check"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("opens snapshot {}", &id[..8])));

    // The paper form, before a passphrase is added.
    let form = ok(a.bkp(&server).args(["key", "export", "--paper"])).stdout;
    // A passphrase: needed from now on, the wrong one refused.
    let out = key_cmd(&["add-passphrase"], &[("BKP_KEY_NEW_PASSPHRASE", "correct horse battery")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = a.restore_stdout(&server, &id[..12]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BKP_KEY_PASSPHRASE"));
    let mut c = a.bkp(&server);
    let out = c.env("BKP_KEY_PASSPHRASE", "wrong").args(["restore", &id[..12], "--stdout"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    let mut c = a.bkp(&server);
    let out =
        c.env("BKP_KEY_PASSPHRASE", "correct horse battery").args(["restore", &id[..12], "--stdout"]).output().unwrap();
    assert!(out.status.success() && out.stdout == data);

    // The key file lost: imported from the paper form, it opens the data.
    std::fs::remove_file(&key).unwrap();
    use std::io::Write;
    let mut child = a
        .bkp(&server)
        .args(["key", "import", "--file"])
        .arg(&key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&form).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = a.restore_stdout(&server, &id[..12]);
    assert!(out.status.success() && out.stdout == data, "{}", String::from_utf8_lossy(&out.stderr));
    // init never overwrites a key.
    let out = key_cmd(&["init", "--group", "dbs", "--file", key.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not overwritten"));
}
