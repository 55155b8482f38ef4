//! Alerts: conditions the monitor finds (a stale set, a failed push, a
//! failed or missed job, damaged snapshots, low disk) become notifications
//! when they start and when they end, never on every check.
//!
//! Each firing condition has a key ("stale:web01/pgdump") and a
//! fingerprint of what matters about it (not its wording: "31h ago" changes
//! every check). [`diff`] compares them with what was last notified, kept
//! in the store so a restart does not notify again. A notification that
//! could not be delivered to every target is retried on the next check, so
//! a target may see one twice but never misses one.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `[[alerts.webhooks]]`: an HTTP POST of a JSON body per alert.
    pub webhooks: Vec<Webhook>,
    /// A program run per alert: the JSON body on stdin, the essentials in
    /// `BKP_ALERT_*` variables.
    pub command: Option<Vec<String>>,
    /// Alert when free space on the data directory's filesystem falls
    /// under this percentage.
    pub disk_free_min_percent: f64,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self { webhooks: Vec::new(), command: None, disk_free_min_percent: 10.0, timeout: Duration::from_secs(10) }
    }
}

impl AlertsConfig {
    pub fn check(&self) -> Result<(), String> {
        for w in &self.webhooks {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(format!("alerts webhook url {:?} must start with http:// or https://", w.url));
            }
        }
        if self.command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err("alerts command is empty; give the program and its arguments as a list".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default)]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The [`Event`] as JSON.
    #[default]
    Json,
    /// `{"text": "..."}`, which Slack, Mattermost and Rocket.Chat accept.
    Slack,
}

/// A condition that holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub kind: &'static str,
    pub summary: String,
    pub fingerprint: String,
}

/// What was last notified, by key: kept in the store (its codec is the
/// schema's).
pub use crate::store::schema::{AlertState as State, Notified};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// One notification: the JSON body webhooks receive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub status: Status,
    pub key: String,
    pub kind: String,
    pub summary: String,
    /// When the condition started (RFC 3339).
    pub since: String,
    pub server: String,
}

/// A time in ns since the epoch as RFC 3339 UTC, to the second: how the
/// server prints times everywhere (alerts, the CLI, the status page).
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// The notifications that take `prev` to `now`, each with the state entry
/// it leaves (`None`: the key is cleared).
pub fn diff(prev: &State, now: &[Condition], now_ns: u64, server: &str) -> Vec<(Event, Option<Notified>)> {
    let mut out = Vec::new();
    for c in now {
        let since_ns = match prev.get(&c.key) {
            Some(p) if p.fingerprint == c.fingerprint => continue,
            Some(p) => p.since_ns,
            None => now_ns,
        };
        let n =
            Notified { kind: c.kind.into(), summary: c.summary.clone(), fingerprint: c.fingerprint.clone(), since_ns };
        let ev = Event {
            status: Status::Firing,
            key: c.key.clone(),
            kind: c.kind.into(),
            summary: c.summary.clone(),
            since: rfc3339(since_ns),
            server: server.into(),
        };
        out.push((ev, Some(n)));
    }
    for (key, p) in prev {
        if !now.iter().any(|c| &c.key == key) {
            let ev = Event {
                status: Status::Resolved,
                key: key.clone(),
                kind: p.kind.clone(),
                summary: format!("resolved: {}", p.summary),
                since: rfc3339(p.since_ns),
                server: server.into(),
            };
            out.push((ev, None));
        }
    }
    out
}

