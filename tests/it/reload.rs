//! Config reload: a real `bkp-server serve` gets SIGHUP after its
//! server.toml changed; retention, freshness, alerts, schedules and the
//! monitor's interval take effect without a restart, a setting that
//! cannot change live is reported and keeps its value, and a broken file
//! is refused while the old config stays in force and pushes go on.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use bkp_tests::{json, ServerProcess};

use crate::monitoring::{events, wait_for, webhook};

fn push(p: &ServerProcess, token: &std::path::Path, name: &str, data: &[u8]) -> Output {
    let mut child = p
        .bkp(token)
        .args(["push", "--json", "--stdin", "--name", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap()
}

/// `status --json` (through the control socket). It exits non-zero while
/// an alert fires; the report is printed either way.
fn status(p: &ServerProcess) -> serde_json::Value {
    let out = p.admin(&["status", "--json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn expected_secs(st: &serde_json::Value, name: &str) -> Option<u64> {
    st["sets"].as_array().unwrap().iter().find(|s| s["name"] == name).and_then(|s| s["expected_secs"].as_u64())
}

fn prune_scheduled(st: &serde_json::Value) -> bool {
    st["jobs"].as_array().unwrap().iter().any(|j| j["kind"] == "prune" && j["scheduled"] == true)
}

/// What a prune would remove now (a dry run through the running server,
/// so with the retention it has in force).
fn would_remove(p: &ServerProcess) -> u64 {
    let out = p.admin(&["prune", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    json(&out)["figures"]["removed"].as_u64().unwrap()
}

fn hangup(p: &ServerProcess) {
    let pid = p.pid().expect("serving").to_string();
    let st = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(st.success());
}

#[test]
fn sighup_applies_live_settings_reports_restart_ones_and_refuses_a_broken_file() {
    let (url, got) = webhook();
    let mut p = ServerProcess::init();
    let toml = p.dir.path().join("server.toml");
    std::fs::write(&toml, "[freshness]\ninterval = \"1d\"\n[retention.default]\nkeep_last = 10\nmin_age = \"0s\"\n")
        .unwrap();
    let token = p.token("web01", "push");
    p.serve(&[]);
    for i in 0..3u8 {
        let out = push(&p, &token, "db", &[b'x', i]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(push(&p, &token, "etc", b"etc").status.success());
    let before = status(&p);
    assert_eq!(expected_secs(&before, "etc"), Some(86_400), "{before}");
    assert!(!prune_scheduled(&before), "{before}");
    assert_eq!(would_remove(&p), 0);

    // Everything live changes; cache_mb cannot change without a restart.
    std::fs::write(
        &toml,
        format!(
            "cache_mb = 32\n[monitor]\ncheck_interval = \"200ms\"\n[jobs]\nprune = \"0 4 * * *\"\n\
             [freshness]\ninterval = \"1h\"\n[freshness.sets.\"web01/db\"]\ninterval = \"1s\"\ngrace = \"1s\"\n\
             [retention.default]\nkeep_last = 1\nmin_age = \"0s\"\n[[alerts.webhooks]]\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    hangup(&p);
    wait_for("the reloaded freshness in the status", 30, || expected_secs(&status(&p), "etc") == Some(3600));
    let after = status(&p);
    assert!(prune_scheduled(&after), "the new [jobs] schedule is in force: {after}");
    assert_eq!(would_remove(&p), 2, "keep_last = 1 of db's three snapshots");
    // The new alert target, the new per-set freshness and the 200 ms
    // check interval together: db goes stale within seconds and is
    // alerted to the webhook that only the reloaded file names.
    wait_for("the stale alert at the reloaded webhook", 30, || events(&got, "stale:web01/db", "firing") == 1);
    let log = p.log();
    assert!(log.contains("config reloaded from"), "{log}");
    assert!(log.contains("needs a restart") && log.contains("cache_mb"), "{log}");

    // Asked again through the socket: nothing new to apply, cache_mb still
    // waits for a restart.
    let out = p.admin(&["reload", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = json(&out);
    assert_eq!(r["applied"], serde_json::json!([]), "{r}");
    assert_eq!(r["needs_restart"], serde_json::json!(["cache_mb"]), "{r}");
    assert_eq!(r["file"].as_str(), Some(toml.to_str().unwrap()), "{r}");

    // A broken file: refused, whole; the reloaded config stays in force.
    std::fs::write(&toml, "[freshness]\ninterval = \"1h\"\n[retention.default]\nkeep_lats = 1\n").unwrap();
    hangup(&p);
    wait_for("the refusal in the log", 30, || p.log().contains("config reload refused"));
    let log = p.log();
    let line = log.lines().find(|l| l.contains("config reload refused")).unwrap();
    assert!(line.contains("keep_lats") && line.contains("the running config stays in force"), "{line}");
    let out = p.admin(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a refused reload fails the command: {stderr}");
    assert!(stderr.contains("reload refused") && stderr.contains("keep_lats"), "{stderr}");
    let still = status(&p);
    assert_eq!(expected_secs(&still, "etc"), Some(3600), "{still}");
    assert!(prune_scheduled(&still), "{still}");
    assert_eq!(would_remove(&p), 2);
    // The server still serves pushes.
    let out = push(&p, &token, "etc", b"etc, again");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Each reload is in the audit log, with who asked and the outcome.
    let out = p.admin(&["audit", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["event"] == "reload")
        .collect();
    let by = |l: &serde_json::Value| l["by"].as_str().unwrap_or_default().to_string();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0]["result"] == "ok" && by(&lines[0]) == "signal SIGHUP", "{lines:?}");
    assert!(lines[0]["detail"].as_str().unwrap().contains("retention"), "{lines:?}");
    assert!(lines[1]["result"] == "ok" && by(&lines[1]).starts_with("socket uid="), "{lines:?}");
    assert!(lines[2]["result"] == "failed" && by(&lines[2]) == "signal SIGHUP", "{lines:?}");
    assert!(lines[3]["result"] == "failed" && by(&lines[3]).starts_with("socket uid="), "{lines:?}");
}
