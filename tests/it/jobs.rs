//! Job commands against a server that is busy, starting or dying: a
//! refused run is not a failure, a starting server is waited for, and a
//! server that dies under a job is named as the reason.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use bkp_server::gc::GcHooks;
use bkp_server::jobs::JobKind;
use bkp_tests::{bin, json, ok, random_bytes, ServerProcess, TestServer};

use crate::monitoring::{events, toml_config, wait_for, webhook};

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bkp-server serve` with its log in `log`, not waited for.
fn serve(s: &ServerProcess, env: &[(&str, &str)], log: &Path) -> Serve {
    let log = std::fs::File::create(log).unwrap();
    Serve(
        Command::new(bin("bkp-server"))
            .args(["serve", "--listen", &s.listen_arg(), "--data"])
            .arg(s.dir.path())
            .envs(env.iter().copied())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_second_gc_while_one_runs_is_refused_not_failed() {
    let (url, got) = webhook();
    let cfg = toml_config(&format!(
        "cache_mb = 16\n[monitor]\ncheck_interval = \"200ms\"\n[[alerts.webhooks]]\nurl = \"{url}\"\n"
    ));
    let server = TestServer::start_with(cfg);
    let state = server.state();
    // The first gc stops after listing until the test lets it go on.
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let hooks = GcHooks {
        after_listing: Some(Box::new(move || {
            entered_tx.send(()).unwrap();
            let _ = release_rx.lock().unwrap().recv();
        })),
        ..Default::default()
    };
    let st = state.clone();
    let first = std::thread::spawn(move || bkp_server::jobs::run(&st.jobs(&st.config()), JobKind::Gc, false, &hooks));
    entered.recv_timeout(Duration::from_secs(60)).expect("the first gc started");

    let out = Command::new(bin("bkp-server")).args(["gc", "--data"]).arg(server.data()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "refused is EX_TEMPFAIL: {stderr}");
    assert!(stderr.contains("gc not started: a gc run is already in progress"), "{stderr}");
    release.send(()).unwrap();
    assert!(first.join().unwrap().ok);

    let list = json(&server.admin(&["jobs", "--json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list.iter().any(|r| r["refused"] == true && r["kind"] == "gc"), "{list:?}");
    // A check now sees both records: no failed-job condition, no alert.
    bkp_server::monitor::check(&state.monitor_inputs(&state.config())).unwrap();
    let status =
        bkp_server::monitor::status(&state.monitor_inputs(&state.config()), bkp_server::jobs::now_ns()).unwrap();
    let conds = bkp_server::monitor::conditions(&status, 0.0);
    assert!(!conds.iter().any(|c| c.key == "job:gc"), "{conds:?}");
    assert!(status.jobs["gc"].0.ok, "the latest gc run is the one that ran");
    assert_eq!(events(&got, "job:gc", "firing"), 0);
}

#[test]
fn a_job_command_waits_for_a_starting_server() {
    let s = ServerProcess::init();
    let log = s.dir.path().join("serve.log");
    // Slow to start: the store is open (its lock held) for 3 s before the
    // control socket is bound.
    let mut srv = serve(&s, &[("BKP_TEST_SERVE_START_DELAY_MS", "3000")], &log);
    wait_for("serve to take its lock", 30, || bkp_server::control::serve_running(s.dir.path()));
    let out = Command::new(bin("bkp-server")).args(["gc", "--json", "--data"]).arg(s.dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("is starting; waiting up to 60 s for its control socket"), "{stderr}");
    assert_eq!(json(&out)["kind"], "gc");
    // It ran in the server, which is still up and lists it.
    assert!(srv.0.try_wait().unwrap().is_none(), "serve died: {}", std::fs::read_to_string(&log).unwrap());
    let list = json(&ok(Command::new(bin("bkp-server")).args(["jobs", "--json", "--data"]).arg(s.dir.path())));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn a_server_that_dies_under_a_job_is_named() {
    let mut s = ServerProcess::init();
    let (push, admin) = (s.token("web01", "push"), s.token("ops", "admin"));
    let src = tempfile::tempdir().unwrap();
    for i in 0..4 {
        std::fs::write(src.path().join(format!("f{i}")), random_bytes(300_000, i)).unwrap();
    }
    s.serve(&[]);
    let snap = json(&ok(s.bkp(&push).args(["push", "--json"]).arg(src.path())));
    ok(s.bkp(&admin).args(["forget", snap["snapshot"]["id"].as_str().unwrap()]));
    s.kill();
    // One chunk per sweep batch, 5 s after each: the gc outlives the kill.
    let log = s.dir.path().join("serve.log");
    let mut srv = serve(&s, &[("BKP_TEST_GC_BATCH", "1"), ("BKP_TEST_GC_BATCH_DELAY_MS", "5000")], &log);
    wait_for("the control socket", 30, || {
        std::os::unix::net::UnixStream::connect(bkp_server::control::socket_path(s.dir.path())).is_ok()
    });
    let gc = Command::new(bin("bkp-server"))
        .args(["gc", "--data"])
        .arg(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the gc to start in the server", 30, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("job started")
    });
    srv.0.kill().unwrap();
    srv.0.wait().unwrap();
    let out = gc.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("the server stopped during the job; check its log"), "{stderr}");
}
