use bkp_common::protocol::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("server refused: {0}")]
    Server(String, ErrorCode),
    #[error("protocol error: {0}; are client and server the same version?")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Io(String),
    /// A push's connection was lost before its commit was sent.
    #[error("connection to the server lost ({0}); nothing was committed; run the push again")]
    Lost(String),
    /// Lost after the commit request was sent, before its answer.
    #[error(
        "connection lost after the commit was sent ({0}): the commit may or may not have landed; `bkp snapshots` tells"
    )]
    CommitUnknown(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Restore(String),
    #[error("corrupt data from server: {0}")]
    Corrupt(String),
    #[error("the server closed the connection: {0}")]
    Closed(String),
}

impl From<bkp_common::io::IoError> for ClientError {
    fn from(e: bkp_common::io::IoError) -> Self {
        ClientError::Io(e.to_string())
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
