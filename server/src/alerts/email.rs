//! `[[alerts.email]]`: an alert as a plain-text mail handed to the local
//! `sendmail` (`-t -oi`: recipients from the headers, a lone "." is not
//! the end of the message), so the host's MTA queues and retries it.
//!
//! Every header value comes from the config, checked at load, or from
//! text made header-safe here: the alert's text carries client-sent words
//! (a failed push's reason) and must never add a header or end the header
//! block. The subject holds only the alert's key (built from checked
//! names) reduced to printable ASCII; the body has the summary with every
//! control character replaced and its lines wrapped under the 998-byte
//! limit.

use std::path::PathBuf;

use serde::Deserialize;

use super::event::{Event, Status};

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    /// Recipients (plain addresses: `ops@example.com`).
    pub to: Vec<String>,
    /// The sender address.
    pub from: String,
    /// Starts every subject, e.g. "[bkp]".
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    #[serde(default = "default_sendmail")]
    pub sendmail_path: PathBuf,
}

fn default_prefix() -> String {
    "[bkp]".into()
}

fn default_sendmail() -> PathBuf {
    "/usr/sbin/sendmail".into()
}

/// Longest subject text after the prefix; the rest is cut.
const MAX_SUBJECT: usize = 160;
/// Body lines are wrapped at this width (bytes), far under RFC 5322's 998.
const WRAP: usize = 76;

/// An `[[alerts.email]]` setting the server refuses. Fix it in
/// server.toml: a retry cannot help.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmailConfigError {
    #[error("alerts email {what} {address:?}: {why}; write a plain address like ops@example.com")]
    Address { what: &'static str, address: String, why: &'static str },
    #[error("alerts email: `to` lists no recipient")]
    NoRecipient,
    #[error("alerts email subject_prefix {0:?}: at most 64 printable ASCII characters (no line breaks)")]
    SubjectPrefix(String),
    #[error("alerts email sendmail_path {0:?} must be an absolute path (e.g. /usr/sbin/sendmail)")]
    SendmailPath(PathBuf),
}

/// A plain `local@domain` address: printable ASCII without spaces or the
/// characters that start comments, groups, lists or quoted parts.
fn check_address(what: &'static str, a: &str) -> Result<(), EmailConfigError> {
    let bad = |why| Err(EmailConfigError::Address { what, address: a.to_string(), why });
    if a.is_empty() || a.len() > 254 {
        return bad("empty or longer than 254 characters");
    }
    if !a.bytes().all(|b| b.is_ascii_graphic() && !b"<>()[],;:\"\\".contains(&b)) {
        return bad("spaces, control characters, non-ASCII and <>()[],;:\"\\ are not allowed");
    }
    match a.split_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() && !d.contains('@') => Ok(()),
        _ => bad("it needs exactly one @ with text on both sides"),
    }
}

impl Email {
    pub fn check(&self) -> Result<(), EmailConfigError> {
        if self.to.is_empty() {
            return Err(EmailConfigError::NoRecipient);
        }
        for a in &self.to {
            check_address("to", a)?;
        }
        check_address("from", &self.from)?;
        let p = &self.subject_prefix;
        if p.len() > 64 || !p.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(EmailConfigError::SubjectPrefix(p.clone()));
        }
        if !self.sendmail_path.is_absolute() {
            return Err(EmailConfigError::SendmailPath(self.sendmail_path.clone()));
        }
        Ok(())
    }

    /// The whole message, headers and body, as sendmail reads it.
    pub fn message(&self, ev: &Event, date: &str) -> String {
        let tag = if ev.status == Status::Firing { "FIRING" } else { "RESOLVED" };
        let subject =
            header_text(&format!("{} {tag} {} on {}", self.subject_prefix, ev.key, ev.server), MAX_SUBJECT + 64);
        let mut m = String::new();
        for (name, value) in [
            ("From", self.from.clone()),
            ("To", self.to.join(", ")),
            ("Subject", subject),
            ("Date", date.to_string()),
            ("Auto-Submitted", "auto-generated".into()),
            ("MIME-Version", "1.0".into()),
            ("Content-Type", "text/plain; charset=utf-8".into()),
            ("Content-Transfer-Encoding", "8bit".into()),
        ] {
            m.push_str(&format!("{name}: {value}\n"));
        }
        m.push('\n');
        for line in wrap(&body_text(&ev.summary), WRAP) {
            m.push_str(&line);
            m.push('\n');
        }
        m.push('\n');
        let status = if ev.status == Status::Firing { "firing" } else { "resolved" };
        for (k, v) in
            [("status", status), ("alert", &ev.key), ("kind", &ev.kind), ("since", &ev.since), ("server", &ev.server)]
        {
            for line in wrap(&format!("{k}: {}", body_text(v)), WRAP) {
                m.push_str(&line);
                m.push('\n');
            }
        }
        m.push_str("\n-- \nbkp-server: one mail when an alert starts, one when it ends.\n");
        m
    }
}

