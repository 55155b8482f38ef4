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
//!
//! Targets: webhooks, a command, and mail through the local sendmail
//! ([`email`]). Each program gets `timeout` to finish and is killed after.

pub mod email;
mod event;

pub use event::{Event, Status};

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `[[alerts.webhooks]]`: an HTTP POST of a JSON body per alert.
    pub webhooks: Vec<Webhook>,
    /// A program run per alert: the JSON body on stdin, the essentials in
    /// `BKP_ALERT_*` variables.
    pub command: Option<Vec<String>>,
    /// `[[alerts.email]]`: a mail per alert through the local sendmail.
    pub email: Vec<email::Email>,
    /// Alert when free space on the data directory's filesystem falls
    /// under this percentage.
    pub disk_free_min_percent: f64,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            command: None,
            email: Vec::new(),
            disk_free_min_percent: 10.0,
            timeout: Duration::from_secs(10),
        }
    }
}

/// An `[alerts]` setting the server refuses. Fix it in server.toml: a
/// retry cannot help.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AlertsConfigError {
    #[error("alerts webhook url {0:?} must start with http:// or https://")]
    WebhookUrl(String),
    #[error("alerts command is empty; give the program and its arguments as a list")]
    EmptyCommand,
    #[error(transparent)]
    Email(#[from] email::EmailConfigError),
}

impl AlertsConfig {
    pub fn check(&self) -> Result<(), AlertsConfigError> {
        for w in &self.webhooks {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(AlertsConfigError::WebhookUrl(w.url.clone()));
            }
        }
        if self.command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(AlertsConfigError::EmptyCommand);
        }
        Ok(self.email.iter().try_for_each(email::Email::check)?)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
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

/// One target that did not take an alert.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("webhook {url}: {error}")]
    Webhook { url: String, error: String },
    #[error("command {program}: {error}")]
    Command { program: String, error: ProgramError },
    #[error("email to {to} via {program}: {error}")]
    Email { to: String, program: String, error: ProgramError },
}

/// An alert some targets did not take (the others did). The monitor
/// tries it again at its next check, so a target that was down gets it
/// late rather than never: retrying helps unless the target is
/// misconfigured, which the message shows.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct DeliveryError(pub Vec<TargetError>);

/// Why a command or sendmail target failed.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("{0}")]
    Start(std::io::Error),
    #[error("exited with {status}{}", if .said.is_empty() { String::new() } else { format!(": {}", .said) })]
    Exited { status: std::process::ExitStatus, said: String },
    #[error("still running after {0:?}; killed")]
    Timeout(Duration),
}

/// Sends one event to every target; the error names the ones that failed.
pub fn deliver(cfg: &AlertsConfig, ev: &Event) -> Result<(), DeliveryError> {
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
            errors.push(TargetError::Webhook { url: w.url.clone(), error: e.to_string() });
        }
    }
    if let Some(cmd) = &cfg.command {
        let status = if ev.status == Status::Firing { "firing" } else { "resolved" };
        let env = [
            ("BKP_ALERT_STATUS", status),
            ("BKP_ALERT_KEY", &ev.key),
            ("BKP_ALERT_KIND", &ev.kind),
            ("BKP_ALERT_SUMMARY", &ev.summary),
        ];
        let body = serde_json::to_vec(ev).expect("event to json");
        if let Err(error) = run_program(&cmd[0], &cmd[1..], &env, &body, cfg.timeout) {
            errors.push(TargetError::Command { program: cmd[0].clone(), error });
        }
    }
    let date = chrono::Utc::now().to_rfc2822();
    for m in &cfg.email {
        let msg = m.message(ev, &date);
        let program = m.sendmail_path.to_string_lossy();
        if let Err(error) = run_program(&program, &["-t".into(), "-oi".into()], &[], msg.as_bytes(), cfg.timeout) {
            errors.push(TargetError::Email { to: m.to.join(", "), program: program.into_owned(), error });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DeliveryError(errors))
    }
}

/// Runs a program with `stdin` as its input, waiting at most `timeout`.
/// The error has the exit status and the start of what it wrote to stderr.
fn run_program(
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    stdin: &[u8],
    timeout: Duration,
) -> Result<(), ProgramError> {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ProgramError::Start)?;
    // A program that ignores its stdin is fine; its exit status decides.
    let _ = child.stdin.take().expect("piped stdin").write_all(stdin);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(ProgramError::Start)? {
            Some(s) if s.success() => return Ok(()),
            Some(status) => {
                let said = child.stderr.take().map(stderr_start).unwrap_or_default();
                return Err(ProgramError::Exited { status, said });
            }
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProgramError::Timeout(timeout));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The first line of what an exited program left in its stderr pipe, read
/// without blocking: a child it forked (sendmail's background delivery)
/// may still hold the pipe open.
fn stderr_start(mut pipe: std::process::ChildStderr) -> String {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let fd = pipe.as_raw_fd();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0);
    let nonblocking = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(nonblocking)).is_err() {
        return String::new();
    }
    let mut buf = vec![0; 4096];
    let n = pipe.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    bkp_common::names::prefix_within(first, 300).chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
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
        assert_eq!(c.check(), Err(AlertsConfigError::WebhookUrl("ftp://x".into())));
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

    fn fake_sendmail(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("sendmail");
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn email_target_runs_sendmail_with_the_message_and_reports_its_failures() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let ok = fake_sendmail(dir.path(), &format!("printf '%s\\n' \"$@\" > {d}/args; cat > {d}/mail"));
        let target = |path: std::path::PathBuf| email::Email {
            to: vec!["ops@example.com".into()],
            from: "bkp@example.com".into(),
            subject_prefix: "[bkp]".into(),
            sendmail_path: path,
        };
        let cfg = AlertsConfig { email: vec![target(ok)], ..Default::default() };
        let ev = diff(&State::new(), &[cond("stale:a/db", "f", "a/db: last backup 31h ago")], 0, "srv").remove(0).0;
        deliver(&cfg, &ev).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("args")).unwrap(), "-t\n-oi\n");
        let mail = std::fs::read_to_string(dir.path().join("mail")).unwrap();
        assert!(
            mail.starts_with("From: bkp@example.com\nTo: ops@example.com\nSubject: [bkp] FIRING stale:a/db on srv\n")
        );
        assert!(mail.contains("\n\na/db: last backup 31h ago\n"), "{mail}");

        // A refusal names the target and says what sendmail said.
        let bad = fake_sendmail(dir.path(), "echo 'sendmail: fatal: no such user' >&2; exit 75");
        let cfg = AlertsConfig { email: vec![target(bad)], ..Default::default() };
        let e = deliver(&cfg, &ev).unwrap_err().to_string();
        assert!(e.starts_with("email to ops@example.com via ") && e.ends_with("sendmail: fatal: no such user"), "{e}");
        // One that hangs is killed at the timeout.
        let hang = fake_sendmail(dir.path(), "exec sleep 30");
        let cfg = AlertsConfig { email: vec![target(hang)], timeout: Duration::from_millis(300), ..Default::default() };
        let t = std::time::Instant::now();
        let e = deliver(&cfg, &ev).unwrap_err().to_string();
        assert!(e.contains("still running after 300ms; killed") && t.elapsed() < Duration::from_secs(10), "{e}");
        let missing = AlertsConfig { email: vec![target("/nonexistent/sendmail".into())], ..Default::default() };
        assert!(deliver(&missing, &ev).unwrap_err().to_string().contains("/nonexistent/sendmail"));
    }
}
