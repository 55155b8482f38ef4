use bkp_common::protocol::Role;
use bkp_tests::{dump_like, json, ok, TestServer};

#[test]
fn stdin_round_trip_and_changed_dump_sends_little() {
    let server = TestServer::start();
    let token = server.token("db01", Role::Push);
    let dump = dump_like(1_500_000, 5); // about 70 MB
    let first = server.push_stdin(&token, "pgdump", &dump);
    assert_eq!(first["bytes_read"].as_u64().unwrap(), dump.len() as u64);
    assert!(first["bytes_sent"].as_u64().unwrap() < dump.len() as u64 / 2, "zstd compresses text");

    let out = ok(server.bkp(&token).args(["restore", "latest", "--name", "pgdump", "--stdout"]));
    assert!(out.stdout == dump, "restored stream differs");

    // Change a few rows in the middle: only the chunks around them go.
    let mut changed = dump.clone();
    let mid = changed.len() / 2;
    changed.splice(mid..mid + 10, b"UPDATED ROW, LONGER THAN BEFORE".iter().copied());
    let second = server.push_stdin(&token, "pgdump", &changed);
    let sent = second["bytes_sent"].as_u64().unwrap();
    let chunks_sent = second["chunks_sent"].as_u64().unwrap();
    assert!(chunks_sent <= 4, "sent {chunks_sent} chunks");
    assert!(sent < 4 << 20, "changed dump sent {sent} bytes");
    let out = ok(server.bkp(&token).args(["restore", "latest", "--name", "pgdump", "--stdout"]));
    assert!(out.stdout == changed);
}

#[test]
fn failing_dump_command_leaves_no_snapshot() {
    let server = TestServer::start();
    let token = server.token("db01", Role::Push);
    let out = server
        .bkp(&token)
        .args(["push", "--name", "mysql", "--", "sh", "-c", "echo 'partial dump'; exit 3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no snapshot was committed"), "{err}");
    // Killed by a signal counts as failure too.
    let out = server.bkp(&token).args(["push", "--name", "mysql", "--", "sh", "-c", "kill -9 $$"]).output().unwrap();
    assert!(!out.status.success());
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    // A succeeding command commits.
    ok(server.bkp(&token).args(["push", "--name", "mysql", "--", "sh", "-c", "echo ok"]));
    let out = ok(server.bkp(&token).args(["restore", "latest", "--name", "mysql", "--stdout"]));
    assert_eq!(out.stdout, b"ok\n");
}
