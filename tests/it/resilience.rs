use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use bkp_common::protocol::Role;
use bkp_tests::{json, ok, random_bytes, TestServer};

#[test]
fn killed_push_leaves_no_snapshot_and_retry_skips_stored_chunks() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let data = random_bytes(96 << 20, 9);
    let mut child = server
        .bkp(&token)
        .args(["push", "--json", "--stdin", "--name", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Feed the first half, let it upload, then kill -9 with the pipe open.
    stdin.write_all(&data[..48 << 20]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert!(list.as_array().unwrap().is_empty(), "a killed push committed: {list}");

    let mut child = server
        .bkp(&token)
        .args(["push", "--json", "--stdin", "--name", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let r = json(&out);
    let sent = r["bytes_sent"].as_u64().unwrap();
    // Most of the first half was stored before the kill and is not re-sent.
    assert!(sent < 80 << 20, "retry sent {sent} bytes of {}", data.len());
    let out = ok(server.bkp(&token).args(["restore", "latest", "--name", "big", "--stdout"]));
    assert!(out.stdout == data);
}

#[test]
fn restarted_server_keeps_everything() {
    let mut server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a"), random_bytes(3 << 20, 2)).unwrap();
    ok(server.bkp(&token).arg("push").arg(src.path()));
    server.restart();
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert_eq!(list.as_array().unwrap().len(), 1);
    let second = json(&ok(server.bkp(&token).args(["push", "--json"]).arg(src.path())));
    assert!(second["bytes_sent"].as_u64().unwrap() < 100_000, "{second}");
    let target = tempfile::tempdir().unwrap();
    ok(server.bkp(&token).args(["restore", "latest", "--target"]).arg(target.path()));
    let restored = target.path().join(src.path().strip_prefix("/").unwrap()).join("a");
    assert!(std::fs::read(restored).unwrap() == random_bytes(3 << 20, 2));
}
