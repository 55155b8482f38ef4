//! Connection retries within `--timeout`: a push started while the server
//! is down for 10 s succeeds once it is up; against a server that never
//! comes up, `timeout` from client.toml bounds the wait and the error
//! says why in one line. Bounds are generous: the machine is loaded.

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bkp_tests::{json, ok, random_bytes, ServerProcess};

#[test]
fn a_push_waits_for_a_server_that_comes_up_within_the_timeout() {
    let mut server = ServerProcess::init();
    let token = server.token("web01", "push");
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(2 << 20, 3);
    fs::write(src.path().join("f"), &data).unwrap();
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let child = server
        .bkp(&token)
        .env("HOME", home.path())
        .args(["push", "--json", "--timeout", "90s"])
        .arg(src.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Down for 10 s after the push started.
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    server.serve(&[]);
    let up = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(80), "took {took:?}");
    eprintln!("server up after {:.1} s, push done after {:.1} s", up.as_secs_f64(), took.as_secs_f64());
    let id = json(&out)["snapshot"]["id"].as_str().unwrap().to_string();
    let restored = ok(server.bkp(&token).env("HOME", home.path()).args(["restore", &id, "--target"]).arg(home.path()));
    assert!(restored.status.success());
    let back = home.path().join(src.path().strip_prefix("/").unwrap()).join("f");
    assert!(fs::read(back).unwrap() == data);
}

#[test]
fn a_server_that_never_comes_up_fails_within_the_timeout_with_one_clear_line() {
    let server = ServerProcess::init(); // never served
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("client.toml");
    fs::write(&config, "timeout = \"8s\"\n").unwrap();
    let src = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = server
        .bkp(&home.path().join("no-token-needed"))
        .env("BKP_TOKEN", "t")
        .env("HOME", home.path())
        .arg("--config")
        .arg(&config)
        .arg("push")
        .arg(src.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("no answer after") && err.contains("(--timeout 8 s)"), "{err}");
    assert!(err.contains("is bkp-server running there"), "{err}");
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(30), "gave up after {took:?}: {err}");
    // The flag overrides the file.
    let started = Instant::now();
    let out = server
        .bkp(&home.path().join("no-token-needed"))
        .env("BKP_TOKEN", "t")
        .env("HOME", home.path())
        .args(["--config"])
        .arg(&config)
        .args(["snapshots", "--timeout", "3s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(--timeout 3 s)"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}
