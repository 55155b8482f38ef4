//! Status at a glance: `bkp-server status --json` through the control
//! socket, the HTML page at `/`, and that page in a real headless
//! Chromium, with one stale set and one damaged snapshot.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_tests::{bin, random_bytes, TestServer};

use crate::monitoring::{toml_config, wait_for};
use crate::verify::first_data_chunk;

const CONFIG: &str = "cache_mb = 16\n[monitor]\nlisten = \"127.0.0.1:0\"\ncheck_interval = \"200ms\"\n\
    [freshness.sets.\"web01/old\"]\ninterval = \"1s\"\ngrace = \"0s\"\n\
    [freshness.sets.\"web01/db\"]\ninterval = \"1h\"\n";

fn status_json(server: &TestServer, args: &[&str]) -> (bool, String, serde_json::Value) {
    let out = Command::new(bin("bkp-server"))
        .args(["status", "--json", "--data"])
        .arg(server.data())
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    (out.status.success(), err, v)
}

/// The `<tr>` that starts at attribute `attr` (`data-set="host/name"`,
/// `data-snapshot="ID"`) in `html`, up to its `</tr>`.
fn row<'a>(html: &'a str, attr: &str) -> &'a str {
    let start = html.find(attr).unwrap_or_else(|| panic!("no {attr} in {html}"));
    let end = html[start..].find("</tr>").map_or(html.len(), |e| start + e);
    &html[start..end]
}

fn chromium() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("chromium"))
        .find(|p| p.exists())
        .expect("chromium is not installed: run scripts/install-deps.sh test (the status page is checked in it)")
}

/// Runs headless Chromium on `url` with `args`, within a deadline.
fn browse(profile: &Path, url: &str, args: &[String]) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "chromium {args:?} exited with {st}");
            break;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap().unwrap()
}

