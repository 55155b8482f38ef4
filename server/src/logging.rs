//! Log lines on stderr for whoever reads them: colours only when stderr
//! is a terminal (a file, a pipe or the journal would keep the escape
//! bytes), and under systemd the journal's own form. When stderr is the
//! journal stream systemd gave us (`JOURNAL_STREAM` names its device and
//! inode; a child that redirected stderr inherits the variable but not
//! the stream, hence the comparison), each line starts with a `<N>`
//! syslog priority, which journald strips and records so that
//! `journalctl -p warning` works, and carries no timestamp, since the
//! journal stamps every line itself. The level word stays for readers of
//! `journalctl -o cat`.

use std::fmt;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: level from `BKP_LOG` (default info).
pub fn init() {
    let filter = EnvFilter::try_from_env("BKP_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if stderr_is_journal() {
        builder.with_ansi(false).event_format(Journal(Format::default().without_time())).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Whether fd 2 is the stream `JOURNAL_STREAM` ("DEV:INODE") names.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// sd-daemon(3) priority of a level: err, warning, info, debug.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The usual line behind a `<N>` priority prefix.
struct Journal(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(w, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, w, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(
            [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE].map(|l| syslog_priority(&l)),
            [3, 4, 6, 7, 7]
        );
    }
}
