//! Backup definitions: `bkp run NAME` and `bkp run --all` with a tree, a
//! dump command and hooks from a client.toml, through a real server. The
//! after hook writes its environment to a file the test reads; a failing
//! before hook commits nothing, exits 1 and is reported to the server.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use bkp_common::protocol::Role;
use bkp_tests::{json, ok, TestServer};

use crate::monitoring::{toml_config, wait_for};

/// The `BKP_*` variables an after hook wrote with `env`.
fn env_file(p: &Path) -> BTreeMap<String, String> {
    let text = fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn definitions_run_with_hooks_and_a_failing_before_hook_commits_nothing() {
    let cfg = "cache_mb = 16\n[monitor]\nlisten = \"127.0.0.1:0\"\ncheck_interval = \"200ms\"\n";
    let server = TestServer::start_with(toml_config(cfg));
    let token = server.token("web01", Role::Push);
    let work = tempfile::tempdir().unwrap();
    let w = fs::canonicalize(work.path()).unwrap();
    let src = w.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/keep.txt"), b"kept\n").unwrap();
    fs::write(src.join("d/junk.tmp"), b"junk\n").unwrap();
    let config = w.join("client.toml");
    let after = |name: &str| format!("env | grep ^BKP_ > {}/{name}.env", w.display());
    fs::write(
        &config,
        format!(
            r#"
[[backup]]
name = "files"
paths = ["{src}"]
excludes = ["*.tmp"]
before = "echo ran > {w}/before-ran"
after = "{after_files}"

[[backup]]
name = "dump"
command = ["sh", "-c", "printf 'the dump %s' \"$((6 * 7))\""]
after = "{after_dump}"

[[backup]]
name = "broken"
paths = ["{src}"]
before = "echo 'not today' >&2; exit 7"
after = "{after_broken}"
"#,
            src = src.display(),
            w = w.display(),
            after_files = after("files"),
            after_dump = after("dump"),
            after_broken = after("broken"),
        ),
    )
    .unwrap();
    let bkp = || {
        let mut c = server.bkp(&token);
        c.arg("--config").arg(&config);
        c
    };

    let out = ok(bkp().args(["run", "files"]));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "silent on success: {out:?}");
    assert!(w.join("before-ran").exists(), "the before hook ran");
    let env = env_file(&w.join("files.env"));
    assert_eq!(env["BKP_RESULT"], "ok", "{env:?}");
    assert_eq!((env["BKP_NAME"].as_str(), env["BKP_EXIT_CODE"].as_str()), ("files", "0"), "{env:?}");
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json", "--name", "files"])));
    assert_eq!(list[0]["id"], env["BKP_SNAPSHOT"].as_str(), "the hook got the committed snapshot: {list}");
    let ls = String::from_utf8(ok(server.bkp(&token).args(["ls", "latest", "--name", "files"])).stdout).unwrap();
    assert!(ls.contains("d/keep.txt") && !ls.contains("junk.tmp"), "{ls}");

    ok(bkp().args(["run", "dump"]));
    let dumped = ok(server.bkp(&token).args(["restore", "latest", "--name", "dump", "--stdout"]));
    assert_eq!(dumped.stdout, b"the dump 42");
    assert_eq!(env_file(&w.join("dump.env"))["BKP_RESULT"], "ok");

    let out = bkp().args(["run", "broken"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not today") && err.contains("before hook failed") && err.contains("nothing was pushed"),
        "{err}"
    );
    let env = env_file(&w.join("broken.env"));
    assert_eq!((env["BKP_RESULT"].as_str(), env["BKP_EXIT_CODE"].as_str()), ("failed", "1"), "{env:?}");
    assert!(env["BKP_ERROR"].contains("before hook failed") && !env.contains_key("BKP_SNAPSHOT"), "{env:?}");
    let list = json(&ok(server.bkp(&token).args(["snapshots", "--json", "--name", "broken"])));
    assert!(list.as_array().unwrap().is_empty(), "a failed before hook committed: {list}");
    // The server was told, as of a failed dump: it alerts now.
    let http = server.state().monitor().http_addr.lock().unwrap().expect("metrics endpoint bound");
    let metrics = || ureq::get(&format!("http://{http}/metrics")).call().unwrap().into_string().unwrap();
    wait_for("the failure report", 20, || {
        metrics().contains("bkp_push_failures_total{host=\"web01\",name=\"broken\"} 1")
    });

    // --all: every definition, on after the failure, the worst code; one
    // JSON line each.
    let out = bkp().args(["--json", "run", "--all"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let results: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["name"].as_str().unwrap(), l["result"].as_str().unwrap())).collect();
    assert_eq!(results, [("files", "ok"), ("dump", "ok"), ("broken", "failed")]);
    let count = |name: &str| {
        json(&ok(server.bkp(&token).args(["snapshots", "--json", "--name", name]))).as_array().unwrap().len()
    };
    assert_eq!((count("files"), count("dump"), count("broken")), (2, 2, 0));

    // A name that is not defined says which are.
    let out = bkp().args(["run", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("defined: files, dump, broken"), "{out:?}");
}
