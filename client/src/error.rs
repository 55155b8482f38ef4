//! The client's errors. Each message says what to do next, and
//! [`ClientError::retryable`] says whether doing the same thing again can
//! help: a lost connection or a busy server, yes; a refusal, a bad
//! argument or corrupt data, no. The causes are kept as sources, not
//! flattened into strings, so callers can tell them apart.

use std::path::Path;

use bkp_common::protocol::ErrorCode;

/// Why the connection failed under a request.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Reading or writing a frame.
    #[error(transparent)]
    Frame(#[from] bkp_common::io::IoError),
    /// The QUIC connection ended (timed out, reset, closed).
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    /// A stream ended before what was expected on it.
    #[error("{0}")]
    Ended(&'static str),
    /// No answer in time.
    #[error("{0} timed out")]
    TimedOut(&'static str),
}

/// What was wrong with what the server sent.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    #[error("snapshot tree: {0}")]
    Tree(#[from] bkp_common::tree::TreeError),
    /// A blob that does not decode, or decodes to other bytes than its id.
    #[error(transparent)]
    Blob(#[from] bkp_common::blob::BlobError),
    #[error("chunk {id} of the stream: {reason}")]
    StreamChunk { id: String, reason: String },
    #[error("stream content hash mismatch")]
    StreamHash,
    /// Tree entries in an order no push writes.
    #[error("{0}")]
    Layout(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Refused at connection time (a bad address, TLS, the hello).
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    /// Every attempt in the connect budget went unanswered.
    #[error("connecting to {0}: {1}")]
    NoAnswer(String, String),
    #[error("server refused: {0}")]
    Server(String, ErrorCode),
    #[error("protocol error: {0}; are client and server the same version?")]
    Protocol(String),
    #[error("connection lost: {0}; run the command again")]
    Link(#[from] LinkError),
    /// A push's connection was lost before its commit was sent.
    #[error("connection to the server lost ({source}{note}); nothing was committed; run the push again")]
    Lost { source: LinkError, note: String },
    /// A push failed on the connection (which is still up) before its
    /// commit was sent.
    #[error("connection lost: {0}; nothing was committed; run the push again")]
    NotCommitted(#[source] LinkError),
    /// Lost after the commit request was sent, before its answer.
    #[error(
        "connection lost after the commit was sent ({0}): the commit may or may not have landed; `bkp snapshots` tells"
    )]
    CommitUnknown(#[source] LinkError),
    #[error("the server closed the connection: {0}")]
    Closed(String),
    /// What the user asked for cannot be done as asked; the message says
    /// what to give instead.
    #[error("{0}")]
    Usage(String),
    /// Reading what is to be backed up (a root, a file, a dump command).
    #[error("{what}: {source}")]
    Source { what: String, source: std::io::Error },
    /// A dump command that exited with an error.
    #[error("{command} failed ({status}); no snapshot was committed")]
    DumpFailed { command: String, status: std::process::ExitStatus },
    /// Writing a restore.
    #[error("{what}: {source}; check the target (free space, permissions) and restore again")]
    Write { what: String, source: std::io::Error },
    #[error("{0}: a directory is in the way; move it or restore to another --target")]
    InTheWay(String),
    #[error("corrupt data from server: {0}; the server's verify job reports what is damaged")]
    Corrupt(#[from] Corruption),
    /// One of the client's own threads or tasks failed.
    #[error("{what}: {source}; this is a bug in bkp, please report it")]
    Task { what: &'static str, source: tokio::task::JoinError },
    #[error("{0}; this is a bug in bkp, please report it")]
    Bug(&'static str),
    /// A sealed chunk and no key (or not the right one) to open it.
    #[error("{0}")]
    Key(String),
    /// The system refused a thread.
    #[error("starting {what}: {source}")]
    Thread { what: &'static str, source: std::io::Error },
}

impl ClientError {
    /// Can the same request or command succeed if tried again, unchanged?
    pub fn retryable(&self) -> bool {
        use ClientError::*;
        match self {
            NoAnswer(..) | Link(_) | Lost { .. } | NotCommitted(_) | Thread { .. } => true,
            // Busy: a limit that frees up; Internal: the server's own
            // trouble (its disk, a restart), which may pass.
            Server(_, code) => matches!(code, ErrorCode::Busy | ErrorCode::Internal),
            Source { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut)
            }
            // The commit may have landed: look before pushing again.
            CommitUnknown(_) => false,
            Config(_)
            | Key(_)
            | Connect(..)
            | Protocol(_)
            | Closed(_)
            | Usage(_)
            | DumpFailed { .. }
            | Write { .. }
            | InTheWay(_)
            | Corrupt(_)
            | Task { .. }
            | Bug(_) => false,
        }
    }

    /// An I/O error while writing a restore at `p`.
    pub fn write(p: &Path, source: std::io::Error) -> Self {
        ClientError::Write { what: p.display().to_string(), source }
    }

    /// An I/O error while reading `what` for a backup.
    pub fn source(what: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Source { what: what.into(), source }
    }
}

impl From<crate::crypt::OpenError> for ClientError {
    fn from(e: crate::crypt::OpenError) -> Self {
        match e {
            crate::crypt::OpenError::Blob(b) => ClientError::Corrupt(b.into()),
            other => ClientError::Key(other.to_string()),
        }
    }
}

impl From<bkp_common::io::IoError> for ClientError {
    fn from(e: bkp_common::io::IoError) -> Self {
        ClientError::Link(LinkError::Frame(e))
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_says_whether_again_can_help() {
        let lost = ClientError::Link(LinkError::Ended("stream closed before the answer"));
        assert!(lost.retryable());
        assert!(ClientError::Server("busy".into(), ErrorCode::Busy).retryable());
        assert!(!ClientError::Server("no".into(), ErrorCode::Forbidden).retryable());
        assert!(!ClientError::CommitUnknown(LinkError::TimedOut("commit")).retryable());
        assert!(!ClientError::Usage("bad".into()).retryable());
        assert!(!ClientError::Corrupt(Corruption::StreamHash).retryable());
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!ClientError::source("/x", gone).retryable());
    }

    #[test]
    fn causes_stay_reachable() {
        let e = ClientError::write(Path::new("/t/f"), std::io::Error::from_raw_os_error(libc::ENOSPC));
        let src = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(src.and_then(|s| s.raw_os_error()), Some(libc::ENOSPC));
        assert!(e.to_string().starts_with("/t/f: "), "{e}");
    }
}
