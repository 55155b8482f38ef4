//! Issue 21: what `bkp-server serve` writes to a stderr that is no
//! terminal. A file (or a pipe, or the journal) would keep colour escapes
//! as garbage; under systemd the journal stamps lines itself and reads
//! the priority from a `<N>` prefix.

// unsafe: kill(2) with SIGTERM; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkp_tests::{bin, ok};

enum Journal {
    /// No `JOURNAL_STREAM`.
    Unset,
    /// `JOURNAL_STREAM` names the file stderr goes to, as systemd sets it.
    Stderr,
    /// `JOURNAL_STREAM` inherited from a parent whose stderr was the
    /// journal, while ours is a file.
    Stale,
}

/// Runs `serve` with stderr to a file until it logs "serving", stops it
/// with SIGTERM, and returns what it wrote.
fn serve_log(journal: Journal) -> String {
    let data = tempfile::tempdir().unwrap();
    ok(Command::new(bin("bkp-server")).args(["init", "--data"]).arg(data.path()));
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("stderr.log");
    let file = std::fs::File::create(&path).unwrap();
    let other = logs.path().join("other");
    std::fs::write(&other, b"").unwrap();
    let mut c = Command::new(bin("bkp-server"));
    c.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .env("BKP_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(file);
    let stream = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    match journal {
        Journal::Unset => {}
        Journal::Stderr => {
            c.env("JOURNAL_STREAM", stream(&path));
        }
        Journal::Stale => {
            c.env("JOURNAL_STREAM", stream(&other));
        }
    }
    let mut child = c.spawn().unwrap();
    let read = || String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !read().contains("serving") {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("serve exited with {st}: {}", read());
        }
        assert!(Instant::now() < deadline, "serve logged no \"serving\" line: {}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "serve after SIGTERM: {st}: {}", read());
    read()
}

fn line_with<'a>(log: &'a str, what: &str) -> &'a str {
    log.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no line with {what:?} in:\n{log}"))
}

#[test]
fn serve_log_to_a_file_has_no_escape_codes() {
    let log = serve_log(Journal::Unset);
    assert!(!log.contains('\x1b'), "escape codes in a log file:\n{log:?}");
    let l = line_with(&log, "serving");
    assert!(l.contains("INFO"), "{l}");
    // A file keeps no time of its own: the line carries its timestamp.
    assert!(l.starts_with(|c: char| c.is_ascii_digit()), "no timestamp: {l}");
    assert!(line_with(&log, "stopped").contains("INFO"));
}

#[test]
fn serve_log_to_the_journal_has_a_priority_and_no_timestamp() {
    let log = serve_log(Journal::Stderr);
    assert!(!log.contains('\x1b'), "{log:?}");
    for (what, prefix) in [("serving", "<6> INFO "), ("stopped", "<6> INFO ")] {
        let l = line_with(&log, what);
        assert!(l.starts_with(prefix), "{what}: {l:?} does not start with {prefix:?}");
    }

    // The variable alone is not the journal: stderr must be the stream it names.
    let log = serve_log(Journal::Stale);
    let l = line_with(&log, "serving");
    assert!(!l.starts_with('<') && l.starts_with(|c: char| c.is_ascii_digit()), "{l:?}");
}

/// `bkp` has no log subscriber: what it writes to stderr is its summary
/// (`--verbose`), its one-line reasons, clap's usage errors and, on a
/// terminal only, the progress bar. None of it may colour a cron mail.
#[test]
fn client_output_to_a_file_has_no_escape_codes() {
    let server = bkp_tests::TestServer::start();
    let token = server.token("web01", bkp_common::protocol::Role::Push);
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("f"), b"some bytes").unwrap();
    let runs = [
        server.bkp(&token).args(["push", "--verbose"]).arg(tree.path()).output().unwrap(),
        server.bkp(&token).args(["ls", "ffffffff"]).output().unwrap(),
        server.bkp(&token).args(["restore"]).output().unwrap(),
    ];
    assert!(runs[0].status.success() && !runs[1].status.success() && !runs[2].status.success());
    for out in &runs {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.is_empty() && !err.contains('\x1b'), "{err:?}");
    }
}
