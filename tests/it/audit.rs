//! The audit log: token changes from the CLI, admin actions and refusals
//! over the protocol all land in `DATA/audit.log` and come back from
//! `bkp-server audit --json`; rotation keeps the configured number of
//! files even with two writers; per-set push counters and the build info
//! on `/metrics`.

use std::process::Command;

use bkp_common::protocol::Role;
use bkp_tests::{bin, ok, TestServer};

use crate::monitoring::{toml_config, wait_for};

fn audit_lines(server: &TestServer) -> Vec<serde_json::Value> {
    let out = server.admin(&["audit", "--json"]);
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn find<'a>(lines: &'a [serde_json::Value], event: &str, result: &str) -> Option<&'a serde_json::Value> {
    lines.iter().find(|l| l["event"] == event && l["result"] == result)
}

#[test]
fn token_changes_admin_actions_and_refusals_are_audited() {
    let server = TestServer::start();
    let out = server.admin(&["token", "create", "--host", "ops", "--role", "admin"]);
    let admin_tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let admin = server.data().join("admin.token");
    std::fs::write(&admin, &admin_tok).unwrap();
    let push = server.token("web01", Role::Push);
    let id = server.push_stdin(&push, "db", b"SELECT 1;\n")["snapshot"]["id"].as_str().unwrap().to_string();

    // Refused: a push token may not forget; a bad token may not connect.
    let out = server.bkp(&push).args(["forget", &id]).output().unwrap();
    assert!(!out.status.success());
    let bad = server.data().join("bad.token");
    std::fs::write(&bad, format!("bkp_{}", "0".repeat(64))).unwrap();
    assert!(!server.bkp(&bad).arg("snapshots").output().unwrap().status.success());
    ok(server.bkp(&admin).args(["forget", &id]));

    let list = bkp_tests::json(&server.admin(&["token", "list", "--json"]));
    let push_id = list.as_array().unwrap().iter().find(|t| t["host"] == "web01").unwrap()["id"].as_str().unwrap();
    let admin_id = list.as_array().unwrap().iter().find(|t| t["host"] == "ops").unwrap()["id"].as_str().unwrap();
    server.admin(&["token", "revoke", push_id]);

    // serve writes from a background thread: wait for its lines.
    let mut lines = Vec::new();
    wait_for("the forget in the audit log", 20, || {
        lines = audit_lines(&server);
        find(&lines, "forget", "ok").is_some()
    });
    for l in &lines {
        assert_eq!(l["v"], 1, "{l}");
        let t = l["time"].as_str().unwrap();
        assert!(t.ends_with('Z') && bkp_server::audit::parse_since(t).is_ok(), "{l}");
    }
    let created = find(&lines, "token_create", "ok").unwrap();
    assert_eq!((created["host"].as_str(), created["token"].as_str()), (Some("ops"), Some(admin_id)), "{created}");
    assert!(find(&lines, "token_list", "ok").is_some(), "{lines:?}");
    let revoked = find(&lines, "token_revoke", "ok").unwrap();
    assert_eq!((revoked["host"].as_str(), revoked["token"].as_str()), (Some("web01"), Some(push_id)), "{revoked}");

    let refused = find(&lines, "refused", "refused").expect("the push token's forget");
    assert_eq!((refused["host"].as_str(), refused["token"].as_str()), (Some("web01"), Some(push_id)), "{refused}");
    assert!(refused["detail"].as_str().unwrap().starts_with("forget: a push token may not"), "{refused}");
    assert!(refused["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{refused}");
    let hello = find(&lines, "hello_refused", "refused").expect("the bad token's hello");
    assert!(hello["token"].is_null() && hello["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{hello}");
    let forget = find(&lines, "forget", "ok").unwrap();
    assert_eq!((forget["host"].as_str(), forget["token"].as_str()), (Some("ops"), Some(admin_id)), "{forget}");
    assert!(forget["detail"].as_str().unwrap().contains(&id[..8]), "{forget}");

    // The text form, and --since in the future filters everything out.
    let text = String::from_utf8(server.admin(&["audit"]).stdout).unwrap();
    assert!(text.contains("hello_refused") && text.contains("token_revoke"), "{text}");
    let later = server.admin(&["audit", "--json", "--since", "2999-01-01T00:00:00Z"]);
    assert!(later.stdout.is_empty(), "{}", String::from_utf8_lossy(&later.stdout));

    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(server.data().join("audit.log")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

fn token_lists(data: &std::path::Path, n: usize) {
    for _ in 0..n {
        ok(Command::new(bin("bkp-server")).args(["token", "list", "--data"]).arg(data));
    }
}

#[test]
fn rotation_keeps_n_files_with_two_writers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    ok(Command::new(bin("bkp-server")).args(["init", "--data"]).arg(data));
    // Room for every line in 10 files: nothing may be lost or torn.
    std::fs::write(data.join("server.toml"), "[audit]\nmax_bytes = 1500\nkeep = 10\n").unwrap();
    let (a, b) = (data.to_path_buf(), data.to_path_buf());
    let t1 = std::thread::spawn(move || token_lists(&a, 20));
    let t2 = std::thread::spawn(move || token_lists(&b, 20));
    t1.join().unwrap();
    t2.join().unwrap();
    let out = ok(Command::new(bin("bkp-server")).args(["audit", "--json", "--data"]).arg(data));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().filter(|l| l["event"] == "token_list").count(), 40);
    assert!(data.join("audit.log.2").exists(), "40 lines of ~120 bytes over 1500-byte files rotate");
    for f in std::fs::read_dir(data).unwrap() {
        let f = f.unwrap();
        if f.file_name().to_string_lossy().starts_with("audit.log") {
            assert!(f.metadata().unwrap().len() <= 1500, "{:?}", f.file_name());
        }
    }

    // Keep 2, in a fresh directory: the oldest lines go, never a third file.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    ok(Command::new(bin("bkp-server")).args(["init", "--data"]).arg(data));
    std::fs::write(data.join("server.toml"), "[audit]\nmax_bytes = 1500\nkeep = 2\n").unwrap();
    token_lists(data, 40);
    assert!(data.join("audit.log.1").exists() && data.join("audit.log.2").exists());
    assert!(!data.join("audit.log.3").exists());
    let out = ok(Command::new(bin("bkp-server")).args(["audit", "--json", "--data"]).arg(data));
    let kept = String::from_utf8(out.stdout).unwrap().lines().count();
    assert!(kept > 10 && kept < 40, "{kept} lines kept in 3 files of 1500 bytes");
}

#[test]
fn metrics_count_pushes_per_set_and_show_the_build() {
    let server = TestServer::start_with(toml_config("cache_mb = 16\n[monitor]\nlisten = \"127.0.0.1:0\"\n"));
    let tok = server.token("web01", Role::Push);
    server.push_stdin(&tok, "db", b"SELECT 1;\n");
    server.push_stdin(&tok, "db", b"SELECT 2;\n");
    server.push_stdin(&tok, "files", b"x");
    let http = server.state().monitor().http_addr.lock().unwrap().expect("metrics endpoint bound");
    let text = ureq::get(&format!("http://{http}/metrics")).call().unwrap().into_string().unwrap();
    assert!(text.contains("bkp_pushes_total{host=\"web01\",name=\"db\",result=\"ok\"} 2"), "{text}");
    assert!(text.contains("bkp_pushes_total{host=\"web01\",name=\"files\",result=\"ok\"} 1"), "{text}");
    assert!(text.contains("bkp_pushes_total{host=\"web01\",name=\"db\",result=\"failed\"} 0"), "{text}");
    assert!(text.contains(&format!("bkp_build_info{{version=\"{}\"}} 1", bkp_common::VERSION)), "{text}");
}

fn metric(server: &TestServer, line_start: &str) -> u64 {
    let http = server.state().monitor().http_addr.lock().unwrap().expect("metrics endpoint bound");
    let text = ureq::get(&format!("http://{http}/metrics")).call().unwrap().into_string().unwrap();
    let l = text.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("no {line_start}: {text}"));
    l.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Hellos refused before any token was accepted (too large, unknown
/// token) and a push session used by another host's token: each one
/// line, with the peer and why.
#[test]
fn refused_hellos_and_another_hosts_session_are_audited() {
    let server = TestServer::start();
    let huge = server.data().join("huge.token");
    std::fs::write(&huge, "x".repeat(10_000)).unwrap();
    assert!(!server.bkp(&huge).arg("snapshots").output().unwrap().status.success());
    let (a, b) = (server.token("web01", Role::Push), server.token("web02", Role::Push));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ca = server.client(&a).await;
        let s = ca.start_push("db", bkp_common::snapshot::SnapshotKind::Stream).await.unwrap();
        let cb = server.client(&b).await;
        let e = cb.missing(s, vec![bkp_common::ChunkId::of(b"x")]).await.unwrap_err().to_string();
        assert!(e.contains("unknown push session"), "the other host is told nothing more: {e}");
        // The owner's session is untouched.
        assert_eq!(ca.missing(s, vec![bkp_common::ChunkId::of(b"x")]).await.unwrap(), [0]);
    });
    let mut lines = Vec::new();
    wait_for("the refusals in the audit log", 20, || {
        lines = audit_lines(&server);
        lines.iter().any(|l| l["event"] == "refused") && lines.iter().any(|l| l["event"] == "hello_refused")
    });
    let hello = find(&lines, "hello_refused", "refused").unwrap();
    assert!(hello["detail"].as_str().unwrap().starts_with("hello of 10"), "{hello}");
    assert!(hello["detail"].as_str().unwrap().contains("4096-byte limit"), "{hello}");
    assert!(hello["peer"].as_str().unwrap().starts_with("127.0.0.1:") && hello["token"].is_null(), "{hello}");
    let other = find(&lines, "refused", "refused").unwrap();
    assert_eq!(other["host"], "web02", "{other}");
    assert_eq!(other["detail"], "push session of host web01 used by this token", "{other}");
    assert!(other["token"].as_str().is_some_and(|t| !t.is_empty()), "{other}");
}

/// A flood of bad-token hellos: at most `refusals_per_second` lines a
/// second reach the log, the rest are counted in
/// `bkp_audit_dropped_total{reason="rate_limit"}`, and the next line
/// written says how many it follows; admin actions are never limited.
#[test]
fn a_flood_of_bad_hellos_is_rate_limited_and_counted() {
    let server = TestServer::start_with(toml_config(
        "cache_mb = 16\n[monitor]\nlisten = \"127.0.0.1:0\"\n[audit]\nrefusals_per_second = 1\n",
    ));
    let bad = server.data().join("bad.token");
    std::fs::write(&bad, format!("bkp_{}", "0".repeat(64))).unwrap();
    let mut cfg = server.client_config(&server.token("web01", Role::Push));
    cfg.token = std::fs::read_to_string(&bad).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let flood = 30;
    for _ in 0..flood {
        assert!(rt.block_on(bkp_client::Client::connect(&cfg)).is_err());
    }
    let dropped = || metric(&server, "bkp_audit_dropped_total{reason=\"rate_limit\"}");
    let hellos = |lines: &[serde_json::Value]| lines.iter().filter(|l| l["event"] == "hello_refused").count() as u64;
    wait_for("every refusal written or counted", 20, || hellos(&audit_lines(&server)) + dropped() == flood);
    let held = dropped();
    assert!(held > 0, "30 refusals in a burst of 1/s must be limited");
    assert_eq!(metric(&server, "bkp_audit_dropped_total{reason=\"queue_full\"}"), 0);

    // Admin actions in the middle of the flood are all written.
    let admin = server.token("ops", Role::Admin);
    let id = server.push_stdin(&server.token("web01", Role::Push), "db", b"x")["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        let _ = rt.block_on(bkp_client::Client::connect(&cfg));
    }
    ok(server.bkp(&admin).args(["protect", &id]));
    ok(server.bkp(&admin).args(["protect", "--remove", &id]));
    wait_for("the unprotect line", 20, || find(&audit_lines(&server), "unprotect", "ok").is_some());
    assert!(find(&audit_lines(&server), "protect", "ok").is_some());
    // A refusal is audited once the server is done with the connection,
    // which may be after the client gave up: wait for all of them.
    wait_for("the three refusals", 20, || hellos(&audit_lines(&server)) + dropped() == flood + 3);

    // Once the bucket refills, a refusal is written again and carries the
    // count of those held back before it: every refusal is accounted for.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(rt.block_on(bkp_client::Client::connect(&cfg)).is_err());
    let mut lines = Vec::new();
    wait_for("the refusal after the pause", 20, || {
        lines = audit_lines(&server);
        hellos(&lines) + dropped() == flood + 4
    });
    let suppressed: u64 = lines.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
    assert!(lines.last().map(|l| l["event"] == "hello_refused").unwrap_or(false), "{lines:?}");
    assert_eq!(suppressed, dropped(), "the counts in the log add up to the metric: {lines:?}");
}

/// A job's audit line says who started it: through the control socket,
/// the peer's uid and pid as the kernel gives them and the user the CLI
/// runs as; with no server, the CLI itself.
#[test]
fn job_lines_say_who_started_them() {
    let mut server = TestServer::start();
    let run_gc = |server: &TestServer| {
        ok(Command::new(bin("bkp-server"))
            .args(["gc", "--data"])
            .arg(server.data())
            .env_remove("SUDO_USER")
            .env("USER", "alice"))
    };
    run_gc(&server);
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    let mut lines = Vec::new();
    wait_for("the gc line", 20, || {
        lines = audit_lines(&server);
        find(&lines, "gc", "ok").is_some()
    });
    let by = find(&lines, "gc", "ok").unwrap()["by"].as_str().unwrap().to_string();
    let pid: u32 = by
        .strip_prefix(&format!("socket uid={uid} pid="))
        .and_then(|r| r.strip_suffix(" user=alice"))
        .unwrap_or_else(|| panic!("{by}"))
        .parse()
        .unwrap();
    assert_ne!(pid, std::process::id(), "the CLI's pid, not the server's");

    server.stop();
    run_gc(&server);
    let lines = audit_lines(&server);
    let gcs: Vec<_> = lines.iter().filter(|l| l["event"] == "gc").collect();
    assert_eq!(gcs.len(), 2, "{lines:?}");
    assert_eq!(gcs[1]["by"], format!("cli uid={uid} user=alice"), "{lines:?}");
    // Lines of other events carry no `by`.
    assert!(lines.iter().filter(|l| l["event"] != "gc").all(|l| l.get("by").is_none()), "{lines:?}");
}
