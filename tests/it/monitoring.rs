//! Monitoring: stale-set alerts reach a webhook once and clear after the
//! next push; a failed push is alerted at once; a real Prometheus scrapes
//! `/metrics`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_server::config::ServerConfig;
use bkp_tests::TestServer;

/// A webhook receiver on loopback: keeps every JSON body POSTed to it.
pub(crate) fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_ok() {
                if let Ok(v) = serde_json::from_slice(&body) {
                    g.lock().unwrap().push(v);
                }
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, got)
}

pub(crate) fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn events(got: &Mutex<Vec<serde_json::Value>>, key: &str, status: &str) -> usize {
    got.lock().unwrap().iter().filter(|e| e["key"] == key && e["status"] == status).count()
}

#[test]
fn stale_set_alerts_once_and_clears_after_the_next_push() {
    let (url, got) = webhook();
    let cfg: ServerConfig = toml_config(&format!(
        "cache_mb = 16\n[monitor]\ncheck_interval = \"200ms\"\n[freshness.sets.\"web01/pgdump\"]\ninterval = \"2s\"\ngrace = \"1s\"\n[[alerts.webhooks]]\nurl = \"{url}\"\n"
    ));
    let server = TestServer::start_with(cfg);
    let tok = server.token("web01", Role::Push);
    server.push_stdin(&tok, "pgdump", b"SELECT 1;\n");
    // Fresh for 3 s: nothing yet.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(events(&got, "stale:web01/pgdump", "firing"), 0);
    wait_for("the stale alert", 15, || events(&got, "stale:web01/pgdump", "firing") > 0);
    let first = got.lock().unwrap().iter().find(|e| e["key"] == "stale:web01/pgdump").cloned().unwrap();
    assert!(first["summary"].as_str().unwrap().starts_with("web01/pgdump: last backup"), "{first}");
    // Many checks later, still exactly one.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(events(&got, "stale:web01/pgdump", "firing"), 1);
    server.push_stdin(&tok, "pgdump", b"SELECT 2;\n");
    wait_for("the resolved alert", 10, || events(&got, "stale:web01/pgdump", "resolved") > 0);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(events(&got, "stale:web01/pgdump", "firing"), 1);
    assert_eq!(events(&got, "stale:web01/pgdump", "resolved"), 1);
}

#[test]
fn a_failed_dump_is_recorded_counted_and_alerted_at_once() {
    let (url, got) = webhook();
    // One check interval is 30 s: the alert must not wait for it.
    let cfg = toml_config(&format!(
        "cache_mb = 16\n[monitor]\nlisten = \"127.0.0.1:0\"\ncheck_interval = \"30s\"\n[[alerts.webhooks]]\nurl = \"{url}\"\n"
    ));
    let server = TestServer::start_with(cfg);
    let tok = server.token("web01", Role::Push);
    let http = server.state().monitor().http_addr.lock().unwrap().expect("metrics endpoint bound");
    let metrics = || ureq::get(&format!("http://{http}/metrics")).call().unwrap().into_string().unwrap();
    let started = Instant::now();
    let out =
        server.bkp(&tok).args(["push", "--name", "pgdump", "--", "sh", "-c", "echo partial; exit 3"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no snapshot was committed"), "{stderr}");
    wait_for("the push-failure alert", 25, || events(&got, "push:web01/pgdump", "firing") == 1);
    assert!(started.elapsed() < Duration::from_secs(30), "alerted within one check interval");
    let ev = got.lock().unwrap().iter().find(|e| e["key"] == "push:web01/pgdump").cloned().unwrap();
    let summary = ev["summary"].as_str().unwrap();
    assert!(summary.starts_with("web01/pgdump: push failed at "), "{ev}");
    assert!(summary.contains("exit status: 3") && summary.contains("no backup of this set yet"), "{ev}");
    let text = metrics();
    assert!(text.contains("bkp_push_failures_total{host=\"web01\",name=\"pgdump\"} 1"), "{text}");
    assert!(text.contains("bkp_push_failing{host=\"web01\",name=\"pgdump\"} 1"), "{text}");
    assert!(text.contains("bkp_push_last_failure_timestamp_seconds{host=\"web01\",name=\"pgdump\"}"), "{text}");

    // The next good push clears it; the count stays.
    server.push_stdin(&tok, "pgdump", b"SELECT 1;\n");
    wait_for("the resolved alert", 25, || events(&got, "push:web01/pgdump", "resolved") == 1);
    let text = metrics();
    assert!(text.contains("bkp_push_failing{host=\"web01\",name=\"pgdump\"} 0"), "{text}");
    assert!(text.contains("bkp_push_failures_total{host=\"web01\",name=\"pgdump\"} 1"), "{text}");
}

pub(crate) fn toml_config(text: &str) -> ServerConfig {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("server.toml");
    std::fs::write(&p, text).unwrap();
    ServerConfig::load(&p).unwrap()
}

struct Prometheus(Child);
impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn prometheus_scrapes_the_metrics() {
    let mut cfg = toml_config("cache_mb = 16\n[monitor]\nlisten = \"127.0.0.1:0\"\n");
    cfg.cache_mb = 16;
    let server = TestServer::start_with(cfg);
    let tok = server.token("db01", Role::Push);
    server.push_stdin(&tok, "pgdump", &bkp_tests::dump_like(20_000, 1));
    server.push_stdin(&tok, "pgdump", &bkp_tests::dump_like(20_000, 2));
    let http = server.state().monitor().http_addr.lock().unwrap().expect("metrics endpoint bound");
    let health = ureq::get(&format!("http://{http}/healthz")).call().unwrap();
    assert_eq!(health.status(), 200);
    let text = ureq::get(&format!("http://{http}/metrics")).call().unwrap().into_string().unwrap();
    assert!(text.contains("bkp_snapshots{host=\"db01\",name=\"pgdump\"} 2"), "{text}");
    assert!(text.contains("bkp_pushes_total{host=\"db01\",name=\"pgdump\",result=\"ok\"} 2"), "{text}");

    let prom = which("prometheus").expect("prometheus is not installed: run scripts/install-deps.sh test");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("prometheus.yml");
    std::fs::write(
        &conf,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: bkp\n    static_configs:\n      - targets: ['{http}']\n"),
    )
    .unwrap();
    let port = free_port();
    let _p = Prometheus(
        Command::new(prom)
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let query = |q: &str| -> Option<serde_json::Value> {
        let r = ureq::get(&format!("http://127.0.0.1:{port}/api/v1/query")).query("query", q).call().ok()?;
        let v: serde_json::Value = r.into_json().ok()?;
        v["data"]["result"].as_array().filter(|a| !a.is_empty()).map(|a| a[0].clone())
    };
    let mut found = None;
    wait_for("Prometheus to scrape bkp", 60, || {
        found = query("bkp_snapshots{host=\"db01\",name=\"pgdump\"}");
        found.is_some()
    });
    let v = found.unwrap();
    assert_eq!(v["value"][1], "2", "{v}");
    let up = query("up{job=\"bkp\"}").unwrap();
    assert_eq!(up["value"][1], "1");
    let ratio = query("bkp_compression_ratio").unwrap();
    assert!(ratio["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 1.5, "{ratio}");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.exists())
}