/// Printable ASCII only, cut to `max` bytes: a header value that cannot
/// hold a line break or anything a mail reader would decode.
fn header_text(s: &str, max: usize) -> String {
    let mut out: String = s.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect();
    out.truncate(max);
    out
}

/// Any text for the body: control characters (line breaks included)
/// become spaces, so the text cannot shape the message; other Unicode is
/// kept (the body is declared UTF-8).
fn body_text(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Words into lines of at most `width` bytes; a longer word is split at a
/// character boundary.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let mut word = word;
        while word.len() > width {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            let head = bkp_common::names::prefix_within(word, width);
            lines.push(head.to_string());
            word = &word[head.len()..];
        }
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> Email {
        toml::from_str("to = [\"ops@example.com\", \"b@example.org\"]\nfrom = \"bkp@backup01.example.com\"").unwrap()
    }

    fn event(summary: &str) -> Event {
        Event {
            status: Status::Firing,
            key: "push:web01/db".into(),
            kind: "push".into(),
            summary: summary.into(),
            since: "2026-12-04T02:30:00Z".into(),
            server: "backup01".into(),
        }
    }

    #[test]
    fn config_defaults_and_checks() {
        let e = email();
        assert_eq!((e.subject_prefix.as_str(), e.sendmail_path.to_str()), ("[bkp]", Some("/usr/sbin/sendmail")));
        assert!(e.check().is_ok());
        for (to, from, prefix, path) in [
            ("", "a@b", "[bkp]", "/x"),
            ("ops@example.com\nBcc: x@y", "a@b", "[bkp]", "/x"),
            ("Ops <ops@example.com>", "a@b", "[bkp]", "/x"),
            ("a@b,c@d", "a@b", "[bkp]", "/x"),
            ("nobody", "a@b", "[bkp]", "/x"),
            ("a@b", "a@b@c", "[bkp]", "/x"),
            ("a@b", "a@b", "[bkp]\r\nBcc: x@y", "/x"),
            ("a@b", "a@b", "[bkp]", "sendmail"),
        ] {
            let e = Email {
                to: if to.is_empty() { vec![] } else { vec![to.into()] },
                from: from.into(),
                subject_prefix: prefix.into(),
                sendmail_path: path.into(),
            };
            assert!(e.check().is_err(), "{e:?}");
        }
        assert!(toml::from_str::<Email>("to = [\"a@b\"]\nfrom = \"a@b\"\ncc = \"x\"").is_err());
        assert!(toml::from_str::<Email>("to = [\"a@b\"]").is_err(), "from is required");
    }

    /// Headers, then one blank line, then the body: whatever the alert
    /// text holds, the header block is exactly the configured one.
    #[test]
    fn alert_text_cannot_add_headers() {
        let evil = "dump failed\r\nBcc: victim@example.com\n\nSubject: pwned\n.\nFrom: x\u{7}\u{1b}[31m é";
        let mut ev = event(evil);
        ev.key = "push:web01/db\r\nBcc: key@example.com".into();
        ev.server = "srv\nX-Evil: 1".into();
        let m = email().message(&ev, "Fri, 04 Dec 2026 02:30:00 +0000");
        let (head, body) = m.split_once("\n\n").unwrap();
        let names: Vec<&str> = head.lines().map(|l| l.split_once(": ").unwrap().0).collect();
        assert_eq!(
            names,
            [
                "From",
                "To",
                "Subject",
                "Date",
                "Auto-Submitted",
                "MIME-Version",
                "Content-Type",
                "Content-Transfer-Encoding"
            ]
        );
        assert!(head.is_ascii() && !head.contains('\r'));
        assert!(head.contains("\nTo: ops@example.com, b@example.org\n"), "{head}");
        let subject = head.lines().find(|l| l.starts_with("Subject: ")).unwrap();
        assert_eq!(subject, "Subject: [bkp] FIRING push:web01/db??Bcc: key@example.com on srv?X-Evil: 1");
        // The words survive in the body, on lines that start no header.
        assert!(body.contains("dump failed Bcc: victim@example.com Subject: pwned . From: x [31m é"), "{body}");
        assert!(!body.contains('\r') && !body.chars().any(|c| c.is_control() && c != '\n'));
        assert!(body.lines().all(|l| l.len() <= WRAP), "{body}");
        assert!(body.contains("\nalert: push:web01/db Bcc: key@example.com\n"), "{body}");
        assert!(!m.lines().any(|l| l == "."));
    }

    #[test]
    fn long_words_and_lines_wrap_at_char_boundaries() {
        let w = wrap(&"é".repeat(100), 10);
        assert!(w.iter().all(|l| l.len() <= 10 && !l.is_empty()), "{w:?}");
        assert_eq!(w.concat(), "é".repeat(100));
        assert_eq!(wrap("a b  c", 3), ["a b", "c"]);
        assert_eq!(wrap("", 3), [""]);
        let m = email().message(&event(&"x".repeat(5000)), "d");
        assert!(m.lines().all(|l| l.len() <= WRAP));
    }
}