#[test]
fn status_shows_a_stale_set_and_a_damaged_snapshot_on_the_cli_the_page_and_in_a_browser() {
    let mut server = start_and_damage();
    let bad = server.state().store().damaged().unwrap()[0].0.to_hex();
    check_page(&server, &bad);

    // With the server stopped, `status` opens the store itself, with the
    // config it is given.
    server.stop();
    assert!(!bkp_server::control::socket_path(server.data()).exists());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let cfg = cfg.to_str().unwrap();
    let (_, _, v) = status_json(&server, &["--config", cfg]);
    assert_eq!(v["damaged"][0]["id"], bad.as_str(), "{v}");
    let old = v["sets"].as_array().unwrap().iter().find(|s| s["name"] == "old").cloned().unwrap();
    assert_eq!(old["freshness"], "stale", "{v}");
    // The text form says the same.
    let out = Command::new(bin("bkp-server"))
        .args(["status", "--config", cfg, "--data"])
        .arg(server.data())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    let line = text.lines().find(|l| l.starts_with("web01/old ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" stale "), "{text}");
    let line = text.lines().find(|l| l.starts_with("web01/db ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("fresh, 1 damaged"), "{text}");
    assert!(text.contains(&format!("damaged snapshot {}", &bad[..8])), "{text}");
    assert!(text.contains("ALERT stale: web01/old: last backup"), "{text}");
}

/// A server with sets `old` (stale after a second) and `db` (two
/// snapshots, the newest damaged), checked through `status --json`.
fn start_and_damage() -> TestServer {
    let cfg = toml_config(CONFIG);
    let server = TestServer::start_with(cfg);
    let tok = server.token("web01", Role::Push);
    server.push_stdin(&tok, "old", b"yesterday's dump\n");
    let data = random_bytes(3 << 20, 7);
    let good = server.push_stdin(&tok, "db", &data)["snapshot"]["id"].as_str().unwrap().to_string();
    let bad = server.push_stdin(&tok, "db", &random_bytes(3 << 20, 8))["snapshot"]["id"].as_str().unwrap().to_string();

    // Before any damage: `db` is fresh and whole.
    let (_, _, v) = status_json(&server, &[]);
    let db = v["sets"].as_array().unwrap().iter().find(|s| s["name"] == "db").cloned().unwrap();
    assert_eq!(db["freshness"], "fresh", "{v}");
    assert_eq!(db["snapshots"], 2);
    assert_eq!(db["newest_id"], bad.as_str());
    assert_eq!(db["damaged"], 0);
    assert_eq!(v["damaged"].as_array().unwrap().len(), 0);

    // A chunk only the newest `db` snapshot has goes bad; verify finds
    // and records the damage.
    let lost = first_data_chunk(&server, &bad);
    server.state().store().quarantine_chunk(&lost, "test: bit rot", 1).unwrap();
    let out = Command::new(bin("bkp-server"))
        .args(["verify", "--sample", "1", "--json", "--data"])
        .arg(server.data())
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify must find the damage: {}", String::from_utf8_lossy(&out.stdout));

    wait_for("web01/old to go stale", 20, || {
        let (_, _, v) = status_json(&server, &[]);
        v["sets"].as_array().unwrap().iter().any(|s| s["name"] == "old" && s["freshness"] == "stale")
    });
    let (ok, err, v) = status_json(&server, &[]);
    assert!(!ok, "firing alerts make status exit non-zero: {v}");
    assert!(err.contains("alert(s) firing"), "{err}");
    let set = |n: &str| v["sets"].as_array().unwrap().iter().find(|s| s["name"] == n).cloned().unwrap();
    assert_eq!(set("old")["freshness"], "stale");
    assert_eq!(set("db")["freshness"], "fresh");
    assert_eq!(set("db")["damaged"], 1);
    let hist: Vec<(String, bool)> = set("db")["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap().to_string(), p["damaged"].as_bool().unwrap()))
        .collect();
    assert_eq!(hist, vec![(good.clone(), false), (bad.clone(), true)]);
    assert_eq!(v["damaged"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["damaged"][0]["id"], bad.as_str());
    let keys: Vec<&str> = v["alerts"].as_array().unwrap().iter().map(|a| a["key"].as_str().unwrap()).collect();
    assert!(keys.contains(&"stale:web01/old") && keys.contains(&"damaged"), "{keys:?}");
    let verify_job = v["jobs"].as_array().unwrap().iter().find(|j| j["kind"] == "verify").cloned().unwrap();
    assert_eq!(verify_job["last"]["ok"], false, "{verify_job}");
    assert_eq!(v["verify"]["drill_snapshots"], 3);
    assert_eq!(v["quarantined_chunks"], 1);
    assert!(v["space"]["chunks"].as_u64().unwrap() >= 2);
    server
}

fn check_page(server: &TestServer, bad: &str) {
    // The page, over HTTP.
    let http = server.state().monitor().http_addr.lock().unwrap().expect("monitor endpoint bound");
    let url = format!("http://{http}/");
    let resp = ureq::get(&url).call().unwrap();
    assert_eq!(resp.content_type(), "text/html");
    let html = resp.into_string().unwrap();
    assert!(html.contains(r#"<meta http-equiv="refresh" content="60">"#));
    assert!(!html.contains("<script"), "no JavaScript");
    assert!(row(&html, r#"data-set="web01/old""#).contains(r#"class="stale">stale"#), "{html}");
    assert!(row(&html, r#"data-set="web01/db""#).contains(r#"class="fresh">fresh"#), "{html}");
    assert!(row(&html, &format!(r#"data-snapshot="{bad}""#)).contains("damaged"), "{html}");
    // Two bars in db's chart, the newest one red.
    let db_row = row(&html, r#"data-set="web01/db""#);
    assert_eq!(db_row.matches("<rect ").count(), 2, "{db_row}");
    assert_eq!(db_row.matches(r#"class="snap damaged""#).count(), 1, "{db_row}");

    // And in a real browser: the DOM it built, and a screenshot.
    let profile = tempfile::tempdir().unwrap();
    let dom = browse(profile.path(), &url, &["--dump-dom".into()]);
    assert!(row(&dom, r#"data-set="web01/old""#).contains(r#"class="stale">stale"#), "{dom}");
    assert!(row(&dom, &format!(r#"data-snapshot="{bad}""#)).contains(&format!("{} damaged", &bad[..8])), "{dom}");
    assert_eq!(row(&dom, r#"data-set="web01/db""#).matches(r#"class="snap damaged""#).count(), 1, "{dom}");
    let shot = profile.path().join("status.png");
    browse(
        tempfile::tempdir().unwrap().path(),
        &url,
        &[format!("--screenshot={}", shot.display()), "--window-size=1200,900".into()],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 5_000, "a page, not a blank image: {} bytes", png.len());
}
