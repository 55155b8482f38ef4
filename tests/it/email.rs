//! Email alerts: a real server's monitor mails a stale set's alert and its
//! end through a sendmail stand-in (a script that keeps its arguments and
//! the message), and a client-sent failure reason crafted to add headers
//! stays in the body.

use bkp_common::protocol::Role;
use bkp_tests::TestServer;
use std::path::{Path, PathBuf};

use crate::monitoring::{toml_config, wait_for};

/// `sendmail` for the test: each run leaves `mail.*` holding its
/// arguments (one `ARG x` line each), a blank line, then its stdin; moved
/// into place whole, so a reader never sees half a message.
fn fake_sendmail(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("sendmail");
    let d = dir.display();
    let script = format!(
        "#!/bin/sh\nf=$(mktemp {d}/.part.XXXXXX)\n{{ printf 'ARG %s\\n' \"$@\"; echo; cat; }} > \"$f\"\nmv \"$f\" {d}/mail.$(basename \"$f\")\n"
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Every mail sent so far: (arguments, headers as (name, value), body).
type Mail = (Vec<String>, Vec<(String, String)>, String);

fn mails(dir: &Path) -> Vec<Mail> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap();
        if !f.file_name().to_string_lossy().starts_with("mail.") {
            continue;
        }
        let text = std::fs::read_to_string(f.path()).unwrap();
        let (args, msg) = text.split_once("\n\n").unwrap();
        let args = args.lines().map(|l| l.strip_prefix("ARG ").unwrap().to_string()).collect();
        let (head, body) = msg.split_once("\n\n").unwrap();
        let head = head
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap_or_else(|| panic!("not a header line: {l:?}"));
                (k.to_string(), v.to_string())
            })
            .collect();
        out.push((args, head, body.to_string()));
    }
    out
}

fn header<'a>(m: &'a Mail, name: &str) -> &'a str {
    m.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name}: {m:?}"))
}

fn with_subject(dir: &Path, part: &str) -> Vec<Mail> {
    mails(dir).into_iter().filter(|m| header(m, "Subject").contains(part)).collect()
}

#[test]
fn a_stale_set_is_mailed_through_sendmail_and_crafted_text_stays_in_the_body() {
    let mail_dir = tempfile::tempdir().unwrap();
    let sendmail = fake_sendmail(mail_dir.path());
    let cfg = toml_config(&format!(
        "cache_mb = 16\n[monitor]\ncheck_interval = \"200ms\"\n[freshness.sets.\"web01/pgdump\"]\ninterval = \"2s\"\ngrace = \"1s\"\n\
         [[alerts.email]]\nto = [\"ops@example.com\", \"dba@example.com\"]\nfrom = \"bkp@backup01.example.com\"\n\
         subject_prefix = \"[bkp test]\"\nsendmail_path = \"{}\"\n",
        sendmail.display()
    ));
    let server = TestServer::start_with(cfg);
    let tok = server.token("web01", Role::Push);
    server.push_stdin(&tok, "pgdump", b"SELECT 1;\n");
    wait_for("the stale alert's mail", 20, || !with_subject(mail_dir.path(), "FIRING stale:web01/pgdump").is_empty());
    let m = with_subject(mail_dir.path(), "FIRING stale:web01/pgdump").remove(0);
    assert_eq!(m.0, ["-t", "-oi"], "recipients from the headers; a lone dot does not end the message");
    let names: Vec<&str> = m.1.iter().map(|(k, _)| k.as_str()).collect();
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
    assert_eq!(header(&m, "From"), "bkp@backup01.example.com");
    assert_eq!(header(&m, "To"), "ops@example.com, dba@example.com");
    assert!(header(&m, "Subject").starts_with("[bkp test] FIRING stale:web01/pgdump on "), "{m:?}");
    // RFC 2822, UTC: "Fri, 4 Dec 2026 03:28:15 +0000".
    let date = header(&m, "Date");
    assert!(date.split(' ').count() == 6 && date.as_bytes()[3] == b',' && date.ends_with(" +0000"), "{date}");
    assert!(m.2.starts_with("web01/pgdump: last backup "), "{}", m.2);
    assert!(m.2.contains("\nstatus: firing\nalert: stale:web01/pgdump\nkind: stale\n"), "{}", m.2);

    // A push failure whose reason (client-sent text) tries to add a Bcc
    // and a second message.
    let evil = "disk error\r\nBcc: victim@example.com\r\n\r\nSubject: injected\n.\n";
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = server.client(&tok).await;
        c.push_failed("files", None, evil).await.unwrap();
    });
    wait_for("the push failure's mail", 20, || !with_subject(mail_dir.path(), "FIRING push:web01/files").is_empty());
    let m = with_subject(mail_dir.path(), "FIRING push:web01/files").remove(0);
    assert_eq!(m.1.len(), 8, "the same eight headers and nothing else: {m:?}");
    assert!(m.1.iter().all(|(k, v)| k != "Bcc" && !v.contains("victim") && !v.contains("injected")), "{m:?}");
    let body = m.2.replace('\n', " ");
    assert!(body.contains("disk error Bcc: victim@example.com Subject: injected ."), "{}", m.2);
    assert!(!m.2.contains('\r') && !m.2.lines().any(|l| l == "."), "{}", m.2);
    assert_eq!(with_subject(mail_dir.path(), "FIRING stale:web01/pgdump").len(), 1, "one mail per change");

    // The next push ends the stale alert: one RESOLVED mail.
    server.push_stdin(&tok, "pgdump", b"SELECT 2;\n");
    wait_for("the resolved mail", 20, || !with_subject(mail_dir.path(), "RESOLVED stale:web01/pgdump").is_empty());
    let m = with_subject(mail_dir.path(), "RESOLVED stale:web01/pgdump").remove(0);
    assert!(m.2.starts_with("resolved: web01/pgdump: last backup "), "{}", m.2);
}