/// Sends one event to every target; the error names the ones that failed.
pub fn deliver(cfg: &AlertsConfig, ev: &Event) -> Result<(), String> {
    let mut errors = Vec::new();
    for w in &cfg.webhooks {
        let body = match w.format {
            Format::Json => serde_json::to_value(ev).expect("event to json"),
            Format::Slack => {
                let tag = if ev.status == Status::Firing { "FIRING" } else { "RESOLVED" };
                serde_json::json!({ "text": format!("[bkp {tag}] {} ({})", ev.summary, ev.server) })
            }
        };
        let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
        if let Err(e) = agent.post(&w.url).send_json(body) {
            errors.push(format!("webhook {}: {e}", w.url));
        }
    }
    if let Some(cmd) = &cfg.command {
        if let Err(e) = run_command(cmd, ev, cfg.timeout) {
            errors.push(format!("command {}: {e}", cmd[0]));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn run_command(cmd: &[String], ev: &Event, timeout: Duration) -> Result<(), String> {
    let status = if ev.status == Status::Firing { "firing" } else { "resolved" };
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("BKP_ALERT_STATUS", status)
        .env("BKP_ALERT_KEY", &ev.key)
        .env("BKP_ALERT_KIND", &ev.kind)
        .env("BKP_ALERT_SUMMARY", &ev.summary)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(ev).expect("event to json");
    // A program that ignores its stdin is fine.
    let _ = child.stdin.take().expect("piped stdin").write_all(&body);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) if s.success() => return Ok(()),
            Some(s) => return Err(format!("exited with {s}")),
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {timeout:?}; killed"));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(key: &str, fp: &str, summary: &str) -> Condition {
        Condition { key: key.into(), kind: "stale", summary: summary.into(), fingerprint: fp.into() }
    }

    fn apply(state: &mut State, evs: &[(Event, Option<Notified>)]) {
        for (e, n) in evs {
            match n {
                Some(n) => state.insert(e.key.clone(), n.clone()),
                None => state.remove(&e.key),
            };
        }
    }

    #[test]
    fn one_notification_per_change() {
        let mut st = State::new();
        let c = cond("stale:a/db", "stale", "a/db: last backup 31h ago");
        let evs = diff(&st, std::slice::from_ref(&c), 10, "srv");
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].0.status, Status::Firing);
        apply(&mut st, &evs);
        // The wording changes every check; the fingerprint does not.
        let later = cond("stale:a/db", "stale", "a/db: last backup 32h ago");
        assert!(diff(&st, &[later], 20, "srv").is_empty());
        // What matters changed: notified again, since kept.
        let worse = cond("stale:a/db", "stale2", "x");
        let evs = diff(&st, &[worse], 30, "srv");
        assert_eq!((evs.len(), evs[0].1.as_ref().unwrap().since_ns), (1, 10));
        apply(&mut st, &evs);
        // Recovered: one resolved, then silence.
        let evs = diff(&st, &[], 40, "srv");
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].0.status, Status::Resolved);
        assert!(evs[0].0.summary.starts_with("resolved: "));
        apply(&mut st, &evs);
        assert!(diff(&st, &[], 50, "srv").is_empty());
    }

    #[test]
    fn config_checks_targets() {
        let c: AlertsConfig = toml::from_str("[[webhooks]]\nurl = \"ftp://x\"").unwrap();
        assert!(c.check().is_err());
        let c: AlertsConfig =
            toml::from_str("command = [\"/bin/true\"]\n[[webhooks]]\nurl = \"https://h/x\"\nformat = \"slack\"")
                .unwrap();
        assert!(c.check().is_ok());
        assert_eq!(c.webhooks[0].format, Format::Slack);
        assert!(toml::from_str::<AlertsConfig>("[[webhooks]]\nurl = \"http://x\"\nformat = \"xml\"").is_err());
    }

    #[test]
    fn command_target_gets_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let script = format!("cat > {}; test \"$BKP_ALERT_STATUS\" = firing", out.display());
        let cfg = AlertsConfig { command: Some(vec!["sh".into(), "-c".into(), script]), ..Default::default() };
        let ev = diff(&State::new(), &[cond("k", "f", "s")], 0, "srv").remove(0).0;
        deliver(&cfg, &ev).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got["key"], "k");
        let fail = AlertsConfig { command: Some(vec!["false".into()]), ..Default::default() };
        assert!(deliver(&fail, &ev).is_err());
    }
}
