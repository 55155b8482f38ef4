//! Issue 15, the policy part: what an attacker holding a push token, or a
//! local account on the server, or a crafted file name, could do before.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bkp_common::protocol::Role;
use bkp_server::config::ServerConfig;
use bkp_server::prune::{prune, prune_plan};
use bkp_server::retention::Reason;
use bkp_tests::{bin, json, ok, random_bytes, ServerProcess, TestServer};

fn ids(server: &TestServer, token: &Path) -> Vec<String> {
    let list = json(&ok(server.bkp(token).args(["snapshots", "--json"])));
    list.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn protected_snapshot_cannot_be_forgotten() {
    let server = TestServer::start();
    let push = server.token("web01", Role::Push);
    let admin = server.token("ops", Role::Admin);
    let id = server.push_stdin(&push, "db", b"precious")["snapshot"]["id"].as_str().unwrap().to_string();
    ok(server.bkp(&admin).args(["protect", &id]));

    let out = server.bkp(&admin).args(["forget", &id]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "forget of a protected snapshot succeeded");
    assert!(err.contains("is protected") && err.contains(&format!("bkp protect {} --remove", &id[..8])), "{err}");
    assert_eq!(ids(&server, &push), std::slice::from_ref(&id), "still listed");

    ok(server.bkp(&admin).args(["protect", &id, "--remove"]));
    ok(server.bkp(&admin).args(["forget", &id]));
    assert!(ids(&server, &push).is_empty());
}

#[test]
fn prune_keeps_a_snapshot_protected_after_its_plan_was_made() {
    let mut cfg = ServerConfig { cache_mb: 16, ..Default::default() };
    cfg.retention.default.keep_last = 1;
    cfg.retention.default.min_age = std::time::Duration::ZERO;
    let server = TestServer::start_with(cfg);
    let push = server.token("web01", Role::Push);
    let admin = server.token("ops", Role::Admin);
    let old = server.push_stdin(&push, "db", b"one")["snapshot"]["id"].as_str().unwrap().to_string();
    server.push_stdin(&push, "db", b"two");

    let state = server.state();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let plan = prune_plan(state.store().as_ref(), &state.config().retention, now).unwrap();
    let removed: Vec<String> = plan[0].verdicts.iter().filter(|v| !v.kept()).map(|v| v.id.to_string()).collect();
    assert_eq!(removed, std::slice::from_ref(&old), "the plan removes the older one");
    // The operator protects it while the prune is under way.
    ok(server.bkp(&admin).args(["protect", &old]));
    let report = prune(state.store().as_ref(), plan, false).unwrap();
    assert_eq!((report.kept, report.removed), (2, 0));
    let v = report.plan[0].verdicts.iter().find(|v| v.id.to_string() == old).unwrap();
    assert_eq!(v.keep, [Reason::Protected]);
    assert_eq!(ids(&server, &push).len(), 2, "protected snapshot was pruned");
    assert_eq!(ok(server.bkp(&push).args(["restore", &old, "--stdout"])).stdout, b"one");
}

/// The README's example policy, a real backup, then an attacker with the
/// host's stolen cron token pushing junk into the same set before the
/// scheduled prune.
#[test]
fn junk_pushes_from_a_stolen_push_token_do_not_get_the_real_snapshot_pruned() {
    let mut cfg = ServerConfig { cache_mb: 16, ..Default::default() };
    // min_age is left at its default, as in the README.
    let p = &mut cfg.retention.default;
    (p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly) = (3, 14, 8, 12);
    let server = TestServer::start_with(cfg);
    let push = server.token("web01", Role::Push);
    let real = random_bytes(3 << 20, 15);
    let real_id = server.push_stdin(&push, "pgdump", &real)["snapshot"]["id"].as_str().unwrap().to_string();
    for i in 0..3 {
        server.push_stdin(&push, "pgdump", format!("junk {i}").as_bytes());
    }
    let pruned = json(&server.admin(&["prune", "--json"]));
    assert_eq!(pruned["figures"]["removed"], 0, "{pruned}");
    assert_eq!(ids(&server, &push).len(), 4);
    assert_eq!(ok(server.bkp(&push).args(["restore", &real_id, "--stdout"])).stdout, real, "real snapshot lost");
    let text = String::from_utf8(server.admin(&["prune", "--dry-run"]).stdout).unwrap();
    assert!(text.contains("min_age"), "{text}");
}

/// Every file and directory below `dir` whose mode gives group or other
/// users any access, with its mode.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let m = std::fs::symlink_metadata(&d).unwrap();
        if m.permissions().mode() & 0o077 != 0 {
            out.push((d.clone(), m.permissions().mode() & 0o7777));
        }
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn data_directory_is_private_after_init_and_push() {
    let mut server = ServerProcess::init();
    let data = server.dir.path().to_path_buf();
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(open_to_others(&data), [], "after init");

    let token = server.token("web01", "push");
    // The harness writes the token file there, not the server.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    server.serve(&[]);
    // Big enough to skip the WAL, so the commit flushes it to a blob file.
    let secret = random_bytes(4 << 20, 99);
    let mut child = server
        .bkp(&token)
        .args(["push", "--stdin", "--name", "db"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &secret).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = data.join("db");
    assert!(std::fs::read_dir(&db).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "blob")));
    assert_eq!(open_to_others(&data), [], "after a push");
    server.kill();
    assert_eq!(open_to_others(&data), [], "after the server stopped");

    // A directory made wider by hand gets a warning at start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new(bin("bkp-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("listening on");
        seen.push(line);
        if done {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let warned = seen.iter().any(|l| l.contains("open to other users") && l.contains("chmod -R go="));
    assert!(warned, "no warning about mode 0755: {seen:#?}");
}

#[test]
fn ls_escapes_control_characters_in_names() {
    let server = TestServer::start();
    let token = server.token("web01", Role::Push);
    let src = tempfile::tempdir().unwrap();
    let evil = "evil\x1b[2J\x1b]0;pwned\x07name";
    std::fs::write(src.path().join(evil), b"x").unwrap();
    std::fs::write(src.path().join("back\\slash"), b"x").unwrap();
    ok(server.bkp(&token).arg("push").arg(src.path()));
    let out = ok(server.bkp(&token).args(["ls", "latest"]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.bytes().any(|b| b == 0x1b || b == 0x07), "raw control bytes in: {text:?}");
    assert!(text.contains("evil\\x1b[2J\\x1b]0;pwned\\x07name"), "{text}");
    assert!(text.contains("back\\\\slash"), "{text}");
    // JSON keeps the real name (escaped the JSON way).
    let out = ok(server.bkp(&token).args(["ls", "latest", "--json"]));
    assert!(!out.stdout.contains(&0x1b));
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].as_str().unwrap().to_string())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(evil)), "{names:?}");
}

#[test]
fn max_pushes_per_day_bounds_what_a_push_token_adds_to_a_set() {
    let server = TestServer::start_with(ServerConfig { cache_mb: 16, max_pushes_per_day: 2, ..Default::default() });
    let push = server.token("web01", Role::Push);
    server.push_stdin(&push, "db", b"one");
    server.push_stdin(&push, "db", b"two");
    let mut child = server
        .bkp(&push)
        .args(["push", "--stdin", "--name", "db"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"three").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a third push in a day was committed");
    assert!(err.contains("web01/db already has 2 snapshots") && err.contains("max_pushes_per_day"), "{err}");
    // Another set has its own budget.
    server.push_stdin(&push, "files", b"x");
    assert_eq!(ids(&server, &push).len(), 3);
}
