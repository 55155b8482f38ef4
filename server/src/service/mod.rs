//! The server's request logic, without a transport: one function per
//! client request, taking the stores, the live [`Sessions`] and the
//! [`Caller`] (whose token sent it), and returning protocol types or a
//! [`ServiceError`]. `crate::connection` only turns QUIC frames into these
//! calls (hello, frame budgets, upload batching, pacing) and their answers
//! back into frames; in-process tests call them directly.
//!
//! * [`push`]: start a session, which chunks are missing, store a batch of
//!   uploaded chunks, commit a snapshot;
//! * [`read`]: list snapshots, read one, which chunks a fetch may read;
//! * [`admin`]: forget, protect, a client's report of a failed push.
//!
//! Every function blocks (RocksDB, decompression): call it off the async
//! runtime.
//!
//! [`Sessions`]: crate::sessions::Sessions

pub mod admin;
pub mod push;
pub mod read;

#[cfg(test)]
mod tests;

use bkp_common::protocol::{ErrorCode, Role};
use bkp_common::ChunkId;

use crate::commit::CommitError;
use crate::sessions::SessionError;
use crate::store::StoreError;

/// Who sent a request: what the hello's token said.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The host the token belongs to; every read and write is this host's.
    pub host: String,
    pub role: Role,
    /// The token's id (its push sessions end when it is revoked).
    pub token_id: String,
    /// The client's version string from the hello, kept in snapshots.
    pub client: String,
}

impl Caller {
    /// Refuses the request unless the caller's role is one of `allowed`.
    pub fn require(&self, allowed: &[Role], what: &str) -> Result<(), ServiceError> {
        if allowed.contains(&self.role) {
            return Ok(());
        }
        let msg = format!("a {} token may not do this", self.role.as_str());
        Err(ServiceError::Forbidden { audit: format!("{what}: {msg}"), message: msg })
    }
}

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request breaks the protocol (too many ids, a bad name).
    #[error("{0}")]
    BadRequest(String),
    /// The token's role or host does not allow it; `audit` is the line
    /// the audit log gets.
    #[error("{message}")]
    Forbidden { message: String, audit: String },
    #[error("{0}")]
    NotFound(String),
    /// Refused on its content: a chunk that does not hash to its id, a
    /// tree that references what the host never proved, a budget.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CommitError> for ServiceError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Rejected(m) => ServiceError::Rejected(m),
            CommitError::Store(s) => ServiceError::Store(s),
        }
    }
}

impl ServiceError {
    /// A chunk a fetch may read that the store no longer has.
    pub fn missing_chunk(id: &ChunkId) -> Self {
        ServiceError::NotFound(format!("chunk {} is missing from the store; run verify", id.short()))
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::BadRequest(_) => ErrorCode::BadRequest,
            ServiceError::Forbidden { .. } => ErrorCode::Forbidden,
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::Rejected(_) | ServiceError::Store(StoreError::Protected(_)) => ErrorCode::Rejected,
            ServiceError::Session(SessionError::HostBusy(..) | SessionError::ServerBusy(_)) => ErrorCode::Busy,
            ServiceError::Session(_) => ErrorCode::Rejected,
            ServiceError::Store(_) => ErrorCode::Internal,
        }
    }

    /// What the client is told. A store error's detail (paths, RocksDB's
    /// words) stays in the server's log, except where it tells the client
    /// what to do (a full disk, a protected snapshot).
    pub fn client_message(&self) -> String {
        match self {
            ServiceError::Store(StoreError::Protected(_) | StoreError::Full(_)) => self.to_string(),
            ServiceError::Store(StoreError::Bucket { bucket, .. }) => format!(
                "the server's object store (bucket {bucket:?}) failed or did not answer (see the server log); \
                 once it answers again, try again: a push sends only what is still missing"
            ),
            ServiceError::Store(_) => "server storage error (see the server log)".into(),
            _ => self.to_string(),
        }
    }

    /// Whether the same request may succeed later without a change on the
    /// client: a busy server, a full disk, a storage fault.
    pub fn retryable(&self) -> bool {
        match self {
            ServiceError::Session(e) => matches!(e, SessionError::HostBusy(..) | SessionError::ServerBusy(_)),
            ServiceError::Store(e) => matches!(e, StoreError::Db(_) | StoreError::Full(_) | StoreError::Bucket { .. }),
            _ => false,
        }
    }
}
