use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use bkp_common::protocol::Role;
use bkp_tests::{json, ok, random_bytes, ServerProcess, TestServer};

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
fn server_killed_right_after_commits_keeps_every_snapshot() {
    // Large chunks skip the WAL; the commit flushes them before it answers.
    // SIGKILL (no clean close, no flush at shutdown) must lose nothing
    // acknowledged, from a tree push or a stream push.
    let mut server = ServerProcess::init();
    let token = server.token("web01", "push");
    server.serve(&[]);
    let src = tempfile::tempdir().unwrap();
    for i in 0..4 {
        std::fs::write(src.path().join(format!("f{i}")), random_bytes(3 << 20, 70 + i)).unwrap();
    }
    let tree = json(&ok(server.bkp(&token).args(["push", "--json", "--name", "files"]).arg(src.path())));
    assert!(tree["bytes_sent"].as_u64().unwrap() >= 12 << 20, "{tree}");
    let stream = random_bytes(6 << 20, 80);
    let mut child = server
        .bkp(&token)
        .args(["push", "--json", "--name", "dump", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&stream).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    server.kill();

    server.serve(&[]);
    let target = tempfile::tempdir().unwrap();
    ok(server.bkp(&token).args(["restore", tree["snapshot"]["id"].as_str().unwrap(), "--target"]).arg(target.path()));
    let restored = target.path().join(src.path().strip_prefix("/").unwrap());
    for i in 0..4 {
        assert!(std::fs::read(restored.join(format!("f{i}"))).unwrap() == random_bytes(3 << 20, 70 + i));
    }
    let out = ok(server.bkp(&token).args(["restore", "latest", "--name", "dump", "--stdout"]));
    assert!(out.stdout == stream, "stream restored after SIGKILL differs");
    server.kill();
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

#[test]
fn server_killed_and_restarted_under_a_push_fails_fast_and_says_nothing_committed() {
    let mut server = ServerProcess::init();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        server.dir.path().join("server.toml"),
        format!("[monitor]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let token = server.token("web01", "push");
    server.serve(&[]);
    let mut child = server
        .bkp(&token)
        .args(["push", "--name", "big", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A steady stream, so the push is uploading when the server dies; the
    // writer stops when the client exits (broken pipe).
    let mut stdin = child.stdin.take().unwrap();
    let (fed_tx, fed) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        for i in 0..4096u64 {
            if stdin.write_all(&random_bytes(1 << 20, i)).is_err() {
                return;
            }
            if i == 16 {
                let _ = fed_tx.send(());
            }
        }
    });
    fed.recv_timeout(Duration::from_secs(60)).expect("16 MiB fed to the push");
    server.kill();
    let killed = std::time::Instant::now();
    server.serve(&[]);
    let out = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing was committed; run the push again"), "{stderr}");
    // The idle timeout is 10 s; 5 s of slack for a loaded machine.
    assert!(took < Duration::from_secs(15), "the client took {took:?} to give up: {stderr}");
    eprintln!("client gave up {:.1} s after the kill: {stderr}", took.as_secs_f64());
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json"])));
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    // Reported on a new connection to the restarted server.
    let text = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics")).call().unwrap().into_string().unwrap();
    assert!(text.contains("bkp_push_failures_total{host=\"web01\",name=\"big\"} 1"), "{text}");
    server.kill();
}

#[test]
fn connect_retries_a_silent_server_for_its_budget_and_not_a_refusal() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Initialised but not serving: the port is held (bound by `init`) and
    // nothing answers on it.
    let silent = ServerProcess::init();
    let cfg = bkp_client::config::ClientConfig {
        server: format!("127.0.0.1:{}", silent.port),
        trust: bkp_client::config::Trust::Fingerprint(silent.fingerprint.clone()),
        token: "no-such-token".into(),
        timeout: Duration::from_secs(6),
    };
    let start = std::time::Instant::now();
    let e = rt.block_on(bkp_client::Client::connect_within(&cfg, Duration::from_secs(6))).err().unwrap().to_string();
    let took = start.elapsed();
    assert!(e.contains("no answer after") && e.contains("attempts"), "{e}");
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(15), "gave up after {took:?}: {e}");
    // A server that answers and refuses (unknown token) is not retried.
    let server = TestServer::start();
    let cfg = bkp_client::config::ClientConfig { server: server.addr.to_string(), ..cfg };
    let cfg = bkp_client::config::ClientConfig {
        trust: bkp_client::config::Trust::Fingerprint(server.fingerprint.clone()),
        ..cfg
    };
    let start = std::time::Instant::now();
    let e = rt.block_on(bkp_client::Client::connect_within(&cfg, Duration::from_secs(30))).err().unwrap().to_string();
    assert!(e.contains("unknown or revoked token"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5), "a refusal was retried: {:?}", start.elapsed());
}
